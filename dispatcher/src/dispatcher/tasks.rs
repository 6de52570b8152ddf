//! Operations on one task by id: `cancel`, `update` (priority, tags) and `get`.

use super::{Dispatcher, Pushes};
use crate::error::{Error, Result};
use crate::index::{Holders, Locked, Phase};
use crate::queue::order_key;
use crate::sync::Ordering;
use crate::task::{Cancelled, TaskInfo, TaskStatus};
use crate::TaskId;

impl Dispatcher {
    /// Cancels a task wherever it is. A queued or parked task is never handed out; a running
    /// task's assignment is revoked (its report will be refused) and reported back.
    pub fn cancel(&self, task: TaskId) -> Result<Cancelled> {
        let mut l = self.lock_task(task)?;
        let attempt = l.st.attempt;
        let phase = self.end(&mut l);
        self.cells.free(l);
        self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
        Ok(match phase {
            Phase::Running { worker } => Cancelled::Running {
                worker: worker.id,
                attempt,
            },
            _ => Cancelled::Queued,
        })
    }

    /// Changes the priority and/or tags of a queued (or parked) task; it is placed afresh. A
    /// waiting task keeps waiting until its time.
    /// A running task is refused with [`Error::NotQueued`].
    pub fn update<S: AsRef<str>>(
        &self,
        task: TaskId,
        priority: Option<i32>,
        tags: Option<&[S]>,
    ) -> Result<TaskStatus> {
        let mut pushes = Pushes::default();
        // The new class is made outside the task's critical section (making one takes the
        // registry's topology lock and visits every worker), and only for a task that is
        // queued: a refused update creates nothing.
        let class = match tags {
            Some(tags) => {
                let group = {
                    let l = self.lock_task(task)?;
                    if let Phase::Running { .. } = l.st.phase {
                        return Err(Error::NotQueued(task));
                    }
                    l.st.class.group_name.clone()
                };
                self.registry.check_class(&group, tags)?;
                Some(self.registry.class(&group, tags)?)
            }
            None => None,
        };
        let mut l = self.lock_task(task)?;
        if let Phase::Running { .. } = l.st.phase {
            return Err(Error::NotQueued(task));
        }
        let class = class.unwrap_or_else(|| l.st.class.clone());
        let was = self.release(&mut l);
        if let Some(p) = priority {
            l.st.priority = p;
            l.st.key = order_key(p, self.config.aging_rate, l.st.enqueued);
        }
        l.st.class = class;
        match was {
            // A waiting task keeps waiting, with a new timer entry (the old one is dead).
            Phase::Waiting { until } => self.delay(&mut l, until, &mut pushes),
            _ => {
                l.requeue();
                self.place(&mut l, &mut pushes);
            }
        }
        let placement = self.status_of(&l);
        drop(l);
        self.flush(pushes);
        Ok(placement)
    }

    /// The live tasks whose group `pick` accepts, in no particular order (a coordinator that
    /// gives up some groups finds their tasks with it). A snapshot: a task submitted or ended
    /// meanwhile may be missing or listed.
    pub fn tasks_in_groups(&self, pick: impl Fn(&str) -> bool) -> Vec<TaskId> {
        self.index
            .entries()
            .into_iter()
            .filter(|&(id, slot)| {
                self.lock_slot(id, slot).is_some_and(|l| {
                    !matches!(l.st.phase, Phase::Gone) && pick(&l.st.class.group_name)
                })
            })
            .map(|(id, _)| id)
            .collect()
    }

    /// A snapshot of a live task, or `None` if no live task has this id.
    pub fn get(&self, task: TaskId) -> Option<TaskInfo> {
        let l = self.lock_task(task).ok()?;
        if let Phase::Gone = l.st.phase {
            return None;
        }
        Some(TaskInfo {
            id: task,
            status: self.status_of(&l),
            attempt: l.st.attempt,
            priority: l.st.priority,
            group: l.st.class.group_name.to_string(),
            tags: l.st.class.tag_names.iter().map(|t| t.to_string()).collect(),
        })
    }

    /// Where a locked, live task is, as reported to callers. A fanout task is held by every
    /// live candidate of its class, and parked while there is none.
    pub(crate) fn status_of(&self, l: &Locked<'_>) -> TaskStatus {
        match &l.st.phase {
            Phase::Queued {
                holders: Holders::Class,
                ..
            } => {
                let candidates = self.registry.candidates(&l.st.class);
                if candidates.is_empty() {
                    TaskStatus::Parked
                } else {
                    TaskStatus::Queued(candidates.iter().map(|w| w.id).collect())
                }
            }
            Phase::Queued {
                holders: Holders::One(w),
                ..
            } => TaskStatus::Queued(vec![w.id]),
            Phase::Queued { .. } => TaskStatus::Parked,
            Phase::Running { worker } => TaskStatus::Running(worker.id),
            Phase::Waiting { until } => TaskStatus::Waiting(*until),
            Phase::Gone => unreachable!("an ended task has no status"),
        }
    }
}

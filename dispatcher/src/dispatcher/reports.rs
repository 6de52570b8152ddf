//! Reports from workers: `complete`, `give_back` and `retry`, fenced by attempt, and the
//! questions a coordinator asks to reconcile a worker (`running`, `is_running`).

use super::{Dispatcher, Pushes};
use crate::error::{Error, Result};
use crate::index::Locked;
use crate::registry::Worker;
use crate::sync::Ordering;
use crate::task::{Assignment, TaskStatus};
use crate::{TaskId, WorkerId};

impl Dispatcher {
    /// Reports `task` finished or failed by `worker` as `attempt`. The task leaves the
    /// dispatcher. A report for any other attempt is refused with [`Error::StaleAttempt`].
    pub fn complete(&self, worker: WorkerId, task: TaskId, attempt: u32) -> Result<()> {
        let w = self.registry.get(worker)?;
        let mut l = self.lock_task(task)?;
        Self::check_assignment(&l, &w, task, attempt)?;
        self.end(&mut l);
        self.cells.free(l);
        self.counters.completed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// `worker` hands `task` (attempt `attempt`) back unfinished: it is queued again and its
    /// next fetch is a new attempt. Returns where it was placed.
    pub fn give_back(&self, worker: WorkerId, task: TaskId, attempt: u32) -> Result<TaskStatus> {
        let w = self.registry.get(worker)?;
        let mut pushes = Pushes::default();
        let mut l = self.lock_task(task)?;
        Self::check_assignment(&l, &w, task, attempt)?;
        self.release(&mut l);
        l.requeue();
        self.place(&mut l, &mut pushes);
        let placement = self.status_of(&l);
        drop(l);
        self.flush(pushes);
        self.counters.given_back.fetch_add(1, Ordering::Relaxed);
        Ok(placement)
    }

    /// Ends `worker`'s attempt `attempt` of `task` without ending the task: it is queued again
    /// (its next fetch is a new attempt) — at once, or, with `not_before`, after waiting until
    /// then (the caller's clock, as for [`TaskSpec::not_before`](crate::TaskSpec::not_before)).
    /// For a failed attempt that will be retried after a backoff, or one the caller ends itself
    /// (a timeout). Returns where the task went.
    pub fn retry(
        &self,
        worker: WorkerId,
        task: TaskId,
        attempt: u32,
        not_before: Option<u64>,
    ) -> Result<TaskStatus> {
        let w = self.registry.get(worker)?;
        let mut pushes = Pushes::default();
        let mut l = self.lock_task(task)?;
        Self::check_assignment(&l, &w, task, attempt)?;
        self.release(&mut l);
        match not_before {
            Some(until) => self.delay(&mut l, until, &mut pushes),
            None => {
                l.requeue();
                self.place(&mut l, &mut pushes);
            }
        }
        let placement = self.status_of(&l);
        drop(l);
        self.flush(pushes);
        self.counters.retried.fetch_add(1, Ordering::Relaxed);
        Ok(placement)
    }

    /// The assignments `worker` runs now (claimed, not yet reported, given back or cancelled),
    /// in claim order. A coordinator compares them with what the worker says it holds.
    ///
    /// Locks the worker's queue, then each task's cell in turn (the documented order).
    pub fn running(&self, worker: WorkerId) -> Result<Vec<Assignment>> {
        let w = self.registry.get(worker)?;
        let q = w.queue.lock();
        if q.closed {
            return Err(Error::UnknownWorker(worker));
        }
        let mut out = Vec::with_capacity(w.load.running());
        for record in &q.running {
            if !record.is_current(&self.cells) {
                continue; // reported, given back or cancelled: a pruned-later record
            }
            let Some(l) = self.cells.lock(record.slot) else {
                continue;
            };
            if l.st.gen == record.gen && l.is_running_on(&w, record.attempt) {
                out.push(Assignment {
                    task: l.st.id,
                    attempt: record.attempt,
                    priority: l.st.priority,
                });
            }
        }
        Ok(out)
    }

    /// Whether `task` runs on `worker` as `attempt` now.
    pub fn is_running(&self, worker: WorkerId, task: TaskId, attempt: u32) -> bool {
        let (Ok(w), Ok(l)) = (self.registry.get(worker), self.lock_task(task)) else {
            return false;
        };
        l.is_running_on(&w, attempt)
    }

    /// Whether a report by `w` for `attempt` names the task's current assignment.
    fn check_assignment(l: &Locked<'_>, w: &Worker, task: TaskId, attempt: u32) -> Result<()> {
        if !l.is_running_on(w, attempt) {
            return Err(Error::StaleAttempt {
                task,
                attempt,
                worker: w.id,
            });
        }
        Ok(())
    }
}

//! Workers arriving and leaving, parking and rebalancing.
//!
//! # Departure (`unregister`)
//! 1. The worker is withdrawn from the registry (the epoch moves, so fresh candidate lists
//!    exclude it).
//! 2. Its queue is closed and emptied under the queue lock. From here, pushes to it fail and
//!    their pushers re-place (see [`crate::dispatcher`]); fetches on it are refused.
//! 3. Balanced: every live entry it held is dropped from its task, in the task's critical
//!    section, and the task is placed afresh (another candidate, keeping its priority and FIFO
//!    position) or parked. Fanout: nothing moves — the tasks of its classes stay in the class
//!    heaps, held by the remaining candidates, or parked if none is left; each is reported.
//! 4. Every task it ran goes back to queued (a new generation; its next fetch is a new attempt).
//!
//! When `unregister` returns, no task lists the worker as holder or runner, except a task whose
//! placement chose the worker just before step 1 and has not pushed yet: that pusher's push fails
//! and it re-places the task itself ("redirected, not stranded").
//!
//! # Parking and arrival (`register`)
//! Balanced: a task with no live candidate is parked. Parking re-checks the candidates *while
//! holding the parked-set lock*, and `register` publishes the worker *before* taking that lock to
//! collect the parked tasks it can run. Whichever takes the lock second sees the other's work,
//! so a task is never parked while a live candidate exists.
//!
//! Fanout: a task of a class with no live candidate waits in the class heap, parked in effect;
//! the first candidate to register reads that heap. Registering computes the worker's class list
//! under the registry's topology lock, which class creation also takes, so a class created
//! concurrently is either in the list or added to it.
//!
//! # Rebalancing (balanced mode)
//! One pass over the workers, most loaded first, moving each task at most once: a queued task
//! moves from its worker to its least loaded other candidate while the source's load is at least
//! two tasks more than the target's and more than `rebalance_ratio` times it. Each move makes the
//! two loads closer without crossing. The least urgent tasks move first, which leaves the head of
//! the source's queue in place.

use std::collections::HashSet;

use crate::config::Mode;
use crate::dispatcher::{Dispatcher, Pushes};
use crate::error::Result;
use crate::index::{Holders, Locked, Phase, Slot};
use crate::placement;
use crate::registry::Class;
use crate::sync::Shared;
use crate::sync::{Arc, Ordering};
use crate::task::{Departure, Registration, Relocation, TaskStatus, Was};
use crate::{TaskId, WorkerId};

/// A parked task: its class (to match arriving workers without locking it) and its slot.
pub(crate) struct Parked {
    class: Arc<Class>,
    slot: Slot,
}

impl Dispatcher {
    /// Registers `worker`, serving `groups`, with `tags`. Balanced: parked tasks it can run are
    /// placed. Fanout: it reads the heaps of the classes it serves from now on.
    pub fn register<G: AsRef<str>, T: AsRef<str>>(
        &self,
        worker: WorkerId,
        groups: &[G],
        tags: &[T],
    ) -> Result<Registration> {
        let w = self.registry.new_worker(worker, groups, tags)?;
        self.registry.insert(&w)?;
        let mut pushes = Pushes::default();
        let mut done = Registration::default();
        if self.config.mode == Mode::Fanout {
            // Nothing moves: the worker reads its classes' heaps from now on.
            done.backfilled = w.classes.lock().iter().map(|c| c.queued.get()).sum();
        } else {
            let unparked: Vec<(TaskId, Slot)> = {
                let mut parked = self.parked.lock();
                let ids: Vec<TaskId> = parked
                    .iter()
                    .filter(|(_, p)| w.serves(&p.class))
                    .map(|(id, _)| *id)
                    .collect();
                ids.into_iter()
                    .filter_map(|id| parked.remove(&id).map(|p| (id, p.slot)))
                    .collect()
            };
            for (id, slot) in unparked {
                let Some(mut l) = self.lock_slot(id, slot) else {
                    continue;
                };
                if let Phase::Queued {
                    parked: was @ true, ..
                } = &mut l.st.phase
                {
                    *was = false;
                    l.requeue();
                    self.place(&mut l, &mut pushes);
                    done.unparked += 1;
                }
            }
        }
        self.flush(pushes);
        Ok(done)
    }

    /// Checks a registration's groups and tags as `register` would, without registering.
    pub fn validate_worker<G: AsRef<str>, T: AsRef<str>>(
        &self,
        groups: &[G],
        tags: &[T],
    ) -> Result<()> {
        self.registry.check_worker(groups, tags)
    }

    /// Whether `worker` is registered.
    pub fn is_registered(&self, worker: WorkerId) -> bool {
        self.registry.get(worker).is_ok()
    }

    /// Parks a queued task with no holders if it still has no live candidate, re-checked under
    /// the parked-set lock (see the module docs). Returns false if a candidate appeared.
    pub(crate) fn park(&self, l: &mut Locked<'_>) -> bool {
        let mut parked = self.parked.lock();
        if !self.registry.candidates(&l.st.class).is_empty() {
            return false;
        }
        let (id, slot, class) = (l.st.id, l.slot, l.st.class.clone());
        let Phase::Queued {
            holders,
            parked: flag,
        } = &mut l.st.phase
        else {
            unreachable!("only queued tasks are parked")
        };
        debug_assert!(holders.is_empty());
        *flag = true;
        parked.insert(id, Parked { class, slot });
        self.counters.parked.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Removes `worker` and redistributes every task it held or ran (see the module docs).
    pub fn unregister(&self, worker: WorkerId) -> Result<Departure> {
        let w = self.registry.remove(worker)?;
        let (entries, running) = w.queue.lock().close();
        self.counters.fold(&w.load);
        let mut pushes = Pushes::default();
        let mut tasks = Vec::new();
        if self.config.mode == Mode::Fanout {
            // Taking the list also breaks the worker ↔ class reference cycle.
            let classes = std::mem::replace(&mut *w.classes.lock(), Shared::from(Vec::new()));
            self.report_fanout_departure(&classes, &mut tasks);
        }
        for entry in entries {
            // A copy that is not live now never will be: skip it without locking.
            if !entry.is_live(&self.cells) {
                continue;
            }
            let Some(mut l) = self.cells.lock(entry.slot) else {
                continue;
            };
            if l.st.gen != entry.gen {
                continue;
            }
            if !l.remove_holder(&w) {
                continue;
            }
            l.requeue();
            self.place(&mut l, &mut pushes);
            tasks.push(Relocation {
                task: l.st.id,
                was: Was::Queued,
                now: self.status_of(&l),
            });
        }
        for record in running {
            if !record.is_current(&self.cells) {
                continue; // reported, given back or cancelled meanwhile
            }
            let Some(mut l) = self.cells.lock(record.slot) else {
                continue;
            };
            if l.st.gen != record.gen || !l.is_running_on(&w, record.attempt) {
                continue;
            }
            self.release(&mut l);
            l.requeue();
            self.place(&mut l, &mut pushes);
            tasks.push(Relocation {
                task: l.st.id,
                was: Was::Running(record.attempt),
                now: self.status_of(&l),
            });
        }
        self.flush(pushes);
        self.counters
            .redistributed
            .fetch_add(tasks.len() as u64, Ordering::Relaxed);
        Ok(Departure { worker, tasks })
    }

    /// Fanout departure: the tasks of the departed worker's classes stay in their heaps; each is
    /// reported as still held by the remaining candidates, or parked if none is left.
    fn report_fanout_departure(&self, classes: &Shared<[Arc<Class>]>, tasks: &mut Vec<Relocation>) {
        for class in classes.iter() {
            let now = {
                let candidates = self.registry.candidates(class);
                if candidates.is_empty() {
                    TaskStatus::Parked
                } else {
                    TaskStatus::Queued(candidates.iter().map(|w| w.id).collect())
                }
            };
            let live = class.heap.lock().live_entries(&self.cells);
            let before = tasks.len();
            for entry in live {
                let Some(l) = self.cells.lock(entry.slot) else {
                    continue;
                };
                if l.st.gen == entry.gen && matches!(l.st.phase, Phase::Queued { .. }) {
                    tasks.push(Relocation {
                        task: l.st.id,
                        was: Was::Queued,
                        now: now.clone(),
                    });
                }
            }
            if now == TaskStatus::Parked {
                let parked = (tasks.len() - before) as u64;
                self.counters.parked.fetch_add(parked, Ordering::Relaxed);
            }
        }
    }

    /// Balanced mode: moves queued tasks from overloaded workers to less loaded candidates until
    /// every move would break the thresholds in the module docs. Returns how many tasks moved.
    /// In fanout mode every candidate already holds every task, and this returns 0.
    pub fn rebalance(&self) -> usize {
        if self.config.mode == Mode::Fanout {
            return 0;
        }
        let weight = self.running_weight_milli;
        let mut workers = self.registry.workers();
        workers.sort_by_key(|w| std::cmp::Reverse(w.load.weighted(weight)));
        // A task moves at most once per pass: it must not leave a worker it was just moved to.
        let mut moved: HashSet<Slot> = HashSet::new();
        for src in &workers {
            let mut entries = {
                let q = src.queue.lock();
                if q.closed {
                    continue;
                }
                q.heap.live_entries(&self.cells)
            };
            entries.sort(); // least urgent first
            let mut pushes = Pushes::default();
            for entry in entries {
                if moved.contains(&entry.slot) {
                    continue;
                }
                let Some(mut l) = self.cells.lock(entry.slot) else {
                    continue;
                };
                if l.st.gen != entry.gen {
                    continue;
                }
                match &l.st.phase {
                    Phase::Queued {
                        holders: Holders::One(h),
                        ..
                    } if Arc::ptr_eq(h, src) => {}
                    _ => continue,
                }
                let candidates = self.registry.candidates(&l.st.class);
                let Some((i, dst_load)) = placement::least_loaded_other(&candidates, src, weight)
                else {
                    continue;
                };
                let src_load = src.load.weighted(weight);
                if !placement::worth_moving(src_load, dst_load, self.config.rebalance_ratio) {
                    continue;
                }
                self.release(&mut l);
                l.requeue();
                Self::assign_one(&mut l, &candidates[i], &mut pushes);
                moved.insert(entry.slot);
            }
            self.flush(pushes);
        }
        let moved = moved.len();
        self.counters
            .rebalance_moves
            .fetch_add(moved as u64, Ordering::Relaxed);
        moved
    }
}

//! Fetch and claim. A fetch holds its own worker queue while it claims, so a claim is never "in
//! flight" where `unregister` could miss it. Balanced: pop the worker's own heap. Fanout: take
//! the best live head over the heaps of the classes the worker serves.
//!
//! # Passing over empty classes
//! A worker may serve many classes, most of them empty at any moment. A fanout fetch over
//! several classes reads each class's `queued` counter (`Relaxed`) and locks only the heaps of
//! classes whose counter is not zero. That is safe because the counter moves inside the task's
//! critical section: up when the task is given to the class (before its entry is pushed), down
//! when it is claimed or removed. In the counter's modification order every task's decrement
//! follows its increment, so the counter is zero only when every task counted so far has left.
//! A fetch that must see a task (the submission happened before the fetch) therefore reads a
//! value that includes it. A fetch racing a submission may read zero and miss the task, which
//! is the same as having run first. Dead entries in a skipped heap wait for the next push's
//! compaction.

use super::Dispatcher;
use crate::config::{Mode, Mutant};
use crate::error::{Error, Result};
use crate::index::Locked;
use crate::queue::{Entry, Queue, RunningRecord};
use crate::registry::{Class, Worker};
use crate::sync::{unlocked, Arc};
use crate::task::Assignment;
use crate::WorkerId;

impl Dispatcher {
    /// Assigns up to `max` of `worker`'s queued tasks to it, highest effective priority first and
    /// FIFO among equals. Each returned task is claimed: no other worker can get it any more.
    pub fn fetch(&self, worker: WorkerId, max: usize) -> Result<Vec<Assignment>> {
        let mut out = Vec::new();
        self.fetch_into(worker, max, &mut out)?;
        Ok(out)
    }

    /// [`fetch`](Self::fetch) into a caller's buffer (appended to); returns how many it added.
    pub fn fetch_into(
        &self,
        worker: WorkerId,
        max: usize,
        out: &mut Vec<Assignment>,
    ) -> Result<usize> {
        let w = self.registry.get(worker)?;
        let mut q = w.queue.lock();
        if q.closed {
            return Err(Error::UnknownWorker(worker));
        }
        let recheck = !self.mutant(Mutant::ClaimWithoutRecheck);
        if self.config.mode == Mode::Fanout {
            let (claimed, stale) = self.fetch_fanout(&w, &mut q, max, out, recheck);
            w.load.add_fetched(claimed, stale);
            return Ok(claimed);
        }
        // Compact first: a heap mostly of tombstones is cheaper to rebuild than to pop through.
        let (mut claimed, mut stale) = (0, q.heap.compact_if_sparse(w.load.queued(), &self.cells));
        while claimed < max {
            let Some(entry) = q.heap.pop() else { break };
            if !entry.is_live(&self.cells) {
                stale += 1;
                continue;
            }
            let locked = if self.mutant(Mutant::FetchUnlocksBeforeClaim) {
                unlocked(&mut q, || self.cells.lock(entry.slot))
            } else {
                self.cells.lock(entry.slot)
            };
            if self.claim_entry(locked, entry, &w, &mut q, recheck, out) {
                claimed += 1;
            } else {
                stale += 1;
            }
        }
        // Counted under the queue lock, so `unregister` (which closes it) folds them in.
        w.load.add_fetched(claimed, stale);
        Ok(claimed)
    }

    /// Fanout fetch: takes the best live head among the heaps of the classes `w` serves, while
    /// `w`'s queue lock (`q`) is held so `unregister` sees every claim. Returns (claimed, dead
    /// entries dropped).
    fn fetch_fanout(
        &self,
        w: &Arc<Worker>,
        q: &mut Queue,
        max: usize,
        out: &mut Vec<Assignment>,
        recheck: bool,
    ) -> (usize, usize) {
        let classes = w.classes.lock().clone();
        let (mut claimed, mut stale) = (0, 0);
        while claimed < max {
            let entry = if let [class] = &*classes {
                // One class: pop its live head under one lock.
                let mut h = class.heap.lock();
                let (head, dropped) = h.live_head(&self.cells);
                stale += dropped;
                match head {
                    Some(head) => {
                        h.pop();
                        head
                    }
                    None => break,
                }
            } else {
                let mut best: Option<(&Arc<Class>, Entry)> = None;
                for class in classes.iter() {
                    // An empty class is passed over without its lock: its counter counts a
                    // task before the task's entry is pushed and until it is claimed or
                    // removed, so zero means no live entry this fetch must see (module docs).
                    if class.queued.get() == 0 {
                        continue;
                    }
                    let (head, dropped) = class.heap.lock().live_head(&self.cells);
                    stale += dropped;
                    if let Some(head) = head {
                        if best.is_none_or(|(_, b)| head > b) {
                            best = Some((class, head));
                        }
                    }
                }
                let Some((class, head)) = best else { break };
                // Take it if it is still that class's head (another candidate may have).
                let mut h = class.heap.lock();
                if h.live_head(&self.cells).0 != Some(head)
                    && !self.mutant(Mutant::FanoutPopsWithoutHeadCheck)
                {
                    continue;
                }
                h.pop();
                head
            };
            if self.claim_entry(self.cells.lock(entry.slot), entry, w, q, recheck, out) {
                claimed += 1;
            } else {
                stale += 1;
            }
        }
        (claimed, stale)
    }

    /// Claims the task of a popped `entry` (its cell `locked`, if still occupied) for `w`,
    /// appends the assignment to `out` and records it in `w`'s queue `q`, whose lock the caller
    /// holds. False if the entry was dead.
    fn claim_entry(
        &self,
        locked: Option<Locked<'_>>,
        entry: Entry,
        w: &Arc<Worker>,
        q: &mut Queue,
        recheck: bool,
        out: &mut Vec<Assignment>,
    ) -> bool {
        let Some(mut l) = locked else { return false };
        let Some((attempt, gen)) = l.claim(entry.gen, w, recheck) else {
            return false;
        };
        out.push(Assignment {
            task: l.st.id,
            attempt,
            priority: l.st.priority,
        });
        drop(l);
        let record = RunningRecord {
            slot: entry.slot,
            gen,
            attempt,
        };
        q.record_running(record, w.load.running(), &self.cells);
        true
    }
}

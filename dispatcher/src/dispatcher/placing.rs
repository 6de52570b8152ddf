//! Placing and pushing: the machinery every path that queues a task shares.
//!
//! # Placing happens in two steps
//! 1. Inside the task's critical section, [`placement::decide`] picks the holder (balanced), the
//!    class (fanout) or parking, the counters are updated, and the entry to push is collected in
//!    [`Pushes`].
//! 2. After the critical section, [`Dispatcher::flush`] pushes the entries, locking each target
//!    heap once per batch. A push into a *closed* worker queue (its worker is leaving) fails;
//!    the pusher then removes that holder in the task's critical section and places the task
//!    afresh. `unregister` withdraws the worker from the registry before closing its queue, so a
//!    fresh placement never picks the same worker again and the loop ends. (Class heaps are
//!    never closed: a fanout task outlives any one candidate.)
//!
//! Keeping pushes out of the critical section is what gives one lock order everywhere (see the
//! crate docs).

use std::collections::HashMap;

use super::Dispatcher;
use crate::config::Mutant;
use crate::index::{Holders, Locked, Phase};
use crate::placement::{self, Decision};
use crate::queue::Entry;
use crate::registry::{Class, Worker};
use crate::sync::{Arc, Hasher, Ordering};
use crate::timers::Timer;

/// Entries waiting to be pushed once the critical sections that chose them have ended.
#[derive(Default)]
pub(crate) struct Pushes {
    /// Balanced: entries for one worker's heap.
    one: Vec<(Arc<Worker>, Entry)>,
    /// Fanout: entries for a class's shared heap. Consecutive tasks of one class share a batch.
    classes: Vec<(Arc<Class>, Vec<Entry>)>,
    /// Timer entries of tasks made waiting.
    pub(crate) timers: Vec<Timer>,
}

impl Pushes {
    pub(crate) fn one(&mut self, worker: &Arc<Worker>, entry: Entry) {
        self.one.push((worker.clone(), entry));
    }

    fn class(&mut self, class: &Arc<Class>, entry: Entry) {
        match self.classes.last_mut() {
            Some((c, entries)) if Arc::ptr_eq(c, class) => entries.push(entry),
            _ => self.classes.push((class.clone(), vec![entry])),
        }
    }

    fn is_empty(&self) -> bool {
        self.one.is_empty() && self.classes.is_empty() && self.timers.is_empty()
    }
}

impl Dispatcher {
    /// Places a freshly requeued task (no holders) where the policy decides: a class heap, one
    /// candidate's heap, or the parked set. Entries to push go to `pushes`.
    pub(crate) fn place(&self, l: &mut Locked<'_>, pushes: &mut Pushes) {
        loop {
            let candidates = self.registry.candidates(&l.st.class);
            let decision = placement::decide(
                self.config.mode,
                &candidates,
                &l.st.class.cursor,
                self.running_weight_milli,
            );
            match decision {
                Decision::Class => {
                    let class = l.st.class.clone();
                    pushes.class(&class, Self::entry(l));
                    l.set_holders(Holders::Class);
                    if candidates.is_empty() {
                        self.counters.parked.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                Decision::One(i) => return Self::assign_one(l, &candidates[i], pushes),
                // Parking re-checks the candidates under the parked-set lock; if one appeared
                // meanwhile, decide again.
                Decision::Park => {
                    if self.park(l) {
                        return;
                    }
                }
            }
        }
    }

    /// Makes a task with no phase wait until `until`; its timer entry goes to `pushes`.
    pub(crate) fn delay(&self, l: &mut Locked<'_>, until: u64, pushes: &mut Pushes) {
        l.wait(until);
        self.count_waiting(l, pushes);
    }

    /// Counts a task that has just become waiting and collects its timer entry.
    pub(crate) fn count_waiting(&self, l: &Locked<'_>, pushes: &mut Pushes) {
        let Phase::Waiting { until } = l.st.phase else {
            unreachable!("only a waiting task gets a timer")
        };
        self.waiting.inc();
        pushes.timers.push(Timer {
            until,
            slot: l.slot,
            gen: l.st.gen,
        });
    }

    fn entry(l: &Locked<'_>) -> Entry {
        Entry::new(l.st.key, l.st.seq, l.slot, l.st.gen)
    }

    /// Makes `worker` the one holder of a queued task with none.
    pub(crate) fn assign_one(l: &mut Locked<'_>, worker: &Arc<Worker>, pushes: &mut Pushes) {
        pushes.one(worker, Self::entry(l));
        l.set_holders(Holders::One(worker.clone()));
    }

    /// Pushes entries, one lock per target heap. Entries for closed queues are handed to
    /// `push_failed`, which may place their tasks again; repeats until nothing is left.
    pub(crate) fn flush(&self, mut pushes: Pushes) {
        while !pushes.is_empty() {
            let Pushes {
                one,
                classes,
                timers,
            } = std::mem::take(&mut pushes);
            if !timers.is_empty() {
                self.timers.push(timers);
            }
            let mut failed = Vec::new();
            for (class, entries) in &classes {
                let mut h = class.heap.lock();
                entries.iter().for_each(|e| h.push(*e));
                let compacted = h.compact_if_sparse(class.queued.get(), &self.cells);
                drop(h);
                self.counters.add_stale(compacted);
                if let Some(waker) = self.waker.get() {
                    let candidates = self.registry.candidates(class);
                    waker.class(&mut candidates.iter().map(|w| w.id));
                }
            }
            if one.len() == 1 {
                let (w, entry) = &one[0];
                self.push_to(w, std::slice::from_ref(entry), &mut failed);
            } else if !one.is_empty() {
                for (w, entries) in group_by_worker(one) {
                    self.push_to(&w, &entries, &mut failed);
                }
            }
            for (w, entry) in failed {
                self.push_failed(&w, entry, &mut pushes);
            }
        }
    }

    fn push_to(&self, w: &Arc<Worker>, entries: &[Entry], failed: &mut Vec<(Arc<Worker>, Entry)>) {
        let mut q = w.queue.lock();
        if q.closed && !self.mutant(Mutant::PushIgnoresClosed) {
            drop(q);
            failed.extend(entries.iter().map(|e| (w.clone(), *e)));
            return;
        }
        entries.iter().for_each(|e| q.heap.push(*e));
        let compacted = q.heap.compact_if_sparse(w.load.queued(), &self.cells);
        w.load.add_fetched(0, compacted);
        drop(q);
        if let Some(waker) = self.waker.get() {
            waker.worker(w.id);
        }
    }

    /// An entry could not be pushed because `worker` is leaving: drop it from the task's holders
    /// and, if it was the last, place the task afresh.
    fn push_failed(&self, worker: &Arc<Worker>, entry: Entry, pushes: &mut Pushes) {
        let Some(mut l) = self.cells.lock(entry.slot) else {
            return;
        };
        if l.st.gen != entry.gen {
            return;
        }
        if l.remove_holder(worker) {
            l.requeue();
            self.place(&mut l, pushes);
            self.counters.redistributed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Groups pushes by target worker, keeping each worker's entries in order.
fn group_by_worker(pushes: Vec<(Arc<Worker>, Entry)>) -> Vec<(Arc<Worker>, Vec<Entry>)> {
    let mut slot: HashMap<*const Worker, usize, Hasher> = HashMap::default();
    let mut groups: Vec<(Arc<Worker>, Vec<Entry>)> = Vec::new();
    for (w, entry) in pushes {
        let i = *slot.entry(Arc::as_ptr(&w)).or_insert_with(|| {
            groups.push((w.clone(), Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(entry);
    }
    groups
}

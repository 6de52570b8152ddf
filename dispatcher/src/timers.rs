//! The timer heap: when each waiting task becomes fetchable.
//!
//! A task that must not run before a time (a delayed submission, a retry after its backoff) is
//! **waiting**: it is in no worker or class heap, so no fetch can see it, and one entry here
//! names it by `(slot, generation)` and the time it is due. One min-heap for the whole
//! dispatcher, drained by [`Dispatcher::release_due`](crate::Dispatcher::release_due) — the
//! caller runs one timer task that sleeps until [`Timers::next_due`] and then calls it — so the
//! cost is O(log n) per waiting task, never a scan.
//!
//! Time is the caller's: a plain `u64` (the coordinator passes Unix milliseconds). The
//! dispatcher never reads a clock for it, so tests and the reference model step time by hand.
//!
//! Deletion is lazy, as in the task heaps: cancelling or changing a waiting task moves its
//! generation, and its old entry is dropped when it comes up (one cell lock, no other cost).
//! The heap's lock is a leaf: it is never held while a cell, queue or class lock is taken.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::index::Slot;
use crate::sync::Mutex;

/// A waiting task's entry: due at `until`, naming the placement `(slot, gen)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Timer {
    pub(crate) until: u64,
    pub(crate) slot: Slot,
    pub(crate) gen: u32,
}

/// The dispatcher's timer heap (earliest first).
#[derive(Default)]
pub(crate) struct Timers {
    heap: Mutex<BinaryHeap<Reverse<Timer>>>,
}

impl Timers {
    /// Adds entries (after the critical sections that made them waiting have ended).
    pub(crate) fn push(&self, timers: impl IntoIterator<Item = Timer>) {
        let mut h = self.heap.lock();
        h.extend(timers.into_iter().map(Reverse));
    }

    /// Removes and returns up to `max` entries due at `now` (`until <= now`), earliest first.
    pub(crate) fn pop_due(&self, now: u64, max: usize) -> Vec<Timer> {
        let mut h = self.heap.lock();
        let mut due = Vec::new();
        while due.len() < max {
            match h.peek() {
                Some(Reverse(t)) if t.until <= now => {
                    due.push(*t);
                    h.pop();
                }
                _ => break,
            }
        }
        due
    }

    /// When the earliest entry is due (it may be a dead one: a wake-up that finds nothing due
    /// drops it, and sleeps again).
    pub(crate) fn next_due(&self) -> Option<u64> {
        self.heap.lock().peek().map(|Reverse(t)| t.until)
    }

    /// Every entry, dead ones included (for the audit and the statistics).
    pub(crate) fn entries(&self) -> Vec<Timer> {
        self.heap.lock().iter().map(|Reverse(t)| *t).collect()
    }
}

#[cfg(all(test, not(switchyard_loom)))]
mod tests {
    use super::*;

    #[test]
    fn pops_due_entries_earliest_first_and_keeps_the_rest() {
        let t = Timers::default();
        let at = |until, slot| Timer {
            until,
            slot,
            gen: 0,
        };
        t.push([at(30, 1), at(10, 2), at(20, 3), at(10, 4)]);
        assert_eq!(t.next_due(), Some(10));
        assert_eq!(t.pop_due(5, 10), vec![]);
        assert_eq!(t.pop_due(20, 2), vec![at(10, 2), at(10, 4)]);
        assert_eq!(t.pop_due(20, 10), vec![at(20, 3)]);
        assert_eq!(t.next_due(), Some(30));
        assert_eq!(t.entries().len(), 1);
    }
}

//! Waiting tasks: [`Dispatcher::release_due`] queues those whose time has come, and
//! [`Dispatcher::next_due`] says when to call it next. A task starts waiting when it is
//! submitted or seeded with `not_before`, or when its attempt ends with [`Dispatcher::retry`]
//! and a time (see `timers` for the heap and why time is the caller's).
//!
//! A release locks the task's cell and checks that the entry still names its placement (the
//! generation), so an entry left by a cancel or an update is dropped, and a release racing a
//! cancel either queues the task before the cancel ends it or finds it gone: the cell's critical
//! section orders them, as it orders every other change of a task.

use super::{Dispatcher, Pushes};
use crate::config::Mutant;
use crate::index::Phase;
use crate::sync::Ordering;

/// What one [`Dispatcher::release_due`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Due {
    /// Waiting tasks queued (or parked, if they have no live candidate).
    pub released: usize,
    /// When the next waiting task is due, if any (call again then).
    pub next: Option<u64>,
}

/// Most timer entries one release handles before it returns (bounds the time it runs; the
/// caller loops while `next` is already due).
const RELEASE_BATCH: usize = 4096;

impl Dispatcher {
    /// Queues the waiting tasks due at `now` (their `not_before` ≤ `now`, in the caller's
    /// clock), at their priority, and wakes the fetches waiting for them (the [`Waker`]
    /// (crate::Waker)). Handles at most a few thousand per call: call again while the answer's
    /// `next` is not after `now`.
    pub fn release_due(&self, now: u64) -> Due {
        let due = self.timers.pop_due(now, RELEASE_BATCH);
        let mut pushes = Pushes::default();
        let mut released = 0;
        for t in due {
            let Some(mut l) = self.cells.lock(t.slot) else {
                continue; // the task ended and its slot is free
            };
            let current = l.st.gen == t.gen && matches!(l.st.phase, Phase::Waiting { .. });
            if !current && !self.mutant(Mutant::ReleaseWithoutRecheck) {
                continue; // a dead entry: cancelled, changed, or the slot has a new task
            }
            self.release(&mut l);
            l.requeue();
            self.place(&mut l, &mut pushes);
            released += 1;
        }
        self.flush(pushes);
        self.counters
            .released
            .fetch_add(released as u64, Ordering::Relaxed);
        Due {
            released,
            next: self.timers.next_due(),
        }
    }

    /// When the earliest waiting task is due, if any task waits. May name a task cancelled
    /// since (a release then finds nothing and answers the next time).
    pub fn next_due(&self) -> Option<u64> {
        self.timers.next_due()
    }
}

//! Heaps of small plain entries: one worker's queue (with its running records and `closed`
//! flag, behind the worker's own lock) in balanced mode, and one shared queue per class in
//! fanout mode.
//!
//! # Entries
//! An [`Entry`] is 24 bytes of plain integers: the static ordering key, the submission sequence,
//! and the task's `(slot, generation)` (see [`crate::index`]). The heap orders by key (higher
//! first), then by sequence (older first), so equal priorities are FIFO.
//!
//! # Aging without re-heapifying
//! With aging rate `r`, a task's effective priority at time `now` is `p + r·(now − t_enqueued)`.
//! For any fixed `now`, ordering tasks by that is the same as ordering by the static key
//! `p − r·t_enqueued` — `r·now` is common to all of them — so the key is computed once, at
//! (re)placement, and the heap never needs re-sorting. `r = 0` gives strict priority.
//!
//! # Lazy deletion
//! Claims and removals never touch a heap: they move the task's generation, which makes the
//! task's entry a *tombstone*. A tombstone is skipped when popped — one atomic load,
//! [`TaskCell::is_live`](crate::index::TaskCell::is_live) — and a heap rebuilds itself without
//! them when they outnumber its live entries. Running records are pruned the same way.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;

use crate::index::{Cells, Slot};

/// Fixed-point scale of ordering keys: priorities are resolved to 1/65536 of a unit when aging.
const KEY_SCALE: f64 = 65536.0;
/// Heaps and record lists smaller than this are never compacted (it would cost more than it
/// saves).
const COMPACT_MIN: usize = 64;

/// The static ordering key of a task with `priority`, enqueued `enqueued_secs` after the
/// dispatcher's epoch (negative for tasks that waited before it started), under `aging_rate`.
pub(crate) fn order_key(priority: i32, aging_rate: f64, enqueued_secs: f64) -> i64 {
    if aging_rate == 0.0 {
        i64::from(priority) << 16
    } else {
        // `as` saturates on overflow, so absurd ages clamp instead of wrapping.
        ((f64::from(priority) - aging_rate * enqueued_secs) * KEY_SCALE) as i64
    }
}

/// A task's entry in a heap (a worker's or a class's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    key: i64,
    seq: u64,
    pub(crate) slot: Slot,
    pub(crate) gen: u32,
}

impl Entry {
    pub(crate) fn new(key: i64, seq: u64, slot: Slot, gen: u32) -> Self {
        Self {
            key,
            seq,
            slot,
            gen,
        }
    }

    /// Whether this entry may still be claimed (one atomic load).
    pub(crate) fn is_live(&self, cells: &Cells) -> bool {
        cells.get(self.slot).is_live(self.gen)
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        // Max-heap: the higher key wins; among equal keys the lower (older) sequence wins.
        self.key
            .cmp(&other.key)
            .then_with(|| other.seq.cmp(&self.seq))
            .then_with(|| other.gen.cmp(&self.gen))
            .then_with(|| other.slot.cmp(&self.slot))
    }
}

/// An assignment this worker runs, remembered so `unregister` can hand it back. It names the
/// claim's generation, so it goes stale by itself when the task is reported, given back or
/// cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunningRecord {
    pub(crate) slot: Slot,
    pub(crate) gen: u32,
    pub(crate) attempt: u32,
}

impl RunningRecord {
    pub(crate) fn is_current(&self, cells: &Cells) -> bool {
        cells.get(self.slot).is_running_at(self.gen)
    }
}

/// A binary max-heap of entries with lazy deletion: a worker's queue (balanced) or a class's
/// shared queue (fanout).
#[derive(Default)]
pub(crate) struct Heap {
    heap: BinaryHeap<Entry>,
}

impl Heap {
    pub(crate) fn push(&mut self, entry: Entry) {
        self.heap.push(entry);
    }

    pub(crate) fn pop(&mut self) -> Option<Entry> {
        self.heap.pop()
    }

    /// Pops dead entries off the top; returns the first live one (still in the heap) and how
    /// many it dropped.
    pub(crate) fn live_head(&mut self, cells: &Cells) -> (Option<Entry>, usize) {
        let mut dropped = 0;
        while let Some(top) = self.heap.peek() {
            if top.is_live(cells) {
                return (Some(*top), dropped);
            }
            self.heap.pop();
            dropped += 1;
        }
        (None, dropped)
    }

    /// Entries in the heap, tombstones included.
    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    /// Live entries (for `rebalance`, `unregister` and `audit`).
    pub(crate) fn live_entries(&self, cells: &Cells) -> Vec<Entry> {
        self.heap
            .iter()
            .filter(|e| e.is_live(cells))
            .copied()
            .collect()
    }

    /// Rebuilds the heap without tombstones when they outnumber the `live` entries the owner's
    /// exact counter reports. Amortised O(1) per pop: a rebuild of n entries follows ≥ n/2
    /// deaths. Returns how many tombstones it dropped.
    pub(crate) fn compact_if_sparse(&mut self, live: usize, cells: &Cells) -> usize {
        let len = self.heap.len();
        if live == 0 {
            // Nothing here is live (the counter is exact at this lock: every entry pushed here
            // was counted before its push, and a task leaves the count only when it dies), so
            // drop everything at once: entries are plain integers, this is O(1).
            self.heap.clear();
            return len;
        }
        if len < COMPACT_MIN || len <= live.saturating_mul(2) {
            return 0;
        }
        self.heap.retain(|e| e.is_live(cells));
        len - self.heap.len()
    }

    fn take(&mut self) -> Vec<Entry> {
        std::mem::take(&mut self.heap).into_vec()
    }
}

/// What sits behind one worker's lock.
#[derive(Default)]
pub(crate) struct Queue {
    /// Balanced mode: the worker's own heap. (Fanout tasks live in their class's heap.)
    pub(crate) heap: Heap,
    /// Assignments of this worker; stale ones are pruned when they outnumber current ones.
    pub(crate) running: Vec<RunningRecord>,
    /// Set once by `unregister`; a push into a closed queue fails and the pusher re-places.
    pub(crate) closed: bool,
}

impl Queue {
    /// Records an assignment, pruning stale records when they outnumber the `running` ones.
    pub(crate) fn record_running(&mut self, record: RunningRecord, running: usize, cells: &Cells) {
        let len = self.running.len();
        if len >= COMPACT_MIN && len > running.saturating_mul(2) {
            self.running.retain(|r| r.is_current(cells));
        }
        self.running.push(record);
    }

    /// Marks the queue closed and takes everything it holds.
    pub(crate) fn close(&mut self) -> (Vec<Entry>, Vec<RunningRecord>) {
        self.closed = true;
        (self.heap.take(), std::mem::take(&mut self.running))
    }
}

//! One worker's queue: a binary max-heap of small plain entries, the worker's running records
//! and the `closed` flag, all behind the worker's own lock.
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
//! Claims and removals never touch other workers' heaps: they move the task's generation, which
//! makes every other copy a *tombstone*. A tombstone is skipped when popped — one atomic load,
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

/// One copy of a task in one worker's heap.
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

    /// Whether this copy may still be claimed (one atomic load).
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

/// What sits behind one worker's lock.
#[derive(Default)]
pub(crate) struct Queue {
    heap: BinaryHeap<Entry>,
    /// Assignments of this worker; stale ones are pruned when they outnumber current ones.
    pub(crate) running: Vec<RunningRecord>,
    /// Set once by `unregister`; a push into a closed queue fails and the pusher re-places.
    pub(crate) closed: bool,
    /// Dead copies popped since the last compaction check (fanout).
    dead_pops: usize,
}

impl Queue {
    pub(crate) fn push(&mut self, entry: Entry) {
        self.heap.push(entry);
    }

    pub(crate) fn pop(&mut self) -> Option<Entry> {
        self.heap.pop()
    }

    /// Notes a dead copy popped; true when enough have been popped (a quarter of the heap, at
    /// least `COMPACT_MIN`) that a compaction check is worth its O(classes) live count.
    pub(crate) fn note_dead_pop(&mut self) -> bool {
        self.dead_pops += 1;
        if self.dead_pops >= COMPACT_MIN.max(self.heap.len() / 4) {
            self.dead_pops = 0;
            return true;
        }
        false
    }

    /// Entries in the heap, tombstones included.
    pub(crate) fn heap_len(&self) -> usize {
        self.heap.len()
    }

    /// Live entries (for `rebalance` and `audit`).
    pub(crate) fn live_entries(&self, cells: &Cells) -> Vec<Entry> {
        self.heap
            .iter()
            .filter(|e| e.is_live(cells))
            .copied()
            .collect()
    }

    /// Records an assignment, pruning stale records when they outnumber the `running` ones.
    pub(crate) fn record_running(&mut self, record: RunningRecord, running: usize, cells: &Cells) {
        let len = self.running.len();
        if len >= COMPACT_MIN && len > running.saturating_mul(2) {
            self.running.retain(|r| r.is_current(cells));
        }
        self.running.push(record);
    }

    /// Rebuilds the heap without tombstones when they outnumber the `live` copies the worker's
    /// counter reports. Amortised O(1) per pop: a rebuild of n entries follows ≥ n/2 deaths.
    /// Returns how many tombstones it dropped.
    pub(crate) fn compact_if_sparse(&mut self, live: usize, cells: &Cells) -> usize {
        let len = self.heap.len();
        if live == 0 {
            // Nothing here is live (the counter is exact at this lock: every copy pushed to this
            // heap was counted before its push, and a task leaves the count only when it dies),
            // so drop everything at once: entries are plain integers, this is O(1).
            self.heap.clear();
            return len;
        }
        if len < COMPACT_MIN || len <= live.saturating_mul(2) {
            return 0;
        }
        self.heap.retain(|e| e.is_live(cells));
        len - self.heap.len()
    }

    /// Marks the queue closed and takes everything it holds.
    pub(crate) fn close(&mut self) -> (Vec<Entry>, Vec<RunningRecord>) {
        self.closed = true;
        let heap = std::mem::take(&mut self.heap).into_vec();
        (heap, std::mem::take(&mut self.running))
    }
}

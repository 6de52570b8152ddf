//! One worker's queue: a binary max-heap of small plain entries, the worker's running set and
//! the `closed` flag, all behind the worker's own lock.
//!
//! # Entries
//! An [`Entry`] is 24 bytes: the static ordering key, `seq << 24 | generation`, and a handle to
//! the task's cell. The heap orders by key (higher first), then by submission sequence (older
//! first), so equal priorities are FIFO.
//!
//! # Aging without re-heapifying
//! With aging rate `r`, a task's effective priority at time `now` is `p + r·(now − t_enqueued)`.
//! For any fixed `now`, ordering tasks by that is the same as ordering by the static key
//! `p − r·t_enqueued` — `r·now` is common to all of them — so the key is computed once, at
//! (re)placement, and the heap never needs re-sorting. `r = 0` gives strict priority.
//!
//! # Lazy deletion
//! Claims and removals never touch other workers' heaps: they change the task's cell, which makes
//! every other copy a *tombstone* (an entry whose generation or phase no longer matches the
//! cell). Tombstones are skipped when popped — a single atomic load, see
//! [`TaskCell::is_live`](crate::index::TaskCell::is_live) — and a heap rebuilds itself without
//! them when they outnumber its live entries.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};

use crate::index::TaskCell;
use crate::sync::{Arc, Hasher};
use crate::TaskId;

/// Bits of the packed `order` word that hold the generation.
pub(crate) const GEN_BITS: u32 = 24;
/// Generations wrap within this mask (see [`crate::index`] for why a wrap is harmless).
pub(crate) const GEN_MASK: u32 = (1 << GEN_BITS) - 1;
/// Fixed-point scale of ordering keys: priorities are resolved to 1/65536 of a unit when aging.
const KEY_SCALE: f64 = 65536.0;
/// Heaps smaller than this are never compacted (a rebuild would cost more than it saves).
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
pub(crate) struct Entry {
    key: i64,
    /// `seq << GEN_BITS | generation`: FIFO order first, the generation in the low bits.
    order: u64,
    pub(crate) cell: Arc<TaskCell>,
}

impl Entry {
    pub(crate) fn new(key: i64, seq: u64, gen: u32, cell: Arc<TaskCell>) -> Self {
        Self {
            key,
            order: seq << GEN_BITS | u64::from(gen & GEN_MASK),
            cell,
        }
    }

    /// The generation this copy was placed at.
    pub(crate) fn gen(&self) -> u32 {
        (self.order as u32) & GEN_MASK
    }

    /// Whether this copy may still be claimed (one atomic load; see `TaskCell::is_live`).
    pub(crate) fn is_live(&self) -> bool {
        self.cell.is_live(self.gen())
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key && self.order == other.order
    }
}
impl Eq for Entry {}
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
            .then_with(|| other.order.cmp(&self.order))
    }
}

/// A task this worker is running, remembered so `unregister` can hand it back.
pub(crate) struct RunningSlot {
    pub(crate) attempt: u32,
    pub(crate) cell: Arc<TaskCell>,
}

/// What sits behind one worker's lock.
#[derive(Default)]
pub(crate) struct Queue {
    heap: BinaryHeap<Entry>,
    /// Tasks this worker runs. Entries are removed lazily after a report, so a slot whose
    /// attempt no longer matches its cell is ignored by `unregister`.
    pub(crate) running: HashMap<TaskId, RunningSlot, Hasher>,
    /// Set once by `unregister`; a push into a closed queue fails and the pusher re-places.
    pub(crate) closed: bool,
}

impl Queue {
    pub(crate) fn push(&mut self, entry: Entry) {
        self.heap.push(entry);
    }

    pub(crate) fn pop(&mut self) -> Option<Entry> {
        self.heap.pop()
    }

    /// Entries in the heap, tombstones included.
    pub(crate) fn heap_len(&self) -> usize {
        self.heap.len()
    }

    /// Live entries as `(key, generation, cell)`, cloned out (for `rebalance`).
    pub(crate) fn live_entries(&self) -> Vec<(i64, u32, Arc<TaskCell>)> {
        self.heap
            .iter()
            .filter(|e| e.is_live())
            .map(|e| (e.key, e.gen(), e.cell.clone()))
            .collect()
    }

    /// Rebuilds the heap without tombstones when they outnumber the `live` copies the worker's
    /// counter reports. Amortised O(1) per pop: a rebuild of n entries follows ≥ n/2 deaths.
    /// Returns how many tombstones it dropped.
    pub(crate) fn compact_if_sparse(&mut self, live: usize) -> usize {
        let len = self.heap.len();
        if len < COMPACT_MIN || len <= live.saturating_mul(2) {
            return 0;
        }
        self.heap.retain(Entry::is_live);
        len - self.heap.len()
    }

    /// Marks the queue closed and takes everything it holds.
    pub(crate) fn close(&mut self) -> (Vec<Entry>, Vec<RunningSlot>) {
        self.closed = true;
        let heap = std::mem::take(&mut self.heap).into_vec();
        let running = self.running.drain().map(|(_, slot)| slot).collect();
        (heap, running)
    }
}

//! Counters and the statistics snapshot.

use crate::dispatcher::Dispatcher;
use crate::sync::{AtomicU64, CachePadded, Ordering};
use crate::WorkerId;

/// Monotonic event counters, bumped `Relaxed` (they order nothing) and batched per call on the
/// fetch path. Each sits on its own cache line: the claim counters are bumped by every fetch.
#[derive(Default)]
pub(crate) struct CounterCells {
    pub(crate) submitted: CachePadded<AtomicU64>,
    pub(crate) claimed: CachePadded<AtomicU64>,
    pub(crate) stale_skipped: CachePadded<AtomicU64>,
    pub(crate) completed: AtomicU64,
    pub(crate) given_back: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) redistributed: AtomicU64,
    pub(crate) parked: AtomicU64,
    pub(crate) rebalance_moves: AtomicU64,
}

/// Monotonic counters since the dispatcher was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Tasks submitted (not counting seeded ones).
    pub submitted: u64,
    /// Assignments handed out by fetches.
    pub claimed: u64,
    /// Dead copies (tombstones) popped and skipped by fetches or dropped by compaction.
    pub stale_skipped: u64,
    /// Assignments reported finished or failed.
    pub completed: u64,
    /// Assignments given back.
    pub given_back: u64,
    /// Tasks cancelled.
    pub cancelled: u64,
    /// Tasks moved off departing workers (queued or running).
    pub redistributed: u64,
    /// Times a task was parked.
    pub parked: u64,
    /// Tasks moved by `rebalance`.
    pub rebalance_moves: u64,
}

/// One worker's load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStats {
    /// The worker.
    pub id: WorkerId,
    /// Groups it serves, sorted.
    pub groups: Vec<String>,
    /// Its tags, sorted.
    pub tags: Vec<String>,
    /// Tasks that list it as a holder.
    pub queued: usize,
    /// Tasks it runs.
    pub running: usize,
    /// Entries in its heap, tombstones included.
    pub heap_len: usize,
}

/// A snapshot of the dispatcher. Exact when no operation is in flight; while operations run,
/// each number is individually valid but they may not add up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Live workers, sorted by id.
    pub workers: Vec<WorkerStats>,
    /// Live tasks (queued, parked or running).
    pub tasks: usize,
    /// Queued tasks, parked ones included (each counted once however many copies it has).
    pub queued: usize,
    /// Running tasks.
    pub running: usize,
    /// Parked tasks.
    pub parked: usize,
    /// Live copies over all heaps (equals `queued - parked` in balanced mode).
    pub copies: usize,
    /// Dead copies still in heaps, waiting to be popped or compacted away.
    pub tombstones: usize,
    /// Monotonic counters.
    pub counters: Counters,
}

impl Dispatcher {
    /// A snapshot of loads, totals and counters. Locks each worker's queue briefly.
    pub fn stats(&self) -> Stats {
        let mut workers: Vec<WorkerStats> = self
            .registry
            .workers()
            .iter()
            .map(|w| {
                let heap_len = w.queue.lock().heap_len();
                WorkerStats {
                    id: w.id,
                    groups: w.group_names(),
                    tags: w.tag_names(),
                    queued: w.load.queued(),
                    running: w.load.running(),
                    heap_len,
                }
            })
            .collect();
        workers.sort_by_key(|w| w.id);
        let tasks = self.index.len();
        let running: usize = workers.iter().map(|w| w.running).sum();
        let copies: usize = workers.iter().map(|w| w.queued).sum();
        let heap: usize = workers.iter().map(|w| w.heap_len).sum();
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            tasks,
            queued: tasks.saturating_sub(running),
            running,
            parked: self.parked.lock().len(),
            copies,
            tombstones: heap.saturating_sub(copies),
            counters: Counters {
                submitted: get(&c.submitted),
                claimed: get(&c.claimed),
                stale_skipped: get(&c.stale_skipped),
                completed: get(&c.completed),
                given_back: get(&c.given_back),
                cancelled: get(&c.cancelled),
                redistributed: get(&c.redistributed),
                parked: get(&c.parked),
                rebalance_moves: get(&c.rebalance_moves),
            },
            workers,
        }
    }
}

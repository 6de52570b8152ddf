//! Counters and the statistics snapshot.

use crate::config::Mode;
use crate::dispatcher::Dispatcher;
use crate::registry::Load;
use crate::sync::{AtomicU64, CachePadded, Ordering};
use crate::WorkerId;

/// Monotonic event counters, bumped `Relaxed` (they order nothing). Fetches count per worker
/// (see `Load`), and a departing worker's counts are folded in here.
#[derive(Default)]
pub(crate) struct CounterCells {
    pub(crate) submitted: CachePadded<AtomicU64>,
    claimed: AtomicU64,
    stale_skipped: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) given_back: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) released: AtomicU64,
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
    /// Dead entries (tombstones) popped and skipped by fetches or dropped by compaction.
    pub stale_skipped: u64,
    /// Assignments reported finished or failed.
    pub completed: u64,
    /// Assignments given back.
    pub given_back: u64,
    /// Assignments ended by `retry` (the task queued again, at once or after a wait).
    pub retried: u64,
    /// Waiting tasks released into the queues.
    pub released: u64,
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
    /// Tasks it holds (fanout: the queued tasks of the classes it serves).
    pub queued: usize,
    /// Tasks it runs.
    pub running: usize,
    /// Entries in its own heap, tombstones included (balanced; fanout tasks are in class heaps).
    pub heap_len: usize,
}

/// A snapshot of the dispatcher. Exact when no operation is in flight; while operations run,
/// each number is individually valid but they may not add up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Live workers, sorted by id.
    pub workers: Vec<WorkerStats>,
    /// Live tasks: `queued + parked + running + waiting` (the four are disjoint).
    pub tasks: usize,
    /// Queued tasks with a holder (each counted once however many copies it has); parked
    /// tasks are not counted here.
    pub queued: usize,
    /// Running tasks.
    pub running: usize,
    /// Parked tasks: queued with no live candidate.
    pub parked: usize,
    /// Waiting tasks: not fetchable before their time (see [`Dispatcher::release_due`]).
    pub waiting: usize,
    /// Sum of the workers' queued counts: `queued` in balanced mode; in fanout each
    /// task counts once per candidate that could fetch it.
    pub copies: usize,
    /// Dead entries still in heaps (worker and class heaps), waiting to be popped or compacted.
    pub tombstones: usize,
    /// Monotonic counters.
    pub counters: Counters,
}

impl CounterCells {
    /// Counts dead entries dropped from a class heap.
    pub(crate) fn add_stale(&self, n: usize) {
        if n > 0 {
            self.stale_skipped.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Adds a departing worker's fetch counts to the totals.
    pub(crate) fn fold(&self, load: &Load) {
        let take = |a: &AtomicU64| a.swap(0, Ordering::Relaxed);
        self.claimed
            .fetch_add(take(&load.claimed), Ordering::Relaxed);
        self.stale_skipped
            .fetch_add(take(&load.stale), Ordering::Relaxed);
    }
}

impl Dispatcher {
    /// A snapshot of loads, totals and counters. Locks each worker's queue briefly.
    pub fn stats(&self) -> Stats {
        let live = self.registry.workers();
        let mut workers: Vec<WorkerStats> = live
            .iter()
            .map(|w| {
                let heap_len = w.queue.lock().heap.len();
                WorkerStats {
                    id: w.id,
                    groups: w.group_names(),
                    tags: w.tag_names(),
                    queued: self.queued_of(w),
                    running: w.load.running(),
                    heap_len,
                }
            })
            .collect();
        workers.sort_by_key(|w| w.id);
        let tasks = self.index.len();
        let running: usize = workers.iter().map(|w| w.running).sum();
        let copies: usize = workers.iter().map(|w| w.queued).sum();
        let mut heap: usize = workers.iter().map(|w| w.heap_len).sum();
        let (mut live_entries, mut parked) = (copies, self.parked.lock().len());
        if self.config.mode == Mode::Fanout {
            // Tasks wait once, in their class's heap; a class without candidates is parked.
            live_entries = 0;
            for class in self.registry.classes() {
                let queued = class.queued.get();
                heap += class.heap.lock().len();
                live_entries += queued;
                if self.registry.candidates(&class).is_empty() {
                    parked += queued;
                }
            }
        }
        let waiting = self.waiting.get();
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let per_worker =
            |f: fn(&Load) -> &AtomicU64| -> u64 { live.iter().map(|w| get(f(&w.load))).sum() };
        Stats {
            tasks,
            queued: tasks
                .saturating_sub(running)
                .saturating_sub(parked)
                .saturating_sub(waiting),
            running,
            parked,
            waiting,
            copies,
            tombstones: heap.saturating_sub(live_entries),
            counters: Counters {
                submitted: get(&c.submitted),
                claimed: get(&c.claimed) + per_worker(|l| &l.claimed),
                stale_skipped: get(&c.stale_skipped) + per_worker(|l| &l.stale),
                completed: get(&c.completed),
                given_back: get(&c.given_back),
                retried: get(&c.retried),
                released: get(&c.released),
                cancelled: get(&c.cancelled),
                redistributed: get(&c.redistributed),
                parked: get(&c.parked),
                rebalance_moves: get(&c.rebalance_moves),
            },
            workers,
        }
    }
}

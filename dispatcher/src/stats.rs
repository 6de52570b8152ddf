//! Counters and the statistics snapshot.

use std::collections::{HashMap, HashSet};

use crate::config::Mode;
use crate::dispatcher::Dispatcher;
use crate::index::{Holders, Phase, Slot};
use crate::registry::{Class, Load, Worker};
use crate::sync::{Arc, AtomicU64, CachePadded, Ordering};
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
    /// Live tasks: `queued + parked + running` (the three are disjoint).
    pub tasks: usize,
    /// Queued tasks with a holder (each counted once however many copies it has); parked
    /// tasks are not counted here.
    pub queued: usize,
    /// Running tasks.
    pub running: usize,
    /// Parked tasks: queued with no live candidate.
    pub parked: usize,
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
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let per_worker =
            |f: fn(&Load) -> &AtomicU64| -> u64 { live.iter().map(|w| get(f(&w.load))).sum() };
        Stats {
            tasks,
            queued: tasks.saturating_sub(running).saturating_sub(parked),
            running,
            parked,
            copies,
            tombstones: heap.saturating_sub(live_entries),
            counters: Counters {
                submitted: get(&c.submitted),
                claimed: get(&c.claimed) + per_worker(|l| &l.claimed),
                stale_skipped: get(&c.stale_skipped) + per_worker(|l| &l.stale),
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

    /// Checks the invariants of the crate docs against the whole state and describes the first
    /// violation found. Meaningful only at rest (no operation in flight); O(tasks + heap entries).
    /// The tests, the stress test and the loom models call it after every scenario.
    ///
    /// Checked: every live task is queued on ≥ 1 registered holder whose heap has a live copy of
    /// it, or parked (and in the parked set, and only then), or running on a registered worker
    /// whose running records hold that assignment; every registered worker's `queued` and
    /// `running` counters equal those recomputed from the tasks; no registered worker's queue is
    /// closed.
    pub fn audit(&self) -> std::result::Result<(), String> {
        let workers = self.registry.workers();
        let live: HashMap<WorkerId, &Arc<Worker>> = workers.iter().map(|w| (w.id, w)).collect();
        // What each worker's queue holds: live copies and running records, as (slot, generation).
        let mut copies: HashMap<WorkerId, HashSet<(Slot, u32)>> = HashMap::new();
        let mut records: HashMap<WorkerId, HashSet<(Slot, u32, u32)>> = HashMap::new();
        for w in &workers {
            let q = w.queue.lock();
            if q.closed {
                return Err(format!("registered worker {} has a closed queue", w.id));
            }
            let live_copies = q.heap.live_entries(&self.cells);
            copies.insert(w.id, live_copies.iter().map(|e| (e.slot, e.gen)).collect());
            let recs = q.running.iter().map(|r| (r.slot, r.gen, r.attempt));
            records.insert(w.id, recs.collect());
        }
        let is_live = |w: &Arc<Worker>| live.get(&w.id).is_some_and(|l| Arc::ptr_eq(l, w));
        let parked_ids: HashSet<crate::TaskId> = self.parked.lock().keys().copied().collect();
        let mut load: HashMap<WorkerId, (usize, usize)> =
            workers.iter().map(|w| (w.id, (0, 0))).collect();
        let mut parked = 0;
        // Fanout: each class's live heap entries, and how many queued tasks name the class.
        let classes = self.registry.classes();
        let class_copies: HashMap<*const Class, HashSet<(Slot, u32)>> = classes
            .iter()
            .map(|c| {
                let live = c.heap.lock().live_entries(&self.cells);
                (
                    Arc::as_ptr(c),
                    live.iter().map(|e| (e.slot, e.gen)).collect(),
                )
            })
            .collect();
        let mut class_load: HashMap<*const Class, usize> = HashMap::new();
        for (id, slot) in self.index.entries() {
            let Some(l) = self.lock_slot(id, slot) else {
                return Err(format!(
                    "task {id} is indexed at slot {slot}, which does not hold it"
                ));
            };
            match &l.st.phase {
                Phase::Queued {
                    holders,
                    parked: true,
                } => {
                    if !holders.is_empty() {
                        return Err(format!("task {id} is parked with holders"));
                    }
                    if !parked_ids.contains(&id) {
                        return Err(format!("task {id} is parked but not in the parked set"));
                    }
                    parked += 1;
                }
                Phase::Queued {
                    holders,
                    parked: false,
                } => match holders {
                    Holders::None => {
                        return Err(format!("task {id} is queued with no holder and not parked"));
                    }
                    Holders::One(h) => {
                        if !is_live(h) {
                            return Err(format!("task {id} is held by departed worker {}", h.id));
                        }
                        if !copies[&h.id].contains(&(slot, l.st.gen)) {
                            return Err(format!("task {id}: holder {} has no live copy", h.id));
                        }
                        load.get_mut(&h.id).expect("live").0 += 1;
                    }
                    Holders::Class => {
                        let class = Arc::as_ptr(&l.st.class);
                        if !class_copies[&class].contains(&(slot, l.st.gen)) {
                            return Err(format!("task {id} is missing from its class's heap"));
                        }
                        *class_load.entry(class).or_default() += 1;
                    }
                },
                Phase::Running { worker } => {
                    if !is_live(worker) {
                        return Err(format!(
                            "task {id} is running on departed worker {}",
                            worker.id
                        ));
                    }
                    if !records[&worker.id].contains(&(slot, l.st.gen, l.st.attempt)) {
                        return Err(format!(
                            "task {id} runs on {} as attempt {} but no running record says so",
                            worker.id, l.st.attempt
                        ));
                    }
                    load.get_mut(&worker.id).expect("live").1 += 1;
                }
                Phase::Gone => return Err(format!("task {id} is gone but still indexed")),
            }
        }
        if parked != parked_ids.len() {
            return Err(format!(
                "parked set has {} tasks, {parked} are marked parked",
                parked_ids.len()
            ));
        }
        for c in &classes {
            let expected = class_load.get(&Arc::as_ptr(c)).copied().unwrap_or(0);
            if c.queued.get() != expected {
                return Err(format!(
                    "class in group {}: counter says {} queued, tasks say {expected}",
                    c.group_name,
                    c.queued.get()
                ));
            }
        }
        for w in &workers {
            if self.config.mode == Mode::Fanout {
                let served = w.classes.lock().clone();
                let want = classes.iter().filter(|c| w.serves(c)).count();
                if served.len() != want {
                    return Err(format!(
                        "worker {} lists {} classes but serves {want}",
                        w.id,
                        served.len()
                    ));
                }
                let expected: usize = served
                    .iter()
                    .map(|c| class_load.get(&Arc::as_ptr(c)).copied().unwrap_or(0))
                    .sum();
                load.get_mut(&w.id).expect("live").0 = expected;
            }
            let counted = (self.queued_of(w), w.load.running());
            if counted != load[&w.id] {
                return Err(format!(
                    "worker {}: counters (queued, running) = {counted:?}, tasks say {:?}",
                    w.id, load[&w.id]
                ));
            }
        }
        Ok(())
    }
}

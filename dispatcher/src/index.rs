//! Task cells, the slab that holds them, and the reverse index from task id to slot.
//!
//! A [`TaskCell`] sits in a slab slot for the dispatcher's lifetime; a task occupies a slot from
//! submission until it ends, then the slot is reused. Heap entries and running records name a
//! task by `(slot, generation)` — plain integers, no reference counts — so popping a dead entry
//! reads one atomic and writes nothing. (An earlier cut kept an `Arc` per entry: each dead entry
//! then cost an atomic decrement on the task's cache line, which bounced between the fetching
//! cores.)
//!
//! The cell's mutex is the task's **critical section**: claims, removals, moves, holder changes
//! and the load counters of the task's holders change only inside it. Its `status` word mirrors
//! the generation and phase so a fetch can discard a tombstone without taking the lock.
//!
//! # Generations
//! The generation grows at every fresh placement (submit, re-placement after a departure,
//! give-back, priority or tag change, rebalance move), at every claim, and when the task ends;
//! it carries on across the slot's occupants. So `(slot, generation)` names one placement of one
//! task, and every entry or running record made earlier is dead the instant the generation
//! moves. Generations are 32 bits; should one wrap while an ancient entry survives, the claim
//! also checks that the claiming worker is a current holder, so the worst case is one fetch
//! taking a task it holds anyway.
//!
//! # Why `status` may be read `Relaxed`
//! The status is stored (under the cell lock) *before* any entry at that generation is pushed,
//! and a fetcher reads it only after popping that entry under the heap lock, so the push's unlock
//! orders the store before the read. Every later store moves the status away from
//! `(gen, Queued)` for good (generations only grow), so a read that says "not live" is final and
//! a read that says "live" is re-checked under the cell lock. No stronger ordering adds anything.
//!
//! # The slab
//! Pages grow geometrically (1024, 2048, … cells) and are created once, on first use, through a
//! `OnceLock`, and never freed, so a slot number stays valid without any lock or reference count.
//! Free slots wait in striped free lists (striped by task id, so submitters rarely share one).

use std::ops::{Deref, DerefMut};

use crate::registry::{Class, Worker};
use crate::sync::{Arc, AtomicU64, AtomicUsize, Map, Mutex, MutexGuard, OnceLock, Ordering};
use crate::TaskId;

/// A slab slot.
pub(crate) type Slot = u32;

const QUEUED: u64 = 0;
const RUNNING: u64 = 1;
const GONE: u64 = 2;
const WAITING: u64 = 3;

fn pack(gen: u32, phase: u64) -> u64 {
    u64::from(gen) << 2 | phase
}

/// Where a live task is.
pub(crate) enum Phase {
    /// Waiting in the heaps of `holders` (fanout: every live candidate; balanced: one).
    /// No holders means parked, and then `parked` is set and the task is in the parked set.
    Queued { holders: Holders, parked: bool },
    /// Assigned to `worker` as attempt `TaskState::attempt`.
    Running { worker: Arc<Worker> },
    /// Not fetchable before `until` (the caller's clock): in no heap, named by one entry of the
    /// timer heap at the current generation (see `timers`).
    Waiting { until: u64 },
    /// Finished, failed or cancelled: every entry of the task is a tombstone.
    Gone,
}

/// The holders of a queued task.
pub(crate) enum Holders {
    /// None (parked in balanced mode, or not yet placed).
    None,
    /// Balanced: the one worker whose heap holds the task.
    One(Arc<Worker>),
    /// Fanout: the task waits once, in its class's shared heap, and every live candidate of the
    /// class holds it (reads that heap).
    Class,
}

impl Holders {
    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, Holders::None)
    }

    /// Whether `worker` holds the task. A fanout fetch reads only classes its worker serves.
    pub(crate) fn contains(&self, worker: &Worker) -> bool {
        match self {
            Holders::None => false,
            Holders::One(w) => std::ptr::eq(Arc::as_ptr(w), worker),
            Holders::Class => true,
        }
    }
}

/// Everything the dispatcher knows of a task, guarded by its cell's mutex.
pub(crate) struct TaskState {
    pub(crate) id: TaskId,
    pub(crate) gen: u32,
    pub(crate) phase: Phase,
    /// Assignments so far; the current assignment's attempt when running.
    pub(crate) attempt: u32,
    pub(crate) priority: i32,
    pub(crate) key: i64,
    pub(crate) seq: u64,
    pub(crate) class: Arc<Class>,
    /// Seconds after the dispatcher's epoch at which the task started waiting (for aging).
    pub(crate) enqueued: f64,
}

/// One slab slot: the status word and the guarded state (`None` while the slot is free).
pub(crate) struct TaskCell {
    status: AtomicU64,
    state: Mutex<Option<TaskState>>,
}

impl TaskCell {
    fn vacant() -> Self {
        Self {
            status: AtomicU64::new(pack(0, GONE)),
            state: Mutex::new(None),
        }
    }

    /// Whether an entry placed at `gen` may still be claimed. One load, no lock (see module docs).
    pub(crate) fn is_live(&self, gen: u32) -> bool {
        self.status.load(Ordering::Relaxed) == pack(gen, QUEUED)
    }

    /// Whether the assignment made at `gen` still stands (one load; for running records).
    pub(crate) fn is_running_at(&self, gen: u32) -> bool {
        self.status.load(Ordering::Relaxed) == pack(gen, RUNNING)
    }
}

/// The guarded state of a locked, occupied cell.
pub(crate) struct StateGuard<'a>(MutexGuard<'a, Option<TaskState>>);

impl Deref for StateGuard<'_> {
    type Target = TaskState;
    fn deref(&self) -> &TaskState {
        self.0.as_ref().expect("a locked cell is occupied")
    }
}

impl DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut TaskState {
        self.0.as_mut().expect("a locked cell is occupied")
    }
}

/// A locked, occupied cell. Every change of generation or phase goes through its methods, which
/// keep the lock-free `status` word in step with the guarded state.
pub(crate) struct Locked<'a> {
    cell: &'a TaskCell,
    pub(crate) slot: Slot,
    pub(crate) st: StateGuard<'a>,
}

impl Locked<'_> {
    fn publish(&self) {
        let code = match self.st.phase {
            Phase::Queued { .. } => QUEUED,
            Phase::Running { .. } => RUNNING,
            Phase::Waiting { .. } => WAITING,
            Phase::Gone => GONE,
        };
        // Relaxed: see "Why `status` may be read Relaxed" in the module docs.
        self.cell
            .status
            .store(pack(self.st.gen, code), Ordering::Relaxed);
    }

    /// Starts a fresh placement: a new generation, queued with no holders and not parked.
    /// The caller has already released the old holders and left the parked set.
    pub(crate) fn requeue(&mut self) {
        self.st.gen = self.st.gen.wrapping_add(1);
        self.st.phase = Phase::Queued {
            holders: Holders::None,
            parked: false,
        };
        self.publish();
    }

    /// Makes a task with no phase (just released, or new) wait until `until`: a new generation,
    /// which the caller's timer entry names.
    pub(crate) fn wait(&mut self, until: u64) {
        self.st.gen = self.st.gen.wrapping_add(1);
        self.st.phase = Phase::Waiting { until };
        self.publish();
    }

    /// Claims the task for `worker` if the entry placed at `gen` is still current and `worker`
    /// holds it. Every holder's queued counter drops; returns `(attempt, generation)` of the
    /// assignment. `recheck: false` is the `ClaimWithoutRecheck` mutant, for loom models only.
    pub(crate) fn claim(
        &mut self,
        gen: u32,
        worker: &Arc<Worker>,
        recheck: bool,
    ) -> Option<(u32, u32)> {
        if recheck {
            if self.st.gen != gen {
                return None;
            }
            match &self.st.phase {
                Phase::Queued { holders, .. } if holders.contains(worker) => {}
                _ => return None,
            }
        }
        if let Phase::Queued { holders, .. } = &self.st.phase {
            self.count(holders, false);
        }
        worker.load.inc_running();
        self.st.attempt += 1;
        self.st.gen = self.st.gen.wrapping_add(1);
        self.st.phase = Phase::Running {
            worker: worker.clone(),
        };
        self.publish();
        Some((self.st.attempt, self.st.gen))
    }

    /// Takes the task out of its phase, fixing the counters it contributed to, and returns the
    /// phase it left. The caller decides what comes next (`requeue` or `Cells::free`).
    /// A parked task must also be removed from the parked set by the caller.
    pub(crate) fn release(&mut self) -> Phase {
        let phase = std::mem::replace(&mut self.st.phase, Phase::Gone);
        match &phase {
            Phase::Queued { holders, .. } => self.count(holders, false),
            Phase::Running { worker } => worker.load.dec_running(),
            Phase::Waiting { .. } | Phase::Gone => {}
        }
        self.st.gen = self.st.gen.wrapping_add(1);
        self.publish();
        phase
    }

    /// Counts `holders` in (`up`) or out of the queued counters: balanced, the holder's own
    /// `queued` counter (exact per worker, which balanced placement reads); fanout, the class's
    /// counter (a worker's queued count is the sum over the classes it serves).
    fn count(&self, holders: &Holders, up: bool) {
        let queued = match holders {
            Holders::None => return,
            Holders::One(w) => &w.load.queued,
            Holders::Class => &self.st.class.queued,
        };
        if up {
            queued.inc()
        } else {
            queued.dec()
        }
    }

    /// Gives a queued task with no holders its holders, and counts them.
    pub(crate) fn set_holders(&mut self, new: Holders) {
        self.count(&new, true);
        let Phase::Queued { holders, .. } = &mut self.st.phase else {
            unreachable!("holders are assigned to queued tasks only")
        };
        debug_assert!(holders.is_empty());
        *holders = new;
    }

    /// Removes `worker` from a balanced queued task's holders. Returns whether it was the
    /// holder (the task then has none, and the caller places it afresh).
    ///
    /// Balanced only: a fanout task is held by its class, not by workers.
    pub(crate) fn remove_holder(&mut self, worker: &Worker) -> bool {
        let Phase::Queued { holders, .. } = &mut self.st.phase else {
            return false;
        };
        if !matches!(holders, Holders::One(w) if std::ptr::eq(Arc::as_ptr(w), worker)) {
            return false;
        }
        *holders = Holders::None;
        worker.load.queued.dec();
        true
    }

    /// Marks a task that never entered any phase's counters (a rolled-back submission) gone.
    pub(crate) fn abandon(&mut self) {
        self.st.phase = Phase::Gone;
        self.st.gen = self.st.gen.wrapping_add(1);
        self.publish();
    }

    pub(crate) fn is_running_on(&self, worker: &Worker, attempt: u32) -> bool {
        matches!(&self.st.phase, Phase::Running { worker: w } if std::ptr::eq(Arc::as_ptr(w), worker))
            && self.st.attempt == attempt
    }
}

/// The slab of task cells.
pub(crate) struct Cells {
    pages: [OnceLock<Box<[TaskCell]>>; PAGES],
    /// Slots never used yet start here.
    next: AtomicUsize,
    free: Box<[Mutex<Vec<Slot>>]>,
}

/// The first page holds 2^FIRST_PAGE_BITS cells (4 under loom, so models stay small).
const FIRST_PAGE_BITS: u32 = if cfg!(switchyard_loom) { 2 } else { 10 };
/// Enough pages for every `u32` slot: pages 0..k hold 2^FIRST_PAGE_BITS·(2^k − 1) slots, so
/// 2^32 slots need k = 32 − FIRST_PAGE_BITS + 1 (the last page only partly used).
const PAGES: usize = 32 - FIRST_PAGE_BITS as usize + 1;

/// The page and offset of `slot`: page k holds slots [1024·(2^k − 1), 1024·(2^(k+1) − 1)).
fn locate(slot: Slot) -> (usize, usize) {
    let v = (u64::from(slot) >> FIRST_PAGE_BITS) + 1;
    let page = 63 - v.leading_zeros() as usize;
    let start = ((1u64 << page) - 1) << FIRST_PAGE_BITS;
    (page, (u64::from(slot) - start) as usize)
}

impl Cells {
    pub(crate) fn new(stripes: usize) -> Self {
        Self {
            pages: std::array::from_fn(|_| OnceLock::new()),
            next: AtomicUsize::new(0),
            free: (0..stripes.max(1))
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
        }
    }

    /// The cell in `slot` (which must have been allocated).
    pub(crate) fn get(&self, slot: Slot) -> &TaskCell {
        let (page, offset) = locate(slot);
        &self.pages[page].get().expect("slot was allocated")[offset]
    }

    /// Takes a free slot for a task `id`, locks it and fills it with `make(gen)`, where `gen` is
    /// the slot's next generation.
    pub(crate) fn occupy(&self, id: TaskId, make: impl FnOnce(u32) -> TaskState) -> Locked<'_> {
        let stripe = (id.0 as usize) % self.free.len();
        let reused = self.free[stripe].lock().pop();
        let slot = match reused {
            Some(slot) => slot,
            None => {
                // Relaxed: a ticket; the page it lands in is published by its `OnceLock`.
                let slot = self.next.fetch_add(1, Ordering::Relaxed);
                let slot = Slot::try_from(slot).expect("more than 2^32 task slots");
                let (page, _) = locate(slot);
                self.pages[page].get_or_init(|| {
                    (0..1usize << (FIRST_PAGE_BITS as usize + page))
                        .map(|_| TaskCell::vacant())
                        .collect()
                });
                slot
            }
        };
        let cell = self.get(slot);
        let mut guard = cell.state.lock();
        debug_assert!(guard.is_none(), "a free slot is vacant");
        let gen = ((cell.status.load(Ordering::Relaxed) >> 2) as u32).wrapping_add(1);
        *guard = Some(make(gen));
        let locked = Locked {
            cell,
            slot,
            st: StateGuard(guard),
        };
        locked.publish();
        locked
    }

    /// Locks `slot` if it holds a live task; `None` if it is vacant or its task has ended.
    pub(crate) fn lock(&self, slot: Slot) -> Option<Locked<'_>> {
        let cell = self.get(slot);
        let guard = cell.state.lock();
        match &*guard {
            Some(st) if !matches!(st.phase, Phase::Gone) => Some(Locked {
                cell,
                slot,
                st: StateGuard(guard),
            }),
            _ => None,
        }
    }

    /// Ends the task in a locked cell (already released): the slot is vacated and reused later.
    pub(crate) fn free(&self, mut l: Locked<'_>) {
        debug_assert!(matches!(l.st.phase, Phase::Gone));
        let id = l.st.id;
        *l.st.0 = None;
        let slot = l.slot;
        drop(l);
        self.free[(id.0 as usize) % self.free.len()]
            .lock()
            .push(slot);
    }
}

/// The reverse index: task id → slot. Concurrent (sharded); it runs inside a cell's critical
/// section when a task starts or ends (lock order: cell, then index shard).
pub(crate) struct Index {
    map: Map<TaskId, Slot>,
}

impl Index {
    pub(crate) fn new(shards: usize) -> Self {
        Self {
            map: Map::with_shards(shards),
        }
    }

    pub(crate) fn get(&self, id: TaskId) -> Option<Slot> {
        self.map.get(&id)
    }

    pub(crate) fn contains(&self, id: TaskId) -> bool {
        self.map.contains(&id)
    }

    /// Maps `id` to `slot`; fails if the id is taken.
    pub(crate) fn insert(&self, id: TaskId, slot: Slot) -> bool {
        self.map.insert_new(id, slot).is_ok()
    }

    /// Removes `id` if it still maps to `slot`.
    pub(crate) fn remove(&self, id: TaskId, slot: Slot) {
        self.map.remove_if(&id, |s| *s == slot);
    }

    pub(crate) fn entries(&self) -> Vec<(TaskId, Slot)> {
        self.map.entries()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(all(test, not(switchyard_loom)))]
mod tests {
    use super::{locate, pack, Cells, Phase, QUEUED, RUNNING, WAITING};
    use crate::{Config, Dispatcher, Strategy, TaskId, TaskSpec, WorkerId};

    #[test]
    fn slots_map_to_pages_that_double() {
        assert_eq!(locate(0), (0, 0));
        assert_eq!(locate(1023), (0, 1023));
        assert_eq!(locate(1024), (1, 0));
        assert_eq!(locate(3071), (1, 2047));
        assert_eq!(locate(3072), (2, 0));
        // The last slots fall in the last page.
        assert_eq!(locate(u32::MAX), (22, 1023));
        assert_eq!(super::PAGES, 23);
        // Every slot of the first pages has a place of its own.
        let mut seen = std::collections::HashSet::new();
        for slot in 0..8000 {
            let (page, offset) = locate(slot);
            assert!(offset < 1024 << page, "slot {slot}");
            assert!(seen.insert((page, offset)), "slot {slot} shares a place");
        }
    }

    #[test]
    fn a_freed_slot_is_reused_with_the_next_generation() {
        let cells = Cells::new(1);
        let d = Dispatcher::new(Config::default()).unwrap();
        d.submit(TaskSpec::new(1, "g")).unwrap(); // a class for the states below
        let class = d
            .get(TaskId(1))
            .map(|_| d.registry.classes()[0].clone())
            .unwrap();
        let make = |id: u64| {
            let class = class.clone();
            move |gen| super::TaskState {
                id: TaskId(id),
                gen,
                phase: Phase::Queued {
                    holders: super::Holders::None,
                    parked: false,
                },
                attempt: 0,
                priority: 0,
                key: 0,
                seq: 0,
                class,
                enqueued: 0.0,
            }
        };
        let mut gens = Vec::new();
        for round in 0..40 {
            let mut l = cells.occupy(TaskId(round), make(round));
            assert_eq!(l.slot, 0, "the freed slot is taken again");
            gens.push(l.st.gen);
            assert!(cells.get(0).is_live(l.st.gen));
            l.release();
            cells.free(l);
            assert!(cells.lock(0).is_none(), "a vacant slot cannot be locked");
        }
        // Each use gets a generation no earlier use of the slot had (release adds one more).
        let distinct: std::collections::HashSet<u32> = gens.iter().copied().collect();
        assert_eq!(distinct.len(), gens.len(), "{gens:?}");
        assert!(gens.windows(2).all(|w| w[1] == w[0] + 2), "{gens:?}");
        assert_ne!(pack(7, QUEUED), pack(7, RUNNING));
        assert_ne!(pack(7, QUEUED), pack(7, WAITING));
    }

    #[test]
    fn a_slot_reused_many_times_never_revives_an_old_entry() {
        // One stripe, so every task takes the same freed slot. Each cancelled task leaves a
        // high-priority tombstone in W1's heap; none may come back as the last task's entry.
        let config = Config {
            shards: 1,
            ..Config::balanced(Strategy::RoundRobin)
        };
        let d = Dispatcher::new(config).unwrap();
        d.register(WorkerId(1), &["g"], &[] as &[&str]).unwrap();
        d.submit(TaskSpec::new(1000, "g").priority(5)).unwrap();
        for id in 0..40 {
            d.submit(TaskSpec::new(id, "g").priority(9)).unwrap();
            d.cancel(TaskId(id)).unwrap();
        }
        d.submit(TaskSpec::new(2000, "g").priority(1)).unwrap();
        let got: Vec<u64> = d
            .fetch(WorkerId(1), 10)
            .unwrap()
            .iter()
            .map(|a| a.task.0)
            .collect();
        assert_eq!(got, [1000, 2000], "priority order, each task once");
        d.audit().unwrap();
    }

    #[test]
    fn running_records_of_ended_assignments_are_pruned() {
        let d = Dispatcher::new(Config::balanced(Strategy::RoundRobin)).unwrap();
        let w = WorkerId(1);
        d.register(w, &["g"], &[] as &[&str]).unwrap();
        for id in 0..500 {
            d.submit(TaskSpec::new(id, "g")).unwrap();
            let a = d.fetch(w, 1).unwrap()[0];
            d.complete(w, a.task, a.attempt).unwrap();
        }
        let records = d.registry.get(w).unwrap().queue.lock().running.len();
        assert!(
            records <= 64 + 1,
            "{records} records kept for 0 running tasks"
        );
    }
}

//! Task cells and the reverse index from task id to cell.
//!
//! A [`TaskCell`] is shared by the index and by every heap entry that holds a copy of the task.
//! Its mutex is the task's **critical section**: claims, removals, moves, holder changes and the
//! load counters of the task's holders change only inside it. Its `status` word mirrors the
//! generation and phase so that a fetch can discard a tombstone with one atomic load, without
//! taking the lock.
//!
//! # Generations
//! Every fresh placement of a task (submit, re-placement after a departure, give-back, priority
//! or tag change, a rebalance move) bumps its generation, so every copy made earlier becomes a
//! tombstone at that instant. Backfilling a new fanout holder adds a copy at the *current*
//! generation. Generations are 24 bits and wrap; a wrapped generation could make an ancient copy
//! look current, so a claim also checks that the claiming worker is one of the task's holders.
//! If it is, claiming through the old copy is the same as claiming through its current one.
//!
//! # Why `status` may be read `Relaxed`
//! The status is stored (under the cell lock) *before* any copy at that generation is pushed, and
//! a fetcher reads it only after popping that copy under the heap lock, so the push's unlock
//! orders the store before the read. Every later store moves the status away from
//! `(gen, Queued)` for good (generations only grow), so a read that says "not live" is final and
//! a read that says "live" is re-checked under the cell lock. No stronger ordering adds anything.

use crate::queue::GEN_MASK;
use crate::registry::{Class, Worker};
use crate::sync::{Arc, AtomicU64, Map, Mutex, MutexGuard, Ordering};
use crate::TaskId;

const QUEUED: u64 = 0;
const RUNNING: u64 = 1;
const GONE: u64 = 2;

fn pack(gen: u32, phase: u64) -> u64 {
    u64::from(gen & GEN_MASK) << 2 | phase
}

/// Where a live task is.
pub(crate) enum Phase {
    /// Waiting in the heaps of `holders` (fanout: every live candidate; balanced: one).
    /// No holders means parked, and then `parked` is set and the task is in the parked set.
    Queued {
        holders: Vec<Arc<Worker>>,
        parked: bool,
    },
    /// Assigned to `worker` as attempt `TaskState::attempt`.
    Running { worker: Arc<Worker> },
    /// Finished, failed or cancelled: removed from the index, every copy is a tombstone.
    Gone,
}

/// Everything the dispatcher knows of a task, guarded by the cell's mutex.
pub(crate) struct TaskState {
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

/// A task's shared cell.
pub(crate) struct TaskCell {
    pub(crate) id: TaskId,
    status: AtomicU64,
    state: Mutex<TaskState>,
}

impl TaskCell {
    pub(crate) fn new(id: TaskId, state: TaskState) -> Self {
        let status = pack(state.gen, phase_code(&state.phase));
        Self {
            id,
            status: AtomicU64::new(status),
            state: Mutex::new(state),
        }
    }

    /// Whether a copy placed at `gen` may still be claimed. One load, no lock (see module docs).
    pub(crate) fn is_live(&self, gen: u32) -> bool {
        self.status.load(Ordering::Relaxed) == pack(gen, QUEUED)
    }

    /// Enters the task's critical section.
    pub(crate) fn lock(&self) -> Locked<'_> {
        Locked {
            cell: self,
            st: self.state.lock(),
        }
    }
}

fn phase_code(phase: &Phase) -> u64 {
    match phase {
        Phase::Queued { .. } => QUEUED,
        Phase::Running { .. } => RUNNING,
        Phase::Gone => GONE,
    }
}

/// A locked cell. Every change of generation or phase goes through its methods, which keep the
/// lock-free `status` word in step with the guarded state.
pub(crate) struct Locked<'a> {
    cell: &'a TaskCell,
    pub(crate) st: MutexGuard<'a, TaskState>,
}

impl Locked<'_> {
    fn publish(&self) {
        // Relaxed: see "Why `status` may be read Relaxed" in the module docs.
        self.cell.status.store(
            pack(self.st.gen, phase_code(&self.st.phase)),
            Ordering::Relaxed,
        );
    }

    /// Starts a fresh placement: a new generation, queued with no holders and not parked.
    /// The caller has already released the old holders and left the parked set.
    pub(crate) fn requeue(&mut self) {
        self.st.gen = self.st.gen.wrapping_add(1) & GEN_MASK;
        self.st.phase = Phase::Queued {
            holders: Vec::new(),
            parked: false,
        };
        self.publish();
    }

    /// Claims the task for `worker` if the copy placed at `gen` is still current and `worker`
    /// holds it. Every holder's queued counter drops; returns the new attempt.
    /// `recheck: false` is the `ClaimWithoutRecheck` mutant, for loom models only.
    pub(crate) fn claim(&mut self, gen: u32, worker: &Arc<Worker>, recheck: bool) -> Option<u32> {
        if recheck {
            if self.st.gen != gen {
                return None;
            }
            let Phase::Queued { holders, .. } = &self.st.phase else {
                return None;
            };
            if !holders.iter().any(|h| Arc::ptr_eq(h, worker)) {
                return None;
            }
        }
        if let Phase::Queued { holders, .. } = &self.st.phase {
            holders.iter().for_each(|h| h.load.dec_queued());
        }
        worker.load.inc_running();
        self.st.attempt += 1;
        self.st.phase = Phase::Running {
            worker: worker.clone(),
        };
        self.publish();
        Some(self.st.attempt)
    }

    /// Takes the task out of its phase, fixing the counters it contributed to, and returns the
    /// phase it left. The caller decides what comes next (`requeue`, `finish`).
    /// A parked task must also be removed from the parked set by the caller.
    pub(crate) fn release(&mut self) -> Phase {
        let phase = std::mem::replace(&mut self.st.phase, Phase::Gone);
        match &phase {
            Phase::Queued { holders, .. } => holders.iter().for_each(|h| h.load.dec_queued()),
            Phase::Running { worker } => worker.load.dec_running(),
            Phase::Gone => {}
        }
        self.publish();
        phase
    }

    /// Marks a cell that never entered any phase's counters (a rolled-back submission) gone.
    pub(crate) fn abandon(&mut self) {
        self.st.phase = Phase::Gone;
        self.publish();
    }

    /// The task's id.
    pub(crate) fn id(&self) -> TaskId {
        self.cell.id
    }

    /// Ends the task: every copy becomes a tombstone.
    pub(crate) fn finish(&mut self, index: &Index) {
        self.release();
        index.remove(self.cell);
    }

    pub(crate) fn is_running_on(&self, worker: &Worker, attempt: u32) -> bool {
        matches!(&self.st.phase, Phase::Running { worker: w } if std::ptr::eq(Arc::as_ptr(w), worker))
            && self.st.attempt == attempt
    }
}

/// The reverse index: task id → cell. Concurrent (sharded); values are cloned out so no shard
/// lock is held while a cell is locked, except `remove`, which runs inside a cell's critical
/// section (lock order: cell, then index shard).
pub(crate) struct Index {
    map: Map<TaskId, Arc<TaskCell>>,
}

impl Index {
    pub(crate) fn new(shards: usize) -> Self {
        Self {
            map: Map::with_shards(shards),
        }
    }

    pub(crate) fn get(&self, id: TaskId) -> Option<Arc<TaskCell>> {
        self.map.get(&id)
    }

    pub(crate) fn contains(&self, id: TaskId) -> bool {
        self.map.contains(&id)
    }

    /// Inserts a new cell; fails if the id is taken.
    pub(crate) fn insert(&self, cell: &Arc<TaskCell>) -> bool {
        self.map.insert_new(cell.id, cell.clone()).is_ok()
    }

    /// Removes `cell` (and not a newer task that reused its id).
    pub(crate) fn remove(&self, cell: &TaskCell) {
        self.map
            .remove_if(&cell.id, |c| std::ptr::eq(Arc::as_ptr(c), cell));
    }

    pub(crate) fn cells(&self) -> Vec<Arc<TaskCell>> {
        self.map.values()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

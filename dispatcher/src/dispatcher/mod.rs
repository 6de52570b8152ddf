//! The [`Dispatcher`]: its state and the helpers its operations share. Each operation lives in
//! the child module named for it, one `impl Dispatcher` block each:
//!
//! | module | what it does |
//! |---|---|
//! | `submit` | submission and start-up seeding |
//! | `fetch` | fetch and claim |
//! | `reports` | a worker's reports (`complete`, `give_back`) and its running set |
//! | `tasks` | cancel, update and get one task |
//! | `delays` | waiting tasks: releasing those that are due (see `timers`) |
//! | `placing` | placing a task by the policy and pushing its entry (shared by all of the above) |
//! | `redistribute` | workers arriving and leaving, parking, rebalancing |
//! | `stats` | counters and the snapshot |
//! | `audit` | the invariant checker |
//!
//! The children use each other only through `Dispatcher` methods (an operation calls
//! `place`/`flush` from `placing`, the counters from `stats`); the data they work on (cells,
//! heaps, workers, classes) and the policy are in the sibling modules `index`, `queue`,
//! `registry` and `placement`, which know nothing of the `Dispatcher`.

mod audit;
mod delays;
mod fetch;
mod placing;
mod redistribute;
mod reports;
mod stats;
mod submit;
mod tasks;

pub use delays::Due;
pub use stats::{Counters, Stats, WorkerStats};

pub(crate) use placing::Pushes;
use redistribute::Parked;
use stats::CounterCells;

use std::collections::HashMap;
use std::time::Instant;

use crate::config::{Config, Mode, Mutant};
use crate::error::{Error, Result};
use crate::index::{Cells, Index, Locked, Phase, Slot};
use crate::registry::{Gauge, Registry, Worker};
use crate::sync::{AtomicU64, Hasher, Mutex, OnceLock, Shared};
use crate::timers::Timers;
use crate::{TaskId, WorkerId};

/// Told when work becomes fetchable, so a coordinator can wake fetches that wait for work
/// (long-polling). Called after the work is in a heap, outside every dispatcher lock.
pub trait Waker: Send + Sync + 'static {
    /// Work was queued on `worker`'s own queue (balanced mode).
    fn worker(&self, worker: WorkerId);
    /// Work was queued in a class's shared heap; `candidates` can fetch it (fanout mode).
    /// An implementation with no waiting fetch should return without iterating.
    fn class(&self, candidates: &mut dyn Iterator<Item = WorkerId>);
}

/// The in-process dispatcher. Cheap to share: wrap it in an `Arc`; every method takes `&self`.
pub struct Dispatcher {
    config: Config,
    running_weight_milli: u64,
    pub(crate) registry: Registry,
    cells: Cells,
    index: Index,
    parked: Mutex<HashMap<TaskId, Parked, Hasher>>,
    timers: Timers,
    /// Tasks in the waiting phase (changed only in their critical sections).
    waiting: Gauge,
    seq: AtomicU64,
    epoch: Instant,
    counters: CounterCells,
    waker: OnceLock<Shared<dyn Waker>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("config", &self.config)
            .field("workers", &self.registry.len())
            .field("tasks", &self.index.len())
            .finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// A dispatcher with `config`, or [`Error::InvalidInput`] if the configuration is invalid.
    pub fn new(config: Config) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            running_weight_milli: (config.running_weight * 1000.0).round() as u64,
            registry: Registry::new(config.shards, config.limits.clone()),
            cells: Cells::new(config.shards),
            index: Index::new(config.shards),
            parked: Mutex::new(HashMap::default()),
            timers: Timers::default(),
            waiting: Gauge::default(),
            seq: AtomicU64::new(0),
            epoch: Instant::now(),
            counters: CounterCells::default(),
            waker: OnceLock::new(),
            config,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Installs the waker told about new fetchable work. Only the first call takes effect;
    /// returns whether this one did.
    pub fn set_waker(&self, waker: Shared<dyn Waker>) -> bool {
        self.waker.set(waker).is_ok()
    }

    /// The tasks queued on `w`: balanced, its own counter; fanout, the sum over its classes.
    pub(crate) fn queued_of(&self, w: &Worker) -> usize {
        match self.config.mode {
            Mode::Fanout => w.classes.lock().iter().map(|c| c.queued.get()).sum(),
            Mode::Balanced(_) => w.load.queued(),
        }
    }

    /// Locks the live task `id`. A task that ended (or whose slot was reused) between the index
    /// lookup and the lock is unknown, as it would be a moment later.
    pub(crate) fn lock_task(&self, id: TaskId) -> Result<Locked<'_>> {
        let slot = self.index.get(id).ok_or(Error::UnknownTask(id))?;
        self.lock_slot(id, slot).ok_or(Error::UnknownTask(id))
    }

    /// Locks `slot` if it still holds task `id`.
    pub(crate) fn lock_slot(&self, id: TaskId, slot: Slot) -> Option<Locked<'_>> {
        self.cells.lock(slot).filter(|l| l.st.id == id)
    }

    /// Ends a task: leaves its phase (fixing counters) and the index. The caller frees the slot.
    pub(super) fn end(&self, l: &mut Locked<'_>) -> Phase {
        let phase = self.release(l);
        self.index.remove(l.st.id, l.slot);
        phase
    }

    /// Whether the loom-only mutant `m` is switched on (always false in normal builds).
    #[inline(always)]
    pub(super) fn mutant(&self, m: Mutant) -> bool {
        #[cfg(switchyard_loom)]
        return self.config.mutant == Some(m);
        #[cfg(not(switchyard_loom))]
        {
            let _ = m;
            false
        }
    }

    /// Seconds since this dispatcher's epoch (only read when aging is on).
    pub(super) fn now_secs(&self) -> f64 {
        if self.config.aging_rate == 0.0 {
            0.0
        } else {
            self.epoch.elapsed().as_secs_f64()
        }
    }

    /// Leaves the task's current phase (fixing counters and the parked set); returns it.
    pub(crate) fn release(&self, l: &mut Locked<'_>) -> Phase {
        let phase = l.release();
        match phase {
            Phase::Queued { parked: true, .. } => {
                self.parked.lock().remove(&l.st.id);
            }
            Phase::Waiting { .. } => self.waiting.dec(),
            _ => {}
        }
        phase
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.registry.clear();
    }
}

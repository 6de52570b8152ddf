//! The [`Dispatcher`]: submission, fetch, reports, cancellation and updates, and the placing
//! machinery they share (`place`, `assign_*`, `flush`). Worker arrival and departure, parking
//! and rebalancing are in [`crate::redistribute`]; statistics and the audit in [`crate::stats`].
//!
//! # Placing happens in two steps
//! 1. Inside the task's critical section, the policy picks the holder (balanced) or the class
//!    (fanout), the counters are updated, and the entry to push is collected.
//! 2. After the critical section, [`Dispatcher::flush`] pushes the entries, locking each target
//!    heap once per batch. A push into a *closed* worker queue (its worker is leaving) fails;
//!    the pusher then removes that holder in the task's critical section and places the task
//!    afresh. `unregister` withdraws the worker from the registry before closing its queue, so a
//!    fresh placement never picks the same worker again and the loop ends. (Class heaps are
//!    never closed: a fanout task outlives any one candidate.)
//!
//! Keeping pushes out of the critical section is what gives one lock order everywhere (see the
//! crate docs). A fetch holds its own worker queue while it claims, so a claim is never "in
//! flight" where `unregister` could miss it.

use std::collections::HashMap;
use std::time::Instant;

use crate::config::{Config, Mode, Mutant};
use crate::error::{Error, Result};
use crate::index::{Cells, Holders, Index, Locked, Phase, Slot, TaskState};
use crate::placement;
use crate::queue::Queue;
use crate::queue::{order_key, Entry, RunningRecord};
use crate::redistribute::Parked;
use crate::registry::{Class, Registry, Worker};
use crate::stats::CounterCells;
use crate::sync::{unlocked, Arc, AtomicU64, Hasher, Mutex, OnceLock, Ordering, Shared};
use crate::task::{Assignment, Cancelled, Placement, SeedTask, TaskInfo, TaskSpec, TaskStatus};
use crate::{TaskId, WorkerId};

/// Entries waiting to be pushed once the critical sections that chose them have ended.
#[derive(Default)]
pub(crate) struct Pushes {
    /// Balanced: entries for one worker's heap.
    one: Vec<(Arc<Worker>, Entry)>,
    /// Fanout: entries for a class's shared heap. Consecutive tasks of one class share a batch.
    classes: Vec<(Arc<Class>, Vec<Entry>)>,
}

impl Pushes {
    pub(crate) fn one(&mut self, worker: &Arc<Worker>, entry: Entry) {
        self.one.push((worker.clone(), entry));
    }

    fn class(&mut self, class: &Arc<Class>, entry: Entry) {
        match self.classes.last_mut() {
            Some((c, entries)) if Arc::ptr_eq(c, class) => entries.push(entry),
            _ => self.classes.push((class.clone(), vec![entry])),
        }
    }

    fn is_empty(&self) -> bool {
        self.one.is_empty() && self.classes.is_empty()
    }
}

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
    pub(crate) config: Config,
    pub(crate) running_weight_milli: u64,
    pub(crate) registry: Registry,
    pub(crate) cells: Cells,
    pub(crate) index: Index,
    pub(crate) parked: Mutex<HashMap<TaskId, Parked, Hasher>>,
    seq: AtomicU64,
    epoch: Instant,
    pub(crate) counters: CounterCells,
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

    // ----- submission -------------------------------------------------------------------------

    /// Submits one task. See [`Dispatcher::submit_many`].
    pub fn submit(&self, spec: TaskSpec) -> Result<()> {
        self.submit_many(std::iter::once(spec))
    }

    /// Submits a batch of tasks, all or nothing: if any spec is invalid or any id is taken
    /// (by a live task or twice in the batch), nothing is submitted. Each task is queued on its
    /// live candidates, or parked when it has none. Pushes are batched per worker.
    pub fn submit_many(&self, specs: impl IntoIterator<Item = TaskSpec>) -> Result<()> {
        let tasks = specs.into_iter().map(|spec| SeedTask {
            spec,
            attempt: 0,
            running_on: None,
        });
        let n = self.insert_batch(tasks)?;
        self.counters
            .submitted
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Checks a spec as `submit` would (group, tags, limits) without submitting it; for callers
    /// that must make a task durable before the dispatcher may hand it out.
    pub fn validate(&self, spec: &TaskSpec) -> Result<()> {
        self.registry.check_class(&spec.group, &spec.tags)
    }

    /// Loads tasks at start-up (after the workers are registered): queued tasks are placed,
    /// running tasks stay on their worker if it is registered and are queued again (as a new
    /// attempt on their next fetch) if it is not. All or nothing, like `submit_many`.
    /// Returns how many tasks were loaded.
    pub fn seed(&self, tasks: impl IntoIterator<Item = SeedTask>) -> Result<usize> {
        self.insert_batch(tasks)
    }

    fn insert_batch(&self, tasks: impl IntoIterator<Item = SeedTask>) -> Result<usize> {
        let now = self.now_secs();
        let tasks = tasks.into_iter();
        let mut prepared = Vec::with_capacity(tasks.size_hint().0);
        // Ids seen in this batch; a batch of one needs no set (the common single submit).
        let mut seen: Option<std::collections::HashSet<TaskId, Hasher>> = None;
        let mut first = None;
        // Validate everything before touching shared state.
        for task in tasks {
            let spec = task.spec;
            let repeated = match (&mut seen, first) {
                (Some(seen), _) => !seen.insert(spec.id),
                (None, None) => {
                    first = Some(spec.id);
                    false
                }
                (None, Some(first)) => {
                    let mut set = std::collections::HashSet::with_capacity_and_hasher(
                        prepared.capacity().max(2),
                        Hasher::default(),
                    );
                    set.insert(first);
                    let repeated = !set.insert(spec.id);
                    seen = Some(set);
                    repeated
                }
            };
            if repeated {
                return Err(Error::InvalidInput(format!(
                    "task {} appears twice in the batch",
                    spec.id
                )));
            }
            if self.index.contains(spec.id) {
                return Err(Error::DuplicateTask(spec.id));
            }
            let class = self.registry.class(&spec.group, &spec.tags)?;
            // Some(None): it ran on a worker that is not registered (it will be queued again).
            let runner = task.running_on.map(|w| self.registry.get(w).ok());
            if runner.is_some() && task.attempt == 0 {
                return Err(Error::InvalidInput(format!(
                    "task {} is running with attempt 0",
                    spec.id
                )));
            }
            let enqueued = now - spec.waited.as_secs_f64();
            prepared.push((spec, task.attempt, runner.flatten(), class, enqueued));
        }

        // Every new cell is locked before its id enters the index, and stays locked until it
        // is placed, so nobody observes a half-made task. Nobody else can hold two cell locks,
        // and these cells are in no heap yet, so holding many cannot deadlock.
        let mut locked: Vec<Locked<'_>> = Vec::with_capacity(prepared.len());
        let mut runners = Vec::with_capacity(prepared.len());
        for (spec, attempt, runner, class, enqueued) in prepared {
            runners.push(runner.is_some());
            let phase = match runner {
                Some(worker) => Phase::Running { worker },
                None => Phase::Queued {
                    holders: Holders::None,
                    parked: false,
                },
            };
            let key = order_key(spec.priority, self.config.aging_rate, enqueued);
            // Relaxed: a ticket for FIFO order; nothing is published through it.
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            locked.push(self.cells.occupy(spec.id, |gen| TaskState {
                id: spec.id,
                gen,
                phase,
                attempt,
                priority: spec.priority,
                key,
                seq,
                class,
                enqueued,
            }));
        }
        for i in 0..locked.len() {
            let (id, slot) = (locked[i].st.id, locked[i].slot);
            if !self.index.insert(id, slot) {
                // Lost a race with a concurrent submission of the same id: undo this batch.
                for l in &locked[..i] {
                    self.index.remove(l.st.id, l.slot);
                }
                for mut l in locked {
                    l.abandon();
                    self.cells.free(l);
                }
                return Err(Error::DuplicateTask(id));
            }
        }
        let n = locked.len();
        let mut pushes = Pushes::default();
        let mut restore = Vec::new();
        for (mut l, running) in locked.into_iter().zip(runners) {
            if running {
                let Phase::Running { worker } = &l.st.phase else {
                    unreachable!("built as running above")
                };
                worker.load.inc_running();
                let record = RunningRecord {
                    slot: l.slot,
                    gen: l.st.gen,
                    attempt: l.st.attempt,
                };
                restore.push((worker.clone(), record));
            } else {
                self.place(&mut l, &mut pushes);
            }
        }
        self.flush(pushes);
        for (worker, record) in restore {
            self.restore_running(&worker, record);
        }
        Ok(n)
    }

    /// Records a seeded running task in its worker's running records; if the worker has left
    /// in the meantime, the task is queued again like any task of a departed worker.
    fn restore_running(&self, worker: &Arc<Worker>, record: RunningRecord) {
        let mut q = worker.queue.lock();
        if !q.closed || self.mutant(Mutant::SeedIgnoresDeparture) {
            q.record_running(record, worker.load.running(), &self.cells);
            return;
        }
        drop(q);
        let mut pushes = Pushes::default();
        if let Some(mut l) = self.cells.lock(record.slot) {
            if l.st.gen == record.gen && l.is_running_on(worker, record.attempt) {
                self.release(&mut l);
                l.requeue();
                self.place(&mut l, &mut pushes);
            }
        }
        self.flush(pushes);
    }

    // ----- fetch and reports ------------------------------------------------------------------

    /// Assigns up to `max` of `worker`'s queued tasks to it, highest effective priority first and
    /// FIFO among equals. Each returned task is claimed: no other worker can get it any more.
    pub fn fetch(&self, worker: WorkerId, max: usize) -> Result<Vec<Assignment>> {
        let mut out = Vec::new();
        self.fetch_into(worker, max, &mut out)?;
        Ok(out)
    }

    /// [`fetch`](Self::fetch) into a caller's buffer (appended to); returns how many it added.
    pub fn fetch_into(
        &self,
        worker: WorkerId,
        max: usize,
        out: &mut Vec<Assignment>,
    ) -> Result<usize> {
        let w = self.registry.get(worker)?;
        let mut q = w.queue.lock();
        if q.closed {
            return Err(Error::UnknownWorker(worker));
        }
        let recheck = !self.mutant(Mutant::ClaimWithoutRecheck);
        if self.config.mode == Mode::Fanout {
            let (claimed, stale) = self.fetch_fanout(&w, &mut q, max, out, recheck);
            w.load.add_fetched(claimed, stale);
            return Ok(claimed);
        }
        // Compact first: a heap mostly of tombstones is cheaper to rebuild than to pop through.
        let (mut claimed, mut stale) = (0, q.heap.compact_if_sparse(w.load.queued(), &self.cells));
        while claimed < max {
            let Some(entry) = q.heap.pop() else { break };
            if !entry.is_live(&self.cells) {
                stale += 1;
                continue;
            }
            let locked = if self.mutant(Mutant::FetchUnlocksBeforeClaim) {
                unlocked(&mut q, || self.cells.lock(entry.slot))
            } else {
                self.cells.lock(entry.slot)
            };
            if self.claim_entry(locked, entry, &w, &mut q, recheck, out) {
                claimed += 1;
            } else {
                stale += 1;
            }
        }
        // Counted under the queue lock, so `unregister` (which closes it) folds them in.
        w.load.add_fetched(claimed, stale);
        Ok(claimed)
    }

    /// Fanout fetch: takes the best live head among the heaps of the classes `w` serves, while
    /// `w`'s queue lock (`q`) is held so `unregister` sees every claim. Returns (claimed, dead
    /// entries dropped).
    fn fetch_fanout(
        &self,
        w: &Arc<Worker>,
        q: &mut Queue,
        max: usize,
        out: &mut Vec<Assignment>,
        recheck: bool,
    ) -> (usize, usize) {
        let classes = w.classes.lock().clone();
        let (mut claimed, mut stale) = (0, 0);
        while claimed < max {
            let entry = if let [class] = &*classes {
                // One class: pop its live head under one lock.
                let mut h = class.heap.lock();
                let (head, dropped) = h.live_head(&self.cells);
                stale += dropped;
                match head {
                    Some(head) => {
                        h.pop();
                        head
                    }
                    None => break,
                }
            } else {
                let mut best: Option<(&Arc<Class>, Entry)> = None;
                for class in classes.iter() {
                    let (head, dropped) = class.heap.lock().live_head(&self.cells);
                    stale += dropped;
                    if let Some(head) = head {
                        if best.is_none_or(|(_, b)| head > b) {
                            best = Some((class, head));
                        }
                    }
                }
                let Some((class, head)) = best else { break };
                // Take it if it is still that class's head (another candidate may have).
                let mut h = class.heap.lock();
                if h.live_head(&self.cells).0 != Some(head)
                    && !self.mutant(Mutant::FanoutPopsWithoutHeadCheck)
                {
                    continue;
                }
                h.pop();
                head
            };
            if self.claim_entry(self.cells.lock(entry.slot), entry, w, q, recheck, out) {
                claimed += 1;
            } else {
                stale += 1;
            }
        }
        (claimed, stale)
    }

    /// Claims the task of a popped `entry` (its cell `locked`, if still occupied) for `w`,
    /// appends the assignment to `out` and records it in `w`'s queue `q`, whose lock the caller
    /// holds. False if the entry was dead.
    fn claim_entry(
        &self,
        locked: Option<Locked<'_>>,
        entry: Entry,
        w: &Arc<Worker>,
        q: &mut Queue,
        recheck: bool,
        out: &mut Vec<Assignment>,
    ) -> bool {
        let Some(mut l) = locked else { return false };
        let Some((attempt, gen)) = l.claim(entry.gen, w, recheck) else {
            return false;
        };
        out.push(Assignment {
            task: l.st.id,
            attempt,
            priority: l.st.priority,
        });
        drop(l);
        let record = RunningRecord {
            slot: entry.slot,
            gen,
            attempt,
        };
        q.record_running(record, w.load.running(), &self.cells);
        true
    }

    /// Reports `task` finished or failed by `worker` as `attempt`. The task leaves the
    /// dispatcher. A report for any other attempt is refused with [`Error::StaleAttempt`].
    pub fn complete(&self, worker: WorkerId, task: TaskId, attempt: u32) -> Result<()> {
        let w = self.registry.get(worker)?;
        let mut l = self.lock_task(task)?;
        Self::check_assignment(&l, &w, task, attempt)?;
        self.end(&mut l);
        self.cells.free(l);
        self.counters.completed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// `worker` hands `task` (attempt `attempt`) back unfinished: it is queued again and its
    /// next fetch is a new attempt. Returns where it was placed.
    pub fn give_back(&self, worker: WorkerId, task: TaskId, attempt: u32) -> Result<Placement> {
        let w = self.registry.get(worker)?;
        let mut pushes = Pushes::default();
        let mut l = self.lock_task(task)?;
        Self::check_assignment(&l, &w, task, attempt)?;
        self.release(&mut l);
        l.requeue();
        self.place(&mut l, &mut pushes);
        let placement = self.placement_of(&l);
        drop(l);
        self.flush(pushes);
        self.counters.given_back.fetch_add(1, Ordering::Relaxed);
        Ok(placement)
    }

    /// The assignments `worker` runs now (claimed, not yet reported, given back or cancelled),
    /// in claim order. A coordinator compares them with what the worker says it holds.
    ///
    /// Locks the worker's queue, then each task's cell in turn (the documented order).
    pub fn running(&self, worker: WorkerId) -> Result<Vec<Assignment>> {
        let w = self.registry.get(worker)?;
        let q = w.queue.lock();
        if q.closed {
            return Err(Error::UnknownWorker(worker));
        }
        let mut out = Vec::with_capacity(w.load.running());
        for record in &q.running {
            if !record.is_current(&self.cells) {
                continue; // reported, given back or cancelled: a pruned-later record
            }
            let Some(l) = self.cells.lock(record.slot) else {
                continue;
            };
            if l.st.gen == record.gen && l.is_running_on(&w, record.attempt) {
                out.push(Assignment {
                    task: l.st.id,
                    attempt: record.attempt,
                    priority: l.st.priority,
                });
            }
        }
        Ok(out)
    }

    /// Whether `task` runs on `worker` as `attempt` now.
    pub fn is_running(&self, worker: WorkerId, task: TaskId, attempt: u32) -> bool {
        let (Ok(w), Ok(l)) = (self.registry.get(worker), self.lock_task(task)) else {
            return false;
        };
        l.is_running_on(&w, attempt)
    }

    /// Whether a report by `w` for `attempt` names the task's current assignment.
    fn check_assignment(l: &Locked<'_>, w: &Worker, task: TaskId, attempt: u32) -> Result<()> {
        if !l.is_running_on(w, attempt) {
            return Err(Error::StaleAttempt {
                task,
                attempt,
                worker: w.id,
            });
        }
        Ok(())
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
    fn end(&self, l: &mut Locked<'_>) -> Phase {
        let phase = self.release(l);
        self.index.remove(l.st.id, l.slot);
        phase
    }

    // ----- user operations --------------------------------------------------------------------

    /// Cancels a task wherever it is. A queued or parked task is never handed out; a running
    /// task's assignment is revoked (its report will be refused) and reported back.
    pub fn cancel(&self, task: TaskId) -> Result<Cancelled> {
        let mut l = self.lock_task(task)?;
        let attempt = l.st.attempt;
        let phase = self.end(&mut l);
        self.cells.free(l);
        self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
        Ok(match phase {
            Phase::Running { worker } => Cancelled::Running {
                worker: worker.id,
                attempt,
            },
            _ => Cancelled::Queued,
        })
    }

    /// Changes the priority and/or tags of a queued (or parked) task; it is placed afresh.
    /// A running task is refused with [`Error::NotQueued`].
    pub fn update<S: AsRef<str>>(
        &self,
        task: TaskId,
        priority: Option<i32>,
        tags: Option<&[S]>,
    ) -> Result<Placement> {
        let mut pushes = Pushes::default();
        // The new class is made outside the task's critical section (making one takes the
        // registry's topology lock and visits every worker), and only for a task that is
        // queued: a refused update creates nothing.
        let class = match tags {
            Some(tags) => {
                let group = {
                    let l = self.lock_task(task)?;
                    if let Phase::Running { .. } = l.st.phase {
                        return Err(Error::NotQueued(task));
                    }
                    l.st.class.group_name.clone()
                };
                self.registry.check_class(&group, tags)?;
                Some(self.registry.class(&group, tags)?)
            }
            None => None,
        };
        let mut l = self.lock_task(task)?;
        if let Phase::Running { .. } = l.st.phase {
            return Err(Error::NotQueued(task));
        }
        let class = class.unwrap_or_else(|| l.st.class.clone());
        self.release(&mut l);
        if let Some(p) = priority {
            l.st.priority = p;
            l.st.key = order_key(p, self.config.aging_rate, l.st.enqueued);
        }
        l.st.class = class;
        l.requeue();
        self.place(&mut l, &mut pushes);
        let placement = self.placement_of(&l);
        drop(l);
        self.flush(pushes);
        Ok(placement)
    }

    /// A snapshot of a live task, or `None` if no live task has this id.
    pub fn get(&self, task: TaskId) -> Option<TaskInfo> {
        let l = self.lock_task(task).ok()?;
        let status = match &l.st.phase {
            Phase::Running { worker } => TaskStatus::Running(worker.id),
            Phase::Gone => return None,
            Phase::Queued { .. } => match self.placement_of(&l) {
                Placement::Queued(holders) => TaskStatus::Queued(holders),
                Placement::Parked => TaskStatus::Parked,
            },
        };
        Some(TaskInfo {
            id: task,
            status,
            attempt: l.st.attempt,
            priority: l.st.priority,
            group: l.st.class.group_name.to_string(),
            tags: l.st.class.tag_names.iter().map(|t| t.to_string()).collect(),
        })
    }

    // ----- the placing machinery --------------------------------------------------------------

    /// Where a locked, queued task is, as reported to callers. A fanout task is held by every
    /// live candidate of its class, and parked while there is none.
    pub(crate) fn placement_of(&self, l: &Locked<'_>) -> Placement {
        match &l.st.phase {
            Phase::Queued {
                holders: Holders::Class,
                ..
            } => {
                let candidates = self.registry.candidates(&l.st.class);
                if candidates.is_empty() {
                    Placement::Parked
                } else {
                    Placement::Queued(candidates.iter().map(|w| w.id).collect())
                }
            }
            Phase::Queued {
                holders: Holders::One(w),
                ..
            } => Placement::Queued(vec![w.id]),
            Phase::Queued { .. } => Placement::Parked,
            _ => unreachable!("placements are reported for queued tasks"),
        }
    }

    /// Whether the loom-only mutant `m` is switched on (always false in normal builds).
    #[inline(always)]
    fn mutant(&self, m: Mutant) -> bool {
        #[cfg(switchyard_loom)]
        return self.config.mutant == Some(m);
        #[cfg(not(switchyard_loom))]
        {
            let _ = m;
            false
        }
    }

    /// Seconds since this dispatcher's epoch (only read when aging is on).
    fn now_secs(&self) -> f64 {
        if self.config.aging_rate == 0.0 {
            0.0
        } else {
            self.epoch.elapsed().as_secs_f64()
        }
    }

    /// Leaves the task's current phase (fixing counters and the parked set); returns it.
    pub(crate) fn release(&self, l: &mut Locked<'_>) -> Phase {
        let phase = l.release();
        if let Phase::Queued { parked: true, .. } = phase {
            self.parked.lock().remove(&l.st.id);
        }
        phase
    }

    /// Places a freshly requeued task (no holders) on its live candidates by the configured
    /// policy, or parks it when it has none. Copies to push go to `pushes`.
    pub(crate) fn place(&self, l: &mut Locked<'_>, pushes: &mut Pushes) {
        loop {
            let candidates = self.registry.candidates(&l.st.class);
            if let Mode::Fanout = self.config.mode {
                // Into the class's heap, where every candidate (present or future) reads it.
                let class = l.st.class.clone();
                pushes.class(&class, Self::entry(l));
                l.set_holders(Holders::Class);
                if candidates.is_empty() {
                    self.counters.parked.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            if !candidates.is_empty() {
                match self.config.mode {
                    Mode::Fanout => unreachable!("handled above"),
                    Mode::Balanced(strategy) => {
                        let i = placement::choose(
                            strategy,
                            &candidates,
                            &l.st.class.cursor,
                            self.running_weight_milli,
                        );
                        Self::assign_one(l, &candidates[i], pushes);
                    }
                }
                return;
            }
            if self.park(l) {
                return;
            }
        }
    }

    fn entry(l: &Locked<'_>) -> Entry {
        Entry::new(l.st.key, l.st.seq, l.slot, l.st.gen)
    }

    /// Makes `worker` the one holder of a queued task with none.
    pub(crate) fn assign_one(l: &mut Locked<'_>, worker: &Arc<Worker>, pushes: &mut Pushes) {
        pushes.one(worker, Self::entry(l));
        l.set_holders(Holders::One(worker.clone()));
    }

    /// Pushes entries, one lock per target heap. Entries for closed queues are handed to
    /// `push_failed`, which may place their tasks again; repeats until nothing is left.
    pub(crate) fn flush(&self, mut pushes: Pushes) {
        while !pushes.is_empty() {
            let Pushes { one, classes } = std::mem::take(&mut pushes);
            let mut failed = Vec::new();
            for (class, entries) in &classes {
                let mut h = class.heap.lock();
                entries.iter().for_each(|e| h.push(*e));
                let compacted = h.compact_if_sparse(class.queued.get(), &self.cells);
                drop(h);
                self.counters.add_stale(compacted);
                if let Some(waker) = self.waker.get() {
                    let candidates = self.registry.candidates(class);
                    waker.class(&mut candidates.iter().map(|w| w.id));
                }
            }
            if one.len() == 1 {
                let (w, entry) = &one[0];
                self.push_to(w, std::slice::from_ref(entry), &mut failed);
            } else if !one.is_empty() {
                for (w, entries) in group_by_worker(one) {
                    self.push_to(&w, &entries, &mut failed);
                }
            }
            for (w, entry) in failed {
                self.push_failed(&w, entry, &mut pushes);
            }
        }
    }

    fn push_to(&self, w: &Arc<Worker>, entries: &[Entry], failed: &mut Vec<(Arc<Worker>, Entry)>) {
        let mut q = w.queue.lock();
        if q.closed && !self.mutant(Mutant::PushIgnoresClosed) {
            drop(q);
            failed.extend(entries.iter().map(|e| (w.clone(), *e)));
            return;
        }
        entries.iter().for_each(|e| q.heap.push(*e));
        let compacted = q.heap.compact_if_sparse(w.load.queued(), &self.cells);
        w.load.add_fetched(0, compacted);
        drop(q);
        if let Some(waker) = self.waker.get() {
            waker.worker(w.id);
        }
    }

    /// An entry could not be pushed because `worker` is leaving: drop it from the task's holders
    /// and, if it was the last, place the task afresh.
    fn push_failed(&self, worker: &Arc<Worker>, entry: Entry, pushes: &mut Pushes) {
        let Some(mut l) = self.cells.lock(entry.slot) else {
            return;
        };
        if l.st.gen != entry.gen {
            return;
        }
        if l.remove_holder(worker) {
            l.requeue();
            self.place(&mut l, pushes);
            self.counters.redistributed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.registry.clear();
    }
}

/// Groups pushes by target worker, keeping each worker's entries in order.
fn group_by_worker(pushes: Vec<(Arc<Worker>, Entry)>) -> Vec<(Arc<Worker>, Vec<Entry>)> {
    let mut slot: HashMap<*const Worker, usize, Hasher> = HashMap::default();
    let mut groups: Vec<(Arc<Worker>, Vec<Entry>)> = Vec::new();
    for (w, entry) in pushes {
        let i = *slot.entry(Arc::as_ptr(&w)).or_insert_with(|| {
            groups.push((w.clone(), Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(entry);
    }
    groups
}

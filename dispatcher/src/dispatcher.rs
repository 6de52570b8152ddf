//! The [`Dispatcher`]: submission, fetch, reports, cancellation and updates, and the placing
//! machinery they share (`place`, `assign`, `flush`). Worker arrival and departure, parking and
//! rebalancing are in [`crate::redistribute`]; statistics in [`crate::stats`].
//!
//! # Placing happens in two steps
//! 1. Inside the task's critical section, the policy picks holders, the task's holder list and
//!    the holders' `queued` counters are updated, and the copies to push are collected.
//! 2. After the critical section, [`Dispatcher::flush`] pushes the copies, locking each target
//!    queue once per batch. A push into a *closed* queue (its worker is leaving) fails; the
//!    pusher then removes that holder in the task's critical section and, if no holder is left,
//!    places the task afresh. `unregister` withdraws the worker from the registry before closing
//!    its queue, so a fresh placement never picks the same worker again and the loop ends.
//!
//! Keeping pushes out of the critical section is what gives one lock order everywhere:
//! **worker queue → task cell → parked set → class cache → registry**, with index shards as
//! leaves. A fetch holds its own queue while it claims, so a copy is never "in flight" between
//! a heap and a claim where `unregister` could miss it.

use std::collections::HashMap;
use std::time::Instant;

use crate::config::{Config, Mode, Mutant};
use crate::error::{Error, Result};
use crate::index::{Index, Locked, Phase, TaskCell, TaskState};
use crate::placement;
use crate::queue::{order_key, Entry, RunningSlot};
use crate::redistribute::{Parked, Placement};
use crate::registry::{Class, Registry, Worker};
use crate::stats::CounterCells;
use crate::sync::{unlocked, Arc, AtomicU64, Hasher, Mutex, Ordering};
use crate::task::{Assignment, Cancelled, SeedTask, TaskInfo, TaskSpec, TaskStatus};
use crate::{TaskId, WorkerId};

/// Copies waiting to be pushed once the critical sections that chose them have ended.
pub(crate) type Pushes = Vec<(Arc<Worker>, Entry)>;

/// The in-process dispatcher. Cheap to share: wrap it in an `Arc`; every method takes `&self`.
pub struct Dispatcher {
    pub(crate) config: Config,
    pub(crate) running_weight_milli: u64,
    pub(crate) registry: Registry,
    pub(crate) index: Index,
    pub(crate) parked: Mutex<HashMap<TaskId, Parked, Hasher>>,
    seq: AtomicU64,
    epoch: Instant,
    pub(crate) counters: CounterCells,
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
            index: Index::new(config.shards),
            parked: Mutex::new(HashMap::default()),
            seq: AtomicU64::new(0),
            epoch: Instant::now(),
            counters: CounterCells::default(),
            config,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
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

    /// Loads tasks at start-up (after the workers are registered): queued tasks are placed,
    /// running tasks stay on their worker if it is registered and are queued again (as a new
    /// attempt on their next fetch) if it is not. All or nothing, like `submit_many`.
    /// Returns how many tasks were loaded.
    pub fn seed(&self, tasks: impl IntoIterator<Item = SeedTask>) -> Result<usize> {
        self.insert_batch(tasks)
    }

    fn insert_batch(&self, tasks: impl IntoIterator<Item = SeedTask>) -> Result<usize> {
        let now = self.now_secs();
        let mut seen = std::collections::HashSet::new();
        let mut cells = Vec::new();
        let mut running_on = Vec::new();
        // Validate everything before touching shared state.
        for task in tasks {
            let spec = task.spec;
            if !seen.insert(spec.id) {
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
            let worker = task.running_on.map(|w| self.registry.get(w).ok());
            if worker.is_some() && task.attempt == 0 {
                return Err(Error::InvalidInput(format!(
                    "task {} is running with attempt 0",
                    spec.id
                )));
            }
            let enqueued = now - spec.waited.as_secs_f64();
            let phase = match worker.flatten() {
                Some(w) => Phase::Running { worker: w },
                None => Phase::Queued {
                    holders: Vec::new(),
                    parked: false,
                },
            };
            running_on.push(matches!(phase, Phase::Running { .. }));
            let state = TaskState {
                gen: 0,
                phase,
                attempt: task.attempt,
                priority: spec.priority,
                key: order_key(spec.priority, self.config.aging_rate, enqueued),
                // Relaxed: a ticket for FIFO order; nothing is published through it.
                seq: self.seq.fetch_add(1, Ordering::Relaxed),
                class,
                enqueued,
            };
            cells.push(Arc::new(TaskCell::new(spec.id, state)));
        }

        // Every new cell is locked before it becomes visible in the index, and stays locked
        // until it is placed, so nobody observes a half-made task. Nobody else can hold two
        // cell locks, and these cells are in no heap yet, so holding many cannot deadlock.
        let mut locked: Vec<Locked<'_>> = cells.iter().map(|c| c.lock()).collect();
        for (i, cell) in cells.iter().enumerate() {
            if !self.index.insert(cell) {
                // Lost a race with a concurrent submission of the same id: undo this batch.
                for undo in &cells[..i] {
                    self.index.remove(undo);
                }
                // Anyone who looked a cell up meanwhile finds it gone once we unlock.
                locked.iter_mut().for_each(Locked::abandon);
                return Err(Error::DuplicateTask(cell.id));
            }
        }
        let mut pushes = Pushes::new();
        let mut restore = Vec::new();
        for ((cell, l), running) in cells.iter().zip(&mut locked).zip(&running_on) {
            if *running {
                let Phase::Running { worker } = &l.st.phase else {
                    unreachable!("built as running above")
                };
                worker.load.inc_running();
                restore.push((worker.clone(), l.st.attempt, cell.clone()));
            } else {
                self.place(cell, l, &mut pushes);
            }
        }
        drop(locked);
        self.flush(pushes);
        for (worker, attempt, cell) in restore {
            self.restore_running(&worker, attempt, cell);
        }
        Ok(cells.len())
    }

    /// Records a seeded running task in its worker's running set; if the worker has left in the
    /// meantime, the task is queued again like any task of a departed worker.
    fn restore_running(&self, worker: &Arc<Worker>, attempt: u32, cell: Arc<TaskCell>) {
        let mut q = worker.queue.lock();
        if !q.closed {
            q.running.insert(cell.id, RunningSlot { attempt, cell });
            return;
        }
        drop(q);
        let mut pushes = Pushes::new();
        let mut l = cell.lock();
        if l.is_running_on(worker, attempt) {
            self.release(&mut l);
            l.requeue();
            self.place(&cell, &mut l, &mut pushes);
        }
        drop(l);
        self.flush(pushes);
    }

    // ----- fetch and reports ------------------------------------------------------------------

    /// Assigns up to `max` of `worker`'s queued tasks to it, highest effective priority first and
    /// FIFO among equals. Each returned task is claimed: every other copy died at that instant.
    pub fn fetch(&self, worker: WorkerId, max: usize) -> Result<Vec<Assignment>> {
        let w = self.registry.get(worker)?;
        let mut out = Vec::with_capacity(max.min(64));
        let mut stale = 0u64;
        let mut q = w.queue.lock();
        if q.closed {
            return Err(Error::UnknownWorker(worker));
        }
        while out.len() < max {
            let Some(entry) = q.pop() else { break };
            if !entry.is_live() {
                stale += 1;
                continue;
            }
            let gen = entry.gen();
            let cell = entry.cell;
            let mut l = if self.mutant(Mutant::FetchUnlocksBeforeClaim) {
                unlocked(&mut q, || cell.lock())
            } else {
                cell.lock()
            };
            let recheck = !self.mutant(Mutant::ClaimWithoutRecheck);
            let Some(attempt) = l.claim(gen, &w, recheck) else {
                stale += 1;
                continue;
            };
            out.push(Assignment {
                task: cell.id,
                attempt,
                priority: l.st.priority,
            });
            drop(l);
            q.running.insert(cell.id, RunningSlot { attempt, cell });
        }
        let compacted = q.compact_if_sparse(w.load.queued());
        drop(q);
        let c = &self.counters;
        c.claimed.fetch_add(out.len() as u64, Ordering::Relaxed);
        c.stale_skipped
            .fetch_add(stale + compacted as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// Reports `task` finished or failed by `worker` as `attempt`. The task leaves the
    /// dispatcher. A report for any other attempt is refused with [`Error::StaleAttempt`].
    pub fn complete(&self, worker: WorkerId, task: TaskId, attempt: u32) -> Result<()> {
        let (w, cell) = self.running_task(worker, task)?;
        let mut l = cell.lock();
        Self::check_assignment(&l, &w, task, attempt)?;
        l.finish(&self.index);
        drop(l);
        Self::forget_running(&w, task, attempt);
        self.counters.completed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// `worker` hands `task` (attempt `attempt`) back unfinished: it is queued again and its
    /// next fetch is a new attempt. Returns where it was placed.
    pub fn give_back(&self, worker: WorkerId, task: TaskId, attempt: u32) -> Result<Placement> {
        let (w, cell) = self.running_task(worker, task)?;
        let mut pushes = Pushes::new();
        let mut l = cell.lock();
        Self::check_assignment(&l, &w, task, attempt)?;
        self.release(&mut l);
        l.requeue();
        let placement = self.place(&cell, &mut l, &mut pushes);
        drop(l);
        self.flush(pushes);
        Self::forget_running(&w, task, attempt);
        self.counters.given_back.fetch_add(1, Ordering::Relaxed);
        Ok(placement)
    }

    /// Whether a report by `w` for `attempt` names the task's current assignment. A task that
    /// ended between the index lookup and the lock is unknown, as it would be a moment later.
    fn check_assignment(l: &Locked<'_>, w: &Worker, task: TaskId, attempt: u32) -> Result<()> {
        if matches!(l.st.phase, Phase::Gone) {
            return Err(Error::UnknownTask(task));
        }
        if !l.is_running_on(w, attempt) {
            return Err(Error::StaleAttempt {
                task,
                attempt,
                worker: w.id,
            });
        }
        Ok(())
    }

    fn running_task(&self, worker: WorkerId, task: TaskId) -> Result<(Arc<Worker>, Arc<TaskCell>)> {
        let w = self.registry.get(worker)?;
        let cell = self.index.get(task).ok_or(Error::UnknownTask(task))?;
        Ok((w, cell))
    }

    /// Drops a finished assignment from its worker's running set (after the critical section,
    /// keeping the lock order; a slot for a newer attempt is left alone).
    fn forget_running(worker: &Worker, task: TaskId, attempt: u32) {
        let mut q = worker.queue.lock();
        if q.running.get(&task).is_some_and(|s| s.attempt == attempt) {
            q.running.remove(&task);
        }
    }

    // ----- user operations --------------------------------------------------------------------

    /// Cancels a task wherever it is. A queued or parked task is never handed out; a running
    /// task's assignment is revoked (its report will be refused) and reported back.
    pub fn cancel(&self, task: TaskId) -> Result<Cancelled> {
        let cell = self.index.get(task).ok_or(Error::UnknownTask(task))?;
        let mut l = cell.lock();
        let attempt = l.st.attempt;
        let phase = self.release(&mut l);
        self.index.remove(&cell);
        drop(l);
        let outcome = match phase {
            Phase::Queued { .. } => Cancelled::Queued,
            Phase::Running { worker } => {
                Self::forget_running(&worker, task, attempt);
                Cancelled::Running {
                    worker: worker.id,
                    attempt,
                }
            }
            // Finished or cancelled between the lookup and the lock.
            Phase::Gone => return Err(Error::UnknownTask(task)),
        };
        self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
        Ok(outcome)
    }

    /// Changes the priority and/or tags of a queued (or parked) task; it is placed afresh.
    /// A running task is refused with [`Error::NotQueued`].
    pub fn update<S: AsRef<str>>(
        &self,
        task: TaskId,
        priority: Option<i32>,
        tags: Option<&[S]>,
    ) -> Result<Placement> {
        let cell = self.index.get(task).ok_or(Error::UnknownTask(task))?;
        let mut pushes = Pushes::new();
        let mut l = cell.lock();
        let class: Arc<Class> = match tags {
            Some(tags) => self.registry.class(&l.st.class.group_name, tags)?,
            None => l.st.class.clone(),
        };
        match l.st.phase {
            Phase::Queued { .. } => {}
            Phase::Running { .. } => return Err(Error::NotQueued(task)),
            Phase::Gone => return Err(Error::UnknownTask(task)),
        }
        self.release(&mut l);
        if let Some(p) = priority {
            l.st.priority = p;
            l.st.key = order_key(p, self.config.aging_rate, l.st.enqueued);
        }
        l.st.class = class;
        l.requeue();
        let placement = self.place(&cell, &mut l, &mut pushes);
        drop(l);
        self.flush(pushes);
        Ok(placement)
    }

    /// A snapshot of a live task, or `None` if no live task has this id.
    pub fn get(&self, task: TaskId) -> Option<TaskInfo> {
        let cell = self.index.get(task)?;
        let l = cell.lock();
        let status = match &l.st.phase {
            Phase::Queued { parked: true, .. } => TaskStatus::Parked,
            Phase::Queued { holders, .. } => {
                TaskStatus::Queued(holders.iter().map(|w| w.id).collect())
            }
            Phase::Running { worker } => TaskStatus::Running(worker.id),
            Phase::Gone => return None,
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
            self.parked.lock().remove(&l.id());
        }
        phase
    }

    /// Places a freshly requeued task (no holders) on its live candidates by the configured
    /// policy, or parks it when it has none. Copies to push go to `pushes`.
    pub(crate) fn place(
        &self,
        cell: &Arc<TaskCell>,
        l: &mut Locked<'_>,
        pushes: &mut Pushes,
    ) -> Placement {
        loop {
            let candidates = self.registry.candidates(&l.st.class);
            if !candidates.is_empty() {
                let chosen = match self.config.mode {
                    Mode::Fanout => candidates.to_vec(),
                    Mode::Balanced(strategy) => {
                        let i = placement::choose(
                            strategy,
                            &candidates,
                            &l.st.class.cursor,
                            self.running_weight_milli,
                        );
                        vec![candidates[i].clone()]
                    }
                };
                return self.assign(cell, l, chosen, pushes);
            }
            if self.park(cell, l) {
                return Placement::Parked;
            }
        }
    }

    /// Makes `chosen` the holders of a queued task with none, and queues their copies.
    pub(crate) fn assign(
        &self,
        cell: &Arc<TaskCell>,
        l: &mut Locked<'_>,
        chosen: Vec<Arc<Worker>>,
        pushes: &mut Pushes,
    ) -> Placement {
        let st = &mut *l.st;
        for w in &chosen {
            w.load.inc_queued();
            pushes.push((w.clone(), Entry::new(st.key, st.seq, st.gen, cell.clone())));
        }
        let ids = chosen.iter().map(|w| w.id).collect();
        let Phase::Queued { holders, .. } = &mut st.phase else {
            unreachable!("assign is only called on a requeued task")
        };
        debug_assert!(holders.is_empty());
        *holders = chosen;
        Placement::Queued(ids)
    }

    /// Pushes copies, one lock per target queue. Copies for closed queues are handed to
    /// `push_failed`, which may place their tasks again; repeats until nothing is left.
    pub(crate) fn flush(&self, mut pushes: Pushes) {
        while !pushes.is_empty() {
            let mut failed = Pushes::new();
            if pushes.len() == 1 {
                let (w, entry) = pushes.pop().expect("one push");
                let mut q = w.queue.lock();
                if q.closed && !self.mutant(Mutant::PushIgnoresClosed) {
                    drop(q);
                    failed.push((w, entry));
                } else {
                    q.push(entry);
                }
            } else {
                for (w, entries) in group_by_worker(pushes) {
                    let mut q = w.queue.lock();
                    if q.closed && !self.mutant(Mutant::PushIgnoresClosed) {
                        drop(q);
                        failed.extend(entries.into_iter().map(|e| (w.clone(), e)));
                    } else {
                        entries.into_iter().for_each(|e| q.push(e));
                        let compacted = q.compact_if_sparse(w.load.queued());
                        drop(q);
                        self.counters
                            .stale_skipped
                            .fetch_add(compacted as u64, Ordering::Relaxed);
                    }
                }
            }
            pushes = Pushes::new();
            for (w, entry) in failed {
                self.push_failed(&w, entry, &mut pushes);
            }
        }
    }

    /// A copy could not be pushed because `worker` is leaving: drop it from the task's holders
    /// and, if it was the last, place the task afresh.
    fn push_failed(&self, worker: &Arc<Worker>, entry: Entry, pushes: &mut Pushes) {
        let gen = entry.gen();
        let cell = entry.cell;
        let mut l = cell.lock();
        if l.st.gen != gen {
            return;
        }
        let Phase::Queued { holders, .. } = &mut l.st.phase else {
            return;
        };
        let Some(pos) = holders.iter().position(|h| Arc::ptr_eq(h, worker)) else {
            return;
        };
        holders.swap_remove(pos);
        worker.load.dec_queued();
        if holders.is_empty() {
            l.requeue();
            self.place(&cell, &mut l, pushes);
            self.counters.redistributed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Dispatcher {
    /// Workers' heaps and running sets point at task cells, and cells point back at their
    /// holders and runner: empty every queue so those cycles do not outlive the dispatcher.
    fn drop(&mut self) {
        for w in self.registry.workers() {
            drop(w.queue.lock().close());
        }
    }
}

/// Groups pushes by target worker, keeping each worker's entries in order.
fn group_by_worker(pushes: Pushes) -> Vec<(Arc<Worker>, Vec<Entry>)> {
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

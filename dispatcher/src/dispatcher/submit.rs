//! Submission: `submit`, `submit_many`, `validate` and `seed` (start-up loading). A batch is
//! checked whole before any shared state changes; its cells are locked before their ids enter
//! the index, so nobody sees a half-made task.

use super::{Dispatcher, Pushes};
use crate::config::Mutant;
use crate::error::{Error, Result};
use crate::index::{Holders, Locked, Phase, TaskState};
use crate::queue::{order_key, RunningRecord};
use crate::registry::Worker;
use crate::sync::{Arc, Hasher, Ordering};
use crate::task::{SeedTask, TaskSpec};
use crate::TaskId;

/// What a new task does first.
enum Start {
    /// Seeded as running on its worker.
    Running,
    /// Built waiting (its `not_before`).
    Wait,
    /// Placed by the policy.
    Place,
}

impl Dispatcher {
    /// Submits one task. See [`Dispatcher::submit_many`].
    pub fn submit(&self, spec: TaskSpec) -> Result<()> {
        self.submit_many(std::iter::once(spec))
    }

    /// Submits a batch of tasks, all or nothing: if any spec is invalid or any id is taken
    /// (by a live task or twice in the batch), nothing is submitted. Each task is queued on its
    /// live candidates, or parked when it has none, or waits if it has a `not_before` (even
    /// one already past: the next [`release_due`](Self::release_due) queues it). Pushes are
    /// batched per worker.
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
    /// that must make a task durable before the dispatcher may hand it out. The class bound
    /// (`Limits::max_classes`) is not checked here, since a concurrent submission can take the
    /// last free class: such a caller checks it with [`has_class`](Self::has_class) and
    /// [`class_count`](Self::class_count) against its own limit, and builds the dispatcher with
    /// `max_classes` out of the way, as the coordinator does.
    pub fn validate(&self, spec: &TaskSpec) -> Result<()> {
        self.registry.check_class(&spec.group, &spec.tags)
    }

    /// Whether tasks of `group` with `tags` have a class already (submitting one creates none).
    pub fn has_class<S: AsRef<str>>(&self, group: &str, tags: &[S]) -> bool {
        self.registry.has_class(group, tags)
    }

    /// How many task classes (group and tag set pairs) exist; at most `Limits::max_classes`.
    pub fn class_count(&self) -> usize {
        self.registry.class_count()
    }

    /// Loads tasks at start-up (after the workers are registered): queued tasks are placed (or
    /// wait, with a `not_before`), running tasks stay on their worker if it is registered and are queued again (as a new
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
        // What each new task does first: run (seeded on its worker), wait, or be placed.
        let mut starts = Vec::with_capacity(prepared.len());
        for (spec, attempt, runner, class, enqueued) in prepared {
            let (start, phase) = match (runner, spec.not_before) {
                (Some(worker), _) => (Start::Running, Phase::Running { worker }),
                (None, Some(until)) => (Start::Wait, Phase::Waiting { until }),
                (None, None) => (
                    Start::Place,
                    Phase::Queued {
                        holders: Holders::None,
                        parked: false,
                    },
                ),
            };
            starts.push(start);
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
        for (mut l, start) in locked.into_iter().zip(starts) {
            match start {
                Start::Running => {
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
                }
                Start::Wait => self.count_waiting(&l, &mut pushes),
                Start::Place => self.place(&mut l, &mut pushes),
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
}

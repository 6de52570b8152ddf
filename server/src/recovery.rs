//! Restart recovery: rebuilds the dispatcher from the store.
//!
//! Order matters. Workers are registered *first*, then tasks are seeded, so every queued task
//! is placed on a live candidate (or parked only if none exists). Seeding before any worker is
//! registered would place nothing — the earlier design's bug. Running tasks stay assigned to
//! their worker (its lease decides later whether it is alive); a running task whose worker is
//! no longer registered is queued again, and the `Requeue` changes that record this are
//! returned for the caller to commit before serving.

use std::time::Duration;

use switchyard::{Dispatcher, SeedTask, TaskId, TaskSpec, WorkerId};

use crate::store::{Change, Recovery, Requeued, StoreError, TaskState};

/// What recovery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Workers registered.
    pub workers: usize,
    /// Queued tasks placed (or parked).
    pub queued: usize,
    /// Running tasks kept on their worker.
    pub running: usize,
    /// Changes the store must record: running tasks whose worker is gone, queued again.
    pub requeued: Vec<Change>,
}

/// Why recovery failed.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored state does not fit the dispatcher's configuration (for example a stored task
    /// with more tags than the configured limit).
    #[error("stored state rejected by the dispatcher: {0}")]
    Dispatcher(#[from] switchyard::Error),
}

/// Loads `state` (read from the store) into an empty `dispatcher`. `now_ms` is the current time in milliseconds since
/// the Unix epoch (it restores how long each task has waited, for aging).
pub fn recover(
    state: &Recovery,
    dispatcher: &Dispatcher,
    now_ms: i64,
) -> Result<Recovered, RecoverError> {
    for w in &state.workers {
        dispatcher.register(WorkerId(w.id), &w.groups, &w.tags)?;
    }
    let registered = |w: Option<u64>| w.is_some_and(|w| dispatcher.is_registered(WorkerId(w)));
    let mut requeued = Vec::new();
    let (mut queued, mut running) = (0, 0);
    let seeds: Vec<SeedTask> = state
        .tasks
        .iter()
        .map(|t| {
            let keeps_worker = t.state == TaskState::Running && registered(t.worker);
            if t.state == TaskState::Running && !keeps_worker {
                requeued.push(Change::Requeue {
                    task: t.id,
                    attempt: t.attempt,
                    worker: t.worker.unwrap_or_default(),
                    why: Requeued::WorkerGone,
                });
            }
            if keeps_worker {
                running += 1;
            } else {
                queued += 1;
            }
            let waited = Duration::from_millis(now_ms.saturating_sub(t.submitted_ms).max(0) as u64);
            SeedTask {
                spec: TaskSpec::new(TaskId(t.id), t.group.clone())
                    .tags(t.tags.iter().cloned())
                    .priority(t.priority)
                    .waited(waited),
                attempt: t.attempt,
                running_on: keeps_worker.then(|| WorkerId(t.worker.expect("running has a worker"))),
            }
        })
        .collect();
    dispatcher.seed(seeds)?;
    Ok(Recovered {
        workers: state.workers.len(),
        queued,
        running,
        requeued,
    })
}

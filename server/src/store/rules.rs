//! How a change that matched no row is judged: the contract's no-ops and refusals (see
//! [`Store`](super::Store)), written once for every backend.
//!
//! A backend applies each change as one guarded statement (`UPDATE … WHERE attempt < $n`,
//! an insert that skips an existing key). When the statement changed nothing, whether that is
//! success (a later decision already stands), a `Conflict` or `NotFound` depends only on the
//! change and on the task's state before it — which [`judge`] decides.

use super::{Change, StoreError, TaskState};

/// A task's state and attempt before a change (`None`: no such task).
pub(super) type Prior = Option<(TaskState, u32)>;

/// The outcome of `change`, whose statement changed `changed` rows. `prior` gives the task's
/// state before the change; it is called only when nothing changed and the change names a task.
pub(super) fn judge(
    change: &Change,
    changed: u64,
    prior: impl FnOnce(u64) -> Result<Prior, StoreError>,
) -> Result<(), StoreError> {
    if changed > 0 {
        return Ok(());
    }
    // What a change that names a task needs of it: whether a superseded or ended task
    // makes it a no-op, and what a refusal says it could not do.
    let (task, what) = match change {
        // Cancelled after the claim: nothing to record.
        Change::Assign { task, .. } => (*task, "assign it"),
        // Superseded or ended: a later decision stands.
        Change::Requeue { task, .. } | Change::Update { task, .. } => (*task, ""),
        Change::Finish { task, .. } | Change::Fail { task, .. } => (*task, "end that attempt"),
        Change::Cancel { task } => (*task, "cancel it"),
        other => return refusal(other),
    };
    match (prior(task)?, change) {
        (None, _) => Err(StoreError::NotFound(format!("task {task}"))),
        (Some(_), Change::Requeue { .. } | Change::Update { .. }) => Ok(()),
        (Some((TaskState::Cancelled, _)), Change::Assign { .. }) => Ok(()),
        (Some((state, attempt)), _) => Err(StoreError::Conflict(format!(
            "task {task} is {} (attempt {attempt}); cannot {what}",
            state.as_str()
        ))),
    }
}

/// The outcome of a change that names no task and changed nothing.
fn refusal(change: &Change) -> Result<(), StoreError> {
    match change {
        Change::Submit(t) => Err(StoreError::Conflict(format!("task {} exists", t.id))),
        Change::AddWorker(w) => Err(StoreError::Conflict(format!("worker {} exists", w.id))),
        Change::RemoveWorker { worker } => Err(StoreError::NotFound(format!("worker {worker}"))),
        Change::AddToken(t) => Err(StoreError::Conflict(format!("token {} exists", t.id))),
        Change::RevokeToken { id } => Err(StoreError::NotFound(format!("token {id}"))),
        Change::Remember { key, .. } => Err(StoreError::Conflict(format!(
            "idempotency key {:?} exists",
            key.key
        ))),
        Change::ForgetKeys { .. } => Ok(()),
        Change::Boot { boot } => Err(StoreError::Conflict(format!(
            "start {boot} is not after the last recorded start"
        ))),
        Change::Assign { .. }
        | Change::Requeue { .. }
        | Change::Update { .. }
        | Change::Finish { .. }
        | Change::Fail { .. }
        | Change::Cancel { .. } => unreachable!("judged with the task's state"),
    }
}

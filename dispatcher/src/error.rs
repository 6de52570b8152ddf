//! Typed errors. Every fallible operation checks its input before it changes any state, so an
//! `Err` always means "nothing happened".

use crate::{TaskId, WorkerId};

/// Why a dispatcher operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The worker is not registered (never was, or has left).
    #[error("unknown worker {0}")]
    UnknownWorker(WorkerId),
    /// A worker with this id is already registered.
    #[error("worker {0} is already registered")]
    DuplicateWorker(WorkerId),
    /// No live task has this id (never submitted, finished or cancelled).
    #[error("unknown task {0}")]
    UnknownTask(TaskId),
    /// A live task already has this id.
    #[error("task {0} already exists")]
    DuplicateTask(TaskId),
    /// A report names an attempt that is not the task's current assignment on this worker
    /// (it was redistributed, given back, cancelled or never assigned to this worker).
    #[error("task {task}: attempt {attempt} reported by worker {worker} is not current")]
    StaleAttempt {
        /// The task reported on.
        task: TaskId,
        /// The attempt the report named.
        attempt: u32,
        /// The worker that reported.
        worker: WorkerId,
    },
    /// The operation needs a queued task, but the task is running.
    #[error("task {0} is running, not queued")]
    NotQueued(TaskId),
    /// The input breaks a documented limit or is malformed; nothing was changed.
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

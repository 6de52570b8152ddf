//! The value types callers exchange with the dispatcher: what they submit, fetch and read back,
//! and what placement, registration and departure report.

use std::time::Duration;

use crate::{TaskId, WorkerId};

/// A task to submit. The payload is not here: it lives in the caller's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    /// Caller-chosen id, unique among live tasks.
    pub id: TaskId,
    /// The group whose workers may run the task.
    pub group: String,
    /// Tags a worker must all have to run the task.
    pub tags: Vec<String>,
    /// Higher runs first.
    pub priority: i32,
    /// How long the task has already waited (for aging across restarts); usually zero.
    pub waited: Duration,
    /// Not fetchable before this time, in the caller's clock (the `now` it passes to
    /// [`Dispatcher::release_due`](crate::Dispatcher::release_due)): the task waits, in no
    /// queue, until a release at or after it. `None`: fetchable at once.
    pub not_before: Option<u64>,
}

impl TaskSpec {
    /// A task in `group` with no tags and priority 0.
    pub fn new(id: impl Into<TaskId>, group: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            group: group.into(),
            tags: Vec::new(),
            priority: 0,
            waited: Duration::ZERO,
            not_before: None,
        }
    }

    /// Sets the tags.
    pub fn tags<I>(mut self, tags: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the priority.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Sets how long the task has already waited.
    pub fn waited(mut self, waited: Duration) -> Self {
        self.waited = waited;
        self
    }

    /// Makes the task wait until `time` (see [`TaskSpec::not_before`]).
    pub fn not_before(mut self, time: u64) -> Self {
        self.not_before = Some(time);
        self
    }
}

/// A task restored at start-up: its spec, the attempts it already had, and the worker it was
/// running on, if any (it stays assigned there when that worker is registered, and is queued
/// again as a new attempt when it is not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedTask {
    /// The task.
    pub spec: TaskSpec,
    /// Attempts so far (the running attempt, if `running_on` is set).
    pub attempt: u32,
    /// The worker running it.
    pub running_on: Option<WorkerId>,
}

/// A fetched task: the worker runs it and reports with this attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// The task.
    pub task: TaskId,
    /// Fences reports: only this attempt may complete or give back the task.
    pub attempt: u32,
    /// The task's priority.
    pub priority: i32,
}

/// Where a live task is. Also what `give_back`, `retry`, `update` and a departure report about
/// where they put a task (`Queued`, `Parked` or `Waiting`, never `Running`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskStatus {
    /// Queued on these workers (fanout: every live candidate; balanced: one).
    Queued(Vec<WorkerId>),
    /// Queued with no live candidate; placed when a matching worker registers.
    Parked,
    /// Running on this worker as attempt `TaskInfo::attempt`.
    Running(WorkerId),
    /// Not fetchable before this time (the caller's clock); then queued or parked.
    Waiting(u64),
}

/// A snapshot of a live task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    /// The task.
    pub id: TaskId,
    /// Where it is.
    pub status: TaskStatus,
    /// Assignments so far.
    pub attempt: u32,
    /// Its priority.
    pub priority: i32,
    /// Its group.
    pub group: String,
    /// Its tags, sorted.
    pub tags: Vec<String>,
}

/// What `cancel` removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// The task was queued or parked; no worker ever gets it.
    Queued,
    /// The task was running; the worker's report for this attempt will be refused.
    Running {
        /// The worker running it.
        worker: WorkerId,
        /// The attempt that was running.
        attempt: u32,
    },
}

/// What a departing worker was doing with a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Was {
    /// It held a queued copy.
    Queued,
    /// It was running this attempt.
    Running(u32),
}

/// What happened to one task of a departing worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relocation {
    /// The task.
    pub task: TaskId,
    /// What the departed worker had.
    pub was: Was,
    /// Where the task is now (fanout: the other holders that still have it).
    pub now: TaskStatus,
}

/// The result of `unregister`: every task the worker held or ran, and where it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Departure {
    /// The worker that left.
    pub worker: WorkerId,
    /// One entry per task it held or ran.
    pub tasks: Vec<Relocation>,
}

/// The result of `register`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Registration {
    /// Fanout: queued tasks the new worker can fetch from now on (its classes' tasks).
    pub backfilled: usize,
    /// Parked tasks placed now that a candidate exists.
    pub unparked: usize,
}

//! The durable store: what the coordinator must not forget, behind a trait so the embedded
//! SQLite default ([`SqliteStore`]) and PostgreSQL ([`PgStore`]) are interchangeable. Both
//! apply each change as one guarded statement; what a statement that changed nothing means is
//! decided once, in `rules`.
//!
//! The dispatcher decides (placement, claims, fencing); the store records each decision as a
//! [`Change`]. Changes reach the store only through the group-commit [`Writer`](crate::writer),
//! and a caller is answered only after its changes are durable: a submission is acknowledged,
//! an assignment leaves in a fetch reply, a report is confirmed — each after its commit.
//!
//! Changes that depend on an assignment are fenced by attempt in the store too, and the highest
//! attempt wins, so commits that reach the store out of order end in the same state (the
//! contract is on [`Store`]). A report (`Finish`/`Fail`) or assignment of a superseded attempt is refused
//! with [`StoreError::Conflict`] and nothing is written; a superseded `Requeue` is a no-op. The
//! dispatcher already fences; the store's check keeps a bug or a race between them from
//! corrupting durable state.
//!
//! Besides tasks, workers and tokens, a store keeps what makes retries safe and restarts
//! ordered:
//! - **ended attempts** ([`AttemptRecord`]): who ran each attempt and how it ended (the first
//!   end recorded for an attempt stands), so a retried report is recognised;
//! - **idempotency keys** ([`KeyRecord`]), committed atomically with the submission they name;
//! - **the start count** (`Change::Boot`), which makes delivery ids grow across restarts.
//!
//! One coordinator owns a SQLite store at a time: it locks its data directory.

mod handle;
pub mod leases;
mod postgres;
mod rules;
mod sqlite;

pub use handle::StoreHandle;
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use serde::{Deserialize, Serialize};

/// Where a stored task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for a worker (possibly parked).
    Queued,
    /// Assigned to `TaskRecord::worker` as attempt `TaskRecord::attempt`.
    Running,
    /// Reported finished.
    Finished,
    /// Reported failed.
    Failed,
    /// Cancelled by a user.
    Cancelled,
}

impl TaskState {
    /// Its name, as in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Finished => "finished",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => TaskState::Queued,
            "running" => TaskState::Running,
            "finished" => TaskState::Finished,
            "failed" => TaskState::Failed,
            "cancelled" => TaskState::Cancelled,
            _ => return None,
        })
    }

    /// Whether the task has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Finished | TaskState::Failed | TaskState::Cancelled
        )
    }
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Its id (assigned by the coordinator).
    pub id: u64,
    /// Its group.
    pub group: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// Higher runs first.
    pub priority: i32,
    /// The opaque payload handed to the worker.
    pub payload: Vec<u8>,
    /// Where it is.
    pub state: TaskState,
    /// Assignments so far (the running attempt while running).
    pub attempt: u32,
    /// The worker running it, while running.
    pub worker: Option<u64>,
    /// The reported result (finished) or message (failed).
    pub outcome: Option<String>,
    /// When it was submitted, in milliseconds since the Unix epoch (restores aging on restart).
    pub submitted_ms: i64,
}

/// A worker as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Its id (assigned by the coordinator).
    pub id: u64,
    /// Groups it serves.
    pub groups: Vec<String>,
    /// Its tags.
    pub tags: Vec<String>,
    /// A hash of its bearer token (the token itself is never stored).
    pub token_hash: String,
}

/// What a user's bearer token may do (a worker's token lives on its [`WorkerRecord`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, including the admin routes.
    Admin,
    /// Submit and manage tasks of its groups, and register workers that serve only them.
    Submitter,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Submitter => "submitter",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "admin" => Role::Admin,
            "submitter" => Role::Submitter,
            _ => return None,
        })
    }
}

/// A user's bearer token. Only its hash is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// The token's id (for listing and revoking; not a secret).
    pub id: u64,
    /// Lower-case hex SHA-256 of the token.
    pub hash: String,
    /// What it may do.
    pub role: Role,
    /// The groups a submitter token may use (empty for an admin token).
    pub groups: Vec<String>,
    /// When it was created, in Unix milliseconds.
    pub created_ms: i64,
}

/// One durable state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new queued task.
    Submit(TaskRecord),
    /// The task is now running `attempt` on `worker`.
    Assign {
        /// The task.
        task: u64,
        /// The worker.
        worker: u64,
        /// The new attempt.
        attempt: u32,
    },
    /// Running `attempt` goes back to queued: the next fetch is a new attempt.
    Requeue {
        /// The task.
        task: u64,
        /// The attempt that was running.
        attempt: u32,
        /// The worker that ran it.
        worker: u64,
        /// Why the attempt ended.
        why: Requeued,
    },
    /// Running `attempt` finished.
    Finish {
        /// The task.
        task: u64,
        /// The attempt that was running.
        attempt: u32,
        /// The reported result.
        result: Option<String>,
    },
    /// Running `attempt` failed.
    Fail {
        /// The task.
        task: u64,
        /// The attempt that was running.
        attempt: u32,
        /// The reported message.
        message: String,
    },
    /// A queued or running task is cancelled.
    Cancel {
        /// The task.
        task: u64,
    },
    /// A queued task's priority and/or tags change.
    Update {
        /// The task.
        task: u64,
        /// The new priority, if it changes.
        priority: Option<i32>,
        /// The new tags, if they change.
        tags: Option<Vec<String>>,
    },
    /// A worker registered.
    AddWorker(WorkerRecord),
    /// A worker left or was declared dead.
    RemoveWorker {
        /// The worker.
        worker: u64,
    },
    /// A user token was created.
    AddToken(TokenRecord),
    /// A user token was revoked (`NotFound` if it does not exist or is already revoked).
    RevokeToken {
        /// The token's id.
        id: u64,
    },
    /// A submission's idempotency key, committed with the submission it names. It replaces a
    /// record of the same key created before `expired_before_ms` (Unix ms); a younger one is a
    /// `Conflict`, which rolls the submission back with it.
    Remember {
        /// The key and what it names.
        key: KeyRecord,
        /// Records of the key older than this have expired.
        expired_before_ms: i64,
    },
    /// Idempotency keys created before `before_ms` are forgotten.
    ForgetKeys {
        /// Unix milliseconds.
        before_ms: i64,
    },
    /// A coordinator started on this store: the number of this start (1, 2, …), which must
    /// exceed every earlier one (`Conflict` otherwise).
    Boot {
        /// The start's number.
        boot: u64,
    },
}

/// Why a running attempt went back to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Requeued {
    /// The worker gave it back unfinished.
    GivenBack,
    /// The worker left, was removed, or its lease expired.
    WorkerGone,
    /// The worker said it does not hold it (a fetch reply it never received).
    NotHeld,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptEnd {
    /// Reported finished.
    Finished,
    /// Reported failed.
    Failed,
    /// Queued again, for this reason.
    Requeued(Requeued),
    /// The task was cancelled while this attempt ran.
    Cancelled,
}

impl AttemptEnd {
    /// Its name, as stored and reported.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptEnd::Finished => "finished",
            AttemptEnd::Failed => "failed",
            AttemptEnd::Requeued(Requeued::GivenBack) => "given_back",
            AttemptEnd::Requeued(Requeued::WorkerGone) => "worker_gone",
            AttemptEnd::Requeued(Requeued::NotHeld) => "not_held",
            AttemptEnd::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "finished" => AttemptEnd::Finished,
            "failed" => AttemptEnd::Failed,
            "given_back" => AttemptEnd::Requeued(Requeued::GivenBack),
            "worker_gone" => AttemptEnd::Requeued(Requeued::WorkerGone),
            "not_held" => AttemptEnd::Requeued(Requeued::NotHeld),
            "cancelled" => AttemptEnd::Cancelled,
            _ => return None,
        })
    }
}

/// One ended assignment of a task, as stored: who ran it and how it ended (the running
/// attempt is the task's own `attempt` and `worker`). Lets a retried report be recognised (the
/// same report of the same attempt answers success, not a refusal).
///
/// An attempt that ends its task (finished or failed by a report) is recorded on the task's
/// own row (`state`, `attempt`, `worker`, `outcome`), not as a row of its own: it is the last
/// attempt, so the task row says all of it, and a drain writes one row per task, not two.
/// Every other end (requeued, cancelled while running) is a row of its own. Either way
/// [`Store::attempt`] reads it back the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// The task.
    pub task: u64,
    /// The attempt.
    pub attempt: u32,
    /// The worker it was assigned to.
    pub worker: u64,
    /// How it ended (`None` only for a value a newer version wrote).
    pub ended: Option<AttemptEnd>,
    /// The reported result (finished) or message (failed).
    pub outcome: Option<String>,
}

/// A submission's idempotency key: a resubmission with the same key (by the same token)
/// returns `ids` and creates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The id of the token that submitted (keys of different tokens never meet).
    pub scope: u64,
    /// The client's key.
    pub key: String,
    /// A digest of the submission's content, to tell a retry from a key reused for another
    /// submission.
    pub fingerprint: String,
    /// The ids the submission created, in order.
    pub ids: Vec<u64>,
    /// When it was submitted, in Unix milliseconds.
    pub created_ms: i64,
}

/// What the coordinator reloads on start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Registered workers.
    pub workers: Vec<WorkerRecord>,
    /// Live tasks (queued and running), in submission order.
    pub tasks: Vec<TaskRecord>,
    /// The next free task id (above every stored one; a reservation may be higher).
    pub next_task_id: u64,
    /// The next free worker id.
    pub next_worker_id: u64,
    /// Workers that left or were declared dead: their tokens still identify them, so their
    /// late requests are told to register again (410) rather than refused as strangers (401).
    pub removed_workers: Vec<WorkerRecord>,
    /// User tokens not revoked.
    pub tokens: Vec<TokenRecord>,
    /// The next free token id.
    pub next_token_id: u64,
    /// The number of the latest start recorded (`Change::Boot`); 0 for a new store.
    pub boot: u64,
}

/// Why the store refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The change names a task or worker the store does not have.
    #[error("not found: {0}")]
    NotFound(String),
    /// The change does not fit the stored state (a duplicate id, or a fenced change whose
    /// attempt is not the running one). Nothing was written.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database failed (I/O, corruption, a full disk).
    #[error("storage failure: {0}")]
    Backend(String),
    /// Another coordinator owns the store (its data directory is locked).
    #[error("{0}")]
    Locked(String),
    /// The batch writes for a group whose lease this coordinator no longer holds (another
    /// coordinator took it, or it expired). Nothing was written.
    #[error("fenced: {0}")]
    Fenced(String),
}

/// Which tasks `Store::list` returns: those with an id above `after`, in id order, optionally
/// of one state and one group, at most `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFilter {
    /// Only tasks in this state.
    pub state: Option<TaskState>,
    /// Only tasks of this group.
    pub group: Option<String>,
    /// Only tasks of these groups (a submitter's scope); `None` for any group.
    pub within: Option<Vec<String>>,
    /// Only ids above this (the cursor of the previous page; 0 for the first).
    pub after: u64,
    /// At most this many.
    pub limit: usize,
}

/// A durable store: the contract every backend honours. The conformance suite
/// (`server/tests/store.rs`) checks it against each backend, unchanged.
///
/// # Batches
/// `apply` is called by one writer at a time. It applies a batch of changes in order,
/// atomically (all or none) and durably before it returns; a change that fails
/// (`NotFound`, `Conflict`) rolls back the whole batch. Reads may run concurrently with it.
///
/// # Attempts order the changes of a task
/// Commits from different requests can reach the store in either order (a fetch's `Assign` and
/// a departure's `Requeue` of the same task, say). Each change names the attempt it establishes,
/// and the highest attempt wins: `Assign(a)` applies over any lower attempt, `Requeue(a)` over a
/// lower attempt or over running `a`, and `Finish`/`Fail(a)` only over running `a`. So the final
/// state is the same whatever the order:
/// - `Finish`/`Fail` of a superseded attempt is a `Conflict` (a stale report);
/// - `Requeue` of a superseded attempt, or of an ended task, changes the task not at all and
///   succeeds: a later decision already stands. A departure's batch (the worker's removal and
///   its requeues) must not fail because another worker's assignment committed first;
/// - `Assign` of a cancelled task changes nothing and succeeds (the dispatcher claimed it before
///   the cancel, whose commit came first); `Assign` of a superseded attempt is a `Conflict`;
/// - `Update` (decided while the task was queued) applies to a queued or running task, and is a
///   no-op once it has ended: a fetch's `Assign` or a report may commit before it.
///
/// # Attempt ends
/// The first end recorded for an attempt stands, and is recorded by the change that ends it:
/// `Finish`/`Fail` (with the outcome), `Cancel` of a running task, and `Requeue` (with its
/// worker and reason) even when the requeue is superseded. [`Store::attempt`] reads it; a
/// running attempt has none.
///
/// # Keys, starts, tokens, workers
/// - `Remember` inserts an idempotency key, replacing only a record of it created before
///   `expired_before_ms`; a live one is a `Conflict`. `ForgetKeys` deletes old ones.
/// - `Boot` records a start number that must exceed every earlier one (`Conflict` otherwise).
/// - Ids are unique: a `Submit`, `AddWorker` or `AddToken` of an existing id is a `Conflict`.
///   Removed workers and revoked tokens are kept (marked), so their ids are never reused.
///
/// # Ids
/// Ids come from the store, never from a coordinator's own counter: [`Store::reserve`] hands
/// out ranges no one else gets, so coordinators sharing a store never collide.
///
/// # Recovery
/// [`Store::recover`] returns the registered workers, the live (queued and running) tasks in id
/// order, the removed workers, the tokens in force, the next free ids, and the last start.
pub trait Store: Send + Sync + 'static {
    /// Applies `changes` in order, atomically (all or none) and durably.
    fn apply(&self, changes: &[Change]) -> Result<(), StoreError>;
    /// Everything the coordinator needs to restart.
    fn recover(&self) -> Result<Recovery, StoreError> {
        self.recover_groups(None)
    }
    /// What a coordinator needs to restart for `groups` only (`None`: all): the live tasks of
    /// those groups, the workers (registered and removed) that serve at least one of them, and,
    /// as for a whole recovery, every token in force, the next ids and the last start.
    fn recover_groups(&self, groups: Option<&[String]>) -> Result<Recovery, StoreError>;
    /// One task, live or ended.
    fn task(&self, id: u64) -> Result<Option<TaskRecord>, StoreError>;
    /// The tasks among `ids` that exist, in any order (one read for a fetch's assignments).
    fn tasks(&self, ids: &[u64]) -> Result<Vec<TaskRecord>, StoreError>;
    /// A page of tasks (see [`ListFilter`]), without their payloads and outcomes (empty and
    /// `None`), which can be large: read one task for those.
    fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>, StoreError>;
    /// One ended attempt of a task (`None` while it runs, or if it never existed).
    fn attempt(&self, task: u64, attempt: u32) -> Result<Option<AttemptRecord>, StoreError>;
    /// The submission remembered under `key` for the token `scope`.
    fn key(&self, scope: u64, key: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// Reserves `n` fresh ids of `kind`: a range above every id of that kind stored or
    /// reserved before, by this coordinator or any other sharing the store. Durable and atomic
    /// on its own (not a `Change`: it commits at once, outside the writer's batches).
    fn reserve(&self, kind: IdKind, n: u64) -> Result<std::ops::Range<u64>, StoreError>;
}

/// What an id names: each kind has its own sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    /// Task ids.
    Task,
    /// Worker ids.
    Worker,
    /// User token ids.
    Token,
}

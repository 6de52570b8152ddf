//! Task routes: submit (one or a batch), get, list, update, cancel.
//!
//! An admin sees every task; a submitter only the tasks of its groups. A task of another group
//! answers 404, as if it did not exist.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use switchyard::{TaskId, TaskSpec};
use utoipa::{IntoParams, ToSchema};

use super::{created, ok, Reply};
use crate::app::{now_ms, App};
use crate::auth::{self, User};
use crate::delivery::raw_payload;
use crate::error::{ApiError, ErrorBody, ErrorKind, JsonBody, PathParams, QueryParams};
use crate::operations::Keyed;
use crate::store::{ListFilter, TaskRecord, TaskState};
use crate::sync::Arc;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SubmitBody {
    /// The group whose workers may run it.
    group: String,
    /// Only workers holding all these tags are candidates.
    #[serde(default)]
    tags: Vec<String>,
    /// Higher runs first.
    #[serde(default)]
    priority: i32,
    /// Any JSON (at most the server's `--max-payload` bytes), kept and handed to the worker
    /// byte for byte as sent.
    #[serde(default)]
    #[schema(value_type = Object)]
    payload: Option<Box<RawValue>>,
    /// A key of the client's choosing (1 to 128 visible ASCII characters) that makes a retry
    /// safe: a resubmission with the same key by the same token returns the first one's id
    /// and creates nothing; the same key with a different task is refused (409). Remembered
    /// for the server's `--idempotency-window` (24 hours by default).
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Submitted {
    id: u64,
    /// True when an earlier submission with the same idempotency key is answered: nothing was
    /// created now.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    replayed: bool,
}

/// A submission's payload bytes: the JSON text as sent (`null` when absent).
fn payload_bytes(body: &SubmitBody) -> &[u8] {
    body.payload
        .as_deref()
        .map_or(b"null".as_slice(), |p| p.get().as_bytes())
}

/// Validates a submission and names it `id`: the spec for the dispatcher and the record for the
/// store. Nothing is written.
fn prepare(
    app: &App,
    user: &User,
    body: &SubmitBody,
    id: u64,
) -> Result<(TaskSpec, TaskRecord), ApiError> {
    user.require_group(&body.group)?;
    let payload = payload_bytes(body);
    if payload.len() > app.limits.max_payload {
        return Err(ApiError::bad_request(format!(
            "payload is {} bytes; the limit is {}",
            payload.len(),
            app.limits.max_payload
        )));
    }
    app.check_task(Some(&body.group), &body.tags)?;
    let spec = TaskSpec::new(id, body.group.clone())
        .tags(body.tags.iter().cloned())
        .priority(body.priority);
    app.dispatcher.validate(&spec)?;
    let record = TaskRecord {
        id,
        group: body.group.clone(),
        tags: body.tags.clone(),
        priority: body.priority,
        payload: payload.to_vec(),
        state: TaskState::Queued,
        attempt: 0,
        worker: None,
        outcome: None,
        submitted_ms: now_ms(),
    };
    Ok((spec, record))
}

/// What a keyed submission is checked against: a digest of the tasks' content.
fn fingerprint<'a>(tasks: impl IntoIterator<Item = &'a SubmitBody>) -> String {
    let mut text = Vec::new();
    for t in tasks {
        let fields = (&t.group, &t.tags, t.priority, payload_bytes(t));
        // Serialising plain strings, numbers and bytes cannot fail.
        serde_json::to_writer(&mut text, &fields).expect("serialisable");
        text.push(b'\n');
    }
    auth::hash_bytes(&text)
}

/// Checks a client's idempotency key.
fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > 128 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::bad_request(
            "idempotency_key must be 1 to 128 visible ASCII characters",
        ));
    }
    Ok(())
}

/// The ids of an earlier submission under the caller's `key` (checked before anything else, so
/// a retry is answered even if the rules for new input changed since).
async fn replay(
    app: &App,
    user: &User,
    keyed: &Option<Keyed>,
) -> Result<Option<Vec<u64>>, ApiError> {
    match keyed {
        Some(k) => {
            app.remembered(user.token_id(), &k.key, &k.fingerprint)
                .await
        }
        None => Ok(None),
    }
}

/// Submits one task. Acknowledged once durable.
#[utoipa::path(post, path = "/v1/tasks", tag = "tasks", request_body = SubmitBody,
    responses(
        (status = 201, body = Submitted),
        (status = 200, description = "an earlier submission with this idempotency key", body = Submitted),
        (status = 400, description = "invalid group, tags, payload or key", body = ErrorBody),
        (status = 403, description = "not one of the token's groups", body = ErrorBody),
        (status = 409, description = "the idempotency key was used for a different task", body = ErrorBody),
        (status = 421, description = "with `serve --shared`: the group is served by another coordinator (`misdirected`, with `owners`: send it there)", body = ErrorBody),
        (status = 413, description = "body over the limit", body = ErrorBody)))]
pub(crate) async fn submit(
    State(app): State<Arc<App>>,
    user: User,
    JsonBody(body): JsonBody<SubmitBody>,
) -> Reply<Submitted> {
    if let Some(k) = &body.idempotency_key {
        check_key(k)?;
    }
    let key = body.idempotency_key.clone().map(|key| Keyed {
        key,
        fingerprint: fingerprint([&body]),
    });
    if let Some(ids) = replay(&app, &user, &key).await? {
        return ok(Submitted {
            id: ids.first().copied().unwrap_or_default(),
            replayed: true,
        });
    }
    let id = app.ids.tasks(1).await?.start;
    let (spec, record) = prepare(&app, &user, &body, id)?;
    let id = record.id;
    match app
        .submit(user.token_id(), key, vec![(spec, record)])
        .await?
    {
        Some(ids) => ok(Submitted {
            id: ids.first().copied().unwrap_or_default(),
            replayed: true,
        }),
        None => created(Submitted {
            id,
            replayed: false,
        }),
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchBody {
    /// 1 to the server's `--max-batch` tasks (without keys of their own).
    tasks: Vec<SubmitBody>,
    /// Makes a retry of the whole batch safe, as a task's key does (see `POST /v1/tasks`).
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct SubmittedBatch {
    /// The ids, in the order of the submitted tasks.
    ids: Vec<u64>,
    /// True when an earlier batch with the same idempotency key is answered.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    replayed: bool,
}

/// Submits a batch, all or nothing: every task is validated before any is written (the error
/// names the offending task), all are committed in one transaction, then handed to the
/// dispatcher in one batch.
#[utoipa::path(post, path = "/v1/tasks/batch", tag = "tasks", request_body = BatchBody,
    responses(
        (status = 201, body = SubmittedBatch),
        (status = 200, description = "an earlier batch with this idempotency key", body = SubmittedBatch),
        (status = 400, description = "a task is invalid, or the batch is empty or too large", body = ErrorBody),
        (status = 409, description = "the idempotency key was used for a different batch", body = ErrorBody),
        (status = 421, description = "with `serve --shared`: some of the groups are served by another coordinator (`misdirected`, with `owners`: send it there)", body = ErrorBody),
        (status = 413, body = ErrorBody)))]
pub(crate) async fn submit_batch(
    State(app): State<Arc<App>>,
    user: User,
    JsonBody(body): JsonBody<BatchBody>,
) -> Reply<SubmittedBatch> {
    if body.tasks.is_empty() || body.tasks.len() > app.limits.max_batch {
        return Err(ApiError::bad_request(format!(
            "a batch holds 1..={} tasks",
            app.limits.max_batch
        )));
    }
    if let Some(k) = &body.idempotency_key {
        check_key(k)?;
    }
    let key = body.idempotency_key.clone().map(|key| Keyed {
        key,
        fingerprint: fingerprint(&body.tasks),
    });
    if let Some(ids) = replay(&app, &user, &key).await? {
        return ok(SubmittedBatch {
            ids,
            replayed: true,
        });
    }
    let mut tasks = Vec::with_capacity(body.tasks.len());
    let first = app.ids.tasks(body.tasks.len() as u64).await?.start;
    for (i, task) in body.tasks.iter().enumerate() {
        if task.idempotency_key.is_some() {
            return Err(ApiError::bad_request(
                "a task in a batch takes no idempotency_key: key the batch",
            )
            .in_batch(i));
        }
        let id = first + i as u64;
        tasks.push(prepare(&app, &user, task, id).map_err(|e| e.in_batch(i))?);
    }
    let ids = tasks.iter().map(|(spec, _)| spec.id.0).collect();
    match app.submit(user.token_id(), key, tasks).await? {
        Some(ids) => ok(SubmittedBatch {
            ids,
            replayed: true,
        }),
        None => created(SubmittedBatch {
            ids,
            replayed: false,
        }),
    }
}

/// Where a task is, as the API reports it. The states are disjoint: a task is in exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Status {
    /// Waiting on at least one live candidate.
    Queued,
    /// Waiting for a candidate worker to register (queued with no live candidate).
    Parked,
    /// Assigned to `worker` as `attempt`.
    Running,
    /// Reported finished.
    Finished,
    /// Reported failed.
    Failed,
    /// Cancelled by a user.
    Cancelled,
}

impl Status {
    /// The stored state that holds tasks in this one.
    fn stored(self) -> TaskState {
        match self {
            Status::Queued | Status::Parked => TaskState::Queued,
            Status::Running => TaskState::Running,
            Status::Finished => TaskState::Finished,
            Status::Failed => TaskState::Failed,
            Status::Cancelled => TaskState::Cancelled,
        }
    }

    /// The state of a stored task: a queued one is parked if the dispatcher has it parked.
    fn of(app: &App, t: &TaskRecord) -> Self {
        match t.state {
            TaskState::Queued => match app.dispatcher.get(TaskId(t.id)).map(|i| i.status) {
                Some(switchyard::TaskStatus::Parked) => Status::Parked,
                _ => Status::Queued,
            },
            TaskState::Running => Status::Running,
            TaskState::Finished => Status::Finished,
            TaskState::Failed => Status::Failed,
            TaskState::Cancelled => Status::Cancelled,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub(crate) struct TaskBody {
    id: u64,
    group: String,
    tags: Vec<String>,
    priority: i32,
    /// The payload, byte for byte as submitted.
    #[schema(value_type = Object)]
    payload: Box<RawValue>,
    state: Status,
    /// The latest attempt (0 before the first fetch).
    attempt: u32,
    /// The worker running it, or that finished or failed it (none while queued).
    worker: Option<u64>,
    /// The result (finished) or message (failed).
    outcome: Option<String>,
    /// When it was submitted, in Unix milliseconds.
    submitted_ms: i64,
}

impl TaskBody {
    fn new(t: TaskRecord, state: Status) -> Self {
        Self {
            state,
            payload: raw_payload(t.payload),
            id: t.id,
            group: t.group,
            tags: t.tags,
            priority: t.priority,
            attempt: t.attempt,
            worker: t.worker,
            outcome: t.outcome,
            submitted_ms: t.submitted_ms,
        }
    }
}

/// The task, if the caller may see it; otherwise "unknown task" (404), as if it did not exist.
async fn visible(app: &App, user: &User, task: u64) -> Result<TaskRecord, ApiError> {
    match app.store.task(task).await? {
        Some(t) if user.may_use(&t.group) => Ok(t),
        _ => Err(switchyard::Error::UnknownTask(TaskId(task)).into()),
    }
}

/// The refusal of a change to a task the dispatcher does not hold: 409 with its state if it
/// ended (it is still there to read), else `refusal` (404). The store is read once the
/// decisions before the refusal are durable.
async fn not_live(app: &App, user: &User, task: u64, refusal: ApiError) -> ApiError {
    let refusal = app.durable_refusal(refusal).await;
    if refusal.status() != StatusCode::NOT_FOUND {
        return refusal;
    }
    match app.store.task(task).await {
        Ok(Some(t)) if user.may_use(&t.group) && t.state.is_final() => ApiError::ended(
            ErrorKind::TaskEnded,
            format!("task {task} has ended: it is {}", t.state.as_str()),
            t.state,
        ),
        Ok(_) => refusal,
        Err(e) => e.into(),
    }
}

/// Checks that the caller may change `task`. An admin may change any (the dispatcher decides
/// whether it exists), so only a submitter pays for the read.
async fn may_change(app: &App, user: &User, task: u64) -> Result<(), ApiError> {
    match user.scope() {
        None => Ok(()),
        Some(_) => visible(app, user, task).await.map(drop),
    }
}

/// One task: its state, attempt, worker and outcome.
#[utoipa::path(get, path = "/v1/tasks/{task}", tag = "tasks",
    params(("task" = u64, Path, description = "the task")),
    responses(
        (status = 200, body = TaskBody),
        (status = 404, description = "no such task in the caller's groups", body = ErrorBody)))]
pub(crate) async fn get(
    State(app): State<Arc<App>>,
    user: User,
    PathParams(task): PathParams<u64>,
) -> Reply<TaskBody> {
    user.scope();
    let t = visible(&app, &user, task).await?;
    let state = Status::of(&app, &t);
    ok(TaskBody::new(t, state))
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Cancelled {
    task: u64,
    /// The worker it was running on, if it was running: the worker is told on its next fetch
    /// or heartbeat (`revoked`), and its report gets 409 `cancelled`.
    was_running_on: Option<u64>,
}

/// Cancels a queued or running task.
#[utoipa::path(delete, path = "/v1/tasks/{task}", tag = "tasks",
    params(("task" = u64, Path, description = "the task")),
    responses(
        (status = 200, body = Cancelled),
        (status = 404, description = "no such task in the caller's groups", body = ErrorBody),
        (status = 421, description = "with `serve --shared`: the task is served by another coordinator (`misdirected`, with `owners`: send it there)", body = ErrorBody),
        (status = 409, description = "the task has ended (`task_ended`, with its `state`)", body = ErrorBody)))]
pub(crate) async fn cancel(
    State(app): State<Arc<App>>,
    user: User,
    PathParams(task): PathParams<u64>,
) -> Reply<Cancelled> {
    may_change(&app, &user, task).await?;
    let outcome = match app.cancel(task).await {
        Err(e) if e.kind() == ErrorKind::UnknownTask => {
            return Err(not_live(&app, &user, task, e).await)
        }
        outcome => outcome?,
    };
    let was_running_on = match outcome {
        switchyard::Cancelled::Running { worker, .. } => Some(worker.0),
        switchyard::Cancelled::Queued => None,
    };
    ok(Cancelled {
        task,
        was_running_on,
    })
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only tasks in this state.
    state: Option<Status>,
    /// Only tasks of this group.
    group: Option<String>,
    /// The `next` of the previous page (0 or absent for the first).
    #[serde(default)]
    after: u64,
    /// Page size, 1..=1000 (100 by default).
    #[serde(default = "hundred")]
    limit: usize,
}

fn hundred() -> usize {
    100
}

/// Most tasks one list page may return.
const MAX_PAGE: usize = 1000;

/// Most store reads one list page makes when rows are skipped (see `list`).
const SCAN_PAGES: usize = 8;

/// A task in a list: no payload or outcome (read the task for those).
#[derive(Serialize, ToSchema)]
pub(crate) struct TaskSummary {
    id: u64,
    group: String,
    tags: Vec<String>,
    priority: i32,
    state: Status,
    attempt: u32,
    worker: Option<u64>,
    submitted_ms: i64,
}

impl TaskSummary {
    fn new(t: TaskRecord, state: Status) -> Self {
        Self {
            state,
            id: t.id,
            group: t.group,
            tags: t.tags,
            priority: t.priority,
            attempt: t.attempt,
            worker: t.worker,
            submitted_ms: t.submitted_ms,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Page {
    /// The tasks, without payloads or outcomes (bounded pages whatever the payload sizes).
    tasks: Vec<TaskSummary>,
    /// The `after` of the next page; absent at the end. A page may hold fewer than `limit`
    /// tasks and still have a `next` (filtering by `queued` or `parked` skips rows).
    next: Option<u64>,
}

/// Lists tasks in id order, a page at a time; a submitter sees only its groups.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks", params(ListQuery),
    responses(
        (status = 200, body = Page),
        (status = 400, description = "a bad state, group or limit", body = ErrorBody),
        (status = 403, description = "a group outside the token's scope", body = ErrorBody)))]
pub(crate) async fn list(
    State(app): State<Arc<App>>,
    user: User,
    QueryParams(q): QueryParams<ListQuery>,
) -> Reply<Page> {
    let scope = user.scope();
    if let Some(g) = &q.group {
        user.require_group(g)?;
    }
    if q.limit == 0 || q.limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit must be in 1..={MAX_PAGE}"
        )));
    }
    if q.after > i64::MAX as u64 {
        // No task id is that high: the page after it is empty.
        return ok(Page {
            tasks: Vec::new(),
            next: None,
        });
    }
    let mut filter = ListFilter {
        state: q.state.map(Status::stored),
        group: q.group,
        within: scope.map(<[String]>::to_vec),
        after: q.after,
        limit: q.limit,
    };
    let (want, limit) = (q.state, q.limit);
    // Queued and parked share a stored state: rows of the other are skipped, so a page may take
    // several reads. At most SCAN_PAGES of them: then the page ends early, with `next` to go on
    // from.
    let mut tasks = Vec::with_capacity(limit);
    let mut next = Some(filter.after);
    'pages: for _ in 0..SCAN_PAGES {
        let rows = app.store.list(filter.clone()).await?;
        let more = rows.len() == filter.limit;
        for t in rows {
            filter.after = t.id;
            next = Some(t.id);
            let state = Status::of(&app, &t);
            if want.is_none_or(|w| w == state) {
                tasks.push(TaskSummary::new(t, state));
                if tasks.len() == limit {
                    break 'pages;
                }
            }
        }
        if !more {
            next = None;
            break;
        }
    }
    ok(Page { tasks, next })
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateBody {
    /// The new priority.
    priority: Option<i32>,
    /// The new tags (the task is placed again among the new candidates).
    tags: Option<Vec<String>>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Updated {
    task: u64,
    /// Whether no worker can take it now (it waits for one to register).
    parked: bool,
}

/// Changes the priority and/or tags of a queued task.
#[utoipa::path(patch, path = "/v1/tasks/{task}", tag = "tasks",
    params(("task" = u64, Path, description = "the task")),
    request_body = UpdateBody,
    responses(
        (status = 200, body = Updated),
        (status = 400, description = "nothing to change, or invalid tags", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 421, description = "with `serve --shared`: the task is served by another coordinator (`misdirected`, with `owners`: send it there)", body = ErrorBody),
        (status = 409, description = "the task is running (`not_queued`) or has ended (`task_ended`), with its `state`", body = ErrorBody)))]
pub(crate) async fn update(
    State(app): State<Arc<App>>,
    user: User,
    PathParams(task): PathParams<u64>,
    JsonBody(body): JsonBody<UpdateBody>,
) -> Reply<Updated> {
    may_change(&app, &user, task).await?;
    if body.priority.is_none() && body.tags.is_none() {
        return Err(ApiError::bad_request(
            "nothing to change: give priority and/or tags",
        ));
    }
    if let Some(tags) = &body.tags {
        app.check_task(None, tags)?;
    }
    let placement = match app.update(task, body.priority, body.tags).await {
        Err(e) if e.kind() == ErrorKind::UnknownTask => {
            return Err(not_live(&app, &user, task, e).await)
        }
        Err(e) if e.kind() == ErrorKind::NotQueued => {
            return Err(ApiError::ended(
                ErrorKind::NotQueued,
                format!("task {task} is running: only a queued task can change"),
                TaskState::Running,
            ))
        }
        placement => placement?,
    };
    ok(Updated {
        task,
        parked: placement == switchyard::TaskStatus::Parked,
    })
}

//! The coordinator's state and its HTTP routes.
//!
//! Every handler follows one rule: the dispatcher decides, the writer makes the decision
//! durable, and only then is the caller answered. A submission is the one exception in order:
//! it is validated, committed, and only then handed to the dispatcher, so no fetch can ever
//! assign a task the store does not have.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use switchyard::{Config, Dispatcher, TaskId, TaskSpec, WorkerId};

use crate::error::{no_route, ApiError, JsonBody, PathParams, QueryParams};
use crate::liveness::{reap, Leases};
use crate::recovery::recover;
use crate::store::{Change, ListFilter, SqliteStore, Store, TaskRecord, TaskState, WorkerRecord};
use crate::wakeups::Wakeups;
use crate::writer::Writer;

/// The coordinator's settings beyond the dispatcher's `Config`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Most tasks one fetch may return.
    pub max_fetch: usize,
    /// Largest payload, in bytes of its JSON text.
    pub max_payload: usize,
    /// A worker silent for longer than this is declared dead.
    pub lease_timeout: Duration,
    /// Most tasks in one batch submission.
    pub max_batch: usize,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// Longest a fetch may wait for work (long-poll).
    pub max_wait: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_fetch: 256,
            max_payload: 1 << 20,
            lease_timeout: Duration::from_secs(15),
            max_batch: 1000,
            max_body: 16 << 20,
            max_wait: Duration::from_secs(30),
        }
    }
}

/// The coordinator: dispatcher, store and writer.
pub struct App {
    dispatcher: Dispatcher,
    store: Arc<SqliteStore>,
    writer: Writer,
    next_task: AtomicU64,
    next_worker: AtomicU64,
    limits: Settings,
    leases: Leases,
    wakeups: Arc<Wakeups>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl App {
    /// Opens the store in `data_dir`, recovers its state into a dispatcher with `config`, and
    /// starts the writer. Returns the app and the writer's task (await it after the last
    /// request to drain the writer).
    pub async fn open(
        data_dir: &Path,
        config: Config,
        limits: Settings,
    ) -> Result<(Arc<Self>, tokio::task::JoinHandle<()>), StartError> {
        let store = Arc::new(SqliteStore::open(data_dir)?);
        let dispatcher = Dispatcher::new(config)?;
        let recovered = recover(store.as_ref(), &dispatcher, now_ms())?;
        let (writer, writer_task) = Writer::spawn(store.clone(), 65_536, 4_096);
        writer.commit(recovered.requeued.clone()).await?;
        tracing::info!(
            workers = recovered.workers,
            queued = recovered.queued,
            running = recovered.running,
            requeued = recovered.requeued.len(),
            "recovered"
        );
        let leases = Leases::new(limits.lease_timeout);
        // Restored workers start with a fresh lease: a full timeout to come back.
        for w in store.recover()?.workers {
            leases.renew(w.id);
        }
        let wakeups = Arc::new(Wakeups::default());
        dispatcher.set_waker(wakeups.clone());
        let app = Arc::new(Self {
            dispatcher,
            store,
            writer,
            next_task: AtomicU64::new(recovered.next_task_id),
            next_worker: AtomicU64::new(recovered.next_worker_id),
            limits,
            leases,
            wakeups,
        });
        // The reaper holds only a weak reference, so dropping the app still drains the writer.
        tokio::spawn(reap(Arc::downgrade(&app), app.leases.timeout() / 4));
        Ok((app, writer_task))
    }

    /// Worker leases (renewed by worker requests, read by the reaper).
    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// Whether a fetch of `worker` is waiting for work right now.
    pub fn is_waiting(&self, worker: u64) -> bool {
        self.wakeups.is_waiting(worker)
    }

    /// Removes `worker` (it left, or its lease expired): unregisters it, which redistributes
    /// its tasks, and records that durably. Returns how many running tasks were requeued.
    pub async fn remove_worker(&self, worker: u64) -> Result<usize, ApiError> {
        self.leases.forget(worker);
        let departure = self.dispatcher.unregister(WorkerId(worker))?;
        let mut changes = vec![Change::RemoveWorker { worker }];
        for r in &departure.tasks {
            if let switchyard::Was::Running(attempt) = r.was {
                changes.push(Change::Requeue {
                    task: r.task.0,
                    attempt,
                });
            }
        }
        let requeued = changes.len() - 1;
        self.writer.commit(changes).await?;
        Ok(requeued)
    }

    /// The dispatcher (for tests and statistics).
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }
}

/// Why the coordinator could not start (a store, configuration or recovery failure).
pub type StartError = Box<dyn std::error::Error + Send + Sync>;

/// The HTTP routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/stats", get(stats))
        .route("/v1/workers", post(register))
        .route("/v1/workers/{worker}", delete(leave))
        .route("/v1/workers/{worker}/fetch", post(fetch))
        .route("/v1/workers/{worker}/tasks/{task}/report", post(report))
        .route("/v1/tasks", post(submit).get(list))
        .route("/v1/tasks/batch", post(submit_batch))
        .route("/v1/tasks/{task}", get(task).delete(cancel).patch(update))
        .route("/v1/admin/rebalance", post(rebalance))
        .route("/v1/admin/workers", get(workers))
        .route("/v1/admin/workers/{worker}", delete(leave))
        .fallback(no_route)
        .layer(axum::extract::DefaultBodyLimit::max(app.limits.max_body))
        .with_state(app)
}

/// Serves `router(app)` on `addr` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, "serving");
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown)
        .await
}

type Reply<T> = Result<(StatusCode, Json<T>), ApiError>;

fn ok<T>(body: T) -> Reply<T> {
    Ok((StatusCode::OK, Json(body)))
}

// ----- health and stats -------------------------------------------------------------------------

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[derive(Serialize)]
struct StatsBody {
    workers: Vec<WorkerInfo>,
    tasks: usize,
    queued: usize,
    running: usize,
    parked: usize,
    claimed: u64,
    submitted: u64,
    store_batches: u64,
    store_largest_batch: u64,
}

async fn stats(State(app): State<Arc<App>>) -> Json<StatsBody> {
    let mut s = app.dispatcher.stats();
    let w = app.writer.stats();
    Json(StatsBody {
        workers: std::mem::take(&mut s.workers)
            .into_iter()
            .map(WorkerInfo::from)
            .collect(),
        tasks: s.tasks,
        queued: s.queued,
        running: s.running,
        parked: s.parked,
        claimed: s.counters.claimed,
        submitted: s.counters.submitted,
        store_batches: w.batches.load(Ordering::Relaxed),
        store_largest_batch: w.largest_batch.load(Ordering::Relaxed),
    })
}

// ----- workers ------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    groups: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Serialize)]
struct Registered {
    id: u64,
}

async fn register(
    State(app): State<Arc<App>>,
    JsonBody(body): JsonBody<RegisterBody>,
) -> Reply<Registered> {
    let id = app.next_worker.fetch_add(1, Ordering::Relaxed);
    // Validate against the dispatcher's limits before anything is written.
    app.dispatcher.validate_worker(&body.groups, &body.tags)?;
    let record = WorkerRecord {
        id,
        groups: body.groups.clone(),
        tags: body.tags.clone(),
        token_hash: String::new(),
    };
    app.writer.commit(vec![Change::AddWorker(record)]).await?;
    app.dispatcher
        .register(WorkerId(id), &body.groups, &body.tags)?;
    app.leases.renew(id);
    Ok((StatusCode::CREATED, Json(Registered { id })))
}

#[derive(Serialize)]
struct Left {
    requeued: usize,
}

async fn leave(State(app): State<Arc<App>>, PathParams(worker): PathParams<u64>) -> Reply<Left> {
    let requeued = app.remove_worker(worker).await?;
    ok(Left { requeued })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchBody {
    #[serde(default = "one")]
    max: usize,
    /// Milliseconds to wait for work when there is none (long-poll); 0 answers at once.
    #[serde(default)]
    wait_ms: u64,
}

fn one() -> usize {
    1
}

#[derive(Serialize)]
struct Fetched {
    tasks: Vec<Assigned>,
}

#[derive(Serialize)]
struct Assigned {
    id: u64,
    attempt: u32,
    priority: i32,
    payload: serde_json::Value,
}

async fn fetch(
    State(app): State<Arc<App>>,
    PathParams(worker): PathParams<u64>,
    JsonBody(body): JsonBody<FetchBody>,
) -> Reply<Fetched> {
    if body.max == 0 || body.max > app.limits.max_fetch {
        return Err(ApiError::bad_request(format!(
            "max must be in 1..={}",
            app.limits.max_fetch
        )));
    }
    let wait = Duration::from_millis(body.wait_ms);
    if wait > app.limits.max_wait {
        return Err(ApiError::bad_request(format!(
            "wait_ms must be at most {}",
            app.limits.max_wait.as_millis()
        )));
    }
    let deadline = tokio::time::Instant::now() + wait;
    // Subscribe before looking, so work placed in between wakes us.
    let subscription = (!wait.is_zero()).then(|| app.wakeups.subscribe(worker));
    let got = loop {
        let mut woken = subscription.as_ref().map(|s| Box::pin(s.notify.notified()));
        if let Some(w) = woken.as_mut() {
            w.as_mut().enable();
        }
        let got = app.dispatcher.fetch(WorkerId(worker), body.max)?;
        app.leases.renew(worker);
        match woken {
            Some(woken) if got.is_empty() => {
                if tokio::time::timeout_at(deadline, woken).await.is_err() {
                    break got; // waited the whole time: an empty answer
                }
            }
            _ => break got,
        }
    };
    drop(subscription);
    let changes = got
        .iter()
        .map(|a| Change::Assign {
            task: a.task.0,
            worker,
            attempt: a.attempt,
        })
        .collect();
    if let Err(e) = app.writer.commit(changes).await {
        // Not durable: hand the tasks back rather than run them unrecorded.
        for a in &got {
            let _ = app
                .dispatcher
                .give_back(WorkerId(worker), a.task, a.attempt);
        }
        return Err(e.into());
    }
    let mut tasks = Vec::with_capacity(got.len());
    for a in got {
        let record = app.store.task(a.task.0)?;
        let payload = record
            .map(|t| serde_json::from_slice(&t.payload).unwrap_or(serde_json::Value::Null))
            .unwrap_or(serde_json::Value::Null);
        tasks.push(Assigned {
            id: a.task.0,
            attempt: a.attempt,
            priority: a.priority,
            payload,
        });
    }
    ok(Fetched { tasks })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum Outcome {
    Finished,
    Failed,
    GivenBack,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportBody {
    attempt: u32,
    outcome: Outcome,
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Serialize)]
struct Reported {
    task: u64,
}

async fn report(
    State(app): State<Arc<App>>,
    PathParams((worker, task)): PathParams<(u64, u64)>,
    JsonBody(body): JsonBody<ReportBody>,
) -> Reply<Reported> {
    let (w, t, attempt) = (WorkerId(worker), TaskId(task), body.attempt);
    let change = match body.outcome {
        Outcome::Finished => {
            app.dispatcher.complete(w, t, attempt)?;
            Change::Finish {
                task,
                attempt,
                result: body.result,
            }
        }
        Outcome::Failed => {
            app.dispatcher.complete(w, t, attempt)?;
            Change::Fail {
                task,
                attempt,
                message: body.message.unwrap_or_default(),
            }
        }
        Outcome::GivenBack => {
            app.dispatcher.give_back(w, t, attempt)?;
            Change::Requeue { task, attempt }
        }
    };
    app.leases.renew(worker);
    app.writer.commit(vec![change]).await?;
    ok(Reported { task })
}

// ----- tasks --------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    group: String,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    payload: serde_json::Value,
}

#[derive(Serialize)]
struct Submitted {
    id: u64,
}

/// Validates a submission and gives it an id: the spec for the dispatcher and the record for the
/// store. Nothing is written.
fn prepare(app: &App, body: SubmitBody) -> Result<(TaskSpec, TaskRecord), ApiError> {
    let payload =
        serde_json::to_vec(&body.payload).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if payload.len() > app.limits.max_payload {
        return Err(ApiError::bad_request(format!(
            "payload is {} bytes; the limit is {}",
            payload.len(),
            app.limits.max_payload
        )));
    }
    let id = app.next_task.fetch_add(1, Ordering::Relaxed);
    let spec = TaskSpec::new(id, body.group.clone())
        .tags(body.tags.iter().cloned())
        .priority(body.priority);
    app.dispatcher.validate(&spec)?;
    let record = TaskRecord {
        id,
        group: body.group,
        tags: body.tags,
        priority: body.priority,
        payload,
        state: TaskState::Queued,
        attempt: 0,
        worker: None,
        outcome: None,
        submitted_ms: now_ms(),
    };
    Ok((spec, record))
}

async fn submit(
    State(app): State<Arc<App>>,
    JsonBody(body): JsonBody<SubmitBody>,
) -> Reply<Submitted> {
    let (spec, record) = prepare(&app, body)?;
    let id = record.id;
    // Durable first: only then may a worker fetch it.
    app.writer.commit(vec![Change::Submit(record)]).await?;
    app.dispatcher.submit(spec)?;
    Ok((StatusCode::CREATED, Json(Submitted { id })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    tasks: Vec<SubmitBody>,
}

#[derive(Serialize)]
struct SubmittedBatch {
    ids: Vec<u64>,
}

/// All or nothing: every task is validated before any is written, all are committed in one
/// transaction, and then handed to the dispatcher in one batch.
async fn submit_batch(
    State(app): State<Arc<App>>,
    JsonBody(body): JsonBody<BatchBody>,
) -> Reply<SubmittedBatch> {
    if body.tasks.is_empty() || body.tasks.len() > app.limits.max_batch {
        return Err(ApiError::bad_request(format!(
            "a batch holds 1..={} tasks",
            app.limits.max_batch
        )));
    }
    let mut specs = Vec::with_capacity(body.tasks.len());
    let mut changes = Vec::with_capacity(body.tasks.len());
    for (i, task) in body.tasks.into_iter().enumerate() {
        let (spec, record) = prepare(&app, task).map_err(|e| e.in_batch(i))?;
        specs.push(spec);
        changes.push(Change::Submit(record));
    }
    let ids = specs.iter().map(|s| s.id.0).collect();
    app.writer.commit(changes).await?;
    app.dispatcher.submit_many(specs)?;
    Ok((StatusCode::CREATED, Json(SubmittedBatch { ids })))
}

async fn task(
    State(app): State<Arc<App>>,
    PathParams(task): PathParams<u64>,
) -> Reply<TaskRecordBody> {
    match app.store.task(task)? {
        Some(t) => ok(TaskRecordBody::from(t)),
        None => Err(switchyard::Error::UnknownTask(TaskId(task)).into()),
    }
}

#[derive(Serialize)]
struct TaskRecordBody {
    id: u64,
    group: String,
    tags: Vec<String>,
    priority: i32,
    state: TaskState,
    attempt: u32,
    worker: Option<u64>,
    outcome: Option<String>,
}

impl From<TaskRecord> for TaskRecordBody {
    fn from(t: TaskRecord) -> Self {
        Self {
            id: t.id,
            group: t.group,
            tags: t.tags,
            priority: t.priority,
            state: t.state,
            attempt: t.attempt,
            worker: t.worker,
            outcome: t.outcome,
        }
    }
}

#[derive(Serialize)]
struct CancelledBody {
    task: u64,
    was_running_on: Option<u64>,
}

async fn cancel(
    State(app): State<Arc<App>>,
    PathParams(task): PathParams<u64>,
) -> Reply<CancelledBody> {
    let outcome = app.dispatcher.cancel(TaskId(task))?;
    app.writer.commit(vec![Change::Cancel { task }]).await?;
    let was_running_on = match outcome {
        switchyard::Cancelled::Running { worker, .. } => Some(worker.0),
        switchyard::Cancelled::Queued => None,
    };
    ok(CancelledBody {
        task,
        was_running_on,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<TaskState>,
    group: Option<String>,
    #[serde(default)]
    after: u64,
    #[serde(default = "hundred")]
    limit: usize,
}

fn hundred() -> usize {
    100
}

/// Most tasks one list page may return.
const MAX_PAGE: usize = 1000;

#[derive(Serialize)]
struct Page {
    tasks: Vec<TaskRecordBody>,
    /// The `after` of the next page, when this one is full.
    next: Option<u64>,
}

async fn list(State(app): State<Arc<App>>, QueryParams(q): QueryParams<ListQuery>) -> Reply<Page> {
    if q.limit == 0 || q.limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit must be in 1..={MAX_PAGE}"
        )));
    }
    let filter = ListFilter {
        state: q.state,
        group: q.group,
        after: q.after,
        limit: q.limit,
    };
    let tasks = app.store.list(&filter)?;
    let next = (tasks.len() == q.limit)
        .then(|| tasks.last().map(|t| t.id))
        .flatten();
    ok(Page {
        tasks: tasks.into_iter().map(TaskRecordBody::from).collect(),
        next,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    priority: Option<i32>,
    tags: Option<Vec<String>>,
}

#[derive(Serialize)]
struct Updated {
    task: u64,
    parked: bool,
}

async fn update(
    State(app): State<Arc<App>>,
    PathParams(task): PathParams<u64>,
    JsonBody(body): JsonBody<UpdateBody>,
) -> Reply<Updated> {
    if body.priority.is_none() && body.tags.is_none() {
        return Err(ApiError::bad_request(
            "nothing to change: give priority and/or tags",
        ));
    }
    let placement = app
        .dispatcher
        .update(TaskId(task), body.priority, body.tags.as_deref())?;
    app.writer
        .commit(vec![Change::Update {
            task,
            priority: body.priority,
            tags: body.tags,
        }])
        .await?;
    ok(Updated {
        task,
        parked: placement == switchyard::Placement::Parked,
    })
}

#[derive(Serialize)]
struct Rebalanced {
    moved: usize,
}

async fn rebalance(State(app): State<Arc<App>>) -> Json<Rebalanced> {
    // Moves change no durable state: the store records which worker runs a task, not which
    // queue holds it.
    Json(Rebalanced {
        moved: app.dispatcher.rebalance(),
    })
}

#[derive(Serialize)]
struct Workers {
    workers: Vec<WorkerInfo>,
}

#[derive(Serialize)]
struct WorkerInfo {
    id: u64,
    groups: Vec<String>,
    tags: Vec<String>,
    queued: usize,
    running: usize,
}

impl From<switchyard::WorkerStats> for WorkerInfo {
    fn from(w: switchyard::WorkerStats) -> Self {
        Self {
            id: w.id.0,
            groups: w.groups,
            tags: w.tags,
            queued: w.queued,
            running: w.running,
        }
    }
}

async fn workers(State(app): State<Arc<App>>) -> Json<Workers> {
    let workers = app
        .dispatcher
        .stats()
        .workers
        .into_iter()
        .map(WorkerInfo::from)
        .collect();
    Json(Workers { workers })
}

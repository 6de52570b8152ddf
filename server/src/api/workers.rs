//! Worker routes: register, heartbeat, fetch (long-poll), report, leave.
//!
//! Every route but registration takes the worker's own token (403 for any other) and renews
//! its lease. A worker the coordinator no longer knows (it left, or its lease expired) gets
//! 410 and must register again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::State;
use serde::{Deserialize, Serialize};
use switchyard::{TaskId, WorkerId};
use utoipa::ToSchema;

use super::{created, ok, Reply};
use crate::app::{detach, App};
use crate::auth::{self, Caller};
use crate::error::{ApiError, ErrorBody, JsonBody, PathParams};
use crate::store::{Change, Role, WorkerRecord};
use crate::sync::{Arc, Ordering};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterBody {
    /// Groups the worker serves (at least one).
    groups: Vec<String>,
    /// Its tags: it is a candidate for a task whose tags are all among these.
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Registered {
    /// The worker's id.
    id: u64,
    /// The worker's token: shown only now, stored only hashed.
    token: String,
    /// Milliseconds of silence after which the worker is declared dead.
    lease_ms: u64,
}

/// Registers a worker. An admin may register any; a submitter only workers whose groups are
/// all its own.
#[utoipa::path(post, path = "/v1/workers", tag = "workers", request_body = RegisterBody,
    responses(
        (status = 201, body = Registered),
        (status = 400, description = "invalid groups or tags", body = ErrorBody)))]
pub(crate) async fn register(
    State(app): State<Arc<App>>,
    caller: Caller,
    JsonBody(body): JsonBody<RegisterBody>,
) -> Reply<Registered> {
    match &caller {
        Caller::User(t) if t.role == Role::Admin => {}
        Caller::User(_) => {
            for g in &body.groups {
                caller.require_group(g)?;
            }
        }
        Caller::Worker(_) => return Err(ApiError::forbidden("a worker may not register others")),
    }
    // Validate against the dispatcher's limits before anything is written.
    app.dispatcher.validate_worker(&body.groups, &body.tags)?;
    let id = app.next_worker.fetch_add(1, Ordering::Relaxed);
    let token = auth::generate();
    let token_hash = auth::hash(&token);
    let a = app.clone();
    detach(async move {
        let record = WorkerRecord {
            id,
            groups: body.groups.clone(),
            tags: body.tags.clone(),
            token_hash: token_hash.clone(),
        };
        a.writer.commit(vec![Change::AddWorker(record)]).await?;
        a.keyring.insert(token_hash, Caller::Worker(id));
        a.dispatcher
            .register(WorkerId(id), &body.groups, &body.tags)?;
        a.leases.renew(id);
        Ok(())
    })
    .await?;
    created(Registered {
        id,
        token,
        lease_ms: lease_ms(&app),
    })
}

/// The lease timeout, as the worker is told it.
fn lease_ms(app: &App) -> u64 {
    app.limits.lease_timeout.as_millis() as u64
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Beat {
    /// Milliseconds of silence after which the worker is declared dead.
    lease_ms: u64,
}

/// Renews the worker's lease (any worker request does; this one does nothing else).
#[utoipa::path(post, path = "/v1/workers/{worker}/heartbeat", tag = "workers",
    params(("worker" = u64, Path, description = "the worker")),
    responses(
        (status = 200, body = Beat),
        (status = 410, description = "declared dead or left: register again", body = ErrorBody)))]
pub(crate) async fn heartbeat(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParams(worker): PathParams<u64>,
) -> Reply<Beat> {
    caller.require_worker(worker)?;
    if !app.dispatcher.is_registered(WorkerId(worker)) {
        return Err(switchyard::Error::UnknownWorker(WorkerId(worker)).into());
    }
    app.leases.renew(worker);
    ok(Beat {
        lease_ms: lease_ms(&app),
    })
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Left {
    /// Running tasks that were queued again elsewhere.
    requeued: usize,
}

/// The worker leaves: its queued and running tasks are redistributed (running ones as a new
/// attempt).
#[utoipa::path(delete, path = "/v1/workers/{worker}", tag = "workers",
    params(("worker" = u64, Path, description = "the worker")),
    responses(
        (status = 200, body = Left),
        (status = 410, body = ErrorBody)))]
pub(crate) async fn leave(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParams(worker): PathParams<u64>,
) -> Reply<Left> {
    caller.require_worker(worker)?;
    let requeued = app.remove_worker(worker).await?;
    ok(Left { requeued })
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FetchBody {
    /// Most tasks to take (1 by default; at most the server's `--max-fetch`).
    #[serde(default = "one")]
    max: usize,
    /// Milliseconds to wait for work when there is none (long-poll); 0 answers at once.
    #[serde(default)]
    wait_ms: u64,
}

fn one() -> usize {
    1
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Fetched {
    /// The tasks now assigned to this worker, best first.
    tasks: Vec<Assigned>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Assigned {
    id: u64,
    /// Name it in the report.
    attempt: u32,
    priority: i32,
    /// The payload as submitted.
    payload: serde_json::Value,
}

/// Takes up to `max` tasks from the worker's queue. With `wait_ms`, an empty queue waits that
/// long and answers the moment work is placed on the worker. Each assignment is durable before
/// the reply leaves.
#[utoipa::path(post, path = "/v1/workers/{worker}/fetch", tag = "workers",
    params(("worker" = u64, Path, description = "the worker")),
    request_body = FetchBody,
    responses(
        (status = 200, body = Fetched),
        (status = 400, description = "max or wait_ms out of range", body = ErrorBody),
        (status = 410, description = "declared dead or left: register again", body = ErrorBody)))]
pub(crate) async fn fetch(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParams(worker): PathParams<u64>,
    JsonBody(body): JsonBody<FetchBody>,
) -> Reply<Fetched> {
    caller.require_worker(worker)?;
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
    loop {
        let mut woken = subscription.as_ref().map(|s| Box::pin(s.notify.notified()));
        if let Some(w) = woken.as_mut() {
            w.as_mut().enable();
        }
        let started = Instant::now();
        let tasks = take_delivered(app.clone(), worker, body.max).await?;
        app.metrics.fetched(started.elapsed());
        match woken {
            Some(woken) if tasks.is_empty() && !app.wakeups.is_closing() => {
                if tokio::time::timeout_at(deadline, woken).await.is_err() {
                    return ok(Fetched { tasks }); // waited the whole time: an empty answer
                }
            }
            _ => return ok(Fetched { tasks }),
        }
    }
}

/// One fetch. The dispatcher's claim is synchronous, so no cancellation can fall between it
/// and the spawn that follows; an empty fetch (an idle worker polling) costs no task. The
/// claimed tasks are recorded ([`record`]) on a task of their own, so an assignment is never
/// left unrecorded, and given back if the request that asked for them is gone by then (the
/// client hung up, or the request-time limit passed): tasks nobody will receive would otherwise
/// stay running on a live worker. A reply lost after this point (the connection breaks while it
/// is written) is the usual at-least-once window: the tasks come back when the worker gives
/// them back, leaves, or its lease expires.
async fn take_delivered(app: Arc<App>, worker: u64, max: usize) -> Result<Vec<Assigned>, ApiError> {
    let got = app.dispatcher.fetch(WorkerId(worker), max)?;
    app.leases.renew(worker);
    if got.is_empty() {
        return Ok(Vec::new());
    }
    let (deliver, delivered) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let recorded = record(&app, worker, got).await;
        if let Err(Ok(tasks)) = deliver.send(recorded) {
            let tasks: Vec<_> = tasks.iter().map(|t| (TaskId(t.id), t.attempt)).collect();
            tracing::info!(
                worker,
                tasks = tasks.len(),
                "fetch abandoned: giving its tasks back"
            );
            let _ = give_back(&app, worker, &tasks).await;
        }
    });
    delivered.await.unwrap_or_else(|_| {
        Err(ApiError::internal(
            "the fetch failed inside the coordinator",
        ))
    })
}

/// Gives back recorded assignments: the dispatcher requeues them and the store records it.
async fn give_back(app: &App, worker: u64, tasks: &[(TaskId, u32)]) -> Result<(), ApiError> {
    let changes = tasks
        .iter()
        .filter(|(task, attempt)| {
            app.dispatcher
                .give_back(WorkerId(worker), *task, *attempt)
                .is_ok()
        })
        .map(|(task, attempt)| Change::Requeue {
            task: task.0,
            attempt: *attempt,
        })
        .collect();
    app.commit_decided(changes).await
}

/// Records claimed assignments and reads their payloads. If the commit fails, the dispatcher
/// takes the tasks back (nothing was written); if the payload read fails after it, they are
/// given back durably.
async fn record(
    app: &App,
    worker: u64,
    got: Vec<switchyard::Assignment>,
) -> Result<Vec<Assigned>, ApiError> {
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
    // The payloads, in one read. If it fails, the recorded assignments are given back.
    let ids: Vec<u64> = got.iter().map(|a| a.task.0).collect();
    let records = match app.store.tasks(&ids) {
        Ok(records) => records,
        Err(e) => {
            let taken: Vec<_> = got.iter().map(|a| (a.task, a.attempt)).collect();
            give_back(app, worker, &taken).await?;
            return Err(e.into());
        }
    };
    let mut payloads: HashMap<u64, Vec<u8>> =
        records.into_iter().map(|t| (t.id, t.payload)).collect();
    let tasks = got
        .into_iter()
        .map(|a| Assigned {
            id: a.task.0,
            attempt: a.attempt,
            priority: a.priority,
            payload: payloads
                .remove(&a.task.0)
                .and_then(|p| serde_json::from_slice(&p).ok())
                .unwrap_or(serde_json::Value::Null),
        })
        .collect();
    Ok(tasks)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(crate) enum Outcome {
    /// Done; `result` is kept.
    Finished,
    /// Failed for good; `message` is kept.
    Failed,
    /// Not run: queue it again, as a new attempt, for any candidate.
    GivenBack,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReportBody {
    /// The attempt the fetch handed out.
    attempt: u32,
    outcome: Outcome,
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Reported {
    task: u64,
}

/// Reports how an assignment ended. Durable before the reply.
#[utoipa::path(post, path = "/v1/workers/{worker}/tasks/{task}/report", tag = "workers",
    params(("worker" = u64, Path, description = "the worker"),
           ("task" = u64, Path, description = "the task")),
    request_body = ReportBody,
    responses(
        (status = 200, body = Reported),
        (status = 404, description = "no such task", body = ErrorBody),
        (status = 409, description = "a superseded attempt: nothing changed", body = ErrorBody),
        (status = 410, description = "declared dead or left: register again", body = ErrorBody)))]
pub(crate) async fn report(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParams((worker, task)): PathParams<(u64, u64)>,
    JsonBody(body): JsonBody<ReportBody>,
) -> Reply<Reported> {
    caller.require_worker(worker)?;
    check_text(&app, &body)?;
    let a = app.clone();
    let reported = detach(async move {
        let change = decide(&a, worker, task, body)?;
        a.commit_decided(vec![change]).await
    })
    .await;
    match reported {
        Ok(()) => ok(Reported { task }),
        Err(e) if e.status().is_client_error() => {
            // The worker drops its result on a refusal: make sure the refusal is durable.
            Err(app.durable_refusal(e).await)
        }
        Err(e) => Err(e),
    }
}

/// A result or message is bounded like a payload.
fn check_text(app: &App, body: &ReportBody) -> Result<(), ApiError> {
    let longest = [&body.result, &body.message]
        .into_iter()
        .flatten()
        .map(String::len)
        .max()
        .unwrap_or(0);
    if longest > app.limits.max_payload {
        return Err(ApiError::bad_request(format!(
            "the result or message is {longest} bytes; the limit (--max-payload) is {}",
            app.limits.max_payload
        )));
    }
    Ok(())
}

/// The dispatcher's decision on one report, as the change that records it. Renews the lease
/// of a worker whose report is accepted.
fn decide(app: &App, worker: u64, task: u64, body: ReportBody) -> Result<Change, ApiError> {
    let (w, t, attempt) = (WorkerId(worker), TaskId(task), body.attempt);
    let decided = match body.outcome {
        Outcome::Finished => app
            .dispatcher
            .complete(w, t, attempt)
            .map(|()| Change::Finish {
                task,
                attempt,
                result: body.result,
            }),
        Outcome::Failed => app
            .dispatcher
            .complete(w, t, attempt)
            .map(|()| Change::Fail {
                task,
                attempt,
                message: body.message.unwrap_or_default(),
            }),
        Outcome::GivenBack => app
            .dispatcher
            .give_back(w, t, attempt)
            .map(|_| Change::Requeue { task, attempt }),
    };
    match decided {
        Ok(change) => {
            app.leases.renew(worker);
            Ok(change)
        }
        Err(e) => {
            if matches!(e, switchyard::Error::StaleAttempt { .. }) {
                app.metrics.stale_reports.increment(1);
            }
            Err(e.into())
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReportsBody {
    /// 1 to the server's `--max-batch` reports, each as in the single report plus its task.
    reports: Vec<TaskReport>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TaskReport {
    task: u64,
    attempt: u32,
    outcome: Outcome,
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

impl TaskReport {
    fn split(self) -> (u64, ReportBody) {
        let report = ReportBody {
            attempt: self.attempt,
            outcome: self.outcome,
            result: self.result,
            message: self.message,
        };
        (self.task, report)
    }
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ReportsOutcome {
    /// One per report, in order.
    results: Vec<ReportResult>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ReportResult {
    task: u64,
    /// What the single report would have answered: 200, or its 4xx.
    status: u16,
    /// The error kind, if refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
}

/// Reports several assignments in one request and one commit. Each is decided on its own (a
/// stale one is refused without failing the others); all accepted ones are durable before the
/// reply.
#[utoipa::path(post, path = "/v1/workers/{worker}/reports", tag = "workers",
    params(("worker" = u64, Path, description = "the worker")),
    request_body = ReportsBody,
    responses(
        (status = 200, description = "each report's own status", body = ReportsOutcome),
        (status = 400, description = "no reports, too many, or a result over the limit", body = ErrorBody),
        (status = 503, description = "the store failed: nothing is known to be recorded", body = ErrorBody)))]
pub(crate) async fn reports(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParams(worker): PathParams<u64>,
    JsonBody(body): JsonBody<ReportsBody>,
) -> Reply<ReportsOutcome> {
    caller.require_worker(worker)?;
    if body.reports.is_empty() || body.reports.len() > app.limits.max_batch {
        return Err(ApiError::bad_request(format!(
            "a batch holds 1..={} reports",
            app.limits.max_batch
        )));
    }
    let reports: Vec<(u64, ReportBody)> = body.reports.into_iter().map(TaskReport::split).collect();
    for (i, (_, r)) in reports.iter().enumerate() {
        check_text(&app, r).map_err(|e| e.in_batch(i))?;
    }
    let a = app.clone();
    let results = detach(async move {
        let mut changes = Vec::with_capacity(reports.len());
        let mut results = Vec::with_capacity(reports.len());
        for (task, report) in reports {
            let (status, error) = match decide(&a, worker, task, report) {
                Ok(change) => {
                    changes.push(change);
                    (200, None)
                }
                Err(e) => (e.status().as_u16(), Some(e.kind())),
            };
            results.push(ReportResult {
                task,
                status,
                error,
            });
        }
        // Also the barrier that makes any refusal above durable (see `App::durable_refusal`):
        // it completes after every commit sent before it.
        a.commit_decided(changes).await?;
        if let Some(reason) = a.poisoned() {
            return Err(ApiError::unavailable(format!(
                "the coordinator is stopping: {reason}"
            )));
        }
        Ok(results)
    })
    .await?;
    ok(ReportsOutcome { results })
}

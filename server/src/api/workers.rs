//! Worker routes: register, heartbeat, fetch (long-poll), report, leave.
//!
//! Every route but registration takes the worker's own token (403 for any other) and renews
//! its lease. A worker the coordinator no longer knows (it left, or its lease expired) gets
//! 410 and must register again.

use std::time::{Duration, Instant};

use axum::extract::State;
use serde::{Deserialize, Serialize};
use switchyard::WorkerId;
use utoipa::ToSchema;

use super::{created, ok, Reply};
use crate::app::App;
use crate::auth::{ThisWorker, User};
use crate::delivery::{self, Assigned, Delivered, Held, Holding, Outcome, Report, Taken};
use crate::error::{ApiError, ErrorBody, ErrorKind, JsonBody, PathParams};
use crate::sync::Arc;

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
        (status = 400, description = "invalid groups or tags", body = ErrorBody),
        (status = 421, description = "with `serve --shared`: some of the groups are served by another coordinator (`misdirected`, with `owners`): register with each owner for its groups", body = ErrorBody)))]
pub(crate) async fn register(
    State(app): State<Arc<App>>,
    user: User,
    JsonBody(body): JsonBody<RegisterBody>,
) -> Reply<Registered> {
    for g in &body.groups {
        user.require_group(g)?;
    }
    // Validate before anything is written.
    app.check_worker(&body.groups, &body.tags)?;
    app.dispatcher.validate_worker(&body.groups, &body.tags)?;
    let (id, token) = app.register_worker(body.groups, body.tags).await?;
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct HeartbeatBody {
    /// What the worker holds: answered with what it must stop (see the fetch).
    holding: Option<Holding>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Beat {
    /// Milliseconds of silence after which the worker is declared dead.
    lease_ms: u64,
    /// Assignments named in `holding` that are no longer this worker's (cancelled, or queued
    /// again): stop them and do not report them.
    revoked: Vec<Held>,
}

/// Renews the worker's lease (any worker request does). With `holding` (optional; the body
/// may be empty), also reconciles what the worker holds, as a fetch does.
#[utoipa::path(post, path = "/v1/workers/{worker}/heartbeat", tag = "workers",
    params(("worker" = u64, Path, description = "the worker")),
    request_body(content = Option<HeartbeatBody>, description = "optional"),
    responses(
        (status = 200, body = Beat),
        (status = 410, description = "declared dead or left: register again", body = ErrorBody)))]
pub(crate) async fn heartbeat(
    State(app): State<Arc<App>>,
    ThisWorker(worker): ThisWorker,
    body: axum::body::Bytes,
) -> Reply<Beat> {
    let body: HeartbeatBody = if body.iter().all(u8::is_ascii_whitespace) {
        HeartbeatBody { holding: None }
    } else {
        serde_json::from_slice(&body).map_err(ApiError::bad_body)?
    };
    if !app.dispatcher.is_registered(WorkerId(worker)) {
        return Err(switchyard::Error::UnknownWorker(WorkerId(worker)).into());
    }
    app.leases.renew(worker);
    let revoked = match &body.holding {
        Some(holding) => delivery::reconcile(&app, worker, holding).await?,
        None => Vec::new(),
    };
    ok(Beat {
        lease_ms: lease_ms(&app),
        revoked,
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
    ThisWorker(worker): ThisWorker,
) -> Reply<Left> {
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
    /// What the worker holds. Assignments recorded on it that it does not hold (a fetch reply
    /// it never received) are queued again as new attempts; see the README's delivery
    /// guarantee. Omit it only if the worker never loses a reply.
    holding: Option<Holding>,
}

fn one() -> usize {
    1
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Fetched {
    /// The tasks now assigned to this worker, best first.
    tasks: Vec<Assigned>,
    /// This reply's delivery id (absent when `tasks` is empty): confirm it as
    /// `holding.delivery` in later requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery: Option<u64>,
    /// Assignments named in `holding` that are no longer this worker's (cancelled, or queued
    /// again): stop them and do not report them.
    revoked: Vec<Held>,
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
    ThisWorker(worker): ThisWorker,
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
    let revoked = match &body.holding {
        Some(holding) => delivery::reconcile(&app, worker, holding).await?,
        None => Vec::new(),
    };
    let deadline = tokio::time::Instant::now() + wait;
    // Subscribe before looking, so work placed in between wakes us.
    let subscription = (!wait.is_zero()).then(|| app.wakeups.subscribe(worker));
    loop {
        let mut woken = subscription.as_ref().map(|s| Box::pin(s.notify.notified()));
        if let Some(w) = woken.as_mut() {
            w.as_mut().enable();
        }
        let started = Instant::now();
        let delivered = delivery::deliver(app.clone(), worker, body.max).await?;
        app.metrics.fetched(started.elapsed());
        let reply = |d: Delivered, revoked| Fetched {
            tasks: d.tasks,
            delivery: d.delivery,
            revoked,
        };
        match woken {
            Some(woken) if delivered.tasks.is_empty() && !app.wakeups.is_closing() => {
                if tokio::time::timeout_at(deadline, woken).await.is_err() {
                    return ok(reply(delivered, revoked)); // waited the whole time: empty
                }
            }
            _ => return ok(reply(delivered, revoked)),
        }
    }
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
    /// True when this report repeats one already recorded for the attempt (a retry after a
    /// lost reply): nothing changed now, and the first one stands.
    already_recorded: bool,
}

/// Reports how an assignment ended. Durable before the reply. Idempotent: repeating the report
/// recorded for this attempt answers 200 with `already_recorded`.
#[utoipa::path(post, path = "/v1/workers/{worker}/tasks/{task}/report", tag = "workers",
    params(("worker" = u64, Path, description = "the worker"),
           ("task" = u64, Path, description = "the task")),
    request_body = ReportBody,
    responses(
        (status = 200, body = Reported),
        (status = 409, description = "not this worker's attempt (`not_assigned`, whether or not the task exists), or the attempt ended otherwise (`cancelled`, `superseded`, `conflict`, with the task's `state`): nothing changed", body = ErrorBody),
        (status = 410, description = "declared dead or left: register again", body = ErrorBody)))]
pub(crate) async fn report(
    State(app): State<Arc<App>>,
    ThisWorker(worker): ThisWorker,
    PathParams((_, task)): PathParams<(u64, u64)>,
    JsonBody(body): JsonBody<ReportBody>,
) -> Reply<Reported> {
    let report = Report {
        task,
        attempt: body.attempt,
        outcome: body.outcome,
        result: body.result,
        message: body.message,
    };
    check_text(&app, &report)?;
    let taken = delivery::report(&app, worker, report).await?;
    ok(Reported {
        task,
        already_recorded: taken == Taken::AlreadyRecorded,
    })
}

/// A result or message is bounded like a payload.
fn check_text(app: &App, r: &Report) -> Result<(), ApiError> {
    let longest = [&r.result, &r.message]
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
    // PostgreSQL's text cannot hold U+0000: refused here, for every store, rather than
    // failing the store's commit.
    if [&r.result, &r.message]
        .into_iter()
        .flatten()
        .any(|t| t.contains('\0'))
    {
        return Err(ApiError::bad_request(
            "the result or message contains a NUL character (U+0000)",
        ));
    }
    Ok(())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReportsBody {
    /// 1 to the server's `--max-batch` reports, each as in the single report plus its task.
    reports: Vec<Report>,
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
    error: Option<ErrorKind>,
    /// As in the single report's answer.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    already_recorded: bool,
}

/// Reports several assignments in one request and one commit. Each is decided (and, if
/// refused, settled) on its own, as the single report is; all accepted ones are durable before
/// the reply.
#[utoipa::path(post, path = "/v1/workers/{worker}/reports", tag = "workers",
    params(("worker" = u64, Path, description = "the worker")),
    request_body = ReportsBody,
    responses(
        (status = 200, description = "each report's own status", body = ReportsOutcome),
        (status = 400, description = "no reports, too many, or a result over the limit", body = ErrorBody),
        (status = 503, description = "the store failed: nothing is known to be recorded", body = ErrorBody)))]
pub(crate) async fn reports(
    State(app): State<Arc<App>>,
    ThisWorker(worker): ThisWorker,
    JsonBody(body): JsonBody<ReportsBody>,
) -> Reply<ReportsOutcome> {
    if body.reports.is_empty() || body.reports.len() > app.limits.max_batch {
        return Err(ApiError::bad_request(format!(
            "a batch holds 1..={} reports",
            app.limits.max_batch
        )));
    }
    let reports = body.reports;
    for (i, r) in reports.iter().enumerate() {
        check_text(&app, r).map_err(|e| e.in_batch(i))?;
    }
    let tasks: Vec<u64> = reports.iter().map(|r| r.task).collect();
    let settled = delivery::reports(&app, worker, reports).await?;
    let results = tasks
        .into_iter()
        .zip(settled)
        .map(|(task, settled)| match settled {
            Ok(taken) => ReportResult {
                task,
                status: 200,
                error: None,
                already_recorded: taken == Taken::AlreadyRecorded,
            },
            Err(e) => ReportResult {
                task,
                status: e.status().as_u16(),
                error: Some(e.kind()),
                already_recorded: false,
            },
        })
        .collect();
    ok(ReportsOutcome { results })
}

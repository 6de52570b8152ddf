//! Admin routes (admin token only): stats, metrics, rebalance, workers, force-remove, and the
//! submitter tokens.

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{created, ok, Reply};
use crate::app::App;
use crate::auth::Admin;
use crate::error::{ApiError, ErrorBody, JsonBody, PathParams};
use crate::store::Role;
use crate::sync::{Arc, Ordering};

#[derive(Serialize, ToSchema)]
pub(crate) struct StatsBody {
    /// Every registered worker and its load.
    workers: Vec<WorkerInfo>,
    /// Live tasks (queued, running or parked).
    tasks: usize,
    queued: usize,
    running: usize,
    /// Tasks waiting for a candidate worker to register.
    parked: usize,
    /// Assignments handed out since start.
    claimed: u64,
    /// Tasks submitted since start.
    submitted: u64,
    /// Group-commit transactions since start.
    store_batches: u64,
    /// Changes in the largest transaction since start.
    store_largest_batch: u64,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct WorkerInfo {
    id: u64,
    groups: Vec<String>,
    tags: Vec<String>,
    /// Tasks waiting for it (fanout: the tasks of the classes it serves).
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

/// Totals, counters and every worker's load.
#[utoipa::path(get, path = "/v1/stats", tag = "admin",
    responses((status = 200, body = StatsBody)))]
pub(crate) async fn stats(State(app): State<Arc<App>>, _admin: Admin) -> Reply<StatsBody> {
    let mut s = app.dispatcher.stats();
    let w = app.writer.stats();
    ok(StatsBody {
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

/// Prometheus metrics, in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "admin",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub(crate) async fn metrics(
    State(app): State<Arc<App>>,
    _admin: Admin,
) -> Result<impl IntoResponse, ApiError> {
    let text = app.metrics.render(&app.dispatcher, &app.writer);
    Ok(([(CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Rebalanced {
    /// Queued tasks moved to less loaded workers.
    moved: usize,
}

/// Moves queued tasks from overloaded to underloaded workers now (balanced modes; fanout moves
/// nothing).
#[utoipa::path(post, path = "/v1/admin/rebalance", tag = "admin",
    responses((status = 200, body = Rebalanced)))]
pub(crate) async fn rebalance(State(app): State<Arc<App>>, _admin: Admin) -> Reply<Rebalanced> {
    // Moves change no durable state: the store records which worker runs a task, not which
    // queue holds it.
    ok(Rebalanced {
        moved: app.dispatcher.rebalance(),
    })
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Workers {
    workers: Vec<WorkerInfo>,
}

/// Every registered worker and its load.
#[utoipa::path(get, path = "/v1/admin/workers", tag = "admin",
    responses((status = 200, body = Workers)))]
pub(crate) async fn workers(State(app): State<Arc<App>>, _admin: Admin) -> Reply<Workers> {
    let workers = app
        .dispatcher
        .stats()
        .workers
        .into_iter()
        .map(WorkerInfo::from)
        .collect();
    ok(Workers { workers })
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Removed {
    /// Running tasks that were queued again elsewhere.
    requeued: usize,
}

/// Removes a worker as if it had died: its tasks are redistributed, and its later requests get
/// 410.
#[utoipa::path(delete, path = "/v1/admin/workers/{worker}", tag = "admin",
    params(("worker" = u64, Path, description = "the worker")),
    responses((status = 200, body = Removed),
              (status = 410, description = "no such worker (or already gone)", body = ErrorBody)))]
pub(crate) async fn remove_worker(
    State(app): State<Arc<App>>,
    _admin: Admin,
    PathParams(worker): PathParams<u64>,
) -> Reply<Removed> {
    let requeued = app.remove_worker(worker).await?;
    ok(Removed { requeued })
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewToken {
    /// The groups the token may use (at least one).
    groups: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct CreatedToken {
    id: u64,
    /// The token: shown only now, stored only hashed.
    token: String,
    groups: Vec<String>,
}

/// Creates a submitter token scoped to `groups`.
#[utoipa::path(post, path = "/v1/admin/tokens", tag = "admin", request_body = NewToken,
    responses((status = 201, body = CreatedToken),
              (status = 400, description = "no groups, or an invalid group name", body = ErrorBody)))]
pub(crate) async fn create_token(
    State(app): State<Arc<App>>,
    _admin: Admin,
    JsonBody(body): JsonBody<NewToken>,
) -> Reply<CreatedToken> {
    // The same rules as a worker's groups: at least one, valid names, within the limits.
    app.dispatcher
        .validate_worker(&body.groups, &[] as &[String])?;
    let (record, token) = app.add_token(body.groups).await?;
    let (id, groups) = (record.id, record.groups.clone());
    created(CreatedToken { id, token, groups })
}

#[derive(Serialize, ToSchema)]
pub(crate) struct TokenInfo {
    id: u64,
    role: Role,
    groups: Vec<String>,
    created_ms: i64,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Tokens {
    tokens: Vec<TokenInfo>,
}

/// The user tokens in force (never the tokens themselves).
#[utoipa::path(get, path = "/v1/admin/tokens", tag = "admin",
    responses((status = 200, body = Tokens)))]
pub(crate) async fn tokens(State(app): State<Arc<App>>, _admin: Admin) -> Reply<Tokens> {
    let tokens = app
        .keyring
        .users()
        .into_iter()
        .map(|t| TokenInfo {
            id: t.id,
            role: t.role,
            groups: t.groups.clone(),
            created_ms: t.created_ms,
        })
        .collect();
    ok(Tokens { tokens })
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Revoked {
    id: u64,
}

/// Revokes a submitter token. The admin token is replaced by starting with `--admin-token`.
#[utoipa::path(delete, path = "/v1/admin/tokens/{token}", tag = "admin",
    params(("token" = u64, Path, description = "the token's id")),
    responses((status = 200, body = Revoked),
              (status = 404, description = "no such token in force", body = ErrorBody),
              (status = 409, description = "an admin token", body = ErrorBody)))]
pub(crate) async fn revoke_token(
    State(app): State<Arc<App>>,
    _admin: Admin,
    PathParams(id): PathParams<u64>,
) -> Reply<Revoked> {
    app.revoke_token(id).await?;
    ok(Revoked { id })
}

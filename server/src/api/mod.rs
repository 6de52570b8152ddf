//! The HTTP API: JSON over HTTP/1.1, under `/v1`, split by who calls it.
//!
//! | module | caller | routes |
//! |---|---|---|
//! | [`workers`] | a worker (its own token); registration by an admin or submitter | register, heartbeat, fetch (long-poll), report (one or a batch), leave |
//! | [`tasks`] | a submitter (its groups) or the admin | submit, batch, get, list, update, cancel |
//! | [`admin`] | the admin | stats, rebalance, workers, force-remove, tokens, `/metrics` |
//!
//! `/health` and `/openapi.json` need no token. Every error is JSON (`{error, message}`, see
//! [`crate::error`]); every request is bounded in body size and in time (408 past the limit).

pub mod admin;
pub mod tasks;
pub mod workers;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;

use crate::app::App;
use crate::error::{no_method, no_route, ApiError};
use crate::sync::Arc;

/// The HTTP routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(admin::metrics))
        .route("/v1/stats", get(admin::stats))
        .route("/v1/workers", post(workers::register))
        .route("/v1/workers/{worker}", delete(workers::leave))
        .route("/v1/workers/{worker}/heartbeat", post(workers::heartbeat))
        .route("/v1/workers/{worker}/fetch", post(workers::fetch))
        .route(
            "/v1/workers/{worker}/tasks/{task}/report",
            post(workers::report),
        )
        .route("/v1/workers/{worker}/reports", post(workers::reports))
        .route("/v1/tasks", post(tasks::submit).get(tasks::list))
        .route("/v1/tasks/batch", post(tasks::submit_batch))
        .route(
            "/v1/tasks/{task}",
            get(tasks::get).delete(tasks::cancel).patch(tasks::update),
        )
        .route("/v1/admin/rebalance", post(admin::rebalance))
        .route("/v1/admin/workers", get(admin::workers))
        .route("/v1/admin/workers/{worker}", delete(admin::remove_worker))
        .route(
            "/v1/admin/tokens",
            post(admin::create_token).get(admin::tokens),
        )
        .route("/v1/admin/tokens/{token}", delete(admin::revoke_token))
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .layer(axum::extract::DefaultBodyLimit::max(app.limits.max_body))
        .with_state(app)
}

pub use crate::listener::serve;

/// Refuses every request once the coordinator is poisoned (503), refuses a declared body over
/// `--max-body` before reading it (413), and enforces the request-time limit (408). Cancelling a
/// handler here is safe: its decide-and-commit step runs detached (see [`crate::app`]).
async fn guard(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if let Some(reason) = app.poisoned() {
        return ApiError::unavailable(format!("the coordinator is stopping: {reason}"))
            .into_response();
    }
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(length) = declared.filter(|&n| n > app.limits.max_body as u64) {
        return ApiError::too_large(format!(
            "the body is {length} bytes; the limit (--max-body) is {}",
            app.limits.max_body
        ))
        .into_response();
    }
    let limit = app.limits.request_timeout;
    // What the debug log needs, read only when it is on.
    let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| {
        let started = std::time::Instant::now();
        (
            started,
            request.method().clone(),
            request.uri().path().to_owned(),
        )
    });
    let response = match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::timeout(format!(
            "the request took longer than the limit of {} ms",
            limit.as_millis()
        ))
        .into_response(),
    };
    if let Some((started, method, path)) = logged {
        tracing::debug!(
            %method,
            path,
            status = response.status().as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "request"
        );
    }
    response
}

pub(crate) type Reply<T> = Result<(StatusCode, Json<T>), ApiError>;

pub(crate) fn ok<T>(body: T) -> Reply<T> {
    Ok((StatusCode::OK, Json(body)))
}

pub(crate) fn created<T>(body: T) -> Reply<T> {
    Ok((StatusCode::CREATED, Json(body)))
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Health {
    status: &'static str,
}

/// Liveness: answers while the server runs. No token needed.
#[utoipa::path(get, path = "/health", tag = "meta", security(()),
    responses((status = 200, body = Health)))]
pub(crate) async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// This API's OpenAPI 3.1 document. No token needed.
#[utoipa::path(get, path = "/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "the OpenAPI document")))]
pub(crate) async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(title = "Switchyard", description = "Hands tagged, prioritised tasks to workers that fetch them over HTTP."),
    paths(
        health, openapi,
        workers::register, workers::heartbeat, workers::fetch, workers::report, workers::reports,
        workers::leave,
        tasks::submit, tasks::submit_batch, tasks::get, tasks::list, tasks::update, tasks::cancel,
        admin::stats, admin::metrics, admin::rebalance, admin::workers, admin::remove_worker,
        admin::create_token, admin::tokens, admin::revoke_token,
    ),
    modifiers(&BearerAuth, &CommonErrors),
    tags(
        (name = "workers", description = "Register, fetch, report, leave (worker token)"),
        (name = "tasks", description = "Submit and manage tasks (submitter or admin token)"),
        (name = "admin", description = "Operate the coordinator (admin token)"),
        (name = "meta", description = "Health and this document (no token)"),
    ),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Documents the errors every route shares, rather than repeating them on each handler: 401,
/// 403 and 408 on every route that takes a token, 400 on routes with path or query parameters, and
/// 400/413/415/422 on routes with a JSON body (malformed, too large, wrong content type, wrong
/// fields).
struct CommonErrors;

impl utoipa::Modify for CommonErrors {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for item in api.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.patch,
                &mut item.delete,
            ];
            for op in operations.into_iter().flatten() {
                let public = op.security.as_ref().is_some_and(|s| {
                    s.iter()
                        .all(|r| serde_json::to_value(r).is_ok_and(|v| v == serde_json::json!({})))
                });
                let mut add = |status: &str, description: &str| {
                    op.responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| error(description).into());
                };
                if !public {
                    add("401", "no token, or an unknown one");
                    add("403", "a token outside its scope");
                    add("408", "the request took longer than --request-timeout");
                }
                if op.parameters.as_ref().is_some_and(|p| !p.is_empty()) {
                    add("400", "a malformed path or query parameter");
                }
                if op.request_body.is_some() {
                    add("400", "invalid input");
                    add("413", "the body is over --max-body");
                    add("415", "the body is not application/json");
                    add(
                        "422",
                        "the JSON does not fit the schema (a wrong type or unknown field)",
                    );
                }
            }
        }
    }
}

//! One error type for the HTTP API, mapped to a status code in one place. Every error response
//! is JSON: `{"error": "<kind>", "message": "<what happened>"}`.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::FromRequest;
use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::store::{StoreError, TaskState};

/// An API error: a status and a message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    /// The task's state, when the refusal is about a task in the wrong state.
    state: Option<TaskState>,
}

impl ApiError {
    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// A 400 for a name or list outside the rules and limits (as the dispatcher's own).
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_input", message)
    }

    /// A 413: a body over `--max-body`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", message)
    }

    /// A 401: no token, or one the coordinator does not know.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// A 403: a known token, outside its scope.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// A 404 with `message`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// A 409 with `message`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// A 409 for a worker's report or request about an assignment that is not its own: the
    /// same answer whether the task exists or not, so a worker's token cannot probe task ids.
    pub fn not_assigned(worker: u64, task: u64, attempt: u32) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "not_assigned",
            format!("worker {worker} holds no attempt {attempt} of task {task}"),
        )
    }

    /// A 409 about a task that is in `state` (it ended, or the attempt named did).
    pub fn ended(kind: &'static str, message: impl Into<String>, state: TaskState) -> Self {
        let mut e = Self::new(StatusCode::CONFLICT, kind, message);
        e.state = Some(state);
        e
    }

    /// A 408: the request took longer than the request-time limit.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", message)
    }

    /// A 503: the coordinator cannot serve (it is stopping after a store failure).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// A 500: a failure inside the coordinator (a bug; logged).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The error's kind, the `error` field of its body.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// A body that is not the JSON the route takes (422, as `axum::Json` answers).
    pub fn bad_body(e: serde_json::Error) -> Self {
        let status = if e.is_data() {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        };
        Self::new(status, "bad_json", e.to_string())
    }

    /// The same error, saying which task of a batch caused it.
    pub fn in_batch(mut self, index: usize) -> Self {
        self.message = format!("task {index} of the batch: {}", self.message);
        self
    }

    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            state: None,
        }
    }
}

/// The body of every error response.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What kind of error, stable for programs: `unauthorized`, `forbidden`, `unknown_task`,
    /// `not_assigned`, `cancelled`, `task_ended`, `bad_json`, ...
    pub error: &'static str,
    /// What happened, for people.
    pub message: String,
    /// The task's state, when the error is about a task in the wrong state (for example a
    /// cancel of a finished task, or a report of a cancelled one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<TaskState>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.kind,
            message: self.message,
            state: self.state,
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<switchyard::Error> for ApiError {
    fn from(e: switchyard::Error) -> Self {
        use switchyard::Error::*;
        let (status, kind) = match &e {
            // A worker the coordinator no longer knows must register again.
            UnknownWorker(_) => (StatusCode::GONE, "unknown_worker"),
            UnknownTask(_) => (StatusCode::NOT_FOUND, "unknown_task"),
            DuplicateWorker(_) | DuplicateTask(_) => (StatusCode::CONFLICT, "duplicate"),
            StaleAttempt { .. } => (StatusCode::CONFLICT, "stale_attempt"),
            NotQueued(_) => (StatusCode::CONFLICT, "not_queued"),
            InvalidInput(_) => (StatusCode::BAD_REQUEST, "invalid_input"),
        };
        Self::new(status, kind, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let (status, kind) = match &e {
            StoreError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            StoreError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            StoreError::Backend(_) | StoreError::Locked(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
            }
        };
        tracing::warn!(error = %e, "store refused a change");
        Self::new(status, kind, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        // Keep axum's status where it is more precise than 400 (413 for a body over the limit,
        // 415 for a wrong content type); the body is JSON either way.
        let status = match e.status() {
            s if s.is_client_error() => s,
            _ => StatusCode::BAD_REQUEST,
        };
        Self::new(status, "bad_json", e.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_path", e.body_text())
    }
}

/// `axum::Json`, whose rejections (malformed JSON, wrong content type, unknown fields) are
/// JSON errors too.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct JsonBody<T>(pub T);

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text())
    }
}

/// `axum::extract::Query`, whose rejections (for example a non-numeric limit) are JSON errors.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct QueryParams<T>(pub T);

/// `axum::extract::Path`, whose rejections (for example a non-numeric id) are JSON errors.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct PathParams<T>(pub T);

/// The answer for a method a route does not have.
pub async fn no_method() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

/// The answer for routes that do not exist.
pub async fn no_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such route")
}

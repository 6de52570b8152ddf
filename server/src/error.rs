//! One error type for the HTTP API, mapped to a status code in one place. Every error response
//! is JSON: `{"error": "<kind>", "message": "<what happened>"}`, the kinds listed once in
//! [`ErrorKind`] (and so in the OpenAPI document).

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::FromRequest;
use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::store::{StoreError, TaskState};

/// What kind of error an answer reports: the `error` field of every error body, stable for
/// programs (the message is for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Invalid input (a parameter out of range, a malformed key, …).
    BadRequest,
    /// A group or tag name, or a list of them, outside the rules or limits.
    InvalidInput,
    /// A body over `--max-body` (413).
    BodyTooLarge,
    /// No token, or an unknown one (401).
    Unauthorized,
    /// A token outside its scope (403).
    Forbidden,
    /// No such token or record (404).
    NotFound,
    /// A change that does not fit what is recorded, or an idempotency key reused for other
    /// content, or a different report of an attempt already recorded (409).
    Conflict,
    /// The request took longer than `--request-timeout` (408).
    RequestTimeout,
    /// The coordinator is stopping (503).
    Unavailable,
    /// The store failed (503): the coordinator stops, and the next start recovers.
    StorageUnavailable,
    /// The connection cap is reached (503, answered before any route runs).
    TooManyConnections,
    /// A failure inside the coordinator (500; a bug, logged).
    Internal,
    /// A body that is not the JSON the route takes (400, 413, 415 or 422).
    BadJson,
    /// A malformed path parameter (400).
    BadPath,
    /// A malformed query parameter (400).
    BadQuery,
    /// A route that does not take this method (405).
    MethodNotAllowed,
    /// No such route (404).
    NoRoute,
    /// The worker left or was declared dead: register again (410).
    UnknownWorker,
    /// No such task in the caller's groups (404).
    UnknownTask,
    /// An id that exists already (409).
    Duplicate,
    /// A superseded attempt (409; the dispatcher's own refusal).
    StaleAttempt,
    /// The worker holds no such attempt, whether or not the task exists (409).
    NotAssigned,
    /// The task was cancelled while the attempt ran (409, with its `state`).
    Cancelled,
    /// The attempt already ended otherwise (409, with the task's `state`).
    Superseded,
    /// The task has ended (409, with its `state`).
    TaskEnded,
    /// Only a queued task can change; this one is running (409, with its `state`).
    NotQueued,
    /// Another coordinator serves (some of) the request's groups (421, with `owners`): send it
    /// there (split by owner, if they differ). An owner `null` has none right now: retry soon.
    Misdirected,
}

/// An API error: a status and a message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: ErrorKind,
    message: String,
    /// The task's state, when the refusal is about a task in the wrong state.
    state: Option<TaskState>,
    /// Where each group is served, for a misdirected request.
    owners: Option<Owners>,
}

/// Each group's coordinator address (`None`: none serves it right now).
pub type Owners = std::collections::BTreeMap<String, Option<String>>;

impl ApiError {
    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorKind::BadRequest, message)
    }

    /// A 400 for a name or list outside the rules and limits (as the dispatcher's own).
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorKind::InvalidInput, message)
    }

    /// A 413: a body over `--max-body`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::BodyTooLarge,
            message,
        )
    }

    /// A 400 for a malformed path parameter.
    pub fn bad_path(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorKind::BadPath, message)
    }

    /// A 401: no token, or one the coordinator does not know.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, ErrorKind::Unauthorized, message)
    }

    /// A 403: a known token, outside its scope.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, ErrorKind::Forbidden, message)
    }

    /// A 404 with `message`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorKind::NotFound, message)
    }

    /// A 409 with `message`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, ErrorKind::Conflict, message)
    }

    /// A 409 for a worker's report or request about an assignment that is not its own: the
    /// same answer whether the task exists or not, so a worker's token cannot probe task ids.
    pub fn not_assigned(worker: u64, task: u64, attempt: u32) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            ErrorKind::NotAssigned,
            format!("worker {worker} holds no attempt {attempt} of task {task}"),
        )
    }

    /// A 409 about a task that is in `state` (it ended, or the attempt named did).
    pub fn ended(kind: ErrorKind, message: impl Into<String>, state: TaskState) -> Self {
        let mut e = Self::new(StatusCode::CONFLICT, kind, message);
        e.state = Some(state);
        e
    }

    /// A 408: the request took longer than the request-time limit.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            ErrorKind::RequestTimeout,
            message,
        )
    }

    /// A 503: the coordinator cannot serve (it is stopping after a store failure).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Unavailable,
            message,
        )
    }

    /// A 500: a failure inside the coordinator (a bug; logged).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Internal,
            message,
        )
    }

    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The error's kind, the `error` field of its body.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// A body that is not the JSON the route takes (422, as `axum::Json` answers).
    pub fn bad_body(e: serde_json::Error) -> Self {
        let status = if e.is_data() {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        };
        Self::new(status, ErrorKind::BadJson, e.to_string())
    }

    /// The same error, saying which task of a batch caused it.
    pub fn in_batch(mut self, index: usize) -> Self {
        self.message = format!("task {index} of the batch: {}", self.message);
        self
    }

    fn new(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            state: None,
            owners: None,
        }
    }

    /// What happened, for people.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// A 421: these groups are served elsewhere (`owners`, every group of the request).
    pub fn misdirected(owners: Owners) -> Self {
        let elsewhere: Vec<String> = owners
            .iter()
            .map(|(g, o)| format!("{g:?} at {}", o.as_deref().unwrap_or("no coordinator yet")))
            .collect();
        let mut e = Self::new(
            StatusCode::MISDIRECTED_REQUEST,
            ErrorKind::Misdirected,
            format!(
                "this coordinator does not serve every group of the request: {}",
                elsewhere.join(", ")
            ),
        );
        e.owners = Some(owners);
        e
    }
}

/// The body of every error response.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What kind of error, stable for programs.
    pub error: ErrorKind,
    /// What happened, for people.
    pub message: String,
    /// The task's state, when the error is about a task in the wrong state (for example a
    /// cancel of a finished task, or a report of a cancelled one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<TaskState>,
    /// For a misdirected request (421): each group of the request and the address of the
    /// coordinator serving it (`null`: none right now).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owners: Option<Owners>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.kind,
            message: self.message,
            state: self.state,
            owners: self.owners,
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
            UnknownWorker(_) => (StatusCode::GONE, ErrorKind::UnknownWorker),
            UnknownTask(_) => (StatusCode::NOT_FOUND, ErrorKind::UnknownTask),
            DuplicateWorker(_) | DuplicateTask(_) => (StatusCode::CONFLICT, ErrorKind::Duplicate),
            StaleAttempt { .. } => (StatusCode::CONFLICT, ErrorKind::StaleAttempt),
            NotQueued(_) => (StatusCode::CONFLICT, ErrorKind::NotQueued),
            InvalidInput(_) => (StatusCode::BAD_REQUEST, ErrorKind::InvalidInput),
        };
        Self::new(status, kind, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let (status, kind) = match &e {
            StoreError::NotFound(_) => (StatusCode::NOT_FOUND, ErrorKind::NotFound),
            StoreError::Conflict(_) => (StatusCode::CONFLICT, ErrorKind::Conflict),
            StoreError::Backend(_) | StoreError::Locked(_) | StoreError::Fenced(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorKind::StorageUnavailable,
            ),
        };
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(error = %e, "the store failed");
        }
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
        Self::new(status, ErrorKind::BadJson, e.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorKind::BadPath, e.body_text())
    }
}

/// `axum::Json`, whose rejections (malformed JSON, wrong content type, unknown fields) are
/// JSON errors too.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct JsonBody<T>(pub T);

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorKind::BadQuery, e.body_text())
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
        ErrorKind::MethodNotAllowed,
        "this route does not take that method",
    )
}

/// The answer for routes that do not exist.
pub async fn no_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, ErrorKind::NoRoute, "no such route")
}

//! The coordinator's operations: every change a request asks for, each in one of two shapes
//! written once here. The HTTP layer (`crate::api`) only parses, authorises, calls one of these
//! and maps the result; the delivery protocol's operations (fetch, reports, reconciliation) are
//! in `crate::delivery`, on the same two shapes.
//!
//! - **Decided, then recorded** (`App::decided`): the dispatcher decides (a cancel, an update,
//!   a worker's removal, a report), the writer makes the decision durable, and only then is the
//!   caller answered. A store failure after the decision stops the coordinator
//!   ([`App::commit_decided`]); the next start recovers from the store.
//! - **Recorded, then published** (`App::recorded_first`): something new (a task, a worker, a
//!   token) is committed first and only then handed to the dispatcher or the keyring, so nothing
//!   can act on what the store does not have.
//!
//! Both run detached from the request ([`detach`]): a client that hangs up, or the request-time
//! limit, cannot separate a decision from its commit.

use switchyard::{TaskId, TaskSpec, TaskStatus, WorkerId};

use crate::app::{detach, now_ms, App};
use crate::auth::{self, Caller};
use crate::error::ApiError;
use crate::store::{Change, KeyRecord, Role, TaskRecord, TokenRecord, WorkerRecord};
use crate::sync::Arc;

/// A submission's idempotency key and the fingerprint of its content.
pub struct Keyed {
    /// The client's key.
    pub key: String,
    /// A digest of the submitted tasks.
    pub fingerprint: String,
}

impl App {
    /// Runs `decide` (a dispatcher decision and the changes that record it), commits the
    /// changes, and returns the decision: decided, then recorded. See the module docs.
    pub(crate) async fn decided<T: Send + 'static>(
        self: &Arc<Self>,
        decide: impl FnOnce(&App) -> Result<(T, Vec<Change>), ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let app = self.clone();
        detach(self, async move {
            let (decision, changes) = decide(&app)?;
            app.commit_decided(changes).await?;
            Ok(decision)
        })
        .await
    }

    /// Commits `changes`, then runs `publish` (hands what they created to the dispatcher or
    /// the keyring): recorded, then published. See the module docs. With a share of the groups
    /// (`--shared`), every one of `groups` must be served here, or nothing is done (421).
    pub(crate) async fn recorded_first<T: Send + 'static>(
        self: &Arc<Self>,
        groups: Vec<String>,
        changes: Vec<Change>,
        publish: impl FnOnce(&App) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let app = self.clone();
        detach(self, async move {
            app.check_served(&groups)?;
            app.writer.commit(changes).await?;
            publish(&app)
        })
        .await
    }

    /// Submits validated tasks (`tasks`, each its dispatcher spec and its record), all or none.
    /// With a key (scoped to token `scope`), the key is committed in the same transaction; if
    /// another request committed the same key first, its ids are returned instead
    /// (`Some(ids)`: nothing was created).
    pub async fn submit(
        self: &Arc<Self>,
        scope: u64,
        keyed: Option<Keyed>,
        tasks: Vec<(TaskSpec, TaskRecord)>,
    ) -> Result<Option<Vec<u64>>, ApiError> {
        let ids: Vec<u64> = tasks.iter().map(|(s, _)| s.id.0).collect();
        let groups = match self.share {
            Some(_) => tasks.iter().map(|(_, r)| r.group.clone()).collect(),
            None => Vec::new(),
        };
        let (specs, mut changes): (Vec<_>, Vec<_>) = tasks
            .into_iter()
            .map(|(spec, record)| (spec, Change::Submit(record)))
            .unzip();
        if let Some(k) = &keyed {
            let now = now_ms();
            changes.push(Change::Remember {
                key: KeyRecord {
                    scope,
                    key: k.key.clone(),
                    fingerprint: k.fingerprint.clone(),
                    ids,
                    created_ms: now,
                },
                expired_before_ms: self.key_expiry(now),
            });
        }
        let committed = self
            .recorded_first(groups, changes, move |app| {
                Ok(app.dispatcher.submit_many(specs)?)
            })
            .await;
        match (committed, keyed) {
            // Another request with the same key committed first: answer with its ids.
            (Err(e), Some(k)) if e.status() == axum::http::StatusCode::CONFLICT => self
                .remembered(scope, &k.key, &k.fingerprint)
                .await?
                .map(Some)
                .ok_or(e),
            (committed, _) => committed.map(|()| None),
        }
    }

    /// Cancels a task wherever it is (a running one is revoked from its worker).
    pub async fn cancel(self: &Arc<Self>, task: u64) -> Result<switchyard::Cancelled, ApiError> {
        let cancelled = self
            .decided(move |app| {
                let outcome = app.dispatcher.cancel(TaskId(task))?;
                Ok((outcome, vec![Change::Cancel { task }]))
            })
            .await;
        self.or_elsewhere(task, cancelled).await
    }

    /// `result`, or, if it says the task is unknown here, the 421 naming its owner when
    /// another coordinator serves it (see [`App::elsewhere`]).
    async fn or_elsewhere<T>(&self, task: u64, result: Result<T, ApiError>) -> Result<T, ApiError> {
        match result {
            Err(e) if e.kind() == crate::error::ErrorKind::UnknownTask => {
                Err(self.elsewhere(task, e).await)
            }
            other => other,
        }
    }

    /// Changes a queued task's priority and/or tags; it is placed afresh.
    pub async fn update(
        self: &Arc<Self>,
        task: u64,
        priority: Option<i32>,
        tags: Option<Vec<String>>,
    ) -> Result<TaskStatus, ApiError> {
        let updated = self
            .decided(move |app| {
                let placement = app
                    .dispatcher
                    .update(TaskId(task), priority, tags.as_deref())?;
                let change = Change::Update {
                    task,
                    priority,
                    tags,
                };
                Ok((placement, vec![change]))
            })
            .await;
        self.or_elsewhere(task, updated).await
    }

    /// Registers a worker serving `groups` with `tags` (validated); returns its id and token.
    pub async fn register_worker(
        self: &Arc<Self>,
        groups: Vec<String>,
        tags: Vec<String>,
    ) -> Result<(u64, String), ApiError> {
        let id = self.ids.worker().await?;
        let token = auth::generate();
        let token_hash = auth::hash(&token);
        let record = WorkerRecord {
            id,
            groups: groups.clone(),
            tags: tags.clone(),
            token_hash: token_hash.clone(),
        };
        self.check_served(&groups)?;
        self.recorded_first(
            groups.clone(),
            vec![Change::AddWorker(record)],
            move |app| {
                app.keyring.insert(token_hash, Caller::Worker(id));
                app.dispatcher.register(WorkerId(id), &groups, &tags)?;
                app.leases.renew(id);
                Ok(())
            },
        )
        .await?;
        Ok((id, token))
    }

    /// Removes `worker` (it left, or its lease expired): unregisters it, which redistributes
    /// its tasks, and records that durably. Returns how many running tasks were requeued.
    pub async fn remove_worker(self: &Arc<Self>, worker: u64) -> Result<usize, ApiError> {
        self.decided(move |app| {
            let changes = app.unregister(worker)?;
            Ok((changes.len() - 1, changes))
        })
        .await
    }

    /// Creates a submitter token for `groups` (validated); returns its record and the token.
    pub async fn add_token(
        self: &Arc<Self>,
        groups: Vec<String>,
    ) -> Result<(Arc<TokenRecord>, String), ApiError> {
        let token = auth::generate();
        let record = Arc::new(TokenRecord {
            id: self.ids.token().await?,
            hash: auth::hash(&token),
            role: Role::Submitter,
            groups,
            created_ms: now_ms(),
        });
        let published = record.clone();
        self.recorded_first(
            Vec::new(),
            vec![Change::AddToken((*record).clone())],
            move |app| {
                app.keyring
                    .insert(published.hash.clone(), Caller::User(published));
                Ok(())
            },
        )
        .await?;
        Ok((record, token))
    }

    /// Revokes submitter token `id`: durable first, then it stops working.
    pub async fn revoke_token(self: &Arc<Self>, id: u64) -> Result<(), ApiError> {
        match self.keyring.users().iter().find(|t| t.id == id) {
            None => return Err(ApiError::not_found(format!("no token {id} in force"))),
            Some(t) if t.role == Role::Admin => {
                return Err(ApiError::conflict(
                    "the admin token is replaced by starting the server with --admin-token",
                ))
            }
            Some(_) => {}
        }
        self.recorded_first(Vec::new(), vec![Change::RevokeToken { id }], move |app| {
            app.keyring.revoke(id);
            Ok(())
        })
        .await
    }
}

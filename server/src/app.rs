//! The coordinator's state: dispatcher, store, writer, leases, wakeups and keyring, and how it
//! opens (recovery, admin token). Its operations are in [`crate::operations`] and
//! [`crate::delivery`].
//!
//! One rule joins the dispatcher and the store: the dispatcher decides, the writer makes the
//! decision durable, and only then is the caller answered. A submission is the one exception
//! in order: it is validated, committed, and only then handed to the dispatcher, so no fetch
//! can ever assign a task the store does not have. (`App::decided` and `App::recorded_first`
//! are those two shapes, written once.)
//!
//! A decision and its commit must not be separated by a cancelled request (a client that hangs
//! up, or the request-time limit): hyper drops a handler's future when its connection closes.
//! So every decide-and-commit step runs through [`detach`], on a task of its own that finishes
//! whatever happens to the request.
//!
//! A decision the store then fails to record (an I/O error, a full disk) leaves the dispatcher
//! ahead of the store. The coordinator does not guess how to undo it: on any storage failure
//! it stops ([`App::poison`]). Requests get 503 from then on, the server shuts down, and the
//! next start rebuilds the dispatcher from the store, which holds every acknowledged decision.
//!
//! On PostgreSQL with `--shared`, the app serves only a share of the groups: see
//! [`crate::sharing`] for what changes (an admission gate around every decide-and-commit step,
//! 421 for the groups served elsewhere, slots loaded and handed over as coordinators come and
//! go).
//!
//! `App` owns its parts (the keyring of `crate::auth`, the leases of `crate::liveness`), and two
//! of those modules name `App` back: the authorising extractors read the keyring from the
//! request's `App` state, and the reaper calls the `App`'s operations when a lease expires.
//! That is the shape of axum's `State`: the parts depend on the state type, not on each
//! other, and nothing in `app` calls into an extractor or the reaper's loop except to start it.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchyard::{Config, Dispatcher, Limits};

use crate::auth::{self, Caller, Keyring};
use crate::delivery::Deliveries;
use crate::error::ApiError;
use crate::ids::Ids;
use crate::input;
use crate::liveness::{reap, Leases};
use crate::metrics::Metrics;
use crate::ownership::{self, Keeper};
use crate::recovery::recover;
use crate::sharing::{self, Share};
use crate::store::leases::Fence;
use crate::store::{
    Change, PgStore, Role, SqliteStore, Store, StoreError, StoreHandle, TokenRecord,
};
use crate::sync::{Arc, Mutex, Weak};
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
    /// On PostgreSQL: how long a coordinator's hold on its groups lasts without renewal (it
    /// renews five times per lease; another coordinator may take the groups once it lapses).
    pub group_lease: Duration,
    /// On PostgreSQL: wait for as long as it takes for another coordinator's group leases to
    /// lapse, then serve (a standby), instead of refusing to start.
    pub standby: bool,
    /// On PostgreSQL: serve a share of the groups alongside the database's other coordinators
    /// (see [`crate::sharing`]), rather than all of them alone.
    pub shared: bool,
    /// Most tasks in one batch submission.
    pub max_batch: usize,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// Longest a fetch may wait for work (long-poll).
    pub max_wait: Duration,
    /// Longest a request may take, long-poll included; must exceed `max_wait`.
    pub request_timeout: Duration,
    /// The admin token. `None` keeps the stored one, or generates one on the first start.
    pub admin_token: Option<String>,
    /// How long a submission's idempotency key is remembered.
    pub key_window: Duration,
    /// A connection must send a request's complete head within this (after connecting or after
    /// the previous response): bounds half-sent headers and idle keep-alive connections.
    pub header_timeout: Duration,
    /// Most connections served at once (lowered to fit the open-files limit).
    pub max_connections: usize,
    /// On shutdown, how long open connections may finish before they are dropped.
    pub shutdown_grace: Duration,
}

impl Settings {
    /// Checks the settings together; the error names the flag to change.
    pub fn validate(&self) -> Result<(), String> {
        let at_least = |value: usize, least: usize, flag: &str| {
            if value < least {
                Err(format!("{flag} must be at least {least}"))
            } else {
                Ok(())
            }
        };
        at_least(self.max_fetch, 1, "--max-fetch")?;
        at_least(self.max_batch, 1, "--max-batch")?;
        // `null`, the smallest payload, is 4 bytes.
        at_least(self.max_payload, 4, "--max-payload")?;
        at_least(self.max_body, 64, "--max-body")?;
        at_least(self.max_connections, 1, "--max-connections")?;
        if self.header_timeout.is_zero() {
            return Err("--header-timeout must be above 0".into());
        }
        if self.request_timeout <= self.max_wait {
            return Err(
                "--request-timeout must be longer than --max-wait (the longest fetch wait)".into(),
            );
        }
        if self.lease_timeout.is_zero() {
            return Err("--lease-timeout must be above 0".into());
        }
        if self.group_lease < Duration::from_millis(100) {
            return Err("--group-lease must be at least 0.1 seconds".into());
        }
        if let Some(t) = &self.admin_token {
            if t.trim().len() < MIN_ADMIN_TOKEN {
                return Err(format!(
                    "the admin token must be at least {MIN_ADMIN_TOKEN} characters \
                     (a generated one is 67): a short token can be guessed"
                ));
            }
        }
        Ok(())
    }
}

/// The shortest admin token accepted from the configuration.
pub const MIN_ADMIN_TOKEN: usize = 32;

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_fetch: 256,
            max_payload: 1 << 20,
            lease_timeout: Duration::from_secs(15),
            group_lease: Duration::from_millis(2500),
            standby: false,
            shared: false,
            max_batch: 1000,
            max_body: 16 << 20,
            max_wait: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            admin_token: None,
            key_window: Duration::from_secs(24 * 3600),
            header_timeout: Duration::from_secs(10),
            max_connections: 4096,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// The coordinator: dispatcher, store and writer, and the request-side state around them.
pub struct App {
    pub(crate) dispatcher: Dispatcher,
    pub(crate) store: StoreHandle,
    pub(crate) writer: Writer,
    pub(crate) ids: Ids,
    pub(crate) limits: Settings,
    pub(crate) leases: Leases,
    pub(crate) wakeups: Arc<Wakeups>,
    pub(crate) keyring: Keyring,
    pub(crate) metrics: Metrics,
    pub(crate) deliveries: Deliveries,
    /// The configured limits on new input (the dispatcher's may be wider: see [`crate::input`]).
    pub(crate) input_limits: Limits,
    /// With `--shared`: the slots this coordinator serves (see [`crate::sharing`]).
    pub(crate) share: Option<Arc<Share>>,
}

/// What [`App::open`] returns.
pub struct Opened {
    /// The coordinator.
    pub app: Arc<App>,
    /// The writer's task: await it after the last request to drain the writer.
    pub writer: tokio::task::JoinHandle<()>,
    /// The admin token, when this start generated it (the first start without
    /// `Settings::admin_token`). It is stored only hashed: show it to the operator now.
    pub new_admin_token: Option<String>,
}

/// Where the lease keeper's halt goes: the app once it exists, else the reason, kept until it
/// does (see `App::open_postgres`).
type HaltTarget = (Option<Weak<App>>, Option<String>);

/// Why the coordinator could not start (a store, configuration or recovery failure).
pub type StartError = Box<dyn std::error::Error + Send + Sync>;

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Runs `step` to the end on its own task, even if the request awaiting it is cancelled, and
/// admitted by `app` ([`App::admit`]: with a share of the groups, no slot changes hands while
/// it runs). See the module docs.
pub async fn detach<T: Send + 'static>(
    app: &App,
    step: impl Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    let admitted = app.admit().await;
    let step = async move {
        let done = step.await;
        drop(admitted);
        done
    };
    tokio::spawn(step).await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "a request step panicked");
        Err(ApiError::internal(
            "the request failed inside the coordinator",
        ))
    })
}

impl App {
    /// Opens the embedded SQLite store in `data_dir`, then [`App::open_store`].
    pub async fn open(
        data_dir: &Path,
        config: Config,
        limits: Settings,
    ) -> Result<Opened, StartError> {
        let dir = data_dir.to_path_buf();
        let store = tokio::task::spawn_blocking(move || SqliteStore::open(&dir))
            .await
            .map_err(|e| format!("opening the store panicked: {e}"))??;
        Self::open_store(Arc::new(store), config, limits).await
    }

    /// Opens the PostgreSQL store at `url` (migrating its schema), joins it as a coordinator
    /// reachable at `address` and takes its groups' leases (see [`crate::ownership`]), then
    /// [`App::open_store`] with every write fenced by those leases. The coordinator stops if
    /// it loses them; awaiting [`Opened::writer`] also gives them up.
    pub async fn open_postgres(
        url: &str,
        address: &str,
        config: Config,
        limits: Settings,
    ) -> Result<Opened, StartError> {
        let (url, address, ttl) = (url.to_string(), address.to_string(), limits.group_lease);
        // A restart after a crash waits for the old leases to expire; a standby for ever.
        let patience = (!limits.standby).then_some(ttl + ttl / 2);
        let (store, keeper) = tokio::task::spawn_blocking(move || {
            let fence = Arc::new(Fence::default());
            let store = Arc::new(PgStore::open(&url)?.fenced(fence.clone()));
            let keeper = Keeper::start(store.clone(), fence, &address, ttl, patience)?;
            Ok::<_, StoreError>((store, Arc::new(keeper)))
        })
        .await
        .map_err(|e| format!("opening the store panicked: {e}"))??;
        let target = keep_leases(keeper.clone());
        let opened = match Self::open_store(store, config, limits).await {
            Ok(opened) => opened,
            Err(e) => {
                let _ = tokio::task::spawn_blocking(move || keeper.stop()).await;
                return Err(e);
            }
        };
        Ok(adopt_halt(opened, &target, keeper))
    }

    /// Opens the PostgreSQL store at `url` and joins it as one of several coordinators serving
    /// it at once, reachable at `address` (`serve --shared`; see [`crate::sharing`]): it serves
    /// the groups of the slots it gains, and hands slots over as coordinators come and go.
    /// Returns once the first balancing step is done (alone, it then serves every group).
    pub async fn open_shared(
        url: &str,
        address: &str,
        config: Config,
        limits: Settings,
    ) -> Result<Opened, StartError> {
        limits.validate()?;
        let (url, at, ttl) = (url.to_string(), address.to_string(), limits.group_lease);
        let (store, keeper, state) = tokio::task::spawn_blocking(move || {
            let fence = Arc::new(Fence::default());
            let store = Arc::new(PgStore::open(&url)?.fenced(fence.clone()));
            let keeper = Keeper::join(store.clone(), fence, &at, ttl)?;
            // Tokens, ids and the last start; tasks come with the slots.
            let state = store.recover_slots(&[]).inspect_err(|_| keeper.stop())?;
            Ok::<_, StoreError>((store, Arc::new(keeper), state))
        })
        .await
        .map_err(|e| format!("opening the store panicked: {e}"))??;
        let target = keep_leases(keeper.clone());
        let share = Arc::new(Share::new(
            keeper.clone(),
            store.clone(),
            address.to_string(),
        ));
        let opened =
            match Self::open_recovered(store, state, config, limits, Some(share.clone())).await {
                Ok(opened) => opened,
                Err(e) => {
                    let _ = tokio::task::spawn_blocking(move || keeper.stop()).await;
                    return Err(e);
                }
            };
        let opened = adopt_halt(opened, &target, keeper);
        match opened.app.rebalance(&share).await {
            Ok(()) => {}
            Err(sharing::Unbalanced::Retry(e)) => {
                tracing::warn!(error = %e, "the first balancing step failed; retrying")
            }
            Err(sharing::Unbalanced::Stop(reason)) => opened.app.poison(reason),
        }
        tokio::spawn(sharing::balance(
            Arc::downgrade(&opened.app),
            share,
            sharing::period(ttl),
        ));
        Ok(opened)
    }

    /// Recovers `store`'s state into a dispatcher with `config`, settles the admin token and
    /// starts the writer and the reaper.
    pub async fn open_store(
        store: Arc<dyn Store>,
        config: Config,
        limits: Settings,
    ) -> Result<Opened, StartError> {
        limits.validate()?;
        let state = StoreHandle::new(store.clone()).recover().await?;
        Self::open_recovered(store, state, config, limits, None).await
    }

    /// [`App::open_store`] from `state`, read from `store`; with `share`, serving only the
    /// share's slots (none at first: they come with [`App::gain`]).
    async fn open_recovered(
        store: Arc<dyn Store>,
        state: crate::store::Recovery,
        mut config: Config,
        limits: Settings,
        share: Option<Arc<Share>>,
    ) -> Result<Opened, StartError> {
        let handle = StoreHandle::new(store.clone());
        // Limits bound new input; what is stored loads whatever they are now.
        let input_limits = config.limits.clone();
        config.limits = input::widened(&input_limits, &state);
        // The class limit is checked before a submission commits (`App::check_task`): the
        // dispatcher must not refuse a task the store already holds.
        config.limits.max_classes = usize::MAX;
        let dispatcher = Dispatcher::new(config)?;
        let recovered = recover(&state, &dispatcher, now_ms())?;
        let metrics = Metrics::new();
        let (writer, writer_task) =
            Writer::spawn_observed(store.clone(), 65_536, 4_096, metrics.writer());
        let boot = match &share {
            // Workers register anew with each coordinator: its id (never reused) suffices.
            Some(share) => share.keeper().id() as u64,
            None => {
                // This start's number: delivery ids of this start are above every earlier one's.
                let boot = state.boot + 1;
                let mut first = recovered.requeued.clone();
                first.push(Change::Boot { boot });
                writer.commit(first).await?;
                boot
            }
        };
        tracing::info!(
            workers = recovered.workers,
            queued = recovered.queued,
            running = recovered.running,
            requeued = recovered.requeued.len(),
            "recovered"
        );

        let keyring = Keyring::default();
        for w in state.workers.iter().chain(&state.removed_workers) {
            if !w.token_hash.is_empty() {
                keyring.insert(w.token_hash.clone(), Caller::Worker(w.id));
            }
        }
        let ids = Ids::new(handle.clone());
        let (tokens, new_admin_token) =
            settle_admin_token(&writer, state.tokens, &ids, &limits).await?;
        for t in tokens {
            keyring.insert(t.hash.clone(), Caller::User(Arc::new(t)));
        }

        let leases = Leases::new(limits.lease_timeout);
        // Restored workers start with a fresh lease: a full timeout to come back.
        for w in &state.workers {
            leases.renew(w.id);
        }
        let wakeups = Arc::new(Wakeups::default());
        dispatcher.set_waker(wakeups.clone());
        let app = Arc::new(Self {
            dispatcher,
            store: handle,
            writer,
            ids,
            limits,
            leases,
            wakeups,
            keyring,
            metrics,
            deliveries: Deliveries::new(boot),
            input_limits,
            share,
        });
        // The reaper holds only a weak reference, so dropping the app still drains the writer.
        tokio::spawn(reap(Arc::downgrade(&app), app.leases.timeout() / 4));
        tokio::spawn(forget_keys(Arc::downgrade(&app)));
        Ok(Opened {
            app,
            writer: writer_task,
            new_admin_token,
        })
    }

    /// Checks a new task's group and tags against the configured limits and name rules, and a
    /// task of a new class against `--max-classes` (a tag change, with `group` `None`, is not
    /// counted). Checked before the task commits, so concurrent submissions of new classes can
    /// pass the limit by at most one class each.
    pub(crate) fn check_task<S: AsRef<str>>(
        &self,
        group: Option<&str>,
        tags: &[S],
    ) -> Result<(), ApiError> {
        input::check_task(group, tags, &self.input_limits)?;
        match group {
            Some(group) => input::check_class_count(
                self.dispatcher.has_class(group, tags),
                self.dispatcher.class_count(),
                &self.input_limits,
            ),
            None => Ok(()),
        }
    }

    /// Checks a new worker's groups and tags against the configured limits and name rules.
    pub(crate) fn check_worker<S: AsRef<str>, T: AsRef<str>>(
        &self,
        groups: &[S],
        tags: &[T],
    ) -> Result<(), ApiError> {
        input::check_worker(groups, tags, &self.input_limits)
    }

    /// Idempotency keys created before this (Unix ms) have expired at `now`.
    pub(crate) fn key_expiry(&self, now: i64) -> i64 {
        now.saturating_sub(self.limits.key_window.as_millis() as i64)
    }

    /// The ids of the submission remembered under `key` for token `scope`, if it is within the
    /// idempotency window; 409 if the key was used for different content.
    pub(crate) async fn remembered(
        &self,
        scope: u64,
        key: &str,
        fingerprint: &str,
    ) -> Result<Option<Vec<u64>>, ApiError> {
        let oldest = self.key_expiry(now_ms());
        match self.store.key(scope, key.to_string()).await? {
            Some(k) if k.created_ms < oldest => Ok(None),
            Some(k) if k.fingerprint == fingerprint => Ok(Some(k.ids)),
            Some(_) => Err(ApiError::conflict(format!(
                "idempotency key {key:?} was used for a different submission"
            ))),
            None => Ok(None),
        }
    }

    /// Worker leases (renewed by worker requests, read by the reaper).
    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// Every valid token.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The coordinator's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether a fetch of `worker` is waiting for work right now.
    pub fn is_waiting(&self, worker: u64) -> bool {
        self.wakeups.is_waiting(worker)
    }

    /// The store (for tests and tools: reads only; every write goes through the writer).
    pub fn store(&self) -> &dyn Store {
        &**self.store.backend()
    }

    /// The dispatcher (for tests and statistics).
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Commits `changes` that record decisions the dispatcher has already made. If the store
    /// fails, the dispatcher is ahead of it; the writer has marked itself failed, which stops
    /// the coordinator ([`App::poison`]).
    pub async fn commit_decided(&self, changes: Vec<Change>) -> Result<(), ApiError> {
        self.writer.commit(changes).await.map_err(|e| {
            if !matches!(e, StoreError::Backend(_) | StoreError::Fenced(_)) {
                // The store's fencing refused what the dispatcher decided: a bug, not an outage.
                tracing::error!(error = %e, "the store refused a decided change");
            }
            e.into()
        })
    }

    /// A refusal read from the dispatcher's state (a stale attempt, an unknown task or worker)
    /// is only true if the decisions behind it are durable: waits for the writer to commit
    /// everything sent before, and answers 503 instead if the store has failed meanwhile.
    ///
    /// One window remains: a decision whose commit is not yet sent when the refusal waits
    /// (between a dispatcher call and its commit on another thread).
    pub async fn durable_refusal(&self, refusal: ApiError) -> ApiError {
        let _ = self.writer.commit(Vec::new()).await;
        match self.poisoned() {
            Some(reason) => ApiError::unavailable(format!("the coordinator is stopping: {reason}")),
            None => refusal,
        }
    }

    /// Stops serving: from now on every request gets 503, and [`crate::api::serve`] shuts down.
    /// The writer does this itself when the store fails; the first reason is kept.
    pub fn poison(&self, reason: String) {
        if self.writer.fail(reason.clone()) {
            tracing::error!(%reason, "stopping: restart to recover from the store");
        }
    }

    /// Why the coordinator stopped, if it has.
    pub fn poisoned(&self) -> Option<String> {
        self.writer.failure()
    }

    /// Resolves once the coordinator is poisoned.
    pub async fn halted(&self) {
        self.writer.failed().await
    }
}

/// Starts renewing `keeper`'s leases now, not after recovery (which may take longer than a
/// lease). Until the app exists, a halt is kept, and stops the app as soon as it does
/// ([`adopt_halt`]).
fn keep_leases(keeper: Arc<Keeper>) -> Arc<Mutex<HaltTarget>> {
    let target: Arc<Mutex<HaltTarget>> = Default::default();
    let (alive, halt) = (target.clone(), target.clone());
    tokio::spawn(ownership::keep(
        keeper,
        move || {
            alive
                .lock()
                .0
                .as_ref()
                .is_none_or(|app| app.strong_count() > 0)
        },
        move |reason| {
            let mut target = halt.lock();
            match target.0.as_ref().and_then(Weak::upgrade) {
                Some(app) => app.poison(reason),
                None => target.1 = Some(reason),
            }
        },
    ));
    target
}

/// Points the lease keeper's halt at the opened app (applying one that came early), and makes
/// the writer's end give the leases up: once it has drained, nothing more is written.
fn adopt_halt(opened: Opened, target: &Mutex<HaltTarget>, keeper: Arc<Keeper>) -> Opened {
    let early = {
        let mut target = target.lock();
        target.0 = Some(Arc::downgrade(&opened.app));
        target.1.take()
    };
    if let Some(reason) = early {
        opened.app.poison(reason);
    }
    let writer = opened.writer;
    let writer = tokio::spawn(async move {
        let _ = writer.await;
        let _ = tokio::task::spawn_blocking(move || keeper.stop()).await;
    });
    Opened { writer, ..opened }
}

/// Forgets idempotency keys older than the window, once a minute, until the app is dropped.
/// (A lookup ignores an expired key anyway; this keeps the table small.)
async fn forget_keys(app: Weak<App>) {
    let mut every = tokio::time::interval(Duration::from_secs(60));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(app) = app.upgrade() else { return };
        let before_ms = app.key_expiry(now_ms());
        if let Err(e) = app
            .writer
            .commit(vec![Change::ForgetKeys { before_ms }])
            .await
        {
            tracing::warn!(error = %e, "forgetting old idempotency keys failed");
        }
    }
}

/// Makes the configured admin token the only one, or generates one if none exists. Returns the
/// user tokens to load and the generated admin token, if any.
async fn settle_admin_token(
    writer: &Writer,
    mut tokens: Vec<TokenRecord>,
    ids: &Ids,
    limits: &Settings,
) -> Result<(Vec<TokenRecord>, Option<String>), StartError> {
    let admins = || tokens.iter().filter(|t| t.role == Role::Admin);
    let (wanted, generated) = match &limits.admin_token {
        Some(t) if admins().any(|a| a.hash == auth::hash(t.trim())) => return Ok((tokens, None)),
        // Trimmed, as presented tokens are.
        Some(t) => (t.trim().to_string(), None),
        None if admins().next().is_some() => return Ok((tokens, None)),
        None => {
            let t = auth::generate();
            (t.clone(), Some(t))
        }
    };
    let mut changes: Vec<Change> = admins().map(|a| Change::RevokeToken { id: a.id }).collect();
    let record = TokenRecord {
        id: ids.token().await?,
        hash: auth::hash(&wanted),
        role: Role::Admin,
        groups: Vec::new(),
        created_ms: now_ms(),
    };
    changes.push(Change::AddToken(record.clone()));
    match writer.commit(changes).await {
        Ok(()) => {}
        // Coordinators sharing a database, started together with the same token: another one
        // stored it first (its hash is unique), and the token sync brings it here.
        Err(StoreError::Conflict(e)) if limits.shared && generated.is_none() => {
            tracing::info!(%e, "admin token set by another coordinator");
            tokens.retain(|t| t.role != Role::Admin);
            return Ok((tokens, None));
        }
        Err(e) => return Err(e.into()),
    }
    tokens.retain(|t| t.role != Role::Admin);
    tokens.push(record);
    tracing::info!(
        "admin token {}",
        if generated.is_some() {
            "generated"
        } else {
            "set from the configuration"
        }
    );
    Ok((tokens, generated))
}

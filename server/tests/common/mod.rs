//! A minimal HTTP/1.1 client for the tests: one request per connection, JSON in and out.
//!
//! [`Session`] presents the right token by itself: a worker's own token on `/v1/workers/{id}/…`
//! routes (learned from the registration's answer), the admin token everywhere else. Tests of
//! the auth boundaries use [`call_as`] and name the token.
#![allow(dead_code)]

pub mod pg;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use switchyard::Config;
use switchyard_server::api::serve;
use switchyard_server::app::{App, Opened, Settings};
use switchyard_server::store::{
    AttemptRecord, Change, IdKind, KeyRecord, ListFilter, PgStore, Recovery, SqliteStore, Store,
    StoreError, TaskRecord,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// The admin token the tests start servers with.
pub const ADMIN: &str = "sy_test_admin_token_for_the_test_suite";

/// One HTTP/1.1 request over a fresh connection with `token` (if any); returns the status and
/// the response text (head and body).
pub async fn raw(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{auth}\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    send(addr, &req).await
}

/// Sends `request` (a whole HTTP/1.1 request, `Connection: close`) as is; returns the status
/// and the response text.
pub async fn send(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let status: u16 = text[9..12].parse().unwrap();
    (status, text)
}

/// The JSON body of a response text.
pub fn json_body(text: &str) -> Value {
    let json = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(json).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

/// [`raw`], with the body parsed as JSON.
pub async fn call_as(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let (status, text) = raw(addr, token, method, path, body).await;
    (status, json_body(&text))
}

/// A server's address, its admin token and the tokens of the workers registered through it.
pub struct Session {
    pub addr: SocketAddr,
    pub admin: String,
    workers: Mutex<HashMap<u64, String>>,
}

impl Session {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            admin: ADMIN.to_string(),
            workers: Mutex::default(),
        }
    }

    /// The token of worker `id`, registered through this session.
    pub fn worker_token(&self, id: u64) -> String {
        self.workers.lock().unwrap()[&id].clone()
    }

    /// Presents `token` as worker `id` from now on (for example after a restart).
    pub fn learn(&self, id: u64, token: String) {
        self.workers.lock().unwrap().insert(id, token);
    }

    /// The token a request to `path` presents: the worker's own on its routes, else admin.
    fn token_for(&self, path: &str) -> String {
        let worker = path
            .strip_prefix("/v1/workers/")
            .and_then(|rest| rest.split('/').next())
            .and_then(|id| id.parse::<u64>().ok());
        worker
            .and_then(|w| self.workers.lock().unwrap().get(&w).cloned())
            .unwrap_or_else(|| self.admin.clone())
    }
}

/// One request with the session's choice of token (see the module docs).
pub async fn call(s: &Session, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let token = s.token_for(path);
    let (status, value) = call_as(s.addr, Some(&token), method, path, body).await;
    if method == "POST" && path == "/v1/workers" && status == 201 {
        let id = value["id"].as_u64().unwrap();
        let token = value["token"].as_str().unwrap().to_string();
        s.workers.lock().unwrap().insert(id, token);
    }
    (status, value)
}

pub async fn post(s: &Session, path: &str, body: Value) -> (u16, Value) {
    call(s, "POST", path, Some(&body.to_string())).await
}

/// Registers a worker (`body`: its groups and tags); returns its id.
pub async fn register(s: &Session, body: Value) -> u64 {
    let (status, w) = post(s, "/v1/workers", body).await;
    assert_eq!(status, 201, "{w}");
    w["id"].as_u64().unwrap()
}

/// Submits a task; returns its id.
pub async fn submit(s: &Session, body: Value) -> u64 {
    let (status, t) = post(s, "/v1/tasks", body).await;
    assert_eq!(status, 201, "{t}");
    t["id"].as_u64().unwrap()
}

/// A coordinator serving on an ephemeral loopback port, in this process.
pub struct Server {
    pub addr: SocketAddr,
    pub client: Arc<Session>,
    pub app: Arc<App>,
    /// The admin token this start generated, if it generated one.
    pub new_admin_token: Option<String>,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<std::io::Result<switchyard_server::listener::Stopped>>,
    writer: tokio::task::JoinHandle<()>,
}

/// Small limits, so the tests can reach them, and the [`ADMIN`] token.
pub fn test_settings() -> Settings {
    Settings {
        max_fetch: 16,
        max_payload: 64,
        lease_timeout: Duration::from_secs(30),
        // Long enough that renewals delayed by a loaded CI machine never lapse it.
        group_lease: Duration::from_secs(3),
        max_batch: 3,
        max_body: 4096,
        max_wait: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        admin_token: Some(ADMIN.to_string()),
        ..Settings::default()
    }
}

/// Opens a coordinator on `dir` and serves it: on the SQLite store in `dir`, or, when the
/// suite runs on PostgreSQL (`SWITCHYARD_TEST_STORE=postgres`), on `dir`'s database.
pub async fn start_with(dir: &Path, config: Config, settings: Settings) -> Server {
    let opened = match pg::database_for(dir) {
        Some(url) => App::open_postgres(&url, "127.0.0.1:0", config, settings).await,
        None => App::open(dir, config, settings).await,
    };
    serve_opened(opened.unwrap()).await
}

/// Opens a coordinator on `store` and serves it.
pub async fn start_store(store: Arc<dyn Store>, config: Config, settings: Settings) -> Server {
    serve_opened(App::open_store(store, config, settings).await.unwrap()).await
}

async fn serve_opened(opened: Opened) -> Server {
    let Opened {
        app,
        writer,
        new_admin_token,
    } = opened;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(serve(listener, app.clone(), async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        client: Arc::new(Session::new(addr)),
        app,
        new_admin_token,
        stop,
        served,
        writer,
    }
}

impl Server {
    /// Stops serving and drains the writer (a clean shutdown).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.served.await.unwrap().unwrap();
        drop(self.app);
        self.writer.await.unwrap();
    }
}

/// Starts the `switchyard` binary (`serve` on an ephemeral port, the [`ADMIN`] token, `dir`,
/// then `args`); returns it and the address it logged.
pub fn spawn_binary(dir: &Path, args: &[&str]) -> (Spawned, SocketAddr) {
    spawn_binary_at(dir, "127.0.0.1:0", args)
}

/// [`spawn_binary`] listening on `bind`.
pub fn spawn_binary_at(dir: &Path, bind: &str, args: &[&str]) -> (Spawned, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    command.args(serve_args(dir, bind)).args(args);
    spawn_serving(command)
}

/// The arguments of `serve` on `dir` at `bind` with the [`ADMIN`] token (on `dir`'s database
/// when the suite runs on PostgreSQL: see [`start_with`]).
pub fn serve_args(dir: &Path, bind: &str) -> Vec<String> {
    ["serve", "--bind", bind, "--admin-token", ADMIN]
        .map(String::from)
        .into_iter()
        .chain(store_args(dir))
        .collect()
}

/// The arguments that put a coordinator's store at `dir`: its data directory, or on
/// PostgreSQL its database (with a 2 s group lease: a restart after a SIGKILL waits for it to
/// lapse, and a loaded machine must not delay a renewal past it).
pub fn store_args(dir: &Path) -> Vec<String> {
    match pg::database_for(dir) {
        Some(url) => vec![
            "--database-url".into(),
            url,
            "--group-lease".into(),
            "2".into(),
        ],
        None => vec![
            "--data-dir".into(),
            dir.to_str().expect("a UTF-8 temporary path").into(),
        ],
    }
}

/// A process a test started: killed and reaped when dropped, so a failing test (a panic before
/// its own `kill`) leaves nothing running. Derefs to the [`Child`].
pub struct Spawned(pub Child);

impl std::ops::Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `command` (a `switchyard serve`); returns it and the address it logged.
pub fn spawn_serving(command: Command) -> (Spawned, SocketAddr) {
    let (child, addr, _) = spawn_serving_logged(command);
    (child, addr)
}

/// [`spawn_serving`], also returning what it logged before it served.
pub fn spawn_serving_logged(mut command: Command) -> (Spawned, SocketAddr, Vec<String>) {
    let mut before = Vec::new();
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the switchyard binary starts");
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    for line in lines.by_ref() {
        let line = line.expect("readable log");
        if let Some((_, addr)) = line.split_once("addr=") {
            let addr = addr.split_whitespace().next().unwrap().parse().unwrap();
            // Keep draining the log so the server never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return (Spawned(child), addr, before);
        }
        before.push(line);
    }
    let _ = child.kill();
    let status = child.wait();
    panic!(
        "the server exited before serving: {status:?}; its log:\n{}",
        before.join("\n")
    );
}

/// What runs before each commit of a [`Hooked`] store: it may wait, record, or fail the commit.
pub type BeforeApply = Box<dyn Fn(&[Change]) -> Result<(), StoreError> + Send + Sync>;

/// The store for `dir`: the SQLite store in it, or its database when the suite runs on
/// PostgreSQL (see [`start_with`]).
pub fn open_store(dir: &Path) -> Arc<dyn Store> {
    match pg::database_for(dir) {
        Some(url) => Arc::new(PgStore::open(&url).unwrap()),
        None => Arc::new(SqliteStore::open(dir).unwrap()),
    }
}

/// The test's store ([`open_store`]) with a hook before every commit; everything else is
/// passed through.
pub struct Hooked {
    pub inner: Arc<dyn Store>,
    before_apply: BeforeApply,
}

impl Hooked {
    pub fn open(dir: &Path, before_apply: BeforeApply) -> Arc<Self> {
        Arc::new(Self {
            inner: open_store(dir),
            before_apply,
        })
    }
}

impl Store for Hooked {
    fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        (self.before_apply)(changes)?;
        self.inner.apply(changes)
    }
    fn recover_groups(&self, groups: Option<&[String]>) -> Result<Recovery, StoreError> {
        self.inner.recover_groups(groups)
    }
    fn task(&self, id: u64) -> Result<Option<TaskRecord>, StoreError> {
        self.inner.task(id)
    }
    fn tasks(&self, ids: &[u64]) -> Result<Vec<TaskRecord>, StoreError> {
        self.inner.tasks(ids)
    }
    fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>, StoreError> {
        self.inner.list(filter)
    }
    fn attempt(&self, task: u64, attempt: u32) -> Result<Option<AttemptRecord>, StoreError> {
        self.inner.attempt(task, attempt)
    }
    fn key(&self, scope: u64, key: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.key(scope, key)
    }
    fn reserve(&self, kind: IdKind, n: u64) -> Result<std::ops::Range<u64>, StoreError> {
        self.inner.reserve(kind, n)
    }
}

/// Faults on demand for a [`Hooked`] store: commits slowed down or made to fail.
#[derive(Default)]
pub struct Faults {
    /// Each commit first sleeps this long.
    pub delay_ms: std::sync::atomic::AtomicU64,
    /// Each commit fails (as an I/O error would).
    pub fail: std::sync::atomic::AtomicBool,
}

/// A store in `dir` whose commits obey the returned [`Faults`].
pub fn faulty(dir: &Path) -> (Arc<Faults>, Arc<Hooked>) {
    let faults = Arc::new(Faults::default());
    let f = faults.clone();
    let store = Hooked::open(
        dir,
        Box::new(move |_| {
            use std::sync::atomic::Ordering::Relaxed;
            std::thread::sleep(Duration::from_millis(f.delay_ms.load(Relaxed)));
            if f.fail.load(Relaxed) {
                return Err(StoreError::Backend("disk I/O error (injected)".into()));
            }
            Ok(())
        }),
    );
    (faults, store)
}

/// Sends SIGTERM to `child` (what supervisors send).
pub fn terminate(child: &Child) {
    let pid = rustix::process::Pid::from_child(child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM sent");
}

/// Runs every future on its own task, concurrently; their outputs in order.
pub async fn join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("a joined task panicked"));
    }
    out
}

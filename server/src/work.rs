//! `switchyard work`: a worker that runs a shell command per task, so Switchyard can be tried
//! without writing code.
//!
//! It registers (with a submitter's or the admin's token), then long-polls for tasks. Each task
//! runs as `sh -c <command>` with the payload's JSON on stdin and, up to 64 KiB, in
//! `SWITCHYARD_PAYLOAD`, and
//! the task's id, attempt and priority in `SWITCHYARD_TASK_ID`, `SWITCHYARD_ATTEMPT` and
//! `SWITCHYARD_PRIORITY`. Exit status 0 reports the task finished, with its standard output as
//! the result; any other reports it failed, with the status and the end of its standard error.
//! Heartbeats keep the lease while a command runs. If the coordinator declared the worker dead
//! (410), or no longer knows its token (401: a coordinator sharing a database that started
//! afresh), it registers again; if it is unreachable or answers 5xx (restarting, say), the
//! worker keeps its registration and retries with backoff. A report it cannot deliver for a
//! minute stops it: the coordinator then redistributes its tasks when its lease expires, so the
//! task runs again rather than being lost.
//!
//! With coordinators sharing a database (`serve --shared`), `--server` may name several of
//! them. The worker registers through the first that answers and follows a 421 to the
//! coordinator serving its groups; if they are served by several, it keeps one registration
//! per coordinator, each with its own fetch loop. When one stops answering (three failed
//! fetches, or a report undeliverable for 5 s), that registration is given up and its groups
//! registered again through the others: their tasks run again there as new attempts.
//!
//! It follows the delivery protocol (see `crate::delivery`): every fetch and heartbeat says what
//! it holds (the tasks of its current fetch not yet reported, and the last delivery id it
//! received), so a fetch reply it never received comes back to the queue, and a task cancelled
//! while it runs is named in the answer: its command is stopped and not reported.
//!
//! Each command runs in a process group of its own. To stop one — on a cancellation, or on
//! shutdown (Ctrl-C or SIGTERM, what supervisors send) — the whole group gets SIGTERM, then
//! SIGKILL after a grace period, so no grandchild outlives it. On shutdown the task in hand is
//! then given back and the worker leaves, so its queue is redistributed at once.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::process::Stdio;
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use tokio::sync::watch;

use crate::client::{Client, ClientError};
use crate::sync::Mutex;

/// Most bytes of a command's output kept as a task's result or failure message.
const MAX_OUTPUT: usize = 64 * 1024;

/// Largest payload also passed in `SWITCHYARD_PAYLOAD` (always on stdin).
const MAX_ENV_PAYLOAD: usize = 64 * 1024;

/// What to run, and for whom.
#[derive(Debug, Clone)]
pub struct WorkOptions {
    /// Groups served.
    pub groups: Vec<String>,
    /// Tags held.
    pub tags: Vec<String>,
    /// The shell command run per task.
    pub command: String,
    /// Tasks per fetch.
    pub batch: usize,
    /// Long-poll wait per fetch.
    pub wait: Duration,
    /// Stop after this many tasks (`None`: until shut down).
    pub tasks: Option<u64>,
}

/// What a `work` run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WorkSummary {
    /// Tasks reported finished.
    pub finished: u64,
    /// Tasks reported failed.
    pub failed: u64,
    /// Reports the coordinator refused (the attempt ended otherwise meanwhile).
    pub refused: u64,
    /// Tasks stopped because the coordinator revoked them (cancelled, or reassigned).
    pub revoked: u64,
}

impl WorkSummary {
    /// Tasks this worker is done with, however they ended.
    fn handled(&self) -> u64 {
        self.finished + self.failed + self.refused + self.revoked
    }
}

/// How long a stopped command's process group has between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

struct Registration {
    id: u64,
    client: Client,
    lease: Duration,
    /// The highest delivery id received: confirmed in every `holding`.
    delivery: u64,
    /// How long a report is retried: [`RETRY_FOR`] with one coordinator; with several to
    /// register through, [`MOVE_AFTER`] (the task runs again elsewhere if this one is gone).
    patience: Duration,
}

impl Registration {
    /// The `holding` statement for `tasks`.
    fn holding<'a>(&self, tasks: impl IntoIterator<Item = &'a Value>) -> Value {
        let tasks: Vec<Value> = tasks
            .into_iter()
            .map(|t| json!({"id": t["id"], "attempt": t["attempt"]}))
            .collect();
        json!({"delivery": self.delivery, "tasks": tasks})
    }
}

/// Where a registration ended.
enum Registered {
    /// Registered, at the coordinator `Registration::client` names.
    At(Registration),
    /// The groups are served by several coordinators (`--shared`): one registration per
    /// owner, each for its groups.
    Split(Vec<Vec<String>>),
    /// Shut down while registering.
    Stopped,
}

/// Registers for `groups` through the first of `registrars` that answers, following a 421 to
/// the coordinator that serves the groups, retrying transient failures (and groups no
/// coordinator serves right now) for up to [`RETRY_FOR`].
async fn register(
    registrars: &[Client],
    opts: &WorkOptions,
    groups: &[String],
    stop: &mut watch::Receiver<bool>,
) -> Result<Registered, ClientError> {
    let body = json!({"groups": groups, "tags": opts.tags});
    let started = Instant::now();
    let mut n = 0;
    loop {
        let mut last = None;
        'registrars: for registrar in registrars {
            let mut at = registrar.clone();
            for _ in 0..4 {
                match at.call_here(Method::POST, "/v1/workers", Some(&body)).await {
                    Ok(r) => {
                        let (Some(id), Some(token)) = (r["id"].as_u64(), r["token"].as_str())
                        else {
                            return Err(ClientError::Transport(format!("unexpected answer: {r}")));
                        };
                        let lease = Duration::from_millis(r["lease_ms"].as_u64().unwrap_or(15_000));
                        eprintln!(
                            "switchyard work: registered as worker {id} at {} for {groups:?}",
                            at.authority()
                        );
                        return Ok(Registered::At(Registration {
                            id,
                            client: Client::new(at.authority(), Some(token.to_string()))?,
                            lease,
                            delivery: 0,
                            patience: if registrars.len() > 1 {
                                MOVE_AFTER
                            } else {
                                RETRY_FOR
                            },
                        }));
                    }
                    Err(e) if e.owners().is_some() => {
                        let owners = e.owners().expect("checked").clone();
                        let mut by_owner = std::collections::BTreeMap::<String, Vec<String>>::new();
                        for (group, owner) in &owners {
                            match owner {
                                Some(o) => {
                                    by_owner.entry(o.clone()).or_default().push(group.clone())
                                }
                                // Changing hands: retry in a moment.
                                None => {
                                    last = Some(e);
                                    break 'registrars;
                                }
                            }
                        }
                        if by_owner.len() > 1 {
                            return Ok(Registered::Split(by_owner.into_values().collect()));
                        }
                        let owner = by_owner.into_keys().next().unwrap_or_default();
                        at = at.at(&owner)?;
                        last = Some(e);
                    }
                    Err(e) if transient(&e) => {
                        last = Some(e);
                        continue 'registrars;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let e = last
            .unwrap_or_else(|| ClientError::Transport("no coordinator to register with".into()));
        if started.elapsed() >= RETRY_FOR {
            return Err(e);
        }
        n += 1;
        eprintln!("switchyard work: registering failed ({e}); retrying");
        tokio::select! {
            () = tokio::time::sleep(backoff(n)) => {}
            _ = stop.wait_for(|s| *s) => return Ok(Registered::Stopped),
        }
    }
}

/// Whether `task` is named in a `revoked` list.
fn is_revoked(revoked: &[Value], task: &Value) -> bool {
    revoked
        .iter()
        .any(|r| r["id"] == task["id"] && r["attempt"] == task["attempt"])
}

/// Runs the worker until `shutdown` resolves or `opts.tasks` tasks are done. It registers
/// through the first of `registrars` that answers; with coordinators sharing a database
/// (`serve --shared`) it keeps one registration per coordinator serving its groups, and
/// registers again (through any of `registrars`) when one of them stops answering.
pub async fn work(
    registrars: &[Client],
    opts: &WorkOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<WorkSummary, ClientError> {
    let (stop, stopped) = watch::channel(false);
    let summary = Mutex::new(WorkSummary::default());
    let result = {
        let serving = serve(registrars, opts, opts.groups.clone(), &summary, stopped);
        tokio::pin!(serving, shutdown);
        tokio::select! {
            r = &mut serving => r,
            () = &mut shutdown => {
                let _ = stop.send(true);
                serving.await
            }
        }
    };
    result.map(|()| summary.into_inner())
}

/// Serves `groups`: one registration, or one per owner if they are served by several.
fn serve<'a>(
    registrars: &'a [Client],
    opts: &'a WorkOptions,
    groups: Vec<String>,
    summary: &'a Mutex<WorkSummary>,
    mut stop: watch::Receiver<bool>,
) -> Pin<Box<dyn Future<Output = Result<(), ClientError>> + Send + 'a>> {
    Box::pin(async move {
        match register(registrars, opts, &groups, &mut stop).await? {
            Registered::Stopped => Ok(()),
            Registered::Split(parts) => {
                let parts = parts
                    .into_iter()
                    .map(|part| serve(registrars, opts, part, summary, stop.clone()));
                futures_util::future::try_join_all(parts).await.map(drop)
            }
            Registered::At(me) => {
                match work_at(registrars, opts, me, summary, stop.clone()).await? {
                    Next::Done => Ok(()),
                    Next::Register => serve(registrars, opts, groups, summary, stop).await,
                }
            }
        }
    })
}

/// What a registration's loop asks for when it ends.
enum Next {
    /// Stopped, or done.
    Done,
    /// Register again: declared dead, unknown to the coordinator, or the coordinator is
    /// gone and others may serve its groups.
    Register,
}

/// With several coordinators to register through: how long a report to an unreachable one is
/// retried before the worker registers again elsewhere (its task is queued again there).
const MOVE_AFTER: Duration = Duration::from_secs(5);

/// Consecutive failed fetches after which a worker with several coordinators to register
/// through gives its registration up and registers again.
const FAILURES_BEFORE_MOVING: u32 = 3;

/// The fetch loop of one registration.
async fn work_at(
    registrars: &[Client],
    opts: &WorkOptions,
    mut me: Registration,
    summary: &Mutex<WorkSummary>,
    mut stop: watch::Receiver<bool>,
) -> Result<Next, ClientError> {
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(shutdown);
    // `shutdown` must not be polled again once it has fired.
    let mut stopping = false;
    let mut failures = 0u32;
    let mut failed = None;
    let done = || opts.tasks.is_some_and(|n| summary.lock().handled() >= n);
    let count = |f: &dyn Fn(&mut WorkSummary)| f(&mut summary.lock());
    let result = loop {
        if stopping || done() {
            break Ok(Next::Done);
        }
        let path = format!("/v1/workers/{}/fetch", me.id);
        // Nothing is in hand between fetches: the statement confirms the last delivery.
        let body = json!({
            "max": opts.batch,
            "wait_ms": opts.wait.as_millis() as u64,
            "holding": me.holding([]),
        });
        let fetched = tokio::select! {
            _ = &mut shutdown => break Ok(Next::Done),
            f = me.client.call(Method::POST, &path, Some(&body)) => f,
        };
        let mut in_hand: VecDeque<Value> = match fetched {
            Ok(v) => {
                failures = 0;
                if let Some(d) = v["delivery"].as_u64() {
                    me.delivery = me.delivery.max(d);
                }
                v["tasks"].as_array().cloned().unwrap_or_default().into()
            }
            // Declared dead, or its groups moved to another coordinator (410); or unknown to a
            // coordinator that started afresh (401): register again.
            Err(e) if matches!(e.status(), Some(410 | 401)) => {
                eprintln!("switchyard work: {e}; registering again");
                return Ok(Next::Register);
            }
            Err(e) if transient(&e) => {
                failures += 1;
                if failures >= FAILURES_BEFORE_MOVING && registrars.len() > 1 {
                    // Another coordinator may serve these groups now.
                    eprintln!("switchyard work: fetch failed ({e}); registering again");
                    return Ok(Next::Register);
                }
                // The coordinator restarting, or overloaded: keep the registration, wait, retry.
                let pause = backoff(failures);
                eprintln!("switchyard work: fetch failed ({e}); retrying in {pause:?}");
                tokio::select! {
                    _ = &mut shutdown => break Ok(Next::Done),
                    () = tokio::time::sleep(pause) => continue,
                }
            }
            Err(e) => break Err(e),
        };
        while let Some(task) = in_hand.pop_front() {
            if stopping || done() {
                // Stopping, or done: what this fetch brought beyond that goes back.
                give_back(&me, &task).await;
                continue;
            }
            let ran = run(&me, &opts.command, &task, &mut in_hand, shutdown.as_mut()).await;
            let outcome = match ran {
                Ran::Done(outcome) => outcome,
                Ran::Revoked => {
                    eprintln!(
                        "switchyard work: task {} attempt {} was revoked (cancelled or \
                         reassigned): stopped its command",
                        task["id"], task["attempt"]
                    );
                    count(&|s| s.revoked += 1);
                    continue;
                }
                Ran::Stopped => {
                    give_back(&me, &task).await;
                    stopping = true;
                    continue;
                }
            };
            match report(&me, &task, outcome).await {
                Ok(true) => count(&|s| s.finished += 1),
                Ok(false) => count(&|s| s.failed += 1),
                // Unreachable with other coordinators to go to: register again there (this
                // task runs again, as a new attempt, wherever its group is served now).
                Err(e) if transient(&e) && registrars.len() > 1 => {
                    eprintln!("switchyard work: report failed ({e}); registering again");
                    return Ok(Next::Register);
                }
                // Unreachable for a minute: stop. The coordinator redistributes this worker's
                // tasks when its lease expires, so the task runs again rather than being lost.
                Err(e) if transient(&e) => {
                    failed = Some(e);
                    break;
                }
                // Cancelled or reassigned meanwhile: the coordinator keeps nothing of this run.
                Err(e) => {
                    eprintln!("switchyard work: report refused: {e}");
                    count(&|s| s.refused += 1);
                }
            }
        }
        if let Some(e) = failed.take() {
            break Err(e);
        }
    };
    // Leave, so whatever is still queued here goes to the other workers at once.
    if let Err(e) = me
        .client
        .call(Method::DELETE, &format!("/v1/workers/{}", me.id), None)
        .await
    {
        eprintln!("switchyard work: leaving failed: {e}");
    }
    result
}

/// Whether a failed request is worth retrying: the coordinator unreachable or restarting, a
/// 5xx, a request timeout, or throttling. Any other 4xx is final.
fn transient(e: &ClientError) -> bool {
    match e.status() {
        None => true,
        Some(status) => status >= 500 || status == 408 || status == 429,
    }
}

/// The pause before retry `n` (1-based): 100 ms doubling, at most 5 s.
fn backoff(n: u32) -> Duration {
    Duration::from_millis(100u64 << n.min(6).saturating_sub(1)).min(Duration::from_secs(5))
}

/// How long a request that fails transiently is retried (a coordinator restart takes seconds).
const RETRY_FOR: Duration = Duration::from_secs(60);

/// Sends `body` to `path`, retrying transient failures with backoff for up to `patience`: a
/// result is worth keeping across a coordinator restart. Reports are idempotent, so a retry of
/// one whose answer was lost is answered as already recorded.
async fn retrying(
    client: &Client,
    path: &str,
    body: &Value,
    patience: Duration,
) -> Result<Value, ClientError> {
    let started = Instant::now();
    let mut n = 0;
    loop {
        match client.call(Method::POST, path, Some(body)).await {
            Err(e) if transient(&e) && started.elapsed() < patience => {
                n += 1;
                eprintln!("switchyard work: {path} failed ({e}); retrying");
                tokio::time::sleep(backoff(n)).await;
            }
            other => return other,
        }
    }
}

/// How a command ended: `Ok(stdout)` or `Err(message)`.
type Outcome = Result<String, String>;

/// How running a task ended.
enum Ran {
    /// The command ended by itself: report this.
    Done(Outcome),
    /// The coordinator revoked the task (cancelled or reassigned), or no longer knows this
    /// worker: its command was stopped.
    Revoked,
    /// Shutdown: the command was stopped; give the task back.
    Stopped,
}

/// Runs the command for `task`, heartbeating while it runs. Each heartbeat says what the worker
/// holds (`task` and the rest of its fetch, `waiting`); revoked tasks leave `waiting`, and a
/// revoked `task` has its command stopped. `shutdown` stops it too.
async fn run<F: Future<Output = ()>>(
    me: &Registration,
    command: &str,
    task: &Value,
    waiting: &mut VecDeque<Value>,
    mut shutdown: Pin<&mut F>,
) -> Ran {
    let payload = task["payload"].to_string();
    let mut child = tokio::process::Command::new("sh");
    child
        .arg("-c")
        .arg(command)
        .env("SWITCHYARD_TASK_ID", task["id"].to_string())
        .env("SWITCHYARD_ATTEMPT", task["attempt"].to_string())
        .env("SWITCHYARD_PRIORITY", task["priority"].to_string())
        // Its own process group, so stopping it reaches everything it started.
        .process_group(0);
    // Linux refuses an environment string over 128 KiB; larger payloads come on stdin only.
    if payload.len() <= MAX_ENV_PAYLOAD {
        child.env("SWITCHYARD_PAYLOAD", &payload);
    }
    let mut child = match child
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return Ran::Done(Err(format!("could not start sh: {e}"))),
    };
    let group = child.id();
    if let Some(mut stdin) = child.stdin.take() {
        // On its own task: a command may read its input late, or never, while it writes output
        // and the heartbeats go on. A command that does not read it closes the pipe: not an
        // error.
        tokio::spawn(async move {
            let _ = stdin.write_all(payload.as_bytes()).await;
        });
    }
    let started = Instant::now();
    let beat = format!("/v1/workers/{}/heartbeat", me.id);
    let mut heartbeat = tokio::time::interval(me.lease / 3);
    heartbeat.tick().await; // the first tick is immediate
    let output = child.wait_with_output();
    tokio::pin!(output);
    let output = loop {
        tokio::select! {
            o = &mut output => break o,
            _ = &mut shutdown => {
                stop_group(group, output.as_mut()).await;
                return Ran::Stopped;
            }
            _ = heartbeat.tick() => {
                let holding = me.holding(std::iter::once(task).chain(waiting.iter()));
                let body = json!({ "holding": holding });
                match me.client.call(Method::POST, &beat, Some(&body)).await {
                    Ok(answer) => {
                        let revoked = answer["revoked"].as_array().cloned().unwrap_or_default();
                        waiting.retain(|t| !is_revoked(&revoked, t));
                        if is_revoked(&revoked, task) {
                            stop_group(group, output.as_mut()).await;
                            return Ran::Revoked;
                        }
                    }
                    // Declared dead (or removed): its tasks went to others. Stop; the next
                    // fetch registers again.
                    Err(e) if e.status() == Some(410) => {
                        stop_group(group, output.as_mut()).await;
                        return Ran::Revoked;
                    }
                    Err(e) => eprintln!("switchyard work: heartbeat failed: {e}"),
                }
            }
        }
    };
    let output = match output {
        Ok(output) => output,
        Err(e) => return Ran::Done(Err(format!("waiting for the command: {e}"))),
    };
    eprintln!(
        "switchyard work: task {} attempt {}: {} in {:.2?}",
        task["id"],
        task["attempt"],
        output.status,
        started.elapsed()
    );
    let tail = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let start = text.len().saturating_sub(MAX_OUTPUT);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_string()
    };
    Ran::Done(if output.status.success() {
        Ok(tail(&output.stdout))
    } else {
        Err(format!("{}: {}", output.status, tail(&output.stderr)))
    })
}

/// Stops the command whose process group is `group`: SIGTERM to the group, then SIGKILL if it
/// has not ended after [`GRACE`]; waits for its shell (`output`) to end.
async fn stop_group<O: Future>(group: Option<u32>, mut output: Pin<&mut O>) {
    let group = group
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw);
    let signal = |sig| {
        if let Some(g) = group {
            // ESRCH: the group has already ended.
            let _ = rustix::process::kill_process_group(g, sig);
        }
    };
    signal(rustix::process::Signal::TERM);
    if tokio::time::timeout(GRACE, output.as_mut()).await.is_err() {
        signal(rustix::process::Signal::KILL);
        output.await;
    }
    // The shell may have ended before its children: make sure none is left.
    signal(rustix::process::Signal::KILL);
}

/// Reports `outcome`; `Ok(true)` for finished, `Ok(false)` for failed.
async fn report(me: &Registration, task: &Value, outcome: Outcome) -> Result<bool, ClientError> {
    let path = format!("/v1/workers/{}/tasks/{}/report", me.id, task["id"]);
    let (body, finished) = match outcome {
        Ok(result) => (
            json!({"attempt": task["attempt"], "outcome": "finished", "result": result}),
            true,
        ),
        Err(message) => (
            json!({"attempt": task["attempt"], "outcome": "failed", "message": message}),
            false,
        ),
    };
    retrying(&me.client, &path, &body, me.patience).await?;
    Ok(finished)
}

async fn give_back(me: &Registration, task: &Value) {
    let path = format!("/v1/workers/{}/tasks/{}/report", me.id, task["id"]);
    let body = json!({"attempt": task["attempt"], "outcome": "given_back"});
    if let Err(e) = retrying(&me.client, &path, &body, me.patience).await {
        eprintln!(
            "switchyard work: giving back task {} failed: {e}",
            task["id"]
        );
    }
}

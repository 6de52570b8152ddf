//! The crash torture test: the real `switchyard` binary under concurrent submitters and
//! workers, SIGKILLed at random moments and restarted on the same data directory and port.
//!
//! Submitters retry every submission with its idempotency key until it is acknowledged.
//! Workers follow the delivery protocol (they state what they hold on every fetch), retry
//! reports until answered, and now and then drop a fetch reply on the floor, as a broken
//! connection would. At the end:
//! - every acknowledged submission exists exactly once (no duplicate from a retried submit);
//! - every task is finished, and by the attempt whose report was acknowledged;
//! - no (task, attempt) was handed out twice, and no task finished twice;
//! - nothing is left running.
//!
//! Its PostgreSQL form kills the coordinator's database connections instead
//! (`pg_terminate_backend`): the coordinator stops serving and recovers by itself, with the same
//! checks at the end.
//!
//! Submissions go on until the last kill. `SWITCHYARD_TORTURE_KILLS` sets the number of kills
//! (10 by default: about 15 seconds; half as many connection kills); the figures are printed
//! at the end (`--nocapture`).

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Spawned, ADMIN};
use hyper::Method;
use serde_json::json;
use switchyard_server::client::{Client, ClientError};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small xorshift generator: the test needs no statistical quality, only variety and a seed
/// to print.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    /// Idempotency key → the id its acknowledgement named (every acknowledgement of a key
    /// must name the same one).
    acked: Mutex<HashMap<String, u64>>,
    /// Every (task, attempt) handed to any worker.
    delivered: Mutex<HashSet<(u64, u64)>>,
    /// (task, attempt) pairs handed out a second time.
    delivered_twice: Mutex<Vec<(u64, u64)>>,
    /// Acknowledged finish reports: task → attempts.
    finished: Mutex<HashMap<u64, HashSet<u64>>>,
    submit_retries: AtomicU64,
    different_ids: AtomicU64,
    dropped_replies: AtomicU64,
    reports_refused: AtomicU64,
    /// Cleared when the kills are over.
    submitting: AtomicBool,
    stop: AtomicBool,
}

/// Submits until the kills are over (`seen.submitting` cleared).
async fn submitter(url: String, seen: Arc<Seen>, me: usize, seed: u64) {
    let client = Client::new(&url, Some(ADMIN.to_string())).unwrap();
    let mut rng = Rng(seed);
    for n in 0.. {
        if !seen.submitting.load(Relaxed) {
            return;
        }
        let key = format!("s{me}-{n}");
        let body = json!({"group": "g", "priority": rng.below(4), "payload": {"key": key},
                          "idempotency_key": key});
        loop {
            match client.call(Method::POST, "/v1/tasks", Some(&body)).await {
                Ok(v) => {
                    let id = v["id"].as_u64().unwrap();
                    let mut acked = seen.acked.lock().unwrap();
                    if *acked.entry(key.clone()).or_insert(id) != id {
                        seen.different_ids.fetch_add(1, Relaxed);
                    }
                    break;
                }
                Err(e) if e.status().is_some_and(|s| s < 500) => panic!("submit refused: {e}"),
                Err(_) => {
                    // The coordinator is down (or died mid-request): the same key again.
                    seen.submit_retries.fetch_add(1, Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.below(2 * PACE_MS))).await;
    }
}

/// The mean pause between one submitter's submissions, in milliseconds.
const PACE_MS: u64 = 8;

async fn register(url: &str) -> (u64, Client) {
    let admin = Client::new(url, Some(ADMIN.to_string())).unwrap();
    loop {
        match admin
            .call(Method::POST, "/v1/workers", Some(&json!({"groups": ["g"]})))
            .await
        {
            Ok(v) => {
                let token = v["token"].as_str().unwrap().to_string();
                return (
                    v["id"].as_u64().unwrap(),
                    Client::new(url, Some(token)).unwrap(),
                );
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn worker(url: String, seen: Arc<Seen>, seed: u64) {
    let mut rng = Rng(seed);
    let (mut id, mut client) = register(&url).await;
    let mut delivery = 0u64;
    while !seen.stop.load(Relaxed) {
        // Everything fetched before has been reported: it holds nothing.
        let body = json!({"max": 4, "wait_ms": 200,
                          "holding": {"delivery": delivery, "tasks": []}});
        let got = match client
            .call(
                Method::POST,
                &format!("/v1/workers/{id}/fetch"),
                Some(&body),
            )
            .await
        {
            Ok(v) => v,
            Err(e) if e.status() == Some(410) => {
                (id, client) = register(&url).await;
                delivery = 0;
                continue;
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let tasks = got["tasks"].as_array().cloned().unwrap_or_default();
        for t in &tasks {
            let pair = (t["id"].as_u64().unwrap(), t["attempt"].as_u64().unwrap());
            if !seen.delivered.lock().unwrap().insert(pair) {
                seen.delivered_twice.lock().unwrap().push(pair);
            }
        }
        if !tasks.is_empty() && rng.below(30) == 0 {
            // The reply "never arrived": its tasks are not run and its delivery not confirmed.
            seen.dropped_replies.fetch_add(1, Relaxed);
            continue;
        }
        if let Some(d) = got["delivery"].as_u64() {
            delivery = delivery.max(d);
        }
        for t in tasks {
            let (task, attempt) = (t["id"].as_u64().unwrap(), t["attempt"].as_u64().unwrap());
            tokio::time::sleep(Duration::from_millis(rng.below(4))).await;
            let path = format!("/v1/workers/{id}/tasks/{task}/report");
            let body = json!({"attempt": attempt, "outcome": "finished",
                              "result": format!("{task}/{attempt}")});
            loop {
                match client.call(Method::POST, &path, Some(&body)).await {
                    Ok(_) => {
                        let mut finished = seen.finished.lock().unwrap();
                        finished.entry(task).or_default().insert(attempt);
                        break;
                    }
                    // Refused (the attempt ended otherwise), or this worker is gone: its
                    // tasks were redistributed. Either way this run counts for nothing.
                    Err(ClientError::Api { status, .. }) if status == 409 || status == 410 => {
                        seen.reports_refused.fetch_add(1, Relaxed);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
    }
}

/// Every task in the store: id → (state, attempt).
async fn all_tasks(client: &Client) -> Result<HashMap<u64, (String, u64)>, ClientError> {
    let mut out = HashMap::new();
    let mut after = 0;
    loop {
        let page = client
            .call(
                Method::GET,
                &format!("/v1/tasks?limit=1000&after={after}"),
                None,
            )
            .await?;
        for t in page["tasks"].as_array().unwrap() {
            let state = t["state"].as_str().unwrap().to_string();
            out.insert(
                t["id"].as_u64().unwrap(),
                (state, t["attempt"].as_u64().unwrap()),
            );
        }
        match page["next"].as_u64() {
            Some(next) => after = next,
            None => return Ok(out),
        }
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// What the torture does to the coordinator, `strikes` times.
enum Fault {
    /// SIGKILL it and restart it on the same store and port.
    Sigkill { dir: tempfile::TempDir },
    /// Kill every connection it has to its PostgreSQL database (`pg_terminate_backend`); it
    /// stops serving and recovers by itself.
    KillConnections { db: common::pg::TestDatabase },
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_under_load_lose_nothing_and_hand_out_nothing_twice() {
    let kills = env_or("SWITCHYARD_TORTURE_KILLS", 10);
    let dir = tempfile::tempdir().unwrap();
    torture(Fault::Sigkill { dir }, kills).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_connections_killed_under_load_lose_nothing_and_hand_out_nothing_twice() {
    // Always on PostgreSQL (its own database), whichever store the suite runs on.
    let kills = env_or("SWITCHYARD_TORTURE_KILLS", 10).div_ceil(2);
    let db = common::pg::TestDatabase::new();
    torture(Fault::KillConnections { db }, kills).await;
}

/// Starts the coordinator the torture strikes, on the fault's store, at `addr`.
fn coordinator(fault: &Fault, addr: &str) -> Spawned {
    let args = match fault {
        Fault::Sigkill { dir } => common::serve_args(dir.path(), addr),
        Fault::KillConnections { db } => ["serve", "--bind", addr, "--admin-token", ADMIN]
            .map(String::from)
            .into_iter()
            .chain(["--database-url".into(), db.url.clone()])
            .chain(["--group-lease", "2"].map(String::from))
            .collect(),
    };
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    command
        .args(args)
        .args(["--mode", "least-loaded", "--lease-timeout", "3"]);
    common::spawn_serving(command).0
}

async fn torture(fault: Fault, kills: u64) {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let what = match &fault {
        Fault::Sigkill { .. } => "SIGKILLs",
        Fault::KillConnections { .. } => "database connection kills",
    };
    eprintln!("torture: seed {seed}, {kills} {what}");
    let mut rng = Rng(seed);
    let addr = free_port().to_string();
    let url = format!("http://{addr}");
    let mut coordinator = coordinator(&fault, &addr);
    let seen = Arc::new(Seen::default());
    seen.submitting.store(true, Relaxed);
    let clients: Vec<_> = (0..2)
        .map(|s| tokio::spawn(submitter(url.clone(), seen.clone(), s, rng.next() | 1)))
        .collect();
    let workers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(worker(url.clone(), seen.clone(), rng.next() | 1)))
        .collect();

    let started = Instant::now();
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(200 + rng.below(1000))).await;
        match &fault {
            Fault::Sigkill { .. } => {
                drop(coordinator); // SIGKILL, then reaped
                                   // Sometimes the restart comes at once, sometimes after a pause.
                tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
                // (On a thread of its own: on PostgreSQL it waits for the old leases to lapse.)
                let a = addr.clone();
                let fault = &fault;
                coordinator = tokio::task::block_in_place(|| self::coordinator(fault, &a));
            }
            Fault::KillConnections { db } => {
                common::pg::admin(&format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = '{}' AND pid <> pg_backend_pid()",
                    db.name
                ));
                assert!(
                    coordinator.try_wait().unwrap().is_none(),
                    "the coordinator exited instead of recovering"
                );
            }
        }
        if k % 10 == 9 {
            eprintln!("torture: {} {what} in {:.1?}", k + 1, started.elapsed());
        }
    }
    seen.submitting.store(false, Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    // Let the workers drain: every acknowledged task must end.
    let admin = Client::new(&url, Some(ADMIN.to_string())).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let store = loop {
        // (A coordinator recovering from killed connections refuses connections for a moment.)
        let tasks = match all_tasks(&admin).await {
            Ok(tasks) => tasks,
            Err(e) if Instant::now() < deadline => {
                eprintln!("torture: reading the tasks: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => panic!("reading the tasks: {e}"),
        };
        let live = tasks.values().filter(|(s, _)| s != "finished").count();
        if live == 0 || Instant::now() > deadline {
            break tasks;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    seen.stop.store(true, Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let stats = admin.call(Method::GET, "/v1/stats", None).await.unwrap();
    let metrics = admin.text("/metrics").await.unwrap();
    drop(coordinator);
    if let Fault::KillConnections { db } = &fault {
        // How often it stopped serving and recovered (each recovery joins anew).
        let starts = common::pg::query(&db.url, "SELECT count(*) FROM coordinators");
        eprintln!("torture: the coordinator started {} times", starts[0]);
    }
    drop(fault);

    let acked = seen.acked.lock().unwrap().clone();
    let finished = seen.finished.lock().unwrap().clone();
    let delivered = seen.delivered.lock().unwrap().len();
    let redelivered = seen
        .delivered
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, attempt)| *attempt > 1)
        .count();
    let twice = seen.delivered_twice.lock().unwrap().clone();
    let stuck: Vec<_> = store.iter().filter(|(_, (s, _))| s != "finished").collect();
    let acked_ids: HashSet<u64> = acked.values().copied().collect();
    let extra: Vec<_> = store.keys().filter(|id| !acked_ids.contains(id)).collect();
    let missing: Vec<_> = acked_ids
        .iter()
        .filter(|id| !store.contains_key(id))
        .collect();
    let finished_twice: Vec<_> = finished.iter().filter(|(_, a)| a.len() > 1).collect();
    // Each task is finished by the attempt whose report was acknowledged.
    let wrong_attempt: Vec<_> = finished
        .iter()
        .filter(|(id, attempts)| {
            store
                .get(id)
                .is_none_or(|(s, a)| s != "finished" || !attempts.contains(a))
        })
        .collect();
    let not_held = metrics
        .lines()
        .find(|l| l.starts_with("switchyard_not_held_requeued_total"))
        .unwrap_or("switchyard_not_held_requeued_total ?")
        .to_string();
    eprintln!(
        "torture figures: {what} {kills}, acknowledged {}, finished {}, deliveries {delivered} \
         ({redelivered} as attempt 2 or later), submit retries {}, dropped replies {}, reports refused {}, duplicates (submissions {}, \
         deliveries {}, finishes {}), stuck {}, missing {}, in {:.1?}; last start: {not_held}",
        acked.len(),
        store.values().filter(|(s, _)| s == "finished").count(),
        seen.submit_retries.load(Relaxed),
        seen.dropped_replies.load(Relaxed),
        seen.reports_refused.load(Relaxed),
        extra.len() + seen.different_ids.load(Relaxed) as usize,
        twice.len(),
        finished_twice.len(),
        stuck.len(),
        missing.len(),
        started.elapsed(),
    );
    assert!(!acked.is_empty());
    assert_eq!(
        seen.different_ids.load(Relaxed),
        0,
        "a key answered two ids"
    );
    assert!(extra.is_empty(), "tasks nobody acknowledged: {extra:?}");
    assert!(missing.is_empty(), "acknowledged tasks lost: {missing:?}");
    assert!(twice.is_empty(), "handed out twice: {twice:?}");
    assert!(stuck.is_empty(), "never finished: {stuck:?}");
    assert!(
        finished_twice.is_empty(),
        "finished twice: {finished_twice:?}"
    );
    assert!(
        wrong_attempt.is_empty(),
        "acknowledged finish not recorded: {wrong_attempt:?}"
    );
    assert_eq!(stats["running"], 0, "{stats}");
    assert_eq!(
        finished.len(),
        acked.len(),
        "a finish acknowledged for every task"
    );
}

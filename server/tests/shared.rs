//! Several coordinators serving one PostgreSQL database at once (`serve --shared`), as real
//! processes on loopback:
//! - routing: a request for another coordinator's groups is answered 421 with the owner's
//!   address, which the client follows; a worker whose groups have several owners keeps one
//!   registration per owner; tokens added or revoked on one coordinator reach the others;
//! - failover under load: three coordinators, submitters and `work` loops spread over them,
//!   one coordinator SIGKILLed, then another: every acknowledged task finishes, no (task,
//!   attempt) runs twice, the dead coordinators' groups are served again within the lease plus
//!   recovery, and the fencing audit records no write under a lost lease;
//! - a long fault run: pauses past the lease, every database connection killed, SIGKILLs and
//!   SIGTERMs with restarts, one coordinator's clock 30 s ahead — with the same checks
//!   (`SWITCHYARD_SHARED_FAULTS` faults, 8 by default).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::{install_audit, query, violations, TestDatabase};
use common::{call_as, spawn_serving, Spawned, ADMIN};

use hyper::Method;
use serde_json::json;
use switchyard_server::client::{Client, ClientError};
use switchyard_server::store::leases::slot_of;
use switchyard_server::work::{work, WorkOptions, WorkSummary};

/// The group lease of these tests, in seconds.
const LEASE: f64 = 2.0;

/// `switchyard serve --shared` on `url`.
fn coordinator(url: &str) -> (Spawned, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    command
        .args([
            "serve",
            "--shared",
            "--bind",
            "127.0.0.1:0",
            "--admin-token",
            ADMIN,
        ])
        .args(["--database-url", url, "--group-lease", &LEASE.to_string()]);
    spawn_serving(command)
}

/// Each live coordinator's address and how many slots it holds, by the database's clock.
fn holdings(url: &str) -> BTreeMap<String, usize> {
    query(
        url,
        "SELECT c.address || ' ' || count(*) FROM leases l JOIN coordinators c ON c.id = l.owner
         WHERE l.expires_at > now() GROUP BY c.address",
    )
    .iter()
    .map(|row| {
        let (address, n) = row.rsplit_once(' ').unwrap();
        (address.to_string(), n.parse().unwrap())
    })
    .collect()
}

/// Waits until exactly `addresses` hold every slot, each at least one.
async fn settled(url: &str, addresses: &[SocketAddr]) -> BTreeMap<String, usize> {
    let wanted: HashSet<String> = addresses.iter().map(ToString::to_string).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held = holdings(url);
        let names: HashSet<String> = held.keys().cloned().collect();
        if names == wanted && held.values().sum::<usize>() == 64 {
            // Each coordinator reads the owners it names in a 421 every balance step (a tenth
            // of the lease): let every one of them see this.
            tokio::time::sleep(Duration::from_secs_f64(LEASE / 2.0)).await;
            return held;
        }
        assert!(Instant::now() < deadline, "never settled: {held:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The address serving `group` now (by the database).
fn owner_of(url: &str, group: &str) -> String {
    query(
        url,
        &format!(
            "SELECT c.address FROM leases l JOIN coordinators c ON c.id = l.owner
             WHERE l.slot = {} AND l.expires_at > now()",
            slot_of(group)
        ),
    )
    .into_iter()
    .next()
    .unwrap_or_default()
}

/// A group served by `address` now.
fn group_of(url: &str, address: SocketAddr) -> String {
    (0..)
        .map(|i| format!("g{i}"))
        .find(|g| owner_of(url, g) == address.to_string())
        .unwrap()
}

fn client(addr: SocketAddr, token: &str) -> Client {
    Client::new(&format!("http://{addr}"), Some(token.into())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_to_the_coordinator_that_serves_their_groups() {
    let db = TestDatabase::new();
    let (_a, a) = coordinator(&db.url);
    let (_b, b) = coordinator(&db.url);
    settled(&db.url, &[a, b]).await;
    let (ga, gb) = (group_of(&db.url, a), group_of(&db.url, b));

    // A submission of b's group at a: 421 naming b, and nothing stored.
    let body = json!({"group": gb, "payload": 1}).to_string();
    let (st, text) = call_as(a, Some(ADMIN), "POST", "/v1/tasks", Some(&body)).await;
    assert_eq!(st, 421, "{text}");
    assert_eq!(text["error"], "misdirected");
    assert_eq!(text["owners"][&gb], b.to_string(), "{text}");
    assert_eq!(query(&db.url, "SELECT count(*) FROM tasks")[0], "0");
    // The client follows it.
    let t = client(a, ADMIN)
        .call(
            Method::POST,
            "/v1/tasks",
            Some(&json!({"group": gb, "payload": 1})),
        )
        .await
        .unwrap();
    let t = t["id"].as_u64().unwrap();
    // A batch across both: 421 with both owners; nothing stored.
    let batch = json!({"tasks": [{"group": ga}, {"group": gb}]});
    let e = client(a, ADMIN)
        .call(Method::POST, "/v1/tasks/batch", Some(&batch))
        .await
        .unwrap_err();
    let owners = e.owners().expect("a 421 with owners").clone();
    assert_eq!(owners[&ga].as_deref(), Some(a.to_string().as_str()));
    assert_eq!(owners[&gb].as_deref(), Some(b.to_string().as_str()));
    assert_eq!(query(&db.url, "SELECT count(*) FROM tasks")[0], "1");
    // A task by id: cancelled where it is served.
    let (st, text) = call_as(a, Some(ADMIN), "DELETE", &format!("/v1/tasks/{t}"), None).await;
    assert_eq!(st, 421, "{text}");
    client(a, ADMIN)
        .call(Method::DELETE, &format!("/v1/tasks/{t}"), None)
        .await
        .unwrap();
    assert_eq!(
        query(&db.url, &format!("SELECT state FROM tasks WHERE id = {t}"))[0],
        "cancelled"
    );
    // A worker of both groups: 421 with both owners.
    let e = client(b, ADMIN)
        .call(
            Method::POST,
            "/v1/workers",
            Some(&json!({"groups": [ga, gb]})),
        )
        .await
        .unwrap_err();
    assert_eq!(e.owners().unwrap().len(), 2, "{e}");

    // A token added at a works at b once the balance loop syncs it; revoked at b, it stops
    // working at a too.
    let added = client(a, ADMIN)
        .call(
            Method::POST,
            "/v1/admin/tokens",
            Some(&json!({"groups": [gb]})),
        )
        .await
        .unwrap();
    let (token, id) = (
        added["token"].as_str().unwrap(),
        added["id"].as_u64().unwrap(),
    );
    let submit = json!({"group": gb}).to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (st, text) = call_as(b, Some(token), "POST", "/v1/tasks", Some(&submit)).await;
        if st == 201 {
            break;
        }
        assert_eq!(st, 401, "{text}");
        assert!(Instant::now() < deadline, "the token never reached b");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client(b, ADMIN)
        .call(Method::DELETE, &format!("/v1/admin/tokens/{id}"), None)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (st, _) = call_as(a, Some(token), "GET", "/v1/stats", None).await;
        if st == 401 {
            break;
        }
        assert!(Instant::now() < deadline, "the revocation never reached a");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Groups the load spreads over.
const GROUPS: usize = 12;

/// Submits single tasks round-robin over the groups through any live coordinator until
/// `stop`; returns the ids acknowledged. Each task has an idempotency key, so a retry after a
/// lost answer cannot submit it twice.
async fn submitter(
    me: usize,
    coordinators: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<u64> {
    let mut acked = Vec::new();
    for n in 0.. {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let body = json!({
            "group": format!("g{}", n % GROUPS),
            "payload": n,
            "idempotency_key": format!("s{me}-{n}"),
        });
        // Until acknowledged: through each live coordinator in turn.
        for attempt in 0.. {
            let live = coordinators.lock().unwrap().clone();
            let at = live[(n + attempt) % live.len()];
            match client(at, ADMIN)
                .call(Method::POST, "/v1/tasks", Some(&body))
                .await
            {
                Ok(t) => {
                    acked.push(t["id"].as_u64().unwrap());
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
            assert!(
                attempt < 400,
                "task {n} of submitter {me} was never acknowledged"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    acked
}

/// How long after `since` a submission of each of `groups` (served by a killed coordinator) is
/// acknowledged again, through the live coordinators.
async fn served_again(groups: &[String], live: &[SocketAddr], since: Instant) -> Duration {
    for (i, g) in groups.iter().enumerate() {
        loop {
            let at = live[i % live.len()];
            let body = json!({"group": g, "payload": "probe"});
            if client(at, ADMIN)
                .call(Method::POST, "/v1/tasks", Some(&body))
                .await
                .is_ok()
            {
                break;
            }
            assert!(
                since.elapsed() < Duration::from_secs(30),
                "group {g} never served again"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    since.elapsed()
}

/// Submitters and `work` loops spread over the coordinators, and what they did.
struct Load {
    live: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    submitters: Vec<tokio::task::JoinHandle<Vec<u64>>>,
    stop_workers: tokio::sync::broadcast::Sender<()>,
    workers: Vec<tokio::task::JoinHandle<Result<WorkSummary, ClientError>>>,
    /// Each task's command appends "id attempt" here.
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// What a load run did.
struct Outcome {
    acked: usize,
    attempts: usize,
}

impl Load {
    /// Three submitters and three `work` loops (registering through every one of `addrs`),
    /// over [`GROUPS`] groups.
    fn start(addrs: &[SocketAddr]) -> Self {
        let groups: Vec<String> = (0..GROUPS).map(|i| format!("g{i}")).collect();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("ran");
        let registrars: Vec<Client> = addrs.iter().map(|&a| client(a, ADMIN)).collect();
        let (stop_workers, _) = tokio::sync::broadcast::channel::<()>(1);
        let workers = (0..3)
            .map(|_| {
                let options = WorkOptions {
                    groups: groups.clone(),
                    tags: Vec::new(),
                    command: format!(
                        "echo \"$SWITCHYARD_TASK_ID $SWITCHYARD_ATTEMPT\" >> {}",
                        log.display()
                    ),
                    batch: 8,
                    wait: Duration::from_secs(1),
                    tasks: None,
                };
                let registrars = registrars.clone();
                let mut stop = stop_workers.subscribe();
                tokio::spawn(async move {
                    work(&registrars, &options, async move {
                        let _ = stop.recv().await;
                    })
                    .await
                })
            })
            .collect();
        let live = Arc::new(std::sync::Mutex::new(addrs.to_vec()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let submitters = (0..3)
            .map(|me| tokio::spawn(submitter(me, live.clone(), stop.clone())))
            .collect();
        Self {
            live,
            stop,
            submitters,
            stop_workers,
            workers,
            log,
            _dir: dir,
        }
    }

    /// Stops submitting; waits until every acknowledged task has finished (the workers stop
    /// then); checks that no (task, attempt) ran twice and that the audit saw no write under
    /// a lost lease.
    async fn finish(self, db: &TestDatabase) -> Outcome {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut acked = Vec::new();
        for s in self.submitters {
            acked.extend(s.await.unwrap());
        }
        let ids: Vec<String> = acked.iter().map(ToString::to_string).collect();
        let unfinished = || {
            query(
                &db.url,
                &format!(
                    "SELECT count(*) FROM tasks WHERE id IN ({}) AND state <> 'finished'",
                    ids.join(",")
                ),
            )[0]
            .parse::<usize>()
            .unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        while unfinished() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} of {} acknowledged tasks never finished",
                unfinished(),
                acked.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = self.stop_workers.send(());
        for w in self.workers {
            w.await.unwrap().unwrap();
        }
        let ran = std::fs::read_to_string(&self.log).unwrap();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for line in ran.lines() {
            *seen.entry(line).or_default() += 1;
        }
        let twice: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
        assert!(twice.is_empty(), "ran twice: {twice:?}");
        assert!(acked.len() > 100, "too little load: {}", acked.len());
        assert_eq!(violations(&db.url), 0, "writes under a lost lease");
        Outcome {
            acked: acked.len(),
            attempts: seen.len(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_coordinators_lose_nothing_and_run_nothing_twice_when_two_are_killed() {
    let db = TestDatabase::new();
    let mut processes = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..3 {
        let (p, a) = coordinator(&db.url);
        processes.push(p);
        addrs.push(a);
    }
    install_audit(&db.url);
    settled(&db.url, &addrs).await;
    let groups: Vec<String> = (0..GROUPS).map(|i| format!("g{i}")).collect();
    let load = Load::start(&addrs);

    // Two kills, a few seconds apart, under load.
    let mut failovers = Vec::new();
    for victim in [2, 1] {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let dead = addrs[victim];
        let theirs: Vec<String> = groups
            .iter()
            .filter(|g| owner_of(&db.url, g) == dead.to_string())
            .cloned()
            .collect();
        processes[victim].kill().unwrap();
        let killed = Instant::now();
        processes[victim].wait().unwrap();
        load.live.lock().unwrap().retain(|a| *a != dead);
        let survivors = load.live.lock().unwrap().clone();
        failovers.push(served_again(&theirs, &survivors, killed).await);
        settled(&db.url, &survivors).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outcome = load.finish(&db).await;
    // Served again within the lease plus recovery (a generous bound: the machine is shared).
    for f in &failovers {
        assert!(
            f.as_secs_f64() < LEASE + 5.0,
            "groups served again only after {f:?}"
        );
    }
    eprintln!(
        "{} acknowledged, {} attempts ran, failovers {failovers:?}",
        outcome.acked, outcome.attempts
    );
}

/// Where Debian's `faketime` package puts libfaketime.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// `coordinator` at `bind`, its clocks (wall and monotonic) set `skew` off by libfaketime,
/// preloaded into the coordinator itself (the `faketime` wrapper would be a parent process
/// between the test and the coordinator, and a signal would reach the wrong one).
fn skewed_coordinator(url: &str, bind: &str, skew: Option<&str>) -> (Spawned, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    if let Some(skew) = skew {
        assert!(
            std::path::Path::new(LIBFAKETIME).exists(),
            "{LIBFAKETIME} is missing: apt-get install faketime"
        );
        command
            .env("LD_PRELOAD", LIBFAKETIME)
            .env("FAKETIME", skew)
            .env("FAKETIME_NO_CACHE", "1");
    }
    command
        .args(["serve", "--shared", "--bind", bind, "--admin-token", ADMIN])
        .args(["--database-url", url, "--group-lease", &LEASE.to_string()]);
    spawn_serving(command)
}

fn signal(child: &Spawned, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_child(child);
    rustix::process::kill_process(pid, signal).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_fault_run_makes_no_write_under_a_lost_lease() {
    let faults: usize = std::env::var("SWITCHYARD_SHARED_FAULTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let db = TestDatabase::new();
    // The third coordinator's clock runs 30 s ahead of the others' and the database's.
    let skews = [None, None, Some("+30s")];
    let mut processes = Vec::new();
    let mut addrs = Vec::new();
    for skew in skews {
        let (p, a) = skewed_coordinator(&db.url, "127.0.0.1:0", skew);
        processes.push(p);
        addrs.push(a);
    }
    install_audit(&db.url);
    settled(&db.url, &addrs).await;
    let load = Load::start(&addrs);
    let started = Instant::now();
    let mut done = Vec::new();
    for i in 0..faults {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let k = (i + i / 3) % 3;
        match i % 4 {
            // Paused past its lease: the others take its groups; it wakes, stops serving,
            // and recovers by itself.
            0 => {
                signal(&processes[k], rustix::process::Signal::STOP);
                tokio::time::sleep(Duration::from_secs_f64(LEASE + 1.5)).await;
                signal(&processes[k], rustix::process::Signal::CONT);
                done.push(format!("paused {}", addrs[k]));
            }
            // Every coordinator's database connections killed: they all stop serving and
            // recover by themselves.
            1 => {
                common::pg::admin(&format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = '{}' AND pid <> pg_backend_pid()",
                    db.name
                ));
                done.push("killed every connection".into());
            }
            // SIGKILLed and restarted at the same address.
            2 => {
                processes[k].kill().unwrap();
                processes[k].wait().unwrap();
                let (p, _) = skewed_coordinator(&db.url, &addrs[k].to_string(), skews[k]);
                processes[k] = p;
                done.push(format!("killed and restarted {}", addrs[k]));
            }
            // Stopped cleanly (SIGTERM: it hands its groups over) and restarted: the others
            // hand it a share back.
            _ => {
                signal(&processes[k], rustix::process::Signal::TERM);
                processes[k].wait().unwrap();
                let (p, _) = skewed_coordinator(&db.url, &addrs[k].to_string(), skews[k]);
                processes[k] = p;
                done.push(format!("stopped and restarted {}", addrs[k]));
            }
        }
    }
    settled(&db.url, &addrs).await;
    let outcome = load.finish(&db).await;
    eprintln!(
        "{} faults in {:?} ({done:?}): {} acknowledged, {} attempts ran, 0 run twice, \
         0 writes under a lost lease",
        faults,
        started.elapsed(),
        outcome.acked,
        outcome.attempts
    );
}

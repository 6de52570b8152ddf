//! Group leases with real processes on PostgreSQL.
//! - Fencing: a coordinator paused (SIGSTOP) past its group lease, while another takes the
//!   groups over and serves them, makes no write once it wakes (SIGCONT) — the requests that
//!   reached it meanwhile are refused — and stops serving; it recovers the groups from the
//!   database once the other coordinator stops. A fencing audit (a trigger recording every
//!   committed write made under an epoch that is no longer current) records none.
//! - Failover: a standby serves the groups once the active coordinator is SIGKILLed (within
//!   the lease) or SIGTERMed (at once: it gives its leases up).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::pg::{install_audit, query, violations, TestDatabase};
use common::{call_as, spawn_serving, Spawned, ADMIN};
use hyper::Method;
use serde_json::json;
use switchyard_server::client::{Client, ClientError};

/// `switchyard serve` on `url` with a 2 s group lease, then `extra`.
fn serve_on(url: &str, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    command
        .args(["serve", "--bind", "127.0.0.1:0", "--admin-token", ADMIN])
        .args(["--database-url", url, "--group-lease", "2"])
        .args(extra);
    command
}

fn coordinator(db: &TestDatabase) -> (Spawned, std::net::SocketAddr) {
    spawn_serving(serve_on(&db.url, &[]))
}

fn signal(child: &Spawned, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_child(child);
    rustix::process::kill_process(pid, signal).unwrap();
}

async fn submit(addr: std::net::SocketAddr, n: u32) -> (u16, serde_json::Value) {
    let tasks: Vec<_> = (0..n)
        .map(|i| json!({"group": "g", "payload": i}))
        .collect();
    call_as(
        addr,
        Some(ADMIN),
        "POST",
        "/v1/tasks/batch",
        Some(&json!({ "tasks": tasks }).to_string()),
    )
    .await
}

fn stored_tasks(db: &TestDatabase) -> usize {
    query(&db.url, "SELECT count(*) FROM tasks")[0]
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_coordinator_makes_no_write_after_its_groups_moved() {
    let db = TestDatabase::new();
    let (mut a, a_addr) = coordinator(&db);
    install_audit(&db.url);
    let (st, body) = submit(a_addr, 10).await;
    assert_eq!(st, 201, "{body}");

    // Paused past its lease: its groups lapse, and b takes them over and serves them.
    signal(&a, rustix::process::Signal::STOP);
    // b starts only once a's leases lapse (it refuses after 1.5 leases otherwise).
    let (mut b, b_addr) = coordinator(&db);
    let (st, body) = submit(b_addr, 5).await;
    assert_eq!(st, 201, "{body}");
    let (st, body) = call_as(b_addr, Some(ADMIN), "GET", "/v1/stats", None).await;
    assert_eq!(st, 200, "{body}");

    // A request reaches a while it is paused; a wakes up to it, knows its leases are gone,
    // and refuses it (503) or closes it unanswered as it stops serving: never a 2xx.
    let client = Client::new(&format!("http://{a_addr}"), Some(ADMIN.into())).unwrap();
    let tasks: Vec<_> = (0..3)
        .map(|i| json!({"group": "g", "payload": i}))
        .collect();
    let late = tokio::spawn(async move {
        client
            .call(
                Method::POST,
                "/v1/tasks/batch",
                Some(&json!({ "tasks": tasks })),
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(&a, rustix::process::Signal::CONT);
    let answer = tokio::time::timeout(Duration::from_secs(10), late)
        .await
        .expect("a answers or closes once it wakes")
        .unwrap();
    match answer {
        Err(ClientError::Api { status: 503, .. } | ClientError::Transport(_)) => {}
        other => panic!("a write after the groups moved must be refused: {other:?}"),
    }
    assert_eq!(stored_tasks(&db), 15, "a's late submission wrote nothing");
    assert_eq!(violations(&db.url), 0);

    // a stopped serving (it cannot prove it owns its groups) and waits for them as a standby;
    // once b stops, a recovers them from the database and serves everything acknowledged.
    common::terminate(&b);
    assert!(b.wait().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert!(
            a.try_wait().unwrap().is_none(),
            "a exited instead of recovering"
        );
        // Refused while a binds its port again; then queued until it serves.
        let answered = match tokio::net::TcpStream::connect(a_addr).await {
            Ok(_) => {
                tokio::time::timeout(
                    Duration::from_millis(500),
                    call_as(a_addr, Some(ADMIN), "GET", "/v1/stats", None),
                )
                .await
            }
            Err(_) => Ok((0, serde_json::Value::Null)),
        };
        if let Ok((200, stats)) = answered {
            assert_eq!(stats["tasks"], 15, "{stats}");
            break;
        }
        assert!(Instant::now() < deadline, "a did not serve again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(violations(&db.url), 0);
    a.kill().unwrap();
    a.wait().unwrap();
}

/// A standby on the same database: it waits for the active coordinator's leases and serves
/// once they lapse. Returns it (on a thread, since it serves only then) and when it served.
fn standby(db: &TestDatabase) -> std::thread::JoinHandle<(Spawned, std::net::SocketAddr, Instant)> {
    let url = db.url.clone();
    std::thread::spawn(move || {
        let (child, addr) = spawn_serving(serve_on(&url, &["--standby"]));
        (child, addr, Instant::now())
    })
}

/// The live tasks a coordinator holds.
async fn live_tasks(addr: std::net::SocketAddr) -> u64 {
    let (st, stats) = call_as(addr, Some(ADMIN), "GET", "/v1/stats", None).await;
    assert_eq!(st, 200, "{stats}");
    stats["tasks"].as_u64().unwrap_or_else(|| panic!("{stats}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_serves_the_groups_once_the_active_coordinator_dies_or_stops() {
    let db = TestDatabase::new();
    let (mut a, a_addr) = coordinator(&db);
    let (st, body) = submit(a_addr, 10).await;
    assert_eq!(st, 201, "{body}");
    let s = standby(&db);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !s.is_finished(),
        "the standby waits while a holds the leases"
    );

    // SIGKILL: the standby serves within the lease (2 s) and a recovery.
    let killed = Instant::now();
    a.kill().unwrap();
    a.wait().unwrap();
    let (mut s, s_addr, served) = s.join().unwrap();
    let failover = served - killed;
    eprintln!("failover after SIGKILL: {failover:?} (group lease 2 s)");
    assert!(failover < Duration::from_secs(5), "{failover:?}");
    assert_eq!(
        live_tasks(s_addr).await,
        10,
        "every acknowledged task is served again"
    );

    // SIGTERM: the leases are given up at once, so the next standby need not wait for them.
    let next = standby(&db);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped = Instant::now();
    common::terminate(&s);
    let (mut next, next_addr, served) = next.join().unwrap();
    let handoff = served - stopped;
    eprintln!("handoff after SIGTERM: {handoff:?} (group lease 2 s)");
    assert!(handoff < Duration::from_secs(5), "{handoff:?}");
    assert!(s.wait().unwrap().success());
    assert_eq!(live_tasks(next_addr).await, 10);
    next.kill().unwrap();
    next.wait().unwrap();
}

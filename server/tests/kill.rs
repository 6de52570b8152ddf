//! Restart recovery with a real process kill: the `switchyard` binary acknowledges tasks, is
//! killed with SIGKILL (no shutdown, no drain), and restarted on the same data directory. Every
//! acknowledged task must be there and be handed out exactly once; running tasks keep their
//! worker and attempt, unless the worker says it never received them. One coordinator owns a
//! data directory, and bad flags stop the start with a message.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;

use common::{post, register, spawn_binary, Session};
use serde_json::json;

fn start(dir: &Path) -> (common::Spawned, SocketAddr) {
    spawn_binary(dir, &["--mode", "least-loaded"])
}

#[tokio::test]
async fn acknowledged_tasks_survive_sigkill_and_are_handed_out_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) = start(dir.path());
    let mut session = Session::new(addr);
    let a = &session;
    let w = register(a, json!({"groups": ["g"]})).await;
    let mut acked = BTreeSet::new();
    for i in 0..40 {
        let (status, t) = post(a, "/v1/tasks", json!({"group": "g", "priority": i % 4})).await;
        assert_eq!(status, 201);
        acked.insert(t["id"].as_u64().unwrap());
    }
    let (_, got) = post(a, &format!("/v1/workers/{w}/fetch"), json!({"max": 5})).await;
    let running: Vec<u64> = got["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(running.len(), 5);
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();

    let (mut server, addr) = start(dir.path());
    // The same session: the worker's token survives the restart too.
    session.addr = addr;
    let a = &session;
    // The running tasks are still assigned to the worker, at attempt 1.
    for t in &running {
        let report = json!({"attempt": 1, "outcome": "finished"});
        let (status, body) = post(a, &format!("/v1/workers/{w}/tasks/{t}/report"), report).await;
        assert_eq!(status, 200, "{body}");
    }
    // Every other acknowledged task comes out exactly once, as attempt 1.
    let mut seen = BTreeSet::new();
    loop {
        let (_, got) = post(a, &format!("/v1/workers/{w}/fetch"), json!({"max": 16})).await;
        let tasks = got["tasks"].as_array().unwrap();
        if tasks.is_empty() {
            break;
        }
        for t in tasks {
            assert_eq!(t["attempt"], 1);
            assert!(
                seen.insert(t["id"].as_u64().unwrap()),
                "handed out twice: {t}"
            );
        }
    }
    let expected: BTreeSet<u64> = acked
        .difference(&running.iter().copied().collect())
        .copied()
        .collect();
    assert_eq!(seen, expected);
    server.kill().unwrap();
    server.wait().unwrap();
}

#[tokio::test]
async fn a_fetch_recorded_before_a_crash_and_never_received_comes_back_as_a_new_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) = start(dir.path());
    let mut session = Session::new(addr);
    let w = register(&session, json!({"groups": ["g"]})).await;
    let (_, t) = post(&session, "/v1/tasks", json!({"group": "g"})).await;
    let t = t["id"].as_u64().unwrap();
    // The assignment is recorded and the reply sent, but the worker never sees it: the
    // coordinator dies.
    let (_, got) = post(&session, &format!("/v1/workers/{w}/fetch"), json!({})).await;
    assert_eq!(got["tasks"][0]["id"], t);
    server.kill().unwrap();
    server.wait().unwrap();

    let (mut server, addr) = start(dir.path());
    session.addr = addr;
    // The worker's first request after the restart says it holds nothing: the restored
    // assignment was lost, and comes back as attempt 2.
    let holding = json!({"delivery": 0, "tasks": []});
    let (st, got) = post(
        &session,
        &format!("/v1/workers/{w}/fetch"),
        json!({ "holding": holding }),
    )
    .await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(
        (
            got["tasks"][0]["id"].as_u64(),
            got["tasks"][0]["attempt"].as_u64()
        ),
        (Some(t), Some(2))
    );
    // Delivery ids of this start are above the first start's.
    assert!(got["delivery"].as_u64().unwrap() > 1 << 41, "{got}");
    server.kill().unwrap();
    server.wait().unwrap();
}

/// Starts `switchyard serve` on `dir` and waits for it to end; returns its status and log.
fn serve_until_exit(dir: &Path, args: &[&str]) -> (std::process::ExitStatus, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--bind", "127.0.0.1:0"])
        .args(common::store_args(dir))
        .args(args)
        .output()
        .expect("the binary runs");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_second_coordinator_on_a_store_in_use_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let (mut first, addr) = start(dir.path());
    let (status, log) = serve_until_exit(dir.path(), &["--admin-token", common::ADMIN]);
    assert!(!status.success(), "{log}");
    if common::pg::enabled() {
        // On PostgreSQL the groups' leases are held: the refusal names the holder's address.
        assert!(
            log.contains("is served by coordinator") && log.contains(&addr.to_string()),
            "the refusal names the holder: {log}"
        );
    } else {
        // On SQLite the data directory is locked: the refusal names the holder's process.
        assert!(
            log.contains("in use by coordinator process") && log.contains(&first.id().to_string()),
            "the refusal names the holder: {log}"
        );
    }
    // The lock (or lease) dies with its process, however it ends: a restart after SIGKILL
    // starts (on PostgreSQL, once the old leases lapse).
    first.kill().unwrap();
    first.wait().unwrap();
    let (mut again, _) = start(dir.path());
    again.kill().unwrap();
    again.wait().unwrap();
    if common::pg::enabled() {
        return;
    }
    // The directory and the database are the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir.path()), 0o700);
    assert_eq!(mode(&dir.path().join("switchyard.db")), 0o600);
}

#[test]
fn bad_flags_are_refused_at_start_with_the_flag_named() {
    let dir = tempfile::tempdir().unwrap();
    for (args, says) in [
        (&["--lease-timeout", "1e20"][..], "--lease-timeout"),
        (&["--max-wait=-1"][..], "--max-wait"),
        (&["--request-timeout", "NaN"][..], "--request-timeout"),
        (&["--max-fetch", "0"][..], "--max-fetch"),
        (&["--max-batch", "0"][..], "--max-batch"),
        (&["--admin-token", "short"][..], "at least 32"),
        (&["--shards", "0"][..], "shards"),
        (&["--rebalance-ratio", "0.5"][..], "rebalance_ratio"),
        (&["--group-lease", "0.01"][..], "--group-lease"),
    ] {
        let mut all = args.to_vec();
        if !args.contains(&"--admin-token") {
            all.extend(["--admin-token", common::ADMIN]);
        }
        let (status, log) = serve_until_exit(dir.path(), &all);
        assert!(!status.success(), "{args:?} was accepted");
        assert!(
            log.contains(says) && !log.contains("panicked"),
            "{args:?}: {log}"
        );
    }
}

//! Restart recovery with a real process kill: the `switchyard` binary acknowledges tasks, is
//! killed with SIGKILL (no shutdown, no drain), and restarted on the same data directory. Every
//! acknowledged task must be there and be handed out exactly once; running tasks keep their
//! worker and attempt.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;

use common::{post, register, spawn_binary, Session};
use serde_json::json;

fn start(dir: &Path) -> (Child, SocketAddr) {
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

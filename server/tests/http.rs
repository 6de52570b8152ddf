//! The HTTP API against a real server on an ephemeral loopback port: the worker and task
//! flows in both modes, every error status with its JSON body, and restart recovery.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    call, faulty, json_body, post, register, send, start_store, start_with, submit, test_settings,
    Server, ADMIN,
};
use serde_json::{json, Value};
use std::sync::atomic::Ordering::Relaxed;
use switchyard::{Config, Mode, Strategy};
use switchyard_server::app::Settings;

async fn start(dir: &Path, mode: Mode) -> Server {
    start_with_lease(dir, mode, Duration::from_secs(30)).await
}

async fn start_with_lease(dir: &Path, mode: Mode, lease: Duration) -> Server {
    let settings = Settings {
        lease_timeout: lease,
        ..test_settings()
    };
    let config = Config {
        mode,
        ..Config::default()
    };
    start_with(dir, config, settings).await
}

#[tokio::test]
async fn a_worker_fetches_and_reports_a_submitted_task_in_both_modes() {
    for mode in [Mode::Fanout, Mode::Balanced(Strategy::LeastLoaded)] {
        let dir = tempfile::tempdir().unwrap();
        let s = start(dir.path(), mode).await;
        let a = &s.client;
        let (st, w) = post(a, "/v1/workers", json!({"groups": ["g"], "tags": ["gpu"]})).await;
        assert_eq!(st, 201, "{w}");
        let w = w["id"].as_u64().unwrap();
        let (st, t1) = post(
            a,
            "/v1/tasks",
            json!({"group": "g", "tags": ["gpu"], "payload": {"x": 1}}),
        )
        .await;
        assert_eq!(st, 201);
        let (_, t2) = post(a, "/v1/tasks", json!({"group": "g", "priority": 5})).await;
        let (t1, t2) = (t1["id"].as_u64().unwrap(), t2["id"].as_u64().unwrap());
        let (st, got) = post(a, &format!("/v1/workers/{w}/fetch"), json!({"max": 10})).await;
        assert_eq!(st, 200);
        let tasks = got["tasks"].as_array().unwrap();
        assert_eq!(
            tasks
                .iter()
                .map(|t| t["id"].as_u64().unwrap())
                .collect::<Vec<_>>(),
            [t2, t1]
        );
        assert_eq!(tasks[1]["payload"], json!({"x": 1}));
        let (_, running) = call(a, "GET", &format!("/v1/tasks/{t1}"), None).await;
        assert_eq!(
            (running["state"].as_str(), running["worker"].as_u64()),
            (Some("running"), Some(w))
        );
        let finished = json!({"attempt": 1, "outcome": "finished", "result": "done"});
        let path = format!("/v1/workers/{w}/tasks/{t1}/report");
        assert_eq!(post(a, &path, finished).await.0, 200);
        let path = format!("/v1/workers/{w}/tasks/{t2}/report");
        assert_eq!(
            post(a, &path, json!({"attempt": 1, "outcome": "given_back"}))
                .await
                .0,
            200
        );
        let (_, again) = post(a, &format!("/v1/workers/{w}/fetch"), json!({})).await;
        assert_eq!(
            again["tasks"][0]["attempt"], 2,
            "a given-back task comes back as attempt 2"
        );
        let (_, done) = call(a, "GET", &format!("/v1/tasks/{t1}"), None).await;
        assert_eq!(
            (done["state"].as_str(), done["outcome"].as_str()),
            (Some("finished"), Some("done"))
        );
        let (st, stats) = call(a, "GET", "/v1/stats", None).await;
        assert_eq!((st, stats["running"].as_u64()), (200, Some(1)));
        s.app.dispatcher().audit().unwrap();
        s.stop().await;
    }
}

#[tokio::test]
async fn every_error_is_a_json_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), Mode::Balanced(Strategy::RoundRobin)).await;
    let a = &s.client;
    let w = register(a, json!({"groups": ["g"]})).await;
    let t = submit(a, json!({"group": "g"})).await;
    post(a, &format!("/v1/workers/{w}/fetch"), json!({})).await;
    let cases: Vec<(u16, &str, (u16, Value))> = vec![
        (
            400,
            "bad_json",
            call(a, "POST", "/v1/tasks", Some("{not json")).await,
        ),
        (
            422,
            "bad_json",
            post(a, "/v1/tasks", json!({"group": "g", "extra": 1})).await,
        ),
        (
            400,
            "invalid_input",
            post(a, "/v1/tasks", json!({"group": ""})).await,
        ),
        (
            400,
            "bad_request",
            post(
                a,
                "/v1/tasks",
                json!({"group": "g", "payload": "x".repeat(100)}),
            )
            .await,
        ),
        (
            400,
            "invalid_input",
            post(a, "/v1/workers", json!({"groups": []})).await,
        ),
        (
            400,
            "bad_request",
            post(a, &format!("/v1/workers/{w}/fetch"), json!({"max": 0})).await,
        ),
        (
            400,
            "bad_request",
            post(a, &format!("/v1/workers/{w}/fetch"), json!({"max": 17})).await,
        ),
        (400, "bad_path", call(a, "GET", "/v1/tasks/abc", None).await),
        (
            403,
            "forbidden",
            post(a, "/v1/workers/999/fetch", json!({})).await,
        ),
        (
            404,
            "unknown_task",
            call(a, "GET", "/v1/tasks/999", None).await,
        ),
        (
            404,
            "unknown_task",
            call(a, "DELETE", "/v1/tasks/999", None).await,
        ),
        (404, "no_route", call(a, "GET", "/nowhere", None).await),
        (
            409,
            "not_assigned",
            post(
                a,
                &format!("/v1/workers/{w}/tasks/{t}/report"),
                json!({"attempt": 2, "outcome": "finished"}),
            )
            .await,
        ),
        (
            400,
            "bad_request",
            post(
                a,
                &format!("/v1/workers/{w}/tasks/{t}/report"),
                json!({"attempt": 1, "outcome": "failed", "message": "m".repeat(65)}),
            )
            .await,
        ),
        (
            400,
            "bad_request",
            post(
                a,
                &format!("/v1/workers/{w}/tasks/{t}/report"),
                json!({"attempt": 1, "outcome": "finished", "result": "a\u{0}b"}),
            )
            .await,
        ),
        (
            405,
            "method_not_allowed",
            call(a, "GET", "/v1/workers", None).await,
        ),
        (415, "bad_json", {
            let no_type = format!(
                "POST /v1/tasks HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ADMIN}\r\n\
                 Content-Length: 15\r\nConnection: close\r\n\r\n{{\"group\": \"g\"}}"
            );
            let (st, text) = send(s.addr, &no_type).await;
            (st, json_body(&text))
        }),
    ];
    for (status, kind, (got, body)) in cases {
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(kind)),
            "{body}"
        );
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    // None of them changed anything.
    let (_, task) = call(a, "GET", &format!("/v1/tasks/{t}"), None).await;
    assert_eq!(
        (task["state"].as_str(), task["attempt"].as_u64()),
        (Some("running"), Some(1))
    );
    s.app.dispatcher().audit().unwrap();
    s.stop().await;
}

#[tokio::test]
async fn a_restart_recovers_workers_then_tasks_and_keeps_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let mode = Mode::Balanced(Strategy::LeastLoaded);
    let s = start(dir.path(), mode).await;
    let a = &s.client;
    let w = register(a, json!({"groups": ["g"]})).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (_, t) = post(a, "/v1/tasks", json!({"group": "g", "priority": i})).await;
        ids.push(t["id"].as_u64().unwrap());
    }
    let (_, got) = post(a, &format!("/v1/workers/{w}/fetch"), json!({})).await;
    let running = got["tasks"][0]["id"].as_u64().unwrap();
    assert_eq!(running, ids[2]);
    let token = s.client.worker_token(w);
    s.stop().await;

    let s = start(dir.path(), mode).await;
    let a = &s.client;
    a.learn(w, token); // its token is restored from the store
                       // The worker is back; its running task is still its own, at the same attempt.
    let report = json!({"attempt": 1, "outcome": "finished"});
    assert_eq!(
        post(
            a,
            &format!("/v1/workers/{w}/tasks/{running}/report"),
            report
        )
        .await
        .0,
        200
    );
    // The queued tasks were placed again and come out in priority order, exactly once.
    let (_, got) = post(a, &format!("/v1/workers/{w}/fetch"), json!({"max": 10})).await;
    let rest: Vec<u64> = got["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(rest, [ids[1], ids[0]]);
    // New ids continue after the recovered ones.
    let (_, t) = post(a, "/v1/tasks", json!({"group": "g"})).await;
    assert!(t["id"].as_u64().unwrap() > ids[2]);
    s.app.dispatcher().audit().unwrap();
    s.stop().await;
}

#[tokio::test]
async fn a_silent_worker_is_declared_dead_and_its_running_task_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    let lease = std::time::Duration::from_millis(300);
    let s = start_with_lease(dir.path(), Mode::Balanced(Strategy::LeastLoaded), lease).await;
    let a = &s.client;
    let w1 = register(a, json!({"groups": ["g"]})).await;
    let t = submit(a, json!({"group": "g"})).await;
    let (_, got) = post(a, &format!("/v1/workers/{w1}/fetch"), json!({})).await;
    assert_eq!(got["tasks"][0]["id"].as_u64(), Some(t));
    let w2 = register(a, json!({"groups": ["g"]})).await;
    // w2 keeps polling (which keeps it alive); w1 falls silent. Once w1's lease expires, its
    // running task is requeued and reaches w2 as attempt 2.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let attempt = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the reaper never declared w1 dead"
        );
        let (_, got) = post(a, &format!("/v1/workers/{w2}/fetch"), json!({})).await;
        if let Some(task) = got["tasks"].as_array().unwrap().first() {
            assert_eq!(task["id"].as_u64(), Some(t));
            break task["attempt"].as_u64().unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(attempt, 2);
    // w1 is gone: its late report is refused with 410, and it cannot fetch either.
    let report = json!({"attempt": 1, "outcome": "finished"});
    let (status, body) = post(a, &format!("/v1/workers/{w1}/tasks/{t}/report"), report).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (410, Some("unknown_worker"))
    );
    assert_eq!(
        post(a, &format!("/v1/workers/{w1}/fetch"), json!({}))
            .await
            .0,
        410
    );
    let (_, task) = call(a, "GET", &format!("/v1/tasks/{t}"), None).await;
    assert_eq!(
        (task["worker"].as_u64(), task["attempt"].as_u64()),
        (Some(w2), Some(2))
    );
    s.app.dispatcher().audit().unwrap();
    s.stop().await;
}

#[tokio::test]
async fn users_list_and_update_tasks_and_admins_rebalance_list_and_remove_workers() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), Mode::Balanced(Strategy::LeastLoaded)).await;
    let a = &s.client;
    let w1 = register(a, json!({"groups": ["g"]})).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let group = if i % 2 == 0 { "g" } else { "h" };
        let (_, t) = post(a, "/v1/tasks", json!({"group": group})).await;
        ids.push(t["id"].as_u64().unwrap());
    }
    // Pages of 2 in id order, then filters.
    let (st, page) = call(a, "GET", "/v1/tasks?limit=2", None).await;
    assert_eq!(st, 200);
    let first: Vec<u64> = page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(first, ids[..2]);
    // Pages stay small whatever the payloads: no payload or outcome in a list.
    let keys: Vec<&String> = page["tasks"][0].as_object().unwrap().keys().collect();
    assert!(
        !keys.iter().any(|k| *k == "payload" || *k == "outcome"),
        "{keys:?}"
    );
    let next = page["next"].as_u64().unwrap();
    let (_, page) = call(a, "GET", &format!("/v1/tasks?limit=2&after={next}"), None).await;
    assert_eq!(page["tasks"][0]["id"].as_u64(), Some(ids[2]));
    // Group h has no worker: its tasks are parked, not queued.
    let (_, page) = call(a, "GET", "/v1/tasks?group=h&state=parked", None).await;
    assert_eq!(page["tasks"].as_array().unwrap().len(), 2);
    assert!(page["next"].is_null());
    for bad in [
        "/v1/tasks?limit=0",
        "/v1/tasks?limit=1001",
        "/v1/tasks?limit=x",
        "/v1/tasks?state=odd",
    ] {
        let (st, body) = call(a, "GET", bad, None).await;
        assert_eq!(st, 400, "{bad}: {body}");
    }
    // Raising a priority reorders the worker's queue; a running task cannot be changed.
    let patch = |t: u64, body: serde_json::Value| {
        let path = format!("/v1/tasks/{t}");
        async move { call(a, "PATCH", &path, Some(&body.to_string())).await }
    };
    let (st, body) = patch(ids[4], json!({"priority": 9})).await;
    assert_eq!((st, body["parked"].as_bool()), (200, Some(false)), "{body}");
    let (_, got) = post(a, &format!("/v1/workers/{w1}/fetch"), json!({})).await;
    assert_eq!(got["tasks"][0]["id"].as_u64(), Some(ids[4]));
    let (st, body) = patch(ids[4], json!({"priority": 1})).await;
    assert_eq!((st, body["error"].as_str()), (409, Some("not_queued")));
    assert_eq!(patch(ids[0], json!({})).await.0, 400);
    let (_, task) = call(a, "GET", &format!("/v1/tasks/{}", ids[4]), None).await;
    assert_eq!(task["priority"], 9, "the change is durable");
    // A second worker of group g arrives (w1 holds 2 queued + 1 running, it holds nothing);
    // a rebalance moves queued work to it.
    let w2 = register(a, json!({"groups": ["g"]})).await;
    let (st, moved) = post(a, "/v1/admin/rebalance", json!({})).await;
    assert_eq!(st, 200);
    assert!(moved["moved"].as_u64().unwrap() >= 1, "{moved}");
    let (_, list) = call(a, "GET", "/v1/admin/workers", None).await;
    let loads: Vec<(u64, u64)> = list["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["id"].as_u64().unwrap(), w["queued"].as_u64().unwrap()))
        .collect();
    assert_eq!(loads.iter().map(|(w, _)| *w).collect::<Vec<_>>(), [w1, w2]);
    assert!(loads.iter().all(|(_, q)| *q >= 1), "{loads:?}");
    // Force-removing w1 requeues its running task; w1's report is then refused.
    let (st, removed) = call(a, "DELETE", &format!("/v1/admin/workers/{w1}"), None).await;
    assert_eq!((st, removed["requeued"].as_u64()), (200, Some(1)));
    let report = json!({"attempt": 1, "outcome": "finished"});
    assert_eq!(
        post(
            a,
            &format!("/v1/workers/{w1}/tasks/{}/report", ids[4]),
            report
        )
        .await
        .0,
        410
    );
    s.app.dispatcher().audit().unwrap();
    s.stop().await;
}

#[tokio::test]
async fn a_batch_is_submitted_all_or_nothing_within_its_limits() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), Mode::Fanout).await;
    let a = &s.client;
    let two = json!({"tasks": [{"group": "g"}, {"group": "g", "priority": 2}]});
    let (st, ok) = post(a, "/v1/tasks/batch", two).await;
    assert_eq!(st, 201, "{ok}");
    assert_eq!(ok["ids"].as_array().unwrap().len(), 2);
    // One bad task refuses the whole batch and names it; nothing is written.
    let bad = json!({"tasks": [{"group": "g"}, {"group": ""}]});
    let (st, err) = post(a, "/v1/tasks/batch", bad).await;
    assert_eq!((st, err["error"].as_str()), (400, Some("invalid_input")));
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("task 1 of the batch"),
        "{err}"
    );
    let four = json!({"tasks": [{"group": "g"}, {"group": "g"}, {"group": "g"}, {"group": "g"}]});
    assert_eq!(
        post(a, "/v1/tasks/batch", four).await.0,
        400,
        "over max_batch"
    );
    assert_eq!(
        post(a, "/v1/tasks/batch", json!({"tasks": []})).await.0,
        400
    );
    let (_, page) = call(a, "GET", "/v1/tasks", None).await;
    assert_eq!(page["tasks"].as_array().unwrap().len(), 2);
    // A body over the limit gets a JSON 413.
    let big = json!({"group": "g", "tags": ["x".repeat(5000)]}).to_string();
    let (st, body) = call(a, "POST", "/v1/tasks", Some(&big)).await;
    assert_eq!((st, body["error"].as_str()), (413, Some("body_too_large")));
    let (_, w) = post(a, "/v1/workers", json!({"groups": ["g"]})).await;
    let (_, got) = post(
        a,
        &format!("/v1/workers/{}/fetch", w["id"]),
        json!({"max": 5}),
    )
    .await;
    assert_eq!(got["tasks"].as_array().unwrap().len(), 2);
    s.app.dispatcher().audit().unwrap();
    s.stop().await;
}

#[tokio::test]
async fn a_waiting_fetch_returns_the_moment_work_is_placed_and_times_out_empty() {
    for mode in [Mode::Fanout, Mode::Balanced(Strategy::LeastLoaded)] {
        let dir = tempfile::tempdir().unwrap();
        let s = start(dir.path(), mode).await;
        let a = &s.client;
        let w = register(a, json!({"groups": ["g"]})).await;
        // Nothing to fetch: the wait runs out and the answer is empty.
        let t0 = std::time::Instant::now();
        let (st, got) = post(
            a,
            &format!("/v1/workers/{w}/fetch"),
            json!({"wait_ms": 200}),
        )
        .await;
        assert_eq!((st, got["tasks"].as_array().unwrap().len()), (200, 0));
        assert!(t0.elapsed() >= std::time::Duration::from_millis(200));
        // A fetch waiting up to 4 s returns as soon as a task it can run is submitted.
        let session = s.client.clone();
        let waiting = tokio::spawn(async move {
            let t0 = std::time::Instant::now();
            let got = post(
                &session,
                &format!("/v1/workers/{w}/fetch"),
                json!({"wait_ms": 4000}),
            )
            .await;
            (got, t0.elapsed())
        });
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        let (_, other) = post(a, "/v1/tasks", json!({"group": "other"})).await; // not for w
        let (_, t) = post(a, "/v1/tasks", json!({"group": "g"})).await;
        let ((st, got), waited) = waiting.await.unwrap();
        assert_eq!(st, 200);
        assert_eq!(got["tasks"][0]["id"], t["id"], "{mode:?}");
        assert!(
            waited < std::time::Duration::from_secs(3),
            "{mode:?}: waited {waited:?}"
        );
        assert!(other["id"].is_u64());
        let (st, _) = post(
            a,
            &format!("/v1/workers/{w}/fetch"),
            json!({"wait_ms": 5001}),
        )
        .await;
        assert_eq!(st, 400, "over max_wait");
        s.app.dispatcher().audit().unwrap();
        s.stop().await;
    }
}

#[tokio::test]
async fn a_graceful_shutdown_answers_waiting_fetches_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), Mode::Fanout).await;
    let (_, w) = post(&s.client, "/v1/workers", json!({"groups": ["g"]})).await;
    let w = w["id"].as_u64().unwrap();
    let session = s.client.clone();
    let waiting = tokio::spawn(async move {
        let body = json!({"wait_ms": 4000});
        post(&session, &format!("/v1/workers/{w}/fetch"), body).await
    });
    while !s.app.is_waiting(w) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t0 = std::time::Instant::now();
    s.stop().await;
    let (st, got) = waiting.await.unwrap();
    assert_eq!((st, got["tasks"].as_array().map(Vec::len)), (200, Some(0)));
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "the shutdown waited {:?} for the long-poll",
        t0.elapsed()
    );
}

#[tokio::test]
async fn a_store_failure_after_a_decision_stops_the_coordinator_and_a_restart_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (faults, store) = faulty(dir.path());
    let s = start_store(store.clone(), Config::default(), test_settings()).await;
    let a = &s.client;
    let w = register(a, json!({"groups": ["g"]})).await;
    let t = submit(a, json!({"group": "g"})).await;
    post(a, &format!("/v1/workers/{w}/fetch"), json!({})).await;
    // The dispatcher accepts the report; the store cannot record it.
    faults.fail.store(true, Relaxed);
    let report = format!("/v1/workers/{w}/tasks/{t}/report");
    let finished = json!({"attempt": 1, "outcome": "finished", "result": "r"});
    let (st, err) = post(a, &report, finished.clone()).await;
    assert_eq!(
        (st, err["error"].as_str()),
        (503, Some("storage_unavailable"))
    );
    assert!(s.app.poisoned().is_some());
    // The server stops serving on its own.
    let served = tokio::time::timeout(Duration::from_secs(5), async {
        while call_refused(s.addr).await.is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(served.is_ok(), "the poisoned server kept serving");
    let token = a.worker_token(w);
    s.stop().await;
    drop(store); // the data directory's lock goes with the last handle

    // The store never recorded the report: after a restart the task is still running on the
    // worker at attempt 1, and the report goes through.
    let s = start_with(dir.path(), Config::default(), test_settings()).await;
    let a = &s.client;
    a.learn(w, token);
    let (_, task) = call(a, "GET", &format!("/v1/tasks/{t}"), None).await;
    assert_eq!(
        (task["state"].as_str(), task["attempt"].as_u64()),
        (Some("running"), Some(1))
    );
    assert_eq!(post(a, &report, finished).await.0, 200);
    s.stop().await;
}

/// `None` while the server answers (any status), `Some(())` once it refuses connections.
async fn call_refused(addr: std::net::SocketAddr) -> Option<()> {
    match tokio::net::TcpStream::connect(addr).await {
        Err(_) => Some(()),
        Ok(_) => None,
    }
}

#[tokio::test]
async fn a_fetch_abandoned_before_its_assignments_are_recorded_gives_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let (faults, store) = faulty(dir.path());
    let settings = Settings {
        max_wait: Duration::from_millis(100),
        request_timeout: Duration::from_millis(300),
        ..test_settings()
    };
    let s = start_store(store.clone(), Config::default(), settings).await;
    let a = &s.client;
    let w = register(a, json!({"groups": ["g"]})).await;
    let t = submit(a, json!({"group": "g"})).await;
    // Commits now take longer than the request-time limit: the fetch times out while its
    // assignment is being recorded.
    faults.delay_ms.store(600, Relaxed);
    let (st, err) = post(a, &format!("/v1/workers/{w}/fetch"), json!({})).await;
    assert_eq!((st, err["error"].as_str()), (408, Some("request_timeout")));
    faults.delay_ms.store(0, Relaxed);
    // The assignment nobody received is given back: the task is queued again, not left
    // running on a live worker, and the next fetch gets it as attempt 2.
    let queued = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let (_, task) = call(a, "GET", &format!("/v1/tasks/{t}"), None).await;
            if task["state"] == "queued" && task["attempt"] == 1 {
                return task; // assigned as attempt 1, then given back
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the abandoned assignment was given back");
    assert_eq!(queued["worker"], Value::Null);
    let (_, got) = post(a, &format!("/v1/workers/{w}/fetch"), json!({})).await;
    assert_eq!(
        (
            got["tasks"][0]["id"].as_u64(),
            got["tasks"][0]["attempt"].as_u64()
        ),
        (Some(t), Some(2))
    );
    s.app.dispatcher().audit().unwrap();
    s.stop().await;
}

#[tokio::test]
async fn a_batch_of_reports_is_decided_report_by_report_and_committed_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), Mode::Balanced(Strategy::LeastLoaded)).await;
    let a = &s.client;
    let w = register(a, json!({"groups": ["g"]})).await;
    for _ in 0..3 {
        post(a, "/v1/tasks", json!({"group": "g"})).await;
    }
    let (_, got) = post(a, &format!("/v1/workers/{w}/fetch"), json!({"max": 3})).await;
    let ids: Vec<u64> = got["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    let path = format!("/v1/workers/{w}/reports");
    let commits = || async { call(a, "GET", "/v1/stats", None).await.1["store_batches"].as_u64() };
    let before = commits().await.unwrap();
    let (st, body) = post(
        a,
        &path,
        json!({"reports": [
            {"task": ids[0], "attempt": 1, "outcome": "finished", "result": "r0"},
            {"task": ids[1], "attempt": 9, "outcome": "finished"},
            {"task": ids[2], "attempt": 1, "outcome": "given_back"},
        ]}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let statuses: Vec<(u64, Option<&str>)> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["status"].as_u64().unwrap(), r["error"].as_str()))
        .collect();
    assert_eq!(
        statuses,
        [(200, None), (409, Some("not_assigned")), (200, None)]
    );
    assert_eq!(
        commits().await,
        Some(before + 1),
        "one commit for the batch"
    );
    let state = |t: u64| {
        let a = a.clone();
        async move {
            let (_, task) = call(&a, "GET", &format!("/v1/tasks/{t}"), None).await;
            (
                task["state"].as_str().unwrap().to_string(),
                task["outcome"].clone(),
            )
        }
    };
    assert_eq!(state(ids[0]).await, ("finished".into(), json!("r0")));
    assert_eq!(state(ids[1]).await.0, "running");
    assert_eq!(state(ids[2]).await.0, "queued");
    // Bad batches change nothing.
    let one = json!({"task": ids[1], "attempt": 1, "outcome": "finished"});
    let over_max_batch: Vec<Value> = (0..4).map(|_| one.clone()).collect();
    for bad in [
        json!({"reports": []}),
        json!({ "reports": over_max_batch }),
        json!({"reports": [{"task": ids[1], "attempt": 1, "outcome": "failed", "message": "m".repeat(65)}]}),
    ] {
        let (st, err) = post(a, &path, bad.clone()).await;
        assert_eq!(
            (st, err["error"].as_str()),
            (400, Some("bad_request")),
            "{bad}"
        );
    }
    let (st, _) = post(
        a,
        &path,
        json!({"reports": [{"task": 1, "attempt": 1, "outcome": "done"}]}),
    )
    .await;
    assert_eq!(st, 422);
    assert_eq!(state(ids[1]).await.0, "running");
    s.app.dispatcher().audit().unwrap();
    s.stop().await;
}

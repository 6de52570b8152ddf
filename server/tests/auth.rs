//! Auth boundaries, tokens, limits and the operational routes, against a real server on an
//! ephemeral loopback port: who may call what (401 without a token, 403 outside a token's
//! scope, 404 for another group's task), the admin token's life cycle, submitter tokens,
//! heartbeats, the request-time limit, configured tag limits, `/metrics` and `/openapi.json`.

mod common;

use std::time::Duration;

use common::{call, call_as, post, raw, register, start_with, test_settings, Server, ADMIN};
use serde_json::{json, Value};
use switchyard::{Config, Limits, Mode, Strategy};
use switchyard_server::app::Settings;
use tokio::io::AsyncWriteExt;

async fn start(dir: &std::path::Path) -> Server {
    start_with(dir, Config::default(), test_settings()).await
}

/// Creates a submitter token for `groups` (as the admin); returns (id, token).
async fn submitter(s: &Server, groups: &[&str]) -> (u64, String) {
    let (st, body) = post(&s.client, "/v1/admin/tokens", json!({ "groups": groups })).await;
    assert_eq!(st, 201, "{body}");
    (
        body["id"].as_u64().unwrap(),
        body["token"].as_str().unwrap().to_string(),
    )
}

async fn as_token(s: &Server, token: &str, method: &str, path: &str, body: Value) -> (u16, Value) {
    let body = (!body.is_null()).then(|| body.to_string());
    call_as(s.addr, Some(token), method, path, body.as_deref()).await
}

#[tokio::test]
async fn without_a_valid_token_only_health_and_the_openapi_document_answer() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let routes = [
        ("GET", "/v1/stats"),
        ("GET", "/metrics"),
        ("POST", "/v1/workers"),
        ("POST", "/v1/workers/1/fetch"),
        ("POST", "/v1/workers/1/heartbeat"),
        ("POST", "/v1/workers/1/tasks/1/report"),
        ("POST", "/v1/workers/1/reports"),
        ("DELETE", "/v1/workers/1"),
        ("POST", "/v1/tasks"),
        ("POST", "/v1/tasks/batch"),
        ("GET", "/v1/tasks"),
        ("GET", "/v1/tasks/1"),
        ("PATCH", "/v1/tasks/1"),
        ("DELETE", "/v1/tasks/1"),
        ("POST", "/v1/admin/rebalance"),
        ("GET", "/v1/admin/workers"),
        ("DELETE", "/v1/admin/workers/1"),
        ("POST", "/v1/admin/tokens"),
        ("GET", "/v1/admin/tokens"),
        ("DELETE", "/v1/admin/tokens/1"),
    ];
    for (method, path) in routes {
        for token in [None, Some("sy_not_a_token"), Some("")] {
            let (st, text) = raw(s.addr, token, method, path, Some("{}")).await;
            assert_eq!(st, 401, "{method} {path} with {token:?}: {text}");
            assert!(text.contains("www-authenticate: Bearer"), "{text}");
            assert!(text.contains(r#""error":"unauthorized""#), "{text}");
        }
    }
    assert_eq!(call_as(s.addr, None, "GET", "/health", None).await.0, 200);
    let (st, doc) = call_as(s.addr, None, "GET", "/openapi.json", None).await;
    assert_eq!(st, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/v1/workers",
        "/v1/workers/{worker}/fetch",
        "/v1/workers/{worker}/heartbeat",
        "/v1/workers/{worker}/tasks/{task}/report",
        "/v1/workers/{worker}/reports",
        "/v1/tasks",
        "/v1/tasks/batch",
        "/v1/tasks/{task}",
        "/v1/admin/tokens",
        "/v1/admin/tokens/{token}",
        "/metrics",
    ] {
        assert!(paths.contains_key(p), "{p} is not documented");
    }
    // The error kinds are an enum in the document.
    let kinds = doc["components"]["schemas"]["ErrorKind"]["enum"].to_string();
    for k in [
        "not_assigned",
        "task_ended",
        "too_many_connections",
        "unknown_worker",
    ] {
        assert!(kinds.contains(k), "{k} missing from {kinds}");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_submitter_sees_and_changes_only_its_groups() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let (_, sub) = submitter(&s, &["a"]).await;
    let (_, mine) = as_token(&s, &sub, "POST", "/v1/tasks", json!({"group": "a"})).await;
    let mine = mine["id"].as_u64().unwrap();
    let (_, theirs) = post(&s.client, "/v1/tasks", json!({"group": "b"})).await;
    let theirs = theirs["id"].as_u64().unwrap();

    let forbidden = [
        ("POST", "/v1/tasks".to_string(), json!({"group": "b"})),
        (
            "POST",
            "/v1/tasks/batch".into(),
            json!({"tasks": [{"group": "a"}, {"group": "b"}]}),
        ),
        ("GET", "/v1/tasks?group=b".into(), Value::Null),
        ("GET", "/v1/stats".into(), Value::Null),
        ("GET", "/metrics".into(), Value::Null),
        ("POST", "/v1/admin/rebalance".into(), Value::Null),
        ("GET", "/v1/admin/workers".into(), Value::Null),
        ("POST", "/v1/admin/tokens".into(), json!({"groups": ["a"]})),
        ("GET", "/v1/admin/tokens".into(), Value::Null),
        ("POST", "/v1/workers".into(), json!({"groups": ["a", "b"]})),
    ];
    for (method, path, body) in forbidden {
        let (st, err) = as_token(&s, &sub, method, &path, body).await;
        assert_eq!(
            (st, err["error"].as_str()),
            (403, Some("forbidden")),
            "{method} {path}: {err}"
        );
    }
    // Another group's task does not exist, as far as this token can tell.
    let path = format!("/v1/tasks/{theirs}");
    for (method, body) in [
        ("GET", Value::Null),
        ("DELETE", Value::Null),
        ("PATCH", json!({"priority": 9})),
    ] {
        let (st, err) = as_token(&s, &sub, method, &path, body).await;
        assert_eq!((st, err["error"].as_str()), (404, Some("unknown_task")));
    }
    // The batch with an out-of-scope task wrote nothing; the list shows only group a.
    let (st, page) = as_token(&s, &sub, "GET", "/v1/tasks", Value::Null).await;
    assert_eq!(st, 200);
    let ids: Vec<u64> = page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [mine]);
    // Its own task it may read, change and cancel; it may register a worker of its groups.
    let path = format!("/v1/tasks/{mine}");
    let (st, task) = as_token(&s, &sub, "GET", &path, Value::Null).await;
    assert_eq!((st, task["group"].as_str()), (200, Some("a")));
    let (st, _) = as_token(&s, &sub, "PATCH", &path, json!({"priority": 3})).await;
    assert_eq!(st, 200);
    let (st, w) = as_token(&s, &sub, "POST", "/v1/workers", json!({"groups": ["a"]})).await;
    assert_eq!(st, 201, "{w}");
    let (st, _) = as_token(&s, &sub, "DELETE", &path, Value::Null).await;
    assert_eq!(st, 200);
    // The admin sees both groups.
    let (_, page) = call(&s.client, "GET", "/v1/tasks", None).await;
    assert_eq!(page["tasks"].as_array().unwrap().len(), 2);
    s.stop().await;
}

#[tokio::test]
async fn a_worker_acts_only_as_itself() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        mode: Mode::Balanced(Strategy::RoundRobin),
        ..Config::default()
    };
    let s = start_with(dir.path(), config, test_settings()).await;
    let a = &s.client;
    let (_, w1) = post(a, "/v1/workers", json!({"groups": ["g"]})).await;
    let (_, w2) = post(a, "/v1/workers", json!({"groups": ["g"]})).await;
    let (w1, w2) = (w1["id"].as_u64().unwrap(), w2["id"].as_u64().unwrap());
    post(a, "/v1/tasks", json!({"group": "g"})).await;
    post(a, "/v1/tasks", json!({"group": "g"})).await;
    let (_, got) = post(a, &format!("/v1/workers/{w2}/fetch"), json!({})).await;
    let t2 = got["tasks"][0]["id"].as_u64().unwrap();
    let token1 = a.worker_token(w1);
    let report = json!({"attempt": 1, "outcome": "finished"});
    let cases = [
        ("POST", format!("/v1/workers/{w2}/fetch"), json!({})),
        ("POST", format!("/v1/workers/{w2}/heartbeat"), Value::Null),
        (
            "POST",
            format!("/v1/workers/{w2}/tasks/{t2}/report"),
            report.clone(),
        ),
        (
            "POST",
            format!("/v1/workers/{w2}/reports"),
            json!({"reports": [{"task": t2, "attempt": 1, "outcome": "finished"}]}),
        ),
        ("DELETE", format!("/v1/workers/{w2}"), Value::Null),
        ("POST", "/v1/workers".into(), json!({"groups": ["g"]})),
        ("POST", "/v1/tasks".into(), json!({"group": "g"})),
        ("GET", "/v1/tasks".into(), Value::Null),
        ("GET", format!("/v1/tasks/{t2}"), Value::Null),
        ("GET", "/v1/stats".into(), Value::Null),
        ("DELETE", format!("/v1/admin/workers/{w2}"), Value::Null),
    ];
    for (method, path, body) in cases {
        let (st, err) = as_token(&s, &token1, method, &path, body).await;
        assert_eq!(st, 403, "{method} {path}: {err}");
    }
    // Nothing changed: w2 still runs its task and may report it; the admin may not act as a
    // worker either.
    let path = format!("/v1/workers/{w2}/tasks/{t2}/report");
    assert_eq!(
        as_token(&s, ADMIN, "POST", &path, report.clone()).await.0,
        403
    );
    assert_eq!(post(a, &path, report).await.0, 200);
    s.app.dispatcher().audit().unwrap();
    s.stop().await;
}

#[tokio::test]
async fn tokens_are_stored_hashed_survive_restarts_and_can_be_revoked() {
    let dir = tempfile::tempdir().unwrap();
    // The first start without a configured admin token generates one, once.
    let no_token = Settings {
        admin_token: None,
        ..test_settings()
    };
    let s = start_with(dir.path(), Config::default(), no_token.clone()).await;
    let generated = s
        .new_admin_token
        .clone()
        .expect("generated on the first start");
    assert_eq!(
        as_token(&s, &generated, "GET", "/v1/stats", Value::Null)
            .await
            .0,
        200
    );
    assert_eq!(
        as_token(&s, ADMIN, "GET", "/v1/stats", Value::Null).await.0,
        401
    );
    let (sub_id, sub) = {
        let (st, body) = as_token(
            &s,
            &generated,
            "POST",
            "/v1/admin/tokens",
            json!({"groups": ["a"]}),
        )
        .await;
        assert_eq!(st, 201);
        (
            body["id"].as_u64().unwrap(),
            body["token"].as_str().unwrap().to_string(),
        )
    };
    s.stop().await;
    // The database holds no token in the clear.
    let (db, wal) = match common::pg::database_for(dir.path()) {
        Some(url) => (common::pg::dump(&url).into_bytes(), Vec::new()),
        None => (
            std::fs::read(dir.path().join("switchyard.db")).unwrap(),
            std::fs::read(dir.path().join("switchyard.db-wal")).unwrap_or_default(),
        ),
    };
    for secret in [&generated, &sub] {
        let found = |bytes: &[u8]| bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
        assert!(
            !found(&db) && !found(&wal),
            "a token is stored in the clear"
        );
    }

    // A restart without a configured token keeps the stored one and generates none.
    let s = start_with(dir.path(), Config::default(), no_token).await;
    assert!(s.new_admin_token.is_none());
    let (st, list) = as_token(&s, &generated, "GET", "/v1/admin/tokens", Value::Null).await;
    assert_eq!(st, 200);
    let roles: Vec<&str> = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["admin", "submitter"]);
    assert!(!list.to_string().contains(&sub), "the list shows no token");
    let admin_id = list["tokens"][0]["id"].as_u64().unwrap();
    let (st, _) = as_token(&s, &sub, "POST", "/v1/tasks", json!({"group": "a"})).await;
    assert_eq!(st, 201, "the submitter token survived the restart");
    // Revoking: the admin token cannot be, an unknown id is 404, the submitter's works once.
    let revoke = |id: u64| format!("/v1/admin/tokens/{id}");
    let (st, _) = as_token(&s, &generated, "DELETE", &revoke(admin_id), Value::Null).await;
    assert_eq!(st, 409);
    let (st, _) = as_token(&s, &generated, "DELETE", &revoke(999), Value::Null).await;
    assert_eq!(st, 404);
    let (st, _) = as_token(&s, &generated, "DELETE", &revoke(sub_id), Value::Null).await;
    assert_eq!(st, 200);
    let (st, _) = as_token(&s, &generated, "DELETE", &revoke(sub_id), Value::Null).await;
    assert_eq!(st, 404);
    let (st, _) = as_token(&s, &sub, "GET", "/v1/tasks", Value::Null).await;
    assert_eq!(st, 401);
    s.stop().await;

    // Configuring a token replaces the generated one; the revocation lasted.
    let s = start(dir.path()).await;
    assert!(s.new_admin_token.is_none());
    assert_eq!(
        as_token(&s, &generated, "GET", "/v1/stats", Value::Null)
            .await
            .0,
        401
    );
    assert_eq!(
        as_token(&s, ADMIN, "GET", "/v1/stats", Value::Null).await.0,
        200
    );
    assert_eq!(
        as_token(&s, &sub, "GET", "/v1/tasks", Value::Null).await.0,
        401
    );
    s.stop().await;
}

#[tokio::test]
async fn bad_token_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    for bad in [
        json!({"groups": []}),
        json!({"groups": [""]}),
        json!({"groups": ["a"], "x": 1}),
    ] {
        let (st, err) = post(&s.client, "/v1/admin/tokens", bad.clone()).await;
        assert!(st == 400 || st == 422, "{bad}: {st} {err}");
        assert!(err["error"].is_string());
    }
    // An empty configured admin token is refused at start.
    let empty = Settings {
        admin_token: Some("  ".into()),
        ..test_settings()
    };
    let other = tempfile::tempdir().unwrap();
    let refused = switchyard_server::app::App::open(other.path(), Config::default(), empty).await;
    assert!(refused.is_err());
    s.stop().await;
}

#[tokio::test]
async fn heartbeats_keep_a_lease_and_a_dead_worker_is_told_to_register_again() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        lease_timeout: Duration::from_millis(300),
        ..test_settings()
    };
    let s = start_with(dir.path(), Config::default(), settings).await;
    let a = &s.client;
    let (_, beating) = post(a, "/v1/workers", json!({"groups": ["g"]})).await;
    let (_, silent) = post(a, "/v1/workers", json!({"groups": ["g"]})).await;
    assert_eq!(beating["lease_ms"], 300);
    let (beating, silent) = (
        beating["id"].as_u64().unwrap(),
        silent["id"].as_u64().unwrap(),
    );
    let beat = format!("/v1/workers/{beating}/heartbeat");
    for _ in 0..10 {
        let (st, body) = post(a, &beat, json!({})).await;
        assert_eq!((st, body["lease_ms"].as_u64()), (200, Some(300)));
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    let (_, workers) = call(a, "GET", "/v1/admin/workers", None).await;
    let ids: Vec<u64> = workers["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        [beating],
        "the silent worker was declared dead, the beating one kept"
    );
    let (st, err) = post(a, &format!("/v1/workers/{silent}/heartbeat"), json!({})).await;
    assert_eq!((st, err["error"].as_str()), (410, Some("unknown_worker")));
    let (_, metrics) = common::raw(s.addr, Some(ADMIN), "GET", "/metrics", None).await;
    assert!(
        metrics.contains("switchyard_lease_expiries_total 1"),
        "{metrics}"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_request_over_the_time_limit_gets_408() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        max_wait: Duration::from_millis(100),
        request_timeout: Duration::from_millis(300),
        ..test_settings()
    };
    let s = start_with(dir.path(), Config::default(), settings).await;
    // A client that announces a body and sends it too slowly.
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /v1/tasks HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"group\""
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let t0 = std::time::Instant::now();
    let mut answer = vec![0u8; 512];
    let n = tokio::io::AsyncReadExt::read(&mut conn, &mut answer)
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    // A request time limit shorter than the longest fetch wait is refused at start.
    let bad = Settings {
        max_wait: Duration::from_secs(2),
        request_timeout: Duration::from_secs(1),
        ..test_settings()
    };
    let other = tempfile::tempdir().unwrap();
    assert!(
        switchyard_server::app::App::open(other.path(), Config::default(), bad)
            .await
            .is_err()
    );
    s.stop().await;
}

#[tokio::test]
async fn the_configured_tag_limits_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        limits: Limits {
            max_tags: 2,
            max_groups: 2,
            max_name_len: 8,
            max_classes: 3,
        },
        ..Config::default()
    };
    let s = start_with(dir.path(), config, test_settings()).await;
    let a = &s.client;
    let too_many = json!({"group": "g", "tags": ["a", "b", "c"]});
    let too_long = json!({"group": "g", "tags": ["abcdefghi"]});
    let long_group = json!({"group": "abcdefghi"});
    for bad in [too_many, too_long, long_group] {
        let (st, err) = post(a, "/v1/tasks", bad.clone()).await;
        assert_eq!(
            (st, err["error"].as_str()),
            (400, Some("invalid_input")),
            "{bad}"
        );
    }
    let (st, _) = post(a, "/v1/workers", json!({"groups": ["a", "b", "c"]})).await;
    assert_eq!(st, 400);
    let (st, _) = post(a, "/v1/tasks", json!({"group": "g", "tags": ["a", "b"]})).await;
    assert_eq!(st, 201);
    // Classes: ("g", {a, b}) exists; two more fit, a fourth is refused, known ones still pass.
    for tags in [json!(["a"]), json!(["b"]), json!(["b", "a"])] {
        let (st, _) = post(a, "/v1/tasks", json!({"group": "g", "tags": tags})).await;
        assert_eq!(st, 201, "{tags}");
    }
    let (st, err) = post(a, "/v1/tasks", json!({"group": "g", "tags": ["c"]})).await;
    assert_eq!((st, err["error"].as_str()), (400, Some("invalid_input")));
    assert!(
        err["message"].as_str().unwrap().contains("--max-classes"),
        "{err}"
    );
    let (st, _) = post(a, "/v1/tasks", json!({"group": "g", "tags": ["a"]})).await;
    assert_eq!(st, 201);
    s.stop().await;
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let a = &s.client;
    let w = register(a, json!({"groups": ["g"]})).await;
    for _ in 0..3 {
        post(a, "/v1/tasks", json!({"group": "g"})).await;
    }
    let (_, got) = post(a, &format!("/v1/workers/{w}/fetch"), json!({"max": 1})).await;
    let t = got["tasks"][0]["id"].as_u64().unwrap();
    let report = format!("/v1/workers/{w}/tasks/{t}/report");
    let stale = json!({"attempt": 7, "outcome": "finished"});
    assert_eq!(post(a, &report, stale).await.0, 409);
    let (st, text) = raw(s.addr, Some(ADMIN), "GET", "/metrics", None).await;
    assert_eq!(st, 200);
    assert!(text.contains("content-type: text/plain"), "{text}");
    for line in [
        "switchyard_claims_total 1",
        "switchyard_submitted_total 3",
        "switchyard_stale_reports_refused_total 1",
        "switchyard_tasks{state=\"queued\"} 2",
        "switchyard_tasks{state=\"running\"} 1",
        "switchyard_workers 1",
        "switchyard_fetch_seconds_count 1",
        "switchyard_fetch_seconds_bucket{le=\"",
        "switchyard_store_batch_size_count",
        "switchyard_store_commit_seconds_bucket{le=\"",
        "switchyard_redistributed_total 0",
        "switchyard_parked_total 0",
        "switchyard_stale_entries_skipped_total",
        "switchyard_lease_expiries_total 0",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    s.stop().await;
}

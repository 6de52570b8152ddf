//! The delivery protocol over HTTP (see `server/src/delivery.rs`): reconciliation of what a
//! worker holds, revocation of cancelled tasks, idempotent reports and submissions, and the
//! answers a worker gets about tasks that are not its own.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{call, post, register, start_with, submit, test_settings, Server, Session};
use serde_json::{json, Value};
use switchyard::Config;
use switchyard_server::app::Settings;

async fn start(dir: &Path, lease: Duration) -> Server {
    let settings = Settings {
        lease_timeout: lease,
        ..test_settings()
    };
    start_with(dir, Config::default(), settings).await
}

async fn fetch(a: &Session, w: u64, body: Value) -> Value {
    let (st, got) = post(a, &format!("/v1/workers/{w}/fetch"), body).await;
    assert_eq!(st, 200, "{got}");
    got
}

async fn task(a: &Session, t: u64) -> Value {
    let (st, task) = call(a, "GET", &format!("/v1/tasks/{t}"), None).await;
    assert_eq!(st, 200, "{task}");
    task
}

fn ids(got: &Value) -> Vec<(u64, u64)> {
    got["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_u64().unwrap(), t["attempt"].as_u64().unwrap()))
        .collect()
}

#[tokio::test]
async fn an_assignment_the_worker_never_received_comes_back_once_a_later_delivery_is_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), Duration::from_secs(30)).await;
    let a = &s.client;
    let w = register(a, json!({"groups": ["g"]})).await;
    let lost = submit(a, json!({"group": "g", "priority": 9})).await;
    // This reply is "lost": the worker never sees it.
    let first = fetch(a, w, json!({"holding": {"delivery": 0, "tasks": []}})).await;
    assert_eq!(ids(&first), [(lost, 1)]);
    // Its next fetch says it holds nothing and has seen no delivery: the lost one may still be
    // on its way (unconfirmed, younger than the lease), so it stays.
    let other = submit(a, json!({"group": "g"})).await;
    let second = fetch(a, w, json!({"holding": {"delivery": 0, "tasks": []}})).await;
    assert_eq!(ids(&second), [(other, 1)]);
    assert_eq!(task(a, lost).await["state"], "running");
    let d2 = second["delivery"].as_u64().unwrap();
    assert!(d2 > first["delivery"].as_u64().unwrap());
    // Confirming the second delivery (holding its task) settles the first: it was lost, and
    // it comes back as a new attempt, which this same fetch may take.
    let holding = json!({"delivery": d2, "tasks": [{"id": other, "attempt": 1}]});
    let third = fetch(a, w, json!({"holding": holding})).await;
    assert_eq!(ids(&third), [(lost, 2)]);
    assert_eq!(third["revoked"], json!([]));
    // The store records why attempt 1 ended.
    assert_eq!(
        s.app.store().attempt(lost, 1).unwrap().map(|a| a.ended),
        Some(Some(switchyard_server::store::AttemptEnd::Requeued(
            switchyard_server::store::Requeued::NotHeld
        )))
    );
    s.stop().await;
}

#[tokio::test]
async fn an_unconfirmed_assignment_comes_back_after_one_lease_of_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), Duration::from_millis(600)).await;
    let a = &s.client;
    let w = register(a, json!({"groups": ["g"]})).await;
    let t = submit(a, json!({"group": "g"})).await;
    assert_eq!(ids(&fetch(a, w, json!({})).await), [(t, 1)]);
    // The worker never got it and keeps saying so; its heartbeats keep its lease alive.
    let beat = format!("/v1/workers/{w}/heartbeat");
    let nothing = json!({"holding": {"delivery": 0, "tasks": []}});
    let mut state = Value::Null;
    for _ in 0..20 {
        let (st, body) = post(a, &beat, nothing.clone()).await;
        assert_eq!(st, 200, "{body}");
        state = task(a, t).await["state"].clone();
        if state == "queued" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(state, "queued", "the lost assignment never came back");
    assert_eq!(ids(&fetch(a, w, json!({})).await), [(t, 2)]);
    s.stop().await;
}

#[tokio::test]
async fn a_cancelled_running_task_is_revoked_and_its_report_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), Duration::from_secs(30)).await;
    let a = &s.client;
    let w = register(a, json!({"groups": ["g"]})).await;
    let t = submit(a, json!({"group": "g"})).await;
    let keep = submit(a, json!({"group": "g"})).await;
    let got = fetch(a, w, json!({"max": 2})).await;
    let d = got["delivery"].as_u64().unwrap();
    let (st, c) = call(a, "DELETE", &format!("/v1/tasks/{t}"), None).await;
    assert_eq!((st, c["was_running_on"].as_u64()), (200, Some(w)));
    // The worker learns it on its next heartbeat (or fetch): only the cancelled one.
    let holding =
        json!({"delivery": d, "tasks": [{"id": t, "attempt": 1}, {"id": keep, "attempt": 1}]});
    let (st, beat) = post(
        a,
        &format!("/v1/workers/{w}/heartbeat"),
        json!({ "holding": holding }),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(beat["revoked"], json!([{"id": t, "attempt": 1}]));
    // Nothing it held was taken from it.
    assert_eq!(task(a, keep).await["state"], "running");
    // A report of the cancelled attempt is refused with what happened.
    let report = json!({"attempt": 1, "outcome": "finished"});
    let (st, err) = post(a, &format!("/v1/workers/{w}/tasks/{t}/report"), report).await;
    assert_eq!(
        (st, err["error"].as_str(), err["state"].as_str()),
        (409, Some("cancelled"), Some("cancelled")),
        "{err}"
    );
    // Cancelling or changing it again: 409 with its state, not 404.
    let (st, err) = call(a, "DELETE", &format!("/v1/tasks/{t}"), None).await;
    assert_eq!(
        (st, err["error"].as_str(), err["state"].as_str()),
        (409, Some("task_ended"), Some("cancelled")),
        "{err}"
    );
    let (st, err) = call(
        a,
        "PATCH",
        &format!("/v1/tasks/{t}"),
        Some(r#"{"priority": 3}"#),
    )
    .await;
    assert_eq!(
        (st, err["state"].as_str()),
        (409, Some("cancelled")),
        "{err}"
    );
    // A running task cannot change either, and says it is running.
    let (st, err) = call(
        a,
        "PATCH",
        &format!("/v1/tasks/{keep}"),
        Some(r#"{"priority": 3}"#),
    )
    .await;
    assert_eq!((st, err["state"].as_str()), (409, Some("running")), "{err}");
    // A finished task answers the same way.
    let done = json!({"attempt": 1, "outcome": "finished"});
    let (st, _) = post(a, &format!("/v1/workers/{w}/tasks/{keep}/report"), done).await;
    assert_eq!(st, 200);
    let (st, err) = call(a, "DELETE", &format!("/v1/tasks/{keep}"), None).await;
    assert_eq!(
        (st, err["state"].as_str()),
        (409, Some("finished")),
        "{err}"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_repeated_report_is_answered_as_already_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), Duration::from_secs(30)).await;
    let a = &s.client;
    let w = register(a, json!({"groups": ["g"]})).await;
    let (t1, t2, t3) = (
        submit(a, json!({"group": "g"})).await,
        submit(a, json!({"group": "g"})).await,
        submit(a, json!({"group": "g"})).await,
    );
    fetch(a, w, json!({"max": 3})).await;
    let report = |t: u64, body: Value| {
        let path = format!("/v1/workers/{w}/tasks/{t}/report");
        async move { post(a, &path, body).await }
    };
    let finished = json!({"attempt": 1, "outcome": "finished", "result": "42"});
    let (st, first) = report(t1, finished.clone()).await;
    assert_eq!(
        (st, first["already_recorded"].as_bool()),
        (200, Some(false))
    );
    // The reply was lost; the worker retries: success, already recorded.
    let (st, again) = report(t1, finished.clone()).await;
    assert_eq!((st, again["already_recorded"].as_bool()), (200, Some(true)));
    // A different outcome for the same attempt is a conflict, and changes nothing.
    let other = json!({"attempt": 1, "outcome": "finished", "result": "43"});
    let (st, err) = report(t1, other).await;
    assert_eq!(
        (st, err["error"].as_str()),
        (409, Some("conflict")),
        "{err}"
    );
    assert_eq!(task(a, t1).await["outcome"], "42");
    // Failed and given back are idempotent too.
    let failed = json!({"attempt": 1, "outcome": "failed", "message": "boom"});
    assert_eq!(report(t2, failed.clone()).await.0, 200);
    assert_eq!(report(t2, failed).await.1["already_recorded"], true);
    let back = json!({"attempt": 1, "outcome": "given_back"});
    assert_eq!(report(t3, back.clone()).await.0, 200);
    assert_eq!(report(t3, back).await.1["already_recorded"], true);
    // In a batch as well.
    let (st, batch) = post(
        a,
        &format!("/v1/workers/{w}/reports"),
        json!({"reports": [
            {"task": t1, "attempt": 1, "outcome": "finished", "result": "42"},
            {"task": t2, "attempt": 1, "outcome": "finished"},
        ]}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(batch["results"][0]["status"], 200);
    assert_eq!(batch["results"][0]["already_recorded"], true);
    assert_eq!(batch["results"][1]["status"], 409);
    assert_eq!(batch["results"][1]["error"], "superseded");
    s.stop().await;
}

#[tokio::test]
async fn a_worker_cannot_tell_another_groups_task_from_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), Duration::from_secs(30)).await;
    let a = &s.client;
    let w = register(a, json!({"groups": ["mine"]})).await;
    let theirs = submit(a, json!({"group": "theirs"})).await;
    let other = register(a, json!({"groups": ["theirs"]})).await;
    fetch(a, other, json!({})).await; // their task is running, as attempt 1
    let missing = theirs + 1000;
    let mut answers = Vec::new();
    for t in [theirs, missing] {
        for outcome in ["finished", "given_back"] {
            let body = json!({"attempt": 1, "outcome": outcome});
            let (st, err) = post(a, &format!("/v1/workers/{w}/tasks/{t}/report"), body).await;
            answers.push((st, err["error"].clone(), err.get("state").cloned()));
        }
    }
    assert!(
        answers
            .iter()
            .all(|a| *a == (409, json!("not_assigned"), None)),
        "{answers:?}"
    );
    // Naming another worker's assignment in `holding` does not touch it.
    let holding = json!({"delivery": 0, "tasks": [{"id": theirs, "attempt": 1}]});
    let (st, beat) = post(
        a,
        &format!("/v1/workers/{w}/heartbeat"),
        json!({ "holding": holding }),
    )
    .await;
    assert_eq!(
        (st, &beat["revoked"]),
        (200, &json!([{"id": theirs, "attempt": 1}]))
    );
    assert_eq!(task(a, theirs).await["state"], "running");
    s.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_makes_a_resubmission_return_the_first_ids() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), Duration::from_secs(30)).await;
    let a = &s.client;
    let body = json!({"group": "g", "payload": {"n": 1}, "idempotency_key": "order-17"});
    let (st, first) = post(a, "/v1/tasks", body.clone()).await;
    assert_eq!(st, 201, "{first}");
    let (st, again) = post(a, "/v1/tasks", body.clone()).await;
    assert_eq!(
        (st, &again["id"], &again["replayed"]),
        (200, &first["id"], &json!(true))
    );
    // The same key for another task is refused.
    let changed = json!({"group": "g", "payload": {"n": 2}, "idempotency_key": "order-17"});
    let (st, err) = post(a, "/v1/tasks", changed).await;
    assert_eq!(
        (st, err["error"].as_str()),
        (409, Some("conflict")),
        "{err}"
    );
    // Batches are keyed as a whole.
    let batch =
        json!({"tasks": [{"group": "g"}, {"group": "g", "priority": 2}], "idempotency_key": "b-1"});
    let (st, b1) = post(a, "/v1/tasks/batch", batch.clone()).await;
    assert_eq!(st, 201, "{b1}");
    let (st, b2) = post(a, "/v1/tasks/batch", batch).await;
    assert_eq!((st, &b2["ids"]), (200, &b1["ids"]));
    let (st, _) = post(
        a,
        "/v1/tasks/batch",
        json!({"tasks": [{"group": "g", "idempotency_key": "x"}]}),
    )
    .await;
    assert_eq!(st, 400);
    for bad in ["", " spaced ", "é"] {
        let (st, _) = post(
            a,
            "/v1/tasks",
            json!({"group": "g", "idempotency_key": bad}),
        )
        .await;
        assert_eq!(st, 400, "{bad:?}");
    }
    // Concurrent retries of one key create one task.
    let concurrent = json!({"group": "g", "idempotency_key": "race"});
    let (addr, admin, text) = (a.addr, a.admin.clone(), concurrent.to_string());
    let answers =
        common::join_all(
            (0..8).map(|_| {
                let (admin, text) = (admin.clone(), text.clone());
                async move {
                    common::call_as(addr, Some(&admin), "POST", "/v1/tasks", Some(&text)).await
                }
            }),
        )
        .await;
    let created: Vec<_> = answers.iter().filter(|(st, _)| *st == 201).collect();
    assert_eq!(created.len(), 1, "{answers:?}");
    assert!(answers.iter().all(|(_, v)| v["id"] == created[0].1["id"]));
    // 3 keyed tasks + 2 in the batch: nothing else was created.
    let (_, page) = call(a, "GET", "/v1/tasks", None).await;
    assert_eq!(page["tasks"].as_array().unwrap().len(), 4);
    // Keys survive a restart.
    let first_id = first["id"].clone();
    s.stop().await;
    let s = start(dir.path(), Duration::from_secs(30)).await;
    let (st, again) = post(&s.client, "/v1/tasks", body).await;
    assert_eq!((st, &again["id"]), (200, &first_id));
    s.stop().await;
}

#[tokio::test]
async fn an_expired_idempotency_key_no_longer_matches() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        key_window: Duration::from_millis(300),
        ..test_settings()
    };
    let s = start_with(dir.path(), Config::default(), settings).await;
    let a = &s.client;
    let body = json!({"group": "g", "idempotency_key": "k"});
    let (_, first) = post(a, "/v1/tasks", body.clone()).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (st, second) = post(a, "/v1/tasks", body).await;
    assert_eq!(st, 201, "{second}");
    assert_ne!(first["id"], second["id"]);
    s.stop().await;
}

#[tokio::test]
async fn payloads_come_back_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), Duration::from_secs(30)).await;
    let payload = r#"{"z":1,"a":123456789012345678901234567890,"f":1.50}"#;
    let body = format!(r#"{{"group":"g","payload":{payload}}}"#);
    let (st, t) = common::call_as(
        s.addr,
        Some(&s.client.admin),
        "POST",
        "/v1/tasks",
        Some(&body),
    )
    .await;
    assert_eq!(st, 201, "{t}");
    let id = t["id"].as_u64().unwrap();
    let (_, text) = common::raw(
        s.addr,
        Some(&s.client.admin),
        "GET",
        &format!("/v1/tasks/{id}"),
        None,
    )
    .await;
    assert!(text.contains(&format!(r#""payload":{payload}"#)), "{text}");
    let w = register(&s.client, json!({"groups": ["g"]})).await;
    let token = s.client.worker_token(w);
    let (_, text) = common::raw(
        s.addr,
        Some(&token),
        "POST",
        &format!("/v1/workers/{w}/fetch"),
        Some("{}"),
    )
    .await;
    assert!(text.contains(&format!(r#""payload":{payload}"#)), "{text}");
    s.stop().await;
}

#[tokio::test]
async fn list_cursors_past_every_id_give_an_empty_page() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), Duration::from_secs(30)).await;
    submit(&s.client, json!({"group": "g"})).await;
    for after in [u64::MAX, 1 << 63] {
        let (st, page) = call(&s.client, "GET", &format!("/v1/tasks?after={after}"), None).await;
        assert_eq!(
            (st, page["tasks"].as_array().map(Vec::len)),
            (200, Some(0)),
            "{page}"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn names_that_read_wrong_are_refused_and_stored_ones_load_under_smaller_limits() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), Duration::from_secs(30)).await;
    let a = &s.client;
    for group in ["", "  ", "a\u{202E}b", "zero\u{200B}width"] {
        let (st, err) = post(a, "/v1/tasks", json!({ "group": group })).await;
        assert_eq!(
            (st, err["error"].as_str()),
            (400, Some("invalid_input")),
            "{group:?}"
        );
        let (st, _) = post(a, "/v1/workers", json!({ "groups": [group] })).await;
        assert_eq!(st, 400, "{group:?}");
    }
    let t = submit(a, json!({"group": "g", "tags": ["a", "b", "c"]})).await;
    let w = register(a, json!({"groups": ["g"], "tags": ["a", "b", "c", "d"]})).await;
    let token = a.worker_token(w);
    s.stop().await;
    // Restart with a smaller tag limit: the stored task and worker still load and run.
    let config = Config {
        limits: switchyard::Limits {
            max_tags: 1,
            ..Default::default()
        },
        ..Config::default()
    };
    let s = start_with(dir.path(), config, test_settings()).await;
    let a = &s.client;
    a.learn(w, token);
    assert_eq!(ids(&fetch(a, w, json!({})).await), [(t, 1)]);
    // New input meets the new limit.
    let (st, _) = post(a, "/v1/tasks", json!({"group": "g", "tags": ["a", "b"]})).await;
    assert_eq!(st, 400);
    s.stop().await;
}

#[tokio::test]
async fn parked_is_a_state_of_its_own_listed_and_counted_once() {
    for mode in [
        switchyard::Mode::Fanout,
        switchyard::Mode::Balanced(switchyard::Strategy::LeastLoaded),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            mode,
            ..Config::default()
        };
        let s = start_with(dir.path(), config, test_settings()).await;
        let a = &s.client;
        register(a, json!({"groups": ["g"]})).await;
        let queued = submit(a, json!({"group": "g"})).await;
        let parked = submit(a, json!({"group": "nobody"})).await;
        assert_eq!(task(a, parked).await["state"], "parked");
        assert_eq!(task(a, queued).await["state"], "queued");
        let listed = |state: &'static str| async move {
            let (st, page) =
                call(a, "GET", &format!("/v1/tasks?state={state}&limit=1"), None).await;
            assert_eq!(st, 200, "{page}");
            let ids: Vec<u64> = page["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].as_u64().unwrap())
                .collect();
            (ids, page["next"].clone())
        };
        assert_eq!(listed("parked").await.0, [parked]);
        assert_eq!(listed("queued").await.0, [queued]);
        let (_, stats) = call(a, "GET", "/v1/stats", None).await;
        assert_eq!(
            (&stats["tasks"], &stats["queued"], &stats["parked"]),
            (&json!(2), &json!(1), &json!(1)),
            "{stats}"
        );
        // A candidate arrives: it is queued now.
        register(a, json!({"groups": ["nobody"]})).await;
        assert_eq!(task(a, parked).await["state"], "queued");
        assert!(listed("parked").await.0.is_empty());
        s.stop().await;
    }
}

#[tokio::test]
async fn a_task_being_recorded_by_a_fetch_is_not_taken_for_a_lost_one() {
    let dir = tempfile::tempdir().unwrap();
    // Every commit that records an assignment takes 400 ms.
    let store = common::Hooked::open(
        dir.path(),
        Box::new(|changes| {
            use switchyard_server::store::Change;
            if changes.iter().any(|c| matches!(c, Change::Assign { .. })) {
                std::thread::sleep(Duration::from_millis(400));
            }
            Ok(())
        }),
    );
    let s = common::start_store(store.clone(), Config::default(), test_settings()).await;
    let a = &s.client;
    let w = register(a, json!({"groups": ["g"]})).await;
    let t = submit(a, json!({"group": "g"})).await;
    let fetching = {
        let (addr, token) = (s.addr, a.worker_token(w));
        tokio::spawn(async move {
            common::call_as(
                addr,
                Some(&token),
                "POST",
                &format!("/v1/workers/{w}/fetch"),
                Some("{}"),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    // While the fetch's assignment is being recorded, the worker's heartbeat (from another
    // thread of it, say) says it holds nothing: the task is on its way, not lost.
    let nothing = json!({"holding": {"delivery": 0, "tasks": []}});
    let (st, beat) = post(a, &format!("/v1/workers/{w}/heartbeat"), nothing).await;
    assert_eq!(st, 200, "{beat}");
    let (st, got) = fetching.await.unwrap();
    assert_eq!((st, ids(&got)), (200, vec![(t, 1)]), "{got}");
    assert_eq!(task(a, t).await["state"], "running");
    s.stop().await;
}

#[tokio::test]
async fn a_report_retried_after_the_worker_was_removed_is_still_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), Duration::from_secs(30)).await;
    let a = &s.client;
    let w = register(a, json!({"groups": ["g"]})).await;
    let t = submit(a, json!({"group": "g"})).await;
    fetch(a, w, json!({})).await;
    let path = format!("/v1/workers/{w}/tasks/{t}/report");
    let done = json!({"attempt": 1, "outcome": "finished", "result": "r"});
    assert_eq!(post(a, &path, done.clone()).await.0, 200);
    // Its answer was lost, and it was removed (its lease expired) before it retried.
    let (st, _) = call(a, "DELETE", &format!("/v1/admin/workers/{w}"), None).await;
    assert_eq!(st, 200);
    let (st, again) = post(a, &path, done).await;
    assert_eq!(
        (st, &again["already_recorded"]),
        (200, &json!(true)),
        "{again}"
    );
    // Anything else from it: register again.
    let other = json!({"attempt": 1, "outcome": "failed"});
    assert_eq!(post(a, &path, other).await.0, 410);
    s.stop().await;
}

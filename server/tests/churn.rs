//! Nothing lost, nothing handed out twice, through HTTP: workers fetch, finish, give back,
//! leave and go silent (their leases expire) at random while every task is worked through, in
//! fanout and in a balanced mode. At the end every task finished exactly once, no (task,
//! attempt) was ever delivered twice, and the store and the dispatcher agree.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{call, call_as, post, raw, start_with, test_settings, Session};
use serde_json::{json, Value};
use switchyard::{Config, Mode, Strategy};
use switchyard_server::app::Settings;

const TASKS: u64 = 240;
const WORKERS: u64 = 6;
/// Long enough that a stall on a loaded CI machine does not expire a busy worker's lease.
const LEASE: Duration = Duration::from_millis(1000);

/// A small deterministic generator (SplitMix64), one per worker.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

#[derive(Default)]
struct Ledger {
    /// Every (task, attempt) a fetch delivered.
    delivered: HashSet<(u64, u64)>,
    /// Tasks whose "finished" report was accepted: how many times, and the attempt.
    finished: HashMap<u64, (u64, u64)>,
    duplicates: Vec<(u64, u64)>,
    leaves: u64,
    silences: u64,
    gave_back: u64,
}

impl Ledger {
    fn finish(&mut self, task: u64, attempt: u64) {
        let entry = self.finished.entry(task).or_default();
        *entry = (entry.0 + 1, attempt);
    }
}

async fn register(s: &Session, group: &str) -> u64 {
    let (st, w) = post(s, "/v1/workers", json!({"groups": [group], "tags": ["t"]})).await;
    assert_eq!(st, 201, "{w}");
    w["id"].as_u64().unwrap()
}

/// One worker's life: fetch, then per task finish (mostly), give back, leave or go silent.
async fn worker(s: Arc<Session>, group: &'static str, seed: u64, ledger: Arc<Mutex<Ledger>>) {
    let mut rng = Rng(seed);
    let mut me = register(&s, group).await;
    loop {
        if ledger.lock().unwrap().finished.len() as u64 == TASKS {
            return;
        }
        let body = json!({"max": 1 + rng.below(4), "wait_ms": 50});
        let (st, got) = post(&s, &format!("/v1/workers/{me}/fetch"), body).await;
        if st == 410 {
            me = register(&s, group).await; // declared dead meanwhile
            continue;
        }
        assert_eq!(st, 200, "{got}");
        for t in got["tasks"].as_array().unwrap() {
            let (id, attempt) = (t["id"].as_u64().unwrap(), t["attempt"].as_u64().unwrap());
            {
                let mut l = ledger.lock().unwrap();
                if !l.delivered.insert((id, attempt)) {
                    l.duplicates.push((id, attempt));
                }
            }
            let report = format!("/v1/workers/{me}/tasks/{id}/report");
            match rng.below(20) {
                0 => {
                    // Leave: everything this worker holds or runs goes elsewhere.
                    ledger.lock().unwrap().leaves += 1;
                    let (st, _) = call(&s, "DELETE", &format!("/v1/workers/{me}"), None).await;
                    assert_eq!(st, 200);
                    me = register(&s, group).await;
                    break;
                }
                1 => {
                    // Go silent past the lease: declared dead, tasks redistributed.
                    ledger.lock().unwrap().silences += 1;
                    tokio::time::sleep(LEASE + LEASE / 2).await;
                    let done = json!({"attempt": attempt, "outcome": "finished"});
                    let (st, _) = post(&s, &report, done).await;
                    assert!(st == 410 || st == 200, "late report: {st}");
                    if st == 200 {
                        // The reaper had not run yet: the report counts.
                        ledger.lock().unwrap().finish(id, attempt);
                        continue;
                    }
                    me = register(&s, group).await;
                    break;
                }
                2 | 3 => {
                    ledger.lock().unwrap().gave_back += 1;
                    let back = json!({"attempt": attempt, "outcome": "given_back"});
                    let (st, body) = post(&s, &report, back).await;
                    if st == 410 {
                        me = register(&s, group).await; // a stall outlived the lease
                        break;
                    }
                    assert_eq!(st, 200, "{body}");
                }
                _ => {
                    let done = json!({"attempt": attempt, "outcome": "finished"});
                    let (st, body) = post(&s, &report, done).await;
                    if st == 410 {
                        me = register(&s, group).await; // a stall outlived the lease
                        break;
                    }
                    assert_eq!(st, 200, "{body}");
                    ledger.lock().unwrap().finish(id, attempt);
                }
            }
        }
    }
}

async fn churn(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        lease_timeout: LEASE,
        ..test_settings()
    };
    let config = Config {
        mode,
        ..Config::default()
    };
    let s = start_with(dir.path(), config, settings).await;
    let groups = ["a", "b"];
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let group = groups[(w % 2) as usize];
        workers.push(tokio::spawn(worker(
            s.client.clone(),
            group,
            w + 1,
            ledger.clone(),
        )));
    }
    for i in 0..TASKS {
        let task = json!({"group": groups[(i % 2) as usize], "tags": ["t"], "priority": i % 5});
        assert_eq!(post(&s.client, "/v1/tasks", task).await.0, 201);
    }
    let all = async {
        for w in workers {
            w.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .unwrap_or_else(|_| panic!("{mode:?}: the tasks were not all finished in time"));

    let l = std::mem::take(&mut *ledger.lock().unwrap());
    assert!(
        l.duplicates.is_empty(),
        "{mode:?}: delivered twice: {:?}",
        l.duplicates
    );
    assert_eq!(l.finished.len() as u64, TASKS, "{mode:?}");
    assert!(
        l.finished.values().all(|(n, _)| *n == 1),
        "{mode:?}: finished twice"
    );
    // The store agrees: every task finished, at the attempt whose report was accepted.
    let mut after = 0;
    let mut stored = 0;
    loop {
        let path = format!("/v1/tasks?limit=1000&after={after}");
        let (_, page) = call_as(s.addr, Some(&s.client.admin), "GET", &path, None).await;
        for t in page["tasks"].as_array().unwrap() {
            let id = t["id"].as_u64().unwrap();
            assert_eq!(t["state"], "finished", "{mode:?}: {t}");
            assert_eq!(
                t["attempt"].as_u64(),
                Some(l.finished[&id].1),
                "{mode:?}: {t}"
            );
            stored += 1;
        }
        match page["next"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(stored, TASKS, "{mode:?}");
    // The churn happened: leaves, expired leases and give-backs, with tasks redistributed.
    let counters = s.app.dispatcher().stats().counters;
    let (_, text) = raw(s.addr, Some(&s.client.admin), "GET", "/metrics", None).await;
    let expiries: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("switchyard_lease_expiries_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the lease expiry counter");
    eprintln!(
        "{mode:?}: {} leaves, {} silences, {} give-backs, {} redistributed, {} lease expiries",
        l.leaves, l.silences, l.gave_back, counters.redistributed, expiries
    );
    assert!(
        l.leaves > 0 && l.silences > 0 && l.gave_back > 0,
        "{mode:?}"
    );
    assert!(counters.redistributed > 0, "{mode:?}");
    assert!(expiries > 0, "{mode:?}");
    let stats: Value = call(&s.client, "GET", "/v1/stats", None).await.1;
    assert_eq!(stats["tasks"], 0, "{mode:?}: {stats}");
    s.app.dispatcher().audit().unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churning_workers_lose_nothing_and_duplicate_nothing_in_fanout() {
    churn(Mode::Fanout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churning_workers_lose_nothing_and_duplicate_nothing_balanced() {
    churn(Mode::Balanced(Strategy::LeastLoaded)).await;
}

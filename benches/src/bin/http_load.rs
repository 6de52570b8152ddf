//! HTTP load generator: drives a coordinator through its API with many concurrent keep-alive
//! connections and reports per-operation cost, throughput and latency percentiles, each as a
//! ratio against a bare `/health` round trip measured in the same run at the same concurrency
//! (the floor that HTTP on this machine costs before the coordinator does anything).
//!
//! ```text
//! cargo run --release -p switchyard-benches --bin http_load -- [--tasks N] [--conns C] ...
//! ```
//!
//! Without `--server` it starts a coordinator in this process, on a fresh data directory (the
//! embedded SQLite store with `synchronous = FULL`, so every acknowledgement waits for an
//! fsync, shared by group commit). With `--server URL --token ADMIN` it drives an external one
//! (this is how `flamegraphs/record.sh http` profiles the server alone); if that coordinator
//! shares a database with others (`serve --shared`) and another serves the group `load`, the
//! load goes to that one, as the 421 of a probe registration names it. With `--database-url`
//! the in-process coordinator runs on that PostgreSQL database instead.
//!
//! Phases: `/health` (the floor); single submissions; batch submissions; workers draining half
//! the tasks with a fetch and a report per task, and the other half with a fetch and one batched
//! report. The workers follow the delivery protocol (each fetch states what they hold); with
//! `--bare-fetch` they do not, to measure its cost. Prints a Markdown table on stdout, progress
//! on stderr.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use hyper::Method;
use serde_json::{json, Value};
use switchyard_benches::http::{owners, Conn};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// A running coordinator (`http://host:port`); without it, one is started in-process.
    #[arg(long)]
    server: Option<String>,
    /// The admin token of `--server`.
    #[arg(long, env = "SWITCHYARD_TOKEN")]
    token: Option<String>,
    /// Tasks per phase (single submissions use a quarter of this).
    #[arg(long, default_value_t = 20_000)]
    tasks: u64,
    /// Concurrent connections (and workers in the drain phase).
    #[arg(long, default_value_t = 32)]
    conns: usize,
    /// Tasks per batch submission.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Tasks per fetch in the drain phase.
    #[arg(long, default_value_t = 16)]
    fetch: usize,
    /// Fetch without `holding` (no reconciliation): the protocol before crash-tight delivery,
    /// to measure what stating the holdings costs.
    #[arg(long)]
    bare_fetch: bool,
    /// Placement of the in-process coordinator: fanout or least-loaded.
    #[arg(long, default_value = "least-loaded")]
    mode: String,
    /// Run the in-process coordinator on this PostgreSQL database (empty, or left by an
    /// earlier run: it is used as is) instead of a fresh SQLite data directory.
    #[arg(long)]
    database_url: Option<String>,
}

/// What one phase measured.
struct Phase {
    name: &'static str,
    ops: u64,
    wall: Duration,
    latency: Histogram<u64>,
}

impl Phase {
    fn per_op_ns(&self) -> f64 {
        self.wall.as_nanos() as f64 / self.ops as f64
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

/// Runs `per_conn` on `conns` connections at once; each returns its latencies (µs).
async fn phase<F, Fut>(name: &'static str, conns: Vec<Conn>, per_conn: F) -> (Phase, Vec<Conn>)
where
    F: Fn(usize, Conn) -> Fut,
    Fut: std::future::Future<Output = (Conn, u64, Histogram<u64>)> + Send + 'static,
{
    eprintln!("== {name}");
    let started = Instant::now();
    let handles: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(per_conn(i, c)))
        .collect();
    let mut latency = histogram();
    let mut ops = 0;
    let mut back = Vec::new();
    for h in handles {
        let (c, n, l) = h.await.unwrap();
        ops += n;
        latency.add(&l).unwrap();
        back.push(c);
    }
    let p = Phase {
        name,
        ops,
        wall: started.elapsed(),
        latency,
    };
    (p, back)
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(args));
}

async fn run(args: Args) {
    let (authority, admin, _server) = match &args.server {
        Some(url) => {
            let authority = url.trim_start_matches("http://").trim_end_matches('/');
            let token = args
                .token
                .clone()
                .expect("--token (or SWITCHYARD_TOKEN) with --server");
            // Among coordinators sharing a database, the one serving the group "load".
            let owner = owners(authority, &token, &["load".to_string()]).await;
            let owner = owner["load"].clone();
            if owner != authority {
                eprintln!("the group \"load\" is served by {owner}: driving that coordinator");
            }
            let authority = owner;
            (authority, token, None)
        }
        None => {
            let (addr, server) = in_process(&args.mode, args.database_url.as_deref()).await;
            (
                addr,
                "sy_bench_admin_token_for_the_load_generator".to_string(),
                Some(server),
            )
        }
    };
    let mut conns = Vec::new();
    for _ in 0..args.conns {
        conns.push(Conn::open(&authority, &admin).await);
    }
    let c = args.conns as u64;
    let mut phases = Vec::new();

    // The floor: a bare round trip.
    let health_n = (args.tasks / c).max(1);
    let (p, conns) = phase("GET /health", conns, move |_, mut conn| async move {
        let mut l = histogram();
        for _ in 0..health_n {
            let t = Instant::now();
            conn.call(Method::GET, "/health", None).await;
            l.record(t.elapsed().as_micros() as u64).unwrap();
        }
        (conn, health_n, l)
    })
    .await;
    phases.push(p);

    // Workers, registered by the admin, one per connection.
    let mut admin_conn = Conn::open(&authority, &admin).await;
    let mut workers = Vec::new();
    for conn in conns {
        let body = json!({"groups": ["load"]});
        let (st, w) = admin_conn
            .call(Method::POST, "/v1/workers", Some(&body))
            .await;
        assert_eq!(st, 201, "{w}");
        let id = w["id"].as_u64().unwrap();
        workers.push((id, conn.with_token(w["token"].as_str().unwrap())));
    }
    let ids: Vec<u64> = workers.iter().map(|(id, _)| *id).collect();
    let worker_conns: Vec<Conn> = workers.into_iter().map(|(_, c)| c).collect();

    // Submitters use admin connections.
    let mut submitters = vec![admin_conn];
    for _ in 1..args.conns {
        submitters.push(Conn::open(&authority, &admin).await);
    }
    let single_n = (args.tasks / 4 / c).max(1);
    let (p, submitters) = phase("POST /v1/tasks", submitters, move |i, mut conn| async move {
        let mut l = histogram();
        for k in 0..single_n {
            let body = json!({"group": "load", "priority": (k % 8) as i32, "payload": {"i": i, "k": k}});
            let t = Instant::now();
            let (st, _) = conn.call(Method::POST, "/v1/tasks", Some(&body)).await;
            assert_eq!(st, 201);
            l.record(t.elapsed().as_micros() as u64).unwrap();
        }
        (conn, single_n, l)
    })
    .await;
    phases.push(p);

    let batches = (args.tasks / args.batch as u64 / c).max(1);
    let batch = args.batch;
    let (p, _submitters) = phase("POST /v1/tasks/batch (per task)", submitters, move |i, mut conn| async move {
        let mut l = histogram();
        for k in 0..batches {
            let tasks: Vec<Value> = (0..batch)
                .map(|j| json!({"group": "load", "priority": (j % 8) as i32, "payload": {"i": i, "k": k, "j": j}}))
                .collect();
            let body = json!({ "tasks": tasks });
            let t = Instant::now();
            let (st, _) = conn.call(Method::POST, "/v1/tasks/batch", Some(&body)).await;
            assert_eq!(st, 201);
            l.record(t.elapsed().as_micros() as u64).unwrap();
        }
        (conn, batches * batch as u64, l)
    })
    .await;
    phases.push(p);

    // Drain: every worker fetches up to `fetch` and reports what it got. The first half of the
    // tasks is reported one request (and one commit) per task, the rest in one batched report
    // per fetch; nothing is left at the end.
    let total = single_n * c + batches * batch as u64 * c;
    let done = Arc::new(AtomicU64::new(0));
    let mut worker_conns = worker_conns;
    for (name, until, batched) in [
        ("fetch + a report per task (per task)", total / 2, false),
        ("fetch + one batched report (per task)", total, true),
    ] {
        let drain = Drain {
            ids: ids.clone(),
            done: done.clone(),
            until,
            fetch: args.fetch,
            bare_fetch: args.bare_fetch,
            batched,
        };
        let (p, back) = phase(name, worker_conns, move |i, conn| {
            drain.clone().run(i, conn)
        })
        .await;
        phases.push(p);
        worker_conns = back;
    }
    assert_eq!(
        done.load(Ordering::Relaxed),
        total,
        "every task reported once"
    );

    report(&args, &phases);
}

/// One worker's share of a drain phase.
#[derive(Clone)]
struct Drain {
    ids: Vec<u64>,
    done: Arc<AtomicU64>,
    until: u64,
    fetch: usize,
    batched: bool,
    bare_fetch: bool,
}

impl Drain {
    async fn run(self, i: usize, mut conn: Conn) -> (Conn, u64, Histogram<u64>) {
        let id = self.ids[i];
        let mut l = histogram();
        let mut n = 0;
        let fetch_path = format!("/v1/workers/{id}/fetch");
        // Everything fetched is reported before the next fetch: the worker holds nothing then,
        // and confirms the last delivery it received (the delivery protocol).
        let mut delivery = 0u64;
        while self.done.load(Ordering::Relaxed) < self.until {
            let body = if self.bare_fetch {
                json!({ "max": self.fetch })
            } else {
                json!({ "max": self.fetch, "holding": {"delivery": delivery, "tasks": []} })
            };
            let t = Instant::now();
            let (st, got) = conn.call(Method::POST, &fetch_path, Some(&body)).await;
            assert_eq!(st, 200, "{got}");
            if let Some(d) = got["delivery"].as_u64() {
                delivery = d;
            }
            let tasks = got["tasks"].as_array().cloned().unwrap_or_default();
            if tasks.is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            if self.batched {
                let reports: Vec<Value> = tasks
                    .iter()
                    .map(|t| json!({"task": t["id"], "attempt": t["attempt"], "outcome": "finished"}))
                    .collect();
                let path = format!("/v1/workers/{id}/reports");
                let (st, r) = conn
                    .call(Method::POST, &path, Some(&json!({ "reports": reports })))
                    .await;
                assert_eq!(st, 200, "{r}");
                assert!(
                    r["results"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|x| x["status"] == 200),
                    "{r}"
                );
            } else {
                for task in &tasks {
                    let path = format!("/v1/workers/{id}/tasks/{}/report", task["id"]);
                    let report = json!({"attempt": task["attempt"], "outcome": "finished"});
                    let (st, r) = conn.call(Method::POST, &path, Some(&report)).await;
                    assert_eq!(st, 200, "{r}");
                }
            }
            // One sample per task: the fetch and its reports, shared out.
            let per = t.elapsed().as_micros() as u64 / tasks.len() as u64;
            l.record_n(per.max(1), tasks.len() as u64).unwrap();
            n += tasks.len() as u64;
            self.done.fetch_add(tasks.len() as u64, Ordering::Relaxed);
        }
        (conn, n, l)
    }
}

fn report(args: &Args, phases: &[Phase]) {
    let floor = phases[0].per_op_ns();
    println!("| operation ({} connections) | ops | per op (wall / ops) | ops/s | p50 | p99 | × `/health` cost |", args.conns);
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for p in phases {
        let per = p.per_op_ns();
        println!(
            "| {} | {} | {:.1} µs | {:.0} | {} µs | {} µs | {:.2} |",
            p.name,
            p.ops,
            per / 1000.0,
            1e9 / per,
            p.latency.value_at_quantile(0.5),
            p.latency.value_at_quantile(0.99),
            per / floor,
        );
    }
}

/// Starts a coordinator in this process on a fresh data directory; returns its address.
async fn in_process(mode: &str, database_url: Option<&str>) -> (String, InProcess) {
    use switchyard::{Config, Mode, Strategy};
    let mode = match mode {
        "fanout" => Mode::Fanout,
        "least-loaded" => Mode::Balanced(Strategy::LeastLoaded),
        other => panic!("--mode fanout|least-loaded, not {other}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let settings = switchyard_server::app::Settings {
        admin_token: Some("sy_bench_admin_token_for_the_load_generator".into()),
        max_batch: 10_000,
        ..Default::default()
    };
    let config = Config {
        mode,
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let opened = match database_url {
        Some(url) => switchyard_server::app::App::open_postgres(url, &addr, config, settings).await,
        None => switchyard_server::app::App::open(dir.path(), config, settings).await,
    }
    .unwrap();
    tokio::spawn(switchyard_server::api::serve(
        listener,
        opened.app,
        std::future::pending(),
    ));
    (addr, InProcess { _dir: dir })
}

/// Keeps the in-process coordinator's data directory until the end.
struct InProcess {
    _dir: tempfile::TempDir,
}

//! The durable lifecycle on one PostgreSQL database served by 1, 2 and 3 coordinators at once
//! (`serve --shared`), in the same run: batched submissions, then a drain (fetch and one
//! batched report per fetch), over HTTP, each client sent to the coordinator that serves its
//! group.
//!
//! ```text
//! cargo run --release -p switchyard-benches --bin cluster_load -- [--tasks N] [--coordinators 1,2,3]
//! ```
//!
//! For each count, the coordinators start in this process (each with its own listener, store
//! connections and runtime threads, as separate processes would have), on a fresh database
//! created from `--postgres`, and the run waits until every one of them serves a share of the
//! groups. The load: `--conns` connections, connection `i` for group `i % --groups`, at that
//! group's owner (learned from a 421's `owners`). Prints a Markdown table with each count's
//! throughput as a ratio of one coordinator's; never asserts anything.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use hyper::Method;
use serde_json::{json, Value};
use switchyard::{Config, Mode, Strategy};
use switchyard_benches::http::{owners, Conn};
use switchyard_server::app::{App, Settings};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// A database on the PostgreSQL server to create the bench's databases from.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    postgres: String,
    /// Coordinator counts to run, one after the other.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    coordinators: Vec<usize>,
    /// Tasks submitted (and drained) per count.
    #[arg(long, default_value_t = 20_000)]
    tasks: u64,
    /// Concurrent connections (submitters, then workers).
    #[arg(long, default_value_t = 24)]
    conns: usize,
    /// Groups the load spreads over.
    #[arg(long, default_value_t = 12)]
    groups: usize,
    /// Tasks per batch submission.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Tasks per fetch.
    #[arg(long, default_value_t = 32)]
    fetch: usize,
}

const ADMIN: &str = "sy_bench_admin_token_for_the_cluster_load";

fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-Atqc", sql])
        .output()
        .expect("psql runs");
    assert!(out.status.success(), "psql {sql}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One count's figures.
struct Run {
    coordinators: usize,
    submit: Rate,
    drain: Rate,
}

/// Tasks per second, and the latency of each request (µs) behind it.
struct Rate {
    tasks: u64,
    wall: Duration,
    latency: Histogram<u64>,
}

impl Rate {
    fn per_second(&self) -> f64 {
        self.tasks as f64 / self.wall.as_secs_f64()
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let runs: Vec<Run> = args
        .coordinators
        .iter()
        .map(|&n| runtime.block_on(run(&args, n)))
        .collect();
    report(&args, &runs);
}

/// Starts `n` coordinators on a fresh database, loads them, stops them.
async fn run(args: &Args, n: usize) -> Run {
    let name = format!("switchyard_cluster_{}_{n}", std::process::id());
    psql(&args.postgres, &format!("DROP DATABASE IF EXISTS {name}"));
    psql(&args.postgres, &format!("CREATE DATABASE {name}"));
    let url = format!("{}/{name}", args.postgres.rsplit_once('/').unwrap().0);
    eprintln!("== {n} coordinator(s)");

    let settings = Settings {
        admin_token: Some(ADMIN.into()),
        max_batch: 10_000,
        shared: true,
        ..Default::default()
    };
    let config = Config {
        mode: Mode::Balanced(Strategy::LeastLoaded),
        ..Config::default()
    };
    let mut servers = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..n {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let opened = App::open_shared(&url, &addr, config.clone(), settings.clone())
            .await
            .expect("the coordinator opens");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(switchyard_server::api::serve(
            listener,
            opened.app,
            async move {
                let _ = stopped.await;
            },
        ));
        servers.push((stop, serving, opened.writer));
        addrs.push(addr);
    }
    // Every coordinator serves a share, and has read who serves the rest.
    let deadline = Instant::now() + Duration::from_secs(60);
    while psql(
        &url,
        "SELECT count(DISTINCT owner) FROM leases WHERE expires_at > now()",
    ) != n.to_string()
    {
        assert!(Instant::now() < deadline, "the coordinators never shared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(settings.group_lease).await;
    let groups: Vec<String> = (0..args.groups).map(|g| format!("g{g}")).collect();
    let owner = owners(&addrs[0], ADMIN, &groups).await;

    // Batched submissions: connection `i` for group `i % groups`, at its owner.
    let per_conn = (args.tasks / args.batch as u64 / args.conns as u64).max(1);
    let mut submitters = Vec::new();
    for i in 0..args.conns {
        let group = groups[i % groups.len()].clone();
        let mut conn = Conn::open(&owner[&group], ADMIN).await;
        let batch = args.batch;
        submitters.push(async move {
            let mut latency = histogram();
            for k in 0..per_conn {
                let tasks: Vec<Value> = (0..batch)
                    .map(|j| json!({"group": group, "payload": {"i": i, "k": k, "j": j}}))
                    .collect();
                let t = Instant::now();
                let (st, r) = conn
                    .call(
                        Method::POST,
                        "/v1/tasks/batch",
                        Some(&json!({ "tasks": tasks })),
                    )
                    .await;
                assert_eq!(st, 201, "{r}");
                latency.record(t.elapsed().as_micros() as u64).unwrap();
            }
            latency
        });
    }
    let submitted = per_conn * args.batch as u64 * args.conns as u64;
    let submit = timed(submitted, submitters).await;

    // The drain: a worker per connection, for its group, at its owner; each group's workers
    // stop once the group's tasks are all reported.
    let mut per_group: BTreeMap<&str, u64> = BTreeMap::new();
    for i in 0..args.conns {
        *per_group.entry(&groups[i % groups.len()]).or_default() += per_conn * args.batch as u64;
    }
    let done: BTreeMap<String, Arc<AtomicU64>> = groups
        .iter()
        .map(|g| (g.clone(), Arc::new(AtomicU64::new(0))))
        .collect();
    let mut workers = Vec::new();
    for i in 0..args.conns {
        let group = groups[i % groups.len()].clone();
        let mut admin = Conn::open(&owner[&group], ADMIN).await;
        let (st, w) = admin
            .call(
                Method::POST,
                "/v1/workers",
                Some(&json!({"groups": [group]})),
            )
            .await;
        assert_eq!(st, 201, "{w}");
        let id = w["id"].as_u64().unwrap();
        let mut conn = admin.with_token(w["token"].as_str().unwrap());
        let (done, total, fetch) = (done[&group].clone(), per_group[group.as_str()], args.fetch);
        workers.push(async move {
            let mut latency = histogram();
            let mut delivery = 0u64;
            let fetch_path = format!("/v1/workers/{id}/fetch");
            let report_path = format!("/v1/workers/{id}/reports");
            while done.load(Ordering::Relaxed) < total {
                let t = Instant::now();
                let body = json!({"max": fetch, "holding": {"delivery": delivery, "tasks": []}});
                let (st, got) = conn.call(Method::POST, &fetch_path, Some(&body)).await;
                assert_eq!(st, 200, "{got}");
                delivery = got["delivery"].as_u64().unwrap_or(delivery);
                let tasks = got["tasks"].as_array().cloned().unwrap_or_default();
                if tasks.is_empty() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                let reports: Vec<Value> = tasks
                    .iter()
                    .map(|t| json!({"task": t["id"], "attempt": t["attempt"], "outcome": "finished"}))
                    .collect();
                let (st, r) = conn
                    .call(Method::POST, &report_path, Some(&json!({ "reports": reports })))
                    .await;
                assert_eq!(st, 200, "{r}");
                latency.record(t.elapsed().as_micros() as u64).unwrap();
                done.fetch_add(tasks.len() as u64, Ordering::Relaxed);
            }
            latency
        });
    }
    let drain = timed(submitted, workers).await;
    for (stop, serving, writer) in servers {
        let _ = stop.send(());
        let _ = serving.await;
        let _ = writer.await;
    }
    psql(
        &args.postgres,
        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    );
    Run {
        coordinators: n,
        submit,
        drain,
    }
}

/// Runs `jobs` at once; `tasks` is what they move in all.
async fn timed<F>(tasks: u64, jobs: Vec<F>) -> Rate
where
    F: std::future::Future<Output = Histogram<u64>> + Send + 'static,
{
    let started = Instant::now();
    let handles: Vec<_> = jobs.into_iter().map(tokio::spawn).collect();
    let mut latency = histogram();
    for h in handles {
        latency.add(h.await.unwrap()).unwrap();
    }
    Rate {
        tasks,
        wall: started.elapsed(),
        latency,
    }
}

fn report(args: &Args, runs: &[Run]) {
    println!(
        "| coordinators | batch submit tasks/s | p50 / p99 per batch of {} | drain tasks/s | p50 / p99 per fetch of ≤ {} + report | submit ÷ one | drain ÷ one |",
        args.batch, args.fetch
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let one = runs.first();
    for r in runs {
        let ratio = |f: fn(&Run) -> f64| one.map_or(1.0, |o| f(r) / f(o));
        println!(
            "| {} | {:.0} | {:.1} / {:.1} ms | {:.0} | {:.1} / {:.1} ms | {:.2} | {:.2} |",
            r.coordinators,
            r.submit.per_second(),
            r.submit.latency.value_at_quantile(0.5) as f64 / 1e3,
            r.submit.latency.value_at_quantile(0.99) as f64 / 1e3,
            r.drain.per_second(),
            r.drain.latency.value_at_quantile(0.5) as f64 / 1e3,
            r.drain.latency.value_at_quantile(0.99) as f64 / 1e3,
            ratio(|r| r.submit.per_second()),
            ratio(|r| r.drain.per_second()),
        );
    }
}

//! Failover time on PostgreSQL: how long after the active coordinator is stopped a standby
//! serves its groups again, measured as a worker sees it — from the signal to the first fetch
//! that hands the worker a task queued before the signal.
//!
//! ```text
//! cargo build --release
//! cargo run --release -p switchyard-benches --bin failover -- [--rounds 20] [--group-lease 2.5]
//! ```
//!
//! Each round starts a standby (`serve --standby`) beside the active coordinator, queues a
//! task, then SIGKILLs the active one (even rounds) or SIGTERMs it (odd rounds: a graceful
//! handoff, which gives the leases up at once), and times the worker's fetches against the
//! standby until one returns the task. The standby is the next round's active coordinator. It
//! uses the release binary, a fresh database on the PostgreSQL server at `--postgres` (created
//! and dropped with `psql`), loopback ports, and prints a Markdown table.
//!
//! With `--shared`, two coordinators serve the database together (`serve --shared`). Each
//! round queues a task in a group one of them serves, stops that one, and times a worker that
//! registers with the other for that group (refused with 421 until the group is taken over)
//! and fetches until it gets the task; then restarts the stopped one and waits until both
//! serve a share again.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use hyper::Method;
use serde_json::json;
use switchyard_server::client::Client;

#[derive(Parser)]
struct Args {
    /// The coordinator binary.
    #[arg(long, default_value = "target/release/switchyard")]
    binary: String,
    /// A database on the PostgreSQL server to create the bench's database from.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    postgres: String,
    /// Failovers to time (half SIGKILL, half SIGTERM).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// The coordinators' `--group-lease`, in seconds (the default is the coordinator's own).
    #[arg(long, default_value_t = 2.5)]
    group_lease: f64,
    /// Two coordinators sharing the groups (`serve --shared`) instead of active and standby.
    #[arg(long)]
    shared: bool,
}

const ADMIN: &str = "sy_bench_admin_token_for_the_failover_bench";

fn psql(url: &str, sql: &str) {
    let status = Command::new("psql")
        .args([url, "-q", "-c", sql])
        .status()
        .expect("psql runs");
    assert!(status.success(), "psql {sql}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A coordinator process, killed when dropped.
struct Coordinator {
    child: Child,
    port: u16,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn coordinator(args: &Args, url: &str, port: u16, flag: Option<&str>) -> Coordinator {
    let mut command = Command::new(&args.binary);
    command
        .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
        .args(["--admin-token", ADMIN, "--database-url", url])
        .args(["--group-lease", &args.group_lease.to_string()])
        .args(["--mode", "least-loaded"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command.args(flag);
    Coordinator {
        child: command.spawn().expect("the coordinator binary starts"),
        port,
    }
}

fn signal(child: &Child, signal: i32) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn until_serving(port: u16) {
    let client = Client::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::time::timeout(Duration::from_millis(500), client.text("/health"))
        .await
        .map_or(true, |r| r.is_err())
    {
        assert!(Instant::now() < deadline, "the coordinator did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let name = format!("switchyard_failover_{}", std::process::id());
    psql(&args.postgres, &format!("DROP DATABASE IF EXISTS {name}"));
    psql(&args.postgres, &format!("CREATE DATABASE {name}"));
    let root = args.postgres.rsplit_once('/').unwrap().0;
    let url = format!("{root}/{name}");
    let (killed, terminated) = if args.shared {
        shared_rounds(&args, &url).await
    } else {
        standby_rounds(&args, &url).await
    };
    psql(
        &args.postgres,
        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    );

    println!(
        "| stop ({}, group lease {} s) | failovers | p50 | p99 | max |",
        if args.shared {
            "two --shared coordinators"
        } else {
            "active and --standby"
        },
        args.group_lease
    );
    println!("|---|---:|---:|---:|---:|");
    for (what, mut times) in [("SIGKILL", killed), ("SIGTERM (handoff)", terminated)] {
        if times.is_empty() {
            continue;
        }
        times.sort();
        println!(
            "| {what} | {} | {:.2?} | {:.2?} | {:.2?} |",
            times.len(),
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            times[times.len() - 1]
        );
    }
}

fn admin(port: u16) -> Client {
    Client::new(&format!("http://127.0.0.1:{port}"), Some(ADMIN.into())).unwrap()
}

/// Prints round `round`'s failover time and files it under SIGTERM (`graceful`) or SIGKILL.
fn tally(
    round: usize,
    graceful: bool,
    took: Duration,
    killed: &mut Vec<Duration>,
    terminated: &mut Vec<Duration>,
) {
    let (what, times) = if graceful {
        ("SIGTERM", terminated)
    } else {
        ("SIGKILL", killed)
    };
    eprintln!("round {round}: {what} → served again in {took:.2?}");
    times.push(took);
}

/// How many coordinators hold unexpired leases, by the database's clock.
fn owners(url: &str) -> usize {
    let out = Command::new("psql")
        .args([
            url,
            "-Atc",
            "SELECT count(DISTINCT owner) FROM leases WHERE expires_at > now()",
        ])
        .output()
        .expect("psql runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Rounds with two `--shared` coordinators (see the module docs).
async fn shared_rounds(args: &Args, url: &str) -> (Vec<Duration>, Vec<Duration>) {
    let ports = [free_port(), free_port()];
    let mut running = ports.map(|port| Some(coordinator(args, url, port, Some("--shared"))));
    let (mut killed, mut terminated) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        for port in ports {
            until_serving(port).await;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while owners(url) < 2 {
            assert!(Instant::now() < deadline, "the coordinators never shared");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Each reads the other's groups every tenth of a lease: let both see the split.
        tokio::time::sleep(Duration::from_secs_f64(args.group_lease / 2.0)).await;
        let (victim, survivor) = (round % 2, (round + 1) % 2);
        // A task in a group the victim serves (a 421 creates nothing).
        let mut found = None;
        for i in 0..1000 {
            let group = format!("r{round}g{i}");
            let body = json!({ "group": group });
            if let Ok(t) = admin(ports[victim])
                .call_here(Method::POST, "/v1/tasks", Some(&body))
                .await
            {
                found = Some((group, t["id"].as_u64().unwrap()));
                break;
            }
        }
        let (group, task) = found.expect("a group the victim serves");
        let graceful = round % 2 == 1;
        let started = Instant::now();
        signal(
            &running[victim].as_ref().unwrap().child,
            if graceful { 15 } else { 9 },
        );
        let took = loop {
            assert!(started.elapsed() < Duration::from_secs(60), "no failover");
            let Ok(registered) = admin(ports[survivor])
                .call_here(
                    Method::POST,
                    "/v1/workers",
                    Some(&json!({"groups": [group]})),
                )
                .await
            else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            let worker = registered["id"].as_u64().unwrap();
            let token = registered["token"].as_str().unwrap().to_string();
            let me = Client::new(
                &format!("http://127.0.0.1:{}", ports[survivor]),
                Some(token),
            )
            .unwrap();
            let fetch = format!("/v1/workers/{worker}/fetch");
            let body = json!({"max": 1, "wait_ms": 5000});
            let got = me.call(Method::POST, &fetch, Some(&body)).await.unwrap();
            let t = &got["tasks"][0];
            assert_eq!(t["id"].as_u64(), Some(task), "{got}");
            let took = started.elapsed();
            let report = json!({"attempt": t["attempt"], "outcome": "finished"});
            let path = format!("/v1/workers/{worker}/tasks/{task}/report");
            me.call(Method::POST, &path, Some(&report)).await.unwrap();
            let path = format!("/v1/workers/{worker}");
            me.call(Method::DELETE, &path, None).await.unwrap();
            break took;
        };
        tally(round, graceful, took, &mut killed, &mut terminated);
        let mut stopped = running[victim].take().unwrap();
        let _ = stopped.child.wait();
        drop(stopped);
        running[victim] = Some(coordinator(args, url, ports[victim], Some("--shared")));
    }
    (killed, terminated)
}

/// Rounds with an active coordinator and a `--standby` (see the module docs).
async fn standby_rounds(args: &Args, url: &str) -> (Vec<Duration>, Vec<Duration>) {
    let ports = [free_port(), free_port()];
    let mut active = coordinator(args, url, ports[0], None);
    until_serving(active.port).await;
    let registered = admin(active.port)
        .call(Method::POST, "/v1/workers", Some(&json!({"groups": ["g"]})))
        .await
        .unwrap();
    let worker = registered["id"].as_u64().unwrap();
    let token = registered["token"].as_str().unwrap().to_string();

    let (mut killed, mut terminated) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let port = ports[(round + 1) % 2];
        let standby = coordinator(args, url, port, Some("--standby"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let task = admin(active.port)
            .call(Method::POST, "/v1/tasks", Some(&json!({"group": "g"})))
            .await
            .unwrap()["id"]
            .as_u64()
            .unwrap();
        let graceful = round % 2 == 1;
        let started = Instant::now();
        signal(&active.child, if graceful { 15 } else { 9 });
        let me = Client::new(&format!("http://127.0.0.1:{port}"), Some(token.clone())).unwrap();
        let fetch = format!("/v1/workers/{worker}/fetch");
        let took = loop {
            let got = tokio::time::timeout(
                Duration::from_secs(2),
                me.call(Method::POST, &fetch, Some(&json!({"max": 1, "wait_ms": 0}))),
            )
            .await;
            if let Ok(Ok(got)) = got {
                if let Some(t) = got["tasks"].as_array().and_then(|t| t.first()) {
                    assert_eq!(t["id"].as_u64(), Some(task), "{got}");
                    let took = started.elapsed();
                    let report = json!({"attempt": t["attempt"], "outcome": "finished"});
                    me.call(
                        Method::POST,
                        &format!("/v1/workers/{worker}/tasks/{task}/report"),
                        Some(&report),
                    )
                    .await
                    .unwrap();
                    break took;
                }
            }
            assert!(started.elapsed() < Duration::from_secs(60), "no failover");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        tally(round, graceful, took, &mut killed, &mut terminated);
        let _ = active.child.wait();
        active = standby;
    }
    drop(active);
    (killed, terminated)
}

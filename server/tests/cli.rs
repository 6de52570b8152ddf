//! The `switchyard` client subcommands against the real binary: the README's walk-through
//! (token create → submit → work → status), a failing command, and the errors a user sees.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{spawn_binary, spawn_binary_at, ADMIN};
use serde_json::Value;

/// Runs `switchyard args…` against `server` with `token`.
fn cli(server: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args(args).env("SWITCHYARD_SERVER", server);
    match token {
        Some(t) => cmd.env("SWITCHYARD_TOKEN", t),
        None => cmd.env_remove("SWITCHYARD_TOKEN"),
    };
    cmd.output().expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone())
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn a_newcomer_submits_and_a_shell_worker_runs_the_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) = spawn_binary(dir.path(), &[]);
    let url = format!("http://{addr}");
    let url = url.as_str();

    let token = stdout(&cli(
        url,
        Some(ADMIN),
        &["token", "create", "--group", "demo"],
    ));
    assert!(token.starts_with("sy_"), "{token}");
    let ok = stdout(&cli(
        url,
        Some(&token),
        &["submit", "--group", "demo", "--payload", r#"{"n": 21}"#],
    ));
    let bad = stdout(&cli(
        url,
        Some(&token),
        &[
            "submit",
            "--group",
            "demo",
            "--priority",
            "-1",
            "--payload",
            "boom",
        ],
    ));
    // The worker doubles n with the payload from stdin, and fails on a string payload.
    let script = r#"python3 -c 'import json,sys; p=json.load(sys.stdin); print(p["n"]*2) if isinstance(p, dict) else sys.exit("not a dict: %r" % p)'"#;
    let worked = cli(
        url,
        Some(&token),
        &[
            "work",
            "--group",
            "demo",
            "--tasks",
            "2",
            "--wait",
            "1",
            "--command",
            script,
        ],
    );
    let log = String::from_utf8_lossy(&worked.stderr);
    assert!(worked.status.success(), "{log}");
    assert!(log.contains("1 finished, 1 failed"), "{log}");

    let status = |id: &str| -> Value {
        serde_json::from_str(&stdout(&cli(url, Some(&token), &["status", id]))).unwrap()
    };
    let done = status(&ok);
    assert_eq!(done["state"], "finished");
    assert_eq!(done["outcome"], "42\n");
    let failed = status(&bad);
    assert_eq!(failed["state"], "failed");
    assert!(
        failed["outcome"]
            .as_str()
            .unwrap()
            .contains("not a dict: 'boom'"),
        "{failed}"
    );
    // The worker left when it stopped.
    let stats: Value = serde_json::from_str(&stdout(&cli(url, Some(ADMIN), &["stats"]))).unwrap();
    assert_eq!(stats["workers"].as_array().unwrap().len(), 0, "{stats}");
    assert_eq!(stats["claimed"], 2);

    // Errors reach the user as one line, with a failing exit status.
    let refused = cli(url, None, &["stats"]);
    assert!(!refused.status.success());
    let msg = String::from_utf8_lossy(&refused.stderr);
    assert!(msg.contains("401 unauthorized"), "{msg}");
    let forbidden = cli(url, Some(&token), &["submit", "--group", "other"]);
    assert!(String::from_utf8_lossy(&forbidden.stderr).contains("403 forbidden"));
    let unreachable = cli("http://127.0.0.1:1", Some(ADMIN), &["stats"]);
    assert!(!unreachable.status.success());
    let bad_url = cli("https://example.com", Some(ADMIN), &["stats"]);
    assert!(String::from_utf8_lossy(&bad_url.stderr).contains("use http://"));

    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn a_worker_rides_out_a_coordinator_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr, url, token) = serve_with_token(dir.path(), &[]);
    let mut worker = work_once(&url, &token, "cat");
    let _stop = StopOnFailure(worker.id());
    // Wait until it has registered (it is long-polling then).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let stats: Value =
            serde_json::from_str(&stdout(&cli(&url, Some(ADMIN), &["stats"]))).unwrap();
        if !stats["workers"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never registered"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    server.kill().unwrap();
    server.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300)); // the worker sees it gone
                                                               // The same address and data: the worker's registration and token are restored.
    let (mut server, _) = spawn_binary_at(dir.path(), &addr.to_string(), &[]);
    let id = stdout(&cli(
        &url,
        Some(&token),
        &["submit", "--group", "g", "--payload", "7"],
    ));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let log = worker.wait_with_output().unwrap().stderr;
    let log = String::from_utf8_lossy(&log);
    assert!(status.success(), "{log}");
    assert!(log.contains("retrying"), "{log}");
    assert!(log.contains("1 finished"), "{log}");
    let task: Value =
        serde_json::from_str(&stdout(&cli(&url, Some(&token), &["status", &id]))).unwrap();
    assert_eq!(
        (task["state"].as_str(), task["outcome"].as_str()),
        (Some("finished"), Some("7"))
    );
    server.kill().unwrap();
    server.wait().unwrap();
}

/// The binary serving on `dir` with `args`, its address and URL, and a submitter token for
/// group `g`.
fn serve_with_token(
    dir: &Path,
    args: &[&str],
) -> (common::Spawned, std::net::SocketAddr, String, String) {
    let (server, addr) = spawn_binary(dir, args);
    let url = format!("http://{addr}");
    let token = stdout(&cli(
        &url,
        Some(ADMIN),
        &["token", "create", "--group", "g"],
    ));
    (server, addr, url, token)
}

/// Kills process `pid` if the test fails while this is alive (a passing test has already
/// waited for it, so its pid is not touched then).
struct StopOnFailure(u32);

impl Drop for StopOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(pid) = rustix::process::Pid::from_raw(self.0 as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// `switchyard work` for group `g` that stops after one task, running `command`, its log piped.
fn work_once(url: &str, token: &str, command: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "work",
            "--group",
            "g",
            "--tasks",
            "1",
            "--wait",
            "1",
            "--command",
            command,
        ])
        .env("SWITCHYARD_SERVER", url)
        .env("SWITCHYARD_TOKEN", token)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Whether process `pid` is running (a zombie waiting to be reaped counts as ended).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Polls `done` every 50 ms until it holds; panics with `what` after `secs` seconds.
fn wait_for(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A `work` loop running one long command: its grandchild `sleep` writes its pid to
/// `pidfile`. Returns the worker, the submitted task's id and the grandchild's pid.
fn long_running_worker(
    url: &str,
    token: &str,
    pidfile: &Path,
) -> (std::process::Child, String, u32) {
    let id = stdout(&cli(url, Some(token), &["submit", "--group", "g"]));
    let command = format!("sleep 120 & echo $! > {}; wait", pidfile.display());
    let worker = work_once(url, token, &command);
    let mut pid = 0;
    wait_for(30, "the command never started", || {
        pid = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        pid != 0
    });
    assert!(alive(pid));
    (worker, id, pid)
}

#[test]
fn a_cancelled_task_stops_its_command_and_everything_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, _, url, token) = serve_with_token(dir.path(), &["--lease-timeout", "1.5"]);
    let pidfile = dir.path().join("pid");
    let (mut worker, id, pid) = long_running_worker(&url, &token, &pidfile);
    let _stop = (StopOnFailure(worker.id()), StopOnFailure(pid));
    stdout(&cli(&url, Some(&token), &["cancel", &id]));
    // The next heartbeat (a third of the lease) names it revoked: the loop stops the command's
    // whole process group, and with `--tasks 1` it is done.
    let mut status = None;
    wait_for(20, "the worker kept running a cancelled task", || {
        status = worker.try_wait().unwrap();
        status.is_some()
    });
    let log = String::from_utf8_lossy(&worker.wait_with_output().unwrap().stderr).into_owned();
    assert!(status.unwrap().success(), "{log}");
    assert!(
        log.contains("revoked") && log.contains("1 revoked"),
        "{log}"
    );
    wait_for(
        10,
        "the command's grandchild outlived the cancellation",
        || !alive(pid),
    );
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn sigterm_stops_the_command_gives_the_task_back_and_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, _, url, token) = serve_with_token(dir.path(), &[]);
    let pidfile = dir.path().join("pid");
    let (mut worker, id, pid) = long_running_worker(&url, &token, &pidfile);
    let _stop = (StopOnFailure(worker.id()), StopOnFailure(pid));
    common::terminate(&worker);
    let mut status = None;
    wait_for(20, "the worker did not stop on SIGTERM", || {
        status = worker.try_wait().unwrap();
        status.is_some()
    });
    let log = String::from_utf8_lossy(&worker.wait_with_output().unwrap().stderr).into_owned();
    assert!(status.unwrap().success(), "{log}");
    wait_for(10, "the command's grandchild outlived the worker", || {
        !alive(pid)
    });
    // The task went back (its attempt ended as given back); the worker left, so with no
    // candidate left it waits parked.
    let task: Value =
        serde_json::from_str(&stdout(&cli(&url, Some(&token), &["status", &id]))).unwrap();
    assert_eq!(
        (task["state"].as_str(), task["attempt"].as_u64()),
        (Some("parked"), Some(1)),
        "{task}"
    );
    let stats: Value = serde_json::from_str(&stdout(&cli(&url, Some(ADMIN), &["stats"]))).unwrap();
    assert_eq!(stats["workers"].as_array().unwrap().len(), 0, "{stats}");
    server.kill().unwrap();
    server.wait().unwrap();
}

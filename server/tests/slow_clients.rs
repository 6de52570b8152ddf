//! Clients that try to wedge the real binary: hundreds of idle and half-sent connections under
//! a low open-files limit, a body declared over the limit, and a half-sent request at shutdown.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{serve_args, spawn_serving, Spawned, ADMIN};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The coordinator under `ulimit -n 256` (soft and hard), with `args`.
fn start_limited(dir: &std::path::Path, args: &[&str]) -> Spawned {
    let mut command = Command::new("sh");
    command
        .args(["-c", r#"ulimit -n 256 && exec "$0" "$@""#])
        .arg(env!("CARGO_BIN_EXE_switchyard"))
        .args(serve_args(dir, "127.0.0.1:0"))
        .args(args);
    let (child, addr) = spawn_serving(command);
    ADDR.with(|a| a.set(Some(addr)));
    child
}

thread_local! {
    static ADDR: std::cell::Cell<Option<SocketAddr>> = const { std::cell::Cell::new(None) };
}

/// One request on a keep-alive connection; returns the status and the JSON body.
async fn request(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> (u16, Value) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let status = head[9..12].parse().unwrap();
    (
        status,
        serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or(Value::Null),
    )
}

/// `GET /health` on a fresh connection, within `limit`: its status (503 at the connection cap).
async fn health(addr: SocketAddr, limit: Duration) -> Option<u16> {
    let probe = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut text = Vec::new();
        s.read_to_end(&mut text).await.ok()?;
        String::from_utf8_lossy(&text).get(9..12)?.parse().ok()
    };
    tokio::time::timeout(limit, probe).await.ok().flatten()
}

fn alive(child: &mut Child) -> bool {
    child.try_wait().unwrap().is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_neither_starve_a_worker_nor_hold_the_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_limited(
        dir.path(),
        &[
            "--header-timeout",
            "2",
            "--shutdown-grace",
            "1",
            "--max-body",
            "65536",
        ],
    );
    let addr = ADDR.with(|a| a.get()).unwrap();
    // A worker on a keep-alive connection, established first.
    let mut admin = TcpStream::connect(addr).await.unwrap();
    let (st, w) = request(
        &mut admin,
        "POST",
        "/v1/workers",
        ADMIN,
        r#"{"groups":["g"]}"#,
    )
    .await;
    assert_eq!(st, 201, "{w}");
    let (id, token) = (
        w["id"].as_u64().unwrap(),
        w["token"].as_str().unwrap().to_string(),
    );
    let mut worker = TcpStream::connect(addr).await.unwrap();

    // Up to 300 idle connections and 100 that send half a request head, then stall.
    let mut slow = Vec::new();
    let beat = format!("/v1/workers/{id}/heartbeat");
    for i in 0..400 {
        if i % 25 == 0 {
            // The worker's and the admin's connections stay busy meanwhile, as they would
            // (an idle one is closed after the header timeout like any other).
            assert_eq!(request(&mut worker, "POST", &beat, &token, "").await.0, 200);
            assert_eq!(
                request(&mut admin, "GET", "/v1/stats", ADMIN, "").await.0,
                200
            );
        }
        // A full accept backlog makes a connect wait for SYN retries (seconds): skip those,
        // so the busy connections above never idle past the header timeout.
        let connect = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr));
        let Ok(Ok(mut s)) = connect.await else {
            continue;
        };
        if i % 4 == 0 {
            let _ = s
                .write_all(b"POST /v1/tasks HTTP/1.1\r\nHost: t\r\nContent-Le")
                .await;
        }
        slow.push(s);
    }
    assert!(
        slow.len() >= 300,
        "only {} slow connections were made",
        slow.len()
    );
    // The worker keeps submitting and fetching through all of it, and /health always answers
    // at once: 200, or a JSON 503 while the connection cap is full.
    let mut healths = Vec::new();
    for n in 0..20 {
        let (st, _) = request(&mut admin, "POST", "/v1/tasks", ADMIN, r#"{"group":"g"}"#).await;
        assert_eq!(st, 201);
        let path = format!("/v1/workers/{id}/fetch");
        let (st, got) = request(&mut worker, "POST", &path, &token, r#"{"max":1}"#).await;
        assert_eq!(
            (st, got["tasks"].as_array().map(Vec::len)),
            (200, Some(1)),
            "{got}"
        );
        let report = format!("/v1/workers/{id}/tasks/{}/report", got["tasks"][0]["id"]);
        let (st, _) = request(
            &mut worker,
            "POST",
            &report,
            &token,
            r#"{"attempt":1,"outcome":"finished"}"#,
        )
        .await;
        assert_eq!(st, 200, "fetch {n}");
        healths.push(health(addr, Duration::from_secs(2)).await);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(
        healths.iter().all(|h| matches!(h, Some(200 | 503))),
        "{healths:?}"
    );
    // Every slow connection is closed by the server: past the header timeout, or at once with
    // a 503 when it came over the cap (those in the accept backlog meet one or the other).
    let closing = slow.into_iter().map(|mut s| async move {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut rest)).await;
        read.is_ok()
    });
    let closed = common::join_all(closing).await;
    assert!(
        closed.iter().all(|c| *c),
        "{} slow connections still open",
        closed.iter().filter(|c| !**c).count()
    );
    assert_eq!(health(addr, Duration::from_secs(2)).await, Some(200));

    // A body declared over --max-body is refused at once, before any of it is sent.
    let mut big = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/tasks HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
    );
    big.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(2), big.read(&mut answer))
        .await
        .expect("413 at once")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(
        answer.starts_with("HTTP/1.1 413") && answer.contains("body_too_large"),
        "{answer}"
    );

    // SIGTERM with a request whose body is half-sent: the process exits within the grace.
    let mut half = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/tasks HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"gro"
    );
    half.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    common::terminate(&server);
    let stopping = Instant::now();
    while alive(&mut server) && stopping.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = server.try_wait().unwrap();
    if status.is_none() {
        let _ = server.kill();
        let _ = server.wait();
    }
    let status = status.expect("the coordinator did not exit after SIGTERM");
    assert!(status.success(), "{status}");
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "{:?}",
        stopping.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_loses_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = common::spawn_binary(dir.path(), &["--header-timeout", "1"]);
    // Thousands of pipelined requests for the API document, and never a byte read: the
    // answers fill the socket buffers and the server's writes stall.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let request = "GET /openapi.json HTTP/1.1\r\nHost: t\r\n\r\n".repeat(5000);
    let _ = tokio::time::timeout(Duration::from_secs(5), s.write_all(request.as_bytes())).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The server gave up on the connection: reading now finds what was buffered, then the
    // end, not the thousands of answers asked for.
    let mut total = 0usize;
    let mut chunk = vec![0u8; 1 << 16];
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    let one = {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /openapi.json HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).await.unwrap();
        all.len()
    };
    assert!(ended.is_ok(), "the stalled connection stayed open");
    assert!(
        total < 2000 * one,
        "{total} bytes: the server kept answering ({one} per answer)"
    );
}

//! The listener: accepts connections and serves the API on each, bounded so that no client can
//! wedge the coordinator.
//!
//! - **Connection cap** (`--max-connections`). A semaphore bounds the connections served at
//!   once. A connection over the cap is not left waiting in the backlog (where it would hold a
//!   file descriptor and starve nobody's but its own request): it is accepted, answered 503 with
//!   a JSON body, and closed at once. The cap is kept below the process's file-descriptor
//!   limit, whose soft value is raised to the hard one at start ([`raise_fd_limit`]).
//! - **Header timeout** (`--header-timeout`). A connection must deliver each request's complete
//!   head within this time of being ready for it: after connecting, or after the previous
//!   response. It bounds half-sent headers and idle keep-alive connections alike (hyper's timer
//!   starts when the connection waits for a head, so the two are one bound). A response write
//!   that makes no progress for as long (a client that stops reading) closes the connection
//!   too ([`Stalls`]). A request's body and handling are bounded by `--request-timeout` (see
//!   [`crate::api`]).
//! - **Overload does not kill workers.** While connections are being refused at the cap, a
//!   worker's requests may be among them: the reaper does not declare workers dead until the
//!   cap has not been hit for a whole lease (see [`crate::liveness`]).
//! - **Shutdown with a deadline** (`--shutdown-grace`). On a stop, the listener closes, every
//!   connection finishes the request in hand and closes, and waiting fetches answer at once.
//!   Connections still open after the grace period are dropped, so one half-sent request cannot
//!   hold the process.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Sleep;

use crate::api::router;
use crate::app::App;
use crate::error::{ErrorBody, ErrorKind};
use crate::sync::Arc;

/// File descriptors kept free for everything but client connections (the store's files, the
/// listener, outgoing connections, a refused client's answer).
const RESERVED_FDS: u64 = 64;

/// How a server run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Connections still open at the end of the grace period, dropped.
    pub dropped: usize,
}

/// Raises the soft limit on open files to the hard limit; returns the soft limit in force.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    if limit.current != limit.maximum && setrlimit(Resource::Nofile, raised).is_ok() {
        return raised.current.unwrap_or(u64::MAX);
    }
    limit.current.unwrap_or(u64::MAX)
}

/// The connection cap in force: the configured one, lowered to fit the file-descriptor limit.
pub fn connection_cap(configured: usize) -> usize {
    let fds = raise_fd_limit();
    let fit = fds.saturating_sub(RESERVED_FDS).max(1);
    let cap = configured.min(usize::try_from(fit).unwrap_or(usize::MAX));
    if cap < configured {
        tracing::warn!(
            configured,
            cap,
            open_files_limit = fds,
            "the connection cap is lowered to fit the open-files limit (ulimit -n)"
        );
    }
    cap
}

/// Serves the API on `listener` until `shutdown` resolves or the coordinator stops itself
/// (a store failure), then shuts down within the grace period. See the module docs.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<Stopped> {
    let addr: SocketAddr = listener.local_addr()?;
    let limits = app.limits.clone();
    let cap = connection_cap(limits.max_connections);
    tracing::info!(%addr, max_connections = cap, "serving");
    let service = TowerToHyperService::new(router(app.clone()));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let slots = Arc::new(Semaphore::new(cap));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            () = &mut shutdown => break,
            () = app.halted() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or the client gave up first: pause, go on.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            app.metrics.connections_refused.increment(1);
            app.leases.overloaded();
            connections.spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(Stalls::new(stream, limits.header_timeout));
        let conn = http.serve_connection(io, service.clone());
        let conn = graceful.watch(conn);
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    // Waiting fetches answer now instead of holding the shutdown for their wait.
    app.wakeups.close();
    tracing::info!(
        connections = connections.len(),
        "stopping: finishing the requests in hand"
    );
    // Every connection closes after the request it is serving.
    let finished = tokio::time::timeout(limits.shutdown_grace, graceful.shutdown()).await;
    let dropped = if finished.is_ok() {
        0
    } else {
        let open = connections.len();
        tracing::warn!(
            open,
            grace_ms = limits.shutdown_grace.as_millis() as u64,
            "connections still open after the grace period: dropped"
        );
        open
    };
    connections.shutdown().await;
    Ok(Stopped { dropped })
}

/// Answers a connection over the cap with a 503 and closes it. What the client sent is read
/// (briefly, and bounded) before the close, so the close does not reset the connection and
/// discard the answer.
async fn refuse(mut stream: TcpStream) {
    let body = serde_json::to_string(&ErrorBody {
        owners: None,
        error: ErrorKind::TooManyConnections,
        message: "the coordinator is at its connection limit (--max-connections); retry shortly"
            .into(),
        state: None,
    })
    .unwrap_or_default();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left -= n.min(left),
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

/// A connection's stream whose writes fail once they have made no progress for `limit`: a
/// client that stops reading its responses cannot hold a connection (and its slot) for ever.
pub struct Stalls {
    inner: TcpStream,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl Stalls {
    fn new(inner: TcpStream, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Turns a pending write into a timeout once it has been pending for `limit`; any progress
    /// restarts the clock.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading its response",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Stalls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stalls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

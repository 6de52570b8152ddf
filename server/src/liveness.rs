//! Worker leases and the reaper.
//!
//! Every successful worker request (register, fetch, report) renews the worker's lease. The
//! reaper wakes every quarter of the lease timeout and declares each worker whose lease has
//! expired dead: it is unregistered exactly as if it had left, so its queued and running tasks
//! are redistributed (running ones as a new attempt), and its later requests get 410 Gone.
//! Workers restored at start-up begin with a fresh lease. While the listener refuses
//! connections at its cap, and for one lease after, no worker is declared dead: its requests
//! may have been among those refused.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::app::App;
use crate::sync::{Mutex, Weak};

/// The last time each worker was heard from.
#[derive(Debug)]
pub struct Leases {
    timeout: Duration,
    seen: Mutex<HashMap<u64, Instant>>,
    /// When the listener last refused a connection at its cap.
    overloaded: Mutex<Option<Instant>>,
}

impl Leases {
    /// Leases that expire after `timeout` of silence.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            seen: Mutex::new(HashMap::new()),
            overloaded: Mutex::new(None),
        }
    }

    /// The listener refused a connection at its cap: a worker's request may have been refused.
    pub fn overloaded(&self) {
        *self.overloaded.lock() = Some(Instant::now());
    }

    /// Whether a connection was refused at the cap within the last lease timeout at `now`:
    /// silence then may be the coordinator's fault, not the worker's.
    pub fn overloaded_lately(&self, now: Instant) -> bool {
        self.overloaded
            .lock()
            .is_some_and(|at| now.saturating_duration_since(at) <= self.timeout)
    }

    /// The worker was heard from now.
    pub fn renew(&self, worker: u64) {
        self.seen.lock().insert(worker, Instant::now());
    }

    /// The worker is gone; it holds no lease.
    pub fn forget(&self, worker: u64) {
        self.seen.lock().remove(&worker);
    }

    /// Workers silent for longer than the timeout at `now`.
    pub fn expired(&self, now: Instant) -> Vec<u64> {
        let seen = self.seen.lock();
        seen.iter()
            .filter(|(_, last)| now.saturating_duration_since(**last) > self.timeout)
            .map(|(w, _)| *w)
            .collect()
    }

    /// The lease timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Declares expired workers dead until the app is dropped.
pub async fn reap(app: Weak<App>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(app) = app.upgrade() else { return };
        let now = Instant::now();
        let overloaded = app.leases().overloaded_lately(now);
        for worker in app.leases().expired(now) {
            if app.is_waiting(worker) {
                app.leases().renew(worker); // an open long-poll: it is alive
                continue;
            }
            if overloaded {
                // Its requests may have been refused at the connection cap.
                tracing::warn!(worker, "lease expired during overload: kept for now");
                app.leases().renew(worker);
                continue;
            }
            match app.remove_worker(worker).await {
                Ok(requeued) => {
                    app.metrics().lease_expiries.increment(1);
                    tracing::warn!(worker, requeued, "lease expired: worker declared dead")
                }
                // It left (or was removed) between its last request and now: nothing to do.
                Err(e) if e.status() == axum::http::StatusCode::GONE => app.leases().forget(worker),
                Err(e) => tracing::error!(worker, error = ?e, "declaring a worker dead failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_suspends_expiry_for_one_lease() {
        let leases = Leases::new(Duration::from_millis(100));
        let start = Instant::now();
        assert!(!leases.overloaded_lately(start));
        leases.overloaded();
        let now = Instant::now();
        assert!(leases.overloaded_lately(now));
        assert!(leases.overloaded_lately(now + Duration::from_millis(90)));
        assert!(!leases.overloaded_lately(now + Duration::from_millis(150)));
    }
}

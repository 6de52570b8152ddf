//! Long-poll wake-ups.
//!
//! A fetch that may wait (`wait_ms > 0`) subscribes its worker before it looks for work, so a
//! placement between the look and the wait is never missed. The dispatcher calls this module
//! (as its [`Waker`]) whenever work becomes fetchable; it wakes the subscribed fetches of the
//! workers that can fetch that work. With no fetch waiting, a wake-up costs one atomic load.
//!
//! On shutdown, [`Wakeups::close`] wakes every waiting fetch and makes later ones answer at
//! once, so a graceful shutdown does not wait out the long-polls.

use std::collections::HashMap;

use switchyard::{Waker, WorkerId};
use tokio::sync::Notify;

use crate::sync::{Arc, AtomicBool, AtomicUsize, Mutex, Ordering};

/// The workers whose fetches are waiting, each with the `Notify` that wakes them.
#[derive(Default)]
pub struct Wakeups {
    /// Subscriptions alive. Relaxed: a hint that lets wake-ups skip the map; a subscriber
    /// registers in the map (under its lock) before it looks for work.
    waiting: AtomicUsize,
    subscribed: Mutex<HashMap<u64, (Arc<Notify>, usize)>>,
    /// Set once, on shutdown.
    closing: AtomicBool,
}

/// A waiting fetch's registration; dropping it unsubscribes.
pub struct Subscription {
    wakeups: Arc<Wakeups>,
    worker: u64,
    /// Notified when work arrives for the worker.
    pub notify: Arc<Notify>,
}

impl Wakeups {
    /// Subscribes `worker`'s fetch to wake-ups.
    pub fn subscribe(self: &Arc<Self>, worker: u64) -> Subscription {
        let mut map = self.subscribed.lock();
        let entry = map
            .entry(worker)
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        let notify = entry.0.clone();
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Subscription {
            wakeups: self.clone(),
            worker,
            notify,
        }
    }

    /// Whether a fetch of `worker` is waiting (an open request: the worker is alive).
    pub fn is_waiting(&self, worker: u64) -> bool {
        self.subscribed.lock().contains_key(&worker)
    }

    /// Shutdown: wakes every waiting fetch; from now on fetches do not wait.
    ///
    /// `SeqCst` pairs with [`Wakeups::is_closing`]: a fetch enables its `Notified`, looks for
    /// work, then checks the flag before it waits. Either its check sees the flag, or its
    /// enable came first and the `notify_waiters` below wakes it (the store-buffer case that
    /// `SeqCst` on both sides rules out).
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let map = self.subscribed.lock();
        for (notify, _) in map.values() {
            notify.notify_waiters();
        }
    }

    /// Whether the server is shutting down (see [`Wakeups::close`]).
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    fn wake(map: &HashMap<u64, (Arc<Notify>, usize)>, worker: WorkerId) {
        if let Some((notify, _)) = map.get(&worker.0) {
            notify.notify_waiters();
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut map = self.wakeups.subscribed.lock();
        if let Some(entry) = map.get_mut(&self.worker) {
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(&self.worker);
            }
        }
        self.wakeups.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Waker for Wakeups {
    fn worker(&self, worker: WorkerId) {
        if self.waiting.load(Ordering::Relaxed) == 0 {
            return;
        }
        Self::wake(&self.subscribed.lock(), worker);
    }

    fn class(&self, candidates: &mut dyn Iterator<Item = WorkerId>) {
        if self.waiting.load(Ordering::Relaxed) == 0 {
            return;
        }
        let map = self.subscribed.lock();
        candidates.for_each(|w| Self::wake(&map, w));
    }
}

//! Baselines for the dispatcher's benchmarks, written from the description of the design
//! Switchyard replaces (no code of that project is used):
//!
//! * [`Queues`] — the data: one ordered queue per worker and a reverse index from task to the
//!   workers whose queues hold it. Fanout enqueue pushes a copy to every candidate; removal
//!   visits every queue that holds the task (O(holders · log n), not a scan).
//! * [`Actor`] — one tokio task owns a [`Queues`] and serves every operation from an unbounded
//!   channel, with a oneshot reply per request: every fetch in the fleet goes through it.
//! * [`GlobalMutex`] — the same [`Queues`] behind one `parking_lot` mutex, called directly.
//!
//! The baselines are made as strong as their design allows: the fast `foldhash` hasher,
//! `BTreeSet` queues (ordered, O(log n) removal of any copy), no payloads. They receive the
//! candidate lists precomputed, while the dispatcher computes and caches its own.

pub mod http;

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};

use tokio::sync::{mpsc, oneshot};

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type Set<T> = HashSet<T, foldhash::fast::RandomState>;

/// Queue key: higher priority first, then FIFO, then the task.
type Key = (Reverse<i32>, u64, u64);

/// One queue per worker plus the reverse index.
#[derive(Default)]
pub struct Queues {
    queues: Map<u64, BTreeSet<Key>>,
    index: Map<u64, (Key, Set<u64>)>,
    seq: u64,
}

impl Queues {
    /// Adds an empty queue for `worker`.
    pub fn register(&mut self, worker: u64) {
        self.queues.entry(worker).or_default();
    }

    /// Removes `worker`; each task it held alone is queued on the least loaded remaining
    /// worker (every worker is a candidate in the benchmarks). Returns how many moved.
    pub fn unregister(&mut self, worker: u64) -> usize {
        let Some(queue) = self.queues.remove(&worker) else {
            return 0;
        };
        let mut moved = 0;
        for key in queue {
            let task = key.2;
            let Some((_, holders)) = self.index.get_mut(&task) else {
                continue;
            };
            holders.remove(&worker);
            if holders.is_empty() {
                let target = self
                    .queues
                    .iter()
                    .min_by_key(|(_, q)| q.len())
                    .map(|(w, _)| *w);
                if let Some(target) = target {
                    self.queues.get_mut(&target).expect("listed").insert(key);
                    holders.insert(target);
                    moved += 1;
                } else {
                    self.index.remove(&task);
                }
            }
        }
        moved
    }

    /// Queues `task` on every worker of `candidates`.
    pub fn enqueue(&mut self, task: u64, priority: i32, candidates: &[u64]) {
        self.seq += 1;
        let key = (Reverse(priority), self.seq, task);
        let mut holders = Set::default();
        for w in candidates {
            if let Some(q) = self.queues.get_mut(w) {
                q.insert(key);
                holders.insert(*w);
            }
        }
        self.index.insert(task, (key, holders));
    }

    /// Pops `worker`'s best copy without claiming it (the task stays indexed): the caller claims
    /// it elsewhere and then removes it, as the replaced design did.
    pub fn pop(&mut self, worker: u64) -> Option<u64> {
        let key = self.queues.get_mut(&worker)?.pop_first()?;
        if let Some((_, holders)) = self.index.get_mut(&key.2) {
            holders.remove(&worker);
        }
        Some(key.2)
    }

    /// Pops `worker`'s best task and removes every other copy of it (fetch with claim).
    pub fn fetch(&mut self, worker: u64) -> Option<u64> {
        let key = self.queues.get_mut(&worker)?.pop_first()?;
        self.remove(key.2);
        Some(key.2)
    }

    /// Removes `task` from every queue that holds it.
    pub fn remove(&mut self, task: u64) -> bool {
        let Some((key, holders)) = self.index.remove(&task) else {
            return false;
        };
        for w in holders {
            if let Some(q) = self.queues.get_mut(&w) {
                q.remove(&key);
            }
        }
        true
    }

    /// Queued copies over all workers.
    pub fn copies(&self) -> usize {
        self.queues.values().map(BTreeSet::len).sum()
    }
}

/// A request to the actor; each carries its reply channel.
enum Op {
    Register(u64, oneshot::Sender<()>),
    Unregister(u64, oneshot::Sender<usize>),
    Enqueue(u64, i32, std::sync::Arc<[u64]>, oneshot::Sender<()>),
    Pop(u64, oneshot::Sender<Option<u64>>),
    Fetch(u64, oneshot::Sender<Option<u64>>),
    Remove(u64, oneshot::Sender<bool>),
}

/// The actor baseline: a handle to the task that owns the [`Queues`].
#[derive(Clone)]
pub struct Actor {
    tx: mpsc::UnboundedSender<Op>,
}

impl Actor {
    /// Spawns the actor on the current tokio runtime.
    pub fn spawn() -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut q = Queues::default();
            while let Some(op) = rx.recv().await {
                // A dropped reply receiver only means the caller stopped waiting.
                match op {
                    Op::Register(w, r) => {
                        q.register(w);
                        let _ = r.send(());
                    }
                    Op::Unregister(w, r) => {
                        let _ = r.send(q.unregister(w));
                    }
                    Op::Enqueue(t, p, c, r) => {
                        q.enqueue(t, p, &c);
                        let _ = r.send(());
                    }
                    Op::Pop(w, r) => {
                        let _ = r.send(q.pop(w));
                    }
                    Op::Fetch(w, r) => {
                        let _ = r.send(q.fetch(w));
                    }
                    Op::Remove(t, r) => {
                        let _ = r.send(q.remove(t));
                    }
                }
            }
        });
        Self { tx }
    }

    async fn call<T>(&self, op: impl FnOnce(oneshot::Sender<T>) -> Op) -> T {
        let (tx, rx) = oneshot::channel();
        self.tx.send(op(tx)).expect("the actor runs");
        rx.await.expect("the actor replies")
    }

    /// See [`Queues::register`].
    pub async fn register(&self, worker: u64) {
        self.call(|r| Op::Register(worker, r)).await
    }
    /// See [`Queues::unregister`].
    pub async fn unregister(&self, worker: u64) -> usize {
        self.call(|r| Op::Unregister(worker, r)).await
    }
    /// See [`Queues::enqueue`].
    pub async fn enqueue(&self, task: u64, priority: i32, candidates: std::sync::Arc<[u64]>) {
        self.call(|r| Op::Enqueue(task, priority, candidates, r))
            .await
    }
    /// See [`Queues::pop`].
    pub async fn pop(&self, worker: u64) -> Option<u64> {
        self.call(|r| Op::Pop(worker, r)).await
    }
    /// See [`Queues::fetch`].
    pub async fn fetch(&self, worker: u64) -> Option<u64> {
        self.call(|r| Op::Fetch(worker, r)).await
    }
    /// See [`Queues::remove`].
    pub async fn remove(&self, task: u64) -> bool {
        self.call(|r| Op::Remove(task, r)).await
    }
}

/// The global-mutex baseline: the same data behind one lock.
#[derive(Default)]
pub struct GlobalMutex(pub parking_lot::Mutex<Queues>);

impl GlobalMutex {
    /// Runs `f` on the queues under the lock.
    pub fn with<T>(&self, f: impl FnOnce(&mut Queues) -> T) -> T {
        f(&mut self.0.lock())
    }
}

/// A small deterministic generator for benchmark inputs.
pub struct Rng(pub u64);

impl Rng {
    /// The next value (SplitMix64).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Shuffles `v` (Fisher–Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Scenario builders shared by the criterion benches and the profiling binary.
pub mod scenario {
    use std::sync::Barrier;
    use std::time::{Duration, Instant};

    use switchyard::{Assignment, Config, Dispatcher, Mode, Strategy, TaskSpec, WorkerId};

    use crate::{GlobalMutex, Queues};

    /// Workers in the standard scenarios.
    pub const WORKERS: u64 = 64;
    const NO_TAGS: &[&str] = &[];

    /// `n` scaled by `SWITCHYARD_BENCH_SCALE` (default 1), at least 1,000.
    pub fn scale(n: u64) -> u64 {
        let s: f64 = std::env::var("SWITCHYARD_BENCH_SCALE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1.0);
        ((n as f64 * s) as u64).max(1_000)
    }

    /// Balanced placement as the scenarios use it (round-robin: even spread, O(1)).
    pub fn balanced() -> Mode {
        Mode::Balanced(Strategy::RoundRobin)
    }

    /// Task `i` of group "g", priority `i % 8`.
    pub fn spec(i: u64) -> TaskSpec {
        TaskSpec::new(i, "g").priority((i % 8) as i32)
    }

    /// A dispatcher in `mode` with `workers` workers serving group "g".
    pub fn dispatcher(mode: Mode, workers: u64) -> Dispatcher {
        let d = Dispatcher::new(Config {
            mode,
            ..Config::default()
        })
        .expect("config");
        for w in 0..workers {
            d.register(WorkerId(w), &["g"], NO_TAGS).expect("register");
        }
        d
    }

    /// A balanced dispatcher with `n` tasks spread over 64 workers.
    pub fn loaded(n: u64) -> Dispatcher {
        let d = dispatcher(balanced(), WORKERS);
        d.submit_many((0..n).map(spec)).expect("submit");
        d
    }

    /// Baseline queues with `workers` workers.
    pub fn queues(workers: u64) -> Queues {
        let mut q = Queues::default();
        (0..workers).for_each(|w| q.register(w));
        q
    }

    /// Baseline queues with `n` tasks spread over 64 workers.
    pub fn loaded_queues(n: u64) -> Queues {
        let mut q = queues(WORKERS);
        (0..n).for_each(|i| q.enqueue(i, (i % 8) as i32, &[i % WORKERS]));
        q
    }

    /// Drains `workers` of `d`, one task per fetch, round-robin; returns how many it got.
    pub fn drain(d: &Dispatcher, workers: std::ops::Range<u64>) -> u64 {
        let mut buf: Vec<Assignment> = Vec::with_capacity(1);
        let mut got = 0;
        let mut live: Vec<u64> = workers.collect();
        while !live.is_empty() {
            live.retain(|&w| {
                buf.clear();
                d.fetch_into(WorkerId(w), 1, &mut buf).expect("fetch") == 1
            });
            got += live.len() as u64;
        }
        got
    }

    /// The same drain on the global-mutex baseline.
    pub fn drain_mutex(m: &GlobalMutex, workers: std::ops::Range<u64>) -> u64 {
        let mut got = 0;
        let mut live: Vec<u64> = workers.collect();
        while !live.is_empty() {
            live.retain(|&w| m.with(|q| q.fetch(w)).is_some());
            got += live.len() as u64;
        }
        got
    }

    /// Runs `f(0)` and `f(1)` on two threads; returns the time of the parallel section only
    /// (between two barriers).
    pub fn two_threads(f: impl Fn(usize) + Sync) -> Duration {
        let barrier = Barrier::new(3);
        std::thread::scope(|s| {
            for t in 0..2 {
                let (f, barrier) = (&f, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    f(t);
                    barrier.wait();
                });
            }
            barrier.wait();
            let start = Instant::now();
            barrier.wait();
            start.elapsed()
        })
    }
}

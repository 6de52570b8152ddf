//! The group-commit writer: the one task that writes to the store.
//!
//! Request handlers send their changes with [`Writer::commit`] and wait. The writer takes
//! whatever has queued up — up to `max_batch` changes — applies it as one transaction (one
//! fsync), and answers every caller in the batch. Under load many requests share one commit;
//! alone, a request commits by itself with no added wait.
//!
//! If a batch fails, the writer applies each caller's changes alone, so one caller's conflict
//! never fails its neighbours. The store applies each batch atomically, so a caller's changes
//! are all durable or none are.
//!
//! A storage failure (`StoreError::Backend`: an I/O error, a full disk; or
//! `StoreError::Fenced`: the coordinator lost a group's lease) marks the writer failed, before any caller of that batch is answered; [`Writer::failure`] tells, and
//! [`Writer::failed`] waits for it. The coordinator stops on it (see `App::poison`). Conflicts
//! and missing rows are answers, not failures.
//!
//! Shutdown drains: when every `Writer` handle is dropped, the task commits what is queued and
//! ends; await its `JoinHandle` before exiting.

use std::ops::Range;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::store::{Change, Store, StoreError};
use crate::sync::{Arc, AtomicU64, Ordering};

/// One caller's changes and where to send the answer.
struct Pending {
    changes: Vec<Change>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Counters of the writer's work (all `Relaxed`: statistics, read for metrics).
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed (or attempted).
    pub batches: AtomicU64,
    /// Changes committed.
    pub changes: AtomicU64,
    /// Changes in the largest batch so far.
    pub largest_batch: AtomicU64,
    /// Total time spent applying batches, in microseconds.
    pub commit_micros: AtomicU64,
}

/// What the writer task shares with the handles.
struct WriterState {
    stats: Arc<WriterStats>,
    failure: Arc<tokio::sync::watch::Sender<Option<String>>>,
}

/// Histograms the writer records each batch into (no-ops unless given).
#[derive(Clone)]
pub struct WriterHistograms {
    /// Changes per transaction.
    pub batch_size: metrics::Histogram,
    /// Seconds per transaction, fsync included.
    pub commit_seconds: metrics::Histogram,
}

/// A handle to the writer task. Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Pending>,
    stats: Arc<WriterStats>,
    failure: Arc<tokio::sync::watch::Sender<Option<String>>>,
}

impl Default for WriterHistograms {
    fn default() -> Self {
        Self {
            batch_size: metrics::Histogram::noop(),
            commit_seconds: metrics::Histogram::noop(),
        }
    }
}

impl Writer {
    /// Spawns the writer on the current tokio runtime. `queue` bounds the requests waiting
    /// (callers wait for room: backpressure), `max_batch` the changes per transaction.
    pub fn spawn(store: Arc<dyn Store>, queue: usize, max_batch: usize) -> (Self, JoinHandle<()>) {
        Self::spawn_observed(store, queue, max_batch, WriterHistograms::default())
    }

    /// [`Writer::spawn`], recording each batch into `histograms`.
    pub fn spawn_observed(
        store: Arc<dyn Store>,
        queue: usize,
        max_batch: usize,
        histograms: WriterHistograms,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let stats = Arc::new(WriterStats::default());
        let failure = Arc::new(tokio::sync::watch::Sender::new(None));
        // The task gets the shared state, not a sender: only callers' handles keep it running.
        let state = WriterState {
            stats: stats.clone(),
            failure: failure.clone(),
        };
        let task = tokio::spawn(run(store, rx, max_batch.max(1), state, histograms));
        (Self { tx, stats, failure }, task)
    }

    /// Commits `changes` durably (atomically: all or none); returns once they are on disk.
    pub async fn commit(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        let (done, answer) = oneshot::channel();
        let stopped = || StoreError::Backend("the store writer has stopped".into());
        self.tx
            .send(Pending { changes, done })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// The writer's counters.
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Marks the writer failed (the first reason is kept); returns whether this call did.
    pub fn fail(&self, reason: String) -> bool {
        self.failure.send_if_modified(|failure| {
            if failure.is_some() {
                return false;
            }
            *failure = Some(reason);
            true
        })
    }

    /// Why the store failed, if it has.
    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    /// Resolves once the store has failed.
    pub async fn failed(&self) {
        let mut failure = self.failure.subscribe();
        let _ = failure.wait_for(Option::is_some).await;
    }

    /// Requests waiting for the writer (queue depth; excludes the batch being committed).
    pub fn waiting(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Pending>,
    max_batch: usize,
    writer: WriterState,
    histograms: WriterHistograms,
) {
    let stats = writer.stats.clone();
    while let Some(first) = rx.recv().await {
        // Gather what is already waiting, up to `max_batch` changes.
        let mut callers = vec![first];
        let mut size = callers[0].changes.len();
        while size < max_batch {
            match rx.try_recv() {
                Ok(next) => {
                    size += next.changes.len();
                    callers.push(next);
                }
                Err(_) => break,
            }
        }
        // One contiguous batch, with each caller's range in it.
        let mut all = Vec::with_capacity(size);
        let mut answers = Vec::with_capacity(callers.len());
        for p in callers {
            let start = all.len();
            all.extend(p.changes);
            answers.push((start..all.len(), p.done));
        }
        let ranges: Vec<Range<usize>> = answers.iter().map(|(r, _)| r.clone()).collect();
        let store = store.clone();
        let started = Instant::now();
        // SQLite blocks (fsync): run it off the async workers.
        let results = tokio::task::spawn_blocking(move || match store.apply(&all) {
            Ok(()) => vec![Ok(()); ranges.len()],
            Err(e) if ranges.len() == 1 => vec![Err(e)],
            // Isolate the failure: each caller's changes alone.
            Err(_) => ranges
                .iter()
                .map(|r| store.apply(&all[r.clone()]))
                .collect(),
        })
        .await
        .unwrap_or_else(|panic| {
            let e = StoreError::Backend(format!("store apply panicked: {panic}"));
            vec![Err(e); answers.len()]
        });
        let took = started.elapsed();
        histograms.commit_seconds.record(took.as_secs_f64());
        histograms.batch_size.record(size as f64);
        stats
            .commit_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .largest_batch
            .fetch_max(size as u64, Ordering::Relaxed);
        // Mark the failure before answering anyone, so a caller that sees its own answer also
        // sees the failure of any change committed with or before it.
        if let Some(Err(StoreError::Backend(e) | StoreError::Fenced(e))) = results
            .iter()
            .find(|r| matches!(r, Err(StoreError::Backend(_) | StoreError::Fenced(_))))
        {
            let failed = writer.failure.send_if_modified(|f| {
                let first = f.is_none();
                if first {
                    *f = Some(format!("the store failed: {e}"));
                }
                first
            });
            if failed {
                tracing::error!(error = %e, "the store failed");
            }
        }
        for ((range, done), result) in answers.into_iter().zip(results) {
            if result.is_ok() {
                stats
                    .changes
                    .fetch_add(range.len() as u64, Ordering::Relaxed);
            }
            // A caller that stopped waiting (its request was dropped) needs no answer.
            let _ = done.send(result);
        }
    }
}

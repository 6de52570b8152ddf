//! Prometheus metrics, served at `/metrics` (admin token) in the text format.
//!
//! Each coordinator owns its recorder (no process-global state, so several coordinators in one
//! test process do not mix their numbers), and the handles below are registered once: recording
//! is an atomic add, with no name lookup on the request path.
//!
//! Two sources:
//! - **Events the server sees**, recorded as they happen: fetch latency, refused stale
//!   reports, lease expiries, store batch sizes and commit latency.
//! - **The dispatcher's own state and counters** (queue depths, claims, stale entries skipped,
//!   redistributions, parking), copied in when `/metrics` is scraped, so the hot path pays
//!   nothing extra for them.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::writer::{Writer, WriterHistograms};

const SECONDS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];
const SIZES: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// The coordinator's metrics.
pub struct Metrics {
    handle: PrometheusHandle,
    /// Time to answer a fetch that found work or did not wait (long-poll waits excluded).
    pub fetch_seconds: Histogram,
    /// Reports refused because they named a superseded attempt (409).
    pub stale_reports: Counter,
    /// Workers declared dead by the reaper.
    pub lease_expiries: Counter,
    /// Assignments requeued because their worker said it did not hold them (lost replies).
    pub not_held: Counter,
    /// Connections refused at the connection cap.
    pub connections_refused: Counter,
    writer: WriterHistograms,
    scraped: Scraped,
}

/// Metrics copied from the dispatcher and the writer at scrape time.
struct Scraped {
    queued: Gauge,
    running: Gauge,
    parked: Gauge,
    tasks: Gauge,
    workers: Gauge,
    store_waiting: Gauge,
    submitted: Counter,
    claimed: Counter,
    completed: Counter,
    given_back: Counter,
    cancelled: Counter,
    stale_skipped: Counter,
    redistributed: Counter,
    parked_total: Counter,
    rebalance_moves: Counter,
}

static META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

impl Metrics {
    /// A fresh set of metrics with its own recorder.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZES))
            .expect("the bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let r = &recorder;
        let counter = |name: &'static str, help: &'static str| {
            r.describe_counter(name.into(), None, help.into());
            r.register_counter(&Key::from_static_name(name), &META)
        };
        let gauge = |name: &'static str, labels: Vec<Label>, help: &'static str| {
            r.describe_gauge(name.into(), None, help.into());
            r.register_gauge(&Key::from_parts(name, labels), &META)
        };
        let histogram = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            r.describe_histogram(name.into(), unit, help.into());
            r.register_histogram(&Key::from_static_name(name), &META)
        };
        let state = |s: &'static str| vec![Label::new("state", s)];
        let scraped = Scraped {
            queued: gauge("switchyard_tasks", state("queued"), "Live tasks by state"),
            running: gauge("switchyard_tasks", state("running"), "Live tasks by state"),
            parked: gauge("switchyard_tasks", state("parked"), "Live tasks by state"),
            tasks: gauge(
                "switchyard_tasks_live",
                vec![],
                "Tasks queued, running or parked",
            ),
            workers: gauge("switchyard_workers", vec![], "Registered workers"),
            store_waiting: gauge(
                "switchyard_store_waiting_requests",
                vec![],
                "Requests waiting for the store writer",
            ),
            submitted: counter("switchyard_submitted_total", "Tasks submitted"),
            claimed: counter(
                "switchyard_claims_total",
                "Assignments handed out by fetches",
            ),
            completed: counter(
                "switchyard_completed_total",
                "Assignments reported finished or failed",
            ),
            given_back: counter("switchyard_given_back_total", "Assignments given back"),
            cancelled: counter("switchyard_cancelled_total", "Tasks cancelled"),
            stale_skipped: counter(
                "switchyard_stale_entries_skipped_total",
                "Dead queue entries (stale copies) skipped by fetches or compaction",
            ),
            redistributed: counter(
                "switchyard_redistributed_total",
                "Tasks moved off departing or dead workers",
            ),
            parked_total: counter(
                "switchyard_parked_total",
                "Times a task was parked for want of a candidate",
            ),
            rebalance_moves: counter(
                "switchyard_rebalance_moves_total",
                "Tasks moved by rebalance",
            ),
        };
        let writer = WriterHistograms {
            batch_size: histogram(
                "switchyard_store_batch_size",
                Some(Unit::Count),
                "Changes per group-commit transaction",
            ),
            commit_seconds: histogram(
                "switchyard_store_commit_seconds",
                Some(Unit::Seconds),
                "Time to commit one group-commit transaction (fsync included)",
            ),
        };
        Self {
            fetch_seconds: histogram(
                "switchyard_fetch_seconds",
                Some(Unit::Seconds),
                "Time to answer a fetch, long-poll waiting excluded",
            ),
            stale_reports: counter(
                "switchyard_stale_reports_refused_total",
                "Reports refused because their attempt was superseded",
            ),
            lease_expiries: counter(
                "switchyard_lease_expiries_total",
                "Workers declared dead after their lease expired",
            ),
            connections_refused: counter(
                "switchyard_connections_refused_total",
                "Connections answered 503 at the connection cap (--max-connections)",
            ),
            not_held: counter(
                "switchyard_not_held_requeued_total",
                "Assignments queued again because their worker said it did not hold them",
            ),
            writer,
            scraped,
            handle,
        }
    }

    /// The histograms the store writer records into.
    pub fn writer(&self) -> WriterHistograms {
        self.writer.clone()
    }

    /// Records one fetch's latency.
    pub fn fetched(&self, took: Duration) {
        self.fetch_seconds.record(took.as_secs_f64());
    }

    /// The Prometheus text, with the dispatcher's and writer's current numbers copied in.
    pub fn render(&self, dispatcher: &switchyard::Dispatcher, writer: &Writer) -> String {
        let s = dispatcher.stats();
        let m = &self.scraped;
        m.queued.set(s.queued as f64);
        m.running.set(s.running as f64);
        m.parked.set(s.parked as f64);
        m.tasks.set(s.tasks as f64);
        m.workers.set(s.workers.len() as f64);
        m.store_waiting.set(writer.waiting() as f64);
        let c = &s.counters;
        m.submitted.absolute(c.submitted);
        m.claimed.absolute(c.claimed);
        m.completed.absolute(c.completed);
        m.given_back.absolute(c.given_back);
        m.cancelled.absolute(c.cancelled);
        m.stale_skipped.absolute(c.stale_skipped);
        m.redistributed.absolute(c.redistributed);
        m.parked_total.absolute(c.parked);
        m.rebalance_moves.absolute(c.rebalance_moves);
        self.handle.run_upkeep();
        self.handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

//! The delivery protocol: how assignments reach a worker, how its reports are settled, and how
//! the coordinator and the worker agree on what the worker holds.
//!
//! # The guarantee
//! Every acknowledged task is eventually finished, failed or cancelled exactly once, and no
//! (task, attempt) is handed out twice. A task may *run* more than once — as separate attempts
//! — when an attempt's outcome never reached the coordinator (the worker died, went silent past
//! its lease, or never received the fetch reply). Only the attempt that holds the assignment
//! can end it: a report of any other attempt is refused. So delivery is at least once per task
//! and at most once per (task, attempt), and a worker that makes its side effects idempotent by
//! (task id, attempt) — or by task id — runs each task's effect once.
//!
//! # Assignments: durable before the reply
//! A fetch claims tasks in the dispatcher (synchronously, so no cancellation falls between the
//! claim and what follows), then records them on a task of its own ([`deliver`]): the
//! assignments are durable before the reply leaves. If the request is gone before they are
//! recorded (the client hung up, or the request-time limit passed), they are given back at once.
//!
//! # Reconciliation: what the worker really holds
//! A reply can still be lost after its commit: the connection breaks while it is written, or
//! the coordinator dies right after the commit. Those tasks are recorded as running on a worker
//! that never got them, and that worker's own requests keep its lease alive. So the worker says
//! what it holds:
//!
//! - every non-empty fetch reply carries a **delivery id**, increasing across the coordinator's
//!   restarts (the start's number from the store, times 2^40, plus a counter);
//! - a fetch or heartbeat may carry `holding`: the (task, attempt) pairs the worker holds, and
//!   the highest delivery id it has received (`delivery`, 0 before any);
//! - the coordinator compares that with the assignments it records on the worker. One it does
//!   not hold, from a delivery the worker has confirmed (id ≤ `delivery`), or older than the
//!   lease timeout, or restored from the store at start-up, was lost: it is queued again as a
//!   new attempt ([`Requeued::NotHeld`]). A younger, unconfirmed delivery may still be on its
//!   way to the worker, so it waits;
//! - the answer lists `revoked`: the pairs the worker holds that are no longer its
//!   assignments (cancelled, or requeued as lost, or given back). The worker stops them. (A
//!   worker whose lease expired is gone: its requests get 410, and it registers again.)
//!
//! A worker that never sends `holding` gets no reconciliation: its lost replies come back only
//! when it leaves, gives them back, or its lease expires. The bundled `work` loop always sends it.
//!
//! # Reports: idempotent
//! A report the dispatcher refuses is settled against the store's record of that attempt
//! ([`settle`]): the same outcome already recorded for this worker's attempt answers success
//! ("already recorded"), so a report retried after a lost reply is not mistaken for a refusal.
//! A different outcome, an attempt that ended otherwise (cancelled, requeued) answer 409 with
//! what happened. An attempt that is not this worker's — whether or not the task exists — gets
//! the same `not_assigned`, so a worker's token cannot probe other groups' task ids.
//!
//! # Failure windows
//! - A decision whose commit has not yet been sent when a refusal waits for the writer
//!   ([`App::durable_refusal`]) can make a concurrent retry look refused; the retry after that
//!   is settled correctly.
//! - A worker that sends requests concurrently with a fetch must not confirm a delivery id it
//!   has not received; a reply slower than the lease timeout counts as lost.
//! - A claim and the opening of its delivery happen under the worker's stripe lock, and so
//!   does a reconciliation's read of the worker's assignments (see [`Deliveries`]): a task
//!   being recorded by a fetch is never taken for a lost one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use switchyard::{TaskId, WorkerId};
use utoipa::ToSchema;

use crate::app::{detach, App};
use crate::error::{ApiError, ErrorKind};
use crate::store::{AttemptEnd, Change, Requeued, StoreError, TaskState};
use crate::sync::{Arc, AtomicU64, Mutex, Ordering};

/// A (task, attempt) pair a worker holds, or must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Held {
    /// The task.
    pub id: u64,
    /// The attempt it was handed out as.
    pub attempt: u32,
}

/// What a worker holds, sent with a fetch or heartbeat (see the module docs).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Holding {
    /// The highest delivery id among the fetch replies received (0 before any).
    #[serde(default)]
    pub delivery: u64,
    /// Every assignment the worker holds and has not reported: running, or waiting its turn.
    #[serde(default)]
    pub tasks: Vec<Held>,
}

/// Deliveries a worker has not confirmed yet. Bounded per worker: past this, the oldest is
/// treated as confirmed (a reply that many fetches old is not on its way any more).
const MAX_UNCONFIRMED: usize = 64;

/// A (task, attempt) pair.
type Pair = (u64, u32);

/// Stripes of the unconfirmed-delivery map: fetches of different workers rarely share one.
const STRIPES: usize = 64;

/// The unconfirmed deliveries of the workers of one stripe.
type Stripe = Mutex<HashMap<u64, VecDeque<Delivery>>>;

/// Delivery ids and the deliveries each worker has not yet confirmed.
///
/// A worker's stripe lock is held across a fetch's claim and the opening of its delivery, and
/// across a reconciliation's read of the worker's assignments and of its unconfirmed
/// deliveries. So a reconciliation never sees a claim without its delivery: a claimed task is
/// never mistaken for a lost one while its fetch is still recording it. (Lock order: stripe,
/// then the dispatcher's locks.)
pub struct Deliveries {
    /// The first id of this start: its number from the store, times 2^40.
    base: u64,
    /// Relaxed: a unique-number ticket; nothing is published through it.
    next: AtomicU64,
    stripes: Box<[Stripe]>,
}

struct Delivery {
    id: u64,
    at: Instant,
    tasks: Vec<(u64, u32)>,
}

impl Deliveries {
    /// Delivery ids for the coordinator's `boot`-th start (ids of a later start are higher).
    pub fn new(boot: u64) -> Self {
        Self {
            base: boot << 40,
            next: AtomicU64::new(1),
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
        }
    }

    fn stripe(&self, worker: u64) -> &Stripe {
        &self.stripes[(worker % STRIPES as u64) as usize]
    }

    /// Claims up to `max` of `worker`'s tasks and opens their delivery (none if nothing was
    /// claimed), under the worker's stripe lock.
    fn claim(
        &self,
        app: &App,
        worker: u64,
        max: usize,
    ) -> Result<(Vec<switchyard::Assignment>, u64), ApiError> {
        let mut map = self.stripe(worker).lock();
        let got = app.dispatcher.fetch(WorkerId(worker), max)?;
        if got.is_empty() {
            return Ok((got, 0));
        }
        let id = self.base | self.next.fetch_add(1, Ordering::Relaxed);
        let list = map.entry(worker).or_default();
        if list.len() == MAX_UNCONFIRMED {
            list.pop_front();
        }
        list.push_back(Delivery {
            id,
            at: Instant::now(),
            tasks: got.iter().map(|a| (a.task.0, a.attempt)).collect(),
        });
        Ok((got, id))
    }

    /// `worker`'s assignments, and those of them that may still be on their way: from a
    /// delivery not confirmed (id above `through`) and younger than `window`. Forgets the
    /// other deliveries.
    fn running_and_in_flight(
        &self,
        app: &App,
        worker: u64,
        through: u64,
        window: Duration,
    ) -> Result<(Vec<switchyard::Assignment>, HashSet<Pair>), ApiError> {
        let mut map = self.stripe(worker).lock();
        let running = app.dispatcher.running(WorkerId(worker))?;
        let Some(list) = map.get_mut(&worker) else {
            return Ok((running, HashSet::new()));
        };
        list.retain(|d| d.id > through && d.at.elapsed() < window);
        let in_flight = list.iter().flat_map(|d| d.tasks.iter().copied()).collect();
        if list.is_empty() {
            map.remove(&worker);
        }
        Ok((running, in_flight))
    }

    /// The worker is gone (call after it is unregistered, so no fetch of its can open another).
    pub fn forget(&self, worker: u64) {
        self.stripe(worker).lock().remove(&worker);
    }
}

/// A task as handed to a worker.
#[derive(Serialize, ToSchema)]
pub struct Assigned {
    /// The task.
    pub id: u64,
    /// Name it in the report, and in `holding`.
    pub attempt: u32,
    /// Its priority.
    pub priority: i32,
    /// The payload, byte for byte as submitted.
    #[schema(value_type = Object)]
    pub payload: Box<RawValue>,
}

/// One fetch's assignments and their delivery id (`None` when there are none).
pub struct Delivered {
    /// The tasks, best first.
    pub tasks: Vec<Assigned>,
    /// The delivery id the worker confirms in a later `holding`.
    pub delivery: Option<u64>,
}

/// Compares what `worker` says it holds with what the coordinator records on it: requeues
/// (durably) what was lost, and returns what the worker holds but must stop. See the module
/// docs.
pub async fn reconcile(
    app: &Arc<App>,
    worker: u64,
    holding: &Holding,
) -> Result<Vec<Held>, ApiError> {
    let (running, in_flight) = app.deliveries.running_and_in_flight(
        app,
        worker,
        holding.delivery,
        app.limits.lease_timeout,
    )?;
    if running.is_empty() && holding.tasks.is_empty() {
        return Ok(Vec::new());
    }
    let current: HashSet<(u64, u32)> = running.iter().map(|a| (a.task.0, a.attempt)).collect();
    let revoked = holding
        .tasks
        .iter()
        .filter(|h| !current.contains(&(h.id, h.attempt)))
        .copied()
        .collect();
    let held: HashSet<(u64, u32)> = holding.tasks.iter().map(|h| (h.id, h.attempt)).collect();
    let lost: Vec<(TaskId, u32)> = current
        .difference(&held)
        .filter(|pair| !in_flight.contains(pair))
        .map(|&(task, attempt)| (TaskId(task), attempt))
        .collect();
    if !lost.is_empty() {
        tracing::warn!(
            worker,
            tasks = lost.len(),
            "assignments the worker does not hold: queued again"
        );
        app.metrics.not_held.increment(lost.len() as u64);
        let a = app.clone();
        detach(app, async move {
            give_back(&a, worker, &lost, Requeued::NotHeld).await
        })
        .await?;
    }
    Ok(revoked)
}

/// Claims up to `max` of `worker`'s tasks and records the assignments (see the module docs).
pub async fn deliver(app: Arc<App>, worker: u64, max: usize) -> Result<Delivered, ApiError> {
    // Admitted from the claim until the assignments are recorded (see `crate::sharing`).
    let admitted = app.admit().await;
    let (got, delivery) = app.deliveries.claim(&app, worker, max)?;
    app.leases.renew(worker);
    if got.is_empty() {
        return Ok(Delivered {
            tasks: Vec::new(),
            delivery: None,
        });
    }
    let (send, delivered) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let recorded = record(&app, worker, got, delivery).await;
        if let Err(Ok(d)) = send.send(recorded) {
            let tasks: Vec<_> = d.tasks.iter().map(|t| (TaskId(t.id), t.attempt)).collect();
            tracing::info!(
                worker,
                tasks = tasks.len(),
                "fetch abandoned: giving its tasks back"
            );
            let _ = give_back(&app, worker, &tasks, Requeued::NotHeld).await;
        }
        drop(admitted);
    });
    delivered.await.unwrap_or_else(|_| {
        Err(ApiError::internal(
            "the fetch failed inside the coordinator",
        ))
    })
}

/// Requeues assignments of `worker` as new attempts: the dispatcher decides, the store records.
async fn give_back(
    app: &App,
    worker: u64,
    tasks: &[(TaskId, u32)],
    why: Requeued,
) -> Result<(), ApiError> {
    let changes = tasks
        .iter()
        .filter(|(task, attempt)| {
            app.dispatcher
                .give_back(WorkerId(worker), *task, *attempt)
                .is_ok()
        })
        .map(|(task, attempt)| Change::Requeue {
            task: task.0,
            attempt: *attempt,
            worker,
            why,
        })
        .collect();
    app.commit_decided(changes).await
}

/// Records claimed assignments (delivery `delivery`) and reads their payloads. If the commit
/// fails, the dispatcher takes the tasks back (nothing was written): a conflict (the worker was
/// removed, or a task cancelled, meanwhile) answers an empty fetch, any other failure an error.
/// If the payload read fails after the commit, the tasks are given back durably. A task
/// cancelled between the claim and the commit is left out of the reply.
async fn record(
    app: &App,
    worker: u64,
    got: Vec<switchyard::Assignment>,
    delivery: u64,
) -> Result<Delivered, ApiError> {
    let changes = got
        .iter()
        .map(|a| Change::Assign {
            task: a.task.0,
            worker,
            attempt: a.attempt,
        })
        .collect();
    if let Err(e) = app.writer.commit(changes).await {
        // Not durable: hand the tasks back rather than run them unrecorded.
        for a in &got {
            let _ = app
                .dispatcher
                .give_back(WorkerId(worker), a.task, a.attempt);
        }
        if let StoreError::Conflict(why) = &e {
            tracing::info!(worker, %why, "a fetch's assignments were overtaken: none handed out");
            return Ok(Delivered {
                tasks: Vec::new(),
                delivery: None,
            });
        }
        return Err(e.into());
    }
    let got: Vec<_> = got
        .into_iter()
        .filter(|a| {
            app.dispatcher
                .is_running(WorkerId(worker), a.task, a.attempt)
        })
        .collect();
    if got.is_empty() {
        return Ok(Delivered {
            tasks: Vec::new(),
            delivery: None,
        });
    }
    // The payloads, in one read. If it fails, the recorded assignments are given back.
    let ids: Vec<u64> = got.iter().map(|a| a.task.0).collect();
    let records = match app.store.tasks(ids).await {
        Ok(records) => records,
        Err(e) => {
            let taken: Vec<_> = got.iter().map(|a| (a.task, a.attempt)).collect();
            give_back(app, worker, &taken, Requeued::NotHeld).await?;
            return Err(e.into());
        }
    };
    let mut payloads: HashMap<u64, Vec<u8>> =
        records.into_iter().map(|t| (t.id, t.payload)).collect();
    let tasks = got
        .into_iter()
        .map(|a| Assigned {
            id: a.task.0,
            attempt: a.attempt,
            priority: a.priority,
            payload: raw_payload(payloads.remove(&a.task.0).unwrap_or_default()),
        })
        .collect();
    Ok(Delivered {
        tasks,
        delivery: Some(delivery),
    })
}

/// A stored payload as raw JSON, byte for byte (stored payloads are valid JSON text; anything
/// else, which only a damaged store could hold, reads as `null`).
pub fn raw_payload(bytes: Vec<u8>) -> Box<RawValue> {
    String::from_utf8(bytes)
        .ok()
        .and_then(|s| RawValue::from_string(s).ok())
        .unwrap_or_else(|| RawValue::from_string("null".into()).expect("null is JSON"))
}

/// How an assignment ended, as its worker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Outcome {
    /// Done; `result` is kept.
    Finished,
    /// Failed for good; `message` is kept.
    Failed,
    /// Not run: queue it again, as a new attempt, for any candidate.
    GivenBack,
}

/// One report of an assignment (as an item of a batched report, too).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// The task.
    pub task: u64,
    /// The attempt the fetch handed out.
    pub attempt: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// The result (finished).
    #[serde(default)]
    pub result: Option<String>,
    /// The message (failed).
    #[serde(default)]
    pub message: Option<String>,
}

/// How an accepted report was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Decided and recorded now.
    Recorded,
    /// The same report of this attempt was recorded before (a retry).
    AlreadyRecorded,
}

/// The dispatcher's decision on one report, as the change that records it. Renews the lease
/// of a worker whose report is accepted.
pub fn decide(app: &App, worker: u64, r: &Report) -> Result<Change, ApiError> {
    let (w, t, task, attempt) = (WorkerId(worker), TaskId(r.task), r.task, r.attempt);
    let decided = match r.outcome {
        Outcome::Finished => app
            .dispatcher
            .complete(w, t, attempt)
            .map(|()| Change::Finish {
                task,
                attempt,
                result: r.result.clone(),
            }),
        Outcome::Failed => app
            .dispatcher
            .complete(w, t, attempt)
            .map(|()| Change::Fail {
                task,
                attempt,
                message: r.message.clone().unwrap_or_default(),
            }),
        Outcome::GivenBack => app
            .dispatcher
            .give_back(w, t, attempt)
            .map(|_| Change::Requeue {
                task,
                attempt,
                worker,
                why: Requeued::GivenBack,
            }),
    };
    match decided {
        Ok(change) => {
            app.leases.renew(worker);
            Ok(change)
        }
        Err(e @ switchyard::Error::UnknownWorker(_)) => Err(e.into()),
        Err(e) => {
            if matches!(e, switchyard::Error::StaleAttempt { .. }) {
                app.metrics.stale_reports.increment(1);
            }
            Err(ApiError::not_assigned(worker, task, attempt))
        }
    }
}

/// Settles a report the dispatcher refused against the store's record of the attempt (see the
/// module docs). The caller has made the refusal durable first ([`App::durable_refusal`], or a
/// commit sent after the decision).
pub async fn settle(
    app: &App,
    worker: u64,
    r: &Report,
    refusal: ApiError,
) -> Result<Taken, ApiError> {
    // A refused report of this worker's attempt (or of a worker removed since: its retry
    // after a lost answer) is checked against the attempt's record.
    if !matches!(
        refusal.kind(),
        ErrorKind::NotAssigned | ErrorKind::UnknownWorker
    ) {
        return Err(refusal);
    }
    let Some(rec) = app.store.attempt(r.task, r.attempt).await? else {
        return Err(refusal);
    };
    if rec.worker != worker {
        return Err(refusal); // not this worker's: the same answer as an unknown task
    }
    let text = |s: &Option<String>| s.clone().unwrap_or_default();
    let same = match (rec.ended, r.outcome) {
        (Some(AttemptEnd::Finished), Outcome::Finished) => rec.outcome == r.result,
        (Some(AttemptEnd::Failed), Outcome::Failed) => text(&rec.outcome) == text(&r.message),
        (Some(AttemptEnd::Requeued(Requeued::GivenBack)), Outcome::GivenBack) => true,
        (None, _) => return Err(refusal),
        (Some(_), _) => false,
    };
    if same {
        return Ok(Taken::AlreadyRecorded);
    }
    if refusal.kind() == ErrorKind::UnknownWorker {
        return Err(refusal); // a new report from a removed worker: register again
    }
    // The task's state now, for the worker to see what became of it.
    let state = app
        .store
        .task(r.task)
        .await?
        .map_or(TaskState::Cancelled, |t| t.state);
    let (kind, message) = match rec.ended {
        Some(AttemptEnd::Cancelled) => (
            ErrorKind::Cancelled,
            format!(
                "task {} was cancelled while attempt {} ran",
                r.task, r.attempt
            ),
        ),
        Some(end @ (AttemptEnd::Finished | AttemptEnd::Failed)) if end_matches(end, r.outcome) => (
            ErrorKind::Conflict,
            format!(
                "a different report of attempt {} of task {} was recorded",
                r.attempt, r.task
            ),
        ),
        end => (
            ErrorKind::Superseded,
            format!(
                "attempt {} of task {} already ended: {}",
                r.attempt,
                r.task,
                end.map_or("", AttemptEnd::as_str)
            ),
        ),
    };
    Err(ApiError::ended(kind, message, state))
}

/// Whether a report's outcome is the kind of end `end` records.
fn end_matches(end: AttemptEnd, outcome: Outcome) -> bool {
    matches!(
        (end, outcome),
        (AttemptEnd::Finished, Outcome::Finished) | (AttemptEnd::Failed, Outcome::Failed)
    )
}

/// One report, decided, recorded and answered (idempotent: see the module docs).
pub async fn report(app: &Arc<App>, worker: u64, r: Report) -> Result<Taken, ApiError> {
    let decided = {
        let r = r.clone();
        app.decided(move |app| Ok(((), vec![decide(app, worker, &r)?])))
            .await
    };
    match decided {
        Ok(()) => Ok(Taken::Recorded),
        Err(e) if e.status().is_client_error() => {
            // The worker drops its result on a refusal: make sure the refusal is durable.
            let refusal = app.durable_refusal(e).await;
            settle(app, worker, &r, refusal).await
        }
        Err(e) => Err(e),
    }
}

/// Several reports in one commit, each decided and settled on its own.
pub async fn reports(
    app: &Arc<App>,
    worker: u64,
    reports: Vec<Report>,
) -> Result<Vec<Result<Taken, ApiError>>, ApiError> {
    let a = app.clone();
    detach(app, async move {
        let mut changes = Vec::with_capacity(reports.len());
        let mut decided = Vec::with_capacity(reports.len());
        for r in reports {
            match decide(&a, worker, &r) {
                Ok(change) => {
                    changes.push(change);
                    decided.push((r, None));
                }
                Err(e) => decided.push((r, Some(e))),
            }
        }
        // Also the barrier that makes every refusal above durable (see `App::durable_refusal`):
        // it completes after every commit sent before it.
        a.commit_decided(changes).await?;
        if let Some(reason) = a.poisoned() {
            return Err(ApiError::unavailable(format!(
                "the coordinator is stopping: {reason}"
            )));
        }
        let mut settled = Vec::with_capacity(decided.len());
        for (r, refusal) in decided {
            settled.push(match refusal {
                None => Ok(Taken::Recorded),
                Some(e) => settle(&a, worker, &r, e).await,
            });
        }
        Ok(settled)
    })
    .await
}

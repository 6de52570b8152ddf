//! Several coordinators serving one PostgreSQL database at once (`serve --shared`): this
//! coordinator's share of the slots.
//!
//! Groups hash into slots ([`crate::store::leases`]); each coordinator holds the leases of some
//! slots and serves exactly their groups. Every [`period`] the balance loop ([`balance`]) asks
//! the keeper ([`Keeper::balance`]) for the next step of the balancing rule
//! ([`crate::ownership::plan`]): a newcomer gets a fair share, a dead coordinator's slots are
//! taken over once their leases lapse, a leaving one's at once.
//!
//! - **Routing.** A request that names a group of a slot served elsewhere (a submission, a
//!   worker's registration, a task by id) is refused with 421 `misdirected`, naming each
//!   group's owner as last read from the database (`null`: none right now). Clients send it
//!   there; a worker whose groups have several owners keeps one registration per owner.
//! - **Registrations are per coordinator.** A worker registers only for groups served where it
//!   registers, and its registration lives as long as the slots do there: when a slot leaves,
//!   every worker serving one of its groups is removed (its running tasks are queued again, it
//!   gets 410 and registers again, following the new owners). A coordinator that gains a slot
//!   loads only the slot's live tasks, never workers: a running task among them is queued
//!   again as a new attempt, since the worker that ran it was registered elsewhere.
//! - **Gaining a slot** ([`App::gain`]): its lease is held (and fences writes) from the moment
//!   it is acquired; its live tasks are loaded, then it is served.
//! - **Giving a slot up** ([`App::unload`]): it stops being served, its workers are removed, its
//!   tasks leave the dispatcher (the store keeps them for the next owner), everything decided
//!   for it is committed — and only then is its lease released.
//! - Tokens added or revoked on another coordinator reach this one within a balance period.
//!
//! # Invariants
//! 1. The dispatcher holds only tasks of served slots, and every registered worker serves only
//!    groups of served slots.
//! 2. `serving` changes only under the gate's write lock. Every decide-and-commit step holds
//!    the gate's read lock from its decision to its commit ([`App::admit`], taken by
//!    `app::detach` and `delivery::deliver`) and checks its groups under it. So a step that
//!    saw a slot served has committed before the slot stops being served, and no step starts
//!    on it afterwards.
//! 3. A lease is released only after every change for its slot has committed (2 and a writer
//!    flush under the write lock); the database's fence refuses anything later anyway.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::app::{now_ms, App};
use crate::error::{ApiError, Owners};
use crate::ownership::{Keeper, Step};
use crate::recovery::recover;
use crate::store::leases::{slot_of, Lease, SlotOwner, SLOTS};
use crate::store::{Change, PgStore, Requeued};
use crate::sync::{
    Arc, AsyncRwLock as Gate, AtomicU64, Mutex, Ordering, OwnedRwLockReadGuard, Weak,
};

/// This coordinator's share of the slots (see the module docs).
pub struct Share {
    keeper: Arc<Keeper>,
    store: Arc<PgStore>,
    /// Bit `i`: slot `i` is served. Relaxed: it changes only under `gate`'s write lock and is
    /// read, where it matters, under its read lock, which orders the two.
    serving: AtomicU64,
    gate: Arc<Gate<()>>,
    /// Each slot's owner's address, as last read.
    owners: Mutex<Vec<Option<String>>>,
    /// This coordinator's address (as the others see it).
    address: String,
}

fn bits(leases: &[Lease]) -> u64 {
    leases.iter().fold(0, |m, l| m | 1 << l.slot)
}

impl Share {
    /// A share that serves nothing yet, kept by `keeper`.
    pub fn new(keeper: Arc<Keeper>, store: Arc<PgStore>, address: String) -> Self {
        Self {
            keeper,
            store,
            serving: AtomicU64::new(0),
            gate: Arc::new(Gate::new(())),
            owners: Mutex::new(vec![None; SLOTS]),
            address,
        }
    }

    /// Whether `group` is served here.
    pub fn serves(&self, group: &str) -> bool {
        self.serving.load(Ordering::Relaxed) & (1 << slot_of(group)) != 0
    }

    /// How many slots are served here.
    pub fn slots(&self) -> usize {
        self.serving.load(Ordering::Relaxed).count_ones() as usize
    }

    /// The keeper of the leases.
    pub fn keeper(&self) -> &Arc<Keeper> {
        &self.keeper
    }

    /// Ok if every one of `groups` is served here; else the 421 naming each one's owner.
    pub fn check<S: AsRef<str>>(&self, groups: &[S]) -> Result<(), ApiError> {
        let groups: BTreeSet<&str> = groups.iter().map(AsRef::as_ref).collect();
        if groups.iter().all(|g| self.serves(g)) {
            return Ok(());
        }
        let owners = self.owners.lock();
        let where_served: Owners = groups
            .into_iter()
            .map(|g| {
                let owner = if self.serves(g) {
                    Some(self.address.clone())
                } else {
                    // A stale read may still name this coordinator: none serves it right now.
                    owners[slot_of(g)].clone().filter(|a| *a != self.address)
                };
                (g.to_string(), owner)
            })
            .collect();
        Err(ApiError::misdirected(where_served))
    }

    fn set_owners(&self, read: &[SlotOwner]) {
        let mut owners = self.owners.lock();
        for o in read {
            if let Some(slot) = owners.get_mut(o.slot) {
                *slot = o.owner.as_ref().map(|(_, address)| address.clone());
            }
        }
    }
}

impl App {
    /// Admission of one decide-and-commit step: with a share, the gate's read lock, held until
    /// the step has committed (invariant 2 of [`crate::sharing`]); `None` otherwise.
    pub(crate) async fn admit(&self) -> Option<OwnedRwLockReadGuard<()>> {
        match &self.share {
            Some(share) => Some(share.gate.clone().read_owned().await),
            None => None,
        }
    }

    /// Ok if every one of `groups` is served here (always, without a share); else a 421.
    pub(crate) fn check_served<S: AsRef<str>>(&self, groups: &[S]) -> Result<(), ApiError> {
        match &self.share {
            Some(share) => share.check(groups),
            None => Ok(()),
        }
    }

    /// For a task this coordinator does not know: the 421 naming its owner, if the store has
    /// it in a group served elsewhere; else `unknown` (without a share, always `unknown`).
    pub(crate) async fn elsewhere(&self, task: u64, unknown: ApiError) -> ApiError {
        let Some(share) = &self.share else {
            return unknown;
        };
        match self.store.task(task).await {
            Ok(Some(t)) if !share.serves(&t.group) => {
                share.check(&[t.group]).err().unwrap_or(unknown)
            }
            _ => unknown,
        }
    }

    /// Loads the slots of `leases` (just acquired) and serves them. See the module docs.
    pub(crate) async fn gain(&self, share: &Share, leases: &[Lease]) -> Result<(), ApiError> {
        // Read before closing the gate (a large backlog takes a while): the leases are held, so
        // nobody else writes these slots any more, and nothing here touches them yet.
        let slots: Vec<usize> = leases.iter().map(|l| l.slot).collect();
        let store = share.store.clone();
        let state = tokio::task::spawn_blocking(move || store.recover_slots(&slots))
            .await
            .map_err(|e| ApiError::internal(format!("loading slots panicked: {e}")))??;
        let _closed = share.gate.write().await;
        // No worker here serves these groups (invariant 1), so running tasks are queued again.
        let recovered = recover(&state, &self.dispatcher, now_ms()).map_err(|e| {
            ApiError::internal(format!(
                "the stored tasks of gained groups were refused (do the coordinators of this \
                 database run with the same limits?): {e}"
            ))
        })?;
        self.commit_decided(recovered.requeued.clone()).await?;
        share.serving.fetch_or(bits(leases), Ordering::Relaxed);
        tracing::info!(
            slots = leases.len(),
            serving = share.slots(),
            queued = recovered.queued,
            requeued = recovered.requeued.len(),
            "serving more groups"
        );
        Ok(())
    }

    /// Stops serving the slots of `leases` and commits everything decided for them; the
    /// caller then releases the leases. See the module docs.
    pub(crate) async fn unload(&self, share: &Share, leases: &[Lease]) -> Result<(), ApiError> {
        let _closed = share.gate.write().await;
        let leaving = bits(leases);
        share.serving.fetch_and(!leaving, Ordering::Relaxed);
        let gone = |g: &str| leaving & (1 << slot_of(g)) != 0;
        let mut changes = Vec::new();
        let mut removed = 0;
        for w in self.dispatcher.stats().workers {
            if w.groups.iter().any(|g| gone(g)) {
                changes.extend(self.unregister(w.id.0)?);
                removed += 1;
            }
        }
        // All of them are queued now: they leave the dispatcher, and stay queued in the store.
        let tasks = self.dispatcher.tasks_in_groups(gone);
        for &task in &tasks {
            let _ = self.dispatcher.cancel(task);
        }
        // Every earlier step for these slots committed before the write lock was granted.
        self.commit_decided(changes).await?;
        tracing::info!(
            slots = leases.len(),
            serving = share.slots(),
            workers = removed,
            tasks = tasks.len(),
            "handing groups over"
        );
        Ok(())
    }

    /// Unregisters `worker` from the dispatcher (its tasks are redistributed) and returns the
    /// changes that record it: its removal and its running tasks queued again.
    pub(crate) fn unregister(&self, worker: u64) -> Result<Vec<Change>, ApiError> {
        self.leases.forget(worker);
        let departure = self.dispatcher.unregister(switchyard::WorkerId(worker))?;
        self.deliveries.forget(worker);
        let mut changes = vec![Change::RemoveWorker { worker }];
        for r in &departure.tasks {
            if let switchyard::Was::Running(attempt) = r.was {
                changes.push(Change::Requeue {
                    task: r.task.0,
                    attempt,
                    worker,
                    why: Requeued::WorkerGone,
                });
            }
        }
        Ok(changes)
    }

    /// One balancing step: follows the keeper's plan, and refreshes the owners and tokens.
    pub(crate) async fn rebalance(&self, share: &Arc<Share>) -> Result<(), Unbalanced> {
        let keeper = share.keeper.clone();
        let (step, owners) = tokio::task::spawn_blocking(move || keeper.balance())
            .await
            .map_err(|e| Unbalanced::Retry(format!("balancing panicked: {e}")))?
            .map_err(|e| Unbalanced::Retry(e.to_string()))?;
        share.set_owners(&owners);
        match step {
            Step::Gained(leases) => self.gain(share, &leases).await.map_err(|e| {
                Unbalanced::Stop(format!("loading gained groups failed: {}", e.message()))
            })?,
            Step::Release(leases) => {
                self.unload(share, &leases).await.map_err(|e| {
                    Unbalanced::Stop(format!("handing groups over failed: {}", e.message()))
                })?;
                let keeper = share.keeper.clone();
                let released = tokio::task::spawn_blocking(move || keeper.release(&leases)).await;
                if !matches!(released, Ok(Ok(()))) {
                    // Nothing is served for them any more: they lapse by themselves.
                    tracing::warn!("releasing handed-over leases failed; they expire");
                }
            }
            Step::Hold => {}
        }
        let generation = self.keyring.generation();
        let store = share.store.clone();
        match tokio::task::spawn_blocking(move || store.tokens()).await {
            Ok(Ok(tokens)) => self.keyring.sync_users(tokens, generation),
            _ => tracing::warn!("reading the tokens in force failed"),
        }
        Ok(())
    }
}

/// How often a coordinator takes a balancing step: a tenth of the lease. A slot given up (a
/// coordinator leaving, or handing a share to a newcomer) is taken within it; each step is
/// three small reads (owners, live coordinators, tokens).
pub fn period(ttl: Duration) -> Duration {
    ttl / 10
}

/// Why a balancing step did not complete.
#[derive(Debug)]
pub(crate) enum Unbalanced {
    /// Reading the database failed: the next step retries.
    Retry(String),
    /// Gained groups could not be loaded, or given-up ones handed over: the dispatcher and the
    /// leases disagree, so the coordinator stops.
    Stop(String),
}

/// Balances `share` every `every` until the app is dropped or stops; a failure to load or hand
/// over groups stops it (like a storage failure: the next start recovers).
pub async fn balance(app: Weak<App>, share: Arc<Share>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(app) = app.upgrade() else { return };
        if app.poisoned().is_some() {
            return;
        }
        match app.rebalance(&share).await {
            Ok(()) => {}
            Err(Unbalanced::Retry(e)) => {
                tracing::warn!(error = %e, "balancing the groups failed; retrying")
            }
            Err(Unbalanced::Stop(reason)) => return app.poison(reason),
        }
    }
}

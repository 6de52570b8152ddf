//! Group ownership on a shared PostgreSQL store: the lease keeper.
//!
//! A coordinator on PostgreSQL joins the `coordinators` table, takes the leases of the slots
//! it serves (see [`crate::store::leases`]) and keeps them: it renews every `ttl / 5`, and
//! stops serving — the writer is marked failed, so the coordinator stops like on a storage
//! failure — as soon as it cannot be sure it still owns them:
//! - a renewal returns fewer leases than it holds (another coordinator took one, or it
//!   expired in the database), or says the coordinator itself expired;
//! - no renewal has succeeded for `ttl - ttl / 5` by its own monotonic clock (the database is
//!   unreachable, or the process was paused): it stops before the database could give the
//!   leases to anyone else. The database's fence refuses its writes after that anyway.
//!
//! Several coordinators serving at once (`serve --shared`, see [`crate::sharing`]) join with
//! [`Keeper::join`] and share the slots by the rule [`plan`], one [`Keeper::balance`] step at a
//! time: a newcomer gets a fair share, a dead one's slots are taken over.
//!
//! Without `--shared`, a coordinator takes every slot: one coordinator serves a database at a
//! time. A second one waits for the leases (a restart after a crash waits for the old ones to expire) and
//! refuses to start if they stay held — or, started with `--standby`, waits for as long as it
//! takes and serves once they lapse: failover by lease. On a clean stop a coordinator gives its
//! leases up at once, so a standby takes over without waiting for them to expire.

use std::time::{Duration, Instant};

use crate::store::leases::{Fence, Lease, SlotOwner, SLOTS};
use crate::store::{PgStore, StoreError};
use crate::sync::{Arc, Mutex};

/// How a coordinator holds its groups' leases (see the module docs).
pub struct Keeper {
    store: Arc<PgStore>,
    fence: Arc<Fence>,
    me: i64,
    ttl: Duration,
    held: Mutex<Vec<Lease>>,
    /// Held across every statement that changes what is held (renewal, acquisition, release),
    /// so a renewal never counts a slot released meanwhile as lost.
    changing: Mutex<()>,
    /// When the statement of the last successful renewal (or acquisition) was sent: the
    /// leases may be used until `Lease::valid_for` of it.
    renewed_at: Mutex<Instant>,
}

impl Keeper {
    /// Joins the store as a coordinator reachable at `address` and takes every slot, waiting
    /// up to `patience` (`None`: for as long as it takes — a standby) for leases another
    /// coordinator still holds; refuses if they stay held. Blocking.
    pub fn start(
        store: Arc<PgStore>,
        fence: Arc<Fence>,
        address: &str,
        ttl: Duration,
        patience: Option<Duration>,
    ) -> Result<Self, StoreError> {
        let keeper = Self::join(store, fence, address, ttl)?;
        let deadline = patience.map(|p| Instant::now() + p);
        // On any failure, give up what was taken rather than let it lapse.
        let failed = |e: StoreError| {
            keeper.stop();
            e
        };
        loop {
            let sent = Instant::now();
            keeper.renew().map_err(failed)?;
            let missing = SLOTS - keeper.held.lock().len();
            if missing == 0 {
                return Ok(keeper);
            }
            // Acquired after `sent`, so valid at least as long as the renewal.
            for lease in keeper
                .store
                .acquire(keeper.me, missing, ttl)
                .map_err(failed)?
            {
                keeper.fence.set(lease.slot, lease.epoch);
                keeper.held.lock().push(lease);
            }
            *keeper.renewed_at.lock() = sent;
            if keeper.held.lock().len() == SLOTS {
                return Ok(keeper);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let me = keeper.me;
                let owners = keeper.store.owners().map_err(failed)?;
                let other = owners
                    .iter()
                    .find_map(|o| o.owner.as_ref().filter(|(id, _)| *id != me))
                    .map_or("another coordinator".to_string(), |(id, address)| {
                        format!("coordinator {id} at {address}")
                    });
                keeper.stop();
                return Err(StoreError::Locked(format!(
                    "the database is served by {other}, whose group leases are held; \
                     stop it first (one coordinator serves a database at a time)"
                )));
            }
            std::thread::sleep(ttl / 10);
        }
    }

    /// Joins the store as a coordinator reachable at `address`, holding nothing yet: its
    /// share comes with [`Keeper::tick`]. Blocking.
    pub fn join(
        store: Arc<PgStore>,
        fence: Arc<Fence>,
        address: &str,
        ttl: Duration,
    ) -> Result<Self, StoreError> {
        let me = store.join(address, ttl)?;
        fence.set_coordinator(me);
        Ok(Self {
            store,
            fence,
            me,
            ttl,
            held: Mutex::new(Vec::new()),
            changing: Mutex::new(()),
            renewed_at: Mutex::new(Instant::now()),
        })
    }

    /// The store.
    pub fn store(&self) -> &PgStore {
        &self.store
    }

    /// The leases held.
    pub fn held(&self) -> Vec<Lease> {
        self.held.lock().clone()
    }

    /// One balancing step among several coordinators: renews, then [`Keeper::balance`].
    /// Blocking.
    pub fn tick(&self) -> Result<Step, StoreError> {
        self.renew()?;
        self.balance().map(|(step, _)| step)
    }

    /// Follows [`plan`] with what the database says now. Slots acquired are held (and fenced
    /// by) at once; slots to give up are only named: the caller stops serving them, lets their
    /// writes drain, then calls [`Keeper::release`]. Also returns each slot's live owner, as
    /// read. Blocking.
    pub fn balance(&self) -> Result<(Step, Vec<SlotOwner>), StoreError> {
        let owners = self.store.owners()?;
        let live = self.store.live_coordinators()?;
        let mut counts = std::collections::HashMap::<i64, usize>::new();
        let mut free = 0;
        for o in &owners {
            match &o.owner {
                Some((id, _)) => *counts.entry(*id).or_default() += 1,
                None => free += 1,
            }
        }
        let holds = self.held.lock().len();
        // A live coordinator that holds nothing does not appear among the owners.
        let least = if counts.len() < live {
            0
        } else {
            counts.values().copied().min().unwrap_or(0)
        };
        let step = match plan(holds, free, live, least) {
            Plan::Acquire(n) => {
                let _changing = self.changing.lock();
                let got = self.store.acquire(self.me, n, self.ttl)?;
                for l in &got {
                    self.fence.set(l.slot, l.epoch);
                }
                self.held.lock().extend(got.iter().copied());
                if got.is_empty() {
                    Step::Hold
                } else {
                    Step::Gained(got)
                }
            }
            Plan::Release(n) => {
                let held = self.held.lock();
                Step::Release(held.iter().rev().take(n).copied().collect())
            }
            Plan::Hold => Step::Hold,
        };
        Ok((step, owners))
    }

    /// Gives up `leases` (named by [`Step::Release`], no longer served). Blocking.
    pub fn release(&self, leases: &[Lease]) -> Result<(), StoreError> {
        let _changing = self.changing.lock();
        for l in leases {
            self.fence.set(l.slot, 0);
        }
        self.held.lock().retain(|h| !leases.contains(h));
        self.store.release(self.me, leases).map(drop)
    }

    /// The coordinator's id.
    pub fn id(&self) -> i64 {
        self.me
    }

    /// The lease time.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Renews the leases held; an error if any was lost (and then none is kept). Blocking.
    pub fn renew(&self) -> Result<(), StoreError> {
        let _changing = self.changing.lock();
        let sent = Instant::now();
        let held = self.held.lock().clone();
        let lost = |why: String| {
            for l in std::mem::take(&mut *self.held.lock()) {
                self.fence.set(l.slot, 0);
            }
            Err(StoreError::Fenced(why))
        };
        match self.store.renew(self.me, &held, self.ttl)? {
            None => lost(format!(
                "coordinator {} expired in the database (no renewal for the lease time)",
                self.me
            )),
            Some(renewed) if renewed.len() < held.len() => lost(format!(
                "coordinator {} lost {} of its {} group leases",
                self.me,
                held.len() - renewed.len(),
                held.len()
            )),
            Some(_) => {
                *self.renewed_at.lock() = sent;
                Ok(())
            }
        }
    }

    /// Until when, by this process's clock, the leases held may be used: the lease time from
    /// the last successful renewal's sending, less `margin`.
    pub fn valid_until(&self, margin: Duration) -> Instant {
        Lease::valid_for(*self.renewed_at.lock(), self.ttl, margin)
    }

    /// Gives up every lease and leaves (a clean stop: another coordinator may take the groups
    /// at once). Blocking; failures are logged, since the leases expire anyway.
    pub fn stop(&self) {
        let _changing = self.changing.lock();
        let held = std::mem::take(&mut *self.held.lock());
        for l in &held {
            self.fence.set(l.slot, 0);
        }
        // Leave even if the release fails: a coordinator that left renews nothing more.
        for result in [
            self.store.release(self.me, &held).map(drop),
            self.store.leave(self.me),
        ] {
            if let Err(e) = result {
                tracing::warn!(error = %e, "giving up the group leases failed; they expire");
            }
        }
    }
}

/// Renews `keeper`'s leases every `ttl / 5` while `alive` says the coordinator runs. Calls
/// `halt` with the reason, and ends, when a renewal shows the leases lost, or when none has
/// succeeded for `ttl - ttl / 5` by this process's clock — checked while a renewal is still
/// waiting, too (a database that stopped answering must not keep a coordinator serving).
pub async fn keep(
    keeper: Arc<Keeper>,
    alive: impl Fn() -> bool + Send + 'static,
    halt: impl Fn(String) + Send + 'static,
) {
    let ttl = keeper.ttl();
    let period = ttl / 5;
    let expired = || {
        format!(
            "the group leases could not be renewed for {:?}; another coordinator may take them",
            ttl - period
        )
    };
    loop {
        tokio::time::sleep(period).await;
        if !alive() {
            return;
        }
        let valid_until = keeper.valid_until(period);
        let k = keeper.clone();
        let renewal = tokio::task::spawn_blocking(move || k.renew());
        tokio::select! {
            renewed = renewal => match renewed {
                Ok(Ok(())) => {}
                Ok(Err(e @ StoreError::Fenced(_))) => return halt(e.to_string()),
                Ok(Err(e)) => tracing::warn!(error = %e, "renewing the group leases failed"),
                Err(e) => tracing::warn!(error = %e, "renewing the group leases panicked"),
            },
            () = tokio::time::sleep_until(valid_until.into()) => return halt(expired()),
        }
        if Instant::now() >= keeper.valid_until(period) {
            return halt(expired());
        }
    }
}

/// What a keeper tick did, or asks of the coordinator (see [`Keeper::tick`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// These slots were acquired: load their groups, then serve them.
    Gained(Vec<Lease>),
    /// Stop serving these slots, let their writes drain, then [`Keeper::release`] them.
    Release(Vec<Lease>),
    /// Nothing to do.
    Hold,
}

/// What a coordinator does about its share of the slots on a keeper tick (see [`plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Take up to this many free or expired slots.
    Acquire(usize),
    /// Give up this many slots (a clean handoff: after their writes drain).
    Release(usize),
    /// Keep what it holds.
    Hold,
}

/// The balancing rule for several coordinators sharing the slots, decided by each one from
/// what the `leases` and `coordinators` tables say: it `holds` slots, `free` slots are free or
/// expired, `live` coordinators are alive (itself included), and the least-loaded of them
/// holds `least`.
///
/// - Availability first: free slots are taken up to the fair share `⌈SLOTS / live⌉`, and by
///   a coordinator holding the fewest even beyond it, so no slot stays unserved.
/// - A coordinator above the fair share gives the excess up; one above `⌊SLOTS / live⌋`
///   gives one up while another holds less than that (a newcomer). Releases stop once the
///   counts differ by at most one, so ownership does not move back and forth.
pub fn plan(holds: usize, free: usize, live: usize, least: usize) -> Plan {
    let live = live.max(1);
    let high = SLOTS.div_ceil(live);
    let low = SLOTS / live;
    if free > 0 {
        if holds < high {
            return Plan::Acquire(free.min(high - holds));
        }
        if holds <= least {
            return Plan::Acquire(1);
        }
        return Plan::Hold;
    }
    if holds > high {
        return Plan::Release(holds - high);
    }
    if holds > low && least < low {
        return Plan::Release(1);
    }
    Plan::Hold
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Coordinators applying `plan` in turn, one tick each per round; returns the rounds
    /// until every slot is held and the counts differ by at most one.
    fn settle(held: &mut [usize]) -> usize {
        for round in 1..=20 {
            for me in 0..held.len() {
                let free = SLOTS - held.iter().sum::<usize>();
                let least = *held.iter().min().unwrap();
                match plan(held[me], free, held.len(), least) {
                    Plan::Acquire(n) => held[me] += n.min(free),
                    Plan::Release(n) => held[me] -= n,
                    Plan::Hold => {}
                }
            }
            let (max, min) = (*held.iter().max().unwrap(), *held.iter().min().unwrap());
            if held.iter().sum::<usize>() == SLOTS && max - min <= 1 {
                return round;
            }
        }
        panic!("no settling: {held:?}");
    }

    #[test]
    fn one_coordinator_takes_every_slot() {
        let mut held = [0];
        assert_eq!(settle(&mut held), 1);
        assert_eq!(held, [SLOTS]);
    }

    #[test]
    fn a_newcomer_gets_a_fair_share_and_ownership_then_stays_put() {
        let mut held = [SLOTS, 0];
        settle(&mut held);
        assert_eq!(held, [32, 32]);
        let mut held = [32, 32, 0];
        settle(&mut held);
        let mut sorted = held;
        sorted.sort();
        assert_eq!(sorted, [21, 21, 22]);
        // Settled: nobody moves.
        for me in 0..3 {
            let least = *held.iter().min().unwrap();
            assert_eq!(plan(held[me], 0, 3, least), Plan::Hold, "{held:?}");
        }
    }

    #[test]
    fn the_slots_of_a_dead_coordinator_are_taken_by_the_others() {
        // Three held 21, 21, 22; the third died: its 22 slots are free, two are live.
        let mut held = [21, 21];
        assert_eq!(plan(21, 22, 2, 21), Plan::Acquire(11));
        settle(&mut held);
        assert_eq!(held, [32, 32]);
    }

    #[test]
    fn free_slots_are_taken_even_past_the_fair_share_when_counts_are_stale() {
        // A dead coordinator still counted as live: the fair share is too small, but the
        // least-loaded takes a free slot anyway.
        assert_eq!(plan(22, 5, 3, 22), Plan::Acquire(1));
        assert_eq!(plan(23, 5, 3, 22), Plan::Hold);
        assert_eq!(plan(0, 0, 1, 0), Plan::Hold);
    }
}

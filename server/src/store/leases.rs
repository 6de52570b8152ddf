//! Group ownership on PostgreSQL: slots, leases with epochs, and the fence every write passes.
//!
//! # Slots
//! Groups are hashed into [`SLOTS`] slots ([`slot_of`]: the first 32 bits of the MD5 of the
//! group's UTF-8 bytes, modulo 64 — the same function is `switchyard_slot` in SQL, and the
//! `tasks.slot` column is set from it when a task is inserted). A coordinator owns slots, and
//! with them every group that hashes there.
//!
//! # Leases
//! A slot's lease (`leases` row) has an owner (a coordinator's id), an **epoch** and an expiry.
//! - Epochs come from a sequence: every acquisition gets a new one, never reused, so an epoch
//!   names one ownership, not just one owner.
//! - Expiry is decided by **the database's clock only** (`now()` in the statements; no
//!   coordinator's time is ever compared with it), so skewed coordinator clocks cannot make
//!   two owners. A coordinator also stops by its own monotonic clock before the lease can
//!   expire (the caller's business: [`Lease::valid_for`]).
//! - Renewal is conditional on owner **and** epoch and on the lease not having expired: a
//!   coordinator can renew only what it still holds, never a lease someone else took.
//! - Acquisition takes only free or expired slots, with `FOR UPDATE SKIP LOCKED`.
//!
//! # The fence
//! A store with a [`Fence`] checks, inside every write transaction and before any write, that
//! it still holds each slot the batch touches (the slots of submitted tasks' groups and of the
//! tasks named by id): the lease rows are read `FOR SHARE`, so an acquisition (an `UPDATE` of
//! those rows) waits until the batch commits, and a batch that starts after an acquisition
//! sees it and is refused with [`StoreError::Fenced`](super::StoreError::Fenced). Every write
//! of a group's data is therefore ordered before the next owner's acquisition, or refused.
//!
//! The cluster's own rows (workers, tokens, idempotency keys, starts) belong to no group: a
//! batch that writes them checks instead that its coordinator is still live in the database
//! (its `coordinators` row unexpired and not left, read `FOR SHARE` the same way). Any live
//! coordinator may write them — a coordinator that holds no slot yet must still be able to
//! settle the admin token — and a deposed one cannot. The transaction also
//! declares the epochs it writes under (`SET LOCAL switchyard.fence`), which the fencing audit
//! of the tests checks row by row.
//!
//! No correctness-critical state lives in a database session: no session advisory locks, no
//! session variables beyond one transaction (`set_config(…, true)`).

use std::time::{Duration, Instant};

use md5::{Digest, Md5};

use crate::sync::{AtomicU64, Ordering, RwLock};

/// The number of slots groups are hashed into.
pub const SLOTS: usize = 64;

/// The slot of `group` (see the module docs; equal to SQL `switchyard_slot(group)`).
pub fn slot_of(group: &str) -> usize {
    let digest = Md5::digest(group.as_bytes());
    let head = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    head as usize % SLOTS
}

/// What this coordinator holds: its id and the epoch of each slot it owns (0: not owned).
/// Shared by the lease keeper, which changes it, and the store, which fences by it.
///
/// The id is `Relaxed`: it is set once, when the coordinator joins, before the store writes
/// anything (the keeper joins before the store is handed to the writer); nothing else is
/// published through it. The epochs are behind a lock.
#[derive(Debug)]
pub struct Fence {
    coordinator: AtomicU64,
    epochs: RwLock<[i64; SLOTS]>,
}

impl Default for Fence {
    fn default() -> Self {
        Self {
            coordinator: AtomicU64::new(0),
            epochs: RwLock::new([0; SLOTS]),
        }
    }
}

impl Fence {
    /// The coordinator's id (0 before it joined).
    pub fn coordinator(&self) -> i64 {
        self.coordinator.load(Ordering::Relaxed) as i64
    }

    /// Records the coordinator's id (once it joined).
    pub fn set_coordinator(&self, id: i64) {
        self.coordinator.store(id as u64, Ordering::Relaxed);
    }

    /// The epochs held, by slot (0: not held).
    pub fn epochs(&self) -> [i64; SLOTS] {
        *self.epochs.read()
    }

    /// Whether `slot` is held.
    pub fn holds(&self, slot: usize) -> bool {
        self.epochs.read()[slot] != 0
    }

    /// Records `slot` as held under `epoch`, or not held (`epoch` 0).
    pub fn set(&self, slot: usize, epoch: i64) {
        self.epochs.write()[slot] = epoch;
    }

    /// The value of `switchyard.fence` a write transaction declares: `coordinator:e0,e1,…`.
    pub(super) fn declaration(&self) -> String {
        let epochs = self.epochs();
        let mut s = format!("{}:", self.coordinator());
        for (i, e) in epochs.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&e.to_string());
        }
        s
    }
}

/// A lease this coordinator holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The slot.
    pub slot: usize,
    /// Its epoch.
    pub epoch: i64,
}

impl Lease {
    /// How long, by this coordinator's monotonic clock, a lease granted or renewed by a
    /// statement sent at `sent` may be used: `ttl` from the sending (the database computed
    /// its expiry after it received the statement, so later than that) less a `margin` for
    /// clock-rate drift and the time a write takes to reach the database.
    pub fn valid_for(sent: Instant, ttl: Duration, margin: Duration) -> Instant {
        sent + ttl.saturating_sub(margin)
    }
}

/// Who owns a slot, as the `leases` table says now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotOwner {
    /// The slot.
    pub slot: usize,
    /// The owning coordinator and its advertised address, if the lease is held and unexpired.
    pub owner: Option<(i64, String)>,
}

/// The ownership migration: slots, leases, coordinators (see the module docs).
pub(super) const MIGRATION: &str = "
CREATE FUNCTION switchyard_slot(grp TEXT) RETURNS INTEGER
    LANGUAGE SQL IMMUTABLE STRICT PARALLEL SAFE
    RETURN (('x' || substr(md5(grp), 1, 8))::bit(32)::bigint % 64)::integer;
ALTER TABLE tasks ADD COLUMN slot INTEGER GENERATED ALWAYS AS (switchyard_slot(grp)) STORED;
CREATE INDEX tasks_slot_live ON tasks (slot) WHERE state IN ('queued', 'running');
CREATE SEQUENCE lease_epochs;
CREATE SEQUENCE coordinator_ids;
CREATE TABLE coordinators (
    id         BIGINT      PRIMARY KEY DEFAULT nextval('coordinator_ids'),
    address    TEXT        NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL,
    left_at    TIMESTAMPTZ
);
CREATE TABLE leases (
    slot       INTEGER     PRIMARY KEY,
    owner      BIGINT,
    epoch      BIGINT      NOT NULL DEFAULT 0,
    expires_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity'
);
INSERT INTO leases (slot) SELECT generate_series(0, 63);
";

/// The fence check a write transaction runs first: the lease rows of the slots it touches
/// (`$1`: slots named directly; `$2`: ids of tasks whose slots are touched), locked `FOR
/// SHARE` until it commits, and whether each is unexpired by the database's clock.
///
/// The tasks' slots are looked up once (an init plan), and the lease rows by their key: the
/// form `slot = ANY($1) OR slot IN (subquery)` ran the subquery per lease row, and a generic
/// plan cached while `tasks` was small scanned the whole table each time (measured: 40% of
/// PostgreSQL's CPU in a drain).
pub(super) const FENCE_CHECK: &str = "
SELECT l.slot, l.owner, l.epoch, l.expires_at > clock_timestamp()
FROM leases l
WHERE l.slot = ANY($1::integer[] || ARRAY(SELECT DISTINCT t.slot FROM tasks t WHERE t.id = ANY($2)))
FOR SHARE OF l";

/// The cluster-row fence: whether coordinator `$1` is live by the database's clock, its row
/// locked `FOR SHARE` until the batch commits (so its expiry or departure waits for it).
pub(super) const COORDINATOR_CHECK: &str = "
SELECT c.left_at IS NULL AND c.expires_at > clock_timestamp()
FROM coordinators c WHERE c.id = $1
FOR SHARE";

/// Declares the epochs a write transaction writes under, for the fencing audit.
pub(super) const DECLARE: &str = "SELECT set_config('switchyard.fence', $1, true)";

/// A coordinator joins: its row, alive until `$2` ms from the database's now.
pub(super) const JOIN: &str = "
INSERT INTO coordinators (address, expires_at)
VALUES ($1, now() + $2 * interval '1 millisecond') RETURNING id";

/// Keeps the coordinator's row alive (and says whether it still is: it may not come back
/// once it expired or left).
pub(super) const HEARTBEAT: &str = "
UPDATE coordinators SET expires_at = now() + $2 * interval '1 millisecond'
WHERE id = $1 AND left_at IS NULL AND expires_at > now() RETURNING id";

/// Renews the leases `$1` holds among slots `$2` with epochs `$3` (pairwise), if unexpired.
pub(super) const RENEW: &str = "
UPDATE leases l SET expires_at = now() + $4 * interval '1 millisecond'
FROM unnest($2::integer[], $3::bigint[]) AS held(slot, epoch)
WHERE l.slot = held.slot AND l.epoch = held.epoch AND l.owner = $1 AND l.expires_at > now()
RETURNING l.slot, l.epoch";

/// Takes up to `$2` free or expired slots for `$1`, each under a new epoch.
pub(super) const ACQUIRE: &str = "
UPDATE leases SET owner = $1, epoch = nextval('lease_epochs'),
                  expires_at = now() + $3 * interval '1 millisecond'
WHERE slot IN (SELECT slot FROM leases WHERE owner IS NULL OR expires_at <= now()
               ORDER BY slot LIMIT $2 FOR UPDATE SKIP LOCKED)
RETURNING slot, epoch";

/// Gives up the leases `$1` holds among slots `$2` with epochs `$3` (pairwise).
pub(super) const RELEASE: &str = "
UPDATE leases l SET owner = NULL, expires_at = '-infinity'
FROM unnest($2::integer[], $3::bigint[]) AS held(slot, epoch)
WHERE l.slot = held.slot AND l.epoch = held.epoch AND l.owner = $1
RETURNING l.slot";

/// The coordinator `$1` leaves (it renews nothing more).
pub(super) const LEAVE: &str = "UPDATE coordinators SET left_at = now() WHERE id = $1";

/// Each slot's live owner and its address.
pub(super) const OWNERS: &str = "
SELECT l.slot, c.id, c.address
FROM leases l LEFT JOIN coordinators c ON c.id = l.owner AND l.expires_at > now()
ORDER BY l.slot";

/// Coordinators alive now (by the database's clock).
pub(super) const LIVE: &str =
    "SELECT count(*) FROM coordinators WHERE left_at IS NULL AND expires_at > now()";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_spread_groups_and_stay_in_range() {
        let mut seen = [0usize; SLOTS];
        for i in 0..6_400 {
            seen[slot_of(&format!("group-{i}"))] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
        // Known values (MD5("hello") begins 5d41402a = 1564557354; mod 64 = 42).
        assert_eq!(slot_of("hello"), 42);
    }

    #[test]
    fn a_declaration_names_the_coordinator_and_every_epoch() {
        let f = Fence::default();
        f.set_coordinator(7);
        f.set(0, 11);
        f.set(63, 12);
        let d = f.declaration();
        assert!(d.starts_with("7:11,0,"), "{d}");
        assert!(d.ends_with(",0,12"), "{d}");
        assert_eq!(d.split(',').count(), SLOTS);
        assert!(f.holds(63) && !f.holds(1));
    }
}

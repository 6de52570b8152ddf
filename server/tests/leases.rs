//! Group ownership on PostgreSQL, at the store: slots agree between Rust and SQL, leases are
//! taken, renewed and given up only by their holder, expiry is the database's, and a store
//! writes only for slots it holds under their current epoch — checked by a fencing audit (a
//! trigger that records every committed write made under an epoch that is not current) over
//! a run of two stores stealing slots from each other while they write.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::pg::{install_audit, query, violations, TestDatabase};
use switchyard_server::ownership::{Keeper, Step};
use switchyard_server::store::leases::{slot_of, Fence, Lease, SLOTS};
use switchyard_server::store::{Change, PgStore, Store, StoreError, TaskRecord, TaskState};

fn task(id: u64, group: &str) -> TaskRecord {
    TaskRecord {
        id,
        group: group.into(),
        tags: vec![],
        priority: 0,
        payload: vec![],
        state: TaskState::Queued,
        attempt: 0,
        worker: None,
        outcome: None,
        submitted_ms: 0,
    }
}

/// A group that hashes to `slot`.
fn group_in(slot: usize) -> String {
    (0..)
        .map(|i| format!("g{i}"))
        .find(|g| slot_of(g) == slot)
        .unwrap()
}

/// A coordinator's view: a store fenced by its own leases.
struct Coordinator {
    store: Arc<PgStore>,
    fence: Arc<Fence>,
    me: i64,
}

impl Coordinator {
    fn join(db: &TestDatabase, address: &str, ttl: Duration) -> Self {
        let fence = Arc::new(Fence::default());
        let store = PgStore::open(&db.url).unwrap().fenced(fence.clone());
        let me = store.join(address, ttl).unwrap();
        fence.set_coordinator(me);
        Self {
            store: Arc::new(store),
            fence,
            me,
        }
    }

    fn acquire(&self, n: usize, ttl: Duration) -> Vec<Lease> {
        let got = self.store.acquire(self.me, n, ttl).unwrap();
        for l in &got {
            self.fence.set(l.slot, l.epoch);
        }
        got
    }
}

#[test]
fn slots_agree_between_the_coordinator_and_the_database() {
    let db = TestDatabase::new();
    drop(PgStore::open(&db.url).unwrap()); // migrates: creates switchyard_slot
    let names = [
        "g",
        "hello",
        "a-much-longer-group-name-with-dashes",
        "emoji-🚀",
        "ümlaut",
        "日本語",
    ];
    for name in names
        .iter()
        .map(|s| s.to_string())
        .chain((0..200).map(|i| format!("x{i}")))
    {
        let sql = query(
            &db.url,
            &format!("SELECT switchyard_slot('{}')", name.replace('\'', "''")),
        );
        assert_eq!(sql[0].parse::<usize>().unwrap(), slot_of(&name), "{name}");
    }
}

#[test]
fn a_store_writes_only_for_the_slots_it_holds() {
    let db = TestDatabase::new();
    let ttl = Duration::from_secs(30);
    let a = Coordinator::join(&db, "http://a", ttl);
    let b = Coordinator::join(&db, "http://b", ttl);
    assert_eq!(a.acquire(1, ttl).len(), 1, "slot 0, the first free");
    assert!(a.fence.holds(0));
    let (mine, theirs) = (group_in(0), group_in(1));
    a.store.apply(&[Change::Submit(task(1, &mine))]).unwrap();
    // Slot 1 is free but not a's: refused, and the whole batch with it.
    let refused = a.store.apply(&[
        Change::Submit(task(2, &mine)),
        Change::Submit(task(3, &theirs)),
    ]);
    assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
    assert!(a.store.task(2).unwrap().is_none());
    // b holds nothing in slot 0: it cannot touch a's task, by id.
    assert_eq!(b.acquire(SLOTS, ttl).len(), SLOTS - 1, "every slot but a's");
    let refused = b.store.apply(&[Change::Cancel { task: 1 }]);
    assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
    assert_eq!(a.store.task(1).unwrap().unwrap().state, TaskState::Queued);
    b.store.apply(&[Change::Submit(task(3, &theirs))]).unwrap();
    // Owners as the table says them.
    let owners = a.store.owners().unwrap();
    assert_eq!(owners[0].owner, Some((a.me, "http://a".to_string())));
    assert_eq!(owners[1].owner, Some((b.me, "http://b".to_string())));
    assert_eq!(a.store.live_coordinators().unwrap(), 2);
}

#[test]
fn leases_move_only_when_expired_by_the_database_clock_and_renew_only_for_their_holder() {
    let db = TestDatabase::new();
    let short = Duration::from_millis(400);
    let a = Coordinator::join(&db, "http://a", Duration::from_secs(30));
    let b = Coordinator::join(&db, "http://b", Duration::from_secs(30));
    let held = a.acquire(1, short);
    let group = group_in(0);
    a.store.apply(&[Change::Submit(task(1, &group))]).unwrap();
    // Unexpired: b cannot take it, nor renew it as if it were its own.
    assert!(b.store.acquire(b.me, 1, short).unwrap()[0].slot != 0);
    assert_eq!(b.store.renew(b.me, &held, short).unwrap(), Some(vec![]));
    // a renews its own.
    assert_eq!(
        a.store.renew(a.me, &held, short).unwrap(),
        Some(held.clone())
    );
    std::thread::sleep(short + Duration::from_millis(200));
    // Expired: a write under it is refused even before anyone takes it…
    let refused = a.store.apply(&[Change::Cancel { task: 1 }]);
    assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
    // …and a cannot renew it back (its own row expired with it: it must join again).
    assert_eq!(a.store.renew(a.me, &held, short).unwrap(), None);
    // b takes it under a new epoch and writes; a's epoch stays refused.
    let taken = b.acquire(1, Duration::from_secs(30));
    assert_eq!(taken[0].slot, 0);
    assert!(taken[0].epoch > held[0].epoch, "epochs are never reused");
    b.store
        .apply(&[Change::Assign {
            task: 1,
            worker: 7,
            attempt: 1,
        }])
        .unwrap();
    let refused = a.store.apply(&[Change::Cancel { task: 1 }]);
    assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
    assert_eq!(a.store.task(1).unwrap().unwrap().state, TaskState::Running);
    // b gives it up; it is free at once.
    assert_eq!(b.store.release(b.me, &taken).unwrap(), [0]);
    assert_eq!(a.acquire(1, short)[0].slot, 0);
    // A coordinator that left renews nothing.
    b.store.leave(b.me).unwrap();
    assert_eq!(b.store.renew(b.me, &[], short).unwrap(), None);
}

#[test]
fn the_fencing_audit_sees_an_unfenced_write() {
    // The audit can fail: a store that writes with no fence is recorded.
    let db = TestDatabase::new();
    let plain = PgStore::open(&db.url).unwrap();
    install_audit(&db.url);
    plain.apply(&[Change::Submit(task(1, "g"))]).unwrap();
    assert_eq!(violations(&db.url), 1);
}

#[test]
fn two_stores_stealing_slots_while_they_write_never_write_under_a_stale_epoch() {
    let db = TestDatabase::new();
    let _ = PgStore::open(&db.url).unwrap();
    install_audit(&db.url);
    let ttl = Duration::from_millis(150);
    let group = group_in(0);
    let coordinators: Vec<_> = ["http://a", "http://b"]
        .iter()
        .map(|addr| Arc::new(Coordinator::join(&db, addr, Duration::from_secs(60))))
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let next_id = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let handles: Vec<_> = coordinators
        .iter()
        .map(|c| {
            let (c, stop, next_id, group) =
                (c.clone(), stop.clone(), next_id.clone(), group.clone());
            std::thread::spawn(move || {
                let (mut written, mut fenced) = (0u32, 0u32);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Take slot 0 whenever it is free or expired, then write under it, never
                    // renewing: the other store takes it as soon as it expires.
                    c.acquire(1, ttl);
                    let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let batch = [
                        Change::Submit(task(id, &group)),
                        Change::Assign {
                            task: id,
                            worker: 1,
                            attempt: 1,
                        },
                        Change::Finish {
                            task: id,
                            attempt: 1,
                            result: None,
                        },
                        Change::ForgetKeys { before_ms: 0 },
                    ];
                    match c.store.apply(&batch) {
                        Ok(()) => written += 1,
                        Err(StoreError::Fenced(_)) => fenced += 1,
                        Err(e) => panic!("{e}"),
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                (written, fenced)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results: Vec<(u32, u32)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let written: u32 = results.iter().map(|r| r.0).sum();
    let fenced: u32 = results.iter().map(|r| r.1).sum();
    assert!(
        results.iter().all(|r| r.0 > 0),
        "both stores held the slot at some point: {results:?}"
    );
    assert!(
        fenced > 0,
        "writes were refused after the lease moved: {results:?}"
    );
    assert_eq!(violations(&db.url), 0, "{results:?}");
    let rows: usize = query(&db.url, "SELECT count(*) FROM tasks")[0]
        .parse()
        .unwrap();
    assert_eq!(rows, written as usize, "every refused batch wrote nothing");
}

/// Ticks every keeper once per round, giving up at once what a tick names (nothing is served
/// here), until every slot is held and the counts differ by at most one; returns the counts.
fn balance(keepers: &[&Keeper]) -> Vec<usize> {
    for _ in 0..20 {
        for k in keepers {
            if let Step::Release(leases) = k.tick().unwrap() {
                k.release(&leases).unwrap();
            }
        }
        let counts: Vec<usize> = keepers.iter().map(|k| k.held().len()).collect();
        let (max, min) = (*counts.iter().max().unwrap(), *counts.iter().min().unwrap());
        if counts.iter().sum::<usize>() == SLOTS && max - min <= 1 {
            return counts;
        }
    }
    let counts: Vec<usize> = keepers.iter().map(|k| k.held().len()).collect();
    panic!("the keepers did not settle: {counts:?}");
}

#[test]
fn keepers_share_the_slots_take_a_newcomer_in_and_take_over_a_dead_one() {
    let db = TestDatabase::new();
    let ttl = Duration::from_millis(600);
    let keeper = |address: &str| {
        let fence = Arc::new(Fence::default());
        let store = Arc::new(PgStore::open(&db.url).unwrap().fenced(fence.clone()));
        Keeper::join(store, fence, address, ttl).unwrap()
    };
    let a = keeper("http://a");
    assert_eq!(balance(&[&a]), [SLOTS]);
    // b arrives: a gives half up, b takes it.
    let b = keeper("http://b");
    assert_eq!(balance(&[&a, &b]), [32, 32]);
    // c arrives: each gives up its excess.
    let c = keeper("http://c");
    let mut counts = balance(&[&a, &b, &c]);
    counts.sort();
    assert_eq!(counts, [21, 21, 22]);
    // No slot has two holders, and each holder's leases are its own.
    let owners = a.store().owners().unwrap();
    for k in [&a, &b, &c] {
        for l in k.held() {
            assert_eq!(owners[l.slot].owner.as_ref().map(|o| o.0), Some(k.id()));
        }
    }
    // c dies (stops renewing): once its leases lapse, a and b take its slots.
    let deadline = std::time::Instant::now() + ttl * 3;
    while std::time::Instant::now() < deadline {
        a.tick().unwrap();
        b.tick().unwrap();
        std::thread::sleep(ttl / 5);
    }
    assert_eq!(balance(&[&a, &b]), [32, 32]);
}

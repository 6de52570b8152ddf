//! The store contract as a conformance suite: every test of the `Store` trait is generic over a
//! [`Backend`] and runs, unchanged, against each backend listed at the bottom (SQLite and PostgreSQL).
//! Round trips, durability across reopening, fencing by attempt, all-or-nothing batches,
//! attempts, tokens and lists. The group-commit writer's test runs on SQLite.

mod common;

use std::sync::{Arc, Barrier, Mutex};

use common::Hooked;
use switchyard_server::store::{
    AttemptEnd, Change, IdKind, KeyRecord, ListFilter, PgStore, Recovery, Requeued, Role,
    SqliteStore, Store, StoreError, TaskRecord, TaskState, TokenRecord, WorkerRecord,
};
use switchyard_server::writer::Writer;

fn task(id: u64) -> TaskRecord {
    TaskRecord {
        id,
        group: "g".into(),
        tags: vec!["gpu".into()],
        priority: (id % 3) as i32,
        payload: format!("payload {id}").into_bytes(),
        state: TaskState::Queued,
        attempt: 0,
        worker: None,
        outcome: None,
        submitted_ms: 1_700_000_000_000 + id as i64,
    }
}

fn worker(id: u64) -> WorkerRecord {
    WorkerRecord {
        id,
        groups: vec!["g".into()],
        tags: vec!["gpu".into()],
        token_hash: format!("hash-{id}"),
    }
}

/// A store backend under test: a place for a store (a directory, a database), and how to open
/// the store there (again after dropping it: the same state).
trait Backend {
    type Place;
    fn place() -> Self::Place;
    fn open(place: &Self::Place) -> Arc<dyn Store>;
}

/// The embedded SQLite store.
struct Sqlite;

impl Backend for Sqlite {
    type Place = tempfile::TempDir;
    fn place() -> Self::Place {
        tempfile::tempdir().unwrap()
    }
    fn open(place: &Self::Place) -> Arc<dyn Store> {
        Arc::new(SqliteStore::open(place.path()).unwrap())
    }
}

/// PostgreSQL, in a database of its own.
struct Postgres;

impl Backend for Postgres {
    type Place = common::pg::TestDatabase;
    fn place() -> Self::Place {
        common::pg::TestDatabase::new()
    }
    fn open(place: &Self::Place) -> Arc<dyn Store> {
        Arc::new(PgStore::open(&place.url).unwrap())
    }
}

fn store<B: Backend>() -> (B::Place, Arc<dyn Store>) {
    let place = B::place();
    let s = B::open(&place);
    (place, s)
}

fn state(s: &dyn Store, id: u64) -> (TaskState, u32, Option<u64>, Option<String>) {
    let t = s.task(id).unwrap().unwrap();
    (t.state, t.attempt, t.worker, t.outcome)
}

fn a_task_goes_through_its_life_and_recovery_sees_only_live_tasks<B: Backend>() {
    let (_dir, s) = store::<B>();
    s.apply(&[
        Change::AddWorker(worker(1)),
        Change::Submit(task(1)),
        Change::Submit(task(2)),
    ])
    .unwrap();
    s.apply(&[Change::Submit(task(3))]).unwrap();
    s.apply(&[Change::Assign {
        task: 1,
        worker: 1,
        attempt: 1,
    }])
    .unwrap();
    assert_eq!(state(&*s, 1), (TaskState::Running, 1, Some(1), None));
    s.apply(&[Change::Requeue {
        task: 1,
        attempt: 1,
        worker: 1,
        why: Requeued::WorkerGone,
    }])
    .unwrap();
    s.apply(&[Change::Assign {
        task: 1,
        worker: 1,
        attempt: 2,
    }])
    .unwrap();
    s.apply(&[Change::Finish {
        task: 1,
        attempt: 2,
        result: Some("ok".into()),
    }])
    .unwrap();
    assert_eq!(
        state(&*s, 1),
        (TaskState::Finished, 2, Some(1), Some("ok".into()))
    );
    s.apply(&[Change::Assign {
        task: 2,
        worker: 1,
        attempt: 1,
    }])
    .unwrap();
    s.apply(&[Change::Update {
        task: 3,
        priority: Some(9),
        tags: Some(vec![]),
    }])
    .unwrap();
    let r = s.recover().unwrap();
    assert_eq!(r.workers, vec![worker(1)]);
    let live: Vec<(u64, TaskState)> = r.tasks.iter().map(|t| (t.id, t.state)).collect();
    assert_eq!(live, [(2, TaskState::Running), (3, TaskState::Queued)]);
    assert_eq!((r.tasks[1].priority, r.tasks[1].tags.len()), (9, 0));
    assert_eq!(r.tasks[1].payload, b"payload 3");
    assert_eq!((r.next_task_id, r.next_worker_id), (4, 2));
}

fn committed_changes_survive_reopening<B: Backend>() {
    let dir = B::place();
    {
        let s = B::open(&dir);
        s.apply(&[Change::AddWorker(worker(7)), Change::Submit(task(1))])
            .unwrap();
        s.apply(&[Change::Assign {
            task: 1,
            worker: 7,
            attempt: 1,
        }])
        .unwrap();
    }
    let s = B::open(&dir);
    let r = s.recover().unwrap();
    assert_eq!(r.workers.len(), 1);
    assert_eq!(
        (r.tasks[0].state, r.tasks[0].worker),
        (TaskState::Running, Some(7))
    );
}

fn fenced_changes_refuse_a_stale_attempt_and_change_nothing<B: Backend>() {
    let (_dir, s) = store::<B>();
    s.apply(&[
        Change::Submit(task(1)),
        Change::Assign {
            task: 1,
            worker: 3,
            attempt: 1,
        },
    ])
    .unwrap();
    for stale in [
        Change::Finish {
            task: 1,
            attempt: 2,
            result: None,
        },
        Change::Fail {
            task: 1,
            attempt: 0,
            message: "x".into(),
        },
        Change::Assign {
            task: 1,
            worker: 4,
            attempt: 1,
        },
    ] {
        assert!(
            matches!(
                s.apply(std::slice::from_ref(&stale)),
                Err(StoreError::Conflict(_))
            ),
            "{stale:?}"
        );
    }
    assert_eq!(state(&*s, 1), (TaskState::Running, 1, Some(3), None));
    // An update decided while the task was queued applies even if the assignment committed
    // first; once the task has ended it changes nothing.
    s.apply(&[Change::Update {
        task: 1,
        priority: Some(9),
        tags: None,
    }])
    .unwrap();
    assert_eq!(s.task(1).unwrap().unwrap().priority, 9);
    // A requeue of a superseded attempt changes nothing, and does not fail its batch.
    s.apply(&[
        Change::Requeue {
            task: 1,
            attempt: 0,
            worker: 1,
            why: Requeued::WorkerGone,
        },
        Change::Submit(task(2)),
    ])
    .unwrap();
    assert_eq!(state(&*s, 1), (TaskState::Running, 1, Some(3), None));
    assert!(matches!(
        s.apply(&[Change::Requeue {
            task: 9,
            attempt: 1,
            worker: 1,
            why: Requeued::WorkerGone,
        }]),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.apply(&[Change::Finish {
            task: 9,
            attempt: 1,
            result: None
        }]),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.apply(&[Change::Submit(task(1))]),
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.apply(&[Change::RemoveWorker { worker: 9 }]),
        Err(StoreError::NotFound(_))
    ));
}

fn a_departure_and_a_late_assign_end_the_same_in_either_order<B: Backend>() {
    // A fetch assigned attempt 1 while its worker was being declared dead: the departure's
    // requeue may reach the store before or after the fetch's assign.
    for requeue_first in [true, false] {
        let (_dir, s) = store::<B>();
        s.apply(&[Change::Submit(task(1))]).unwrap();
        let assign = Change::Assign {
            task: 1,
            worker: 7,
            attempt: 1,
        };
        let requeue = Change::Requeue {
            task: 1,
            attempt: 1,
            worker: 7,
            why: Requeued::WorkerGone,
        };
        let (first, second) = if requeue_first {
            (requeue, assign)
        } else {
            (assign, requeue)
        };
        s.apply(&[first]).unwrap();
        let late = s.apply(&[second]);
        assert_eq!(
            late.is_err(),
            requeue_first,
            "a late assign is refused; a requeue applies"
        );
        assert_eq!(state(&*s, 1), (TaskState::Queued, 1, None, None));
        // The next assignment (attempt 2, another worker) applies either way.
        s.apply(&[Change::Assign {
            task: 1,
            worker: 8,
            attempt: 2,
        }])
        .unwrap();
        assert_eq!(state(&*s, 1), (TaskState::Running, 2, Some(8), None));
    }
}

fn a_departure_batch_commits_even_if_another_worker_took_a_task_first<B: Backend>() {
    // Worker 1 ran task 1 (attempt 1) and is declared dead; the dispatcher re-placed the task and
    // worker 2 fetched it as attempt 2, and that assign committed before the departure's batch.
    let (_dir, s) = store::<B>();
    s.apply(&[
        Change::AddWorker(worker(1)),
        Change::AddWorker(worker(2)),
        Change::Submit(task(1)),
        Change::Submit(task(2)),
        Change::Assign {
            task: 1,
            worker: 1,
            attempt: 1,
        },
        Change::Assign {
            task: 2,
            worker: 1,
            attempt: 1,
        },
    ])
    .unwrap();
    s.apply(&[Change::Assign {
        task: 1,
        worker: 2,
        attempt: 2,
    }])
    .unwrap();
    s.apply(&[
        Change::RemoveWorker { worker: 1 },
        Change::Requeue {
            task: 1,
            attempt: 1,
            worker: 1,
            why: Requeued::WorkerGone,
        },
        Change::Requeue {
            task: 2,
            attempt: 1,
            worker: 1,
            why: Requeued::WorkerGone,
        },
    ])
    .unwrap();
    assert_eq!(state(&*s, 1), (TaskState::Running, 2, Some(2), None));
    assert_eq!(state(&*s, 2), (TaskState::Queued, 1, None, None));
    assert_eq!(s.recover().unwrap().workers, vec![worker(2)]);
}

fn a_fetch_batch_commits_even_if_one_task_was_cancelled_first<B: Backend>() {
    let (_dir, s) = store::<B>();
    s.apply(&[Change::Submit(task(1)), Change::Submit(task(2))])
        .unwrap();
    s.apply(&[Change::Cancel { task: 1 }]).unwrap();
    let assign = |task| Change::Assign {
        task,
        worker: 5,
        attempt: 1,
    };
    s.apply(&[assign(1), assign(2)]).unwrap();
    assert_eq!(state(&*s, 1).0, TaskState::Cancelled);
    assert_eq!(state(&*s, 2), (TaskState::Running, 1, Some(5), None));
}

fn a_batch_is_all_or_nothing<B: Backend>() {
    let (_dir, s) = store::<B>();
    s.apply(&[Change::Submit(task(1))]).unwrap();
    let batch = [
        Change::Submit(task(2)),
        Change::Cancel { task: 1 },
        Change::Submit(task(1)),
    ];
    assert!(matches!(s.apply(&batch), Err(StoreError::Conflict(_))));
    assert_eq!(
        s.task(2).unwrap(),
        None,
        "the batch's first change was rolled back"
    );
    assert_eq!(state(&*s, 1).0, TaskState::Queued, "and so was the cancel");
}

fn removed_workers_leave_recovery_and_their_ids_are_not_reused<B: Backend>() {
    let (_dir, s) = store::<B>();
    s.apply(&[Change::AddWorker(worker(1)), Change::AddWorker(worker(2))])
        .unwrap();
    s.apply(&[Change::RemoveWorker { worker: 2 }]).unwrap();
    let r: Recovery = s.recover().unwrap();
    assert_eq!(r.workers, vec![worker(1)]);
    // Their tokens still identify them (so their late requests get 410, not 401).
    assert_eq!(r.removed_workers, vec![worker(2)]);
    assert_eq!(r.next_worker_id, 3);
    assert!(matches!(
        s.apply(&[Change::AddWorker(worker(2))]),
        Err(StoreError::Conflict(_))
    ));
}

fn token(id: u64, role: Role) -> TokenRecord {
    TokenRecord {
        id,
        hash: format!("hash-{id}"),
        role,
        groups: if role == Role::Admin {
            vec![]
        } else {
            vec!["g".into()]
        },
        created_ms: 7,
    }
}

fn tokens_are_added_revoked_once_and_recovered_while_in_force<B: Backend>() {
    let (dir, s) = store::<B>();
    s.apply(&[
        Change::AddToken(token(1, Role::Admin)),
        Change::AddToken(token(2, Role::Submitter)),
        Change::AddToken(token(3, Role::Submitter)),
    ])
    .unwrap();
    s.apply(&[Change::RevokeToken { id: 2 }]).unwrap();
    assert!(matches!(
        s.apply(&[Change::RevokeToken { id: 2 }]),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.apply(&[Change::RevokeToken { id: 9 }]),
        Err(StoreError::NotFound(_))
    ));
    // A duplicate id or hash is refused, and its batch leaves nothing behind.
    let dup = Change::AddToken(TokenRecord {
        hash: "hash-1".into(),
        ..token(4, Role::Submitter)
    });
    assert!(matches!(
        s.apply(&[Change::AddToken(token(5, Role::Submitter)), dup]),
        Err(StoreError::Conflict(_))
    ));
    drop(s);
    let s = B::open(&dir);
    let r = s.recover().unwrap();
    assert_eq!(
        r.tokens,
        vec![token(1, Role::Admin), token(3, Role::Submitter)]
    );
    // Ids are never reused, revoked ones included.
    assert_eq!(r.next_token_id, 4);
}

fn tasks_reads_the_existing_ones_among_ids<B: Backend>() {
    let (_dir, s) = store::<B>();
    s.apply(&[
        Change::Submit(task(1)),
        Change::Submit(task(2)),
        Change::Submit(task(3)),
    ])
    .unwrap();
    let mut got: Vec<TaskRecord> = s.tasks(&[3, 1, 99]).unwrap();
    got.sort_by_key(|t| t.id);
    assert_eq!(got, vec![task(1), task(3)]);
    assert!(s.tasks(&[]).unwrap().is_empty());
}

fn a_list_can_be_limited_to_a_set_of_groups<B: Backend>() {
    let (_dir, s) = store::<B>();
    let in_group = |id: u64, g: &str| {
        Change::Submit(TaskRecord {
            group: g.into(),
            ..task(id)
        })
    };
    s.apply(&[
        in_group(1, "a"),
        in_group(2, "b"),
        in_group(3, "c"),
        in_group(4, "a"),
    ])
    .unwrap();
    let ids = |within: Option<Vec<String>>, group: Option<&str>| -> Vec<u64> {
        let filter = ListFilter {
            state: None,
            group: group.map(String::from),
            within,
            after: 0,
            limit: 10,
        };
        s.list(&filter).unwrap().iter().map(|t| t.id).collect()
    };
    let ac = Some(vec!["a".to_string(), "c".to_string()]);
    assert_eq!(ids(None, None), [1, 2, 3, 4]);
    assert_eq!(ids(ac.clone(), None), [1, 3, 4]);
    assert_eq!(ids(ac.clone(), Some("c")), [3]);
    assert_eq!(ids(ac, Some("b")), Vec::<u64>::new());
    assert_eq!(ids(Some(vec![]), None), Vec::<u64>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_share_one_commit_and_a_conflict_fails_only_its_caller() {
    let dir = tempfile::tempdir().unwrap();
    // A store that holds its first commit until the test opens a gate, and records batch sizes.
    let gate = Arc::new(Barrier::new(2));
    let batches = Arc::new(Mutex::new(Vec::new()));
    let store = {
        let (gate, batches, first) = (gate.clone(), batches.clone(), Mutex::new(true));
        Hooked::open(
            dir.path(),
            Box::new(move |changes| {
                if std::mem::replace(&mut *first.lock().unwrap(), false) {
                    gate.wait(); // the test queues more requests meanwhile
                    gate.wait();
                }
                batches.lock().unwrap().push(changes.len());
                Ok(())
            }),
        )
    };
    let (writer, writer_task) = Writer::spawn(store.clone(), 1024, 10_000);
    // The first commit enters the store and is held there.
    let first = tokio::spawn({
        let w = writer.clone();
        async move { w.commit(vec![Change::Submit(task(0))]).await }
    });
    let g = gate.clone();
    tokio::task::spawn_blocking(move || g.wait()).await.unwrap();
    // Meanwhile 100 requests queue up, one of them a duplicate that must fail alone.
    let mut waiting = Vec::new();
    for i in 1..=100u64 {
        let w = writer.clone();
        let id = if i == 50 { 0 } else { i };
        waiting.push(tokio::spawn(async move {
            (i, w.commit(vec![Change::Submit(task(id))]).await)
        }));
    }
    while writer.waiting() < 100 {
        tokio::task::yield_now().await;
    }
    let g = gate.clone();
    tokio::task::spawn_blocking(move || g.wait()).await.unwrap();
    first.await.unwrap().unwrap();
    for w in waiting {
        let (i, result) = w.await.unwrap();
        if i == 50 {
            assert!(matches!(result, Err(StoreError::Conflict(_))), "{result:?}");
        } else {
            result.unwrap();
        }
    }
    let batches = batches.lock().unwrap().clone();
    // The held commit, then one batch of the 100 waiting requests (which failed on the
    // duplicate), then each of the 100 alone.
    assert_eq!(batches[0], 1);
    assert_eq!(batches[1], 100, "{batches:?}");
    assert_eq!(batches.len(), 2 + 100);
    let r = store.recover().unwrap();
    assert_eq!(r.tasks.len(), 100, "tasks 0..=100 except the duplicate");
    assert_eq!(
        writer
            .stats()
            .largest_batch
            .load(std::sync::atomic::Ordering::Relaxed),
        100
    );
    // Dropping the last handle drains the writer and ends its task.
    drop(writer);
    writer_task.await.unwrap();
}

fn a_superseded_requeue_still_records_how_its_attempt_ended<B: Backend>() {
    let dir = B::place();
    let s = B::open(&dir);
    s.apply(&[Change::Submit(task(1))]).unwrap();
    for (attempt, worker) in [(1, 7), (2, 8)] {
        s.apply(&[Change::Assign {
            task: 1,
            worker,
            attempt,
        }])
        .unwrap();
    }
    // Worker 7's give-back of attempt 1 commits after attempt 2 began: the task stays with
    // worker 8, and attempt 1 is recorded as given back.
    s.apply(&[Change::Requeue {
        task: 1,
        attempt: 1,
        worker: 7,
        why: Requeued::GivenBack,
    }])
    .unwrap();
    let t = s.task(1).unwrap().unwrap();
    assert_eq!(
        (t.state, t.attempt, t.worker),
        (TaskState::Running, 2, Some(8))
    );
    let first = s.attempt(1, 1).unwrap().unwrap();
    assert_eq!(
        (first.worker, first.ended),
        (7, Some(AttemptEnd::Requeued(Requeued::GivenBack)))
    );
    // The running attempt has no record of an end yet.
    assert_eq!(s.attempt(1, 2).unwrap(), None);
}

fn keys_starts_and_attempt_ends_follow_the_contract<B: Backend>() {
    let (dir, s) = store::<B>();
    let key = |fingerprint: &str, created_ms| KeyRecord {
        scope: 1,
        key: "k".into(),
        fingerprint: fingerprint.into(),
        ids: vec![1],
        created_ms,
    };
    let remember = |k, expired_before_ms| Change::Remember {
        key: k,
        expired_before_ms,
    };
    s.apply(&[Change::Submit(task(1)), remember(key("a", 1_000), 0)])
        .unwrap();
    // A live key is taken: the submission it came with is rolled back with it.
    assert!(matches!(
        s.apply(&[Change::Submit(task(2)), remember(key("b", 2_000), 500)]),
        Err(StoreError::Conflict(_))
    ));
    assert!(s.task(2).unwrap().is_none());
    // An expired one is replaced.
    s.apply(&[remember(key("b", 3_000), 2_000)]).unwrap();
    assert_eq!(s.key(1, "k").unwrap().unwrap().fingerprint, "b");
    assert_eq!(s.key(2, "k").unwrap(), None, "keys are per scope");
    s.apply(&[Change::ForgetKeys { before_ms: 3_001 }]).unwrap();
    assert_eq!(s.key(1, "k").unwrap(), None);
    // Starts only count up.
    s.apply(&[Change::Boot { boot: 1 }]).unwrap();
    s.apply(&[Change::Boot { boot: 2 }]).unwrap();
    assert!(matches!(
        s.apply(&[Change::Boot { boot: 2 }]),
        Err(StoreError::Conflict(_))
    ));
    // Attempts: none while running; the end of each, with its worker and outcome.
    s.apply(&[Change::AddWorker(worker(7)), Change::Submit(task(3))])
        .unwrap();
    let assign = |task, attempt| Change::Assign {
        task,
        worker: 7,
        attempt,
    };
    s.apply(&[assign(1, 1), assign(3, 1)]).unwrap();
    assert_eq!(s.attempt(1, 1).unwrap(), None);
    s.apply(&[
        Change::Fail {
            task: 1,
            attempt: 1,
            message: "boom".into(),
        },
        Change::Cancel { task: 3 },
    ])
    .unwrap();
    let ended = |t, a| {
        let r = s.attempt(t, a).unwrap().unwrap();
        (r.worker, r.ended, r.outcome)
    };
    assert_eq!(
        ended(1, 1),
        (7, Some(AttemptEnd::Failed), Some("boom".into()))
    );
    assert_eq!(ended(3, 1), (7, Some(AttemptEnd::Cancelled), None));
    // A finish after a requeue: each attempt reads back its own end, and an attempt that
    // never ran has none.
    s.apply(&[Change::Submit(task(4)), assign(4, 1)]).unwrap();
    s.apply(&[Change::Requeue {
        task: 4,
        attempt: 1,
        worker: 7,
        why: Requeued::WorkerGone,
    }])
    .unwrap();
    s.apply(&[assign(4, 2)]).unwrap();
    s.apply(&[Change::Finish {
        task: 4,
        attempt: 2,
        result: Some("done".into()),
    }])
    .unwrap();
    assert_eq!(
        ended(4, 1),
        (7, Some(AttemptEnd::Requeued(Requeued::WorkerGone)), None)
    );
    assert_eq!(
        ended(4, 2),
        (7, Some(AttemptEnd::Finished), Some("done".into()))
    );
    assert_eq!(s.attempt(4, 3).unwrap(), None);
    drop(s);
    // All of it durable.
    let s = B::open(&dir);
    assert_eq!(s.recover().unwrap().boot, 2);
    assert_eq!(
        s.attempt(1, 1).unwrap().unwrap().outcome.as_deref(),
        Some("boom")
    );
}

fn reserved_ids_are_fresh_disjoint_and_durable<B: Backend>() {
    let (dir, s) = store::<B>();
    s.apply(&[Change::Submit(task(5)), Change::AddWorker(worker(2))])
        .unwrap();
    let a = s.reserve(IdKind::Task, 10).unwrap();
    assert_eq!(a, 6..16, "above every stored id");
    // Concurrent reservations (two coordinators on one store) never overlap.
    let got: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| s.reserve(IdKind::Task, 100).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all: Vec<u64> = got
        .iter()
        .flat_map(|r| r.clone())
        .chain(a.clone())
        .collect();
    all.sort_unstable();
    let n = all.len();
    all.dedup();
    assert_eq!(all.len(), n, "overlapping reservations: {got:?}");
    // Each kind has its own sequence.
    assert_eq!(s.reserve(IdKind::Worker, 1).unwrap(), 3..4);
    assert_eq!(s.reserve(IdKind::Token, 2).unwrap(), 1..3);
    drop(s);
    let s = B::open(&dir);
    let after = s.reserve(IdKind::Task, 1).unwrap();
    assert!(
        after.start >= 416,
        "reservations survive reopening: {after:?}"
    );
}

fn a_recovery_can_be_limited_to_some_groups<B: Backend>() {
    let (_dir, s) = store::<B>();
    let in_group = |id: u64, group: &str| TaskRecord {
        group: group.into(),
        ..task(id)
    };
    let serving = |id: u64, groups: &[&str]| WorkerRecord {
        groups: groups.iter().map(|g| g.to_string()).collect(),
        ..worker(id)
    };
    s.apply(&[
        Change::Submit(in_group(1, "a")),
        Change::Submit(in_group(2, "b")),
        Change::Submit(in_group(3, "a")),
        Change::AddWorker(serving(1, &["a"])),
        Change::AddWorker(serving(2, &["b", "c"])),
        Change::AddWorker(serving(3, &["c", "a"])),
    ])
    .unwrap();
    let r = s.recover_groups(Some(&["a".to_string()])).unwrap();
    assert_eq!(r.tasks.iter().map(|t| t.id).collect::<Vec<_>>(), [1, 3]);
    assert_eq!(r.workers.iter().map(|w| w.id).collect::<Vec<_>>(), [1, 3]);
    assert_eq!(r.next_task_id, 4, "ids as for a whole recovery");
    let all = s.recover().unwrap();
    assert_eq!((all.tasks.len(), all.workers.len()), (3, 3));
    assert!(s.recover_groups(Some(&[])).unwrap().tasks.is_empty());
}

fn changes_of_one_kind_in_a_row_are_judged_one_by_one<B: Backend>() {
    // Backends may apply a row of changes of one kind together (PostgreSQL does); each is
    // still judged alone, in order, and one refusal rolls the whole batch back.
    let (_dir, s) = store::<B>();
    s.apply(&[
        Change::AddWorker(worker(1)),
        Change::Submit(task(1)),
        Change::Submit(task(2)),
        Change::Submit(task(3)),
    ])
    .unwrap();
    let twice = s.apply(&[Change::Submit(task(4)), Change::Submit(task(4))]);
    assert!(matches!(twice, Err(StoreError::Conflict(_))), "{twice:?}");
    assert!(s.task(4).unwrap().is_none(), "rolled back with its batch");
    let assign = |task, attempt| Change::Assign {
        task,
        worker: 1,
        attempt,
    };
    // The same task twice in a row: the higher attempt wins, as in any order.
    s.apply(&[assign(1, 1), assign(2, 1), assign(1, 2)])
        .unwrap();
    assert_eq!(state(&*s, 1), (TaskState::Running, 2, Some(1), None));
    assert_eq!(state(&*s, 2).1, 1);
    // A stale assignment in a row of good ones refuses the batch.
    let stale = s.apply(&[assign(3, 1), assign(2, 1)]);
    assert!(matches!(stale, Err(StoreError::Conflict(_))), "{stale:?}");
    assert_eq!(state(&*s, 3), (TaskState::Queued, 0, None, None));
    // Finishes and failures in a row; a report of a superseded attempt refuses its batch.
    let finish = |task, attempt| Change::Finish {
        task,
        attempt,
        result: Some(format!("r{task}")),
    };
    let stale = s.apply(&[finish(2, 1), finish(1, 1)]);
    assert!(matches!(stale, Err(StoreError::Conflict(_))), "{stale:?}");
    assert_eq!(state(&*s, 2).0, TaskState::Running);
    s.apply(&[
        finish(1, 2),
        Change::Fail {
            task: 2,
            attempt: 1,
            message: "no".into(),
        },
    ])
    .unwrap();
    assert_eq!(
        state(&*s, 1),
        (TaskState::Finished, 2, Some(1), Some("r1".into()))
    );
    assert_eq!(
        state(&*s, 2),
        (TaskState::Failed, 1, Some(1), Some("no".into()))
    );
    let ended = |task, attempt| s.attempt(task, attempt).unwrap().unwrap().ended;
    assert_eq!(ended(1, 2), Some(AttemptEnd::Finished));
    assert_eq!(ended(2, 1), Some(AttemptEnd::Failed));
    // A missing task in a row is not found.
    let missing = s.apply(&[assign(3, 1), assign(99, 1)]);
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
}

/// Runs every conformance test against a backend.
macro_rules! conformance {
    ($backend:ident: $ty:ty) => {
        mod $backend {
            use super::*;

            #[test]
            fn a_task_goes_through_its_life_and_recovery_sees_only_live_tasks() {
                super::a_task_goes_through_its_life_and_recovery_sees_only_live_tasks::<$ty>()
            }

            #[test]
            fn committed_changes_survive_reopening() {
                super::committed_changes_survive_reopening::<$ty>()
            }

            #[test]
            fn fenced_changes_refuse_a_stale_attempt_and_change_nothing() {
                super::fenced_changes_refuse_a_stale_attempt_and_change_nothing::<$ty>()
            }

            #[test]
            fn a_departure_and_a_late_assign_end_the_same_in_either_order() {
                super::a_departure_and_a_late_assign_end_the_same_in_either_order::<$ty>()
            }

            #[test]
            fn a_departure_batch_commits_even_if_another_worker_took_a_task_first() {
                super::a_departure_batch_commits_even_if_another_worker_took_a_task_first::<$ty>()
            }

            #[test]
            fn a_fetch_batch_commits_even_if_one_task_was_cancelled_first() {
                super::a_fetch_batch_commits_even_if_one_task_was_cancelled_first::<$ty>()
            }

            #[test]
            fn a_batch_is_all_or_nothing() {
                super::a_batch_is_all_or_nothing::<$ty>()
            }

            #[test]
            fn removed_workers_leave_recovery_and_their_ids_are_not_reused() {
                super::removed_workers_leave_recovery_and_their_ids_are_not_reused::<$ty>()
            }

            #[test]
            fn tokens_are_added_revoked_once_and_recovered_while_in_force() {
                super::tokens_are_added_revoked_once_and_recovered_while_in_force::<$ty>()
            }

            #[test]
            fn tasks_reads_the_existing_ones_among_ids() {
                super::tasks_reads_the_existing_ones_among_ids::<$ty>()
            }

            #[test]
            fn a_list_can_be_limited_to_a_set_of_groups() {
                super::a_list_can_be_limited_to_a_set_of_groups::<$ty>()
            }

            #[test]
            fn a_superseded_requeue_still_records_how_its_attempt_ended() {
                super::a_superseded_requeue_still_records_how_its_attempt_ended::<$ty>()
            }

            #[test]
            fn keys_starts_and_attempt_ends_follow_the_contract() {
                super::keys_starts_and_attempt_ends_follow_the_contract::<$ty>()
            }

            #[test]
            fn reserved_ids_are_fresh_disjoint_and_durable() {
                super::reserved_ids_are_fresh_disjoint_and_durable::<$ty>()
            }

            #[test]
            fn changes_of_one_kind_in_a_row_are_judged_one_by_one() {
                super::changes_of_one_kind_in_a_row_are_judged_one_by_one::<$ty>()
            }

            #[test]
            fn a_recovery_can_be_limited_to_some_groups() {
                super::a_recovery_can_be_limited_to_some_groups::<$ty>()
            }
        }
    };
}

conformance!(sqlite: Sqlite);
conformance!(postgres: Postgres);

//! Restart recovery: workers first, then tasks; running tasks keep a registered worker and are
//! queued again (with a change to commit) when theirs is gone; aging resumes from the stored
//! submission time.

mod common;

use std::sync::Arc;

use switchyard::{Config, Dispatcher, Mode, Strategy, TaskId, TaskStatus, WorkerId};
use switchyard_server::recovery::recover;
use switchyard_server::store::{Change, Requeued, Store, TaskRecord, TaskState, WorkerRecord};

fn task(id: u64, submitted_ms: i64, priority: i32) -> TaskRecord {
    TaskRecord {
        id,
        group: "g".into(),
        tags: vec![],
        priority,
        payload: vec![],
        state: TaskState::Queued,
        attempt: 0,
        worker: None,
        outcome: None,
        submitted_ms,
    }
}

fn worker(id: u64) -> WorkerRecord {
    WorkerRecord {
        id,
        groups: vec!["g".into()],
        tags: vec![],
        token_hash: String::new(),
    }
}

/// A store as a crashed coordinator left it: workers 1 and 2 (2 has since been removed), task 1
/// finished, task 2 running on worker 1, task 3 running on the removed worker 2, tasks 4 and 5
/// queued.
fn crashed_store(dir: &std::path::Path) -> Arc<dyn Store> {
    let s = common::open_store(dir);
    let mut changes = vec![Change::AddWorker(worker(1)), Change::AddWorker(worker(2))];
    changes.extend((1..=5).map(|i| Change::Submit(task(i, 1_000 * i as i64, 0))));
    changes.extend([
        Change::Assign {
            task: 1,
            worker: 1,
            attempt: 1,
        },
        Change::Finish {
            task: 1,
            attempt: 1,
            result: None,
        },
        Change::Assign {
            task: 2,
            worker: 1,
            attempt: 1,
        },
        Change::Assign {
            task: 3,
            worker: 2,
            attempt: 1,
        },
        Change::Requeue {
            task: 3,
            attempt: 1,
            worker: 2,
            why: Requeued::WorkerGone,
        },
        Change::Assign {
            task: 3,
            worker: 2,
            attempt: 2,
        },
        Change::RemoveWorker { worker: 2 },
    ]);
    s.apply(&changes).unwrap();
    s
}

#[test]
fn recovery_registers_workers_before_placing_tasks_in_every_mode() {
    let modes = [
        Mode::Fanout,
        Mode::Balanced(Strategy::LeastLoaded),
        Mode::Balanced(Strategy::RoundRobin),
        Mode::Balanced(Strategy::PowerOfTwoChoices),
    ];
    for mode in modes {
        let dir = tempfile::tempdir().unwrap();
        let store = crashed_store(dir.path());
        let d = Dispatcher::new(Config {
            mode,
            ..Config::default()
        })
        .unwrap();
        let r = recover(&store.recover().unwrap(), &d, 10_000).unwrap();
        assert_eq!((r.workers, r.queued, r.running), (1, 3, 1), "{mode:?}");
        let stored = store.recover().unwrap();
        assert_eq!((stored.next_task_id, stored.next_worker_id), (6, 3));
        // Task 3 ran on the removed worker: queued again, and the store is told.
        assert_eq!(
            r.requeued,
            vec![Change::Requeue {
                task: 3,
                attempt: 2,
                worker: 2,
                why: Requeued::WorkerGone,
            }]
        );
        store.apply(&r.requeued).unwrap();
        assert_eq!(
            d.get(TaskId(2)).unwrap().status,
            TaskStatus::Running(WorkerId(1))
        );
        for id in [3, 4, 5] {
            // Placed on the live worker, not parked: workers came first.
            assert_eq!(
                d.get(TaskId(id)).unwrap().status,
                TaskStatus::Queued(vec![WorkerId(1)])
            );
        }
        d.audit().unwrap();
        // Attempts continue: task 3's next assignment is attempt 3, and task 2's report for
        // attempt 1 is still accepted.
        let got = d.fetch(WorkerId(1), 10).unwrap();
        let t3 = got.iter().find(|a| a.task == TaskId(3)).unwrap();
        assert_eq!(t3.attempt, 3);
        d.complete(WorkerId(1), TaskId(2), 1).unwrap();
    }
}

#[test]
fn recovery_restores_how_long_tasks_waited_for_aging() {
    let dir = tempfile::tempdir().unwrap();
    let s = common::open_store(dir.path());
    // Task 1 (priority 0) was submitted 100 s before task 2 (priority 50).
    s.apply(&[
        Change::AddWorker(worker(1)),
        Change::Submit(task(1, 0, 0)),
        Change::Submit(task(2, 100_000, 50)),
    ])
    .unwrap();
    let aging = |rate: f64| {
        let d = Dispatcher::new(Config {
            mode: Mode::Balanced(Strategy::LeastLoaded),
            aging_rate: rate,
            ..Config::default()
        })
        .unwrap();
        recover(&s.recover().unwrap(), &d, 100_000).unwrap();
        d.fetch(WorkerId(1), 2)
            .unwrap()
            .iter()
            .map(|a| a.task.0)
            .collect::<Vec<_>>()
    };
    // At 1 unit/s, task 1 has gained 100 units: it overtakes task 2. Without aging it does not.
    assert_eq!(aging(1.0), [1, 2]);
    assert_eq!(aging(0.0), [2, 1]);
}

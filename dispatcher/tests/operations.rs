//! One test (or a few) per operation, in both modes and for every strategy.

// The normal build only: the loom build (`--cfg switchyard_loom`) runs `loom-tests/`.
#![cfg(not(switchyard_loom))]

mod common;

use std::time::Duration;

use common::{assert_counters_agree, ids};
use switchyard::{
    Cancelled, Config, Dispatcher, Mode, SeedTask, Strategy, TaskId, TaskSpec, TaskStatus, Was,
    WorkerId,
};

const W1: WorkerId = WorkerId(1);
const W2: WorkerId = WorkerId(2);
const W3: WorkerId = WorkerId(3);
const NO_TAGS: &[&str] = &[];

fn fanout() -> Dispatcher {
    Dispatcher::new(Config::default()).unwrap()
}

fn balanced(s: Strategy) -> Dispatcher {
    Dispatcher::new(Config::balanced(s)).unwrap()
}

const STRATEGIES: [Strategy; 3] = [
    Strategy::LeastLoaded,
    Strategy::RoundRobin,
    Strategy::PowerOfTwoChoices,
];

/// A dispatcher in each mode, each with a guard that names its mode if an assertion fails
/// while the guard is alive (bind it: `for (d, _mode) in all_modes()`).
fn all_modes() -> Vec<(Dispatcher, InMode)> {
    let mut v = vec![fanout()];
    v.extend(STRATEGIES.map(balanced));
    v.into_iter()
        .map(|d| {
            let mode = d.config().mode;
            (d, InMode(mode))
        })
        .collect()
}

/// Says which mode a test was in when it panicked.
struct InMode(Mode);

impl Drop for InMode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("(the failure above was in mode {:?})", self.0);
        }
    }
}

fn task(id: u64) -> TaskSpec {
    TaskSpec::new(id, "g")
}

fn fetched(d: &Dispatcher, w: WorkerId, max: usize) -> Vec<u64> {
    d.fetch(w, max).unwrap().iter().map(|a| a.task.0).collect()
}

fn holders(d: &Dispatcher, id: u64) -> Vec<WorkerId> {
    match d.get(TaskId(id)).unwrap().status {
        TaskStatus::Queued(mut h) => {
            h.sort();
            h
        }
        other => panic!("task {id} is {other:?}, not queued"),
    }
}

#[test]
fn fetch_returns_highest_priority_first_and_fifo_among_equals() {
    for (d, _mode) in all_modes() {
        d.register(W1, &["g"], NO_TAGS).unwrap();
        for (id, p) in [(1, 0), (2, 5), (3, 0), (4, 9), (5, 5), (6, -3)] {
            d.submit(task(id).priority(p)).unwrap();
        }
        assert_eq!(fetched(&d, W1, 4), [4, 2, 5, 1]);
        assert_eq!(fetched(&d, W1, 10), [3, 6]);
        assert_eq!(fetched(&d, W1, 10), Vec::<u64>::new());
        assert_counters_agree(&d, ids(1..7));
    }
}

#[test]
fn fetch_of_zero_returns_nothing_and_claims_nothing() {
    let d = fanout();
    d.register(W1, &["g"], NO_TAGS).unwrap();
    d.submit(task(1)).unwrap();
    assert!(d.fetch(W1, 0).unwrap().is_empty());
    assert_eq!(holders(&d, 1), [W1]);
}

#[test]
fn candidates_serve_the_group_and_have_every_tag() {
    for (d, _mode) in all_modes() {
        d.register(W1, &["g"], &["gpu", "x86"]).unwrap();
        d.register(W2, &["g"], &["x86"]).unwrap();
        d.register(W3, &["other"], &["gpu", "x86"]).unwrap();
        d.submit(task(1).tags(["gpu", "x86"])).unwrap();
        assert_eq!(holders(&d, 1), [W1], "{:?}", d.config().mode);
        d.submit(task(2).tags(["gpu", "arm"])).unwrap();
        assert_eq!(d.get(TaskId(2)).unwrap().status, TaskStatus::Parked);
        d.submit(TaskSpec::new(3, "other")).unwrap();
        assert_eq!(holders(&d, 3), [W3]);
        assert_counters_agree(&d, ids(1..4));
    }
}

#[test]
fn fanout_gives_every_candidate_the_task_and_the_first_fetch_claims_it() {
    let d = fanout();
    for w in [W1, W2, W3] {
        d.register(w, &["g"], NO_TAGS).unwrap();
    }
    d.submit(task(1)).unwrap();
    assert_eq!(holders(&d, 1), [W1, W2, W3]);
    assert_eq!(
        d.stats()
            .workers
            .iter()
            .map(|w| w.queued)
            .collect::<Vec<_>>(),
        [1, 1, 1]
    );
    let a = d.fetch(W2, 1).unwrap();
    assert_eq!((a[0].task, a[0].attempt), (TaskId(1), 1));
    // The task left every candidate at once: all three counters dropped, nothing is left.
    let s = d.stats();
    assert_eq!(
        s.workers
            .iter()
            .map(|w| (w.queued, w.running))
            .collect::<Vec<_>>(),
        [(0, 0), (0, 1), (0, 0)]
    );
    assert_eq!((s.tombstones, s.counters.claimed), (0, 1));
    assert!(d.fetch(W1, 5).unwrap().is_empty());
    assert!(d.fetch(W3, 5).unwrap().is_empty());
    assert_counters_agree(&d, ids(1..2));
}

#[test]
fn fanout_fetch_takes_the_best_head_over_every_class_the_worker_serves() {
    let d = fanout();
    d.register(W1, &["g", "h"], &["a", "b"]).unwrap();
    d.register(W2, &["g"], &["a"]).unwrap();
    d.submit(task(1).tags(["a"]).priority(1)).unwrap();
    d.submit(task(2).tags(["a", "b"]).priority(5)).unwrap();
    d.submit(TaskSpec::new(3, "h").priority(3)).unwrap();
    d.submit(task(4).priority(3)).unwrap();
    // W1 serves all four classes: global priority order, FIFO among the two 3s.
    assert_eq!(fetched(&d, W1, 2), [2, 3]);
    // W2 serves only (g, {a}) and (g, {}): 4 outranks 1.
    assert_eq!(fetched(&d, W2, 5), [4, 1]);
    assert!(d.fetch(W1, 5).unwrap().is_empty());
    assert_counters_agree(&d, ids(1..5));
}

#[test]
fn fanout_class_heaps_compact_on_push_when_removals_leave_them_sparse() {
    let d = fanout();
    d.register(W1, &["g"], NO_TAGS).unwrap();
    d.register(W2, &["g"], NO_TAGS).unwrap();
    d.submit_many((0..200).map(task)).unwrap();
    for i in 0..200 {
        d.cancel(TaskId(i)).unwrap(); // lazy deletion: 200 dead entries stay in the class heap
    }
    assert_eq!(d.stats().tombstones, 200);
    d.submit(task(1000)).unwrap(); // the push finds the heap sparse and rebuilds it
    let s = d.stats();
    assert_eq!((s.tombstones, s.counters.stale_skipped), (0, 200));
    assert_eq!(fetched(&d, W2, 10), [1000]);
    assert_counters_agree(&d, ids(0..1001));
}

#[test]
fn balanced_heaps_compact_on_push_when_tombstones_outnumber_live_copies() {
    let d = balanced(Strategy::RoundRobin);
    d.register(W1, &["g"], NO_TAGS).unwrap();
    d.submit_many((0..200).map(task)).unwrap();
    for i in 0..200 {
        d.cancel(TaskId(i)).unwrap(); // lazy deletion: 200 dead copies stay in W1's heap
    }
    assert_eq!(d.stats().tombstones, 200);
    d.submit(task(1000)).unwrap(); // the push finds the heap sparse and rebuilds it
    let s = d.stats();
    assert_eq!((s.tombstones, s.counters.stale_skipped), (0, 200));
    assert_eq!(fetched(&d, W1, 10), [1000]);
}

#[test]
fn parked_tasks_are_placed_when_a_matching_worker_registers() {
    for (d, _mode) in all_modes() {
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.submit(task(1).tags(["gpu"])).unwrap();
        d.submit(task(2).tags(["gpu", "big"])).unwrap();
        d.submit(TaskSpec::new(3, "h")).unwrap();
        assert_eq!(d.stats().parked, 3);
        let r = d.register(W2, &["g"], &["gpu"]).unwrap();
        assert_eq!(r.backfilled + r.unparked, 1, "{:?}", d.config().mode);
        assert_eq!(holders(&d, 1), [W2]);
        assert_eq!(d.stats().parked, 2);
        d.register(W3, &["g", "h"], &["gpu", "big"]).unwrap();
        assert_eq!(d.stats().parked, 0);
        assert_eq!(holders(&d, 3), [W3]);
        assert_counters_agree(&d, ids(1..4));
        assert_eq!(
            fetched(&d, W3, 10).len(),
            if d.config().mode == Mode::Fanout {
                3
            } else {
                2
            }
        );
    }
}

#[test]
fn fanout_backfills_a_new_worker_with_every_queued_task_it_can_run() {
    let d = fanout();
    d.register(W1, &["g"], &["a"]).unwrap();
    d.submit_many((1..=5).map(|i| task(i).tags(["a"]))).unwrap();
    d.submit(TaskSpec::new(6, "h")).unwrap(); // parked
    let a = d.fetch(W1, 1).unwrap(); // task 1 is running, not backfilled
    assert_eq!(a[0].task, TaskId(1));
    let r = d.register(W2, &["g", "h"], &["a"]).unwrap();
    assert_eq!((r.backfilled, r.unparked), (5, 0)); // 2..=5 and the parked 6
    assert_eq!(fetched(&d, W2, 10), [2, 3, 4, 5, 6]);
    assert!(d.fetch(W1, 10).unwrap().is_empty());
    assert_counters_agree(&d, ids(1..7));
}

#[test]
fn balanced_unregister_requeues_each_queued_task_exactly_once() {
    for s in STRATEGIES {
        let d = balanced(s);
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.submit_many((0..50).map(|i| task(i).priority((i % 7) as i32)))
            .unwrap();
        d.register(W2, &["g"], NO_TAGS).unwrap();
        d.register(W3, &["g"], NO_TAGS).unwrap();
        let dep = d.unregister(W1).unwrap();
        let mut moved: Vec<u64> = dep.tasks.iter().map(|r| r.task.0).collect();
        moved.sort();
        assert_eq!(moved, (0..50).collect::<Vec<_>>(), "{s:?}");
        for r in &dep.tasks {
            assert_eq!(r.was, Was::Queued);
            let TaskStatus::Queued(to) = &r.now else {
                panic!("{r:?}")
            };
            assert_eq!(to.len(), 1);
            assert_eq!(holders(&d, r.task.0), *to);
        }
        assert_counters_agree(&d, ids(0..50));
        // Both survivors got work, with priorities kept: each fetches its own tasks in order.
        let mut all = Vec::new();
        for w in [W2, W3] {
            let got = d.fetch(w, 100).unwrap();
            assert!(got.windows(2).all(|p| p[0].priority >= p[1].priority));
            all.extend(got.iter().map(|a| a.task.0));
        }
        all.sort();
        assert_eq!(all, (0..50).collect::<Vec<_>>());
    }
}

#[test]
fn unregister_requeues_running_tasks_as_a_new_attempt_and_fences_the_old_one() {
    for (d, _mode) in all_modes() {
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.register(W2, &["g"], NO_TAGS).unwrap();
        d.submit(task(1)).unwrap();
        let w = if holders(&d, 1).contains(&W1) { W1 } else { W2 };
        let other = if w == W1 { W2 } else { W1 };
        let a = d.fetch(w, 1).unwrap()[0];
        assert_eq!(a.attempt, 1);
        let dep = d.unregister(w).unwrap();
        assert_eq!(dep.tasks.len(), 1);
        assert_eq!(dep.tasks[0].was, Was::Running(1));
        assert_eq!(dep.tasks[0].now, TaskStatus::Queued(vec![other]));
        let b = d.fetch(other, 1).unwrap()[0];
        assert_eq!((b.task, b.attempt), (TaskId(1), 2));
        assert!(matches!(
            d.complete(other, TaskId(1), 1),
            Err(switchyard::Error::StaleAttempt { attempt: 1, .. })
        ));
        d.complete(other, TaskId(1), 2).unwrap();
        assert!(d.get(TaskId(1)).is_none());
        assert_counters_agree(&d, ids(1..2));
    }
}

#[test]
fn departing_last_candidate_parks_its_tasks_until_a_new_one_registers() {
    for (d, _mode) in all_modes() {
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.submit_many((0..3).map(task)).unwrap();
        d.fetch(W1, 1).unwrap();
        let dep = d.unregister(W1).unwrap();
        assert_eq!(dep.tasks.len(), 3);
        assert!(dep.tasks.iter().all(|r| r.now == TaskStatus::Parked));
        assert_eq!(d.stats().parked, 3);
        d.register(W2, &["g"], NO_TAGS).unwrap();
        assert_eq!(d.stats().parked, 0);
        let got = d.fetch(W2, 10).unwrap();
        assert_eq!(
            got.iter()
                .map(|a| (a.task.0, a.attempt))
                .collect::<Vec<_>>(),
            [(0, 2), (1, 1), (2, 1)]
        );
        assert_counters_agree(&d, ids(0..3));
    }
}

#[test]
fn fanout_unregister_leaves_tasks_with_their_other_holders() {
    let d = fanout();
    d.register(W1, &["g"], NO_TAGS).unwrap();
    d.register(W2, &["g"], NO_TAGS).unwrap();
    d.submit(task(1)).unwrap();
    let dep = d.unregister(W1).unwrap();
    assert_eq!(dep.tasks[0].now, TaskStatus::Queued(vec![W2]));
    assert_eq!(holders(&d, 1), [W2]);
    assert_counters_agree(&d, ids(1..2));
}

#[test]
fn seeding_places_every_queued_task_exactly_once() {
    for (d, _mode) in all_modes() {
        for w in [W1, W2, W3] {
            d.register(w, &["g"], NO_TAGS).unwrap();
        }
        let n = d
            .seed((0..30).map(|i| SeedTask {
                spec: task(i),
                attempt: 2,
                running_on: None,
            }))
            .unwrap();
        assert_eq!(n, 30);
        for i in 0..30 {
            let h = holders(&d, i);
            match d.config().mode {
                Mode::Fanout => assert_eq!(h, [W1, W2, W3]),
                Mode::Balanced(_) => assert_eq!(h.len(), 1),
            }
        }
        if let Mode::Balanced(_) = d.config().mode {
            let loads: Vec<usize> = d.stats().workers.iter().map(|w| w.queued).collect();
            assert_eq!(loads.iter().sum::<usize>(), 30);
        }
        assert_counters_agree(&d, ids(0..30));
        // Seeded attempts continue: the next assignment is attempt 3.
        let mut all = Vec::new();
        for w in [W1, W2, W3] {
            all.extend(d.fetch(w, 100).unwrap());
        }
        assert_eq!(all.len(), 30);
        assert!(all.iter().all(|a| a.attempt == 3));
    }
}

#[test]
fn seeding_restores_running_tasks_on_registered_workers_and_requeues_the_rest() {
    for (d, _mode) in all_modes() {
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.seed([
            SeedTask {
                spec: task(1),
                attempt: 4,
                running_on: Some(W1),
            },
            SeedTask {
                spec: task(2),
                attempt: 2,
                running_on: Some(WorkerId(99)),
            },
        ])
        .unwrap();
        assert_eq!(d.get(TaskId(1)).unwrap().status, TaskStatus::Running(W1));
        assert_eq!(holders(&d, 2), [W1]);
        assert_counters_agree(&d, ids(1..3));
        d.complete(W1, TaskId(1), 4).unwrap();
        assert_eq!(d.fetch(W1, 5).unwrap()[0].attempt, 3);
        // A restored running task is redistributed when its worker leaves.
        d.seed([SeedTask {
            spec: task(5),
            attempt: 1,
            running_on: Some(W1),
        }])
        .unwrap();
        d.register(W2, &["g"], NO_TAGS).unwrap();
        let dep = d.unregister(W1).unwrap();
        assert!(dep
            .tasks
            .iter()
            .any(|r| r.task == TaskId(5) && r.was == Was::Running(1)));
        assert_counters_agree(&d, ids(1..6));
    }
}

#[test]
fn equal_loads_spread_evenly_over_candidates() {
    const K: u64 = 4;
    const N: u64 = 25;
    for s in STRATEGIES {
        let d = balanced(s);
        for w in 0..K {
            d.register(WorkerId(w), &["g"], NO_TAGS).unwrap();
        }
        d.submit_many((0..N * K).map(task)).unwrap();
        let loads: Vec<usize> = d.stats().workers.iter().map(|w| w.queued).collect();
        match s {
            // Deterministic strategies split exactly.
            Strategy::LeastLoaded | Strategy::RoundRobin => {
                assert_eq!(loads, vec![N as usize; K as usize], "{s:?}")
            }
            // Two random choices keep the spread within a couple of tasks.
            Strategy::PowerOfTwoChoices => {
                let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
                assert!(max - min <= 3, "{s:?}: {loads:?}");
            }
        }
        assert_counters_agree(&d, ids(0..N * K));
    }
}

#[test]
fn least_loaded_breaks_ties_round_robin_not_by_candidate_order() {
    let d = balanced(Strategy::LeastLoaded);
    for w in [W1, W2, W3] {
        d.register(w, &["g"], NO_TAGS).unwrap();
    }
    // Each task is fetched at once, so every worker always has load 0 or 1 running...
    let mut got = Vec::new();
    for i in 0..6 {
        d.submit(task(i)).unwrap();
        let h = holders(&d, i)[0];
        got.push(h);
        let a = d.fetch(h, 1).unwrap()[0];
        d.complete(h, a.task, a.attempt).unwrap();
    }
    // ...and ties rotate over all three rather than always picking the first listed.
    for w in [W1, W2, W3] {
        assert_eq!(got.iter().filter(|&&x| x == w).count(), 2, "{got:?}");
    }
}

#[test]
fn least_loaded_counts_running_tasks_by_their_weight() {
    let mut cfg = Config::balanced(Strategy::LeastLoaded);
    cfg.running_weight = 3.0;
    let d = Dispatcher::new(cfg).unwrap();
    d.register(W1, &["g"], NO_TAGS).unwrap();
    d.submit(task(0)).unwrap();
    d.fetch(W1, 1).unwrap(); // W1: 1 running × 3 = load 3
    d.register(W2, &["g"], NO_TAGS).unwrap();
    // W2 (load 0, 1, 2) is strictly less loaded than W1 (3) for three tasks...
    d.submit_many((1..=3).map(task)).unwrap();
    assert!((1..=3).all(|i| holders(&d, i) == [W2]));
    // ...then the loads tie at 3: one of the next two goes to each, whichever way the tie went.
    d.submit_many((4..=5).map(task)).unwrap();
    let mut next: Vec<WorkerId> = (4..=5).map(|i| holders(&d, i)[0]).collect();
    next.sort();
    assert_eq!(next, [W1, W2]);
    assert_counters_agree(&d, ids(0..6));
}

#[test]
fn candidate_lists_follow_workers_joining_and_leaving() {
    let d = balanced(Strategy::RoundRobin);
    d.register(W1, &["g"], &["a"]).unwrap();
    d.submit(task(1).tags(["a"])).unwrap();
    assert_eq!(holders(&d, 1), [W1]);
    d.register(W2, &["g"], &["a"]).unwrap();
    d.submit_many((2..6).map(|i| task(i).tags(["a"]))).unwrap();
    let on: Vec<Vec<WorkerId>> = (2..6).map(|i| holders(&d, i)).collect();
    assert!(on.contains(&vec![W1]) && on.contains(&vec![W2]), "{on:?}");
    d.unregister(W1).unwrap();
    d.submit(task(6).tags(["a"])).unwrap();
    d.submit(task(7).tags(["a"])).unwrap();
    assert_eq!(holders(&d, 6), [W2]);
    assert_eq!(holders(&d, 7), [W2]);
    d.unregister(W2).unwrap();
    d.submit(task(8).tags(["a"])).unwrap();
    assert_eq!(d.get(TaskId(8)).unwrap().status, TaskStatus::Parked);
    // Re-registering an id that left is a fresh worker.
    d.register(W1, &["g"], &["a", "b"]).unwrap();
    assert_eq!(d.stats().parked, 0);
    assert_counters_agree(&d, ids(1..9));
}

#[test]
fn rebalance_moves_queued_tasks_until_loads_are_within_the_ratio() {
    for s in STRATEGIES {
        // Ratio 1: move while the source has at least two more than the target.
        let d = Dispatcher::new(Config {
            rebalance_ratio: 1.0,
            ..Config::balanced(s)
        })
        .unwrap();
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.submit_many((0..60).map(|i| task(i).priority(i as i32)))
            .unwrap();
        d.register(W2, &["g"], NO_TAGS).unwrap();
        d.register(W3, &["g"], &["other"]).unwrap();
        let moved = d.rebalance();
        let loads: Vec<usize> = d.stats().workers.iter().map(|w| w.queued).collect();
        assert_eq!(moved, 40, "{s:?}: {loads:?}");
        assert_eq!(loads, [20, 20, 20]);
        assert_eq!(d.stats().counters.rebalance_moves, 40);
        // The most urgent tasks stayed at the head of W1.
        assert_eq!(d.fetch(W1, 1).unwrap()[0].task, TaskId(59));
        assert_eq!(d.rebalance(), 0, "a balanced set is left alone");
        assert_counters_agree(&d, ids(0..60));
    }
}

#[test]
fn rebalance_stops_once_loads_are_within_the_configured_ratio() {
    let d = balanced(Strategy::LeastLoaded); // ratio 1.5
    d.register(W1, &["g"], NO_TAGS).unwrap();
    d.submit_many((0..60).map(task)).unwrap();
    d.register(W2, &["g"], NO_TAGS).unwrap();
    d.register(W3, &["g"], NO_TAGS).unwrap();
    let moved = d.rebalance();
    let loads: Vec<f64> = d.stats().workers.iter().map(|w| w.queued as f64).collect();
    assert_eq!(loads.iter().sum::<f64>(), 60.0);
    assert_eq!(moved as f64, 60.0 - loads[0]);
    let (max, min) = (
        loads.iter().cloned().fold(0.0, f64::max),
        loads.iter().cloned().fold(60.0, f64::min),
    );
    assert!(max <= 1.5 * min || max - min < 2.0, "{loads:?}");
    assert!(min > 0.0, "{loads:?}");
    assert_counters_agree(&d, ids(0..60));
}

#[test]
fn rebalance_respects_candidates_and_is_a_no_op_in_fanout() {
    let d = balanced(Strategy::LeastLoaded);
    d.register(W1, &["g"], &["gpu"]).unwrap();
    d.submit_many((0..10).map(|i| task(i).tags(["gpu"])))
        .unwrap();
    d.register(W2, &["g"], NO_TAGS).unwrap(); // not a candidate
    assert_eq!(d.rebalance(), 0);
    // Fanout: tasks wait in their class's heap, held by every candidate; nothing to move, even
    // when one candidate came late and the loads look uneven.
    let f = fanout();
    f.register(W1, &["g"], NO_TAGS).unwrap();
    f.submit_many((0..10).map(task)).unwrap();
    f.fetch(W1, 3).unwrap();
    f.register(W2, &["g"], NO_TAGS).unwrap();
    assert_eq!(f.rebalance(), 0);
    assert_eq!(
        fetched(&f, W2, 10).len(),
        7,
        "every queued task is W2's to take"
    );
}

#[test]
fn aging_lets_a_long_waiting_low_priority_task_overtake() {
    let mut cfg = Config::balanced(Strategy::LeastLoaded);
    cfg.aging_rate = 1.0; // one priority unit per second of waiting
    let d = Dispatcher::new(cfg).unwrap();
    d.register(W1, &["g"], NO_TAGS).unwrap();
    d.submit(task(1).priority(10)).unwrap();
    d.submit(task(2).priority(0).waited(Duration::from_secs(60)))
        .unwrap();
    d.submit(task(3).priority(5).waited(Duration::from_secs(2)))
        .unwrap();
    // Effective priorities now: 10, 60, 7.
    assert_eq!(fetched(&d, W1, 3), [2, 1, 3]);
    // Without aging, strict priority.
    let d = balanced(Strategy::LeastLoaded);
    d.register(W1, &["g"], NO_TAGS).unwrap();
    d.submit(task(1).priority(10)).unwrap();
    d.submit(task(2).priority(0).waited(Duration::from_secs(60)))
        .unwrap();
    assert_eq!(fetched(&d, W1, 3), [1, 2]);
}

#[test]
fn give_back_requeues_as_a_new_attempt() {
    for (d, _mode) in all_modes() {
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.submit(task(1)).unwrap();
        let a = d.fetch(W1, 1).unwrap()[0];
        assert_eq!(
            d.give_back(W1, TaskId(1), a.attempt).unwrap(),
            TaskStatus::Queued(vec![W1])
        );
        assert!(matches!(
            d.give_back(W1, TaskId(1), a.attempt),
            Err(switchyard::Error::StaleAttempt { .. })
        ));
        let b = d.fetch(W1, 1).unwrap()[0];
        assert_eq!(b.attempt, a.attempt + 1);
        assert_eq!(d.stats().counters.given_back, 1);
        assert_counters_agree(&d, ids(1..2));
    }
}

#[test]
fn a_delayed_task_is_invisible_until_its_time_then_queued_at_its_priority() {
    for (d, _mode) in all_modes() {
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.submit_many([
            task(1).priority(9).not_before(100),
            task(2).priority(0),
            task(3).priority(5).not_before(50),
        ])
        .unwrap();
        assert_eq!(d.get(TaskId(1)).unwrap().status, TaskStatus::Waiting(100));
        assert_eq!(d.next_due(), Some(50));
        let s = d.stats();
        assert_eq!((s.tasks, s.queued, s.waiting), (3, 1, 2));
        assert_eq!(fetched(&d, W1, 10), [2], "only the task with no delay");
        // Not yet due: nothing moves.
        assert_eq!(d.release_due(49).released, 0);
        let due = d.release_due(60);
        assert_eq!((due.released, due.next), (1, Some(100)));
        let due = d.release_due(1_000);
        assert_eq!((due.released, due.next), (1, None));
        assert_eq!(fetched(&d, W1, 10), [1, 3], "by priority once released");
        assert_eq!(d.stats().counters.released, 2);
        assert_counters_agree(&d, ids(1..4));
    }
}

#[test]
fn a_waiting_task_can_be_cancelled_and_updated_and_stays_waiting() {
    for (d, _mode) in all_modes() {
        d.register(W1, &["g", "h"], &["t"]).unwrap();
        d.submit_many([task(1).not_before(10), task(2).not_before(10)])
            .unwrap();
        assert_eq!(d.cancel(TaskId(1)), Ok(Cancelled::Queued));
        assert_eq!(
            d.update(TaskId(2), Some(4), Some(&["t"])),
            Ok(TaskStatus::Waiting(10))
        );
        assert_counters_agree(&d, ids(1..3));
        // Its old timer entry is dead, the cancelled task's too: one release, of task 2.
        assert_eq!(d.release_due(10).released, 1);
        let info = d.get(TaskId(2)).unwrap();
        assert_eq!((info.priority, info.tags.clone()), (4, vec!["t".into()]));
        assert_eq!(fetched(&d, W1, 10), [2]);
        assert_counters_agree(&d, ids(1..3));
    }
}

#[test]
fn retry_ends_the_attempt_and_queues_the_task_now_or_after_a_wait() {
    for (d, _mode) in all_modes() {
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.submit_many([task(1), task(2)]).unwrap();
        let got = d.fetch(W1, 2).unwrap();
        assert_eq!(
            d.retry(W1, TaskId(1), got[0].attempt, None),
            Ok(TaskStatus::Queued(vec![W1]))
        );
        assert_eq!(
            d.retry(W1, TaskId(2), got[1].attempt, Some(30)),
            Ok(TaskStatus::Waiting(30))
        );
        // Fenced like every report: the attempt is over.
        assert!(matches!(
            d.retry(W1, TaskId(2), got[1].attempt, Some(30)),
            Err(switchyard::Error::StaleAttempt { .. })
        ));
        assert_eq!(fetched(&d, W1, 10), [1]);
        d.release_due(30);
        let again = d.fetch(W1, 10).unwrap();
        assert_eq!((again[0].task, again[0].attempt), (TaskId(2), 2));
        assert_eq!(d.stats().counters.retried, 2);
        assert_counters_agree(&d, ids(1..3));
    }
}

#[test]
fn seeded_tasks_with_a_time_wait_and_a_released_task_with_no_candidate_parks() {
    for (d, _mode) in all_modes() {
        d.seed([SeedTask {
            spec: task(1).not_before(5),
            attempt: 2,
            running_on: None,
        }])
        .unwrap();
        assert_eq!(d.get(TaskId(1)).unwrap().status, TaskStatus::Waiting(5));
        d.release_due(5);
        assert_eq!(d.get(TaskId(1)).unwrap().status, TaskStatus::Parked);
        d.register(W1, &["g"], NO_TAGS).unwrap();
        let a = d.fetch(W1, 1).unwrap();
        assert_eq!((a[0].task, a[0].attempt), (TaskId(1), 3));
        assert_counters_agree(&d, ids(1..2));
    }
}

#[test]
fn cancel_removes_queued_parked_and_running_tasks() {
    for (d, _mode) in all_modes() {
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.register(W2, &["g"], NO_TAGS).unwrap();
        d.submit_many((1..=3).map(task)).unwrap();
        d.submit(TaskSpec::new(4, "nobody")).unwrap();
        assert_eq!(d.cancel(TaskId(1)).unwrap(), Cancelled::Queued);
        assert_eq!(d.cancel(TaskId(4)).unwrap(), Cancelled::Queued);
        let w = holders(&d, 2)[0];
        let a = d.fetch(w, 1).unwrap()[0];
        let running = a.task;
        assert_eq!(
            d.cancel(running).unwrap(),
            Cancelled::Running {
                worker: w,
                attempt: 1
            }
        );
        assert!(matches!(
            d.complete(w, running, 1),
            Err(switchyard::Error::UnknownTask(_))
        ));
        let rest: Vec<u64> = [W1, W2].iter().flat_map(|&w| fetched(&d, w, 10)).collect();
        assert_eq!(rest.len(), 1);
        assert!(!rest.contains(&1) && !rest.contains(&running.0));
        let s = d.stats();
        assert_eq!((s.parked, s.counters.cancelled), (0, 3));
        assert_counters_agree(&d, ids(1..5));
    }
}

#[test]
fn update_changes_priority_and_tags_of_queued_tasks() {
    for (d, _mode) in all_modes() {
        d.register(W1, &["g"], &["a"]).unwrap();
        d.register(W2, &["g"], &["b"]).unwrap();
        d.submit_many((1..=3).map(|i| task(i).tags(["a"]))).unwrap();
        d.update::<&str>(TaskId(3), Some(9), None).unwrap();
        assert_eq!(d.get(TaskId(3)).unwrap().priority, 9);
        let p = d.update(TaskId(2), None, Some(&["b"])).unwrap();
        assert_eq!(p, TaskStatus::Queued(vec![W2]));
        assert_eq!(d.get(TaskId(2)).unwrap().tags, ["b"]);
        let p = d.update(TaskId(1), None, Some(&["c"])).unwrap();
        assert_eq!(p, TaskStatus::Parked);
        assert_eq!(fetched(&d, W1, 10), [3]);
        assert_eq!(fetched(&d, W2, 10), [2]);
        assert_eq!(
            d.update::<&str>(TaskId(3), Some(1), None),
            Err(switchyard::Error::NotQueued(TaskId(3)))
        );
        assert_counters_agree(&d, ids(1..4));
    }
}

#[test]
fn stats_report_loads_totals_and_counters() {
    let d = balanced(Strategy::RoundRobin);
    d.register(W1, &["g"], &["a"]).unwrap();
    d.register(W2, &["g"], NO_TAGS).unwrap();
    d.submit_many((0..4).map(task)).unwrap();
    d.submit(TaskSpec::new(9, "none")).unwrap();
    d.fetch(W1, 1).unwrap();
    let s = d.stats();
    assert_eq!(
        (s.tasks, s.queued, s.running, s.parked, s.copies),
        (5, 3, 1, 1, 3)
    );
    assert_eq!(s.workers[0].groups, ["g"]);
    assert_eq!(s.workers[0].tags, ["a"]);
    assert_eq!((s.workers[0].queued, s.workers[0].running), (1, 1));
    assert_eq!(
        (s.counters.submitted, s.counters.claimed, s.counters.parked),
        (5, 1, 1)
    );
}

// ----- errors: each is typed, and none changes state ---------------------------------------

fn snapshot(d: &Dispatcher) -> (switchyard::Stats, Vec<Option<switchyard::TaskInfo>>) {
    (d.stats(), (0..10).map(|i| d.get(TaskId(i))).collect())
}

#[test]
fn every_error_is_typed_and_changes_nothing() {
    use switchyard::Error::*;
    for (d, _mode) in all_modes() {
        d.register(W1, &["g"], &["a"]).unwrap();
        d.submit_many((1..=3).map(task)).unwrap();
        let a = d.fetch(W1, 1).unwrap()[0];
        let before = snapshot(&d);
        let long = "x".repeat(200);
        let many: Vec<String> = (0..40).map(|i| format!("t{i}")).collect();
        let cases: Vec<(switchyard::Result<()>, switchyard::Error)> = vec![
            (d.fetch(W2, 1).map(drop), UnknownWorker(W2)),
            (d.complete(W2, a.task, a.attempt), UnknownWorker(W2)),
            (
                d.give_back(W2, a.task, a.attempt).map(drop),
                UnknownWorker(W2),
            ),
            (d.unregister(W2).map(drop), UnknownWorker(W2)),
            (
                d.register(W1, &["g"], NO_TAGS).map(drop),
                DuplicateWorker(W1),
            ),
            (d.submit(task(2)), DuplicateTask(TaskId(2))),
            (d.submit(task(1)), DuplicateTask(TaskId(1))),
            (d.cancel(TaskId(7)).map(drop), UnknownTask(TaskId(7))),
            (d.complete(W1, TaskId(7), 1), UnknownTask(TaskId(7))),
            (
                d.update::<&str>(TaskId(7), Some(1), None).map(drop),
                UnknownTask(TaskId(7)),
            ),
            (
                d.complete(W1, a.task, a.attempt + 1),
                StaleAttempt {
                    task: a.task,
                    attempt: a.attempt + 1,
                    worker: W1,
                },
            ),
            (
                d.complete(W1, TaskId(2), 1),
                StaleAttempt {
                    task: TaskId(2),
                    attempt: 1,
                    worker: W1,
                },
            ),
            (
                d.update::<&str>(a.task, Some(1), None).map(drop),
                NotQueued(a.task),
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, Err(want));
        }
        let invalid: Vec<switchyard::Result<()>> = vec![
            d.submit(TaskSpec::new(8, "")),
            d.submit(TaskSpec::new(8, long.as_str())),
            d.submit(task(8).tags(["ok", ""])),
            d.submit(task(8).tags(many.clone())),
            d.submit(task(8).tags(["bad\ntag"])),
            d.submit_many([task(8), task(9), task(8)]),
            d.update(TaskId(2), Some(1), Some(&[""])).map(drop),
            d.register(W2, NO_TAGS, NO_TAGS).map(drop),
            d.register(W2, &["g"], &many).map(drop),
            d.register(W2, &[long.as_str()], NO_TAGS).map(drop),
            d.seed([SeedTask {
                spec: task(8),
                attempt: 0,
                running_on: Some(W1),
            }])
            .map(drop),
        ];
        for got in invalid {
            assert!(matches!(got, Err(InvalidInput(_))), "{got:?}");
        }
        // A batch with one taken id submits nothing.
        assert_eq!(
            d.submit_many([task(8), task(2), task(9)]),
            Err(DuplicateTask(TaskId(2)))
        );
        assert_eq!(snapshot(&d), before, "{:?}", d.config().mode);
        assert_counters_agree(&d, ids(0..10));
    }
}

#[test]
fn invalid_configs_are_refused() {
    let bad = [
        Config {
            running_weight: -1.0,
            ..Config::default()
        },
        Config {
            running_weight: f64::NAN,
            ..Config::default()
        },
        Config {
            aging_rate: f64::INFINITY,
            ..Config::default()
        },
        Config {
            rebalance_ratio: 0.5,
            ..Config::default()
        },
        Config {
            shards: 0,
            ..Config::default()
        },
        Config {
            limits: switchyard::Limits {
                max_tags: 0,
                ..Default::default()
            },
            ..Config::default()
        },
    ];
    for cfg in bad {
        assert!(matches!(
            Dispatcher::new(cfg),
            Err(switchyard::Error::InvalidInput(_))
        ));
    }
}

#[test]
fn an_unregistered_worker_can_neither_fetch_nor_report() {
    for (d, _mode) in all_modes() {
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.submit(task(1)).unwrap();
        let a = d.fetch(W1, 1).unwrap()[0];
        d.unregister(W1).unwrap();
        assert_eq!(d.fetch(W1, 1), Err(switchyard::Error::UnknownWorker(W1)));
        assert_eq!(
            d.complete(W1, a.task, a.attempt),
            Err(switchyard::Error::UnknownWorker(W1))
        );
        assert_eq!(d.get(TaskId(1)).unwrap().status, TaskStatus::Parked);
    }
}

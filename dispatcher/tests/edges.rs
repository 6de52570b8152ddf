//! Edges that mutation testing (`cargo mutants -p switchyard`) found unchecked: exact limits,
//! the waker, aging against the clock, the counters of dead entries and of parking, and
//! configuration bounds. Each test asserts behaviour a caller can see.

// The normal build only: the loom build (`--cfg switchyard_loom`) runs `loom-tests/`.
#![cfg(not(switchyard_loom))]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard::{
    Config, Dispatcher, Error, Strategy, TaskId, TaskSpec, TaskStatus, Waker, WorkerId,
};

const W1: WorkerId = WorkerId(1);
const W2: WorkerId = WorkerId(2);
const NO_TAGS: &[&str] = &[];

fn fetched(d: &Dispatcher, w: WorkerId, max: usize) -> Vec<u64> {
    d.fetch(w, max).unwrap().iter().map(|a| a.task.0).collect()
}

#[test]
fn configuration_bounds_are_exact() {
    let with = |f: fn(&mut Config)| {
        let mut c = Config::default();
        f(&mut c);
        Dispatcher::new(c).map(|_| ())
    };
    // Accepted at the boundary.
    assert!(with(|c| c.shards = 1).is_ok());
    assert!(with(|c| c.shards = 1 << 16).is_ok());
    assert!(with(|c| c.rebalance_ratio = 1.0).is_ok());
    assert!(with(|c| c.running_weight = 0.0).is_ok());
    assert!(with(|c| c.aging_rate = 0.0).is_ok());
    // Refused just past it, and for every non-finite value.
    for refused in [
        with(|c| c.shards = (1 << 16) + 1),
        with(|c| c.shards = 0),
        with(|c| c.rebalance_ratio = 0.999),
        with(|c| c.rebalance_ratio = f64::NAN),
        with(|c| c.rebalance_ratio = f64::INFINITY),
        with(|c| c.running_weight = -0.001),
        with(|c| c.running_weight = f64::INFINITY),
        with(|c| c.aging_rate = -0.001),
        with(|c| c.aging_rate = f64::NAN),
        with(|c| c.limits.max_classes = 0),
        with(|c| c.limits.max_name_len = 0),
        with(|c| c.limits.max_groups = 0),
    ] {
        assert!(
            matches!(refused, Err(Error::InvalidInput(_))),
            "{refused:?}"
        );
    }
}

#[test]
fn input_limits_are_exact_for_tasks_and_workers() {
    let mut config = Config::balanced(Strategy::RoundRobin);
    config.limits.max_tags = 2;
    config.limits.max_groups = 2;
    config.limits.max_name_len = 4;
    let d = Dispatcher::new(config).unwrap();
    d.register(W1, &["g", "h"], &["abcd", "b"]).unwrap();
    assert!(matches!(
        d.register(W2, &["g", "h", "i"], NO_TAGS),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        d.register(W2, &["g"], &["a", "b", "c"]),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        d.register(W2, &["abcde"], NO_TAGS),
        Err(Error::InvalidInput(_))
    ));
    assert!(
        !d.is_registered(W2),
        "a refused registration registers nothing"
    );
    assert!(d.is_registered(W1));
    d.submit(TaskSpec::new(1, "g").tags(["abcd", "b"])).unwrap();
    for bad in [
        TaskSpec::new(2, "g").tags(["a", "b", "c"]),
        TaskSpec::new(2, "g").tags(["abcde"]),
        TaskSpec::new(2, "abcde"),
    ] {
        assert!(
            matches!(d.validate(&bad), Err(Error::InvalidInput(_))),
            "{bad:?}"
        );
        assert!(matches!(d.submit(bad), Err(Error::InvalidInput(_))));
    }
    assert!(d.validate(&TaskSpec::new(2, "h").tags(["b"])).is_ok());
    assert!(d.get(TaskId(2)).is_none(), "validate submits nothing");
    assert!(d.validate_worker(&["g", "h"], &["abcd"]).is_ok());
    assert!(matches!(
        d.validate_worker(&["g", "h", "i"], NO_TAGS),
        Err(Error::InvalidInput(_))
    ));
    assert!(!d.is_registered(WorkerId(9)));
}

/// Records what the dispatcher says became fetchable.
#[derive(Default)]
struct Recorder {
    workers: Mutex<Vec<WorkerId>>,
    classes: Mutex<Vec<Vec<WorkerId>>>,
}

impl Waker for Recorder {
    fn worker(&self, worker: WorkerId) {
        self.workers.lock().unwrap().push(worker);
    }
    fn class(&self, candidates: &mut dyn Iterator<Item = WorkerId>) {
        let mut c: Vec<WorkerId> = candidates.collect();
        c.sort();
        self.classes.lock().unwrap().push(c);
    }
}

#[test]
fn the_waker_hears_of_work_for_each_holder_and_only_the_first_waker_counts() {
    let d = Dispatcher::new(Config::balanced(Strategy::RoundRobin)).unwrap();
    let rec = Arc::new(Recorder::default());
    assert!(d.set_waker(rec.clone()));
    assert!(
        !d.set_waker(Arc::new(Recorder::default())),
        "a second waker"
    );
    d.register(W1, &["g"], NO_TAGS).unwrap();
    d.submit(TaskSpec::new(1, "g")).unwrap();
    assert_eq!(*rec.workers.lock().unwrap(), [W1]);

    let f = Dispatcher::new(Config::default()).unwrap();
    let rec = Arc::new(Recorder::default());
    assert!(f.set_waker(rec.clone()));
    f.register(W1, &["g"], NO_TAGS).unwrap();
    f.register(W2, &["g"], NO_TAGS).unwrap();
    f.submit(TaskSpec::new(1, "g")).unwrap();
    assert_eq!(*rec.classes.lock().unwrap(), [vec![W1, W2]]);
    assert!(rec.workers.lock().unwrap().is_empty());
}

#[test]
fn a_released_task_wakes_its_fetchers() {
    let d = Dispatcher::new(Config::balanced(Strategy::RoundRobin)).unwrap();
    let rec = Arc::new(Recorder::default());
    assert!(d.set_waker(rec.clone()));
    d.register(W1, &["g"], NO_TAGS).unwrap();
    d.submit(TaskSpec::new(1, "g").not_before(7)).unwrap();
    assert!(
        rec.workers.lock().unwrap().is_empty(),
        "nothing to fetch yet"
    );
    d.release_due(7);
    assert_eq!(*rec.workers.lock().unwrap(), [W1]);
}

#[test]
fn aging_follows_the_clock() {
    // Ten priority units per second: a task that waited 0.3 s in the dispatcher has gained
    // three units, so it overtakes a fresh task two units above it; fractions count.
    let mut config = Config::balanced(Strategy::RoundRobin);
    config.aging_rate = 10.0;
    let d = Dispatcher::new(config).unwrap();
    d.register(W1, &["g"], NO_TAGS).unwrap();
    d.submit(TaskSpec::new(1, "g").priority(0)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // One batch reads the clock once: 0.75 units of head start do not beat one unit.
    d.submit_many([
        TaskSpec::new(2, "g").priority(2),
        TaskSpec::new(3, "g")
            .priority(1)
            .waited(Duration::from_millis(75)),
        TaskSpec::new(4, "g").priority(2),
    ])
    .unwrap();
    assert_eq!(fetched(&d, W1, 4), [1, 2, 4, 3]);
    // A quarter unit is not lost to rounding: it decides between equal priorities.
    let mut config = Config::balanced(Strategy::RoundRobin);
    config.aging_rate = 1.0;
    let d = Dispatcher::new(config).unwrap();
    d.register(W1, &["g"], NO_TAGS).unwrap();
    d.submit_many([
        TaskSpec::new(5, "g").priority(3),
        TaskSpec::new(6, "g")
            .priority(3)
            .waited(Duration::from_millis(250)),
    ])
    .unwrap();
    assert_eq!(fetched(&d, W1, 2), [6, 5]);
}

#[test]
fn fetches_count_the_dead_entries_they_pop() {
    // Balanced: a cancelled task's entry stays in its holder's heap until a fetch pops it.
    let d = Dispatcher::new(Config::balanced(Strategy::RoundRobin)).unwrap();
    d.register(W1, &["g"], NO_TAGS).unwrap();
    d.submit_many((1..=3).map(|i| TaskSpec::new(i, "g").priority(i as i32)))
        .unwrap();
    d.cancel(TaskId(3)).unwrap();
    d.cancel(TaskId(2)).unwrap();
    assert_eq!(d.stats().tombstones, 2);
    assert_eq!(fetched(&d, W1, 1), [1]);
    let s = d.stats();
    assert_eq!((s.counters.stale_skipped, s.tombstones), (2, 0));
    // Fanout: the same in a class heap.
    let f = Dispatcher::new(Config::default()).unwrap();
    f.register(W1, &["g"], NO_TAGS).unwrap();
    f.submit_many((1..=3).map(|i| TaskSpec::new(i, "g").priority(i as i32)))
        .unwrap();
    f.cancel(TaskId(3)).unwrap();
    assert_eq!(fetched(&f, W1, 1), [2]);
    assert_eq!(f.stats().counters.stale_skipped, 1);
    // Fanout over several classes: the dead heads met on the way are counted too.
    let m = Dispatcher::new(Config::default()).unwrap();
    m.register(W1, &["g"], &["a"]).unwrap();
    m.submit_many([
        TaskSpec::new(1, "g").priority(9),
        TaskSpec::new(2, "g").tags(["a"]).priority(8),
        TaskSpec::new(3, "g").priority(1),
        TaskSpec::new(4, "g").tags(["a"]).priority(0),
    ])
    .unwrap();
    m.cancel(TaskId(1)).unwrap();
    m.cancel(TaskId(2)).unwrap();
    assert_eq!(fetched(&m, W1, 1), [3]);
    assert_eq!(m.stats().counters.stale_skipped, 2);
    // And the counts survive the worker's departure (folded into the totals).
    d.unregister(W1).unwrap();
    assert_eq!(d.stats().counters.stale_skipped, 2);
    assert_eq!(d.stats().counters.claimed, 1);
}

#[test]
fn fanout_tasks_are_parked_when_the_last_candidate_of_their_classes_leaves() {
    let f = Dispatcher::new(Config::default()).unwrap();
    f.register(W1, &["g"], &["a", "b"]).unwrap();
    f.register(W2, &["g"], NO_TAGS).unwrap();
    f.submit_many([
        TaskSpec::new(1, "g").tags(["a"]),
        TaskSpec::new(2, "g").tags(["a"]),
        TaskSpec::new(3, "g"),
        TaskSpec::new(4, "g").tags(["b"]),
    ])
    .unwrap();
    assert_eq!(f.stats().parked, 0);
    let departure = f.unregister(W1).unwrap();
    assert_eq!(
        departure.tasks.len(),
        4,
        "every task of its classes is reported"
    );
    // Tasks 1, 2 and 4 have no candidate left (two classes); task 3 still has W2.
    let s = f.stats();
    assert_eq!((s.parked, s.queued), (3, 1));
    assert_eq!(s.counters.parked, 3, "each parked task is counted once");
    assert_eq!(f.get(TaskId(1)).unwrap().status, TaskStatus::Parked);
    assert_eq!(f.get(TaskId(4)).unwrap().status, TaskStatus::Parked);
    assert_eq!(
        f.get(TaskId(3)).unwrap().status,
        TaskStatus::Queued(vec![W2])
    );
    f.unregister(W2).unwrap();
    assert_eq!(f.stats().parked, 4);
    assert_eq!(f.stats().counters.parked, 4);
    f.register(WorkerId(3), &["g"], &["a", "b"]).unwrap();
    assert_eq!(f.stats().parked, 0);
    f.audit().unwrap();
}

#[test]
fn a_fanout_worker_serving_many_classes_fetches_from_the_one_with_work() {
    let f = Dispatcher::new(Config::default()).unwrap();
    let tags: Vec<String> = (0..32).map(|i| format!("t{i}")).collect();
    f.register(W1, &["g"], &tags).unwrap();
    // 32 classes exist; after their tasks are claimed, they are all empty.
    for (i, t) in tags.iter().enumerate() {
        f.submit(TaskSpec::new(i as u64, "g").tags([t.as_str()]))
            .unwrap();
    }
    assert_eq!(f.fetch(W1, 100).unwrap().len(), 32);
    f.submit(TaskSpec::new(100, "g").tags(["t30"]).priority(1))
        .unwrap();
    f.submit(TaskSpec::new(101, "g").tags(["t7"]).priority(2))
        .unwrap();
    assert_eq!(fetched(&f, W1, 10), [101, 100]);
    assert!(fetched(&f, W1, 10).is_empty());
    f.audit().unwrap();
}

#[test]
fn a_dispatcher_describes_itself() {
    let d = Dispatcher::new(Config::default()).unwrap();
    d.register(W1, &["g"], NO_TAGS).unwrap();
    d.register(W2, &["g"], NO_TAGS).unwrap();
    d.submit_many([
        TaskSpec::new(1, "g"),
        TaskSpec::new(2, "g"),
        TaskSpec::new(3, "g"),
    ])
    .unwrap();
    let shown = format!("{d:?}");
    assert!(
        shown.contains("Dispatcher") && shown.contains("workers: 2") && shown.contains("tasks: 3"),
        "{shown}"
    );
}

#[test]
fn concurrent_submissions_of_the_same_ids_create_each_task_once() {
    // Two threads submit the same batches at once: for each batch exactly one wins, and a
    // loser's half-made tasks (its cells locked, some of its ids already indexed) are undone.
    let d = Arc::new(Dispatcher::new(Config::balanced(Strategy::RoundRobin)).unwrap());
    d.register(W1, &["g"], NO_TAGS).unwrap();
    let rounds = 300u64;
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (d, barrier) = (d.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut won = 0;
                for r in 0..rounds {
                    barrier.wait();
                    let batch = (r * 50..r * 50 + 50).map(|i| TaskSpec::new(i, "g"));
                    match d.submit_many(batch) {
                        Ok(()) => won += 1,
                        Err(Error::DuplicateTask(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                won
            })
        })
        .collect();
    let wins: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        wins.iter().sum::<u64>(),
        rounds,
        "one winner per batch: {wins:?}"
    );
    let s = d.stats();
    assert_eq!(
        (s.tasks, s.queued),
        (rounds as usize * 50, rounds as usize * 50)
    );
    d.audit().unwrap();
    assert_eq!(d.fetch(W1, 100_000).unwrap().len(), rounds as usize * 50);
}

#[test]
fn a_heap_compacts_from_64_entries_when_most_are_dead() {
    // (tasks submitted, tasks cancelled, then one more submitted) → tombstones after the push.
    // The push compacts a heap of at least 64 entries with more than twice as many entries as
    // live tasks; a smaller or denser heap is left alone.
    for (submitted, cancelled, tombstones) in [
        (63, 61, 0),  // 64 entries, 3 live: compacted
        (62, 60, 60), // 63 entries: too small to bother
        (63, 33, 0),  // 64 entries, 31 live: more than twice as many, compacted
        (63, 32, 32), // 64 entries, 32 live: exactly twice, dense enough
    ] {
        let d = Dispatcher::new(Config::balanced(Strategy::RoundRobin)).unwrap();
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.submit_many((0..submitted).map(|i| TaskSpec::new(i, "g")))
            .unwrap();
        for i in 0..cancelled {
            d.cancel(TaskId(i)).unwrap();
        }
        d.submit(TaskSpec::new(1000, "g")).unwrap();
        let s = d.stats();
        assert_eq!(
            s.tombstones, tombstones,
            "{submitted} submitted, {cancelled} cancelled"
        );
        assert_eq!(
            d.fetch(W1, 100).unwrap().len() as u64,
            submitted - cancelled + 1
        );
    }
}

#[test]
fn running_lists_a_workers_current_assignments_in_claim_order() {
    for mode in [Config::default(), Config::balanced(Strategy::RoundRobin)] {
        let d = Dispatcher::new(mode.clone()).unwrap();
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.register(W2, &["h"], NO_TAGS).unwrap();
        d.submit_many((1..=5).map(|i| TaskSpec::new(i, "g").priority(10 - i as i32)))
            .unwrap();
        d.submit(TaskSpec::new(9, "h")).unwrap();
        let got = d.fetch(W1, 5).unwrap();
        let w2 = d.fetch(W2, 1).unwrap()[0];
        assert_eq!(d.running(W1).unwrap(), got, "{mode:?}");
        // Each way an assignment ends takes it off the list.
        d.complete(W1, got[0].task, got[0].attempt).unwrap();
        d.give_back(W1, got[1].task, got[1].attempt).unwrap();
        d.cancel(got[2].task).unwrap();
        assert_eq!(d.running(W1).unwrap(), got[3..], "{mode:?}");
        // The given-back task, fetched again, is a new attempt at the end of the list.
        let again = d.fetch(W1, 1).unwrap()[0];
        assert_eq!(
            (again.task, again.attempt),
            (got[1].task, got[1].attempt + 1)
        );
        assert_eq!(d.running(W1).unwrap(), [got[3], got[4], again], "{mode:?}");
        assert!(d.is_running(W1, again.task, again.attempt));
        assert!(
            !d.is_running(W1, again.task, got[1].attempt),
            "the old attempt"
        );
        assert!(
            !d.is_running(W2, again.task, again.attempt),
            "another worker"
        );
        assert!(
            !d.is_running(W1, got[0].task, got[0].attempt),
            "a finished task"
        );
        assert!(
            !d.is_running(WorkerId(7), again.task, again.attempt),
            "no such worker"
        );
        assert!(d.is_running(W2, w2.task, w2.attempt));
        assert_eq!(d.running(W2).unwrap(), [w2]);
        assert_eq!(
            d.running(WorkerId(7)),
            Err(Error::UnknownWorker(WorkerId(7)))
        );
        d.unregister(W1).unwrap();
        assert_eq!(d.running(W1), Err(Error::UnknownWorker(W1)));
    }
}

#[test]
fn the_tasks_of_some_groups_are_listed_whatever_their_phase() {
    for config in [Config::default(), Config::balanced(Strategy::LeastLoaded)] {
        let d = Dispatcher::new(config).unwrap();
        d.register(W1, &["a", "b"], NO_TAGS).unwrap();
        d.submit(TaskSpec::new(1, "a")).unwrap();
        d.submit(TaskSpec::new(2, "b")).unwrap();
        d.submit(TaskSpec::new(3, "a")).unwrap();
        d.submit(TaskSpec::new(4, "c")).unwrap(); // parked: no worker serves c
        d.submit(TaskSpec::new(5, "a")).unwrap();
        d.cancel(TaskId(5)).unwrap(); // ended: not listed
        let running = fetched(&d, W1, 1);
        assert_eq!(running.len(), 1);
        let mut a = d.tasks_in_groups(|g| g == "a");
        a.sort();
        assert_eq!(a, [TaskId(1), TaskId(3)], "queued and running alike");
        let mut not_a = d.tasks_in_groups(|g| g != "a");
        not_a.sort();
        assert_eq!(not_a, [TaskId(2), TaskId(4)], "parked too");
        assert!(d.tasks_in_groups(|_| false).is_empty());
    }
}

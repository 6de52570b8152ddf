//! Multi-threaded stress: threads run random operations — register/unregister, submit, fetch,
//! complete, give back, cancel, rebalance — for a bounded time in each mode. At the end the
//! dispatcher is drained and the test checks that no task was lost, none was assigned twice
//! (every (task, attempt) handed out once, every task finished or cancelled exactly once) and
//! the counters agree with the index.

// The normal build only: the loom build (`--cfg switchyard_loom`) runs `loom-tests/`.
#![cfg(not(switchyard_loom))]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard::{Config, Dispatcher, Error, Mode, Strategy, TaskId, TaskSpec, WorkerId};

const THREADS: u64 = 4;
const RUN_FOR: Duration = Duration::from_millis(700);
const MAX_OPS: u64 = 60_000;
const GROUPS: [&str; 2] = ["g0", "g1"];
const TAGS: [&str; 2] = ["a", "b"];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default)]
struct Ledger {
    /// Every (task, attempt) any fetch returned.
    assigned: Mutex<HashSet<(u64, u32)>>,
    /// Tasks finished (complete returned Ok) and cancelled (cancel returned Ok), with counts.
    ended: Mutex<HashMap<u64, u32>>,
    next_id: AtomicU64,
}

impl Ledger {
    fn assigned(&self, task: TaskId, attempt: u32) {
        let fresh = self.assigned.lock().unwrap().insert((task.0, attempt));
        assert!(fresh, "task {task} attempt {attempt} handed out twice");
    }
    fn ended(&self, task: TaskId) {
        *self.ended.lock().unwrap().entry(task.0).or_default() += 1;
    }
}

fn tags(rng: &mut Rng) -> Vec<&'static str> {
    TAGS.iter().copied().filter(|_| rng.below(2) == 0).collect()
}

fn worker_thread(d: &Dispatcher, ledger: &Ledger, t: u64) {
    let mut rng = Rng(t * 7919 + 1);
    let mine = [WorkerId(t * 10), WorkerId(t * 10 + 1)];
    let mut live = [false, false];
    let mut holding: Vec<(WorkerId, TaskId, u32)> = Vec::new();
    let start = Instant::now();
    let mut ops = 0;
    while start.elapsed() < RUN_FOR && ops < MAX_OPS {
        ops += 1;
        let slot = rng.below(2) as usize;
        let w = mine[slot];
        match rng.below(100) {
            0..=2 => {
                if live[slot] {
                    d.unregister(w).unwrap();
                    holding.retain(|h| h.0 != w);
                } else {
                    let groups: Vec<&str> = match rng.below(3) {
                        0 => vec![GROUPS[0]],
                        1 => vec![GROUPS[1]],
                        _ => GROUPS.to_vec(),
                    };
                    d.register(w, &groups, &tags(&mut rng)).unwrap();
                }
                live[slot] = !live[slot];
            }
            3..=30 => {
                let n = 1 + rng.below(8);
                let first = ledger.next_id.fetch_add(n, Ordering::Relaxed);
                let specs = (first..first + n).map(|id| {
                    TaskSpec::new(id, GROUPS[(id % 2) as usize])
                        .tags(tags(&mut Rng(id)))
                        .priority((id % 5) as i32)
                });
                d.submit_many(specs).unwrap();
            }
            31..=70 => match d.fetch(w, 1 + rng.below(4) as usize) {
                Ok(got) => {
                    for a in got {
                        ledger.assigned(a.task, a.attempt);
                        holding.push((w, a.task, a.attempt));
                    }
                }
                Err(Error::UnknownWorker(_)) => assert!(!live[slot]),
                Err(e) => panic!("fetch: {e}"),
            },
            71..=92 if !holding.is_empty() => {
                let (hw, task, attempt) =
                    holding.swap_remove(rng.below(holding.len() as u64) as usize);
                let give_back = rng.below(5) == 0;
                let r = if give_back {
                    d.give_back(hw, task, attempt).map(drop)
                } else {
                    d.complete(hw, task, attempt)
                };
                match r {
                    Ok(()) if !give_back => ledger.ended(task),
                    Ok(()) => {}
                    // Cancelled by another thread meanwhile.
                    Err(Error::UnknownTask(_)) => {}
                    Err(e) => panic!("report of {task} attempt {attempt} on {hw}: {e}"),
                }
            }
            93..=97 => {
                let hi = ledger.next_id.load(Ordering::Relaxed).max(1);
                let task = TaskId(rng.below(hi));
                match d.cancel(task) {
                    Ok(_) => ledger.ended(task),
                    Err(Error::UnknownTask(_)) => {}
                    Err(e) => panic!("cancel: {e}"),
                }
            }
            _ => {
                d.rebalance();
            }
        }
    }
    // Report everything still held, then leave.
    for (hw, task, attempt) in holding {
        match d.complete(hw, task, attempt) {
            Ok(()) => ledger.ended(task),
            Err(Error::UnknownTask(_)) => {}
            Err(e) => panic!("final report: {e}"),
        }
    }
    for (slot, w) in mine.iter().enumerate() {
        if live[slot] {
            d.unregister(*w).unwrap();
        }
    }
}

fn run(mode: Mode) {
    let d = Arc::new(
        Dispatcher::new(Config {
            mode,
            ..Config::default()
        })
        .unwrap(),
    );
    let ledger = Arc::new(Ledger::default());
    // A long-lived worker per group so not everything parks; it leaves at the end too.
    d.register(WorkerId(1_000), &GROUPS, &TAGS).unwrap();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (d, ledger) = (d.clone(), ledger.clone());
            std::thread::spawn(move || worker_thread(&d, &ledger, t + 1))
        })
        .collect();
    // Meanwhile this thread drains as the long-lived worker.
    let start = Instant::now();
    while start.elapsed() < RUN_FOR {
        for a in d.fetch(WorkerId(1_000), 8).unwrap() {
            ledger.assigned(a.task, a.attempt);
            match d.complete(WorkerId(1_000), a.task, a.attempt) {
                Ok(()) => ledger.ended(a.task),
                Err(Error::UnknownTask(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        std::thread::yield_now();
    }
    for t in threads {
        t.join().expect("a stress thread panicked");
    }
    let submitted = ledger.next_id.load(Ordering::Relaxed);
    assert!(
        submitted > 100,
        "the stress run did too little: {submitted} tasks"
    );
    // At rest: the counters agree with the index, and nothing runs on a departed worker.
    common::assert_counters_agree(&d, common::ids(0..submitted));
    let stats = d.stats();
    assert_eq!(stats.running, 0, "every thread reported what it held");

    // Drain: a departure of the long-lived worker parks or moves its tasks; a catch-all
    // worker then takes everything left.
    d.unregister(WorkerId(1_000)).unwrap();
    d.register(WorkerId(2_000), &GROUPS, &TAGS).unwrap();
    loop {
        let got = d.fetch(WorkerId(2_000), 256).unwrap();
        if got.is_empty() {
            break;
        }
        for a in got {
            ledger.assigned(a.task, a.attempt);
            d.complete(WorkerId(2_000), a.task, a.attempt).unwrap();
            ledger.ended(a.task);
        }
    }
    let stats = d.stats();
    assert_eq!(
        (stats.tasks, stats.parked, stats.copies),
        (0, 0, 0),
        "{stats:?}"
    );
    // Conservation and no double hand-out: every task ended exactly once.
    let ended = ledger.ended.lock().unwrap();
    let lost: Vec<u64> = (0..submitted)
        .filter(|id| !ended.contains_key(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} tasks lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let twice: Vec<(&u64, &u32)> = ended.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "tasks ended more than once: {twice:?}");
    let c = stats.counters;
    assert_eq!(c.completed + c.cancelled, submitted);
    assert_eq!(c.claimed as usize, ledger.assigned.lock().unwrap().len());
}

#[test]
fn stress_fanout() {
    run(Mode::Fanout);
}

#[test]
fn stress_least_loaded() {
    run(Mode::Balanced(Strategy::LeastLoaded));
}

#[test]
fn stress_round_robin() {
    run(Mode::Balanced(Strategy::RoundRobin));
}

#[test]
fn stress_power_of_two_choices() {
    run(Mode::Balanced(Strategy::PowerOfTwoChoices));
}

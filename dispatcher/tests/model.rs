//! Property test: random sequences of every operation, run against the dispatcher and against a
//! simple sequential reference model, comparing every result and the full state after each step.
//!
//! The model decides everything that is deterministic — which tasks a fetch returns and in what
//! order, each attempt, every error, what registration backfills or unparks, that fanout holders
//! are exactly the live candidates. Where balanced placement has a choice, the model checks that
//! the dispatcher's choice is legal (a live candidate; for LeastLoaded single submissions, a least
//! loaded one), then adopts it; tasks an operation must not touch must keep their holders.

// The normal build only: the loom build (`--cfg switchyard_loom`) runs `loom-tests/`.
#![cfg(not(switchyard_loom))]

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::{prop, prop_oneof, proptest, Just, ProptestConfig};
use proptest::strategy::Strategy as _;
use switchyard::{
    Cancelled, Config, Dispatcher, Error, Mode, Strategy, TaskId, TaskSpec, TaskStatus, WorkerId,
};

const GROUPS: [&str; 2] = ["a", "b"];
const TAGS: [&str; 3] = ["x", "y", "z"];
const WORKERS: u64 = 4;
const TASK_IDS: u64 = 14;

#[derive(Debug, Clone)]
enum Op {
    Register {
        w: u64,
        groups: u8,
        tags: u8,
    },
    Unregister {
        w: u64,
    },
    Submit {
        id: u64,
        group: u8,
        tags: u8,
        priority: i32,
        /// Waits this long past the model's clock first.
        delay: Option<u8>,
    },
    SubmitBatch {
        tasks: Vec<(u64, u8, u8, i32)>,
    },
    Fetch {
        w: u64,
        max: usize,
    },
    Complete {
        w: u64,
        id: u64,
        attempt_delta: u32,
    },
    GiveBack {
        w: u64,
        id: u64,
        attempt_delta: u32,
    },
    /// Ends the attempt and queues the task again, at once or after waiting `delay`.
    Retry {
        w: u64,
        id: u64,
        attempt_delta: u32,
        delay: Option<u8>,
    },
    /// The clock moves on and the due tasks are released.
    Advance {
        by: u8,
    },
    Cancel {
        id: u64,
    },
    Update {
        id: u64,
        priority: Option<i32>,
        tags: Option<u8>,
    },
    Rebalance,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    let w = 0..WORKERS;
    let id = 0..TASK_IDS;
    let prio = -2i32..3;
    prop_oneof![
        3 => (w.clone(), 1u8..4, 0u8..8).prop_map(|(w, groups, tags)| Op::Register { w, groups, tags }),
        1 => w.clone().prop_map(|w| Op::Unregister { w }),
        5 => (id.clone(), 0u8..2, 0u8..8, prio.clone(), delay())
            .prop_map(|(id, group, tags, priority, delay)| Op::Submit { id, group, tags, priority, delay }),
        1 => prop::collection::vec((id.clone(), 0u8..2, 0u8..8, prio.clone()), 1..4)
            .prop_map(|tasks| Op::SubmitBatch { tasks }),
        5 => (w.clone(), 0usize..4).prop_map(|(w, max)| Op::Fetch { w, max }),
        3 => (w.clone(), id.clone(), prop_oneof![4 => Just(0u32), 1 => Just(1u32)])
            .prop_map(|(w, id, attempt_delta)| Op::Complete { w, id, attempt_delta }),
        1 => (w.clone(), id.clone(), prop_oneof![4 => Just(0u32), 1 => Just(1u32)])
            .prop_map(|(w, id, attempt_delta)| Op::GiveBack { w, id, attempt_delta }),
        1 => (w.clone(), id.clone(), prop_oneof![4 => Just(0u32), 1 => Just(1u32)], delay())
            .prop_map(|(w, id, attempt_delta, delay)| Op::Retry { w, id, attempt_delta, delay }),
        2 => (0u8..6).prop_map(|by| Op::Advance { by }),
        1 => id.clone().prop_map(|id| Op::Cancel { id }),
        1 => (id, proptest::option::of(prio), proptest::option::of(0u8..8))
            .prop_map(|(id, priority, tags)| Op::Update { id, priority, tags }),
        1 => Just(Op::Rebalance),
    ]
}

/// No wait (most often), or a wait of 0 to 4 ticks (0: due at the next release).
fn delay() -> impl proptest::strategy::Strategy<Value = Option<u8>> {
    prop_oneof![2 => Just(None), 1 => (0u8..5).prop_map(Some)]
}

fn mode() -> impl proptest::strategy::Strategy<Value = Mode> {
    prop_oneof![
        Just(Mode::Fanout),
        Just(Mode::Balanced(Strategy::LeastLoaded)),
        Just(Mode::Balanced(Strategy::RoundRobin)),
        Just(Mode::Balanced(Strategy::PowerOfTwoChoices)),
    ]
}

fn pick<const N: usize>(names: [&'static str; N], mask: u8) -> BTreeSet<&'static str> {
    (0..N)
        .filter(|i| mask & (1 << i) != 0)
        .map(|i| names[i])
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
enum St {
    Queued(BTreeSet<u64>),
    Parked,
    Running(u64),
    Waiting(u64),
}

#[derive(Debug, Clone)]
struct MTask {
    group: &'static str,
    tags: BTreeSet<&'static str>,
    priority: i32,
    seq: u64,
    attempt: u32,
    st: St,
}

#[derive(Debug, Clone)]
struct MWorker {
    groups: BTreeSet<&'static str>,
    tags: BTreeSet<&'static str>,
}

struct Model {
    mode: Mode,
    workers: BTreeMap<u64, MWorker>,
    tasks: BTreeMap<u64, MTask>,
    seq: u64,
    /// The clock passed to `release_due`.
    now: u64,
}

impl Model {
    fn candidates(&self, t: &MTask) -> BTreeSet<u64> {
        self.workers
            .iter()
            .filter(|(_, w)| w.groups.contains(t.group) && t.tags.is_subset(&w.tags))
            .map(|(id, _)| *id)
            .collect()
    }

    fn loads(&self) -> BTreeMap<u64, (usize, usize)> {
        let mut l: BTreeMap<u64, (usize, usize)> =
            self.workers.keys().map(|w| (*w, (0, 0))).collect();
        for t in self.tasks.values() {
            match &t.st {
                St::Queued(h) => h.iter().for_each(|w| l.get_mut(w).unwrap().0 += 1),
                St::Running(w) => l.get_mut(w).unwrap().1 += 1,
                St::Parked | St::Waiting(_) => {}
            }
        }
        l
    }

    /// Reads the dispatcher's placement of `id` and checks it is legal; returns it.
    fn legal_placement(&self, d: &Dispatcher, id: u64) -> St {
        let t = &self.tasks[&id];
        let info = d
            .get(TaskId(id))
            .expect("live task missing from the dispatcher");
        let cands = self.candidates(t);
        match info.status {
            TaskStatus::Parked => {
                assert!(
                    cands.is_empty(),
                    "task {id} parked with live candidates {cands:?}"
                );
                St::Parked
            }
            TaskStatus::Queued(h) => {
                let h: BTreeSet<u64> = h.iter().map(|w| w.0).collect();
                assert!(!cands.is_empty(), "task {id} queued with no live candidate");
                match self.mode {
                    Mode::Fanout => assert_eq!(h, cands, "fanout holders of {id} ≠ candidates"),
                    Mode::Balanced(_) => {
                        assert_eq!(h.len(), 1, "balanced task {id} has holders {h:?}");
                        assert!(h.is_subset(&cands), "task {id} on non-candidate {h:?}");
                    }
                }
                St::Queued(h)
            }
            TaskStatus::Running(w) => panic!("task {id} running on {w} unexpectedly"),
            TaskStatus::Waiting(until) => panic!("task {id} waits until {until} unexpectedly"),
        }
    }

    /// Adopts the dispatcher's placement of tasks an operation may (re)place.
    fn adopt(&mut self, d: &Dispatcher, ids: impl IntoIterator<Item = u64>) {
        for id in ids {
            let st = self.legal_placement(d, id);
            self.tasks.get_mut(&id).unwrap().st = st;
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn spec(
        &self,
        id: u64,
        group: u8,
        tags: u8,
        priority: i32,
        delay: Option<u8>,
    ) -> (TaskSpec, MTask) {
        let tags = pick(TAGS, tags);
        let group = GROUPS[group as usize];
        let mut spec = TaskSpec::new(id, group)
            .tags(tags.iter().copied())
            .priority(priority);
        let mut st = St::Parked;
        if let Some(delay) = delay {
            let until = self.now + u64::from(delay);
            spec = spec.not_before(until);
            st = St::Waiting(until);
        }
        let t = MTask {
            group,
            tags,
            priority,
            seq: 0,
            attempt: 0,
            st,
        };
        (spec, t)
    }

    /// Places a task the model has just given a seq, unless it waits.
    fn adopt_unless_waiting(&mut self, d: &Dispatcher, id: u64) {
        if !matches!(self.tasks[&id].st, St::Waiting(_)) {
            self.adopt(d, [id]);
        }
    }

    fn apply(&mut self, d: &Dispatcher, op: &Op) {
        match op {
            Op::Register { w, groups, tags } => {
                let groups = pick(GROUPS, *groups);
                let tags = pick(TAGS, *tags);
                let got = d.register(
                    WorkerId(*w),
                    &groups.iter().collect::<Vec<_>>(),
                    &tags.iter().collect::<Vec<_>>(),
                );
                if self.workers.contains_key(w) {
                    assert_eq!(got, Err(Error::DuplicateWorker(WorkerId(*w))));
                    return;
                }
                let got = got.unwrap();
                self.workers.insert(*w, MWorker { groups, tags });
                // Exactly the queued tasks it can run gain it (fanout), or the parked ones it
                // can run are placed (on it: nothing else could run them).
                let mut backfilled = 0;
                let mut unparked = 0;
                let ids: Vec<u64> = self.tasks.keys().copied().collect();
                for id in ids {
                    let t = &self.tasks[&id];
                    if !self.candidates(t).contains(w) {
                        continue;
                    }
                    let new = match (&t.st, self.mode) {
                        (St::Parked, Mode::Fanout) => {
                            backfilled += 1;
                            St::Queued([*w].into())
                        }
                        (St::Parked, Mode::Balanced(_)) => {
                            unparked += 1;
                            St::Queued([*w].into())
                        }
                        (St::Queued(h), Mode::Fanout) => {
                            backfilled += 1;
                            let mut h = h.clone();
                            h.insert(*w);
                            St::Queued(h)
                        }
                        _ => continue,
                    };
                    self.tasks.get_mut(&id).unwrap().st = new;
                }
                assert_eq!((got.backfilled, got.unparked), (backfilled, unparked));
            }
            Op::Unregister { w } => {
                let got = d.unregister(WorkerId(*w));
                if self.workers.remove(w).is_none() {
                    assert_eq!(got, Err(Error::UnknownWorker(WorkerId(*w))));
                    return;
                }
                let got = got.unwrap();
                let mut affected = BTreeSet::new();
                for (id, t) in self.tasks.iter_mut() {
                    let hit = match &mut t.st {
                        St::Queued(h) => h.remove(w),
                        St::Running(r) => r == w,
                        St::Parked | St::Waiting(_) => false,
                    };
                    if hit {
                        affected.insert(*id);
                    }
                }
                let reported: BTreeSet<u64> = got.tasks.iter().map(|r| r.task.0).collect();
                assert_eq!(
                    reported, affected,
                    "unregister must report every task it held or ran"
                );
                self.adopt(d, affected);
            }
            Op::Submit {
                id,
                group,
                tags,
                priority,
                delay,
            } => {
                let (spec, mut t) = self.spec(*id, *group, *tags, *priority, *delay);
                let loads = self.loads();
                let got = d.submit(spec);
                if self.tasks.contains_key(id) {
                    assert_eq!(got, Err(Error::DuplicateTask(TaskId(*id))));
                    return;
                }
                got.unwrap();
                t.seq = self.next_seq();
                self.tasks.insert(*id, t);
                self.adopt_unless_waiting(d, *id);
                if let (Mode::Balanced(Strategy::LeastLoaded), St::Queued(h)) =
                    (self.mode, &self.tasks[id].st)
                {
                    let cands = self.candidates(&self.tasks[id]);
                    let load = |w: &u64| loads[w].0 + loads[w].1;
                    let min = cands.iter().map(load).min().unwrap();
                    assert_eq!(load(h.iter().next().unwrap()), min, "not least loaded");
                }
            }
            Op::SubmitBatch { tasks } => {
                let mut specs = Vec::new();
                let mut mtasks = Vec::new();
                let mut expect = Ok(());
                let mut seen = BTreeSet::new();
                for &(id, group, tags, priority) in tasks {
                    let (spec, t) = self.spec(id, group, tags, priority, None);
                    if expect.is_ok() {
                        if !seen.insert(id) {
                            expect = Err("dup in batch");
                        } else if self.tasks.contains_key(&id) {
                            expect = Err("taken");
                        }
                        if let Err(e) = expect {
                            let got = d.submit_many(specs.drain(..).chain([spec.clone()]));
                            match e {
                                "taken" => assert_eq!(got, Err(Error::DuplicateTask(TaskId(id)))),
                                _ => assert!(matches!(got, Err(Error::InvalidInput(_)))),
                            }
                            return;
                        }
                    }
                    specs.push(spec);
                    mtasks.push((id, t));
                }
                d.submit_many(specs).unwrap();
                for (id, mut t) in mtasks {
                    t.seq = self.next_seq();
                    self.tasks.insert(id, t);
                    self.adopt(d, [id]);
                }
            }
            Op::Fetch { w, max } => {
                let got = d.fetch(WorkerId(*w), *max);
                if !self.workers.contains_key(w) {
                    assert_eq!(got, Err(Error::UnknownWorker(WorkerId(*w))));
                    return;
                }
                let mut held: Vec<(i32, u64, u64)> = self
                    .tasks
                    .iter()
                    .filter(|(_, t)| matches!(&t.st, St::Queued(h) if h.contains(w)))
                    .map(|(id, t)| (-t.priority, t.seq, *id))
                    .collect();
                held.sort();
                let mut expect = Vec::new();
                for &(_, _, id) in held.iter().take(*max) {
                    let t = self.tasks.get_mut(&id).unwrap();
                    t.attempt += 1;
                    t.st = St::Running(*w);
                    expect.push((id, t.attempt));
                }
                let got: Vec<(u64, u32)> =
                    got.unwrap().iter().map(|a| (a.task.0, a.attempt)).collect();
                assert_eq!(got, expect, "fetch order or attempts");
            }
            Op::Complete {
                w,
                id,
                attempt_delta,
            }
            | Op::GiveBack {
                w,
                id,
                attempt_delta,
            } => {
                let attempt = self.tasks.get(id).map_or(1, |t| t.attempt) + attempt_delta;
                let give_back = matches!(op, Op::GiveBack { .. });
                let got = if give_back {
                    d.give_back(WorkerId(*w), TaskId(*id), attempt).map(drop)
                } else {
                    d.complete(WorkerId(*w), TaskId(*id), attempt)
                };
                let expect = if !self.workers.contains_key(w) {
                    Err(Error::UnknownWorker(WorkerId(*w)))
                } else if !self.tasks.contains_key(id) {
                    Err(Error::UnknownTask(TaskId(*id)))
                } else if self.tasks[id].st != St::Running(*w) || self.tasks[id].attempt != attempt
                {
                    Err(Error::StaleAttempt {
                        task: TaskId(*id),
                        attempt,
                        worker: WorkerId(*w),
                    })
                } else {
                    Ok(())
                };
                assert_eq!(got, expect);
                if expect.is_ok() {
                    if give_back {
                        self.tasks.get_mut(id).unwrap().st = St::Parked;
                        self.adopt(d, [*id]);
                    } else {
                        self.tasks.remove(id);
                    }
                }
            }
            Op::Retry {
                w,
                id,
                attempt_delta,
                delay,
            } => {
                let attempt = self.tasks.get(id).map_or(1, |t| t.attempt) + attempt_delta;
                let until = delay.map(|d| self.now + u64::from(d));
                let got = d.retry(WorkerId(*w), TaskId(*id), attempt, until);
                let expect = if !self.workers.contains_key(w) {
                    Err(Error::UnknownWorker(WorkerId(*w)))
                } else if !self.tasks.contains_key(id) {
                    Err(Error::UnknownTask(TaskId(*id)))
                } else if self.tasks[id].st != St::Running(*w) || self.tasks[id].attempt != attempt
                {
                    Err(Error::StaleAttempt {
                        task: TaskId(*id),
                        attempt,
                        worker: WorkerId(*w),
                    })
                } else {
                    Ok(())
                };
                assert_eq!(got.clone().map(drop), expect);
                if expect.is_ok() {
                    match until {
                        Some(until) => {
                            assert_eq!(got, Ok(TaskStatus::Waiting(until)));
                            self.tasks.get_mut(id).unwrap().st = St::Waiting(until);
                        }
                        None => {
                            self.tasks.get_mut(id).unwrap().st = St::Parked;
                            self.adopt(d, [*id]);
                        }
                    }
                }
            }
            Op::Advance { by } => {
                self.now += u64::from(*by);
                let due: Vec<u64> = self
                    .tasks
                    .iter()
                    .filter(|(_, t)| matches!(t.st, St::Waiting(u) if u <= self.now))
                    .map(|(id, _)| *id)
                    .collect();
                let got = d.release_due(self.now);
                assert_eq!(got.released, due.len(), "released at {}", self.now);
                for id in &due {
                    self.tasks.get_mut(id).unwrap().st = St::Parked;
                }
                self.adopt(d, due);
                let earliest = self
                    .tasks
                    .values()
                    .filter_map(|t| match t.st {
                        St::Waiting(u) => Some(u),
                        _ => None,
                    })
                    .min();
                if let Some(earliest) = earliest {
                    // The next time may name a dead entry, never one after a live one.
                    assert!(got.next.is_some_and(|n| n > self.now && n <= earliest));
                }
            }
            Op::Cancel { id } => {
                let got = d.cancel(TaskId(*id));
                match self.tasks.remove(id) {
                    None => assert_eq!(got, Err(Error::UnknownTask(TaskId(*id)))),
                    Some(MTask {
                        st: St::Running(w),
                        attempt,
                        ..
                    }) => assert_eq!(
                        got,
                        Ok(Cancelled::Running {
                            worker: WorkerId(w),
                            attempt
                        })
                    ),
                    Some(_) => assert_eq!(got, Ok(Cancelled::Queued)),
                }
            }
            Op::Update { id, priority, tags } => {
                let new_tags = tags.map(|m| pick(TAGS, m));
                let tag_list: Option<Vec<&str>> =
                    new_tags.as_ref().map(|t| t.iter().copied().collect());
                let got = d.update(TaskId(*id), *priority, tag_list.as_deref());
                let Some(t) = self.tasks.get_mut(id) else {
                    assert_eq!(got, Err(Error::UnknownTask(TaskId(*id))));
                    return;
                };
                if matches!(t.st, St::Running(_)) {
                    assert_eq!(got, Err(Error::NotQueued(TaskId(*id))));
                    return;
                }
                let got = got.unwrap();
                if let Some(p) = priority {
                    t.priority = *p;
                }
                if let Some(tags) = new_tags {
                    t.tags = tags;
                }
                if let St::Waiting(until) = t.st {
                    assert_eq!(
                        got,
                        TaskStatus::Waiting(until),
                        "a waiting task keeps waiting"
                    );
                } else {
                    self.adopt(d, [*id]);
                }
            }
            Op::Rebalance => {
                let before: BTreeMap<u64, St> = self
                    .tasks
                    .iter()
                    .map(|(id, t)| (*id, t.st.clone()))
                    .collect();
                let moved = d.rebalance();
                let queued: Vec<u64> = self
                    .tasks
                    .iter()
                    .filter(|(_, t)| matches!(t.st, St::Queued(_)))
                    .map(|(id, _)| *id)
                    .collect();
                self.adopt(d, queued);
                let changed = self
                    .tasks
                    .iter()
                    .filter(|(id, t)| before[*id] != t.st)
                    .count();
                assert_eq!(moved, changed, "rebalance count");
                if self.mode == Mode::Fanout {
                    assert_eq!(moved, 0);
                }
            }
        }
    }

    /// The dispatcher's full state equals the model's.
    fn check(&self, d: &Dispatcher) {
        if let Err(violation) = d.audit() {
            panic!("audit: {violation}");
        }
        for id in 0..TASK_IDS {
            let got = d.get(TaskId(id));
            let Some(t) = self.tasks.get(&id) else {
                assert_eq!(got, None, "task {id} should not be live");
                continue;
            };
            let got = got.unwrap_or_else(|| panic!("task {id} lost"));
            let st = match got.status {
                TaskStatus::Queued(h) => St::Queued(h.iter().map(|w| w.0).collect()),
                TaskStatus::Parked => St::Parked,
                TaskStatus::Running(w) => St::Running(w.0),
                TaskStatus::Waiting(until) => St::Waiting(until),
            };
            assert_eq!(st, t.st, "task {id} placement");
            assert_eq!(
                (got.attempt, got.priority),
                (t.attempt, t.priority),
                "task {id}"
            );
            assert_eq!(got.group, t.group);
            let tags: BTreeSet<&str> = got.tags.iter().map(String::as_str).collect();
            assert_eq!(tags, t.tags);
            if !matches!(st, St::Running(_) | St::Waiting(_)) {
                // Parked iff no live candidate; fanout holders are all live candidates.
                assert_eq!(st == St::Parked, self.candidates(t).is_empty(), "task {id}");
                if self.mode == Mode::Fanout {
                    if let St::Queued(h) = &st {
                        assert_eq!(*h, self.candidates(t));
                    }
                }
            }
        }
        let stats = d.stats();
        let loads: BTreeMap<u64, (usize, usize)> = stats
            .workers
            .iter()
            .map(|w| (w.id.0, (w.queued, w.running)))
            .collect();
        assert_eq!(loads, self.loads(), "per-worker counters");
        let parked = self.tasks.values().filter(|t| t.st == St::Parked).count();
        let running = self
            .tasks
            .values()
            .filter(|t| matches!(t.st, St::Running(_)))
            .count();
        let waiting = self
            .tasks
            .values()
            .filter(|t| matches!(t.st, St::Waiting(_)))
            .count();
        assert_eq!(
            (stats.tasks, stats.parked, stats.running, stats.waiting),
            (self.tasks.len(), parked, running, waiting)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn dispatcher_matches_the_sequential_model(
        mode in mode(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let d = Dispatcher::new(Config { mode, ..Config::default() }).unwrap();
        let mut m = Model { mode, workers: BTreeMap::new(), tasks: BTreeMap::new(), seq: 0, now: 0 };
        for op in &ops {
            m.apply(&d, op);
            m.check(&d);
        }
    }
}

//! The invariant checker: [`Dispatcher::audit`] compares the whole state with the invariants of
//! the crate docs (conservation, counters that agree, complete redistribution) and names the
//! first violation. The unit tests, the property and stress tests and every loom model call it
//! at rest.

use std::collections::{HashMap, HashSet};

use crate::config::Mode;
use crate::dispatcher::Dispatcher;
use crate::index::{Holders, Phase, Slot};
use crate::registry::{Class, Worker};
use crate::sync::Arc;
use crate::WorkerId;

impl Dispatcher {
    /// Checks the invariants of the crate docs against the whole state and describes the first
    /// violation found. Meaningful only at rest (no operation in flight); O(tasks + heap entries).
    /// The tests, the stress test and the loom models call it after every scenario.
    ///
    /// Checked: every live task is queued on ≥ 1 registered holder whose heap has a live copy of
    /// it, or parked (and in the parked set, and only then), or waiting (with its timer entry,
    /// and counted by the waiting gauge), or running on a registered worker
    /// whose running records hold that assignment; every registered worker's `queued` and
    /// `running` counters equal those recomputed from the tasks; no registered worker's queue is
    /// closed.
    pub fn audit(&self) -> std::result::Result<(), String> {
        let workers = self.registry.workers();
        let live: HashMap<WorkerId, &Arc<Worker>> = workers.iter().map(|w| (w.id, w)).collect();
        // What each worker's queue holds: live copies and running records, as (slot, generation).
        let mut copies: HashMap<WorkerId, HashSet<(Slot, u32)>> = HashMap::new();
        let mut records: HashMap<WorkerId, HashSet<(Slot, u32, u32)>> = HashMap::new();
        for w in &workers {
            let q = w.queue.lock();
            if q.closed {
                return Err(format!("registered worker {} has a closed queue", w.id));
            }
            let live_copies = q.heap.live_entries(&self.cells);
            copies.insert(w.id, live_copies.iter().map(|e| (e.slot, e.gen)).collect());
            let recs = q.running.iter().map(|r| (r.slot, r.gen, r.attempt));
            records.insert(w.id, recs.collect());
        }
        let is_live = |w: &Arc<Worker>| live.get(&w.id).is_some_and(|l| Arc::ptr_eq(l, w));
        let parked_ids: HashSet<crate::TaskId> = self.parked.lock().keys().copied().collect();
        let mut load: HashMap<WorkerId, (usize, usize)> =
            workers.iter().map(|w| (w.id, (0, 0))).collect();
        let mut parked = 0;
        // Fanout: each class's live heap entries, and how many queued tasks name the class.
        let classes = self.registry.classes();
        let class_copies: HashMap<*const Class, HashSet<(Slot, u32)>> = classes
            .iter()
            .map(|c| {
                let live = c.heap.lock().live_entries(&self.cells);
                (
                    Arc::as_ptr(c),
                    live.iter().map(|e| (e.slot, e.gen)).collect(),
                )
            })
            .collect();
        let mut class_load: HashMap<*const Class, usize> = HashMap::new();
        let timers: HashSet<crate::timers::Timer> = self.timers.entries().into_iter().collect();
        let mut waiting = 0;
        for (id, slot) in self.index.entries() {
            let Some(l) = self.lock_slot(id, slot) else {
                return Err(format!(
                    "task {id} is indexed at slot {slot}, which does not hold it"
                ));
            };
            match &l.st.phase {
                Phase::Queued {
                    holders,
                    parked: true,
                } => {
                    if !holders.is_empty() {
                        return Err(format!("task {id} is parked with holders"));
                    }
                    if !parked_ids.contains(&id) {
                        return Err(format!("task {id} is parked but not in the parked set"));
                    }
                    parked += 1;
                }
                Phase::Queued {
                    holders,
                    parked: false,
                } => match holders {
                    Holders::None => {
                        return Err(format!("task {id} is queued with no holder and not parked"));
                    }
                    Holders::One(h) => {
                        if !is_live(h) {
                            return Err(format!("task {id} is held by departed worker {}", h.id));
                        }
                        if !copies[&h.id].contains(&(slot, l.st.gen)) {
                            return Err(format!("task {id}: holder {} has no live copy", h.id));
                        }
                        load.get_mut(&h.id).expect("live").0 += 1;
                    }
                    Holders::Class => {
                        let class = Arc::as_ptr(&l.st.class);
                        if !class_copies[&class].contains(&(slot, l.st.gen)) {
                            return Err(format!("task {id} is missing from its class's heap"));
                        }
                        *class_load.entry(class).or_default() += 1;
                    }
                },
                Phase::Running { worker } => {
                    if !is_live(worker) {
                        return Err(format!(
                            "task {id} is running on departed worker {}",
                            worker.id
                        ));
                    }
                    if !records[&worker.id].contains(&(slot, l.st.gen, l.st.attempt)) {
                        return Err(format!(
                            "task {id} runs on {} as attempt {} but no running record says so",
                            worker.id, l.st.attempt
                        ));
                    }
                    load.get_mut(&worker.id).expect("live").1 += 1;
                }
                Phase::Waiting { until } => {
                    let t = crate::timers::Timer {
                        until: *until,
                        slot,
                        gen: l.st.gen,
                    };
                    if !timers.contains(&t) {
                        return Err(format!("task {id} waits until {until} with no timer entry"));
                    }
                    waiting += 1;
                }
                Phase::Gone => return Err(format!("task {id} is gone but still indexed")),
            }
        }
        if waiting != self.waiting.get() {
            return Err(format!(
                "{waiting} tasks wait, but the waiting gauge says {}",
                self.waiting.get()
            ));
        }
        if parked != parked_ids.len() {
            return Err(format!(
                "parked set has {} tasks, {parked} are marked parked",
                parked_ids.len()
            ));
        }
        for c in &classes {
            let expected = class_load.get(&Arc::as_ptr(c)).copied().unwrap_or(0);
            if c.queued.get() != expected {
                return Err(format!(
                    "class in group {}: counter says {} queued, tasks say {expected}",
                    c.group_name,
                    c.queued.get()
                ));
            }
        }
        for w in &workers {
            if self.config.mode == Mode::Fanout {
                let served = w.classes.lock().clone();
                let want = classes.iter().filter(|c| w.serves(c)).count();
                if served.len() != want {
                    return Err(format!(
                        "worker {} lists {} classes but serves {want}",
                        w.id,
                        served.len()
                    ));
                }
                let expected: usize = served
                    .iter()
                    .map(|c| class_load.get(&Arc::as_ptr(c)).copied().unwrap_or(0))
                    .sum();
                load.get_mut(&w.id).expect("live").0 = expected;
            }
            let counted = (self.queued_of(w), w.load.running());
            if counted != load[&w.id] {
                return Err(format!(
                    "worker {}: counters (queued, running) = {counted:?}, tasks say {:?}",
                    w.id, load[&w.id]
                ));
            }
        }
        Ok(())
    }
}

#[cfg(all(test, not(switchyard_loom)))]
mod tests {
    use crate::{Config, Dispatcher, Strategy, TaskSpec, WorkerId};

    const W1: WorkerId = WorkerId(1);

    /// A dispatcher at rest with a queued, a running and a parked task, and what `audit` says
    /// after `corrupt` damages it.
    fn audit_after(config: Config, corrupt: impl FnOnce(&Dispatcher)) -> Result<(), String> {
        let d = Dispatcher::new(config).unwrap();
        d.register(W1, &["g"], &[] as &[&str]).unwrap();
        d.submit_many([
            TaskSpec::new(1, "g").priority(1),
            TaskSpec::new(2, "g"),
            TaskSpec::new(3, "nobody"),
        ])
        .unwrap();
        d.fetch(W1, 1).unwrap();
        d.audit().expect("a healthy dispatcher passes");
        corrupt(&d);
        d.audit()
    }

    /// Damage done to a dispatcher at rest.
    type Corruption = Box<dyn FnOnce(&Dispatcher)>;

    fn balanced() -> Config {
        Config::balanced(Strategy::RoundRobin)
    }

    #[test]
    fn audit_names_each_kind_of_damage() {
        let w = |d: &Dispatcher| d.registry.get(W1).unwrap();
        let cases: Vec<(&str, Config, Corruption)> = vec![
            (
                "queued count",
                balanced(),
                Box::new(move |d| w(d).load.queued.inc()),
            ),
            (
                "running count",
                balanced(),
                Box::new(move |d| w(d).load.inc_running()),
            ),
            (
                "lost copy",
                balanced(),
                Box::new(move |d| {
                    w(d).queue.lock().heap.pop();
                }),
            ),
            (
                "lost record",
                balanced(),
                Box::new(move |d| w(d).queue.lock().running.clear()),
            ),
            (
                "closed queue",
                balanced(),
                Box::new(move |d| w(d).queue.lock().closed = true),
            ),
            (
                "parked set",
                balanced(),
                Box::new(|d| d.parked.lock().clear()),
            ),
            (
                "class count",
                Config::default(),
                Box::new(|d| {
                    d.registry.classes()[0].queued.inc();
                }),
            ),
            (
                "class heap",
                Config::default(),
                Box::new(|d| {
                    for c in d.registry.classes() {
                        c.heap.lock().pop();
                    }
                }),
            ),
        ];
        for (what, config, corrupt) in cases {
            let verdict = audit_after(config, corrupt);
            assert!(verdict.is_err(), "{what}: damage went unnoticed");
        }
    }
}

//! Helpers shared by the dispatcher's integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use switchyard::{Dispatcher, TaskId, TaskStatus, WorkerId};

/// Runs the dispatcher's own audit, then independently recomputes each worker's queued/running load from the task snapshots of `tasks` (every live
/// task must be among them) and asserts it equals the counters `stats()` reports (invariant 3),
/// that every holder and runner is live (invariants 1 and 4), and that totals add up.
pub fn assert_counters_agree(d: &Dispatcher, tasks: impl IntoIterator<Item = TaskId>) {
    if let Err(violation) = d.audit() {
        panic!("audit: {violation}");
    }
    let stats = d.stats();
    let live: BTreeMap<WorkerId, (usize, usize)> =
        stats.workers.iter().map(|w| (w.id, (0, 0))).collect();
    let mut expect = live.clone();
    let (mut n, mut parked, mut running, mut waiting) = (0, 0, 0, 0);
    for id in tasks {
        let Some(info) = d.get(id) else { continue };
        n += 1;
        match info.status {
            TaskStatus::Queued(holders) => {
                assert!(
                    !holders.is_empty(),
                    "task {id} queued with no holder and not parked"
                );
                for h in holders {
                    let slot = expect
                        .get_mut(&h)
                        .unwrap_or_else(|| panic!("task {id} held by departed worker {h}"));
                    slot.0 += 1;
                }
            }
            TaskStatus::Parked => parked += 1,
            TaskStatus::Waiting(_) => waiting += 1,
            TaskStatus::Running(w) => {
                running += 1;
                expect
                    .get_mut(&w)
                    .unwrap_or_else(|| panic!("task {id} running on departed worker {w}"))
                    .1 += 1;
            }
        }
    }
    let actual: BTreeMap<WorkerId, (usize, usize)> = stats
        .workers
        .iter()
        .map(|w| (w.id, (w.queued, w.running)))
        .collect();
    assert_eq!(
        actual, expect,
        "per-worker (queued, running) counters disagree with the index"
    );
    assert_eq!(stats.tasks, n, "live task count");
    assert_eq!(stats.parked, parked, "parked count");
    assert_eq!(stats.running, running, "running count");
    assert_eq!(stats.waiting, waiting, "waiting count");
    assert_eq!(stats.queued, n - running - parked - waiting, "queued count");
    // Balanced: every queued task is an entry in its holder's heap (fanout tasks wait in
    // their class's heap instead).
    if let switchyard::Mode::Balanced(_) = d.config().mode {
        for w in &stats.workers {
            assert!(
                w.heap_len >= w.queued,
                "worker {} heap shorter than its queued count",
                w.id
            );
        }
    }
}

pub fn ids(range: std::ops::Range<u64>) -> impl Iterator<Item = TaskId> {
    range.map(TaskId)
}

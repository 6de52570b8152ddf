//! Placement policy: where a task waits, and which of its live candidates hold it.
//!
//! The policy is kept apart from the primitives (heaps, cells, counters): it sees a candidate list
//! and the load counters and returns a [`Decision`] or an index, nothing more. The dispatcher
//! carries the decision out (`Dispatcher::place`); rebalancing asks [`worth_moving`] and
//! [`least_loaded_other`] which moves to make.
//!
//! * **Parking** — a balanced task with no live candidate is parked until one registers. A
//!   fanout task never is: it waits in its class heap, which the next candidate reads.
//!
//! * **Fanout** — every candidate: the task waits in its class's shared heap, which they all read
//!   (late binding, as in Sparrow: the first worker to fetch the task runs it).
//! * **LeastLoaded** — the candidate with the least `queued + running × weight`. The scan starts at
//!   a rotating offset and keeps the *first* minimum it meets, so ties go round-robin and never to
//!   whichever candidate happens to be listed first. O(candidates).
//! * **RoundRobin** — the next candidate after the class's rotating cursor. O(1).
//! * **PowerOfTwoChoices** — the less loaded of two distinct candidates drawn at random
//!   (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing"); exponentially better
//!   maximum load than one random choice, O(1) however many candidates there are.
//!
//! Random draws hash the class cursor with SplitMix64 rather than using a thread-local generator:
//! the result depends only on the order of operations, which keeps loom models deterministic.

use crate::config::{Mode, Strategy};
use crate::registry::Worker;
use crate::sync::{Arc, AtomicUsize, Ordering};

/// Where a queued task with no holder goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Into its class's shared heap (fanout), with or without live candidates.
    Class,
    /// Into the heap of `candidates[i]` (balanced).
    One(usize),
    /// Into the parked set: balanced, and no live candidate.
    Park,
}

/// The placement of a task whose live candidates are `candidates`, under `mode`.
pub(crate) fn decide(
    mode: Mode,
    candidates: &[Arc<Worker>],
    cursor: &AtomicUsize,
    running_weight_milli: u64,
) -> Decision {
    match mode {
        Mode::Fanout => Decision::Class,
        Mode::Balanced(_) if candidates.is_empty() => Decision::Park,
        Mode::Balanced(strategy) => {
            Decision::One(choose(strategy, candidates, cursor, running_weight_milli))
        }
    }
}

/// The candidate (index into `candidates`, which must not be empty) that balanced placement
/// chooses. `cursor` is the class's rotating cursor.
pub(crate) fn choose(
    strategy: Strategy,
    candidates: &[Arc<Worker>],
    cursor: &AtomicUsize,
    running_weight_milli: u64,
) -> usize {
    let n = candidates.len();
    debug_assert!(n > 0, "choose needs a candidate");
    if n == 1 {
        return 0;
    }
    // Relaxed: the cursor only spreads choices; no other data is published through it.
    let tick = cursor.fetch_add(1, Ordering::Relaxed);
    let load = |i: usize| candidates[i].load.weighted(running_weight_milli);
    match strategy {
        Strategy::RoundRobin => tick % n,
        Strategy::LeastLoaded => {
            let start = tick % n;
            let mut best = start;
            let mut best_load = load(start);
            for step in 1..n {
                let i = (start + step) % n;
                let l = load(i);
                if l < best_load {
                    best = i;
                    best_load = l;
                }
            }
            best
        }
        Strategy::PowerOfTwoChoices => {
            let r = splitmix64(tick as u64);
            let a = (r % n as u64) as usize;
            // A second, distinct candidate.
            let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
            if load(b) < load(a) {
                b
            } else {
                a
            }
        }
    }
}

/// The least loaded candidate other than `exclude`, for rebalancing: `(index, load)`.
pub(crate) fn least_loaded_other(
    candidates: &[Arc<Worker>],
    exclude: &Arc<Worker>,
    running_weight_milli: u64,
) -> Option<(usize, u64)> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, w)| !Arc::ptr_eq(w, exclude))
        .map(|(i, w)| (i, w.load.weighted(running_weight_milli)))
        .min_by_key(|&(_, l)| l)
}

/// SplitMix64's finaliser: a well-mixed 64-bit value from a counter.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether `rebalance` should move one queued task from a worker of load `src` to one of load
/// `dst` (loads in thousandths of a queued task, see `Load::weighted`). The gap must be at least
/// two tasks: moving one task across a one-task gap only swaps the imbalance. And `src` must
/// exceed `ratio` times `dst` (`Config::rebalance_ratio`), so near-balanced workers are left
/// alone.
pub(crate) fn worth_moving(src: u64, dst: u64, ratio: f64) -> bool {
    /// Two queued tasks, in thousandths.
    const MIN_GAP: u64 = 2 * 1000;
    src >= dst + MIN_GAP && src as f64 > ratio * dst as f64
}

#[cfg(all(test, not(switchyard_loom)))]
mod tests {
    use super::{choose, decide, worth_moving, Decision};
    use crate::config::{Mode, Strategy};
    use crate::registry::{Registry, Worker};
    use crate::sync::{Arc, AtomicUsize};
    use crate::{Limits, WorkerId};

    /// Workers whose queued counts are `loads`.
    fn workers(loads: &[usize]) -> Vec<Arc<Worker>> {
        let r = Registry::new(4, Limits::default());
        let none: &[&str] = &[];
        loads
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let w = r.new_worker(WorkerId(i as u64), &["g"], none).unwrap();
                (0..n).for_each(|_| w.load.queued.inc());
                w
            })
            .collect()
    }

    fn picks(strategy: Strategy, loads: &[usize], n: usize) -> Vec<usize> {
        let (ws, cursor) = (workers(loads), AtomicUsize::new(0));
        (0..n)
            .map(|_| choose(strategy, &ws, &cursor, 1000))
            .collect()
    }

    #[test]
    fn two_choices_are_two_distinct_candidates() {
        // With two candidates, two distinct draws always include the empty one.
        assert!(picks(Strategy::PowerOfTwoChoices, &[5, 0], 200)
            .iter()
            .all(|&i| i == 1));
        // With three, the most loaded is never chosen: its pair is always less loaded.
        let p = picks(Strategy::PowerOfTwoChoices, &[9, 0, 5], 300);
        assert!(p.iter().all(|&i| i != 0), "{p:?}");
        assert!(
            p.contains(&1) && p.contains(&2),
            "both others are drawn: {p:?}"
        );
        // Every pair is drawn, not only neighbours: with loads [1, 9, 2, 9, 9], candidate 2
        // wins when it is drawn without candidate 0, which uniform pairs make 3 draws in 10
        // (2/5 − 1/10); pairs of neighbours only would make it 2 in 5.
        let p = picks(Strategy::PowerOfTwoChoices, &[1, 9, 2, 9, 9], 10_000);
        let twos = p.iter().filter(|&&i| i == 2).count();
        assert!(
            (2_700..3_300).contains(&twos),
            "candidate 2 chosen {twos} times in 10,000"
        );
    }

    #[test]
    fn least_loaded_and_round_robin_choose_as_documented() {
        assert!(picks(Strategy::LeastLoaded, &[3, 1, 2], 30)
            .iter()
            .all(|&i| i == 1));
        assert_eq!(
            picks(Strategy::LeastLoaded, &[1, 1], 4),
            [0, 1, 0, 1],
            "ties alternate"
        );
        let p = picks(Strategy::LeastLoaded, &[1, 1, 4], 30);
        assert!(!p.contains(&2) && p.contains(&0) && p.contains(&1), "{p:?}");
        assert_eq!(
            picks(Strategy::RoundRobin, &[9, 0, 0], 6),
            [0, 1, 2, 0, 1, 2]
        );
        assert_eq!(picks(Strategy::RoundRobin, &[4], 3), [0, 0, 0]);
    }

    #[test]
    fn decide_parks_only_balanced_tasks_without_candidates() {
        let cursor = AtomicUsize::new(0);
        let ws = workers(&[2, 0]);
        let balanced = Mode::Balanced(Strategy::LeastLoaded);
        assert_eq!(decide(Mode::Fanout, &[], &cursor, 1000), Decision::Class);
        assert_eq!(decide(Mode::Fanout, &ws, &cursor, 1000), Decision::Class);
        assert_eq!(decide(balanced, &[], &cursor, 1000), Decision::Park);
        assert_eq!(decide(balanced, &ws, &cursor, 1000), Decision::One(1));
    }

    #[test]
    fn a_move_needs_a_two_task_gap_and_the_ratio() {
        // One task against none is a one-task gap: moving it only swaps the imbalance.
        assert!(!worth_moving(1000, 0, 1.5));
        assert!(worth_moving(2000, 0, 1.5));
        assert!(!worth_moving(1999, 0, 1.5), "just under two tasks");
        // 4 against 3: under two tasks apart.
        assert!(!worth_moving(4000, 3000, 1.0));
        // 5 against 3: two apart, and 5 > 1.5 × 3 but not > 2 × 3.
        assert!(worth_moving(5000, 3000, 1.5));
        assert!(!worth_moving(5000, 3000, 2.0));
        // Exactly the ratio is balanced enough.
        assert!(!worth_moving(6000, 3000, 2.0));
        assert!(worth_moving(6001, 3000, 2.0));
    }
}

//! Races on the claim: two holders fetching one fanout task, cancel against fetch, and a
//! rebalance move against a claim.
#![cfg(switchyard_loom)]

use loom::thread;
use switchyard::{Cancelled, Mode, Mutant, TaskId, TaskSpec, TaskStatus};
use switchyard_loom_tests::*;

/// **Invariants 2 and 3**: two candidates fetch one fanout task at once. The task waits once,
/// in its class's heap: exactly one fetch gets it, and both workers' queued counts drop. (Its
/// protection is the heap's lock — one pop — which safe code cannot remove, so this model has
/// no mutant; the next one shows the claim's own re-check failing when removed.)
#[test]
fn two_candidates_claim_one_fanout_task() {
    model("fanout claim: two candidates fetch one task", || {
        let d = dispatcher(Mode::Fanout, None);
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.register(W2, &["g"], NO_TAGS).unwrap();
        d.submit(TaskSpec::new(1, "g")).unwrap();
        let d2 = d.clone();
        let t = thread::spawn(move || d2.fetch(W2, 1).unwrap());
        let a = d.fetch(W1, 1).unwrap();
        let b = t.join().unwrap();
        assert_eq!(a.len() + b.len(), 1, "exactly one assignment: {a:?} {b:?}");
        let s = d.stats();
        assert!(s.workers.iter().all(|w| w.queued == 0), "both counts drop");
        assert_eq!(s.running, 1);
        at_rest(&d);
    });
}

/// **Invariant 2 (exclusive claim)**: a rebalance moves a queued task from W1 to W2 while both
/// fetch. The old copy (on W1) and the new one (on W2) can both pass the lock-free liveness
/// check; the re-check under the cell lock lets exactly one of them claim it.
fn moved_task_claimed_once(mutant: Option<Mutant>) {
    model(
        "moved task: old and new holder fetch while it moves",
        move || {
            let d = dispatcher(balanced(), mutant);
            d.register(W1, &["g"], NO_TAGS).unwrap();
            d.submit(TaskSpec::new(0, "g")).unwrap();
            d.fetch(W1, 1).unwrap(); // W1 runs task 0...
            d.submit(TaskSpec::new(1, "g")).unwrap(); // ...and holds task 1: load 2
            d.register(W2, &["g"], NO_TAGS).unwrap(); // load 0: a rebalance moves task 1
            let (d2, d3) = (d.clone(), d.clone());
            let mover = thread::spawn(move || d2.rebalance());
            let new_holder = thread::spawn(move || d3.fetch(W2, 1).unwrap());
            let old = d.fetch(W1, 1).unwrap();
            mover.join().unwrap();
            let new = new_holder.join().unwrap();
            assert!(
                old.len() + new.len() <= 1,
                "task 1 assigned twice: {old:?} {new:?}"
            );
            at_rest(&d);
        },
    );
}

#[test]
fn moved_task_is_claimed_once() {
    moved_task_claimed_once(None);
}

/// Without the re-check under the cell lock, both copies' fetches claim: the model must catch it.
#[test]
#[should_panic(expected = "assigned twice")]
fn mutant_claim_without_recheck_is_caught() {
    moved_task_claimed_once(Some(Mutant::ClaimWithoutRecheck));
}

/// **Invariant 2 and 6**: cancel against fetch of the same task. Either the fetch gets it and the
/// cancel reports it running (the assignment is revoked), or the cancel wins and no fetch
/// returns it.
#[test]
fn cancel_races_fetch() {
    model("cancel vs fetch", || {
        let d = dispatcher(Mode::Fanout, None);
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.submit(TaskSpec::new(1, "g")).unwrap();
        let d2 = d.clone();
        let t = thread::spawn(move || d2.cancel(TaskId(1)).unwrap());
        let got = d.fetch(W1, 1).unwrap();
        let cancelled = t.join().unwrap();
        match (got.as_slice(), cancelled) {
            ([a], Cancelled::Running { worker, attempt }) => {
                assert_eq!((worker, attempt), (W1, a.attempt));
                assert!(d.complete(W1, TaskId(1), a.attempt).is_err(), "revoked");
            }
            ([], Cancelled::Queued) => {}
            other => panic!("inconsistent outcome {other:?}"),
        }
        assert!(d.get(TaskId(1)).is_none());
        at_rest(&d);
    });
}

/// **Invariants 1 and 2**: a rebalance moves a queued task while its holder fetches. Each task
/// ends either running on the fetcher (claimed once) or queued on exactly one worker.
#[test]
fn rebalance_move_races_claim() {
    model("rebalance move vs claim", || {
        let d = dispatcher(balanced(), None);
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.submit_many([TaskSpec::new(1, "g"), TaskSpec::new(2, "g")])
            .unwrap();
        d.register(W2, &["g"], NO_TAGS).unwrap();
        let d2 = d.clone();
        let t = thread::spawn(move || d2.rebalance());
        let got = d.fetch(W1, 2).unwrap();
        let moved = t.join().unwrap();
        assert!(moved <= 1, "ratio 1 moves at most one of two tasks");
        for task in [1, 2] {
            let fetched = got.iter().any(|a| a.task == TaskId(task));
            match status(&d, task).expect("never lost") {
                TaskStatus::Running(w) => assert!(fetched && w == W1),
                TaskStatus::Queued(h) => assert!(!fetched && h.len() == 1),
                other => panic!("task {task} is {other:?} with live candidates"),
            }
        }
        at_rest(&d);
    });
}

/// **Invariants 1 and 2** on the multi-class fanout fetch: W1 serves two classes (no tags, and
/// tag `t`) and picks the best head over both, without holding their locks while it compares;
/// W2 serves only the first class and takes that class's head at the same time. W1 must take
/// a head only if it is still the head when it pops: every task ends running once or still
/// queued with its entry, and the audit finds every queued task in its class's heap.
fn multi_class_fetch_against_a_claim(mutant: Option<Mutant>) {
    model(
        "fanout fetch over two classes vs a claim in one",
        move || {
            let d = dispatcher(Mode::Fanout, mutant);
            d.register(W1, &["g"], &["t"]).unwrap(); // classes (g) and (g, t)
            d.register(W2, &["g"], NO_TAGS).unwrap(); // class (g) only
            d.submit_many([
                TaskSpec::new(1, "g").priority(9),
                TaskSpec::new(3, "g").priority(1),
                TaskSpec::new(2, "g").tags(["t"]).priority(5),
            ])
            .unwrap();
            let d2 = d.clone();
            let t = thread::spawn(move || d2.fetch(W2, 1).unwrap());
            let a = d.fetch(W1, 1).unwrap();
            let b = t.join().unwrap();
            // Every task comes out exactly once: the two fetches, then whatever is left.
            let rest = d.fetch(W1, 3).unwrap();
            let mut all: Vec<TaskId> = a.iter().chain(&b).chain(&rest).map(|x| x.task).collect();
            all.sort();
            assert_eq!(
                all,
                [TaskId(1), TaskId(2), TaskId(3)],
                "a queued task lost its entry or was assigned twice: {a:?} {b:?} {rest:?}"
            );
            at_rest(&d);
        },
    );
}

#[test]
fn multi_class_fetch_takes_only_a_current_head() {
    multi_class_fetch_against_a_claim(None);
}

/// Without the head check, W1 pops whatever is the head now and claims the stale one: the
/// popped task loses its entry. The model must catch it.
#[test]
#[should_panic(expected = "lost its entry")]
fn mutant_multi_class_fetch_without_head_check_is_caught() {
    multi_class_fetch_against_a_claim(Some(Mutant::FanoutPopsWithoutHeadCheck));
}

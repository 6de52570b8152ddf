//! Races on waiting tasks: the timer's release against a cancel, and against an update that
//! gives the task a new timer entry.
#![cfg(switchyard_loom)]

use loom::thread;
use switchyard::{Cancelled, Mode, Mutant, TaskId, TaskSpec, TaskStatus};
use switchyard_loom_tests::*;

/// **Invariant 1 (conservation)**: a waiting task is released by the timer while a user
/// cancels it. Either the release queues it and the cancel then removes it from the queue, or
/// the cancel ends it first and the release finds nothing; never both a cancelled task and a
/// queued copy.
#[test]
fn release_races_cancel() {
    model("release vs cancel of a waiting task", || {
        let d = dispatcher(Mode::Fanout, None);
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.submit(TaskSpec::new(1, "g").not_before(5)).unwrap();
        let d2 = d.clone();
        let t = thread::spawn(move || d2.release_due(5).released);
        assert_eq!(d.cancel(TaskId(1)), Ok(Cancelled::Queued));
        let released = t.join().unwrap();
        assert!(released <= 1);
        assert!(d.get(TaskId(1)).is_none(), "cancelled for good");
        assert!(
            d.fetch(W1, 1).unwrap().is_empty(),
            "no copy survives the cancel"
        );
        at_rest(&d);
    });
}

/// **Invariants 1 and 2**: a waiting task's priority changes while the timer releases it. The
/// update gives it a new timer entry and the old one dies; the release either queues it before
/// the update (which then places it afresh) or finds the old entry dead. Then a fetch, and a
/// release of whatever entry is left: a task handed out stays with its worker (a stale entry
/// must not pull a running task back into the queue), and one not yet handed out is queued
/// exactly once.
fn release_races_update(mutant: Option<Mutant>) {
    model("release vs update of a waiting task", move || {
        let d = dispatcher(balanced(), mutant);
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.submit(TaskSpec::new(1, "g").not_before(5)).unwrap();
        let d2 = d.clone();
        let t = thread::spawn(move || d2.release_due(5).released);
        let updated = d.update::<&str>(TaskId(1), Some(3), None).unwrap();
        t.join().unwrap();
        assert!(
            matches!(updated, TaskStatus::Waiting(5) | TaskStatus::Queued(_)),
            "update put the task at {updated:?}"
        );
        let got = d.fetch(W1, 2).unwrap();
        d.release_due(5); // whatever entry is left is due
        match got.as_slice() {
            [a] => assert!(
                d.is_running(W1, TaskId(1), a.attempt),
                "a stale timer entry took a running task back"
            ),
            [] => {
                assert_eq!(status(&d, 1), Some(TaskStatus::Queued(vec![W1])));
                assert_eq!(d.fetch(W1, 2).unwrap().len(), 1, "queued once");
            }
            more => panic!("fetched {more:?}"),
        }
        at_rest(&d);
    });
}

#[test]
fn release_races_update_of_a_waiting_task() {
    release_races_update(None);
}

/// Without the release's re-check, the update's old and new timer entries both queue the task:
/// the model must catch it.
#[test]
#[should_panic(expected = "took a running task back")]
fn mutant_release_without_recheck_is_caught() {
    release_races_update(Some(Mutant::ReleaseWithoutRecheck));
}

//! Races around a worker arriving: fanout backfill against a submission, and parking against a
//! registration.
#![cfg(switchyard_loom)]

use loom::thread;
use switchyard::{Mode, TaskSpec, TaskStatus};
use switchyard_loom_tests::*;

/// **Invariant 1 (and fanout placement)**: a worker registers while a task of a new class is
/// submitted (creating the class races with computing the worker's class list). Whichever comes
/// first, both workers end up holding the task, and the new worker can fetch it.
#[test]
fn fanout_backfill_races_submit() {
    model("register-with-backfill vs submit (fanout)", || {
        let d = dispatcher(Mode::Fanout, None);
        d.register(W1, &["g"], NO_TAGS).unwrap();
        let d2 = d.clone();
        let t = thread::spawn(move || d2.register(W2, &["g"], NO_TAGS).unwrap());
        d.submit(TaskSpec::new(1, "g")).unwrap();
        t.join().unwrap();
        let Some(TaskStatus::Queued(mut h)) = status(&d, 1) else {
            panic!("task not queued")
        };
        h.sort();
        assert_eq!(h, [W1, W2]);
        at_rest(&d);
        assert_eq!(
            d.fetch(W2, 1).unwrap().len(),
            1,
            "the new worker reads the class"
        );
    });
}

/// **Invariant 1 (parked only without a live candidate)**: a task with no candidate is submitted
/// while its first candidate registers. It must not stay parked: it ends queued on the worker.
#[test]
fn register_races_park() {
    model("register vs park (balanced)", || {
        let d = dispatcher(balanced(), None);
        let d2 = d.clone();
        let t = thread::spawn(move || d2.register(W1, &["g"], NO_TAGS).unwrap());
        d.submit(TaskSpec::new(1, "g")).unwrap();
        t.join().unwrap();
        assert_eq!(status(&d, 1), Some(TaskStatus::Queued(vec![W1])));
        at_rest(&d);
    });
}

//! Races around a worker leaving: against a fetch on its queue, a submission that chose it,
//! another departure, and a give-back.
#![cfg(switchyard_loom)]

use loom::thread;
use switchyard::{Error, Mutant, TaskId, TaskSpec, TaskStatus, Was};
use switchyard_loom_tests::*;

/// **Invariants 1, 2 and 4**: the worker holding a balanced task leaves while it fetches. The
/// task ends either assigned once (and then requeued by the departure as a running task) or
/// moved while queued — never lost, never both; either way it is queued on the other worker.
fn unregister_vs_fetch(mutant: Option<Mutant>) {
    model("unregister vs fetch on the departing worker", move || {
        let d = dispatcher(balanced(), mutant);
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.submit(TaskSpec::new(1, "g")).unwrap();
        d.register(W2, &["g"], NO_TAGS).unwrap();
        let d2 = d.clone();
        let t = thread::spawn(move || d2.unregister(W1).unwrap());
        let got = match d.fetch(W1, 1) {
            Ok(got) => got,
            Err(Error::UnknownWorker(_)) => Vec::new(),
            Err(e) => panic!("{e}"),
        };
        let departure = t.join().unwrap();
        assert_eq!(
            departure.tasks.len(),
            1,
            "the departure reports the task once"
        );
        let r = &departure.tasks[0];
        assert_eq!(r.now, TaskStatus::Queued(vec![W2]));
        match got.as_slice() {
            [a] => assert_eq!(r.was, Was::Running(a.attempt)),
            [] => assert_eq!(r.was, Was::Queued),
            _ => unreachable!(),
        }
        assert_eq!(
            status(&d, 1),
            Some(TaskStatus::Queued(vec![W2])),
            "never lost"
        );
        at_rest(&d);
    });
}

#[test]
fn unregister_races_fetch() {
    unregister_vs_fetch(None);
}

/// If the fetch lets go of its queue between pop and claim, the departure can empty the queue in
/// between and miss the task, which is then left running on a departed worker.
#[test]
#[should_panic(expected = "the departure reports the task once")]
fn mutant_fetch_unlocking_before_claim_is_caught() {
    unregister_vs_fetch(Some(Mutant::FetchUnlocksBeforeClaim));
}

/// **Invariants 1 and 4 (the closed-queue race)**: a submission chooses W1 (the least loaded)
/// while W1 leaves. The push into W1's closed queue fails and the submitter redirects the task:
/// it ends queued on W2, never in the departed worker's queue.
fn unregister_vs_submit(mutant: Option<Mutant>) {
    model(
        "unregister vs a submit that chose the departing worker",
        move || {
            let d = dispatcher(balanced(), mutant);
            // W2 holds one task and W1 none, so the submission below picks W1.
            d.register(W2, &["g"], NO_TAGS).unwrap();
            d.submit(TaskSpec::new(0, "g")).unwrap();
            d.register(W1, &["g"], NO_TAGS).unwrap();
            let d2 = d.clone();
            let t = thread::spawn(move || d2.unregister(W1).unwrap());
            d.submit(TaskSpec::new(1, "g")).unwrap();
            t.join().unwrap();
            assert_eq!(
                status(&d, 1),
                Some(TaskStatus::Queued(vec![W2])),
                "the task must be redirected to the worker that stays"
            );
            at_rest(&d);
        },
    );
}

#[test]
fn unregister_races_submit() {
    unregister_vs_submit(None);
}

/// Pushing into a closed queue strands the task with a departed holder.
#[test]
#[should_panic(expected = "redirected to the worker that stays")]
fn mutant_push_ignoring_closed_is_caught() {
    unregister_vs_submit(Some(Mutant::PushIgnoresClosed));
}

/// **Invariants 1 and 4**: with no other candidate, a submission racing the last candidate's
/// departure ends parked (and is placed when a candidate registers).
#[test]
fn last_candidate_leaves_during_submit() {
    model("unregister of the last candidate vs submit", || {
        let d = dispatcher(balanced(), None);
        d.register(W1, &["g"], NO_TAGS).unwrap();
        let d2 = d.clone();
        let t = thread::spawn(move || d2.unregister(W1).unwrap());
        d.submit(TaskSpec::new(1, "g")).unwrap();
        t.join().unwrap();
        assert_eq!(status(&d, 1), Some(TaskStatus::Parked));
        at_rest(&d);
        d.register(W2, &["g"], NO_TAGS).unwrap();
        assert_eq!(status(&d, 1), Some(TaskStatus::Queued(vec![W2])));
    });
}

/// **Invariants 1 and 4**: the holder of a balanced task and the worker it would move to leave
/// at once. The task ends on the one candidate left.
#[test]
fn two_workers_leave_at_once() {
    model("two departures at once", || {
        let d = dispatcher(balanced(), None);
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.submit(TaskSpec::new(1, "g")).unwrap();
        d.register(W2, &["g"], NO_TAGS).unwrap();
        d.register(W3, &["g"], NO_TAGS).unwrap();
        let d2 = d.clone();
        let t = thread::spawn(move || d2.unregister(W2).unwrap());
        d.unregister(W1).unwrap();
        t.join().unwrap();
        assert_eq!(status(&d, 1), Some(TaskStatus::Queued(vec![W3])));
        at_rest(&d);
    });
}

/// **Invariants 1, 4 and 6**: a worker gives a task back while it is being unregistered. The task
/// is queued once on the other worker, whichever won; the give-back either took effect or was
/// refused.
#[test]
fn give_back_races_unregister() {
    model("give-back vs unregister", || {
        let d = dispatcher(balanced(), None);
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.submit(TaskSpec::new(1, "g")).unwrap();
        let a = d.fetch(W1, 1).unwrap()[0];
        d.register(W2, &["g"], NO_TAGS).unwrap();
        let d2 = d.clone();
        let t = thread::spawn(move || d2.unregister(W1).unwrap());
        let given = d.give_back(W1, TaskId(1), a.attempt);
        let departure = t.join().unwrap();
        match given {
            Ok(_) => {} // it may have been placed on W1 and then moved by the departure
            Err(Error::UnknownWorker(_)) | Err(Error::StaleAttempt { .. }) => {
                assert_eq!(departure.tasks[0].was, Was::Running(a.attempt));
            }
            Err(e) => panic!("{e}"),
        }
        assert_eq!(status(&d, 1), Some(TaskStatus::Queued(vec![W2])));
        at_rest(&d);
    });
}

/// **Invariants 1 and 4**: a running task is seeded (a restart restoring it on its worker)
/// while that worker leaves. Whichever comes first, the task must not stay running on the
/// departed worker: it ends queued on the other candidate.
fn seed_vs_unregister(mutant: Option<Mutant>) {
    model("seed a running task vs its worker leaving", move || {
        let d = dispatcher(balanced(), mutant);
        d.register(W1, &["g"], NO_TAGS).unwrap();
        d.register(W2, &["g"], NO_TAGS).unwrap();
        let d2 = d.clone();
        let t = thread::spawn(move || d2.unregister(W1).unwrap());
        let seeded = d.seed([switchyard::SeedTask {
            spec: TaskSpec::new(1, "g"),
            attempt: 1,
            running_on: Some(W1),
        }]);
        t.join().unwrap();
        seeded.unwrap();
        assert_eq!(
            status(&d, 1),
            Some(TaskStatus::Queued(vec![W2])),
            "the seeded task stayed with its departed worker"
        );
        at_rest(&d);
    });
}

#[test]
fn a_seeded_task_follows_its_departing_worker() {
    seed_vs_unregister(None);
}

/// Recording the seeded task on a closed queue leaves it running on a worker that is gone.
#[test]
#[should_panic(expected = "departed worker")]
fn mutant_seed_ignoring_departure_is_caught() {
    seed_vs_unregister(Some(Mutant::SeedIgnoresDeparture));
}

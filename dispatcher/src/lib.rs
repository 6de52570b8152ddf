//! # Switchyard dispatcher
//!
//! An in-process dispatcher that hands tagged, prioritised tasks to workers. Each worker has its
//! own priority queue; a task goes to every matching worker (**fanout**: first fetch wins) or to
//! exactly one (**balanced**: least-loaded, round-robin or power-of-two-choices). Workers come
//! and go; their tasks are redistributed or parked, never lost, never handed out twice.
//!
//! ```
//! use switchyard::{Config, Dispatcher, Strategy, TaskSpec, TaskId, WorkerId};
//!
//! let d = Dispatcher::new(Config::balanced(Strategy::LeastLoaded))?;
//! d.register(WorkerId(1), &["render"], &["gpu"])?;
//! d.submit(TaskSpec::new(7, "render").tags(["gpu"]).priority(5))?;
//! let got = d.fetch(WorkerId(1), 10)?;
//! assert_eq!(got[0].task, TaskId(7));
//! d.complete(WorkerId(1), TaskId(7), got[0].attempt)?;
//! # Ok::<(), switchyard::Error>(())
//! ```
//!
//! ## Vocabulary
//! A **candidate** of a task serves the task's group and has every tag of the task. A **holder**
//! has a live copy of a queued task in its heap. A **claim** turns one holder's copy into an
//! assignment; every other copy dies at that instant. The **attempt** counts assignments and
//! fences stale reports. A task with no live candidate is **parked** until one registers. A
//! **waiting** task (submitted with `not_before`, or retried after a backoff) is in no queue
//! until the caller's timer releases it ([`Dispatcher::release_due`]).
//!
//! ## Shape
//! | module | what it holds |
//! |---|---|
//! | `sync` (private) | the only place naming `parking_lot`, `dashmap`, atomics or `loom` (the loom build in `sync/loom.rs`) |
//! | `queue` | heaps of 24-byte plain entries; a worker's running records and `closed` flag |
//! | `index` | the slab of task cells (each task's critical section) and the id → slot index |
//! | `registry` | workers, name interning, classes (candidate cache, fanout heap) |
//! | `limits` | input limits and the rules every group and tag name follows |
//! | `timers` | the timer heap: when each waiting task (delayed, or retried after a backoff) becomes fetchable |
//! | `placement` | **the placement policy**: class heap, one candidate or parked ([`Mode`]); which candidate (least-loaded, round-robin, power of two choices); when rebalancing moves a task |
//! | `dispatcher` | the [`Dispatcher`] and its operations, one child module each: `submit`, `fetch`, `reports`, `tasks` (cancel, update, get), `delays` (releasing waiting tasks), `placing` (placing and pushing), `redistribute` (register, unregister, parking, rebalance), `stats`, and `audit`, **the invariant checker** |
//! | `task` | the value types callers exchange: specs, assignments, snapshots, and what registration and departure report |
//!
//! Dependencies run one way, from the operations down to the data: `dispatcher` and its
//! children use `placement`, `registry`, `index` and `queue`; none of those names the
//! `Dispatcher`. The three data modules refer to each other's types, because the data does: a
//! task's cell (`index`) names the worker running it (`registry`), a worker owns its queue
//! (`queue`), and a queue entry is checked against its task's cell (`index`). Those references
//! are to types and their lock-free liveness check only; no operation flows round the cycle.
//!
//! **Balanced** tasks wait in their one holder's heap; each worker's heap has its own lock, so
//! fetches for different workers share no lock, and placement reads per-worker atomic load
//! counters without locks. **Fanout** tasks wait once, in the shared heap of their class — the
//! (group, tag set) pair that fixes their candidates — and a worker fetches the best live head
//! over the classes it serves. A fetch checks an entry with one atomic load and claims it in the
//! task's critical section.
//!
//! ### Why fanout uses class heaps, not copies
//! The first cut copied each fanout task into every candidate's heap, as the design card
//! suggested. A claim then left 63 dead copies that the other workers had to pop one by one, and
//! a profile of the fanout-claim benchmark (B3, 64 candidates, two fetchers) spent 88% of its
//! time in `BinaryHeap::pop`. Reading one shared heap per class keeps each worker's priority
//! order (the best head over its classes) and removes dead copies, backfill and per-copy memory.
//! Measured in one run each on the 2-vCPU machine (`benches/bench-report`, quick mode), against
//! the actor baseline: fanout submit 6.7× → 35×, fanout claim 2.7× → 23×, fanout removal 88× →
//! 159×, memory per task 0.49× → 0.04×. A worker serving k classes pays O(k) heap peeks per
//! fetch; workers usually serve a few.
//!
//! ## Invariants
//! These are what the unit tests, the property test, the stress test and the loom models check.
//!
//! 1. **Conservation.** Every live task is in exactly one place: queued (on one live holder in
//!    balanced mode; in its class's heap, held by every live candidate, in fanout), running on
//!    exactly one live worker, parked (no live candidate), or waiting (named by one live entry
//!    of the timer heap). No operation, interleaving or worker departure loses one.
//! 2. **Exclusive claim.** Concurrent fetches of the copies of one task assign it to exactly one
//!    worker.
//! 3. **Counters agree.** At rest, each worker's queued count equals the number of tasks it
//!    holds (balanced: its own counter; fanout: the sum of its classes' counters), and `running`
//!    the number it runs. Counters change only inside the task's critical section.
//! 4. **Redistribution is complete.** When `unregister` returns, every task the worker held or
//!    ran is queued on a live candidate or parked. A task being placed on the worker at the
//!    moment it leaves is redirected by its placer, not stranded.
//! 5. **Order.** A fetch returns the worker's highest-effective-priority live tasks; equal
//!    priorities are FIFO (by submission).
//! 6. **Fencing.** An assignment carries its attempt; a report for any other attempt is refused.
//!
//! ## Locks
//! One order everywhere: **worker queue → class heap**, and **worker queue → task cell → parked
//! set → class cache → registry**; a class heap is never held while a cell is locked, and the
//! index, the registry maps, the slab's free lists and a worker's class list are leaves. Entries
//! are pushed only after the critical section that chose them has ended (see the `dispatcher`
//! module docs in the source).
//!
//! The registry's **topology** lock (which serialises class creation against registration, so
//! each worker's class list is complete) is taken with no cell held: registration takes it
//! before it touches any task, and a new class is made before the task's critical section (a
//! submission's class is made while it is validated; an update's before it locks the task).
//! Under it, only leaves are taken (the class map, the name table, worker class lists).
//!
//! The candidate cache is an `RwLock` per class, not a lock-free snapshot: a placement takes
//! its read lock once (an uncontended `parking_lot` read lock is one atomic read-modify-write),
//! and it is written only after the registry changes. Measured by bench I (the cache's read as
//! the registry does it, `RwLock` against `arc-swap`, same run): equal with one reader (about
//! 10 ns a read, the shared list's reference count included); with two threads reading one
//! class at once, about 47 ns against 20 ns a read, because both readers write the lock's
//! cache line. That is a few percent of a contended submission (bench A), so the cache stays
//! an `RwLock`, which loom models directly; an `arc-swap` snapshot is the measured next step if
//! placement into one hot class from many threads becomes the bottleneck.
//!
//! ## Classes
//! Classes and interned names live as long as the dispatcher. [`Limits::max_classes`] bounds
//! them (a task of a new class beyond it is refused before any name is interned), so a stream
//! of one-off tag sets cannot grow memory without bound. A fanout fetch over several classes
//! reads each class's counter and locks only the heaps of non-empty ones (see the `fetch`
//! module): bench H measures a fetch with 64 classes at 1.2–1.5× and with 1,024 at 6–7× the
//! cost with one, in two runs (one atomic load per empty class, under 1 ns).
//!
//! ## Costs
//! * fetch: O(log n) per pop; fanout adds one counter load per class the worker serves and one
//!   heap peek per non-empty one. A dead
//!   entry (left by a cancel or re-placement) costs one pop and one atomic load.
//! * submit: O(log n) push; balanced LeastLoaded scans its candidates' counters; one
//!   candidate-list recomputation per class after the registry changes.
//! * cancel / complete: O(1): one counter, no heap touched (lazy deletion).
//! * unregister: O(its heap entries and running tasks); fanout reports the tasks of its classes.
//! * register: balanced O(parked); fanout O(classes).
//! * the first task of a new (group, tag set) class: O(workers), to add the class to the lists
//!   of the workers that serve it.

#![warn(missing_docs)]

mod config;
mod dispatcher;
mod error;
mod index;
mod limits;
mod placement;
mod queue;
mod registry;
mod sync;
mod task;
mod timers;

pub use config::{Config, Mode, Mutant, Strategy};
pub use dispatcher::{Counters, Dispatcher, Due, Stats, Waker, WorkerStats};
pub use error::{Error, Result};
pub use limits::Limits;
pub use task::{
    Assignment, Cancelled, Departure, Registration, Relocation, SeedTask, TaskInfo, TaskSpec,
    TaskStatus, Was,
};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl From<u64> for $name {
            fn from(id: u64) -> Self {
                Self(id)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// A task's caller-chosen id.
    TaskId
);
id_type!(
    /// A worker's caller-chosen id.
    WorkerId
);

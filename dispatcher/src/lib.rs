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
//! fences stale reports. A task with no live candidate is **parked** until one registers.
//!
//! ## Shape
//! | module | what it holds |
//! |---|---|
//! | [`sync`](crate::sync) (private) | the only place naming `parking_lot`, `dashmap`, atomics or `loom` |
//! | `queue` | one worker's heap of 24-byte entries, its running set and `closed` flag |
//! | `index` | task cells (the critical section) and the id → cell reverse index |
//! | `registry` | workers, name interning, the candidate cache per (group, tag set) class |
//! | `placement` | the policy: fanout, least-loaded, round-robin, power of two choices |
//! | `dispatcher` | submission, fetch, reports, updates; placing and pushing |
//! | `redistribute` | register/backfill, unregister, parking, rebalance |
//! | `stats` | counters and the snapshot |
//!
//! Fetches for different workers share no lock: a fetch locks its worker's heap, pops, checks the
//! copy with one atomic load, and claims it in the task's critical section. Balanced placement
//! reads per-worker atomic load counters without locks.
//!
//! ## Invariants
//! These are what the unit tests, the property test, the stress test and the loom models check.
//!
//! 1. **Conservation.** Every live task is in exactly one place: queued on one or more live
//!    holders, running on exactly one live worker, or parked. No operation, interleaving or
//!    worker departure loses one.
//! 2. **Exclusive claim.** Concurrent fetches of the copies of one task assign it to exactly one
//!    worker.
//! 3. **Counters agree.** At rest, each worker's `queued` counter equals the number of tasks that
//!    list it as a holder, and `running` the number it runs. Counters change only inside the
//!    task's critical section.
//! 4. **Redistribution is complete.** When `unregister` returns, every task the worker held or
//!    ran is queued on a live candidate or parked. A task being placed on the worker at the
//!    moment it leaves is redirected by its placer, not stranded.
//! 5. **Order.** A fetch returns the worker's highest-effective-priority live tasks; equal
//!    priorities are FIFO (by submission).
//! 6. **Fencing.** An assignment carries its attempt; a report for any other attempt is refused.
//!
//! ## Locks
//! One order everywhere: **worker queue → task cell → parked set → class cache → registry**;
//! index and registry map shards are leaves. Copies are pushed only after the critical section
//! that chose them has ended (see [`dispatcher`](crate::Dispatcher) docs in the source).
//!
//! ## Costs
//! * fetch: O(log n) per pop in the worker's heap, plus O(holders) counter decrements per claim;
//!   a dead copy costs one pop and one atomic load.
//! * submit: O(candidates) (fanout pushes a copy to each; balanced LeastLoaded scans their
//!   counters), plus one candidate-list recomputation per class after the registry changes.
//! * cancel / complete: O(holders) counter updates; no heap is touched (lazy deletion).
//! * unregister: O(entries in the departing heap + its running tasks).
//! * register: balanced O(parked); fanout O(live tasks) (the backfill scans the index).

#![warn(missing_docs)]

mod config;
mod dispatcher;
mod error;
mod index;
mod placement;
mod queue;
mod redistribute;
mod registry;
mod stats;
mod sync;
mod task;

pub use config::{Config, Limits, Mode, Mutant, Strategy};
pub use dispatcher::Dispatcher;
pub use error::{Error, Result};
pub use redistribute::{Departure, Placement, Registration, Relocation, Was};
pub use stats::{Counters, Stats, WorkerStats};
pub use task::{Assignment, Cancelled, SeedTask, TaskInfo, TaskSpec, TaskStatus};

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

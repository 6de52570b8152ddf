//! Helpers for the loom models in `tests/`. The models only exist under
//! `RUSTFLAGS="--cfg switchyard_loom"`, where the dispatcher's sync facade swaps in loom types:
//!
//! ```text
//! RUSTFLAGS="--cfg switchyard_loom" LOOM_MAX_PREEMPTIONS=2 \
//!     cargo test -p switchyard-loom-tests --release --target-dir target-loom
//! ```
//!
//! Each model is small (2–3 threads, 1–3 tasks, 2–3 workers), names in its doc comment the
//! invariant of the dispatcher's crate docs it checks, and ends with [`at_rest`]. The models of
//! invariants 2 and 4 also run against a *mutant* dispatcher with the protection removed and
//! must fail there — proof that they can.

#[cfg(switchyard_loom)]
pub use models::*;

#[cfg(switchyard_loom)]
mod models {
    use switchyard::{Config, Dispatcher, Mode, Mutant, Strategy, TaskId, TaskStatus, WorkerId};

    pub const W1: WorkerId = WorkerId(1);
    pub const W2: WorkerId = WorkerId(2);
    pub const W3: WorkerId = WorkerId(3);
    pub const NO_TAGS: &[&str] = &[];

    /// Runs `f` under loom (bounded by `LOOM_MAX_PREEMPTIONS`, 2 if unset), saying which model
    /// runs and how many executions it explored.
    pub fn model(name: &str, f: impl Fn() + Sync + Send + 'static) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        eprintln!("loom model: {name}");
        let mut builder = loom::model::Builder::new();
        if builder.preemption_bound.is_none() {
            builder.preemption_bound = Some(2);
        }
        // A plain std counter: loom does not model it, it only counts executions.
        let runs = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = runs.clone();
        builder.check(move || {
            counter.fetch_add(1, Ordering::Relaxed);
            f()
        });
        eprintln!(
            "loom model: {name}: {} executions",
            runs.load(Ordering::Relaxed)
        );
    }

    /// A dispatcher in `mode`, with `mutant` switched on if given.
    pub fn dispatcher(mode: Mode, mutant: Option<Mutant>) -> std::sync::Arc<Dispatcher> {
        let config = Config {
            mode,
            mutant,
            rebalance_ratio: 1.0,
            ..Config::default()
        };
        std::sync::Arc::new(Dispatcher::new(config).expect("valid config"))
    }

    pub fn balanced() -> Mode {
        Mode::Balanced(Strategy::LeastLoaded)
    }

    /// Invariant 3 (and 1 and 4 at rest): the dispatcher's audit finds nothing.
    pub fn at_rest(d: &Dispatcher) {
        if let Err(violation) = d.audit() {
            panic!("invariant violated at rest: {violation}");
        }
    }

    pub fn status(d: &Dispatcher, task: u64) -> Option<TaskStatus> {
        d.get(TaskId(task)).map(|t| t.status)
    }
}

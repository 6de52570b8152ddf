//! Configuration: placement mode, load weighting, aging, rebalancing threshold, sharding, and
//! the input [`Limits`](crate::Limits).

use crate::error::{Error, Result};
use crate::limits::Limits;

/// How a submitted task is placed on its candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every live candidate holds the task (it waits once, in its class's shared heap, which all
    /// candidates read); the first fetch claims it (late binding, as in Sparrow). A worker that
    /// registers later holds the queued tasks of its classes at once.
    Fanout,
    /// Exactly one candidate holds the task, chosen by the strategy.
    Balanced(Strategy),
}

/// How balanced placement chooses one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The candidate with the least `queued + running × running_weight`; ties are broken
    /// round-robin (a rotating start per candidate class), never by candidate order. O(candidates).
    LeastLoaded,
    /// Candidates in turn, one rotating cursor per candidate class. O(1).
    RoundRobin,
    /// The less loaded of two candidates drawn at random (Mitzenmacher; Sparrow's batch
    /// sampling uses the same idea). O(1) for any number of candidates.
    PowerOfTwoChoices,
}

/// Dispatcher configuration. `Config::default()` is fanout with strict priorities.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Placement mode.
    pub mode: Mode,
    /// Weight of a running task in a worker's load, relative to a queued one (balanced modes).
    pub running_weight: f64,
    /// Priority units a waiting task gains per second. `0.0` is strict priority.
    pub aging_rate: f64,
    /// `rebalance` stops moving work from a worker once its load is at most this multiple of
    /// the least loaded candidate it could move to. Must be ≥ 1.
    pub rebalance_ratio: f64,
    /// Input bounds.
    pub limits: Limits,
    /// Shard count of the concurrent maps (rounded up to a power of two).
    pub shards: usize,
    /// Model checking only: a protection to break on purpose, so a loom model can show that it
    /// fails without it.
    #[cfg(switchyard_loom)]
    #[doc(hidden)]
    pub mutant: Option<Mutant>,
}

/// Deliberately broken protections, for showing that loom models can fail. Only the
/// `switchyard_loom` build can switch one on.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutant {
    /// A claim trusts the lock-free liveness check and skips the re-check under the cell lock.
    ClaimWithoutRecheck,
    /// A fetch lets go of its queue lock while it claims, so `unregister` can empty and close the
    /// queue between the pop and the claim.
    FetchUnlocksBeforeClaim,
    /// A push ignores the `closed` flag of a departing worker's queue.
    PushIgnoresClosed,
    /// A fetch over several fanout classes pops the chosen class's heap without checking that
    /// the head it chose is still the head (another candidate may have taken it).
    FanoutPopsWithoutHeadCheck,
    /// A seeded running task is recorded on its worker even if the worker has left meanwhile.
    SeedIgnoresDeparture,
    /// A release of a due timer entry skips the check that the entry still names the task's
    /// waiting placement (its generation and phase).
    ReleaseWithoutRecheck,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Fanout,
            running_weight: 1.0,
            aging_rate: 0.0,
            rebalance_ratio: 1.5,
            limits: Limits::default(),
            shards: if cfg!(switchyard_loom) { 2 } else { 64 },
            #[cfg(switchyard_loom)]
            mutant: None,
        }
    }
}

impl Config {
    /// A balanced configuration with the given strategy and defaults otherwise.
    pub fn balanced(strategy: Strategy) -> Self {
        Self {
            mode: Mode::Balanced(strategy),
            ..Self::default()
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::InvalidInput(what.to_owned()));
        if !(self.running_weight.is_finite() && self.running_weight >= 0.0) {
            return bad("running_weight must be finite and ≥ 0");
        }
        if !(self.aging_rate.is_finite() && self.aging_rate >= 0.0) {
            return bad("aging_rate must be finite and ≥ 0");
        }
        if !(self.rebalance_ratio.is_finite() && self.rebalance_ratio >= 1.0) {
            return bad("rebalance_ratio must be finite and ≥ 1");
        }
        self.limits.validate()?;
        if self.shards == 0 || self.shards > 1 << 16 {
            return bad("shards must be in 1..=65536");
        }
        Ok(())
    }
}

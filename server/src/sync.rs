//! The coordinator's locks and atomics, named in one place, as the dispatcher's `sync` module
//! is for the dispatcher: every shared-state primitive in this crate comes from here, so they
//! can be swapped together (for a model checker, or instrumented locks).
//!
//! `parking_lot` locks (the same 0.12 that tokio and dashmap use): no poisoning, so a panic in
//! one request cannot wedge every later one on a poisoned lock.

pub use parking_lot::{Mutex, RwLock};
pub use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
pub use std::sync::{Arc, Weak};
/// The admission gate of coordinators sharing a database (`crate::sharing`): a lock held across
/// awaits (a step's commit), so an async one.
pub use tokio::sync::{OwnedRwLockReadGuard, RwLock as AsyncRwLock};

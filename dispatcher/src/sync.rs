//! The synchronisation facade: the only module that names `parking_lot`, `dashmap`,
//! `std::sync::atomic` or `loom`.
//!
//! Everything else in the crate imports its locks, atomics, `Arc` and concurrent map from here,
//! so that building with `RUSTFLAGS="--cfg switchyard_loom"` swaps every one of them for a type
//! the `loom` model checker can see. loom cannot see through `parking_lot` or `dashmap`: a model
//! that touched them would check nothing. Under that cfg the concurrent map becomes one loom mutex
//! around a `HashMap` — slower, but every interleaving of its users is explored.
//!
//! The wrappers expose exactly the operations the dispatcher needs, with the same signatures in
//! both builds, so no other module carries a `cfg`.

pub(crate) use crossbeam_utils::CachePadded;

/// Reference-counted *immutable* data (interned names, candidate lists). Its count orders
/// nothing the dispatcher relies on, so loom gains nothing from modelling it — and loom's `Arc`
/// can neither hold unsized values conveniently nor be hashed. Mutable shared state (workers,
/// task cells, classes) uses [`Arc`], which loom does model.
pub(crate) use std::sync::Arc as Shared;

/// One-time initialisation (the slab's pages, the waker), `std`'s in both builds: loom has no
/// `OnceLock`, and what it guards is created once and then only read — a page's cells are loom
/// objects made inside the model, and the models never race two first uses of one page.
pub(crate) use std::sync::OnceLock;

#[cfg(not(switchyard_loom))]
mod imp {
    pub(crate) use parking_lot::{Mutex, MutexGuard, RwLock};

    /// Runs `f` with `guard`'s lock released, then takes it again.
    pub(crate) fn unlocked<T, U>(guard: &mut MutexGuard<'_, T>, f: impl FnOnce() -> U) -> U {
        MutexGuard::unlocked(guard, f)
    }
    pub(crate) use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    pub(crate) use std::sync::Arc;

    use std::borrow::Borrow;
    use std::hash::Hash;

    /// The hasher of every hash map in the crate.
    pub(crate) type Hasher = foldhash::fast::RandomState;

    /// A sharded concurrent hash map (dashmap). Values are cheap handles (`Arc`s, ids) that are
    /// cloned out, so no shard lock is ever held while the caller takes another lock.
    pub(crate) struct Map<K, V>(dashmap::DashMap<K, V, Hasher>);

    impl<K: Eq + Hash, V: Clone> Map<K, V> {
        pub(crate) fn with_shards(shards: usize) -> Self {
            let shards = shards.max(2).next_power_of_two();
            Self(dashmap::DashMap::with_hasher_and_shard_amount(
                Hasher::default(),
                shards,
            ))
        }

        pub(crate) fn get<Q>(&self, key: &Q) -> Option<V>
        where
            K: Borrow<Q>,
            Q: Hash + Eq + ?Sized,
        {
            self.0.get(key).map(|v| v.value().clone())
        }

        pub(crate) fn contains<Q>(&self, key: &Q) -> bool
        where
            K: Borrow<Q>,
            Q: Hash + Eq + ?Sized,
        {
            self.0.contains_key(key)
        }

        /// Inserts `value` unless `key` is present; on conflict returns the present value.
        pub(crate) fn insert_new(&self, key: K, value: V) -> Result<(), V> {
            match self.0.entry(key) {
                dashmap::Entry::Occupied(o) => Err(o.get().clone()),
                dashmap::Entry::Vacant(v) => {
                    v.insert(value);
                    Ok(())
                }
            }
        }

        /// Returns the value for `key`, inserting `make()` first if absent.
        pub(crate) fn get_or_insert_with(&self, key: K, make: impl FnOnce() -> V) -> V {
            self.0.entry(key).or_insert_with(make).value().clone()
        }

        /// Removes `key` if its value satisfies `pred`; returns whether it did.
        pub(crate) fn remove_if<Q>(&self, key: &Q, pred: impl FnOnce(&V) -> bool) -> bool
        where
            K: Borrow<Q>,
            Q: Hash + Eq + ?Sized,
        {
            self.0.remove_if(key, |_, v| pred(v)).is_some()
        }

        /// Clones out every value (one shard lock at a time, none held on return).
        pub(crate) fn values(&self) -> Vec<V> {
            self.0.iter().map(|e| e.value().clone()).collect()
        }

        /// Clones out every entry (one shard lock at a time, none held on return).
        pub(crate) fn entries(&self) -> Vec<(K, V)>
        where
            K: Clone,
        {
            self.0
                .iter()
                .map(|e| (e.key().clone(), e.value().clone()))
                .collect()
        }

        pub(crate) fn len(&self) -> usize {
            self.0.len()
        }
    }
}

#[cfg(switchyard_loom)]
#[path = "sync/loom.rs"]
mod imp;

pub(crate) use imp::*;

//! The loom build of the sync facade (`--cfg switchyard_loom`): every lock and atomic is
//! loom's, and the concurrent map is one loom mutex around a `HashMap`. Kept in its own file so
//! mutation testing of the normal build can leave it out (`.cargo/mutants.toml`).

pub(crate) use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
pub(crate) use loom::sync::Arc;

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

/// A fixed-key hasher: loom replays executions, and a randomly seeded map would iterate in a
/// different order each time, which loom reports as non-determinism.
pub(crate) type Hasher = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

/// loom's mutex with `parking_lot`'s signature (no poisoning).
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(loom::sync::Mutex::new(value))
    }
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        MutexGuard {
            mutex: &self.0,
            guard: Some(self.0.lock().expect("a loom model thread panicked")),
        }
    }
}

/// A guard that can let go of its lock for a while (see [`unlocked`]).
pub(crate) struct MutexGuard<'a, T> {
    mutex: &'a loom::sync::Mutex<T>,
    guard: Option<loom::sync::MutexGuard<'a, T>>,
}

impl<T> std::ops::Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.guard.as_ref().expect("guard is held")
    }
}

impl<T> std::ops::DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.guard.as_mut().expect("guard is held")
    }
}

/// Runs `f` with `guard`'s lock released, then takes it again.
pub(crate) fn unlocked<T, U>(guard: &mut MutexGuard<'_, T>, f: impl FnOnce() -> U) -> U {
    guard.guard = None;
    let out = f();
    guard.guard = Some(guard.mutex.lock().expect("a loom model thread panicked"));
    out
}

/// loom's rwlock with `parking_lot`'s signature (no poisoning).
#[derive(Debug, Default)]
pub(crate) struct RwLock<T>(loom::sync::RwLock<T>);

impl<T> RwLock<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(loom::sync::RwLock::new(value))
    }
    pub(crate) fn read(&self) -> loom::sync::RwLockReadGuard<'_, T> {
        self.0.read().expect("a loom model thread panicked")
    }
    pub(crate) fn write(&self) -> loom::sync::RwLockWriteGuard<'_, T> {
        self.0.write().expect("a loom model thread panicked")
    }
}

/// The concurrent map as one loom-visible mutex around a `HashMap`.
pub(crate) struct Map<K, V>(Mutex<HashMap<K, V, Hasher>>);

impl<K: Eq + Hash, V: Clone> Map<K, V> {
    pub(crate) fn with_shards(_shards: usize) -> Self {
        Self(Mutex::new(HashMap::default()))
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().get(key).cloned()
    }

    pub(crate) fn contains<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().contains_key(key)
    }

    pub(crate) fn insert_new(&self, key: K, value: V) -> Result<(), V> {
        let mut map = self.0.lock();
        if let Some(present) = map.get(&key) {
            return Err(present.clone());
        }
        map.insert(key, value);
        Ok(())
    }

    pub(crate) fn get_or_insert_with(&self, key: K, make: impl FnOnce() -> V) -> V {
        self.0.lock().entry(key).or_insert_with(make).clone()
    }

    pub(crate) fn remove_if<Q>(&self, key: &Q, pred: impl FnOnce(&V) -> bool) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut map = self.0.lock();
        if map.get(key).is_some_and(pred) {
            map.remove(key);
            true
        } else {
            false
        }
    }

    pub(crate) fn values(&self) -> Vec<V> {
        self.0.lock().values().cloned().collect()
    }

    pub(crate) fn entries(&self) -> Vec<(K, V)>
    where
        K: Clone,
    {
        let map = self.0.lock();
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.lock().len()
    }
}

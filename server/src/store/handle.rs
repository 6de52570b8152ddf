//! The coordinator's handle on its store.
//!
//! Backends implement [`Store`] with blocking calls (SQLite does file I/O and fsync). The
//! coordinator never calls them on its async workers: every read goes through this handle,
//! which runs it on the blocking pool, and every write through the group-commit writer, which
//! does the same. So no call site knows which backend it talks to, or that it blocks.

use super::{
    AttemptRecord, IdKind, KeyRecord, ListFilter, Recovery, Store, StoreError, TaskRecord,
};
use crate::sync::Arc;

/// Async access to a [`Store`] (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct StoreHandle(Arc<dyn Store>);

impl StoreHandle {
    /// A handle on `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self(store)
    }

    /// The backend itself (for the writer, and for tests that read it directly).
    pub fn backend(&self) -> &Arc<dyn Store> {
        &self.0
    }

    /// Runs `call` on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || call(&*store))
            .await
            .unwrap_or_else(|e| Err(StoreError::Backend(format!("a store call panicked: {e}"))))
    }

    /// See [`Store::recover`].
    pub async fn recover(&self) -> Result<Recovery, StoreError> {
        self.run(|s| s.recover()).await
    }

    /// See [`Store::task`].
    pub async fn task(&self, id: u64) -> Result<Option<TaskRecord>, StoreError> {
        self.run(move |s| s.task(id)).await
    }

    /// See [`Store::tasks`].
    pub async fn tasks(&self, ids: Vec<u64>) -> Result<Vec<TaskRecord>, StoreError> {
        self.run(move |s| s.tasks(&ids)).await
    }

    /// See [`Store::list`].
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<TaskRecord>, StoreError> {
        self.run(move |s| s.list(&filter)).await
    }

    /// See [`Store::attempt`].
    pub async fn attempt(
        &self,
        task: u64,
        attempt: u32,
    ) -> Result<Option<AttemptRecord>, StoreError> {
        self.run(move |s| s.attempt(task, attempt)).await
    }

    /// See [`Store::key`].
    pub async fn key(&self, scope: u64, key: String) -> Result<Option<KeyRecord>, StoreError> {
        self.run(move |s| s.key(scope, &key)).await
    }

    /// See [`Store::reserve`].
    pub async fn reserve(&self, kind: IdKind, n: u64) -> Result<std::ops::Range<u64>, StoreError> {
        self.run(move |s| s.reserve(kind, n)).await
    }
}

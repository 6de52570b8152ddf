//! Ids for tasks, workers and tokens, from the store.
//!
//! A coordinator never counts ids itself: it reserves a block of [`BLOCK`] ids of a kind from
//! the store ([`Store::reserve`](crate::store::Store::reserve), atomic and durable), and hands
//! them out until the block is used up. Coordinators sharing a store get disjoint blocks, so
//! their ids never collide; a restart starts a fresh block, so ids after it are higher than any
//! before it (gaps are normal: ids are names, not counts).

use std::ops::Range;

use crate::store::{IdKind, StoreError, StoreHandle};
use crate::sync::Mutex;

/// Ids reserved from the store at a time.
pub const BLOCK: u64 = 1024;

/// The id allocators of one coordinator.
pub struct Ids {
    store: StoreHandle,
    tasks: Block,
    workers: Block,
    tokens: Block,
}

/// The unused part of one kind's reserved block.
struct Block {
    kind: IdKind,
    free: Mutex<Range<u64>>,
    /// One refill at a time: concurrent callers wait for it rather than reserve twice.
    refill: tokio::sync::Mutex<()>,
}

impl Block {
    fn new(kind: IdKind) -> Self {
        Self {
            kind,
            free: Mutex::new(0..0),
            refill: tokio::sync::Mutex::new(()),
        }
    }

    /// Takes `n` consecutive ids from the block, if it has them.
    fn take(&self, n: u64) -> Option<Range<u64>> {
        let mut free = self.free.lock();
        (free.end - free.start >= n).then(|| {
            let taken = free.start..free.start + n;
            free.start += n;
            taken
        })
    }

    async fn next(&self, store: &StoreHandle, n: u64) -> Result<Range<u64>, StoreError> {
        if let Some(ids) = self.take(n) {
            return Ok(ids);
        }
        let _refilling = self.refill.lock().await;
        // Another caller may have refilled while this one waited.
        if let Some(ids) = self.take(n) {
            return Ok(ids);
        }
        let kind = self.kind;
        let fresh = store.reserve(kind, n.max(BLOCK)).await?;
        let mut free = self.free.lock();
        *free = fresh;
        let taken = free.start..free.start + n;
        free.start += n;
        Ok(taken)
    }
}

impl Ids {
    /// Allocators that reserve from `store`.
    pub fn new(store: StoreHandle) -> Self {
        Self {
            store,
            tasks: Block::new(IdKind::Task),
            workers: Block::new(IdKind::Worker),
            tokens: Block::new(IdKind::Token),
        }
    }

    /// `n` consecutive task ids (a batch's).
    pub async fn tasks(&self, n: u64) -> Result<Range<u64>, StoreError> {
        self.tasks.next(&self.store, n).await
    }

    /// A worker id.
    pub async fn worker(&self) -> Result<u64, StoreError> {
        Ok(self.workers.next(&self.store, 1).await?.start)
    }

    /// A token id.
    pub async fn token(&self) -> Result<u64, StoreError> {
        Ok(self.tokens.next(&self.store, 1).await?.start)
    }
}

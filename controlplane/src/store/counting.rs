//! A `Store` that counts the requests it passes on, for tests that pin down what an operation
//! costs etcd (a warm login: one write).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Compare, KeyValue, Store, StoreResult, Transaction, TxnOp};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// get and range calls.
    pub reads: usize,
    /// put, delete and txn calls: each one etcd write request (a raft proposal).
    pub writes: usize,
    /// Keys those writes put or deleted.
    pub keys_written: usize,
}

pub struct CountingStore {
    inner: Arc<dyn Store>,
    reads: AtomicUsize,
    writes: AtomicUsize,
    keys_written: AtomicUsize,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            reads: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
            keys_written: AtomicUsize::new(0),
        }
    }

    pub fn counts(&self) -> Counts {
        Counts {
            reads: self.reads.load(Ordering::SeqCst),
            writes: self.writes.load(Ordering::SeqCst),
            keys_written: self.keys_written.load(Ordering::SeqCst),
        }
    }

    fn wrote(&self, keys: usize) {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.keys_written.fetch_add(keys, Ordering::SeqCst);
    }
}

super::wrap_store!(CountingStore, inner, {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get(key).await
    }

    async fn range(&self, prefix: &str) -> StoreResult<Vec<KeyValue>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.range(prefix).await
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> StoreResult<i64> {
        self.wrote(1);
        self.inner.put(key, value, lease).await
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        self.wrote(1);
        self.inner.delete(key).await
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> StoreResult<Option<i64>> {
        self.wrote(ops.len());
        self.inner.txn(compares, ops).await
    }

    async fn txn_group(&self, group: Vec<Transaction>) -> StoreResult<Vec<Option<i64>>> {
        self.wrote(group.iter().map(|t| t.ops.len()).sum());
        self.inner.txn_group(group).await
    }

    async fn lease_revoke(&self, lease: i64) -> StoreResult<()> {
        self.inner.lease_revoke(lease).await
    }
});

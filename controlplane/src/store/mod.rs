//! The state-store seam. Modelled on GreptimeDB's `KvBackend`: a small required core that
//! etcd and an in-memory map both implement, typed JSON helpers built on top, and one
//! conformance suite (`conformance.rs`) that every implementation must pass.
//!
//! Keys handed to a `Store` are relative (`users/alice`); the etcd implementation adds the
//! configured prefix. Revisions follow etcd: every write bumps a store-wide revision and a
//! key's `mod_revision` is the revision of its last write; `0` means "absent".

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub mod cached;
pub mod etcd;
pub mod group;
pub mod memory;

#[cfg(test)]
mod conformance;
#[cfg(test)]
pub mod counting;

pub use cached::CachedStore;
pub use etcd::{EtcdConfig, EtcdStore};
pub use group::GroupCommit;
pub use memory::MemoryStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or did not answer in time.
    #[error("etcd is unavailable: {0}")]
    Unavailable(String),
    /// A lease used in a write does not exist (expired or revoked).
    #[error("lease {0:x} does not exist")]
    LeaseNotFound(i64),
    #[error("record {key} is not valid JSON: {reason}")]
    Corrupt { key: String, reason: String },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// One key and its value as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    /// The lease the key is attached to, 0 for none.
    pub lease: i64,
}

/// A condition of a transaction: the key's `mod_revision` equals this (0 = the key is absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub mod_revision: i64,
}

impl Compare {
    pub fn revision(key: impl Into<String>, mod_revision: i64) -> Self {
        Self {
            key: key.into(),
            mod_revision,
        }
    }

    pub fn absent(key: impl Into<String>) -> Self {
        Self::revision(key, 0)
    }
}

/// One write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<i64>,
    },
    Delete {
        key: String,
    },
}

impl TxnOp {
    pub fn put_json<T: Serialize>(key: impl Into<String>, value: &T, lease: Option<i64>) -> Self {
        TxnOp::Put {
            key: key.into(),
            value: serde_json::to_vec(value).expect("records serialize to JSON"),
            lease,
        }
    }

    pub fn delete(key: impl Into<String>) -> Self {
        TxnOp::Delete { key: key.into() }
    }
}

/// One conditional transaction of a group (see [`Store::txn_group`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub compares: Vec<Compare>,
    pub ops: Vec<TxnOp>,
}

impl Transaction {
    /// The keys its writes touch: two transactions of one group must not share one (etcd
    /// refuses a request that writes a key twice).
    pub fn written_keys(&self) -> impl Iterator<Item = &str> {
        self.ops.iter().map(|op| match op {
            TxnOp::Put { key, .. } | TxnOp::Delete { key } => key.as_str(),
        })
    }
}

impl StoreError {
    /// The same error again, for each caller of a group that failed as one.
    pub fn duplicate(&self) -> Self {
        match self {
            StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
            StoreError::LeaseNotFound(l) => StoreError::LeaseNotFound(*l),
            StoreError::Corrupt { key, reason } => StoreError::Corrupt {
                key: key.clone(),
                reason: reason.clone(),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEventKind {
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: WatchEventKind,
    pub key: String,
    /// Empty for deletes.
    pub value: Vec<u8>,
    pub mod_revision: i64,
    /// The lease a put attached the key to, 0 for none (and for deletes).
    pub lease: i64,
}

pub type WatchStream = Pin<Box<dyn Stream<Item = StoreResult<WatchEvent>> + Send>>;

/// What a store must provide. Everything else is built on these.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>>;
    /// Every key starting with `prefix`, in key order.
    async fn range(&self, prefix: &str) -> StoreResult<Vec<KeyValue>>;
    /// Returns the new `mod_revision`.
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> StoreResult<i64>;
    /// Returns whether the key existed.
    async fn delete(&self, key: &str) -> StoreResult<bool>;
    /// Applies all `ops` atomically if every compare holds. Returns the revision the writes
    /// carry (every key written gets it as its `mod_revision`), or `None` when a compare failed.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> StoreResult<Option<i64>>;
    /// Applies each transaction of `group` as [`Store::txn`] would (each its own compares,
    /// its writes only if they hold), all in ONE write request: etcd commits them in one raft
    /// proposal, one WAL fsync, one revision. Results in `group`'s order. An error (etcd
    /// unreachable, a lease that no longer exists) fails the whole group and writes nothing.
    /// No key may be written by two transactions of one group.
    async fn txn_group(&self, group: Vec<Transaction>) -> StoreResult<Vec<Option<i64>>>;
    /// Returns the new lease id.
    async fn lease_grant(&self, ttl: Duration) -> StoreResult<i64>;
    /// Refreshes the lease once; returns `false` when it no longer exists.
    async fn lease_keep_alive(&self, lease: i64) -> StoreResult<bool>;
    /// Revokes the lease, deleting every key attached to it. Unknown leases are fine.
    async fn lease_revoke(&self, lease: i64) -> StoreResult<()>;
    /// Events on `key` (or every key under it when `prefix`) from `start_revision` on
    /// (0 = from now). Starting from the revision after a `get` misses nothing in between.
    async fn watch(&self, key: &str, prefix: bool, start_revision: i64)
    -> StoreResult<WatchStream>;
    /// Blocks until this caller leads election `name`, holding leadership under `lease`.
    /// Returns a key identifying the leadership for `resign`.
    async fn campaign(&self, name: &str, value: &str, lease: i64) -> StoreResult<Leadership>;
    async fn resign(&self, leadership: Leadership) -> StoreResult<()>;
}

/// `#[async_trait] impl Store for $wrapper { … }` with the methods given, plus the lease,
/// watch and election methods passed straight to `self.$inner`: what every wrapper of another
/// store (the watch cache, the counting store of tests, stores that inject failures) leaves
/// alone. `lease_revoke` stays with each wrapper: the watch cache has work to do there.
macro_rules! wrap_store {
    ($wrapper:ty, $inner:ident, { $($methods:tt)* }) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $wrapper {
            $($methods)*

            async fn lease_grant(
                &self,
                ttl: std::time::Duration,
            ) -> $crate::store::StoreResult<i64> {
                self.$inner.lease_grant(ttl).await
            }

            async fn lease_keep_alive(&self, lease: i64) -> $crate::store::StoreResult<bool> {
                self.$inner.lease_keep_alive(lease).await
            }

            async fn watch(
                &self,
                key: &str,
                prefix: bool,
                start_revision: i64,
            ) -> $crate::store::StoreResult<$crate::store::WatchStream> {
                self.$inner.watch(key, prefix, start_revision).await
            }

            async fn campaign(
                &self,
                name: &str,
                value: &str,
                lease: i64,
            ) -> $crate::store::StoreResult<$crate::store::Leadership> {
                self.$inner.campaign(name, value, lease).await
            }

            async fn resign(
                &self,
                leadership: $crate::store::Leadership,
            ) -> $crate::store::StoreResult<()> {
                self.$inner.resign(leadership).await
            }
        }
    };
}
pub(crate) use wrap_store;

/// Proof of leadership returned by `campaign`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    pub name: String,
    pub key: Vec<u8>,
    pub revision: i64,
    pub lease: i64,
}

/// A decoded JSON record and the revision it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub mod_revision: i64,
}

pub fn decode<T: DeserializeOwned>(kv: &KeyValue) -> StoreResult<Versioned<T>> {
    let value = serde_json::from_slice(&kv.value).map_err(|e| StoreError::Corrupt {
        key: kv.key.clone(),
        reason: e.to_string(),
    })?;
    Ok(Versioned {
        value,
        mod_revision: kv.mod_revision,
    })
}

/// Reads a JSON record.
pub async fn get_json<T: DeserializeOwned>(
    store: &dyn Store,
    key: &str,
) -> StoreResult<Option<Versioned<T>>> {
    store.get(key).await?.as_ref().map(decode).transpose()
}

/// Reads every JSON record under a prefix, with its key.
pub async fn range_json<T: DeserializeOwned>(
    store: &dyn Store,
    prefix: &str,
) -> StoreResult<Vec<(String, Versioned<T>)>> {
    store
        .range(prefix)
        .await?
        .iter()
        .map(|kv| decode(kv).map(|v| (kv.key.clone(), v)))
        .collect()
}

pub async fn put_json<T: Serialize>(
    store: &dyn Store,
    key: &str,
    value: &T,
    lease: Option<i64>,
) -> StoreResult<i64> {
    let bytes = serde_json::to_vec(value).expect("records serialize to JSON");
    store.put(key, bytes, lease).await
}

/// Creates `key` only if it does not exist; returns its `mod_revision` when this call
/// created it, `None` when it already existed.
pub async fn create_if_absent<T: Serialize>(
    store: &dyn Store,
    key: &str,
    value: &T,
) -> StoreResult<Option<i64>> {
    store
        .txn(
            vec![Compare::absent(key)],
            vec![TxnOp::put_json(key, value, None)],
        )
        .await
}

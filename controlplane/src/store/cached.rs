//! A `Store` that answers reads of a few prefixes from memory, kept current by one watch per
//! prefix: the records every login reads (the catalogue, revocations, users, the proxies'
//! records with their leases, the placement records; `WATCH_CACHED`). Without it, each login
//! cost a range of `environments/` and gets of `revocations/{user}`, `users/{user}`,
//! `proxies/{id}` and `containers/{user}/{env}`. A placement record changes at every login, so
//! its prefix costs one watch event per write instead of one read per login; whatever is read
//! from here and then written is written by a compare-and-swap, which a stale read fails.
//!
//! Consistency, as Kubernetes' watch cache gives it:
//! - **Read your writes.** A write through this store to a cached key returns only once the
//!   cache has applied the event of that write (watch events come in revision order), so a
//!   replica that stores an environment and then places a session in it sees it.
//! - **Others' writes** appear when their watch event arrives (milliseconds). A
//!   compare-and-swap on a cached key that fails because another replica wrote first waits for
//!   that write to reach the cache before returning, so the caller's next read sees it.
//! - **A broken watch** (etcd restarted, history compacted) turns the prefix back to reading
//!   etcd until a fresh listing and watch are up again.
//!
//! Everything else (other prefixes, leases, watches, elections) goes straight to the inner store.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    Compare, KeyValue, Store, StoreError, StoreResult, Transaction, TxnOp, WatchEventKind,
    WatchStream,
};

/// How long a write waits for its own event to reach the cache; past it the prefix is read
/// from etcd until the watch catches up (a stuck watch must not stall writers).
const CATCH_UP: Duration = Duration::from_secs(2);
/// Pause before listing and watching a prefix again after its watch broke.
const RESYNC_BACKOFF: Duration = Duration::from_millis(500);

pub struct CachedStore {
    inner: Arc<dyn Store>,
    caches: Vec<Arc<PrefixCache>>,
    _stop: tokio_util::sync::DropGuard,
}

struct PrefixCache {
    prefix: String,
    state: Mutex<CacheState>,
    /// Bumped on every change of `state`; writers wait on it for their revision.
    applied: tokio::sync::watch::Sender<i64>,
}

#[derive(Default)]
struct CacheState {
    /// Only a synced cache answers reads.
    synced: bool,
    /// The highest revision applied from the watch (or listed).
    revision: i64,
    /// A write at this revision waited too long for its event: reads go to etcd until the
    /// cache has applied it.
    behind_until: i64,
    entries: BTreeMap<String, KeyValue>,
}

impl CachedStore {
    /// Caches every key under each of `prefixes`; starts their watches (stopped on drop).
    pub fn new(inner: Arc<dyn Store>, prefixes: &[&str]) -> Self {
        let stop = CancellationToken::new();
        let caches: Vec<Arc<PrefixCache>> = prefixes
            .iter()
            .map(|prefix| {
                Arc::new(PrefixCache {
                    prefix: (*prefix).to_owned(),
                    state: Mutex::new(CacheState::default()),
                    applied: tokio::sync::watch::channel(0).0,
                })
            })
            .collect();
        for cache in &caches {
            let (inner, cache, stop) = (inner.clone(), cache.clone(), stop.clone());
            let name = cache.prefix.clone();
            let task = async move {
                tokio::select! {
                    () = cache.follow(inner.as_ref()) => {}
                    () = stop.cancelled() => {}
                }
            };
            tokio::spawn(task.instrument(tracing::info_span!("watch_cache", prefix = %name)));
        }
        Self {
            inner,
            caches,
            _stop: stop.drop_guard(),
        }
    }

    fn cache_of(&self, key: &str) -> Option<&Arc<PrefixCache>> {
        self.caches.iter().find(|c| key.starts_with(&c.prefix))
    }

    /// Waits until every cache holding one of `keys` has applied `revision`.
    async fn caught_up<'a>(&self, keys: impl Iterator<Item = &'a str>, revision: i64) {
        let mut waited: Vec<&str> = Vec::new();
        for key in keys {
            if let Some(cache) = self.cache_of(key)
                && !waited.contains(&cache.prefix.as_str())
            {
                waited.push(&cache.prefix);
                cache.wait_for(revision).await;
            }
        }
    }

    /// The cached keys `t` compares and writes.
    fn cached_keys(&self, t: &Transaction) -> (Vec<String>, Vec<String>) {
        let compared = t
            .compares
            .iter()
            .filter(|c| self.cache_of(&c.key).is_some())
            .map(|c| c.key.clone())
            .collect();
        let written = t
            .written_keys()
            .filter(|key| self.cache_of(key).is_some())
            .map(str::to_owned)
            .collect();
        (compared, written)
    }

    /// After a transaction: a success returns once the caches hold its writes; a failed
    /// compare (somebody else wrote a compared key first) once they hold that write, so the
    /// caller's next read sees what beat it.
    async fn settled(
        &self,
        compared: &[String],
        written: &[String],
        result: Option<i64>,
    ) -> StoreResult<()> {
        match result {
            Some(revision) => {
                self.caught_up(written.iter().map(String::as_str), revision)
                    .await;
            }
            None => {
                for key in compared {
                    if let Some(current) = self.inner.get(key).await? {
                        self.caught_up(std::iter::once(key.as_str()), current.mod_revision)
                            .await;
                    }
                }
            }
        }
        Ok(())
    }
}

impl PrefixCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lists and watches the prefix for as long as the task lives, starting over whenever
    /// the watch breaks.
    async fn follow(&self, store: &dyn Store) {
        loop {
            if let Err(e) = self.sync_and_watch(store).await {
                tracing::warn!(prefix = %self.prefix, error = %e, "watch cache fell back to etcd; listing again");
            }
            self.lock().synced = false;
            tokio::time::sleep(RESYNC_BACKOFF).await;
        }
    }

    async fn sync_and_watch(&self, store: &dyn Store) -> StoreResult<()> {
        // Watch first, then list: whatever changes after the listing is in the stream, and
        // an event the listing already reflects is recognised by its revision.
        let mut events: WatchStream = store.watch(&self.prefix, true, 0).await?;
        let listed = store.range(&self.prefix).await?;
        {
            let mut state = self.lock();
            state.revision = listed
                .iter()
                .map(|kv| kv.mod_revision)
                .max()
                .unwrap_or(0)
                .max(state.revision);
            state.entries = listed.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
            state.synced = true;
            self.applied.send_replace(state.revision);
        }
        while let Some(event) = events.next().await {
            let event = event?;
            let mut state = self.lock();
            let newer =
                |kv: Option<&KeyValue>| kv.is_none_or(|kv| kv.mod_revision < event.mod_revision);
            match event.kind {
                WatchEventKind::Put if newer(state.entries.get(&event.key)) => {
                    state.entries.insert(
                        event.key.clone(),
                        KeyValue {
                            key: event.key.clone(),
                            value: event.value,
                            mod_revision: event.mod_revision,
                            lease: event.lease,
                        },
                    );
                }
                WatchEventKind::Delete if newer(state.entries.get(&event.key)) => {
                    state.entries.remove(&event.key);
                }
                _ => {}
            }
            state.revision = state.revision.max(event.mod_revision);
            self.applied.send_replace(state.revision);
        }
        Err(StoreError::Unavailable(format!(
            "the watch of {} ended",
            self.prefix
        )))
    }

    async fn wait_until_gone(&self, lease: i64) {
        let on_lease = |state: &CacheState| state.entries.values().any(|kv| kv.lease == lease);
        if !on_lease(&self.lock()) {
            return;
        }
        let mut applied = self.applied.subscribe();
        let gone = applied.wait_for(|_| !on_lease(&self.lock()));
        if tokio::time::timeout(CATCH_UP, gone).await.is_err() {
            tracing::warn!(prefix = %self.prefix, lease, "watch cache is behind a lease revocation; reading etcd until it catches up");
            let mut state = self.lock();
            state.behind_until = state.behind_until.max(state.revision + 1);
        }
    }

    async fn wait_for(&self, revision: i64) {
        let mut applied = self.applied.subscribe();
        let caught_up = applied.wait_for(|applied| *applied >= revision);
        if tokio::time::timeout(CATCH_UP, caught_up).await.is_err() {
            tracing::warn!(prefix = %self.prefix, revision, "watch cache is behind; reading etcd until it catches up");
            let mut state = self.lock();
            state.behind_until = state.behind_until.max(revision);
        }
    }

    /// `Some(answer)` from memory when synced; `None`: ask the store.
    fn read<T>(&self, answer: impl FnOnce(&BTreeMap<String, KeyValue>) -> T) -> Option<T> {
        let state = self.lock();
        (state.synced && state.revision >= state.behind_until).then(|| answer(&state.entries))
    }
}

super::wrap_store!(CachedStore, inner, {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        if let Some(found) = self
            .cache_of(key)
            .and_then(|c| c.read(|entries| entries.get(key).cloned()))
        {
            return Ok(found);
        }
        self.inner.get(key).await
    }

    async fn range(&self, prefix: &str) -> StoreResult<Vec<KeyValue>> {
        let cached = self.cache_of(prefix).and_then(|c| {
            c.read(|entries| {
                entries
                    .range(prefix.to_owned()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .map(|(_, kv)| kv.clone())
                    .collect()
            })
        });
        match cached {
            Some(found) => Ok(found),
            None => self.inner.range(prefix).await,
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> StoreResult<i64> {
        let revision = self.inner.put(key, value, lease).await?;
        self.caught_up(std::iter::once(key), revision).await;
        Ok(revision)
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        if self.cache_of(key).is_none() {
            return self.inner.delete(key).await;
        }
        // As a transaction, whose revision tells when the cache has seen the delete.
        let existed = self.inner.get(key).await?.is_some();
        let revision = self.inner.txn(vec![], vec![TxnOp::delete(key)]).await?;
        if let Some(revision) = revision {
            self.caught_up(std::iter::once(key), revision).await;
        }
        Ok(existed)
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> StoreResult<Option<i64>> {
        let t = Transaction { compares, ops };
        let (compared, written) = self.cached_keys(&t);
        let result = self.inner.txn(t.compares, t.ops).await?;
        self.settled(&compared, &written, result).await?;
        Ok(result)
    }

    async fn txn_group(&self, group: Vec<Transaction>) -> StoreResult<Vec<Option<i64>>> {
        let keys: Vec<_> = group.iter().map(|t| self.cached_keys(t)).collect();
        let results = self.inner.txn_group(group).await?;
        // The group is committed: a read that fails here leaves the caller's cache a little
        // behind (the watch catches up), it must not turn committed writes into errors.
        for ((compared, written), result) in keys.iter().zip(&results) {
            if let Err(e) = self.settled(compared, written, *result).await {
                tracing::warn!(error = %e, "reading what beat a grouped transaction");
            }
        }
        Ok(results)
    }

    async fn lease_revoke(&self, lease: i64) -> StoreResult<()> {
        self.inner.lease_revoke(lease).await?;
        // The revocation's deletes carry no revision back: wait until the cached keys on the
        // lease are gone.
        for cache in &self.caches {
            cache.wait_until_gone(lease).await;
        }
        Ok(())
    }
});

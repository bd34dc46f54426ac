//! An in-memory `Store` with etcd's semantics (revisions, leases that expire, watches that
//! replay from a revision), for unit tests and single-process experiments. Lease TTLs are
//! judged by an injected clock (`clock.rs`), so tests expire leases by advancing it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::clock::{Clock, SystemClock};

use super::{
    Compare, KeyValue, Leadership, Store, StoreError, StoreResult, Transaction, TxnOp, WatchEvent,
    WatchEventKind, WatchStream,
};

/// Events kept for watches that start at a past revision.
const HISTORY_LIMIT: usize = 10_000;

struct Entry {
    value: Vec<u8>,
    mod_revision: i64,
    lease: i64,
}

struct Lease {
    ttl: Duration,
    /// The clock's milliseconds at which the lease ends.
    expires_at: i64,
    keys: HashSet<String>,
}

#[derive(Default)]
struct State {
    revision: i64,
    next_lease: i64,
    data: BTreeMap<String, Entry>,
    leases: HashMap<i64, Lease>,
    history: VecDeque<WatchEvent>,
}

/// A std mutex is enough: no critical section awaits, and each is a few map operations.
pub struct MemoryStore {
    state: Mutex<State>,
    events: broadcast::Sender<WatchEvent>,
    clock: Arc<dyn Clock>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            state: Mutex::new(State {
                next_lease: 1,
                ..State::default()
            }),
            events,
            clock: Arc::new(SystemClock),
        }
    }

    /// Judges lease TTLs by `clock` (tests advance a `ManualClock`).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// When a lease of `ttl` granted or kept alive now ends.
    fn expiry(&self, ttl: Duration) -> i64 {
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.clock.now_ms().saturating_add(ttl)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Expiry is applied lazily, at the start of every operation.
    fn expire_leases(&self, state: &mut State) {
        let now = self.clock.now_ms();
        let expired: Vec<i64> = state
            .leases
            .iter()
            .filter(|(_, l)| l.expires_at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.revoke_locked(state, id);
        }
    }

    fn revoke_locked(&self, state: &mut State, id: i64) {
        if let Some(lease) = state.leases.remove(&id) {
            let mut keys: Vec<_> = lease.keys.into_iter().collect();
            keys.sort();
            if keys.is_empty() {
                return;
            }
            state.revision += 1;
            let revision = state.revision;
            for key in keys {
                self.delete_locked(state, &key, revision);
            }
        }
    }

    fn put_locked(&self, state: &mut State, key: &str, value: Vec<u8>, lease: i64, revision: i64) {
        if let Some(old) = state.data.get(key)
            && old.lease != 0
            && let Some(l) = state.leases.get_mut(&old.lease)
        {
            l.keys.remove(key);
        }
        if lease != 0
            && let Some(l) = state.leases.get_mut(&lease)
        {
            l.keys.insert(key.to_owned());
        }
        state.data.insert(
            key.to_owned(),
            Entry {
                value: value.clone(),
                mod_revision: revision,
                lease,
            },
        );
        self.emit(
            state,
            WatchEvent {
                kind: WatchEventKind::Put,
                key: key.to_owned(),
                value,
                mod_revision: revision,
                lease,
            },
        );
    }

    fn delete_locked(&self, state: &mut State, key: &str, revision: i64) -> bool {
        match state.data.remove(key) {
            Some(old) => {
                if old.lease != 0
                    && let Some(l) = state.leases.get_mut(&old.lease)
                {
                    l.keys.remove(key);
                }
                self.emit(
                    state,
                    WatchEvent {
                        kind: WatchEventKind::Delete,
                        key: key.to_owned(),
                        value: Vec::new(),
                        mod_revision: revision,
                        lease: 0,
                    },
                );
                true
            }
            None => false,
        }
    }

    fn emit(&self, state: &mut State, event: WatchEvent) {
        if state.history.len() == HISTORY_LIMIT {
            state.history.pop_front();
        }
        state.history.push_back(event.clone());
        // No receivers is normal.
        let _ = self.events.send(event);
    }

    fn check_lease(state: &State, lease: Option<i64>) -> StoreResult<i64> {
        match lease {
            None | Some(0) => Ok(0),
            Some(id) if state.leases.contains_key(&id) => Ok(id),
            Some(id) => Err(StoreError::LeaseNotFound(id)),
        }
    }

    fn kv(key: &str, entry: &Entry) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: entry.value.clone(),
            mod_revision: entry.mod_revision,
            lease: entry.lease,
        }
    }
}

fn matches(event_key: &str, key: &str, prefix: bool) -> bool {
    if prefix {
        event_key.starts_with(key)
    } else {
        event_key == key
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        let mut state = self.lock();
        self.expire_leases(&mut state);
        Ok(state.data.get(key).map(|e| Self::kv(key, e)))
    }

    async fn range(&self, prefix: &str) -> StoreResult<Vec<KeyValue>> {
        let mut state = self.lock();
        self.expire_leases(&mut state);
        Ok(state
            .data
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| Self::kv(k, e))
            .collect())
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> StoreResult<i64> {
        let mut state = self.lock();
        self.expire_leases(&mut state);
        let lease = Self::check_lease(&state, lease)?;
        state.revision += 1;
        let revision = state.revision;
        self.put_locked(&mut state, key, value, lease, revision);
        Ok(revision)
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        let mut state = self.lock();
        self.expire_leases(&mut state);
        if !state.data.contains_key(key) {
            return Ok(false);
        }
        state.revision += 1;
        let revision = state.revision;
        Ok(self.delete_locked(&mut state, key, revision))
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> StoreResult<Option<i64>> {
        let mut state = self.lock();
        self.expire_leases(&mut state);
        let holds = compares
            .iter()
            .all(|c| state.data.get(&c.key).map(|e| e.mod_revision).unwrap_or(0) == c.mod_revision);
        if !holds {
            return Ok(None);
        }
        for op in &ops {
            if let TxnOp::Put { lease, .. } = op {
                Self::check_lease(&state, *lease)?;
            }
        }
        // Like etcd, every write of one transaction carries the same revision.
        state.revision += 1;
        let revision = state.revision;
        for op in ops {
            match op {
                TxnOp::Put { key, value, lease } => {
                    self.put_locked(&mut state, &key, value, lease.unwrap_or(0), revision)
                }
                TxnOp::Delete { key } => {
                    self.delete_locked(&mut state, &key, revision);
                }
            }
        }
        Ok(Some(revision))
    }

    async fn txn_group(&self, group: Vec<Transaction>) -> StoreResult<Vec<Option<i64>>> {
        let mut state = self.lock();
        self.expire_leases(&mut state);
        // Like etcd: a missing lease fails the whole request, and the writes of every
        // transaction whose compares hold carry one revision.
        for op in group.iter().flat_map(|t| &t.ops) {
            if let TxnOp::Put { lease, .. } = op {
                Self::check_lease(&state, *lease)?;
            }
        }
        let holds: Vec<bool> = group
            .iter()
            .map(|t| {
                t.compares.iter().all(|c| {
                    state.data.get(&c.key).map(|e| e.mod_revision).unwrap_or(0) == c.mod_revision
                })
            })
            .collect();
        if !holds.contains(&true) {
            return Ok(vec![None; group.len()]);
        }
        state.revision += 1;
        let revision = state.revision;
        let mut results = Vec::with_capacity(group.len());
        for (t, holds) in group.into_iter().zip(holds) {
            if !holds {
                results.push(None);
                continue;
            }
            for op in t.ops {
                match op {
                    TxnOp::Put { key, value, lease } => {
                        self.put_locked(&mut state, &key, value, lease.unwrap_or(0), revision)
                    }
                    TxnOp::Delete { key } => {
                        self.delete_locked(&mut state, &key, revision);
                    }
                }
            }
            results.push(Some(revision));
        }
        Ok(results)
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<i64> {
        let mut state = self.lock();
        self.expire_leases(&mut state);
        let id = state.next_lease;
        state.next_lease += 1;
        state.leases.insert(
            id,
            Lease {
                ttl,
                expires_at: self.expiry(ttl),
                keys: HashSet::new(),
            },
        );
        Ok(id)
    }

    async fn lease_keep_alive(&self, lease: i64) -> StoreResult<bool> {
        let mut state = self.lock();
        self.expire_leases(&mut state);
        match state.leases.get_mut(&lease) {
            Some(l) => {
                l.expires_at = self.expiry(l.ttl);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn lease_revoke(&self, lease: i64) -> StoreResult<()> {
        let mut state = self.lock();
        self.expire_leases(&mut state);
        self.revoke_locked(&mut state, lease);
        Ok(())
    }

    async fn watch(
        &self,
        key: &str,
        prefix: bool,
        start_revision: i64,
    ) -> StoreResult<WatchStream> {
        let (backlog, live) = {
            let mut state = self.lock();
            self.expire_leases(&mut state);
            let backlog: Vec<WatchEvent> = if start_revision > 0 {
                state
                    .history
                    .iter()
                    .filter(|e| e.mod_revision >= start_revision && matches(&e.key, key, prefix))
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            };
            // Subscribed under the lock, so no event falls between backlog and live.
            (backlog, self.events.subscribe())
        };
        let key = key.to_owned();
        let live = BroadcastStream::new(live).filter_map(move |item| {
            let out = match item {
                Ok(event) if matches(&event.key, &key, prefix) => Some(Ok(event)),
                Ok(_) => None,
                Err(BroadcastStreamRecvError::Lagged(n)) => Some(Err(StoreError::Unavailable(
                    format!("watch fell {n} events behind"),
                ))),
            };
            futures::future::ready(out)
        });
        Ok(Box::pin(
            futures::stream::iter(backlog.into_iter().map(Ok)).chain(live),
        ))
    }

    async fn campaign(&self, name: &str, value: &str, lease: i64) -> StoreResult<Leadership> {
        // One process holds the memory store, so the candidate becomes leader unless
        // another candidate in this process already is; then it waits for that key to go.
        let key = format!("election/{name}");
        loop {
            let created = self
                .txn(
                    vec![Compare::absent(&key)],
                    vec![TxnOp::Put {
                        key: key.clone(),
                        value: value.as_bytes().to_vec(),
                        lease: Some(lease),
                    }],
                )
                .await?;
            if let Some(revision) = created {
                return Ok(Leadership {
                    name: name.to_owned(),
                    key: key.into_bytes(),
                    revision,
                    lease,
                });
            }
            let mut changes = self.watch(&key, false, 0).await?;
            // Lease expiry is lazy, so wake up now and then to let it happen.
            let _ = tokio::time::timeout(Duration::from_millis(200), changes.next()).await;
        }
    }

    async fn resign(&self, leadership: Leadership) -> StoreResult<()> {
        let key = String::from_utf8_lossy(&leadership.key).into_owned();
        self.txn(
            vec![Compare::revision(&key, leadership.revision)],
            vec![TxnOp::delete(&key)],
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[tokio::test]
    async fn leases_end_when_the_clock_passes_their_ttl_and_keep_alives_extend_them() {
        let clock = Arc::new(ManualClock::at(1_000_000));
        let store = MemoryStore::new().with_clock(clock.clone());
        let lease = store.lease_grant(Duration::from_secs(10)).await.unwrap();
        store
            .put("leased", b"x".to_vec(), Some(lease))
            .await
            .unwrap();

        clock.advance(Duration::from_millis(9_999));
        assert!(
            store.get("leased").await.unwrap().is_some(),
            "9.999 of 10 s"
        );
        assert!(store.lease_keep_alive(lease).await.unwrap());
        clock.advance(Duration::from_millis(9_999));
        assert!(
            store.get("leased").await.unwrap().is_some(),
            "20 s after the grant, but 9.999 s after the keep-alive"
        );
        clock.advance(Duration::from_millis(1));
        assert!(
            store.get("leased").await.unwrap().is_none(),
            "10 s without one"
        );
        assert!(!store.lease_keep_alive(lease).await.unwrap());
    }
}

//! Group commit: transactions that arrive while the previous write is on its way to etcd
//! leave together in the next one ([`Store::txn_group`]): one request, one raft proposal,
//! one WAL fsync for as many logins as came meanwhile. A lone transaction leaves at once, so
//! a quiet replica waits for nothing; a busy one writes less often, not later.
//!
//! Each transaction keeps its own compares and is answered on its own, as `Store::txn` would
//! answer it. What one caller's failure must not do to the others:
//! - a lease that no longer exists (a proxy that died) fails the whole request in etcd: the
//!   group is then sent again one transaction at a time, so only that proxy's open fails;
//! - any other error (etcd unreachable, a timeout) fails every transaction of the group with
//!   that error, as it would have failed each of them sent alone.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};

use super::{Compare, Store, StoreError, StoreResult, Transaction, TxnOp};

/// Transactions sent in one request, at most (etcd's `--max-txn-ops` is 128 per level).
pub const GROUP_AT_MOST: usize = 64;

pub struct GroupCommit {
    store: Arc<dyn Store>,
    waiting: Mutex<VecDeque<Waiting>>,
    arrived: Notify,
    at_most: usize,
}

struct Waiting {
    txn: Transaction,
    done: oneshot::Sender<StoreResult<Option<i64>>>,
}

impl GroupCommit {
    /// `at_most` transactions go in one request; [`GroupCommit::run`] must be spawned.
    pub fn new(store: Arc<dyn Store>, at_most: usize) -> Self {
        Self {
            store,
            waiting: Mutex::new(VecDeque::new()),
            arrived: Notify::new(),
            at_most: at_most.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiting>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// As [`Store::txn`], in the next group.
    pub async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> StoreResult<Option<i64>> {
        let (done, answer) = oneshot::channel();
        self.lock().push_back(Waiting {
            txn: Transaction { compares, ops },
            done,
        });
        self.arrived.notify_one();
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the control plane is shutting down".into(),
            ))
        })
    }

    /// Sends the waiting transactions, a group at a time, for as long as the task lives.
    pub async fn run(self: Arc<Self>) {
        loop {
            let group = self.take();
            if group.is_empty() {
                self.arrived.notified().await;
                continue;
            }
            self.commit(group).await;
        }
    }

    /// The oldest waiting transactions, up to `at_most`, leaving for the next group any that
    /// writes a key an earlier one of this group writes.
    fn take(&self) -> Vec<Waiting> {
        let mut waiting = self.lock();
        let mut group = Vec::new();
        let mut keys: HashSet<String> = HashSet::new();
        let mut later = VecDeque::new();
        while group.len() < self.at_most {
            let Some(w) = waiting.pop_front() else { break };
            if w.txn.written_keys().any(|k| keys.contains(k)) {
                later.push_back(w);
                continue;
            }
            keys.extend(w.txn.written_keys().map(str::to_owned));
            group.push(w);
        }
        later.append(&mut waiting);
        *waiting = later;
        group
    }

    async fn commit(&self, group: Vec<Waiting>) {
        let (txns, dones): (Vec<Transaction>, Vec<_>) =
            group.into_iter().map(|w| (w.txn, w.done)).unzip();
        if txns.len() == 1 {
            self.one_by_one(txns, dones).await;
            return;
        }
        // Kept for a second try one by one; the clone is what a group of several costs.
        let kept = txns.clone();
        match self.store.txn_group(txns).await {
            Ok(results) => {
                for (done, result) in dones.into_iter().zip(results) {
                    let _ = done.send(Ok(result));
                }
            }
            Err(StoreError::LeaseNotFound(lease)) => {
                tracing::debug!(
                    lease = format!("{lease:x}"),
                    transactions = kept.len(),
                    "a lease of a grouped write is gone; sending them one by one"
                );
                self.one_by_one(kept, dones).await;
            }
            Err(e) => {
                for done in dones {
                    let _ = done.send(Err(e.duplicate()));
                }
            }
        }
    }

    async fn one_by_one(
        &self,
        txns: Vec<Transaction>,
        dones: Vec<oneshot::Sender<StoreResult<Option<i64>>>>,
    ) {
        let alone = txns.into_iter().map(|t| self.store.txn(t.compares, t.ops));
        for (done, result) in dones
            .into_iter()
            .zip(futures::future::join_all(alone).await)
        {
            let _ = done.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::counting::CountingStore;
    use crate::store::{KeyValue, MemoryStore};

    const WAIT: Duration = Duration::from_secs(10);

    /// `n` transactions queued before the committer starts, as if they had come while the
    /// previous write was in flight; then the committer runs and each gets its answer.
    async fn queued_then_run(
        group: Arc<GroupCommit>,
        txns: Vec<Transaction>,
    ) -> Vec<StoreResult<Option<i64>>> {
        let n = txns.len();
        let callers: Vec<_> = txns
            .into_iter()
            .map(|t| {
                let group = group.clone();
                tokio::spawn(async move { group.txn(t.compares, t.ops).await })
            })
            .collect();
        tokio::time::timeout(WAIT, async {
            while group.lock().len() < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the transactions queue");
        let committer = tokio::spawn(group.run());
        let mut results = Vec::new();
        for caller in callers {
            results.push(tokio::time::timeout(WAIT, caller).await.unwrap().unwrap());
        }
        committer.abort();
        results
    }

    fn open(session: &str, lease: Option<i64>) -> Transaction {
        Transaction {
            compares: vec![Compare::absent(format!("sessions/{session}"))],
            ops: vec![TxnOp::Put {
                key: format!("sessions/{session}"),
                value: b"{}".to_vec(),
                lease,
            }],
        }
    }

    #[tokio::test]
    async fn a_group_of_opens_is_one_write() {
        let memory = Arc::new(MemoryStore::new());
        let counting = Arc::new(CountingStore::new(memory.clone()));
        let group = Arc::new(GroupCommit::new(counting.clone(), GROUP_AT_MOST));
        let txns = (0..8).map(|i| open(&format!("s{i}"), None)).collect();
        let results = queued_then_run(group, txns).await;
        assert_eq!(
            counting.counts().writes,
            1,
            "eight opens, one write request"
        );
        let revision = results[0].as_ref().unwrap().expect("committed");
        for r in &results {
            assert_eq!(r.as_ref().unwrap(), &Some(revision));
        }
        assert_eq!(memory.range("sessions/").await.unwrap().len(), 8);
    }

    #[tokio::test]
    async fn a_key_written_twice_waits_for_the_next_group() {
        let memory = Arc::new(MemoryStore::new());
        let counting = Arc::new(CountingStore::new(memory.clone()));
        let group = Arc::new(GroupCommit::new(counting.clone(), GROUP_AT_MOST));
        // The same session twice: the second goes in a group of its own and its compare fails.
        let results = queued_then_run(
            group,
            vec![open("s", None), open("s", None), open("t", None)],
        )
        .await;
        let outcomes: Vec<bool> = results
            .iter()
            .map(|r| r.as_ref().unwrap().is_some())
            .collect();
        assert_eq!(outcomes, [true, false, true]);
        assert_eq!(counting.counts().writes, 2);
    }

    #[tokio::test]
    async fn a_gone_lease_fails_only_its_own_open() {
        let memory = Arc::new(MemoryStore::new());
        let live = memory.lease_grant(Duration::from_secs(30)).await.unwrap();
        let dead = memory.lease_grant(Duration::from_secs(30)).await.unwrap();
        memory.lease_revoke(dead).await.unwrap();
        let group = Arc::new(GroupCommit::new(memory.clone(), GROUP_AT_MOST));
        let results = queued_then_run(
            group,
            vec![
                open("a", Some(live)),
                open("b", Some(dead)),
                open("c", Some(live)),
            ],
        )
        .await;
        assert!(matches!(results[0], Ok(Some(_))));
        assert!(
            matches!(results[1], Err(StoreError::LeaseNotFound(_))),
            "{:?}",
            results[1]
        );
        assert!(matches!(results[2], Ok(Some(_))));
        let keys: Vec<String> = memory
            .range("sessions/")
            .await
            .unwrap()
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        assert_eq!(keys, ["sessions/a", "sessions/c"]);
    }

    /// A store whose grouped writes fail as an unreachable etcd's do.
    struct Unreachable {
        inner: MemoryStore,
    }

    crate::store::wrap_store!(Unreachable, inner, {
        async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
            self.inner.get(key).await
        }
        async fn range(&self, prefix: &str) -> StoreResult<Vec<KeyValue>> {
            self.inner.range(prefix).await
        }
        async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> StoreResult<i64> {
            self.inner.put(key, value, lease).await
        }
        async fn delete(&self, key: &str) -> StoreResult<bool> {
            self.inner.delete(key).await
        }
        async fn txn(&self, _: Vec<Compare>, _: Vec<TxnOp>) -> StoreResult<Option<i64>> {
            Err(StoreError::Unavailable("txn timed out after 5s".into()))
        }
        async fn txn_group(&self, _: Vec<Transaction>) -> StoreResult<Vec<Option<i64>>> {
            Err(StoreError::Unavailable("txn timed out after 5s".into()))
        }
        async fn lease_revoke(&self, lease: i64) -> StoreResult<()> {
            self.inner.lease_revoke(lease).await
        }
    });

    #[tokio::test]
    async fn a_failed_group_fails_each_open_with_the_error() {
        let group = Arc::new(GroupCommit::new(
            Arc::new(Unreachable {
                inner: MemoryStore::new(),
            }),
            GROUP_AT_MOST,
        ));
        let results = queued_then_run(
            group,
            (0..3).map(|i| open(&format!("s{i}"), None)).collect(),
        )
        .await;
        for r in results {
            let err = r.unwrap_err();
            assert_eq!(
                err.to_string(),
                "etcd is unavailable: txn timed out after 5s"
            );
        }
    }

    #[tokio::test]
    async fn a_lone_open_goes_at_once_and_later_ones_follow() {
        let memory = Arc::new(MemoryStore::new());
        let counting = Arc::new(CountingStore::new(memory.clone()));
        let group = Arc::new(GroupCommit::new(counting.clone(), GROUP_AT_MOST));
        let committer = tokio::spawn(group.clone().run());
        for i in 0..3 {
            let t = open(&format!("s{i}"), None);
            let done = tokio::time::timeout(WAIT, group.txn(t.compares, t.ops)).await;
            assert!(matches!(done, Ok(Ok(Some(_)))), "{done:?}");
        }
        assert_eq!(counting.counts().writes, 3);
        committer.abort();
    }
}

//! One suite of behaviours every `Store` must show, run against the memory store and a real
//! etcd (started by `testkit::Etcd`). Placement correctness rests on exactly these.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::*;
use crate::testkit::Etcd;

const WAIT: Duration = Duration::from_secs(10);

async fn cas_semantics(store: Arc<dyn Store>) {
    let rev = store.put("cas/k", b"one".to_vec(), None).await.unwrap();
    assert!(rev > 0);
    assert_eq!(store.get("cas/k").await.unwrap().unwrap().mod_revision, rev);

    let delete = || vec![TxnOp::delete("cas/k")];
    let stale = Compare::revision("cas/k", rev - 1);
    assert_eq!(store.txn(vec![stale], delete()).await.unwrap(), None);
    let absent = Compare::absent("cas/k");
    assert_eq!(store.txn(vec![absent], delete()).await.unwrap(), None);
    let after = store.get("cas/k").await.unwrap();
    assert!(after.is_some(), "a failed txn must not write");

    let swap = vec![TxnOp::Put {
        key: "cas/k".into(),
        value: b"two".to_vec(),
        lease: None,
    }];
    let current = Compare::revision("cas/k", rev);
    let swapped = store
        .txn(vec![current.clone()], swap.clone())
        .await
        .unwrap();
    let now = store.get("cas/k").await.unwrap().unwrap();
    assert_eq!(now.value, b"two");
    assert!(now.mod_revision > rev);
    assert_eq!(
        swapped,
        Some(now.mod_revision),
        "txn reports the revision it wrote"
    );
    assert_eq!(
        store.txn(vec![current], swap).await.unwrap(),
        None,
        "stale after the swap"
    );

    let create = vec![TxnOp::put_json("cas/new", &1, None)];
    let created = store
        .txn(vec![Compare::absent("cas/new")], create)
        .await
        .unwrap();
    assert!(created.is_some());
    assert!(store.delete("cas/new").await.unwrap());
    assert!(!store.delete("cas/new").await.unwrap());
    assert!(store.get("cas/new").await.unwrap().is_none());
}

async fn create_if_absent_has_one_winner(store: Arc<dyn Store>) {
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                (
                    i,
                    create_if_absent(store.as_ref(), "race/k", &i)
                        .await
                        .unwrap()
                        .is_some(),
                )
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        let (i, won) = task.await.unwrap();
        if won {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let stored: Versioned<i32> = get_json(store.as_ref(), "race/k").await.unwrap().unwrap();
    assert_eq!(stored.value, winners[0]);
}

/// A group is one write: each transaction is decided by its own compares, the ones that hold
/// all carry one revision, and a missing lease in any of them fails the group, writing nothing.
async fn txn_group_decides_each_and_writes_once(store: Arc<dyn Store>) {
    let held = store.put("grp/held", b"0".to_vec(), None).await.unwrap();
    let put = |key: &str, lease: Option<i64>| TxnOp::Put {
        key: key.into(),
        value: b"1".to_vec(),
        lease,
    };
    let lease = store.lease_grant(Duration::from_secs(30)).await.unwrap();
    let group = vec![
        Transaction {
            compares: vec![Compare::revision("grp/held", held)],
            ops: vec![put("grp/held", None), put("grp/a", Some(lease))],
        },
        Transaction {
            compares: vec![Compare::revision("grp/held", held - 1)],
            ops: vec![put("grp/stale", None)],
        },
        Transaction {
            compares: vec![Compare::absent("grp/b")],
            ops: vec![put("grp/b", None), TxnOp::delete("grp/gone")],
        },
    ];
    let results = store.txn_group(group).await.unwrap();
    let revision = results[0].expect("its compare held");
    assert_eq!(results, [Some(revision), None, Some(revision)]);
    for key in ["grp/held", "grp/a", "grp/b"] {
        let kv = store.get(key).await.unwrap().expect(key);
        assert_eq!(
            kv.mod_revision, revision,
            "{key} was written by the group's one write"
        );
    }
    assert_eq!(store.get("grp/a").await.unwrap().unwrap().lease, lease);
    assert!(
        store.get("grp/stale").await.unwrap().is_none(),
        "a failed compare writes nothing"
    );

    let none_hold = vec![Transaction {
        compares: vec![Compare::absent("grp/b")],
        ops: vec![put("grp/never", None)],
    }];
    assert_eq!(store.txn_group(none_hold).await.unwrap(), [None]);

    store.lease_revoke(lease).await.unwrap();
    let with_gone_lease = vec![
        Transaction {
            compares: vec![],
            ops: vec![put("grp/c", None)],
        },
        Transaction {
            compares: vec![],
            ops: vec![put("grp/d", Some(lease))],
        },
    ];
    let err = store.txn_group(with_gone_lease).await.unwrap_err();
    assert!(matches!(err, StoreError::LeaseNotFound(_)), "{err}");
    assert!(
        store.get("grp/c").await.unwrap().is_none(),
        "a failed group writes nothing"
    );
    assert!(store.get("grp/never").await.unwrap().is_none());
}

async fn multi_op_txn_is_atomic(store: Arc<dyn Store>) {
    let a = store.put("multi/a", b"a".to_vec(), None).await.unwrap();
    store.put("multi/b", b"b".to_vec(), None).await.unwrap();
    let ops = vec![
        TxnOp::Put {
            key: "multi/a".into(),
            value: b"a2".to_vec(),
            lease: None,
        },
        TxnOp::Put {
            key: "multi/c".into(),
            value: b"c".to_vec(),
            lease: None,
        },
        TxnOp::delete("multi/b"),
    ];
    // One false compare among true ones: nothing applies.
    let compares = vec![Compare::revision("multi/a", a), Compare::absent("multi/b")];
    assert_eq!(store.txn(compares, ops.clone()).await.unwrap(), None);
    assert_eq!(store.get("multi/a").await.unwrap().unwrap().value, b"a");
    assert!(store.get("multi/b").await.unwrap().is_some());
    assert!(store.get("multi/c").await.unwrap().is_none());

    let compares = vec![Compare::revision("multi/a", a), Compare::absent("multi/c")];
    assert!(store.txn(compares, ops).await.unwrap().is_some());
    let a2 = store.get("multi/a").await.unwrap().unwrap();
    let c = store.get("multi/c").await.unwrap().unwrap();
    assert_eq!(a2.value, b"a2");
    assert_eq!(a2.mod_revision, c.mod_revision, "one txn, one revision");
    assert!(store.get("multi/b").await.unwrap().is_none());
}

async fn leases_take_their_keys_with_them(store: Arc<dyn Store>) {
    let lease = store.lease_grant(Duration::from_secs(30)).await.unwrap();
    store
        .put("lease/a", b"x".to_vec(), Some(lease))
        .await
        .unwrap();
    let in_txn = TxnOp::Put {
        key: "lease/b".into(),
        value: b"y".to_vec(),
        lease: Some(lease),
    };
    assert!(store.txn(vec![], vec![in_txn]).await.unwrap().is_some());
    assert_eq!(store.get("lease/a").await.unwrap().unwrap().lease, lease);
    assert!(store.lease_keep_alive(lease).await.unwrap());

    store.lease_revoke(lease).await.unwrap();
    assert!(store.get("lease/a").await.unwrap().is_none());
    assert!(store.get("lease/b").await.unwrap().is_none());
    assert!(!store.lease_keep_alive(lease).await.unwrap());
    let err = store
        .put("lease/c", b"z".to_vec(), Some(lease))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::LeaseNotFound(id) if id == lease),
        "{err:?}"
    );
    store
        .lease_revoke(lease)
        .await
        .expect("revoking twice is fine");

    // Expiry: etcd rounds very short TTLs up to about two seconds.
    let short = store.lease_grant(Duration::from_secs(1)).await.unwrap();
    store
        .put("lease/short", b"x".to_vec(), Some(short))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while store.get("lease/short").await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "key outlived its lease"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn range_returns_prefix_in_order(store: Arc<dyn Store>) {
    for key in ["rng/b/2", "rng/a/1", "rng/b/1", "rng/bb/1", "rngx/1"] {
        store.put(key, key.as_bytes().to_vec(), None).await.unwrap();
    }
    let keys: Vec<String> = store
        .range("rng/b/")
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["rng/b/1", "rng/b/2"]);
    assert_eq!(store.range("rng/").await.unwrap().len(), 4);
    assert!(store.range("nothing/").await.unwrap().is_empty());
}

async fn watch_replays_from_revision_and_follows(store: Arc<dyn Store>) {
    let rev = store.put("w/k", b"1".to_vec(), None).await.unwrap();
    store.put("w/k", b"2".to_vec(), None).await.unwrap();
    store.put("w/other", b"x".to_vec(), None).await.unwrap();
    let mut exact = store.watch("w/k", false, rev + 1).await.unwrap();
    let first = tokio::time::timeout(WAIT, exact.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.kind, first.value.as_slice()),
        (WatchEventKind::Put, b"2".as_slice())
    );

    let mut prefix = store.watch("w/", true, 0).await.unwrap();
    store.delete("w/k").await.unwrap();
    let deleted = tokio::time::timeout(WAIT, exact.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (deleted.kind, deleted.key.as_str()),
        (WatchEventKind::Delete, "w/k")
    );
    let seen = tokio::time::timeout(WAIT, prefix.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (seen.kind, seen.key.as_str()),
        (WatchEventKind::Delete, "w/k")
    );
    store.put("w/new", b"n".to_vec(), None).await.unwrap();
    let seen = tokio::time::timeout(WAIT, prefix.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (seen.kind, seen.key.as_str()),
        (WatchEventKind::Put, "w/new")
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), exact.next())
            .await
            .is_err(),
        "an exact watch must not see other keys"
    );
}

async fn election_has_one_leader_at_a_time(store: Arc<dyn Store>) {
    let lease_a = store.lease_grant(Duration::from_secs(30)).await.unwrap();
    let lease_b = store.lease_grant(Duration::from_secs(30)).await.unwrap();
    let a = tokio::time::timeout(WAIT, store.campaign("test", "a", lease_a))
        .await
        .unwrap()
        .unwrap();
    let contender = {
        let store = store.clone();
        tokio::spawn(async move { store.campaign("test", "b", lease_b).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!contender.is_finished(), "two leaders at once");
    store.resign(a).await.unwrap();
    let b = tokio::time::timeout(WAIT, contender)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(b.lease, lease_b);
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(Arc::new(MemoryStore::new())).await;
                }
            )*
        }
        /// The watch cache over etcd (as the control plane runs it), caching every prefix
        /// the suite writes.
        mod cached {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let etcd = Etcd::start().await.expect("etcd starts");
                    let inner: Arc<dyn Store> = Arc::new(
                        EtcdStore::connect(&etcd.config(), "/conformance/", Duration::from_secs(5))
                            .await
                            .expect("connects"),
                    );
                    let prefixes = ["cas/", "race/", "multi/", "lease/", "rng", "w/", "grp/"];
                    super::$name(Arc::new(CachedStore::new(inner, &prefixes))).await;
                }
            )*
        }
        mod etcd {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let etcd = Etcd::start().await.expect("etcd starts");
                    let store = EtcdStore::connect(&etcd.config(), "/conformance/", Duration::from_secs(5))
                        .await
                        .expect("connects");
                    super::$name(Arc::new(store)).await;
                }
            )*
        }
    };
}

conformance!(
    cas_semantics,
    create_if_absent_has_one_winner,
    multi_op_txn_is_atomic,
    txn_group_decides_each_and_writes_once,
    leases_take_their_keys_with_them,
    range_returns_prefix_in_order,
    watch_replays_from_revision_and_follows,
    election_has_one_leader_at_a_time,
);

#[tokio::test]
async fn connecting_to_a_dead_etcd_says_which() {
    let mut etcd = Etcd::start().await.expect("etcd starts");
    let endpoint = etcd.endpoint();
    let config = etcd.config();
    etcd.kill();
    let err = EtcdStore::connect(&config, "/x/", Duration::from_secs(2))
        .await
        .err()
        .expect("a dead etcd is refused");
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains(&endpoint)),
        "{err}"
    );
}

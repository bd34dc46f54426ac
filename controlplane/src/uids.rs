//! Each user's uid inside their containers: allocated once, the same in every environment and
//! on every replica, never reused (a deleted user's home volume still holds files of that uid).
//!
//! `uids/users/{user}` holds the uid; `uids/next` the next one to hand out. One transaction
//! writes both, on the condition that neither changed since it was read, so two replicas
//! allocating at once never hand out the same uid and a user never gets two.

use crate::store::{Compare, Store, StoreError, TxnOp};

/// The first uid handed out; far above the accounts images ship (up to 65534) and the
/// host's own, so a user's files never look like someone else's.
pub const FIRST_UID: u32 = 200_000;
/// The last one; beyond it, allocation fails with a clear message.
pub const LAST_UID: u32 = i32::MAX as u32;

const NEXT: &str = "uids/next";
pub const USERS: &str = "uids/users/";

fn user_key(user: &str) -> String {
    format!("{USERS}{user}")
}

fn parse(key: &str, value: &[u8]) -> Result<u32, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: format!("it does not hold a uid: {e}"),
    })
}

/// The uid `user` was given, if any.
pub async fn get(store: &dyn Store, user: &str) -> Result<Option<u32>, StoreError> {
    let key = user_key(user);
    match store.get(&key).await? {
        Some(kv) => parse(&key, &kv.value).map(Some),
        None => Ok(None),
    }
}

/// Every user's uid, by user name.
pub async fn all(store: &dyn Store) -> Result<Vec<(String, u32)>, StoreError> {
    store
        .range(USERS)
        .await?
        .into_iter()
        .map(|kv| {
            let uid = parse(&kv.key, &kv.value)?;
            Ok((kv.key[USERS.len()..].to_owned(), uid))
        })
        .collect()
}

/// The uid of `user`, allocated now if they have none.
pub async fn ensure(store: &dyn Store, user: &str) -> Result<u32, StoreError> {
    let key = user_key(user);
    // Each lost race means another allocation succeeded, so this ends; the bound only
    // turns a store that misbehaves into an error.
    for _ in 0..100 {
        if let Some(uid) = get(store, user).await? {
            return Ok(uid);
        }
        let (next, counter) = match store.get(NEXT).await? {
            Some(kv) => (
                parse(NEXT, &kv.value)?,
                Compare::revision(NEXT, kv.mod_revision),
            ),
            None => (FIRST_UID, Compare::absent(NEXT)),
        };
        if next > LAST_UID {
            return Err(StoreError::Corrupt {
                key: NEXT.to_owned(),
                reason: format!("no uid left for {user}: {FIRST_UID}..={LAST_UID} are all taken"),
            });
        }
        let ops = vec![
            TxnOp::put_json(&key, &next, None),
            TxnOp::put_json(NEXT, &(next + 1), None),
        ];
        if store
            .txn(vec![Compare::absent(&key), counter], ops)
            .await?
            .is_some()
        {
            tracing::info!(user, uid = next, "uid allocated");
            return Ok(next);
        }
    }
    Err(StoreError::Unavailable(format!(
        "allocating a uid for {user} kept conflicting"
    )))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;

    use super::*;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn concurrent_allocations_give_one_uid_per_user_and_never_reuse_one() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        // 40 users, each asked for 3 times at once (three replicas, say).
        let tasks: Vec<_> = (0..120)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let user = format!("user{}", i % 40);
                    (user.clone(), ensure(store.as_ref(), &user).await.unwrap())
                })
            })
            .collect();
        let mut by_user = std::collections::HashMap::new();
        for task in tasks {
            let (user, uid) = task.await.unwrap();
            assert_eq!(
                *by_user.entry(user).or_insert(uid),
                uid,
                "a user got two uids"
            );
        }
        let uids: HashSet<u32> = by_user.values().copied().collect();
        assert_eq!(uids.len(), 40, "two users share a uid");
        assert_eq!(
            uids.iter().min().zip(uids.iter().max()),
            Some((&FIRST_UID, &(FIRST_UID + 39)))
        );
        assert_eq!(all(store.as_ref()).await.unwrap().len(), 40);
        assert_eq!(
            get(store.as_ref(), "user7").await.unwrap(),
            by_user.get("user7").copied()
        );
        assert_eq!(get(store.as_ref(), "nobody").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_damaged_record_is_an_error_not_a_uid() {
        let store = MemoryStore::new();
        store
            .put("uids/users/alice", b"root".to_vec(), None)
            .await
            .unwrap();
        let err = ensure(&store, "alice").await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with("record uids/users/alice is not valid JSON: it does not hold a uid"),
            "{err}"
        );
    }
}

//! The proxy's cache of control-plane tokens, so a user who reconnects within
//! a token's lifetime is not authenticated against the control plane again
//! (the study's main finding: authentication dominated connect time under
//! load).
//!
//! Entries are keyed by user and credential. A public key is its own key (it
//! is public). A password is never kept: its key is
//! HMAC-SHA256(process-random secret, user \0 password), so a memory dump
//! reveals neither the password nor a hash that can be attacked offline
//! without the secret, and the secret dies with the process.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Entries stop being used this long before their token expires, so a token
/// taken from the cache still has time left when the control plane sees it.
pub const EXPIRY_MARGIN_SECONDS: i64 = 30;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Credential {
    /// The public key in SSH wire format.
    PublicKey(Vec<u8>),
    /// HMAC of the user and password; see the module docs.
    PasswordDigest([u8; 32]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedToken {
    pub token: String,
    /// The user the control plane issued the token to.
    pub user: String,
    /// Unix seconds.
    pub expires_at: i64,
}

type Key = (String, Credential);

struct Entry {
    token: CachedToken,
    /// Insertion number, to tell a live entry from a stale queue slot.
    seq: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// Keys in insertion order; the oldest is evicted when full. Slots whose
    /// entry was replaced or removed are skipped lazily.
    order: VecDeque<(Key, u64)>,
    next_seq: u64,
}

/// A bounded, expiring map from (user, credential) to token. A std mutex is
/// enough: every operation is a few map operations and never awaits.
pub struct AuthCache {
    inner: Mutex<Inner>,
    capacity: usize,
    secret: hmac::Key,
}

impl AuthCache {
    pub fn new(capacity: usize) -> Self {
        let mut secret = [0u8; 32];
        SystemRandom::new()
            .fill(&mut secret)
            .expect("the system random source works");
        Self {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
            secret: hmac::Key::new(hmac::HMAC_SHA256, &secret),
        }
    }

    /// The cache key for a password; the password itself is not kept.
    pub fn password_credential(&self, user: &str, password: &str) -> Credential {
        let mut ctx = hmac::Context::with_key(&self.secret);
        ctx.update(user.as_bytes());
        ctx.update(&[0]);
        ctx.update(password.as_bytes());
        let mut digest = [0u8; 32];
        digest.copy_from_slice(ctx.sign().as_ref());
        Credential::PasswordDigest(digest)
    }

    /// A token still usable at `now` (Unix seconds), if cached.
    pub fn get(&self, user: &str, credential: &Credential, now: i64) -> Option<CachedToken> {
        let mut inner = self.inner.lock().expect("auth cache lock");
        let key = (user.to_owned(), credential.clone());
        let entry = inner.entries.get(&key)?;
        if entry.token.expires_at - EXPIRY_MARGIN_SECONDS > now {
            Some(entry.token.clone())
        } else {
            inner.entries.remove(&key);
            None
        }
    }

    pub fn insert(&self, user: &str, credential: Credential, token: CachedToken) {
        let mut inner = self.inner.lock().expect("auth cache lock");
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let key = (user.to_owned(), credential);
        inner.order.push_back((key.clone(), seq));
        inner.entries.insert(key, Entry { token, seq });
        while inner.entries.len() > self.capacity {
            let Some((old, old_seq)) = inner.order.pop_front() else {
                break;
            };
            if inner.entries.get(&old).is_some_and(|e| e.seq == old_seq) {
                inner.entries.remove(&old);
            }
        }
        // Keep the queue from growing without bound under replace/revoke churn.
        if inner.order.len() > 2 * self.capacity {
            let Inner { entries, order, .. } = &mut *inner;
            order.retain(|(k, s)| entries.get(k).is_some_and(|e| e.seq == *s));
        }
    }

    /// Drops every entry of `user` (the control plane revoked their tokens).
    pub fn revoke_user(&self, user: &str) -> usize {
        let mut inner = self.inner.lock().expect("auth cache lock");
        let before = inner.entries.len();
        inner.entries.retain(|(u, _), _| u != user);
        before - inner.entries.len()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("auth cache lock").entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(user: &str, expires_at: i64) -> CachedToken {
        CachedToken {
            token: format!("tok-{user}-{expires_at}"),
            user: user.into(),
            expires_at,
        }
    }

    fn key(n: u8) -> Credential {
        Credential::PublicKey(vec![n; 8])
    }

    #[test]
    fn entries_expire_before_their_token() {
        let cache = AuthCache::new(10);
        cache.insert("alice", key(1), token("alice", 1000));
        assert!(cache.get("alice", &key(1), 900).is_some());
        assert!(
            cache
                .get("alice", &key(1), 1000 - EXPIRY_MARGIN_SECONDS - 1)
                .is_some()
        );
        assert!(
            cache
                .get("alice", &key(1), 1000 - EXPIRY_MARGIN_SECONDS)
                .is_none()
        );
        assert!(cache.is_empty(), "an expired entry is dropped when seen");
    }

    #[test]
    fn other_users_and_keys_miss() {
        let cache = AuthCache::new(10);
        cache.insert("alice", key(1), token("alice", 1000));
        assert!(cache.get("bob", &key(1), 0).is_none());
        assert!(cache.get("alice", &key(2), 0).is_none());
    }

    #[test]
    fn the_cache_is_bounded_and_evicts_the_oldest() {
        let cache = AuthCache::new(3);
        for n in 0..5 {
            cache.insert("alice", key(n), token("alice", 1000));
        }
        assert_eq!(cache.len(), 3);
        assert!(cache.get("alice", &key(0), 0).is_none());
        assert!(cache.get("alice", &key(1), 0).is_none());
        assert!(cache.get("alice", &key(4), 0).is_some());
        // Replacing an entry does not let a stale queue slot evict it.
        let cache = AuthCache::new(2);
        cache.insert("a", key(1), token("a", 1000));
        cache.insert("a", key(1), token("a", 2000));
        cache.insert("a", key(2), token("a", 1000));
        assert_eq!(cache.get("a", &key(1), 0).unwrap().expires_at, 2000);
        for _ in 0..100 {
            cache.insert("a", key(1), token("a", 1000));
        }
        assert!(cache.inner.lock().unwrap().order.len() <= 4);
    }

    #[test]
    fn revoke_drops_only_that_user() {
        let cache = AuthCache::new(10);
        cache.insert("alice", key(1), token("alice", 1000));
        cache.insert(
            "alice",
            cache.password_credential("alice", "pw"),
            token("alice", 1000),
        );
        cache.insert("bob", key(2), token("bob", 1000));
        assert_eq!(cache.revoke_user("alice"), 2);
        assert!(cache.get("alice", &key(1), 0).is_none());
        assert!(cache.get("bob", &key(2), 0).is_some());
    }

    #[test]
    fn password_keys_never_hold_the_password() {
        let cache = AuthCache::new(10);
        let password = "correct horse battery staple";
        let credential = cache.password_credential("alice", password);
        let Credential::PasswordDigest(digest) = &credential else {
            panic!("a digest")
        };
        assert!(
            !digest
                .windows(8)
                .any(|w| password.as_bytes().windows(8).any(|p| p == w))
        );
        assert_ne!(credential, cache.password_credential("alice", "other"));
        assert_ne!(credential, cache.password_credential("alicf", password));
        // "ab"+"c" and "a"+"bc" must not collide: the separator matters.
        assert_ne!(
            cache.password_credential("ab", "c"),
            cache.password_credential("a", "bc")
        );
        // A second process (another secret) derives another key.
        assert_ne!(
            credential,
            AuthCache::new(10).password_credential("alice", password)
        );
        cache.insert("alice", credential.clone(), token("alice", 1000));
        assert!(
            cache
                .get("alice", &cache.password_credential("alice", password), 0)
                .is_some()
        );
        assert!(
            cache
                .get("alice", &cache.password_credential("alice", "wrong"), 0)
                .is_none()
        );
        let debug = format!(
            "{:?}",
            cache
                .inner
                .lock()
                .unwrap()
                .entries
                .keys()
                .collect::<Vec<_>>()
        );
        assert!(!debug.contains(password));
    }
}

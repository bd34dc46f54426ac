//! Failed logins, counted where every replica sees them (the store), and an attempt counted
//! *before* the expensive check, not after it.
//!
//! Two counts, each a record in the store:
//!
//! - **per user and source** (`throttle/pair/…`): a few free failures, then each attempt must
//!   wait a delay that doubles with every further failure (1 s, 2 s, 4 s, … up to 15 min), and
//!   the count is forgotten after a quiet period. Attempts refused by the delay do not extend
//!   it. A success clears it, as sshd users expect.
//! - **per source** (`throttle/source/…`): a budget of failures across all users per window,
//!   against one address guessing many users' passwords.
//!
//! There is no count per user alone: failures from other addresses never slow down a user's
//! own address, so nobody can lock a user out from everywhere.
//!
//! A source is the client's IPv4 address, or the /64 of its IPv6 address (one subscriber
//! gets a whole /64); an address that cannot be read is one bucket of its own, `unknown`.
//!
//! `reserve` counts the attempt as a failure before the password is hashed, so 200 concurrent
//! guesses get as many hash checks as the free allowance, not 160; a success then `refund`s
//! it. Within one replica the attempts of one (user, source) queue on a lock so they do not
//! all race one compare-and-swap, and a key this replica knows to be blocked is refused
//! without a store round trip. Stale records are deleted by the leader (`sweep`).
//!
//! Key offers never come here: a client offers every key it holds.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use ring::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};

use crate::locks::KeyedLocks;
use crate::store::{self, Compare, Store, StoreError, TxnOp};

const PAIRS: &str = "throttle/pair/";
const SOURCES: &str = "throttle/source/";
/// Compare-and-swap attempts before a reservation gives up (other replicas kept writing).
const CAS_ATTEMPTS: usize = 16;
/// Known-blocked keys kept in memory beyond which expired ones are dropped.
const LOCAL_LIMIT: usize = 10_000;

pub use crate::clock::{Clock, ManualClock, SystemClock};

/// How much failing is allowed (`--auth-*` flags).
#[derive(Debug, Clone, Copy)]
pub struct ThrottlePolicy {
    /// Failures per (user, source) before delays start.
    pub free_failures: u32,
    /// The first delay; each further failure doubles it.
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// A (user, source) without failures for this long starts afresh.
    pub quiet_reset: Duration,
    /// Failures one source may have across all users per `source_window`.
    pub source_budget: u32,
    pub source_window: Duration,
}

impl Default for ThrottlePolicy {
    fn default() -> Self {
        Self {
            free_failures: 5,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(15 * 60),
            quiet_reset: Duration::from_secs(15 * 60),
            // A class of 300 behind one NAT address, each mistyping once or twice at 9:00,
            // must not be refused; one address trying 600 users' passwords in 10 min is.
            source_budget: 600,
            source_window: Duration::from_secs(10 * 60),
        }
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl ThrottlePolicy {
    /// The wait after the `failures`-th failure.
    fn delay_after(&self, failures: u32) -> i64 {
        if failures < self.free_failures {
            return 0;
        }
        let doublings = (failures - self.free_failures).min(30);
        ms(self.first_delay)
            .saturating_mul(1i64 << doublings)
            .min(ms(self.max_delay))
    }
}

/// Why an attempt is refused, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many failed attempts; retry in {retry_after_secs} s")]
    User { retry_after_secs: u64 },
    #[error("too many failed logins from your address; retry in {retry_after_secs} s")]
    Source { retry_after_secs: u64 },
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::User { .. } => "user",
            Refusal::Source { .. } => "source",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct PairRecord {
    failures: u32,
    last_failure_ms: i64,
    blocked_until_ms: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct SourceRecord {
    source: String,
    failures: u32,
    window_start_ms: i64,
}

/// Where a client's failures are counted: its IPv4 address, or its IPv6 /64.
pub fn source_of(client_address: &str) -> String {
    let ip = client_address
        .parse::<SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| client_address.parse::<IpAddr>());
    match ip {
        Ok(IpAddr::V4(v4)) => v4.to_string(),
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                format!("{}/64", std::net::Ipv6Addr::from(prefix))
            }
        },
        Err(_) => "unknown".to_owned(),
    }
}

fn hashed(parts: &[&str]) -> String {
    let joined = parts.join("\0");
    digest(&SHA256, joined.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An attempt counted as a failure until it is refunded.
#[derive(Debug)]
pub struct Reservation {
    pair_key: String,
    source_key: String,
}

pub struct Throttle {
    store: std::sync::Arc<dyn Store>,
    policy: ThrottlePolicy,
    clock: Box<dyn Clock>,
    locks: KeyedLocks,
    /// Keys this replica knows are blocked, and until when (ms). Never held across an await.
    blocked: Mutex<HashMap<String, i64>>,
}

impl Throttle {
    pub fn new(
        store: std::sync::Arc<dyn Store>,
        policy: ThrottlePolicy,
        clock: Box<dyn Clock>,
    ) -> Self {
        Self {
            store,
            policy,
            clock,
            locks: KeyedLocks::default(),
            blocked: Mutex::default(),
        }
    }

    fn keys(user: &str, client_address: &str) -> (String, String, String) {
        let source = source_of(client_address);
        let pair_key = format!("{PAIRS}{}", hashed(&[user, &source]));
        let source_key = format!("{SOURCES}{}", hashed(&[&source]));
        (pair_key, source_key, source)
    }

    fn locally_blocked(&self, pair_key: &str, source_key: &str, now: i64) -> Option<Refusal> {
        let blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        let secs = |until: i64| {
            u64::try_from((until - now + 999) / 1000)
                .unwrap_or(1)
                .max(1)
        };
        if let Some(until) = blocked.get(source_key).filter(|u| **u > now) {
            return Some(Refusal::Source {
                retry_after_secs: secs(*until),
            });
        }
        blocked
            .get(pair_key)
            .filter(|u| **u > now)
            .map(|until| Refusal::User {
                retry_after_secs: secs(*until),
            })
    }

    fn remember_block(&self, key: &str, until: i64, now: i64) {
        let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        if blocked.len() > LOCAL_LIMIT {
            blocked.retain(|_, u| *u > now);
        }
        if until > now {
            blocked.insert(key.to_owned(), until);
        } else {
            blocked.remove(key);
        }
    }

    fn refused(&self, refusal: Refusal) -> ThrottleError {
        metrics::counter!("envgate_controlplane_auth_throttled_total", "reason" => refusal.reason())
            .increment(1);
        ThrottleError::Refused(refusal)
    }

    /// Counts an attempt of `user` from `client_address` as a failure, unless it must wait;
    /// `refund` it when the credential turns out right.
    pub async fn reserve(
        &self,
        user: &str,
        client_address: &str,
    ) -> Result<Reservation, ThrottleError> {
        let (pair_key, source_key, source) = Self::keys(user, client_address);
        if let Some(refusal) = self.locally_blocked(&pair_key, &source_key, self.clock.now_ms()) {
            return Err(self.refused(refusal));
        }
        let _turn = self.locks.lock(&pair_key).await;
        for _ in 0..CAS_ATTEMPTS {
            // Read after the lock: the attempt before this one may have blocked the key.
            let now = self.clock.now_ms();
            if let Some(refusal) = self.locally_blocked(&pair_key, &source_key, now) {
                return Err(self.refused(refusal));
            }
            let (pair, counted) = tokio::try_join!(
                store::get_json::<PairRecord>(self.store.as_ref(), &pair_key),
                store::get_json::<SourceRecord>(self.store.as_ref(), &source_key),
            )?;
            let pair_revision = pair.as_ref().map_or(0, |v| v.mod_revision);
            let source_revision = counted.as_ref().map_or(0, |v| v.mod_revision);
            let mut pair = pair
                .map(|v| v.value)
                .filter(|p| p.last_failure_ms + ms(self.policy.quiet_reset) > now)
                .unwrap_or_default();
            let mut counted = counted
                .map(|v| v.value)
                .filter(|s| s.window_start_ms + ms(self.policy.source_window) > now)
                .unwrap_or(SourceRecord {
                    source: source.clone(),
                    failures: 0,
                    window_start_ms: now,
                });
            if pair.blocked_until_ms > now {
                self.remember_block(&pair_key, pair.blocked_until_ms, now);
                return Err(self.refused(Refusal::User {
                    retry_after_secs: u64::try_from((pair.blocked_until_ms - now + 999) / 1000)
                        .unwrap_or(1),
                }));
            }
            if counted.failures >= self.policy.source_budget {
                let until = counted.window_start_ms + ms(self.policy.source_window);
                self.remember_block(&source_key, until, now);
                return Err(self.refused(Refusal::Source {
                    retry_after_secs: u64::try_from((until - now + 999) / 1000).unwrap_or(1),
                }));
            }
            pair.failures += 1;
            pair.last_failure_ms = now;
            pair.blocked_until_ms = now + self.policy.delay_after(pair.failures);
            counted.failures += 1;
            let written = self
                .store
                .txn(
                    vec![
                        Compare::revision(&pair_key, pair_revision),
                        Compare::revision(&source_key, source_revision),
                    ],
                    vec![
                        TxnOp::put_json(&pair_key, &pair, None),
                        TxnOp::put_json(&source_key, &counted, None),
                    ],
                )
                .await?;
            if written.is_some() {
                self.remember_block(&pair_key, pair.blocked_until_ms, now);
                return Ok(Reservation {
                    pair_key,
                    source_key,
                });
            }
        }
        Err(StoreError::Unavailable("throttle records kept changing; try again".into()).into())
    }

    /// The reserved attempt succeeded: it was not a failure after all, and the (user,
    /// source) starts afresh.
    pub async fn refund(&self, reservation: Reservation) -> Result<(), StoreError> {
        let Reservation {
            pair_key,
            source_key,
        } = reservation;
        let _turn = self.locks.lock(&pair_key).await;
        self.remember_block(&pair_key, 0, self.clock.now_ms());
        for _ in 0..CAS_ATTEMPTS {
            let counted = store::get_json::<SourceRecord>(self.store.as_ref(), &source_key).await?;
            let mut ops = vec![TxnOp::delete(&pair_key)];
            let mut compares = Vec::new();
            if let Some(counted) = counted {
                compares.push(Compare::revision(&source_key, counted.mod_revision));
                let mut record = counted.value;
                record.failures = record.failures.saturating_sub(1);
                ops.push(TxnOp::put_json(&source_key, &record, None));
            }
            if self.store.txn(compares, ops).await?.is_some() {
                return Ok(());
            }
        }
        Err(StoreError::Unavailable(
            "throttle records kept changing; the refund was skipped".into(),
        ))
    }

    /// Counts a failure that had no reservation (a key refused after its signature): the same
    /// as an attempt that failed, and nothing when the key is already blocked.
    pub async fn record_failure(&self, user: &str, client_address: &str) -> Result<(), StoreError> {
        match self.reserve(user, client_address).await {
            Ok(_) | Err(ThrottleError::Refused(_)) => Ok(()),
            Err(ThrottleError::Store(e)) => Err(e),
        }
    }

    /// Deletes records whose counts have expired; returns how many. Run by the leader.
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        let now = self.clock.now_ms();
        let mut stale = Vec::new();
        for (key, record) in store::range_json::<PairRecord>(self.store.as_ref(), PAIRS).await? {
            if record.value.last_failure_ms + ms(self.policy.quiet_reset) <= now {
                stale.push((key, record.mod_revision));
            }
        }
        for (key, record) in store::range_json::<SourceRecord>(self.store.as_ref(), SOURCES).await?
        {
            if record.value.window_start_ms + ms(self.policy.source_window) <= now {
                stale.push((key, record.mod_revision));
            }
        }
        let mut removed = 0;
        for (key, revision) in stale {
            // Compared on the revision: a record written since is kept.
            let deleted = self
                .store
                .txn(
                    vec![Compare::revision(&key, revision)],
                    vec![TxnOp::delete(&key)],
                )
                .await?;
            removed += usize::from(deleted.is_some());
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::MemoryStore;

    fn throttle(store: Arc<dyn Store>, clock: Arc<ManualClock>) -> Throttle {
        struct Shared(Arc<ManualClock>);
        impl Clock for Shared {
            fn now_ms(&self) -> i64 {
                self.0.now_ms()
            }
        }
        Throttle::new(store, ThrottlePolicy::default(), Box::new(Shared(clock)))
    }

    #[test]
    fn sources_are_addresses_and_ipv6_64s() {
        assert_eq!(source_of("192.0.2.7:4000"), "192.0.2.7");
        assert_eq!(source_of("[::ffff:192.0.2.7]:4000"), "192.0.2.7");
        assert_eq!(source_of("[2001:db8:1:2:aaaa::1]:22"), "2001:db8:1:2::/64");
        assert_eq!(source_of("[2001:db8:1:2:bbbb::9]:22"), "2001:db8:1:2::/64");
        assert_eq!(source_of("[2001:db8:1:3::1]:22"), "2001:db8:1:3::/64");
        assert_eq!(source_of("2001:db8:1:2::5"), "2001:db8:1:2::/64");
        assert_eq!(source_of(""), "unknown");
        assert_eq!(source_of("not an address"), "unknown");
    }

    #[test]
    fn delays_double_after_the_free_failures_up_to_the_cap() {
        let policy = ThrottlePolicy::default();
        let delays: Vec<i64> = (1..=8).map(|n| policy.delay_after(n)).collect();
        assert_eq!(delays, [0, 0, 0, 0, 1000, 2000, 4000, 8000]);
        assert_eq!(policy.delay_after(40), 15 * 60 * 1000);
    }

    #[tokio::test]
    async fn waits_grow_and_are_forgotten_after_the_quiet_period() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let clock = Arc::new(ManualClock::at(1_000_000));
        let throttle = throttle(store.clone(), clock.clone());
        for _ in 0..5 {
            throttle.reserve("alice", "192.0.2.1:1").await.unwrap();
        }
        let refused = |e: ThrottleError| match e {
            ThrottleError::Refused(r) => r,
            other => panic!("{other}"),
        };
        let err = refused(throttle.reserve("alice", "192.0.2.1:2").await.unwrap_err());
        assert_eq!(
            err,
            Refusal::User {
                retry_after_secs: 1
            }
        );
        assert_eq!(err.to_string(), "too many failed attempts; retry in 1 s");
        // Refused attempts do not extend the wait.
        clock.advance(Duration::from_millis(999));
        assert!(throttle.reserve("alice", "192.0.2.1:2").await.is_err());
        clock.advance(Duration::from_millis(1));
        throttle.reserve("alice", "192.0.2.1:2").await.unwrap();
        let err = refused(throttle.reserve("alice", "192.0.2.1:2").await.unwrap_err());
        assert_eq!(
            err,
            Refusal::User {
                retry_after_secs: 2
            }
        );
        // Another address of alice's, and another user from this address, are not slowed.
        throttle.reserve("alice", "198.51.100.1:2").await.unwrap();
        throttle.reserve("bob", "192.0.2.1:2").await.unwrap();
        // After the quiet period alice starts afresh, and the leader sweeps the records.
        clock.advance(Duration::from_secs(15 * 60));
        throttle.reserve("alice", "192.0.2.1:2").await.unwrap();
        clock.advance(Duration::from_secs(15 * 60));
        assert_eq!(throttle.sweep().await.unwrap(), 5);
        assert!(store.range("throttle/").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_success_refunds_its_attempt_and_clears_the_failures() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let clock = Arc::new(ManualClock::at(1_000_000));
        let throttle = throttle(store.clone(), clock);
        for _ in 0..4 {
            throttle.reserve("alice", "192.0.2.1:1").await.unwrap();
        }
        let ok = throttle.reserve("alice", "192.0.2.1:1").await.unwrap();
        throttle.refund(ok).await.unwrap();
        // Five more free failures, not one more until the wait.
        for _ in 0..5 {
            throttle.reserve("alice", "192.0.2.1:1").await.unwrap();
        }
        assert!(throttle.reserve("alice", "192.0.2.1:1").await.is_err());
        let sources = store::range_json::<SourceRecord>(store.as_ref(), SOURCES)
            .await
            .unwrap();
        assert_eq!(
            sources[0].1.value.failures, 9,
            "4 + 5, the refunded one not"
        );
    }

    #[tokio::test]
    async fn one_source_has_a_budget_across_all_users() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let clock = Arc::new(ManualClock::at(1_000_000));
        let throttle = throttle(store, clock.clone());
        for n in 0..ThrottlePolicy::default().source_budget {
            throttle
                .reserve(&format!("u{n}"), "[2001:db8::1]:1")
                .await
                .unwrap();
        }
        // Another address in the same /64 shares the budget.
        match throttle.reserve("someone", "[2001:db8::2]:1").await {
            Err(ThrottleError::Refused(r)) => assert_eq!(
                r.to_string(),
                "too many failed logins from your address; retry in 600 s"
            ),
            other => panic!("{other:?}"),
        }
        throttle
            .reserve("someone", "[2001:db8:0:1::1]:1")
            .await
            .unwrap();
        clock.advance(Duration::from_secs(600));
        throttle
            .reserve("someone", "[2001:db8::2]:1")
            .await
            .unwrap();
    }
}

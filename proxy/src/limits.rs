//! Limits on who may hold this proxy's connections, besides `--max-connections`: a budget of
//! connections still logging in (all of them, and those of one source), so clients that never
//! authenticate cannot hold every slot for the login grace; and a cap on each user's
//! authenticated connections. Decisions and defaults: docs/proxy.md, "Connection limits".

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::{PreauthRefusal, TooManyConnections};

/// The gauge of connections accepted and not logged in yet.
pub const UNAUTHENTICATED_GAUGE: &str = "envgate_unauthenticated_connections";

/// The limits as configured (main.rs parses them from flags; each is at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections not logged in yet, on all listeners together (sshd's `MaxStartups`).
    pub unauthenticated: usize,
    /// Connections not logged in yet from one [`Source`] (sshd's `PerSourceMaxStartups`).
    pub unauthenticated_per_source: usize,
    /// Authenticated connections of one user on this proxy.
    pub per_user: usize,
}

/// What a connection's source is counted as: its IPv4 address, or the /64 its IPv6 address is
/// in. A host is usually given a whole /64, so counting its addresses apart would let one
/// attacker be 2^64 sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => Self(IpAddr::V6(Ipv6Addr::from(
                    u128::from(v6) & (u128::MAX << 64),
                ))),
            },
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// The connections still logging in: at most `limit` in all, at most `per_source_limit` from
/// one source. A hard cap, not sshd's random early drop (docs/proxy.md says why).
#[derive(Clone)]
pub struct PreauthBudget {
    shared: Arc<PreauthShared>,
}

struct PreauthShared {
    limit: usize,
    per_source_limit: usize,
    state: Mutex<PreauthState>,
}

#[derive(Default)]
struct PreauthState {
    live: usize,
    /// Only sources with a connection logging in: an entry goes with its last connection.
    sources: HashMap<Source, SourceState>,
    flood: Option<Flood>,
}

#[derive(Default)]
struct SourceState {
    live: usize,
    flood: Option<Flood>,
}

/// Refusals at a spent budget, so a flood is logged as its start and its end (as sshd's
/// "beginning MaxStartups throttling"), not as one line per refused connection.
struct Flood {
    since: Instant,
    refused: u64,
}

impl Flood {
    /// Counts one refusal; true for the first of a flood.
    fn refuse(flood: &mut Option<Flood>) -> bool {
        match flood {
            Some(flood) => {
                flood.refused += 1;
                false
            }
            None => {
                *flood = Some(Flood {
                    since: Instant::now(),
                    refused: 1,
                });
                true
            }
        }
    }

    /// The flood that ended, once `live` is back at half of `limit`: a budget an attacker
    /// keeps full, where each freed place is taken again at once, stays one flood.
    fn end(flood: &mut Option<Flood>, live: usize, limit: usize) -> Option<Flood> {
        if live <= limit / 2 {
            flood.take()
        } else {
            None
        }
    }

    fn log_end(self, what: &str) {
        tracing::info!(
            refused = self.refused,
            seconds = self.since.elapsed().as_secs(),
            "no longer refusing connections {what}"
        );
    }
}

impl PreauthBudget {
    pub fn new(limit: usize, per_source_limit: usize) -> Self {
        Self {
            shared: Arc::new(PreauthShared {
                limit: limit.max(1),
                per_source_limit: per_source_limit.max(1),
                state: Mutex::default(),
            }),
        }
    }

    /// A place for a connection just accepted, before its source is known (a trusted
    /// balancer's PROXY header has not been read yet).
    pub fn enter(&self) -> Result<PreauthSlot, PreauthRefusal> {
        let mut state = self.shared.state.lock().expect("preauth lock");
        if state.live >= self.shared.limit {
            let first = Flood::refuse(&mut state.flood);
            drop(state);
            let refusal = PreauthRefusal::Global {
                limit: self.shared.limit,
            };
            log_refusal(&refusal, first);
            return Err(refusal);
        }
        state.live += 1;
        metrics::gauge!(UNAUTHENTICATED_GAUGE).set(state.live as f64);
        Ok(PreauthSlot {
            shared: self.shared.clone(),
            source: None,
        })
    }
}

fn log_refusal(refusal: &PreauthRefusal, first: bool) {
    if first {
        tracing::warn!("refusing new connections: {refusal}");
    } else {
        tracing::debug!(reason = %refusal, "connection refused");
    }
}

/// A connection's place in the [`PreauthBudget`], given back when dropped: when the user has
/// logged in, or the connection ends without.
pub struct PreauthSlot {
    shared: Arc<PreauthShared>,
    source: Option<Source>,
}

impl PreauthSlot {
    /// Counts the connection against its source, known once the PROXY header was read. On a
    /// refusal the caller closes the connection, dropping the slot.
    pub fn attribute(&mut self, ip: IpAddr) -> Result<(), PreauthRefusal> {
        let source = Source::of(ip);
        let limit = self.shared.per_source_limit;
        let mut state = self.shared.state.lock().expect("preauth lock");
        let entry = state.sources.entry(source).or_default();
        if entry.live >= limit {
            let first = Flood::refuse(&mut entry.flood);
            drop(state);
            let refusal = PreauthRefusal::PerSource {
                address: source,
                limit,
            };
            log_refusal(&refusal, first);
            return Err(refusal);
        }
        entry.live += 1;
        self.source = Some(source);
        Ok(())
    }
}

impl Drop for PreauthSlot {
    fn drop(&mut self) {
        let mut guard = self.shared.state.lock().expect("preauth lock");
        let state = &mut *guard;
        state.live -= 1;
        metrics::gauge!(UNAUTHENTICATED_GAUGE).set(state.live as f64);
        let global_end = Flood::end(&mut state.flood, state.live, self.shared.limit);
        let source_end = self.source.and_then(|source| {
            let entry = state.sources.get_mut(&source)?;
            entry.live -= 1;
            let end = Flood::end(&mut entry.flood, entry.live, self.shared.per_source_limit);
            if entry.live == 0 {
                state.sources.remove(&source);
            }
            end.map(|flood| (source, flood))
        });
        drop(guard);
        if let Some(flood) = global_end {
            flood.log_end("at --max-unauthenticated");
        }
        if let Some((source, flood)) = source_end {
            flood.log_end(&format!("from {source}"));
        }
    }
}

/// Each user's authenticated connections on this proxy, at most `limit` each.
#[derive(Clone)]
pub struct UserConnections {
    shared: Arc<UserShared>,
}

struct UserShared {
    limit: usize,
    /// Only users with a connection: an entry goes with its last one.
    live: Mutex<HashMap<String, usize>>,
}

impl UserConnections {
    pub fn new(limit: usize) -> Self {
        Self {
            shared: Arc::new(UserShared {
                limit: limit.max(1),
                live: Mutex::default(),
            }),
        }
    }

    /// A place for one more connection of `user`, held until the slot is dropped.
    pub fn admit(&self, user: &str) -> Result<UserSlot, TooManyConnections> {
        let mut live = self.shared.live.lock().expect("user connections lock");
        let count = live.get(user).copied().unwrap_or(0);
        if count >= self.shared.limit {
            return Err(TooManyConnections {
                user: user.to_owned(),
                limit: self.shared.limit,
            });
        }
        live.insert(user.to_owned(), count + 1);
        Ok(UserSlot {
            shared: self.shared.clone(),
            user: user.to_owned(),
        })
    }
}

/// One of a user's places in [`UserConnections`], given back when dropped.
pub struct UserSlot {
    shared: Arc<UserShared>,
    user: String,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut live = self.shared.live.lock().expect("user connections lock");
        if let Some(count) = live.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                live.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    impl PreauthBudget {
        fn counts(&self) -> (usize, usize) {
            let state = self.shared.state.lock().unwrap();
            (state.live, state.sources.len())
        }
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_64s() {
        assert_eq!(Source::of(ip("192.0.2.7")).to_string(), "192.0.2.7");
        assert_ne!(Source::of(ip("192.0.2.7")), Source::of(ip("192.0.2.8")));
        assert_eq!(
            Source::of(ip("2001:db8:1:2:aaaa::1")),
            Source::of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_eq!(
            Source::of(ip("2001:db8:1:2:aaaa::1")).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_ne!(
            Source::of(ip("2001:db8:1:2::1")),
            Source::of(ip("2001:db8:1:3::1"))
        );
        // An IPv4 client on a dual-stack socket is its IPv4 address.
        assert_eq!(
            Source::of(ip("::ffff:192.0.2.7")),
            Source::of(ip("192.0.2.7"))
        );
    }

    #[test]
    fn the_global_budget_refuses_past_its_limit_and_frees_on_drop() {
        let budget = PreauthBudget::new(3, 10);
        let slots: Vec<_> = (0..3).map(|_| budget.enter().unwrap()).collect();
        assert_eq!(
            budget.enter().err(),
            Some(PreauthRefusal::Global { limit: 3 })
        );
        assert_eq!(budget.counts(), (3, 0));
        drop(slots);
        assert_eq!(budget.counts(), (0, 0));
        assert!(budget.enter().is_ok());
    }

    #[test]
    fn one_source_is_refused_while_others_get_in() {
        let budget = PreauthBudget::new(100, 2);
        let attacker = "2001:db8:bad::1";
        let mut held = Vec::new();
        for n in 1..=2 {
            let mut slot = budget.enter().unwrap();
            // Another address in the same /64 is the same source.
            slot.attribute(ip(&format!("2001:db8:bad::{n}"))).unwrap();
            held.push(slot);
        }
        let mut refused = budget.enter().unwrap();
        assert_eq!(
            refused.attribute(ip("2001:db8:bad::ffff")).err(),
            Some(PreauthRefusal::PerSource {
                address: Source::of(ip(attacker)),
                limit: 2
            })
        );
        // The refused connection still holds its global place until it is dropped.
        assert_eq!(budget.counts(), (3, 1));
        drop(refused);
        assert_eq!(budget.counts(), (2, 1));

        let mut other = budget.enter().unwrap();
        other.attribute(ip("192.0.2.1")).unwrap();
        assert_eq!(budget.counts(), (3, 2));
        drop(other);

        // Once the attacker's connections are gone, the source may connect again and no
        // entry is left behind.
        drop(held);
        assert_eq!(budget.counts(), (0, 0));
        let mut again = budget.enter().unwrap();
        again.attribute(ip(attacker)).unwrap();
        assert_eq!(budget.counts(), (1, 1));
    }

    #[test]
    fn a_user_over_the_cap_is_refused_until_a_connection_ends() {
        let users = UserConnections::new(2);
        let first = users.admit("alice").unwrap();
        let _second = users.admit("alice").unwrap();
        let refused = users.admit("alice").err().unwrap();
        assert_eq!(
            refused.to_string(),
            "too many connections for alice (the limit is 2 per proxy); close some and try again"
        );
        let bob = users.admit("bob").unwrap();
        drop(first);
        let _third = users.admit("alice").unwrap();
        assert!(users.admit("alice").is_err());
        drop(bob);
        assert!(!users.shared.live.lock().unwrap().contains_key("bob"));
    }
}

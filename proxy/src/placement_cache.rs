//! The last placement each user got in each environment on this proxy, so that a user whose
//! container is running can still reach it while no control-plane replica answers
//! (docs/operations.md, "When the control plane is down"; what it allows: docs/security.md,
//! "The placement cache").
//!
//! Only the control plane's own answers go in, keyed by the user and environment the
//! placement names; a lookup gives a placement only to that user, for that environment, while
//! the token the placement was made under is alive. An entry is no proof the container still
//! runs: the session checks that its agent answers before using it.

use std::collections::HashMap;
use std::sync::Mutex;

use envgate_proto::v1::Placement;

/// The placement's user and environment.
type Key = (String, String);

struct Entry {
    placement: Placement,
    /// Unix seconds: the expiry of the token the placement was made under.
    expires_at: i64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// The environment the control plane chose for each user who named none, last time.
    defaults: HashMap<String, String>,
}

/// A bounded map from (user, environment) to placement. A std mutex is enough: every
/// operation is a few map operations and never awaits.
pub struct PlacementCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

impl PlacementCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
        }
    }

    /// Remembers the control plane's answer to a request for `requested` ("" = the user named
    /// none), made under a token that expires at `expires_at`. Only a persistent container
    /// with an agent is remembered: an ephemeral one is gone with its session, and without
    /// the agent there is no cheap way to tell whether the container still answers.
    pub fn remember(&self, requested: &str, placement: &Placement, expires_at: i64) {
        let mut inner = self.inner.lock().expect("placement cache lock");
        let key = (placement.user.clone(), placement.environment.clone());
        if requested.is_empty() {
            inner
                .defaults
                .insert(placement.user.clone(), placement.environment.clone());
        }
        if !placement.persistent || !crate::session::has_agent(placement) {
            inner.entries.remove(&key);
            return;
        }
        inner.entries.insert(
            key,
            Entry {
                placement: placement.clone(),
                expires_at,
            },
        );
        if inner.entries.len() > self.capacity {
            // The entry that would lapse first goes; only when full, so the scan is rare.
            if let Some(oldest) = inner
                .entries
                .iter()
                .min_by_key(|(_, e)| e.expires_at)
                .map(|(k, _)| k.clone())
            {
                inner.entries.remove(&oldest);
            }
        }
        if inner.defaults.len() > self.capacity {
            let Inner { entries, defaults } = &mut *inner;
            defaults.retain(|user, environment| {
                entries.contains_key(&(user.clone(), environment.clone()))
            });
        }
    }

    /// The placement `user` last got in `requested` ("": the environment the control plane
    /// last chose for them when they named none), if the token it was made under is alive at
    /// `now` (Unix seconds).
    pub fn lookup(&self, user: &str, requested: &str, now: i64) -> Option<Placement> {
        let mut inner = self.inner.lock().expect("placement cache lock");
        let environment = if requested.is_empty() {
            inner.defaults.get(user)?.clone()
        } else {
            requested.to_owned()
        };
        let key = (user.to_owned(), environment);
        let entry = inner.entries.get(&key)?;
        if entry.expires_at <= now {
            inner.entries.remove(&key);
            return None;
        }
        Some(entry.placement.clone())
    }

    /// Drops the placement of `user` in `environment` (its container stopped answering).
    pub fn forget(&self, user: &str, environment: &str) {
        let mut inner = self.inner.lock().expect("placement cache lock");
        inner
            .entries
            .remove(&(user.to_owned(), environment.to_owned()));
    }

    /// Drops every placement of `user` (their tokens were revoked or refused).
    pub fn forget_user(&self, user: &str) -> usize {
        let mut inner = self.inner.lock().expect("placement cache lock");
        let before = inner.entries.len();
        inner.entries.retain(|(u, _), _| u != user);
        inner.defaults.remove(user);
        before - inner.entries.len()
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .expect("placement cache lock")
            .entries
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envgate_proto::v1::placement::Start;
    use envgate_proto::v1::{AgentUnix, DockerExec};

    fn placement(user: &str, environment: &str) -> Placement {
        Placement {
            session_id: format!("s-{user}-{environment}"),
            user: user.into(),
            environment: environment.into(),
            container_id: format!("c-{user}-{environment}"),
            start: Some(Start::AgentUnix(AgentUnix {
                path: "/run/agent.sock".into(),
                secret: "00".into(),
            })),
            persistent: true,
            ..Placement::default()
        }
    }

    #[test]
    fn a_placement_lives_as_long_as_its_token() {
        let cache = PlacementCache::new(10);
        cache.remember("busybox", &placement("alice", "busybox"), 1000);
        let hit = cache.lookup("alice", "busybox", 999).expect("cached");
        assert_eq!(hit.container_id, "c-alice-busybox");
        assert!(cache.lookup("alice", "busybox", 1000).is_none());
        assert!(cache.is_empty(), "an expired entry is dropped when seen");
    }

    #[test]
    fn only_the_same_user_and_environment_get_it() {
        let cache = PlacementCache::new(10);
        cache.remember("busybox", &placement("alice", "busybox"), 1000);
        assert!(cache.lookup("bob", "busybox", 0).is_none());
        assert!(cache.lookup("alice", "debian", 0).is_none());
        assert!(cache.lookup("Alice", "busybox", 0).is_none());
        // No environment named, and alice never named none: nothing to guess from.
        assert!(cache.lookup("alice", "", 0).is_none());
        // Bob's own placement does not make alice's visible to him, nor his to her.
        cache.remember("busybox", &placement("bob", "busybox"), 1000);
        assert_eq!(
            cache.lookup("bob", "busybox", 0).unwrap().container_id,
            "c-bob-busybox"
        );
        assert_eq!(
            cache.lookup("alice", "busybox", 0).unwrap().container_id,
            "c-alice-busybox"
        );
    }

    #[test]
    fn the_key_is_what_the_control_plane_answered_not_what_was_asked() {
        let cache = PlacementCache::new(10);
        // Asked for "debian", placed in busybox (as the control plane decided): remembered
        // under busybox only.
        cache.remember("debian", &placement("alice", "busybox"), 1000);
        assert!(cache.lookup("alice", "debian", 0).is_none());
        assert!(cache.lookup("alice", "busybox", 0).is_some());
    }

    #[test]
    fn no_environment_named_means_the_one_the_control_plane_chose_last() {
        let cache = PlacementCache::new(10);
        cache.remember("", &placement("alice", "busybox"), 1000);
        cache.remember("debian", &placement("alice", "debian"), 1000);
        assert_eq!(
            cache.lookup("alice", "", 0).unwrap().environment,
            "busybox",
            "the default, not the environment placed last"
        );
        assert!(cache.lookup("bob", "", 0).is_none());
    }

    #[test]
    fn ephemeral_and_agentless_containers_are_not_remembered() {
        let cache = PlacementCache::new(10);
        cache.remember("busybox", &placement("alice", "busybox"), 1000);
        let ephemeral = Placement {
            persistent: false,
            ..placement("alice", "busybox")
        };
        cache.remember("busybox", &ephemeral, 1000);
        assert!(
            cache.lookup("alice", "busybox", 0).is_none(),
            "an ephemeral answer replaces the old persistent one"
        );
        let agentless = Placement {
            start: Some(Start::DockerExec(DockerExec {
                container_id: "c-alice-debian".into(),
            })),
            ..placement("alice", "debian")
        };
        cache.remember("debian", &agentless, 1000);
        assert!(cache.lookup("alice", "debian", 0).is_none());
    }

    #[test]
    fn forgetting_drops_only_what_it_names() {
        let cache = PlacementCache::new(10);
        cache.remember("", &placement("alice", "busybox"), 1000);
        cache.remember("debian", &placement("alice", "debian"), 1000);
        cache.remember("busybox", &placement("bob", "busybox"), 1000);
        cache.forget("alice", "debian");
        assert!(cache.lookup("alice", "debian", 0).is_none());
        assert!(cache.lookup("alice", "busybox", 0).is_some());
        assert_eq!(cache.forget_user("alice"), 1);
        assert!(cache.lookup("alice", "", 0).is_none());
        assert!(cache.lookup("bob", "busybox", 0).is_some());
    }

    #[test]
    fn the_cache_is_bounded_and_drops_what_lapses_first() {
        let cache = PlacementCache::new(2);
        cache.remember("a", &placement("u1", "a"), 3000);
        cache.remember("a", &placement("u2", "a"), 1000);
        cache.remember("a", &placement("u3", "a"), 2000);
        assert_eq!(cache.len(), 2);
        assert!(cache.lookup("u2", "a", 0).is_none());
        assert!(cache.lookup("u1", "a", 0).is_some());
        assert!(cache.lookup("u3", "a", 0).is_some());
        for n in 0..50 {
            cache.remember("", &placement(&format!("x{n}"), "a"), 500 + n);
        }
        let inner = cache.inner.lock().unwrap();
        assert!(inner.entries.len() <= 2);
        assert!(inner.defaults.len() <= 3, "{}", inner.defaults.len());
    }
}

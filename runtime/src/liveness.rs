//! What a runtime knows of its containers' liveness without asking the engine: the set of
//! containers an engine's event stream says run, so a warm login's placement need not inspect
//! its container (a Docker call per login, about 1 ms of the daemon's CPU on the bench machine).
//!
//! The cache only ever answers "known to run". Anything else — a container it has not heard
//! of, one whose last event was a stop, any moment its event stream is not up — is "ask the
//! engine" ([`Runtime::is_running`](crate::Runtime::is_running)). So a wrong answer can only
//! be "runs" for a container that died during the few milliseconds an event takes to arrive;
//! the session then fails to start and the proxy's close replaces the container, as when a
//! container dies just after an inspect. A "not running" that would remove a live container
//! (and kill its user's other sessions) never comes from here.
//!
//! [`follow`] keeps a [`LivenessCache`] current from a [`Feed`] (the engine's events and a
//! listing of what runs): subscribe, list, apply events in order; when the stream breaks the
//! cache is distrusted at once, and trusted again only after a new subscription and listing,
//! retried with backoff. Engines provide the feed (`docker::events`).

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::types::RuntimeError;

/// A runtime's optional capability (see [`Runtime::liveness`](crate::Runtime::liveness)).
pub trait Liveness: Send + Sync {
    /// `true` only when the engine's event stream, up right now, last said `id` started;
    /// `false` means "not known": ask the engine.
    fn known_running(&self, id: &str) -> bool;
}

/// A container's change of state, as the engine's events tell it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Started(String),
    /// Died, stopped, was killed, paused or removed: whichever, not known to run any more.
    Stopped(String),
}

/// Where a [`LivenessCache`] learns from: one engine, one instance's containers.
#[async_trait]
pub trait Feed: Send + Sync {
    /// The engine's container events from (about) now on. Events that happened since shortly
    /// before the call may come first again: the listing that follows must miss none.
    async fn subscribe(
        &self,
    ) -> Result<BoxStream<'static, Result<Change, RuntimeError>>, RuntimeError>;
    /// The ids of the containers running now.
    async fn running(&self) -> Result<Vec<String>, RuntimeError>;
}

/// Containers known to run; trusted only while its feed's stream is up.
#[derive(Default)]
pub struct LivenessCache {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    trusted: bool,
    running: HashSet<String>,
}

impl LivenessCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether answers come from the cache now (for tests and logs).
    pub fn trusted(&self) -> bool {
        self.lock().trusted
    }

    /// The stream broke: every answer is "ask the engine" until [`Self::resync`].
    fn distrust(&self) {
        let mut state = self.lock();
        state.trusted = false;
        state.running.clear();
    }

    /// A fresh listing, taken after the subscription: trusted from now on.
    fn resync(&self, running: Vec<String>) {
        let mut state = self.lock();
        state.running = running.into_iter().collect();
        state.trusted = true;
    }

    fn apply(&self, change: Change) {
        let mut state = self.lock();
        match change {
            Change::Started(id) => state.running.insert(id),
            Change::Stopped(id) => state.running.remove(&id),
        };
    }
}

impl Liveness for LivenessCache {
    fn known_running(&self, id: &str) -> bool {
        let state = self.lock();
        state.trusted && state.running.contains(id)
    }
}

/// Pause before the first retry after the stream broke or could not be had; doubled at each
/// failure in a row up to [`BACKOFF_MAX`]. A stream that stayed up that long starts over.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Keeps `cache` current from `feed` for as long as the future runs (the runtime's task).
pub async fn follow(cache: &LivenessCache, feed: &dyn Feed) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        let ended = follow_once(cache, feed).await;
        cache.distrust();
        if started.elapsed() > BACKOFF_MAX {
            backoff = BACKOFF_MIN;
        }
        match ended {
            Ok(()) => tracing::warn!(
                "the engine's event stream ended; asking the engine whether containers run until it is back"
            ),
            Err(e) => tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                "the engine's event stream is down; asking the engine whether containers run until it is back"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One subscription: `Ok` when the stream ended, `Err` when it failed or could not be had.
async fn follow_once(cache: &LivenessCache, feed: &dyn Feed) -> Result<(), RuntimeError> {
    // Subscribe first, then list: whatever changes after the listing is in the stream.
    let mut events = feed.subscribe().await?;
    cache.resync(feed.running().await?);
    tracing::debug!("liveness cache synced with the engine's event stream");
    while let Some(change) = events.next().await {
        cache.apply(change?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::sync::mpsc;

    /// A feed the test drives: what runs, and a channel per subscription that the test can
    /// feed or close (a broken stream); subscriptions fail while `down`.
    #[derive(Default)]
    struct Scripted {
        running: Mutex<Vec<String>>,
        down: Mutex<bool>,
        subscribers: Mutex<Vec<mpsc::UnboundedSender<Result<Change, RuntimeError>>>>,
        subscriptions: Mutex<usize>,
    }

    impl Scripted {
        fn send(&self, change: Change) {
            for tx in self.subscribers.lock().unwrap().iter() {
                let _ = tx.send(Ok(change.clone()));
            }
        }
        fn break_stream(&self) {
            for tx in self.subscribers.lock().unwrap().drain(..) {
                let _ = tx.send(Err(RuntimeError::Unavailable("cut".into())));
            }
        }
        fn subscriptions(&self) -> usize {
            *self.subscriptions.lock().unwrap()
        }
    }

    #[async_trait]
    impl Feed for Scripted {
        async fn subscribe(
            &self,
        ) -> Result<BoxStream<'static, Result<Change, RuntimeError>>, RuntimeError> {
            *self.subscriptions.lock().unwrap() += 1;
            if *self.down.lock().unwrap() {
                return Err(RuntimeError::Unavailable("engine down".into()));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            self.subscribers.lock().unwrap().push(tx);
            Ok(stream_of(rx))
        }
        async fn running(&self) -> Result<Vec<String>, RuntimeError> {
            Ok(self.running.lock().unwrap().clone())
        }
    }

    fn stream_of(
        mut rx: mpsc::UnboundedReceiver<Result<Change, RuntimeError>>,
    ) -> BoxStream<'static, Result<Change, RuntimeError>> {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
    }

    async fn eventually(what: &str, done: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("not within 5 s: {what}"));
    }

    #[tokio::test]
    async fn the_cache_follows_events_and_distrusts_a_broken_stream_until_it_resyncs() {
        let feed = Arc::new(Scripted::default());
        *feed.running.lock().unwrap() = vec!["a".into()];
        let cache = Arc::new(LivenessCache::default());
        assert!(
            !cache.known_running("a"),
            "nothing is trusted before a listing"
        );
        let follower = {
            let (cache, feed) = (cache.clone(), feed.clone());
            tokio::spawn(async move { follow(&cache, feed.as_ref()).await })
        };
        eventually("listed", || cache.known_running("a")).await;
        assert!(!cache.known_running("b"), "unknown: ask the engine");

        feed.send(Change::Started("b".into()));
        feed.send(Change::Stopped("a".into()));
        eventually("b started, a stopped", || {
            cache.known_running("b") && !cache.known_running("a")
        })
        .await;

        // The stream breaks while the engine is down: nothing is known; no listing is
        // trusted until a subscription succeeds again.
        *feed.down.lock().unwrap() = true;
        feed.break_stream();
        eventually("distrusted", || !cache.trusted()).await;
        assert!(!cache.known_running("b"));
        let before = feed.subscriptions();
        eventually("retried", || feed.subscriptions() >= before + 2).await;
        assert!(!cache.trusted());

        // Back: what runs now is listed again (an event missed while down counts for nothing).
        *feed.running.lock().unwrap() = vec!["c".into()];
        *feed.down.lock().unwrap() = false;
        eventually("resynced", || cache.known_running("c")).await;
        assert!(
            !cache.known_running("b"),
            "b stopped while the stream was down"
        );
        follower.abort();
    }
}

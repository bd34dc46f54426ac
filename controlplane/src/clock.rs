//! The control plane's wall clock, injected so tests move time instead of sleeping past it.
//!
//! Everything the control plane judges by the time of day goes through a [`Clock`]: idle
//! timeouts, maximum lifetimes and their warnings (`reconcile`), stale claims and the times
//! written into placement records (`placement`, `pool`), login-failure delays (`throttle`) and
//! the in-memory store's lease TTLs (`store::memory`). Production uses [`SystemClock`]; tests
//! share one [`ManualClock`] between the parts they drive and `advance` it.
//!
//! What etcd judges itself (a real etcd lease's TTL) follows etcd's own clock: no injected
//! clock moves it, and a test of it can only wait for etcd.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;

    /// Unix seconds, as placement records store them.
    fn now(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }
}

/// One clock shared by the parts of a control plane.
impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now_ms(&self) -> i64 {
        (**self).now_ms()
    }
}

/// The system's wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// A clock tests set by hand: it stands still until advanced.
#[derive(Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn at(ms: i64) -> Self {
        Self(AtomicI64::new(ms))
    }

    /// Stopped at the system's time now, for tests whose other parts (Docker's creation
    /// times, etcd) still read the real clock.
    pub fn starting_now() -> Self {
        Self::at(SystemClock.now_ms())
    }

    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.0.fetch_add(by, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::at(1_999);
        assert_eq!((clock.now_ms(), clock.now()), (1_999, 1));
        clock.advance(Duration::from_millis(1));
        assert_eq!((clock.now_ms(), clock.now()), (2_000, 2));
        let started = ManualClock::starting_now();
        let before = started.now();
        assert!(
            (before - SystemClock.now()).abs() <= 1,
            "starts at the system's time"
        );
        started.advance(Duration::from_secs(900));
        assert_eq!(started.now(), before + 900);
    }
}

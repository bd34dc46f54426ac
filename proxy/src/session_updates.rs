//! Sessions the control plane placed unrecorded (`Placement.report_after_ms`, a warm login
//! that cost etcd nothing): this proxy is where they are known. One that lasts its
//! `report_after_ms` is reported, so the control plane records it as a placement would have;
//! every one's end is sent too. Both go on the Fleet stream as numbered `SessionUpdate`s, in
//! the order they happened, and are kept until the control plane acknowledges them: a stream
//! that breaks (its replica died) sends them again on the next one. docs/decisions.md,
//! "Unrecorded warm logins".

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use envgate_proto::v1::{SessionEnd, SessionUpdate, UnrecordedSession};
use tokio::sync::Notify;

/// Updates kept at most while no replica acknowledges them; past it the oldest is dropped
/// (and counted). A dropped report leaves a session unrecorded: docs/operations.md.
pub const CAPACITY: usize = 10_000;

pub struct SessionLedger {
    inner: Mutex<Inner>,
    capacity: usize,
    settled: Notify,
}

#[derive(Default)]
struct Inner {
    /// The last sequence number given out.
    last: u64,
    open: HashMap<String, Open>,
    /// When each open session falls due for its report, soonest first: the 200 ms tick looks
    /// at the sessions due, not at every open one.
    due: BinaryHeap<Reverse<(Instant, String)>>,
    /// Updates not acknowledged yet, oldest first.
    outbox: VecDeque<SessionUpdate>,
}

struct Open {
    session: UnrecordedSession,
    reported: bool,
}

impl Default for SessionLedger {
    fn default() -> Self {
        Self::new(CAPACITY)
    }
}

impl SessionLedger {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::default(),
            capacity: capacity.max(1),
            settled: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `session`, placed unrecorded, to be reported if still open after `report_after`.
    pub fn placed(&self, session: UnrecordedSession, report_after: Duration) {
        let id = session.session_id.clone();
        let mut inner = self.lock();
        inner
            .due
            .push(Reverse((Instant::now() + report_after, id.clone())));
        let open = Open {
            reported: false,
            session,
        };
        inner.open.insert(id, open);
    }

    /// Queues the end of `session_id`; false if it was not placed unrecorded (its end is then
    /// a CloseSession call).
    pub fn ended(&self, session_id: &str, exit_status: i32, container_unreachable: bool) -> bool {
        let mut inner = self.lock();
        let Some(open) = inner.open.remove(session_id) else {
            return false;
        };
        let end = SessionEnd {
            exit_status,
            container_unreachable,
            reported: open.reported,
        };
        self.queue(&mut inner, open.session, Some(end));
        true
    }

    /// Queues a report of every open session whose time has come.
    pub fn report_due(&self, now: Instant) {
        let mut inner = self.lock();
        while inner.due.peek().is_some_and(|Reverse((at, _))| *at <= now) {
            let Some(Reverse((_, id))) = inner.due.pop() else {
                break;
            };
            // A session that ended meanwhile is gone from `open`: nothing to report.
            let Some(open) = inner.open.get_mut(&id) else {
                continue;
            };
            open.reported = true;
            let session = open.session.clone();
            self.queue(&mut inner, session, None);
        }
    }

    fn queue(&self, inner: &mut Inner, session: UnrecordedSession, end: Option<SessionEnd>) {
        inner.last += 1;
        inner.outbox.push_back(SessionUpdate {
            sequence: inner.last,
            session: Some(session),
            end,
        });
        if inner.outbox.len() > self.capacity
            && let Some(dropped) = inner.outbox.pop_front()
        {
            metrics::counter!("envgate_proxy_session_updates_dropped_total").increment(1);
            tracing::warn!(
                sequence = dropped.sequence,
                "no control-plane replica acknowledged session updates; dropped the oldest"
            );
        }
        metrics::gauge!("envgate_proxy_session_updates_waiting").set(inner.outbox.len() as f64);
    }

    /// The updates after sequence number `sent`, to send now.
    pub fn after(&self, sent: u64) -> Vec<SessionUpdate> {
        let inner = self.lock();
        inner
            .outbox
            .iter()
            .filter(|u| u.sequence > sent)
            .cloned()
            .collect()
    }

    /// The control plane applied every update up to `through`.
    pub fn applied(&self, through: u64) {
        let mut inner = self.lock();
        while inner.outbox.front().is_some_and(|u| u.sequence <= through) {
            inner.outbox.pop_front();
        }
        metrics::gauge!("envgate_proxy_session_updates_waiting").set(inner.outbox.len() as f64);
        if inner.outbox.is_empty() {
            self.settled.notify_waiters();
        }
    }

    pub fn waiting(&self) -> usize {
        self.lock().outbox.len()
    }

    /// Waits (at most `timeout`) until every update queued so far is acknowledged.
    pub async fn settle(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let settled = self.settled.notified();
                if self.waiting() == 0 {
                    return;
                }
                settled.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str) -> UnrecordedSession {
        UnrecordedSession {
            session_id: id.into(),
            user: "alice".into(),
            environment: "busybox".into(),
            container_id: "c1".into(),
            ..UnrecordedSession::default()
        }
    }

    fn summary(updates: &[SessionUpdate]) -> Vec<(u64, String, bool)> {
        updates
            .iter()
            .map(|u| {
                let id = u.session.as_ref().unwrap().session_id.clone();
                (u.sequence, id, u.end.is_some())
            })
            .collect()
    }

    #[test]
    fn a_short_session_is_sent_only_as_its_end_and_a_long_one_first_reported() {
        let ledger = SessionLedger::default();
        ledger.placed(session("short"), Duration::from_secs(2));
        ledger.placed(session("long"), Duration::ZERO);
        ledger.report_due(Instant::now());
        assert!(ledger.ended("short", 0, false));
        assert!(ledger.ended("long", 3, false));
        // Not placed unrecorded (or ended already): a CloseSession's business.
        assert!(!ledger.ended("long", 3, false));
        assert!(!ledger.ended("recorded", 0, false));
        let updates = ledger.after(0);
        assert_eq!(
            summary(&updates),
            [
                (1, "long".into(), false),
                (2, "short".into(), true),
                (3, "long".into(), true)
            ]
        );
        assert!(!updates[1].end.unwrap().reported);
        let long_end = updates[2].end.unwrap();
        assert!(long_end.reported);
        assert_eq!(long_end.exit_status, 3);
        // A report is queued once, however often it is asked for, and never for a session
        // that ended before its time came.
        ledger.report_due(Instant::now() + Duration::from_secs(3));
        assert_eq!(ledger.waiting(), 3);
    }

    #[test]
    fn updates_stay_until_acknowledged_and_a_new_stream_gets_them_all_again() {
        let ledger = SessionLedger::default();
        for id in ["a", "b", "c"] {
            ledger.placed(session(id), Duration::from_secs(2));
            ledger.ended(id, 0, false);
        }
        // One stream sent all three; the control plane applied the first two, then died.
        assert_eq!(ledger.after(1).len(), 2);
        ledger.applied(2);
        // The next stream starts from nothing sent, and gets what is unacknowledged.
        assert_eq!(summary(&ledger.after(0)), [(3, "c".into(), true)]);
        ledger.applied(3);
        assert_eq!(ledger.waiting(), 0);
    }

    #[test]
    fn past_its_capacity_the_oldest_update_goes() {
        let ledger = SessionLedger::new(2);
        for id in ["a", "b", "c"] {
            ledger.placed(session(id), Duration::from_secs(2));
            ledger.ended(id, 0, false);
        }
        assert_eq!(
            summary(&ledger.after(0)),
            [(2, "b".into(), true), (3, "c".into(), true)]
        );
    }

    #[tokio::test]
    async fn settle_waits_for_the_acknowledgement_and_gives_up_after_its_timeout() {
        let ledger = std::sync::Arc::new(SessionLedger::default());
        assert!(ledger.settle(Duration::from_millis(10)).await);
        ledger.placed(session("a"), Duration::from_secs(2));
        ledger.ended("a", 0, false);
        assert!(!ledger.settle(Duration::from_millis(50)).await);
        let acknowledging = ledger.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            acknowledging.applied(1);
        });
        assert!(ledger.settle(Duration::from_secs(5)).await);
    }
}

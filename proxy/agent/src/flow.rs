//! Per-stream send credit (the SSH "window"): a sender may only send as many bytes as the
//! receiver granted, so neither end of the connection ever buffers more than it offered.

use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Default)]
pub(crate) struct Credit {
    state: Mutex<CreditState>,
    notify: Notify,
}

#[derive(Default)]
struct CreditState {
    available: u64,
    closed: bool,
}

impl Credit {
    pub(crate) fn new(initial: u64) -> Self {
        Credit {
            state: Mutex::new(CreditState {
                available: initial,
                closed: false,
            }),
            notify: Notify::new(),
        }
    }

    pub(crate) fn add(&self, n: u64) {
        let mut s = self.state.lock().expect("credit lock");
        s.available = s.available.saturating_add(n);
        drop(s);
        self.notify.notify_one();
    }

    /// Wakes the waiter for good: `acquire` returns `None` from now on.
    pub(crate) fn close(&self) {
        self.state.lock().expect("credit lock").closed = true;
        self.notify.notify_one();
    }

    /// Waits until some credit is available and takes up to `max` bytes of it.
    /// `None` once the credit is closed (the other side is gone).
    pub(crate) async fn acquire(&self, max: usize) -> Option<usize> {
        loop {
            let notified = self.notify.notified();
            {
                let mut s = self.state.lock().expect("credit lock");
                if s.closed {
                    return None;
                }
                if s.available > 0 {
                    let n = s.available.min(max as u64);
                    s.available -= n;
                    return Some(n as usize);
                }
            }
            notified.await;
        }
    }

    /// Gives back credit taken by `acquire` but not used.
    pub(crate) fn refund(&self, n: usize) {
        if n > 0 {
            self.add(n as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn acquire_waits_for_credit_and_stops_on_close() {
        let c = Arc::new(Credit::new(10));
        assert_eq!(c.acquire(4).await, Some(4));
        assert_eq!(c.acquire(100).await, Some(6));
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.acquire(100).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        c.add(3);
        assert_eq!(waiter.await.unwrap(), Some(3));
        c.close();
        assert_eq!(c.acquire(1).await, None);
    }
}

//! The live connections of this proxy, so the fleet stream can report
//! counts and reach one connection (KillSession, Notice) or all (drain).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<HashMap<String, Entry>>>,
}

/// What the fleet stream tells one connection's session task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Show the message, then close the connection.
    Kill(String),
    /// Show the message; the session goes on.
    Notice(String),
}

struct Entry {
    control: mpsc::Sender<Control>,
    session_id: Option<String>,
}

/// Removes the connection from the registry when dropped.
pub struct Registration {
    registry: Registry,
    connection_id: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .inner
            .lock()
            .expect("registry lock")
            .remove(&self.connection_id);
    }
}

impl Registry {
    pub fn register(&self, connection_id: &str, control: mpsc::Sender<Control>) -> Registration {
        let entry = Entry {
            control,
            session_id: None,
        };
        self.inner
            .lock()
            .expect("registry lock")
            .insert(connection_id.to_owned(), entry);
        Registration {
            registry: self.clone(),
            connection_id: connection_id.to_owned(),
        }
    }

    pub fn set_session(&self, connection_id: &str, session_id: &str) {
        if let Some(entry) = self
            .inner
            .lock()
            .expect("registry lock")
            .get_mut(connection_id)
        {
            entry.session_id = Some(session_id.to_owned());
        }
    }

    /// Closes the connection that carries `session_id`; false if none does.
    pub fn kill_session(&self, session_id: &str, message: &str) -> bool {
        self.tell_session(session_id, Control::Kill(message.to_owned()))
    }

    /// Shows `message` on the connection that carries `session_id`; false if none does.
    pub fn notify_session(&self, session_id: &str, message: &str) -> bool {
        self.tell_session(session_id, Control::Notice(message.to_owned()))
    }

    fn tell_session(&self, session_id: &str, control: Control) -> bool {
        let inner = self.inner.lock().expect("registry lock");
        let mut found = false;
        for entry in inner
            .values()
            .filter(|e| e.session_id.as_deref() == Some(session_id))
        {
            let _ = entry.control.try_send(control.clone());
            found = true;
        }
        found
    }

    pub fn kill_all(&self, message: &str) -> usize {
        let inner = self.inner.lock().expect("registry lock");
        for entry in inner.values() {
            let _ = entry.control.try_send(Control::Kill(message.to_owned()));
        }
        inner.len()
    }

    /// (connections, connections with a placed session)
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.inner.lock().expect("registry lock");
        (
            inner.len(),
            inner.values().filter(|e| e.session_id.is_some()).count(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn kill_and_notice_reach_the_connection_with_the_session() {
        let registry = Registry::default();
        let (tx_a, mut rx_a) = mpsc::channel(2);
        let (tx_b, mut rx_b) = mpsc::channel(1);
        let a = registry.register("a", tx_a);
        let _b = registry.register("b", tx_b);
        registry.set_session("a", "s1");
        assert_eq!(registry.counts(), (2, 1));
        assert!(registry.kill_session("s1", "bye"));
        assert!(!registry.kill_session("s2", "bye"));
        assert!(registry.notify_session("s1", "soon"));
        assert!(!registry.notify_session("s2", "soon"));
        assert_eq!(rx_a.recv().await, Some(Control::Kill("bye".into())));
        assert_eq!(rx_a.recv().await, Some(Control::Notice("soon".into())));
        assert!(rx_b.try_recv().is_err());
        drop(a);
        assert_eq!(registry.counts(), (1, 0));
        assert_eq!(registry.kill_all("down"), 1);
        assert_eq!(rx_b.recv().await, Some(Control::Kill("down".into())));
    }
}

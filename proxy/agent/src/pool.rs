//! One agent connection per container, shared by every session a proxy has in it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::client::{AgentAddress, AgentClient, AgentError, ConnectOptions};

/// Connections keyed by container id. Concurrent logins to one container share a single
/// connect (the others wait for it); a closed connection, or a container that now has a
/// different address or secret (it was replaced), is reconnected on the next `get`.
pub struct AgentPool {
    options: ConnectOptions,
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Entry>>>>>,
}

struct Entry {
    address: AgentAddress,
    secret: Vec<u8>,
    client: AgentClient,
}

impl AgentPool {
    pub fn new(options: ConnectOptions) -> Self {
        AgentPool {
            options,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// A live connection to the agent of `container`, connecting if needed.
    pub async fn get(
        &self,
        container: &str,
        address: &AgentAddress,
        secret: &[u8],
    ) -> Result<AgentClient, AgentError> {
        let slot = self
            .slots
            .lock()
            .expect("pool lock")
            .entry(container.to_owned())
            .or_default()
            .clone();
        let mut entry = slot.lock().await;
        if let Some(e) = entry.as_ref()
            && !e.client.is_closed()
            && &e.address == address
            && e.secret == secret
        {
            return Ok(e.client.clone());
        }
        *entry = None;
        let client = AgentClient::connect_with(address, secret, self.options.clone()).await?;
        *entry = Some(Entry {
            address: address.clone(),
            secret: secret.to_vec(),
            client: client.clone(),
        });
        Ok(client)
    }

    /// Drops the pool's connection to a container that is gone; sessions still holding
    /// processes keep theirs until they end.
    pub fn forget(&self, container: &str) {
        self.slots.lock().expect("pool lock").remove(container);
    }

    /// Containers with a pooled connection.
    pub fn len(&self) -> usize {
        self.slots.lock().expect("pool lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

//! One agent connection per container, shared by every session a proxy has in it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::client::{AgentAddress, AgentClient, AgentError, ConnectOptions};

/// Connections keyed by container id. Concurrent logins to one container share a single
/// connect (the others wait for it); a closed connection, or a container that now has a
/// different address or secret (it was replaced), is reconnected on the next `get`.
/// Containers come and go for as long as a proxy runs: slots whose connection has closed
/// (the container was removed) are pruned as the map grows, so it holds about the live ones.
pub struct AgentPool {
    options: ConnectOptions,
    slots: Mutex<Slots>,
}

type Slot = Arc<tokio::sync::Mutex<Option<Entry>>>;

struct Slots {
    by_container: HashMap<String, Slot>,
    /// The next prune happens when a new container brings the map to this size.
    prune_at: usize,
}

/// Below this many containers the map is never pruned.
const PRUNE_FLOOR: usize = 64;

struct Entry {
    address: AgentAddress,
    secret: Vec<u8>,
    client: AgentClient,
}

impl AgentPool {
    pub fn new(options: ConnectOptions) -> Self {
        AgentPool {
            options,
            slots: Mutex::new(Slots {
                by_container: HashMap::new(),
                prune_at: PRUNE_FLOOR,
            }),
        }
    }

    /// A live connection to the agent of `container`, connecting if needed.
    pub async fn get(
        &self,
        container: &str,
        address: &AgentAddress,
        secret: &[u8],
    ) -> Result<AgentClient, AgentError> {
        let slot = self.slots.lock().expect("pool lock").slot(container);
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
        self.slots
            .lock()
            .expect("pool lock")
            .by_container
            .remove(container);
    }

    /// Containers with a pooled connection.
    pub fn len(&self) -> usize {
        self.slots.lock().expect("pool lock").by_container.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Slots {
    /// The slot of `container`, made if missing; a new one may first prune the closed ones.
    fn slot(&mut self, container: &str) -> Slot {
        if let Some(slot) = self.by_container.get(container) {
            return slot.clone();
        }
        if self.by_container.len() + 1 >= self.prune_at {
            // A slot being connected or used right now is locked: keep it.
            self.by_container.retain(|_, slot| {
                slot.try_lock()
                    .map(|entry| entry.as_ref().is_some_and(|e| !e.client.is_closed()))
                    .unwrap_or(true)
            });
            self.prune_at = (self.by_container.len() * 2).max(PRUNE_FLOOR);
        }
        let slot = Slot::default();
        self.by_container.insert(container.to_owned(), slot.clone());
        slot
    }
}

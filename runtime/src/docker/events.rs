//! Docker's event stream as the feed of a liveness cache (`liveness.rs`): the container events
//! of one instance's containers, and the listing that starts each subscription.

use std::collections::HashMap;

use async_trait::async_trait;
use bollard::Docker;
use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptions;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::OnceCell;

use super::{classify, connect, list_managed_with, managed_filter};
use crate::liveness::{Change, Feed};
use crate::types::RuntimeError;

/// The actions that start a container, and those after which it may not run any more (`kill`
/// and `oom` may leave it running: the cache then asks Docker, which knows).
const STARTS: &[&str] = &["start", "unpause"];
const STOPS: &[&str] = &["die", "stop", "kill", "oom", "pause", "destroy"];

/// How far back each subscription starts. What it replays is applied after the listing, in
/// order, so each container ends in its true state; a clock of the engine's more than this
/// behind the control plane's could miss a stop made while resubscribing (the cache would then
/// say "runs" until that session's start fails and its container is replaced).
const REPLAY: std::time::Duration = std::time::Duration::from_secs(10);

pub struct DockerFeed {
    host: Option<String>,
    instance: String,
    /// Its own client, connected on first success (the stream holds one connection).
    docker: OnceCell<Docker>,
}

impl DockerFeed {
    pub fn new(host: Option<&str>, instance: &str) -> Self {
        Self {
            host: host.map(str::to_owned),
            instance: instance.to_owned(),
            docker: OnceCell::new(),
        }
    }

    async fn docker(&self) -> Result<&Docker, RuntimeError> {
        self.docker
            .get_or_try_init(|| connect(self.host.as_deref()))
            .await
    }
}

/// `Started`/`Stopped` for a container event of interest; `None` for any other.
fn change(event: EventMessage) -> Option<Change> {
    let id = event.actor?.id?;
    let action = event.action?;
    if STARTS.contains(&action.as_str()) {
        Some(Change::Started(id))
    } else if STOPS.contains(&action.as_str()) {
        Some(Change::Stopped(id))
    } else {
        None
    }
}

#[async_trait]
impl Feed for DockerFeed {
    /// Events from [`REPLAY`] ago on: Docker replays what happened since then before the live
    /// ones, so the listing the caller takes next and the stream overlap rather than leave a
    /// gap, also when the stream is opened a moment after the listing (bollard sends the
    /// request at the first poll) or the engine's clock is a little behind this host's.
    async fn subscribe(
        &self,
    ) -> Result<BoxStream<'static, Result<Change, RuntimeError>>, RuntimeError> {
        let docker = self.docker().await?;
        let since = std::time::SystemTime::now()
            .checked_sub(REPLAY)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .unwrap_or_default()
            .as_secs();
        let mut filters: HashMap<String, Vec<String>> = managed_filter(&self.instance);
        filters.insert("type".into(), vec!["container".into()]);
        filters.insert(
            "event".into(),
            STARTS
                .iter()
                .chain(STOPS)
                .map(|a| (*a).to_owned())
                .collect(),
        );
        let options = EventsOptions {
            since: Some(since.to_string()),
            until: None,
            filters: Some(filters),
        };
        Ok(docker
            .events(Some(options))
            .filter_map(|event| async move {
                match event {
                    Ok(event) => change(event).map(Ok),
                    Err(e) => Some(Err(classify(e))),
                }
            })
            .boxed())
    }

    async fn running(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(list_managed_with(self.docker().await?, &self.instance)
            .await?
            .into_iter()
            .filter(|c| c.running)
            .map(|c| c.id)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::EventActor;

    fn event(action: &str, id: &str) -> EventMessage {
        EventMessage {
            action: Some(action.into()),
            actor: Some(EventActor {
                id: Some(id.into()),
                attributes: None,
            }),
            ..EventMessage::default()
        }
    }

    #[test]
    fn docker_actions_become_changes() {
        assert_eq!(
            change(event("start", "a")),
            Some(Change::Started("a".into()))
        );
        for stop in ["die", "kill", "oom", "destroy"] {
            assert_eq!(change(event(stop, "a")), Some(Change::Stopped("a".into())));
        }
        assert_eq!(change(event("rename", "a")), None);
        assert_eq!(change(EventMessage::default()), None);
    }
}

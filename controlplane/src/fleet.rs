//! The Fleet service: each proxy's standing stream. While the stream lives, the proxy's
//! record `proxies/{id}` — and every session placed through it — is kept alive under one
//! etcd lease; when the stream ends the lease simply stops being refreshed and expires, taking
//! the proxy's sessions with it. A proxy that reconnects (to any replica) before that reuses
//! the lease, so its sessions survive a control-plane restart.
//!
//! The stream also carries what became of the sessions a proxy was given unrecorded
//! (`SessionUpdates`, see `placement.rs`): applied in order, acknowledged once applied, and
//! sent again by the proxy on its next stream if not acknowledged.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envgate_proto::audit::{AuditLog, Event};
use envgate_proto::v1::fleet_server::Fleet;
use envgate_proto::v1::{
    Drain, FleetCommand, Heartbeat, KillSession, Notice, ProxyMessage, Register, RevokeUser,
    SessionUpdate, SessionUpdatesApplied, fleet_command, proxy_message,
};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::error::FleetError;
use crate::guard::{self, ProxyIdentity};
use crate::model::{self, CommandRecord, ProxyRecord, SessionRecord};
use crate::placement::Placer;
use crate::store::{self, Compare, Store, StoreError, TxnOp, WatchEvent, WatchEventKind};

/// A proxy silent for this long (no stream, no keep-alive) loses its record and sessions.
pub const PROXY_LEASE_TTL: Duration = Duration::from_secs(10);
/// How long a new stream may take to send Register.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// A command not delivered within this long (its proxy stayed away) is dropped by etcd.
const COMMAND_TTL: Duration = Duration::from_secs(60);
/// Session updates one stream keeps while etcd cannot take them; past it the stream is
/// ended, and the proxy sends them again on its next one.
const UNAPPLIED_AT_MOST: usize = 10_000;

type CommandSender = mpsc::Sender<Result<FleetCommand, Status>>;

/// The proxies attached to this replica, so other parts can send them commands.
#[derive(Default)]
pub struct FleetRegistry {
    attached: Mutex<HashMap<String, CommandSender>>,
}

impl FleetRegistry {
    fn insert(&self, proxy_id: &str, sender: CommandSender) {
        self.lock().insert(proxy_id.to_owned(), sender);
    }

    /// Removes the entry only if it is still this stream's (a newer stream may have replaced it).
    fn remove_if_same(&self, proxy_id: &str, sender: &CommandSender) {
        let mut attached = self.lock();
        if attached
            .get(proxy_id)
            .is_some_and(|s| s.same_channel(sender))
        {
            attached.remove(proxy_id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CommandSender>> {
        self.attached.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_attached(&self, proxy_id: &str) -> bool {
        self.lock().contains_key(proxy_id)
    }

    pub fn attached(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Queues a command for one proxy; false if it is not attached here or its queue is full.
    pub fn send(&self, proxy_id: &str, command: FleetCommand) -> bool {
        let sender = self.lock().get(proxy_id).cloned();
        sender.is_some_and(|s| s.try_send(Ok(command)).is_ok())
    }

    /// Queues a command for every proxy attached here; returns how many took it.
    pub fn broadcast(&self, command: &FleetCommand) -> usize {
        let senders: Vec<CommandSender> = self.lock().values().cloned().collect();
        senders
            .iter()
            .filter(|s| s.try_send(Ok(command.clone())).is_ok())
            .count()
    }
}

pub struct FleetService {
    store: Arc<dyn Store>,
    registry: Arc<FleetRegistry>,
    placer: Arc<Placer>,
    audit: AuditLog,
    shutdown: CancellationToken,
}

impl FleetService {
    pub fn new(
        store: Arc<dyn Store>,
        registry: Arc<FleetRegistry>,
        placer: Arc<Placer>,
        audit: AuditLog,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            registry,
            placer,
            audit,
            shutdown,
        }
    }
}

/// Reuses the lease of an existing record when the same proxy process re-attaches and etcd
/// still has the lease, else grants a new one. A restarted proxy's predecessor had sessions
/// that died with it: revoking its lease releases them now rather than after the TTL, and
/// keeps a proxy restarted within the TTL from adopting them forever.
async fn lease_for(
    store: &dyn Store,
    existing: Option<&ProxyRecord>,
    incarnation: &str,
) -> Result<(i64, bool), StoreError> {
    if let Some(record) = existing {
        if record.incarnation == incarnation {
            if store.lease_keep_alive(record.lease_id).await? {
                return Ok((record.lease_id, true));
            }
        } else {
            store.lease_revoke(record.lease_id).await?;
        }
    }
    Ok((store.lease_grant(PROXY_LEASE_TTL).await?, false))
}

/// Records the proxy `proxy_id` (from its certificate) under a lease, as `register` describes it.
async fn register(
    store: &dyn Store,
    proxy_id: &str,
    register: &Register,
) -> Result<ProxyRecord, FleetError> {
    let key = model::proxy_key(proxy_id);
    let existing = store::get_json::<ProxyRecord>(store, &key)
        .await?
        .map(|v| v.value);
    let (lease_id, reused) = lease_for(store, existing.as_ref(), &register.incarnation).await?;
    let now = model::now();
    let record = ProxyRecord {
        id: proxy_id.to_owned(),
        address: register.address.clone(),
        version: register.version.clone(),
        capacity: register.capacity,
        draining: false,
        sessions: existing
            .as_ref()
            .filter(|_| reused)
            .map_or(0, |e| e.sessions),
        connections: existing
            .as_ref()
            .filter(|_| reused)
            .map_or(0, |e| e.connections),
        registered_at: existing
            .as_ref()
            .filter(|_| reused)
            .map_or(now, |e| e.registered_at),
        last_heartbeat_at: now,
        lease_id,
        incarnation: register.incarnation.clone(),
    };
    store::put_json(store, &key, &record, Some(lease_id)).await?;
    tracing::info!(proxy = %record.id, address = %record.address, lease = lease_id, reused, "proxy attached");
    Ok(record)
}

/// One proxy's session updates on one stream: those received and not yet applied, in order.
struct StreamUpdates {
    placer: Arc<Placer>,
    audit: AuditLog,
    commands: CommandSender,
    unapplied: Vec<SessionUpdate>,
    /// The highest sequence number applied on this stream.
    applied_through: u64,
}

impl StreamUpdates {
    /// Keeps the updates not seen yet; false when too many wait (the stream is to end).
    fn receive(&mut self, updates: Vec<SessionUpdate>) -> bool {
        let seen = self
            .unapplied
            .last()
            .map_or(self.applied_through, |u| u.sequence);
        self.unapplied
            .extend(updates.into_iter().filter(|u| u.sequence > seen));
        self.unapplied.len() <= UNAPPLIED_AT_MOST
    }

    /// Applies what waits and acknowledges it; on failure it waits for the next try.
    async fn apply(&mut self, record: &ProxyRecord) {
        let Some(through) = self.unapplied.last().map(|u| u.sequence) else {
            return;
        };
        match self
            .placer
            .apply_updates(&record.id, record.lease_id, &self.unapplied)
            .await
        {
            Ok(ended) => {
                for (session, end) in ended {
                    self.audit.record(Event::SessionEnd {
                        session: session.id,
                        user: session.user,
                        environment: session.environment,
                        proxy: record.id.clone(),
                        exit_status: end.exit_status,
                        container_unreachable: end.container_unreachable,
                    });
                }
                self.unapplied.clear();
                self.applied_through = through;
                let applied = FleetCommand {
                    command: Some(fleet_command::Command::SessionUpdatesApplied(
                        SessionUpdatesApplied {
                            through_sequence: through,
                        },
                    )),
                };
                // A lost acknowledgement only means the proxy sends these again.
                let _ = self.commands.try_send(Ok(applied));
            }
            Err(e) => {
                tracing::warn!(proxy = %record.id, waiting = self.unapplied.len(), error = %e, "applying session updates failed; trying again");
            }
        }
    }
}

/// Lives as long as the proxy's stream: applies heartbeats and session updates, and keeps
/// the lease alive.
async fn serve_stream(
    store: Arc<dyn Store>,
    mut record: ProxyRecord,
    mut inbound: Streaming<ProxyMessage>,
    mut updates: StreamUpdates,
    shutdown: CancellationToken,
) {
    let key = model::proxy_key(&record.id);
    let mut keep_alive = tokio::time::interval(PROXY_LEASE_TTL / 3);
    keep_alive.tick().await;
    loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(ProxyMessage { message: Some(proxy_message::Message::Heartbeat(beat)) })) => {
                    apply_heartbeat(&mut record, &beat);
                    if let Err(e) = store::put_json(store.as_ref(), &key, &record, Some(record.lease_id)).await {
                        tracing::warn!(proxy = %record.id, error = %e, "recording a heartbeat failed");
                    }
                }
                Ok(Some(ProxyMessage { message: Some(proxy_message::Message::SessionUpdates(batch)) })) => {
                    if !updates.receive(batch.updates) {
                        tracing::warn!(proxy = %record.id, "too many session updates wait for etcd; ending the stream (the proxy sends them again)");
                        break;
                    }
                    updates.apply(&record).await;
                }
                Ok(Some(_)) => tracing::debug!(proxy = %record.id, "ignoring a repeated register"),
                Ok(None) => break,
                Err(status) => {
                    tracing::info!(proxy = %record.id, error = %status, "proxy stream broke");
                    break;
                }
            },
            _ = keep_alive.tick() => match store.lease_keep_alive(record.lease_id).await {
                Ok(true) => updates.apply(&record).await,
                Ok(false) => {
                    // The lease expired (etcd was unreachable too long): the sessions it held
                    // are gone; register afresh so the proxy can place new ones.
                    tracing::warn!(proxy = %record.id, "proxy lease expired; granting a new one");
                    match store.lease_grant(PROXY_LEASE_TTL).await {
                        Ok(lease) => {
                            record.lease_id = lease;
                            if let Err(e) = store::put_json(store.as_ref(), &key, &record, Some(lease)).await {
                                tracing::warn!(proxy = %record.id, error = %e, "re-registering failed");
                            }
                        }
                        Err(e) => tracing::warn!(proxy = %record.id, error = %e, "granting a lease failed"),
                    }
                }
                Err(e) => tracing::warn!(proxy = %record.id, error = %e, "proxy lease keep-alive failed"),
            },
            () = shutdown.cancelled() => break,
        }
    }
    tracing::info!(proxy = %record.id, "proxy detached; its lease now runs out unless it reattaches");
}

fn apply_heartbeat(record: &mut ProxyRecord, beat: &Heartbeat) {
    record.sessions = beat.sessions;
    record.connections = beat.connections;
    record.draining = beat.draining;
    record.last_heartbeat_at = model::now();
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<FleetCommand, Status>> + Send>>;

#[tonic::async_trait]
impl Fleet for FleetService {
    type AttachStream = CommandStream;

    async fn attach(
        &self,
        request: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<CommandStream>, Status> {
        let ProxyIdentity(proxy_id) = guard::proxy_of(&request)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| FleetError::RegisterTimeout(REGISTER_TIMEOUT.as_secs()))?
            .map_err(FleetError::from)?;
        let Some(ProxyMessage {
            message: Some(proxy_message::Message::Register(hello)),
        }) = first
        else {
            return Err(FleetError::NotRegistered.into());
        };
        let record = register(self.store.as_ref(), &proxy_id, &hello).await?;
        let (tx, rx) = mpsc::channel(64);
        self.registry.insert(&record.id, tx.clone());
        // Commands written while the proxy was between streams.
        match self.store.range(&model::proxy_commands(&record.id)).await {
            Ok(pending) => {
                for kv in pending {
                    deliver(
                        self.store.as_ref(),
                        &self.registry,
                        &kv.key,
                        &kv.value,
                        kv.mod_revision,
                    )
                    .await;
                }
            }
            Err(e) => {
                tracing::warn!(proxy = %record.id, error = %e, "reading pending commands failed")
            }
        }
        let span = tracing::info_span!("fleet_stream", proxy = %record.id);
        let store = self.store.clone();
        let registry = self.registry.clone();
        let shutdown = self.shutdown.clone();
        let proxy_id = record.id.clone();
        let updates = StreamUpdates {
            placer: self.placer.clone(),
            audit: self.audit.clone(),
            commands: tx.clone(),
            unapplied: Vec::new(),
            applied_through: 0,
        };
        tokio::spawn(
            async move {
                serve_stream(store, record, inbound, updates, shutdown).await;
                registry.remove_if_same(&proxy_id, &tx);
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Queues `command` for `proxy_id`, whichever replica its stream is attached to: the command
/// is written under `commands/{proxy}/` with a short lease, and the replica holding the stream
/// delivers it (`relay_commands`, or on attach if the proxy is between streams).
pub async fn send_command(
    store: &dyn Store,
    proxy_id: &str,
    command: &CommandRecord,
) -> Result<(), StoreError> {
    let lease = store.lease_grant(COMMAND_TTL).await?;
    let key = model::command_key(proxy_id, &uuid::Uuid::new_v4().to_string());
    store::put_json(store, &key, command, Some(lease)).await?;
    tracing::info!(proxy = proxy_id, ?command, "command queued");
    Ok(())
}

/// Sends `command(session_id)` to the proxy of every session kept alive by the placement
/// record `container_key` (to end them, or to show them a notice); returns how many.
pub async fn command_container_sessions(
    store: &dyn Store,
    container_key: &str,
    command: impl Fn(String) -> CommandRecord,
) -> Result<u32, StoreError> {
    let sessions: Vec<(String, store::Versioned<SessionRecord>)> =
        store::range_json(store, model::SESSIONS).await?;
    let mut sent = 0u32;
    for (_, session) in sessions {
        if session.value.container_key == container_key {
            send_command(store, &session.value.proxy_id, &command(session.value.id)).await?;
            sent += 1;
        }
    }
    Ok(sent)
}

fn to_fleet_command(record: CommandRecord) -> FleetCommand {
    let command = match record {
        CommandRecord::Drain { grace_seconds } => {
            fleet_command::Command::Drain(Drain { grace_seconds })
        }
        CommandRecord::KillSession {
            session_id,
            message,
        } => fleet_command::Command::KillSession(KillSession {
            session_id,
            message,
        }),
        CommandRecord::Notice {
            session_id,
            message,
        } => fleet_command::Command::Notice(Notice {
            session_id,
            message,
        }),
    };
    FleetCommand {
        command: Some(command),
    }
}

/// Delivers one stored command if its proxy is attached here. The key is deleted (compared
/// on its revision) before the command is sent, so exactly one replica delivers it even when
/// the watch and an attach see it at the same time.
async fn deliver(
    store: &dyn Store,
    registry: &FleetRegistry,
    key: &str,
    value: &[u8],
    mod_revision: i64,
) {
    let Some(proxy_id) = key
        .strip_prefix(model::COMMANDS)
        .and_then(|rest| rest.split_once('/'))
        .map(|(proxy, _)| proxy)
    else {
        return;
    };
    if !registry.is_attached(proxy_id) {
        return;
    }
    let record: CommandRecord = match serde_json::from_slice(value) {
        Ok(record) => record,
        Err(e) => {
            tracing::warn!(key, error = %e, "dropping an unreadable command");
            let _ = store.delete(key).await;
            return;
        }
    };
    let claimed = store
        .txn(
            vec![Compare::revision(key, mod_revision)],
            vec![TxnOp::delete(key)],
        )
        .await;
    match claimed {
        Ok(Some(_)) => {
            let sent = registry.send(proxy_id, to_fleet_command(record.clone()));
            tracing::info!(proxy = proxy_id, ?record, sent, "command delivered");
        }
        Ok(None) => tracing::debug!(key, "command already taken"),
        Err(e) => tracing::warn!(key, error = %e, "claiming a command failed"),
    }
}

/// Delivers the commands any replica writes for the proxies attached to this one.
pub async fn relay_commands(
    store: Arc<dyn Store>,
    registry: Arc<FleetRegistry>,
    shutdown: CancellationToken,
) {
    watch_puts(store.clone(), model::COMMANDS, &shutdown, |event| {
        let store = store.clone();
        let registry = registry.clone();
        async move {
            deliver(
                store.as_ref(),
                &registry,
                &event.key,
                &event.value,
                event.mod_revision,
            )
            .await;
        }
    })
    .await;
}

/// Tells the proxies attached to this replica about every revocation written by any replica,
/// so they drop the user's cached tokens. Runs until `shutdown`, re-watching after errors.
pub async fn forward_revocations(
    store: Arc<dyn Store>,
    registry: Arc<FleetRegistry>,
    shutdown: CancellationToken,
) {
    watch_puts(store, model::REVOCATIONS, &shutdown, |event| {
        let user = event.key.trim_start_matches(model::REVOCATIONS).to_owned();
        let command = FleetCommand {
            command: Some(fleet_command::Command::RevokeUser(RevokeUser {
                user: user.clone(),
            })),
        };
        let told = registry.broadcast(&command);
        tracing::info!(
            user,
            proxies = told,
            "revocation forwarded to attached proxies"
        );
        std::future::ready(())
    })
    .await;
}

/// Calls `on_put` for every put under `prefix` from now on, until `shutdown`; re-watches
/// from the next revision after errors, so no event is skipped or repeated.
async fn watch_puts<F, Fut>(
    store: Arc<dyn Store>,
    prefix: &str,
    shutdown: &CancellationToken,
    mut on_put: F,
) where
    F: FnMut(WatchEvent) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut next_revision = 0;
    while !shutdown.is_cancelled() {
        let mut events = match store.watch(prefix, true, next_revision).await {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(prefix, error = %e, "watching failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = shutdown.cancelled() => return,
                }
            }
        };
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                () = shutdown.cancelled() => return,
            };
            match event {
                Some(Ok(event)) => {
                    next_revision = event.mod_revision + 1;
                    if event.kind == WatchEventKind::Put {
                        on_put(event).await;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(prefix, error = %e, "watch broke; re-watching");
                    break;
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::MemoryStore;

    fn as_process(incarnation: &str) -> Register {
        Register {
            address: "127.0.0.1:2200".into(),
            incarnation: incarnation.into(),
            ..Register::default()
        }
    }

    /// The lease logic of `tests/fleet.rs`'s etcd test, with the TTL judged by a clock the
    /// test advances: a proxy re-attaching within the TTL keeps its lease and its sessions,
    /// one that stays away loses them a TTL after its last keep-alive.
    #[tokio::test]
    async fn a_reattaching_proxy_keeps_its_lease_and_an_absent_one_loses_it_after_the_ttl() {
        let clock = Arc::new(ManualClock::starting_now());
        let store = MemoryStore::new().with_clock(clock.clone());
        let first = register(&store, "p1", &as_process("one")).await.unwrap();
        store
            .put("sessions/s1", b"{}".to_vec(), Some(first.lease_id))
            .await
            .unwrap();
        let almost = PROXY_LEASE_TTL - Duration::from_millis(1);

        clock.advance(almost);
        let second = register(&store, "p1", &as_process("one")).await.unwrap();
        assert_eq!(second.lease_id, first.lease_id, "the lease is reused");
        clock.advance(almost);
        assert!(
            store.get("sessions/s1").await.unwrap().is_some(),
            "past the TTL since the grant, within it since the re-attach"
        );

        clock.advance(Duration::from_millis(1));
        assert!(store.get("sessions/s1").await.unwrap().is_none());
        assert!(store.get(&model::proxy_key("p1")).await.unwrap().is_none());
    }

    /// A restarted proxy (a new incarnation) releases its predecessor's sessions at once,
    /// without the clock moving at all.
    #[tokio::test]
    async fn a_restarted_proxy_releases_its_predecessors_lease_without_waiting_for_the_ttl() {
        let clock = Arc::new(ManualClock::starting_now());
        let store = MemoryStore::new().with_clock(clock);
        let old = register(&store, "p1", &as_process("old")).await.unwrap();
        store
            .put("sessions/s1", b"{}".to_vec(), Some(old.lease_id))
            .await
            .unwrap();
        let new = register(&store, "p1", &as_process("new")).await.unwrap();
        assert_ne!(new.lease_id, old.lease_id);
        assert!(store.get("sessions/s1").await.unwrap().is_none());
        assert!(store.get(&model::proxy_key("p1")).await.unwrap().is_some());
    }
}

//! The etcd `Store`. Every call runs under `request_timeout` so a stuck etcd turns into
//! `StoreError::Unavailable` instead of a hung RPC; every key is placed under `prefix`.
//!
//! Calls go to one member at a time, as etcd's own Go client (clientv3) does: the store keeps
//! a client per endpoint and pins one; when the pinned member cannot be reached the call moves
//! on to the next member, and so does the pin. etcd-client's own balancing over all
//! endpoints keeps sending a share of requests to a member that is gone (every one of them
//! failing with "tcp connect error"), which failed two logins in three while one member of
//! three was down. A read moves on after any transport failure or timeout; a write only when
//! it never left this process (the connection could not be made), since a write that reached
//! a member may have been applied.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use envgate_proto::tls::TlsFiles;
use etcd_client::{
    Certificate, Client, ConnectOptions, DeleteOptions, EventType, GetOptions, Identity, LeaderKey,
    PutOptions, ResignOptions, TlsOptions, Txn, WatchOptions,
};

use super::{
    Compare, KeyValue, Leadership, Store, StoreError, StoreResult, Transaction, TxnOp, WatchEvent,
    WatchEventKind, WatchStream,
};

/// Where etcd is and how to prove who we are to it.
#[derive(Clone)]
pub struct EtcdConfig {
    /// `https://host:port` with `tls`, else `http://host:port`.
    pub endpoints: Vec<String>,
    /// The etcd CA and the control plane's client certificate: etcd runs with
    /// `--client-cert-auth`, so only holders of a certificate from its CA get in.
    pub tls: Option<TlsFiles>,
}

impl EtcdConfig {
    fn options(&self, request_timeout: Duration) -> ConnectOptions {
        let options = ConnectOptions::new()
            .with_connect_timeout(request_timeout)
            .with_timeout(request_timeout)
            .with_keep_alive(Duration::from_secs(10), request_timeout);
        match &self.tls {
            None => options,
            Some(tls) => options.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(&tls.ca))
                    .identity(Identity::from_pem(&tls.cert, &tls.key)),
            ),
        }
    }
}

pub struct EtcdStore {
    /// One client per endpoint, in `EtcdConfig::endpoints` order.
    clients: Vec<Client>,
    /// The member calls go to first.
    pinned: AtomicUsize,
    prefix: String,
    request_timeout: Duration,
}

/// Whether a failed call may be sent again to another member.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads, watches, keep-alives: sending one twice changes nothing.
    Idempotent,
    /// Writes: only if the request never left (no connection could be made).
    IfNotSent,
}

impl EtcdStore {
    /// Connects and checks that etcd answers, so a wrong address or certificate fails at
    /// start-up with a clear message rather than on the first user's login.
    pub async fn connect(
        config: &EtcdConfig,
        prefix: &str,
        request_timeout: Duration,
    ) -> StoreResult<Self> {
        let endpoints = &config.endpoints;
        if endpoints.is_empty() {
            return Err(StoreError::Unavailable("no etcd endpoint given".into()));
        }
        let mut clients = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            // Connections are made on first use, so a member that is down now is no obstacle.
            let connect = Client::connect([endpoint], Some(config.options(request_timeout)));
            let client = tokio::time::timeout(request_timeout, connect)
                .await
                .map_err(|_| timed_out("connect", endpoint.clone()))?
                .map_err(|e| StoreError::Unavailable(format!("{endpoint}: {e}")))?;
            clients.push(client);
        }
        let store = Self {
            clients,
            pinned: AtomicUsize::new(0),
            prefix: prefix.to_owned(),
            request_timeout,
        };
        store.get("").await.map_err(|e| match e {
            StoreError::Unavailable(reason) => {
                StoreError::Unavailable(format!("{}: {reason}", endpoints.join(",")))
            }
            other => other,
        })?;
        Ok(store)
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn relative(&self, key: &[u8]) -> String {
        let key = String::from_utf8_lossy(key);
        key.strip_prefix(&self.prefix).unwrap_or(&key).to_owned()
    }

    /// Runs `call` on the pinned member's client under `request_timeout`; if that member
    /// cannot be reached (and `retry` allows), on each other member in turn. The pin moves off
    /// a member that failed so.
    async fn call<T, F, Fut>(&self, what: &str, retry: Retry, mut call: F) -> StoreResult<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let members = self.clients.len();
        let first = self.pinned.load(Ordering::Relaxed) % members;
        let mut last = None;
        for attempt in 0..members {
            let member = (first + attempt) % members;
            let (error, move_on) = match tokio::time::timeout(
                self.request_timeout,
                call(self.clients[member].clone()),
            )
            .await
            {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) if unreachable(&e, retry) => (map_error(e), true),
                Ok(Err(e)) => return Err(map_error(e)),
                // A write that timed out may have been applied: it is not sent again.
                Err(_) => (
                    timed_out(what, format!("{:?}", self.request_timeout)),
                    retry == Retry::Idempotent,
                ),
            };
            self.move_pin_off(member);
            if !move_on {
                return Err(error);
            }
            last = Some(error);
        }
        Err(last.expect("at least one member"))
    }

    /// Our transaction in etcd's terms (keys under the prefix); notes a lease it uses, so a
    /// "lease not found" can name it.
    fn etcd_txn(
        &self,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
        lease_used: &mut Option<i64>,
    ) -> Txn {
        let compares: Vec<etcd_client::Compare> = compares
            .into_iter()
            .map(|c| {
                etcd_client::Compare::mod_revision(
                    self.full(&c.key),
                    etcd_client::CompareOp::Equal,
                    c.mod_revision,
                )
            })
            .collect();
        let ops: Vec<etcd_client::TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                TxnOp::Put { key, value, lease } => {
                    let options = lease.filter(|l| *l != 0).map(|l| {
                        *lease_used = Some(l);
                        PutOptions::new().with_lease(l)
                    });
                    etcd_client::TxnOp::put(self.full(&key), value, options)
                }
                TxnOp::Delete { key } => etcd_client::TxnOp::delete(self.full(&key), None),
            })
            .collect();
        Txn::new().when(compares).and_then(ops)
    }

    /// The pinned member's client, for calls that cannot move (a campaign blocks for as long
    /// as another replica leads); `move_pin_off` after one fails.
    fn pinned(&self) -> (usize, Client) {
        let member = self.pinned.load(Ordering::Relaxed) % self.clients.len();
        (member, self.clients[member].clone())
    }

    fn move_pin_off(&self, member: usize) {
        let next = (member + 1) % self.clients.len();
        let _ = self
            .pinned
            .compare_exchange(member, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn to_kv(&self, kv: &etcd_client::KeyValue) -> KeyValue {
        KeyValue {
            key: self.relative(kv.key()),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        }
    }
}

fn timed_out(what: &str, detail: String) -> StoreError {
    StoreError::Unavailable(format!("{what} timed out ({detail})"))
}

/// Whether `e` says the member could not be reached, so that `retry` allows another one.
fn unreachable(e: &etcd_client::Error, retry: Retry) -> bool {
    let (status, text) = match e {
        etcd_client::Error::TransportError(e) => (None, e.to_string()),
        etcd_client::Error::IoError(e) => (None, e.to_string()),
        etcd_client::Error::GRpcStatus(status) => {
            (Some(status.code()), status.message().to_owned())
        }
        _ => return false,
    };
    // hyper's "tcp connect error", "client error (Connect)": the request was never sent.
    let not_sent = text.contains("connect error") || text.contains("(Connect)");
    match retry {
        Retry::IfNotSent => not_sent,
        Retry::Idempotent => {
            not_sent
                || matches!(
                    status,
                    None | Some(tonic::Code::Unavailable)
                        | Some(tonic::Code::Unknown)
                        | Some(tonic::Code::Cancelled)
                )
        }
    }
}

/// The client's own request timeout (tonic's "Timeout expired"), as opposed to a status
/// etcd sent.
fn is_request_timeout(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired")
}

fn map_error(e: etcd_client::Error) -> StoreError {
    let lease_gone = match &e {
        etcd_client::Error::GRpcStatus(status) => status.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("lease not found"),
        _ => false,
    };
    if lease_gone {
        return StoreError::LeaseNotFound(0);
    }
    StoreError::Unavailable(e.to_string())
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        let key = self.full(key);
        let resp = self
            .call("get", Retry::Idempotent, |c| {
                let key = key.clone();
                async move { c.kv_client().get(key, None).await }
            })
            .await?;
        Ok(resp.kvs().first().map(|kv| self.to_kv(kv)))
    }

    async fn range(&self, prefix: &str) -> StoreResult<Vec<KeyValue>> {
        let prefix = self.full(prefix);
        let resp = self
            .call("range", Retry::Idempotent, |c| {
                let prefix = prefix.clone();
                async move {
                    c.kv_client()
                        .get(prefix, Some(GetOptions::new().with_prefix()))
                        .await
                }
            })
            .await?;
        Ok(resp.kvs().iter().map(|kv| self.to_kv(kv)).collect())
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> StoreResult<i64> {
        let options = lease
            .filter(|l| *l != 0)
            .map(|l| PutOptions::new().with_lease(l));
        let key = self.full(key);
        let resp = self
            .call("put", Retry::IfNotSent, |c| {
                let (key, value, options) = (key.clone(), value.clone(), options.clone());
                async move { c.kv_client().put(key, value, options).await }
            })
            .await
            .map_err(|e| with_lease_id(e, lease))?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        let key = self.full(key);
        let resp = self
            .call("delete", Retry::IfNotSent, |c| {
                let key = key.clone();
                async move { c.kv_client().delete(key, None::<DeleteOptions>).await }
            })
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> StoreResult<Option<i64>> {
        let mut lease_used = None;
        let txn = self.etcd_txn(compares, ops, &mut lease_used);
        let resp = self
            .call("txn", Retry::IfNotSent, |c| {
                let txn = txn.clone();
                async move { c.kv_client().txn(txn).await }
            })
            .await
            .map_err(|e| with_lease_id(e, lease_used))?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map(|h| h.revision()).unwrap_or(0)))
    }

    /// One outer transaction without compares whose only writes are the group's transactions,
    /// nested (etcd 3.3 and later): each is decided by its own compares, all in one proposal.
    async fn txn_group(&self, group: Vec<Transaction>) -> StoreResult<Vec<Option<i64>>> {
        let count = group.len();
        let mut lease_used = None;
        let nested: Vec<etcd_client::TxnOp> = group
            .into_iter()
            .map(|t| etcd_client::TxnOp::txn(self.etcd_txn(t.compares, t.ops, &mut lease_used)))
            .collect();
        let txn = Txn::new().and_then(nested);
        let resp = self
            .call("txn", Retry::IfNotSent, |c| {
                let txn = txn.clone();
                async move { c.kv_client().txn(txn).await }
            })
            .await
            .map_err(|e| with_lease_id(e, lease_used))?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let results: Vec<Option<i64>> = resp
            .op_responses()
            .into_iter()
            .map(|r| match r {
                etcd_client::TxnOpResponse::Txn(t) => t.succeeded().then_some(revision),
                _ => None,
            })
            .collect();
        if results.len() != count {
            return Err(StoreError::Unavailable(format!(
                "etcd answered {} of {count} grouped transactions",
                results.len()
            )));
        }
        Ok(results)
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<i64> {
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let resp = self
            .call("lease grant", Retry::IfNotSent, |c| async move {
                c.lease_client().grant(ttl, None).await
            })
            .await?;
        Ok(resp.id())
    }

    async fn lease_keep_alive(&self, id: i64) -> StoreResult<bool> {
        let once = |c: Client| async move {
            let (mut keeper, mut responses) = c.lease_client().keep_alive(id).await?;
            keeper.keep_alive().await?;
            responses.message().await
        };
        match self.call("lease keep-alive", Retry::Idempotent, once).await {
            Ok(Some(resp)) => Ok(resp.ttl() > 0),
            Ok(None) => Err(StoreError::Unavailable(
                "lease keep-alive stream closed".into(),
            )),
            Err(StoreError::LeaseNotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn lease_revoke(&self, id: i64) -> StoreResult<()> {
        let revoke = |c: Client| async move { c.lease_client().revoke(id).await };
        match self.call("lease revoke", Retry::Idempotent, revoke).await {
            Ok(_) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn watch(
        &self,
        key: &str,
        prefix: bool,
        start_revision: i64,
    ) -> StoreResult<WatchStream> {
        let mut options = WatchOptions::new();
        if prefix {
            options = options.with_prefix();
        }
        if start_revision > 0 {
            options = options.with_start_revision(start_revision);
        }
        let key = self.full(key);
        let stream = self
            .call("watch", Retry::Idempotent, |c| {
                let (key, options) = (key.clone(), options.clone());
                async move { c.watch_client().watch(key, Some(options)).await }
            })
            .await?;
        let prefix_len = self.prefix.clone();
        let events = futures::stream::unfold(
            (stream, VecDeque::<WatchEvent>::new(), false),
            move |(mut stream, mut pending, done)| {
                let strip = prefix_len.clone();
                async move {
                    loop {
                        if let Some(event) = pending.pop_front() {
                            return Some((Ok(event), (stream, pending, done)));
                        }
                        if done {
                            return None;
                        }
                        match stream.message().await {
                            Ok(Some(resp)) => {
                                if resp.canceled() {
                                    let reason = format!(
                                        "watch cancelled by etcd: {} (compacted at {})",
                                        resp.cancel_reason(),
                                        resp.compact_revision()
                                    );
                                    return Some((
                                        Err(StoreError::Unavailable(reason)),
                                        (stream, pending, true),
                                    ));
                                }
                                for event in resp.events() {
                                    let Some(kv) = event.kv() else { continue };
                                    let key = String::from_utf8_lossy(kv.key());
                                    pending.push_back(WatchEvent {
                                        kind: match event.event_type() {
                                            EventType::Put => WatchEventKind::Put,
                                            EventType::Delete => WatchEventKind::Delete,
                                        },
                                        key: key.strip_prefix(&strip).unwrap_or(&key).to_owned(),
                                        value: kv.value().to_vec(),
                                        mod_revision: kv.mod_revision(),
                                        lease: kv.lease(),
                                    });
                                }
                            }
                            Ok(None) => return None,
                            Err(e) => {
                                return Some((Err(map_error(e)), (stream, pending, true)));
                            }
                        }
                    }
                }
            },
        );
        Ok(Box::pin(events))
    }

    /// Blocks until elected, without a timeout: a follower waits here for as long as
    /// another replica leads. Callers race it against their shutdown signal.
    async fn campaign(&self, name: &str, value: &str, lease: i64) -> StoreResult<Leadership> {
        let full_name = self.full(&format!("election/{name}"));
        let resp = loop {
            let (member, client) = self.pinned();
            match client
                .election_client()
                .campaign(full_name.clone(), value, lease)
                .await
            {
                Ok(resp) => break resp,
                // Every call runs under the request timeout, and a follower's campaign
                // outlasts it for as long as the leader lives: that is "not yet", not a
                // failure of the member. Campaign again under the same lease.
                Err(e) if is_request_timeout(&e) => continue,
                Err(e) => {
                    if unreachable(&e, Retry::Idempotent) {
                        self.move_pin_off(member);
                    }
                    return Err(with_lease_id(map_error(e), Some(lease)));
                }
            }
        };
        let leader = resp
            .leader()
            .ok_or_else(|| StoreError::Unavailable("campaign returned no leader key".into()))?;
        Ok(Leadership {
            name: name.to_owned(),
            key: leader.key().to_vec(),
            revision: leader.rev(),
            lease: leader.lease(),
        })
    }

    async fn resign(&self, leadership: Leadership) -> StoreResult<()> {
        let leader = LeaderKey::new()
            .with_name(self.full(&format!("election/{}", leadership.name)))
            .with_key(leadership.key)
            .with_rev(leadership.revision)
            .with_lease(leadership.lease);
        self.call("resign", Retry::Idempotent, |c| {
            let options = ResignOptions::new().with_leader(leader.clone());
            async move { c.election_client().resign(Some(options)).await }
        })
        .await?;
        Ok(())
    }
}

fn with_lease_id(e: StoreError, lease: Option<i64>) -> StoreError {
    match e {
        StoreError::LeaseNotFound(_) => StoreError::LeaseNotFound(lease.unwrap_or(0)),
        other => other,
    }
}

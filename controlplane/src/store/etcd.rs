//! The etcd `Store`. Every call runs under `request_timeout` so a stuck etcd turns into
//! `StoreError::Unavailable` instead of a hung RPC; every key is placed under `prefix`.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use envgate_proto::tls::TlsFiles;
use etcd_client::{
    Certificate, Client, ConnectOptions, DeleteOptions, EventType, GetOptions, Identity, LeaderKey,
    PutOptions, ResignOptions, TlsOptions, Txn, WatchOptions,
};

use super::{
    Compare, KeyValue, Leadership, Store, StoreError, StoreResult, TxnOp, WatchEvent,
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
    client: Client,
    prefix: String,
    request_timeout: Duration,
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
        let connect = Client::connect(endpoints, Some(config.options(request_timeout)));
        let client = tokio::time::timeout(request_timeout, connect)
            .await
            .map_err(|_| timed_out("connect", endpoints.join(",")))?
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", endpoints.join(","))))?;
        let store = Self {
            client,
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

    async fn bounded<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> StoreResult<T> {
        tokio::time::timeout(self.request_timeout, call)
            .await
            .map_err(|_| timed_out(what, format!("{:?}", self.request_timeout)))?
            .map_err(map_error)
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
        let mut kv = self.client.kv_client();
        let resp = self.bounded("get", kv.get(self.full(key), None)).await?;
        Ok(resp.kvs().first().map(|kv| self.to_kv(kv)))
    }

    async fn range(&self, prefix: &str) -> StoreResult<Vec<KeyValue>> {
        let mut kv = self.client.kv_client();
        let resp = self
            .bounded(
                "range",
                kv.get(self.full(prefix), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        Ok(resp.kvs().iter().map(|kv| self.to_kv(kv)).collect())
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> StoreResult<i64> {
        let mut kv = self.client.kv_client();
        let options = lease
            .filter(|l| *l != 0)
            .map(|l| PutOptions::new().with_lease(l));
        let resp = self
            .bounded("put", kv.put(self.full(key), value, options))
            .await
            .map_err(|e| with_lease_id(e, lease))?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        let mut kv = self.client.kv_client();
        let resp = self
            .bounded("delete", kv.delete(self.full(key), None::<DeleteOptions>))
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> StoreResult<Option<i64>> {
        let mut lease_used = None;
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
                        lease_used = Some(l);
                        PutOptions::new().with_lease(l)
                    });
                    etcd_client::TxnOp::put(self.full(&key), value, options)
                }
                TxnOp::Delete { key } => etcd_client::TxnOp::delete(self.full(&key), None),
            })
            .collect();
        let mut kv = self.client.kv_client();
        let resp = self
            .bounded("txn", kv.txn(Txn::new().when(compares).and_then(ops)))
            .await
            .map_err(|e| with_lease_id(e, lease_used))?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map(|h| h.revision()).unwrap_or(0)))
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<i64> {
        let mut lease = self.client.lease_client();
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let resp = self.bounded("lease grant", lease.grant(ttl, None)).await?;
        Ok(resp.id())
    }

    async fn lease_keep_alive(&self, id: i64) -> StoreResult<bool> {
        let mut lease = self.client.lease_client();
        let once = async move {
            let (mut keeper, mut responses) = lease.keep_alive(id).await?;
            keeper.keep_alive().await?;
            responses.message().await
        };
        match self.bounded("lease keep-alive", once).await {
            Ok(Some(resp)) => Ok(resp.ttl() > 0),
            Ok(None) => Err(StoreError::Unavailable(
                "lease keep-alive stream closed".into(),
            )),
            Err(StoreError::LeaseNotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn lease_revoke(&self, id: i64) -> StoreResult<()> {
        let mut lease = self.client.lease_client();
        match self.bounded("lease revoke", lease.revoke(id)).await {
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
        let mut client = self.client.watch_client();
        let stream = self
            .bounded("watch", client.watch(self.full(key), Some(options)))
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
        let mut election = self.client.election_client();
        let full_name = self.full(&format!("election/{name}"));
        let resp = election
            .campaign(full_name.clone(), value, lease)
            .await
            .map_err(|e| with_lease_id(map_error(e), Some(lease)))?;
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
        let mut election = self.client.election_client();
        let leader = LeaderKey::new()
            .with_name(self.full(&format!("election/{}", leadership.name)))
            .with_key(leadership.key)
            .with_rev(leadership.revision)
            .with_lease(leadership.lease);
        self.bounded(
            "resign",
            election.resign(Some(ResignOptions::new().with_leader(leader))),
        )
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

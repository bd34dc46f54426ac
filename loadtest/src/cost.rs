//! The cost of one warm login: the servers' CPU and etcd's work per login, measured from the
//! outside. A bounded loop of logins (every user's container already running, tokens cached)
//! runs against the front door; around it each server process's CPU time (`utime + stime`
//! from `/proc/PID/stat`, every thread, dead ones included) and etcd's own counters (its
//! `/metrics`) are read. The same reads around an idle window of the same length give what
//! the fleet spends on its own (heartbeats, health checks, the reconciler, lease keep-alives);
//! that is taken off, and the rest divided by the logins.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::client::{Credential, Job};
use crate::scrape::{ClientTls, fetch_with, parse};

pub const BEGIN: &str = "<!-- fleet bench cost: generated from here -->";
pub const END: &str = "<!-- fleet bench cost: generated up to here -->";

/// Linux reports process CPU times in clock ticks of `USER_HZ`, 100 on every architecture
/// Linux userland uses (`getconf CLK_TCK`).
const TICKS_PER_SECOND: f64 = 100.0;

/// How long after the last login the window stays open, so its session's close counts.
const SETTLE: Duration = Duration::from_secs(2);

/// etcd's counters read around each window, as `(what the report calls it, metric)`. The
/// mvcc counters count keys: a transaction of two puts adds 2 to `put` and 1 to `txn`; a
/// lease revocation adds one `delete` per key it takes away.
pub const ETCD_COUNTERS: &[(&str, &str)] = &[
    ("put", "etcd_mvcc_put_total"),
    ("delete", "etcd_mvcc_delete_total"),
    ("txn", "etcd_mvcc_txn_total"),
    ("range", "etcd_mvcc_range_total"),
    ("proposals", "etcd_server_proposals_committed_total"),
    ("wal_fsyncs", "etcd_disk_wal_fsync_duration_seconds_count"),
    ("wal_bytes", "etcd_disk_wal_write_bytes_total"),
    (
        "grpc_received_bytes",
        "etcd_network_client_grpc_received_bytes_total",
    ),
    (
        "grpc_sent_bytes",
        "etcd_network_client_grpc_sent_bytes_total",
    ),
];
/// etcd's requests by gRPC method (`grpc_server_handled_total{grpc_method}`).
const GRPC_HANDLED: &str = "grpc_server_handled_total";
/// Gauges read at the end: the database file and the keys in it.
const ETCD_DB_SIZE: &str = "etcd_mvcc_db_total_size_in_bytes";
const ETCD_KEYS: &str = "etcd_debugging_mvcc_keys_total";

#[derive(Debug, thiserror::Error)]
pub enum CostError {
    #[error("reading /proc/{pid}/stat ({label}): {message}")]
    Proc {
        label: String,
        pid: u32,
        message: String,
    },
    #[error(transparent)]
    Scrape(#[from] crate::scrape::ScrapeError),
    #[error("{failed} of {logins} logins failed; first failure: {first}")]
    Logins {
        failed: usize,
        logins: usize,
        first: String,
    },
    #[error("the russh client could not be configured: {0}")]
    Client(String),
}

#[derive(Clone)]
pub struct CostConfig {
    /// `host:port` of the front door (HAProxy).
    pub addr: String,
    /// Client `i` of the loop logs in as `credentials[i % len]`.
    pub credentials: Vec<Credential>,
    pub command: String,
    /// Logins measured, and how many run at once.
    pub logins: usize,
    pub concurrency: usize,
    /// Each server process as `(label, pid)`: `proxy-1`, `controlplane`, `etcd`, `haproxy` …
    pub processes: Vec<(String, u32)>,
    /// etcd's `/metrics`, and the client certificate it asks for (`https://`).
    pub etcd_metrics: String,
    pub etcd_tls: Option<ClientTls>,
    pub timeout: Duration,
}

/// What one window cost: CPU seconds per process and etcd's counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Reading {
    pub cpu_seconds: BTreeMap<String, f64>,
    pub etcd: BTreeMap<String, f64>,
}

impl Reading {
    fn minus(&self, before: &Reading) -> Reading {
        let sub = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>| {
            a.iter()
                .map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0.0)))
                .collect()
        };
        Reading {
            cpu_seconds: sub(&self.cpu_seconds, &before.cpu_seconds),
            etcd: sub(&self.etcd, &before.etcd),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CostResult {
    pub logins: usize,
    pub concurrency: usize,
    pub command: String,
    pub users: usize,
    /// Seconds the loop took; the idle window lasted as long.
    pub load_seconds: f64,
    pub idle_seconds: f64,
    /// What changed during the loop and during the idle window.
    pub load: Reading,
    pub idle: Reading,
    /// Per login, the idle window's share taken off: CPU in ms per process label.
    pub cpu_ms_per_login: BTreeMap<String, f64>,
    /// Per login, the idle window's share taken off: etcd counters.
    pub etcd_per_login: BTreeMap<String, f64>,
    /// etcd's database file and keys after the loop.
    pub etcd_db_bytes: f64,
    pub etcd_keys: f64,
}

impl CostResult {
    /// CPU per login of the processes whose label is `name` or starts with `name-`
    /// (`proxy` adds up `proxy-1`, `proxy-2` …).
    pub fn cpu_ms_of(&self, name: &str) -> f64 {
        self.cpu_ms_per_login
            .iter()
            .filter(|(label, _)| {
                label.as_str() == name
                    || label.strip_prefix(name).is_some_and(|r| r.starts_with('-'))
            })
            .map(|(_, ms)| ms)
            .sum()
    }

    /// Server CPU per login over every process measured except `docker` (the engine is not
    /// part of envgate's fleet; it is reported on its own line).
    pub fn fleet_cpu_ms(&self) -> f64 {
        self.cpu_ms_per_login
            .iter()
            .filter(|(label, _)| !label.starts_with("docker"))
            .map(|(_, ms)| ms)
            .sum()
    }

    pub fn etcd(&self, name: &str) -> f64 {
        self.etcd_per_login.get(name).copied().unwrap_or(0.0)
    }

    /// Writes per login as the mvcc counters count them: keys put and deleted.
    pub fn etcd_key_writes(&self) -> f64 {
        self.etcd("put") + self.etcd("delete")
    }

    /// Write requests per login: the Put, DeleteRange and Txn calls etcd handled (each one
    /// raft proposal), whatever the number of keys in them.
    pub fn etcd_write_requests(&self) -> f64 {
        ["grpc:Put", "grpc:DeleteRange", "grpc:Txn"]
            .iter()
            .map(|k| self.etcd(k))
            .sum()
    }

    /// Read requests per login: Range calls.
    pub fn etcd_read_requests(&self) -> f64 {
        self.etcd("grpc:Range")
    }
}

/// `utime + stime` of `pid` in seconds, from the text of `/proc/PID/stat`.
pub fn cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

fn read_cpu(processes: &[(String, u32)]) -> Result<BTreeMap<String, f64>, CostError> {
    processes
        .iter()
        .map(|(label, pid)| {
            let fail = |message: String| CostError::Proc {
                label: label.clone(),
                pid: *pid,
                message,
            };
            let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_err(|e| fail(e.to_string()))?;
            let seconds = cpu_seconds(&text).ok_or_else(|| fail("unreadable".into()))?;
            Ok((label.clone(), seconds))
        })
        .collect()
}

/// etcd's counters of interest (and its gRPC requests by method, as `grpc:Method`).
pub fn etcd_counters(metrics_text: &str) -> BTreeMap<String, f64> {
    let mut counters = BTreeMap::new();
    for sample in parse(metrics_text) {
        if let Some((name, _)) = ETCD_COUNTERS.iter().find(|(_, m)| *m == sample.name) {
            *counters.entry((*name).to_owned()).or_insert(0.0) += sample.value;
        } else if sample.name == GRPC_HANDLED
            && sample.labels.get("grpc_type").is_some_and(|t| t == "unary")
            && let Some(method) = sample.labels.get("grpc_method")
        {
            *counters.entry(format!("grpc:{method}")).or_insert(0.0) += sample.value;
        } else if sample.name == ETCD_DB_SIZE || sample.name == ETCD_KEYS {
            counters.insert(sample.name.clone(), sample.value);
        }
    }
    counters
}

async fn read(config: &CostConfig) -> Result<Reading, CostError> {
    let text = fetch_with(
        &config.etcd_metrics,
        Duration::from_secs(5),
        config.etcd_tls.as_ref(),
    )
    .await?;
    Ok(Reading {
        cpu_seconds: read_cpu(&config.processes)?,
        etcd: etcd_counters(&text),
    })
}

/// `count` logins, `concurrency` at a time; the first failure's line on error.
async fn logins(
    config: &CostConfig,
    russh: Arc<russh::client::Config>,
    count: usize,
) -> Result<(), CostError> {
    let permits = Arc::new(tokio::sync::Semaphore::new(config.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let job = Job {
            addr: config.addr.clone(),
            credential: config.credentials[i % config.credentials.len()].clone(),
            command: config.command.clone(),
            timeout: config.timeout,
            kex: Some(crate::client::DEFAULT_KEX.into()),
        };
        let (permits, russh) = (permits.clone(), russh.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            crate::client::russh::run(&job, russh).await
        });
    }
    let (mut failed, mut first) = (0, None);
    while let Some(outcome) = tasks.join_next().await {
        let problem = match outcome {
            Ok(o) => match (o.failure, o.exit_status) {
                (Some(f), _) => Some(format!("{}: {}", f.kind.as_str(), f.detail)),
                (None, Some(0)) => None,
                (None, status) => Some(format!("exit status {status:?}")),
            },
            Err(e) => Some(e.to_string()),
        };
        if let Some(problem) = problem {
            failed += 1;
            first.get_or_insert(problem);
        }
    }
    match first {
        None => Ok(()),
        Some(first) => Err(CostError::Logins {
            failed,
            logins: count,
            first,
        }),
    }
}

/// Primes (one login per user per proxy, so containers run and tokens are cached), measures
/// the loop, then an idle window as long as the loop.
pub async fn run(config: &CostConfig) -> Result<CostResult, CostError> {
    let russh = crate::client::russh::config(Some(crate::client::DEFAULT_KEX))
        .map_err(CostError::Client)?;
    let proxies = config
        .processes
        .iter()
        .filter(|(l, _)| l.starts_with("proxy"))
        .count()
        .max(1);
    logins(
        config,
        russh.clone(),
        config.credentials.len() * proxies * 2,
    )
    .await?;
    // Let what the priming set off (closes, the reconciler's wake-up) settle.
    tokio::time::sleep(SETTLE).await;

    let before = read(config).await?;
    let started = Instant::now();
    logins(config, russh, config.logins).await?;
    // The last sessions are closed after their clients have gone.
    tokio::time::sleep(SETTLE).await;
    let load_seconds = started.elapsed().as_secs_f64();
    let after = read(config).await?;
    let load = after.minus(&before);

    let idle_started = Instant::now();
    let idle_before = read(config).await?;
    tokio::time::sleep(started.elapsed().min(Duration::from_secs(600))).await;
    let idle_after = read(config).await?;
    let idle_seconds = idle_started.elapsed().as_secs_f64();
    let idle = idle_after.minus(&idle_before);

    let scale = load_seconds / idle_seconds.max(f64::MIN_POSITIVE);
    let n = config.logins.max(1) as f64;
    let per_login = |load: &BTreeMap<String, f64>, idle: &BTreeMap<String, f64>, unit: f64| {
        load.iter()
            .map(|(k, v)| {
                let baseline = idle.get(k).copied().unwrap_or(0.0) * scale;
                (k.clone(), (v - baseline) * unit / n)
            })
            .collect::<BTreeMap<_, _>>()
    };
    let cpu_ms_per_login = per_login(&load.cpu_seconds, &idle.cpu_seconds, 1000.0);
    let mut etcd_per_login = per_login(&load.etcd, &idle.etcd, 1.0);
    etcd_per_login.retain(|k, _| k != ETCD_DB_SIZE && k != ETCD_KEYS);
    Ok(CostResult {
        logins: config.logins,
        concurrency: config.concurrency,
        command: config.command.clone(),
        users: config.credentials.len(),
        load_seconds,
        idle_seconds,
        cpu_ms_per_login,
        etcd_per_login,
        etcd_db_bytes: after.etcd.get(ETCD_DB_SIZE).copied().unwrap_or(0.0),
        etcd_keys: after.etcd.get(ETCD_KEYS).copied().unwrap_or(0.0),
        load,
        idle,
    })
}

/// The generated region of `docs/benchmarks.md`.
pub fn markdown(result: &CostResult, meta: &[(String, String)]) -> String {
    let mut out = String::new();
    for (name, value) in meta {
        out.push_str(&format!("- {name}: {value}\n"));
    }
    out.push_str(&format!(
        "- loop: {} warm logins (`{}`), {} at a time, {} users in turn, in {:.1} s; idle window {:.1} s\n\n",
        result.logins,
        result.command,
        result.concurrency,
        result.users,
        result.load_seconds,
        result.idle_seconds,
    ));
    out.push_str("| per warm login | |\n|---|---|\n");
    let cpu_line = |label: &str| {
        result
            .cpu_ms_per_login
            .get(label)
            .map(|ms| format!("| server CPU, {label} | {ms:.2} ms |\n"))
            .unwrap_or_default()
    };
    for label in result.cpu_ms_per_login.keys() {
        if !label.starts_with("docker") {
            out.push_str(&cpu_line(label));
        }
    }
    out.push_str(&format!(
        "| **server CPU, the whole fleet** | **{:.2} ms** |\n",
        result.fleet_cpu_ms()
    ));
    for label in result.cpu_ms_per_login.keys() {
        if label.starts_with("docker") {
            out.push_str(&cpu_line(label));
        }
    }
    out.push_str(&format!(
        "| **etcd write requests** (Put, DeleteRange, Txn calls) | **{:.2}** |\n\
         | etcd keys written (mvcc put + delete) | {:.2} ({:.2} put, {:.2} delete, in {:.2} txn) |\n\
         | **etcd read requests** (Range calls) | **{:.2}** ({:.2} keys ranged by mvcc) |\n\
         | etcd raft proposals committed | {:.2} |\n\
         | etcd WAL bytes written / fsyncs | {:.0} B / {:.2} |\n\
         | etcd client bytes received / sent | {:.0} B / {:.0} B |\n\
         | etcd database after the loop | {:.1} MiB, {:.0} keys |\n",
        result.etcd_write_requests(),
        result.etcd_key_writes(),
        result.etcd("put"),
        result.etcd("delete"),
        result.etcd("txn"),
        result.etcd_read_requests(),
        result.etcd("range"),
        result.etcd("proposals"),
        result.etcd("wal_bytes"),
        result.etcd("wal_fsyncs"),
        result.etcd("grpc_received_bytes"),
        result.etcd("grpc_sent_bytes"),
        result.etcd_db_bytes / 1048576.0,
        result.etcd_keys,
    ));
    out
}

pub fn splice(doc: &str, generated: &str) -> String {
    crate::bench_doc::splice_region(doc, BEGIN, END, generated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_from_a_stat_line_with_spaces_in_the_name() {
        let stat = "4242 (envgate proxy) S 1 4242 4242 0 -1 4194560 2000 0 0 0 150 50 0 0 20 0 9 0 100 0 0";
        assert_eq!(cpu_seconds(stat), Some(2.0));
        assert_eq!(cpu_seconds("garbage"), None);
    }

    #[test]
    fn etcd_counters_and_requests_by_method() {
        let text = "etcd_mvcc_put_total 10\netcd_mvcc_delete_total 2\n\
            grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 7\n\
            grpc_server_handled_total{grpc_code=\"NotFound\",grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1\n\
            grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"} 3\n\
            etcd_mvcc_db_total_size_in_bytes 4096\n";
        let c = etcd_counters(text);
        assert_eq!(c["put"], 10.0);
        assert_eq!(c["delete"], 2.0);
        assert_eq!(c["grpc:Range"], 8.0);
        assert!(!c.contains_key("grpc:Watch"));
        assert_eq!(c[ETCD_DB_SIZE], 4096.0);
    }

    #[test]
    fn per_login_figures_and_the_table() {
        let mut cpu = BTreeMap::new();
        cpu.insert("proxy-1".to_owned(), 0.5);
        cpu.insert("proxy-2".to_owned(), 0.25);
        cpu.insert("etcd".to_owned(), 0.25);
        cpu.insert("docker".to_owned(), 1.0);
        let mut etcd = BTreeMap::new();
        etcd.insert("put".to_owned(), 1.0);
        etcd.insert("grpc:Txn".to_owned(), 1.0);
        etcd.insert("grpc:Range".to_owned(), 0.5);
        let result = CostResult {
            logins: 100,
            concurrency: 4,
            command: "true".into(),
            users: 10,
            load_seconds: 10.0,
            idle_seconds: 10.0,
            load: Reading::default(),
            idle: Reading::default(),
            cpu_ms_per_login: cpu,
            etcd_per_login: etcd,
            etcd_db_bytes: 2.0 * 1048576.0,
            etcd_keys: 50.0,
        };
        assert_eq!(result.cpu_ms_of("proxy"), 0.75);
        assert_eq!(result.fleet_cpu_ms(), 1.0);
        assert_eq!(result.etcd_write_requests(), 1.0);
        let table = markdown(&result, &[("date".into(), "today".into())]);
        assert!(table.starts_with("- date: today\n"));
        assert!(table.contains("| **server CPU, the whole fleet** | **1.00 ms** |"));
        assert!(
            table.contains("| server CPU, docker | 1.00 ms |"),
            "{table}"
        );
        assert!(
            table.contains("| **etcd write requests** (Put, DeleteRange, Txn calls) | **1.00** |")
        );
        assert!(table.contains("2.0 MiB, 50 keys"));
    }
}

//! The password storm: many bad password logins at once (unknown users, from many source
//! addresses, so neither the proxies' per-source budgets nor the control plane's per-source
//! count cut them short and the password checks themselves are what is stressed), while good
//! key logins go on. It reads the control plane's resident memory through the storm and
//! its counters before and after, and compares the good logins' times with the same logins
//! without a storm, measured first in the same run.
//!
//! The finding it answers: 100 concurrent unknown-user password logins once took the control
//! plane from 28 MB to 1.96 GB.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use russh::client::{self, AuthResult};
use serde::{Deserialize, Serialize};
use tokio::net::TcpSocket;
use tokio::task::JoinSet;

use crate::client::russh::AcceptAnyHostKey;
use crate::client::{Credential, Job};
use crate::hold::{HoldError, total_rss_kib};
use crate::stats::Distribution;

pub const BEGIN: &str = "<!-- fleet bench storm: generated from here -->";
pub const END: &str = "<!-- fleet bench storm: generated up to here -->";

/// Counters of the control plane read before and after the storm.
const HASHES: &str = "envgate_controlplane_password_hashes_total";
const HASHES_REFUSED: &str = "envgate_controlplane_password_hashes_refused_total";
const THROTTLED: &str = "envgate_controlplane_auth_throttled_total";

#[derive(Clone, Debug)]
pub struct StormConfig {
    /// `host:port` of the SSH front door (HAProxy).
    pub addr: String,
    /// Bad password logins, all started at once.
    pub bad: usize,
    /// Local addresses the bad logins come from, in turn (127.0.0.x on one machine).
    pub sources: Vec<IpAddr>,
    /// Good key logins, run without a storm first, then during it.
    pub good: Vec<Credential>,
    pub good_logins: usize,
    pub controlplane_pid: u32,
    /// The control plane's `/metrics`.
    pub metrics: String,
    pub timeout: Duration,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GoodLogins {
    pub ok: usize,
    pub failed: usize,
    /// Milliseconds of the successful ones.
    pub times: Option<Distribution>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StormResult {
    pub bad: usize,
    /// Bad logins the server refused (what a guesser sees: "Permission denied").
    pub bad_refused: usize,
    /// Bad logins that ended otherwise (timeouts, resets): should be none.
    pub bad_errors: usize,
    pub rss_before_kib: u64,
    /// The highest resident memory sampled during the storm.
    pub rss_peak_kib: u64,
    pub rss_after_kib: u64,
    pub hashes: f64,
    pub hashes_refused: f64,
    pub throttled: f64,
    pub storm_seconds: f64,
    pub baseline: GoodLogins,
    pub during: GoodLogins,
}

/// One bad password login from `source`: `Ok(true)` when refused, `Ok(false)` if it got in.
async fn bad_login(
    addr: SocketAddr,
    source: IpAddr,
    user: String,
    config: Arc<client::Config>,
    timeout: Duration,
) -> Result<bool, String> {
    let attempt = async {
        let socket = match source {
            IpAddr::V4(_) => TcpSocket::new_v4(),
            IpAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| e.to_string())?;
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|e| format!("bind {source}: {e}"))?;
        let stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
        let mut handle = client::connect_stream(config, stream, AcceptAnyHostKey)
            .await
            .map_err(|e| e.to_string())?;
        let password = format!("wrong-password-of-{user}");
        let result = handle
            .authenticate_password(user.clone(), password)
            .await
            .map_err(|e| e.to_string())?;
        let _ = handle
            .disconnect(russh::Disconnect::ByApplication, "", "")
            .await;
        Ok(matches!(result, AuthResult::Failure { .. }))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// `good_logins` key logins, ten at a time, each timed from connect to exit.
async fn good_logins(config: &StormConfig) -> GoodLogins {
    let russh_config = match crate::client::russh::config(Some(crate::client::DEFAULT_KEX)) {
        Ok(c) => c,
        Err(_) => return GoodLogins::default(),
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(10));
    let mut tasks = JoinSet::new();
    for i in 0..config.good_logins {
        let job = Job {
            addr: config.addr.clone(),
            credential: config.good[i % config.good.len()].clone(),
            command: "true".into(),
            timeout: config.timeout,
            kex: Some(crate::client::DEFAULT_KEX.into()),
        };
        let (permits, russh_config) = (permits.clone(), russh_config.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            crate::client::russh::run(&job, russh_config).await
        });
    }
    let mut result = GoodLogins::default();
    let mut times = Vec::new();
    while let Some(outcome) = tasks.join_next().await {
        match outcome {
            Ok(o) if o.failure.is_none() && o.exit_status == Some(0) => {
                result.ok += 1;
                times.push(o.total.as_secs_f64() * 1000.0);
            }
            _ => result.failed += 1,
        }
    }
    result.times = Distribution::of(&times);
    result
}

async fn counter(metrics: &str, name: &str) -> f64 {
    match crate::scrape::fetch(metrics, Duration::from_secs(5)).await {
        Ok(text) => crate::scrape::parse(&text)
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum(),
        Err(_) => f64::NAN,
    }
}

pub async fn run(config: &StormConfig) -> Result<StormResult, HoldError> {
    let addr: SocketAddr = config
        .addr
        .parse()
        .map_err(|_| HoldError::Kex(format!("{} is not an address", config.addr)))?;
    // The good users' first logins create their containers: not what is being compared.
    good_logins(config).await;
    let baseline = good_logins(config).await;
    let rss_before_kib = total_rss_kib(&[config.controlplane_pid])?;
    let before = (
        counter(&config.metrics, HASHES).await,
        counter(&config.metrics, HASHES_REFUSED).await,
        counter(&config.metrics, THROTTLED).await,
    );
    let peak = Arc::new(AtomicU64::new(rss_before_kib));
    let sampling = {
        let (peak, pid) = (peak.clone(), config.controlplane_pid);
        tokio::spawn(async move {
            loop {
                if let Ok(rss) = total_rss_kib(&[pid]) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let russh_config =
        crate::client::russh::config(Some(crate::client::DEFAULT_KEX)).map_err(HoldError::Kex)?;
    let started = Instant::now();
    let mut storm = JoinSet::new();
    for i in 0..config.bad {
        let source = config.sources[i % config.sources.len().max(1)];
        let user = format!("storm{i:05}");
        storm.spawn(bad_login(
            addr,
            source,
            user,
            russh_config.clone(),
            config.timeout,
        ));
    }
    let during = good_logins(config).await;
    let (mut bad_refused, mut bad_errors) = (0, 0);
    while let Some(outcome) = storm.join_next().await {
        match outcome {
            Ok(Ok(true)) => bad_refused += 1,
            _ => bad_errors += 1,
        }
    }
    let storm_seconds = started.elapsed().as_secs_f64();
    sampling.abort();
    let after = (
        counter(&config.metrics, HASHES).await,
        counter(&config.metrics, HASHES_REFUSED).await,
        counter(&config.metrics, THROTTLED).await,
    );
    Ok(StormResult {
        bad: config.bad,
        bad_refused,
        bad_errors,
        rss_before_kib,
        rss_peak_kib: peak.load(Ordering::Relaxed),
        rss_after_kib: total_rss_kib(&[config.controlplane_pid])?,
        hashes: after.0 - before.0,
        hashes_refused: after.1 - before.1,
        throttled: after.2 - before.2,
        storm_seconds,
        baseline,
        during,
    })
}

fn times(good: &GoodLogins) -> String {
    match &good.times {
        Some(d) => format!("p50 {:.0} ms, p99 {:.0} ms", d.p50, d.p99),
        None => "-".into(),
    }
}

/// The generated region of `docs/benchmarks.md`.
pub fn markdown(result: &StormResult, meta: &[(String, String)]) -> String {
    let mut out = String::new();
    for (name, value) in meta {
        out.push_str(&format!("- {name}: {value}\n"));
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let ratio = match (&result.during.times, &result.baseline.times) {
        (Some(d), Some(b)) if b.p50 > 0.0 => format!(
            "{:.2}× the baseline's p50, {:.2}× its p99",
            d.p50 / b.p50,
            d.p99 / b.p99.max(f64::MIN_POSITIVE)
        ),
        _ => "-".into(),
    };
    out.push_str(&format!(
        "\n| | |\n|---|---|\n\
         | bad password logins, all at once (unknown users, many source addresses) | {} in {:.1} s: {} refused, {} other outcomes |\n\
         | control plane resident memory | {:.0} MiB before, **{:.0} MiB at the peak**, {:.0} MiB after |\n\
         | password hashes computed / refused at once (pool full) / attempts throttled | {:.0} / {:.0} / {:.0} |\n\
         | good key logins without the storm (baseline) | {} of {} ok, {} |\n\
         | the same logins during the storm | {} of {} ok, {}; {} |\n",
        result.bad,
        result.storm_seconds,
        result.bad_refused,
        result.bad_errors,
        mib(result.rss_before_kib),
        mib(result.rss_peak_kib),
        mib(result.rss_after_kib),
        result.hashes,
        result.hashes_refused,
        result.throttled,
        result.baseline.ok,
        result.baseline.ok + result.baseline.failed,
        times(&result.baseline),
        result.during.ok,
        result.during.ok + result.during.failed,
        times(&result.during),
        ratio,
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
    fn the_table_names_every_figure() {
        let good = |ok, p50| GoodLogins {
            ok,
            failed: 0,
            times: Distribution::of(&[p50, p50 * 2.0]),
        };
        let result = StormResult {
            bad: 1000,
            bad_refused: 1000,
            bad_errors: 0,
            rss_before_kib: 30 * 1024,
            rss_peak_kib: 80 * 1024,
            rss_after_kib: 60 * 1024,
            hashes: 120.0,
            hashes_refused: 880.0,
            throttled: 0.0,
            storm_seconds: 4.0,
            baseline: good(50, 100.0),
            during: good(50, 150.0),
        };
        let table = markdown(&result, &[("date".into(), "today".into())]);
        assert!(table.starts_with("- date: today\n"));
        assert!(table.contains("| 1000 in 4.0 s: 1000 refused, 0 other outcomes |"));
        assert!(table.contains("30 MiB before, **80 MiB at the peak**, 60 MiB after"));
        assert!(table.contains("| 120 / 880 / 0 |"));
        assert!(table.contains("50 of 50 ok, p50 150 ms"));
        assert!(table.contains("1.50× the baseline's p50"));
    }
}

//! The proxy-memory measurement: open many authenticated SSH connections,
//! keep them idle, and read how much the proxies' resident memory grew per
//! connection (Linux `/proc/PID/status`, `VmRSS`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{self, Credential, Job};

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("no credentials given")]
    NoCredentials,
    #[error("cannot read the resident memory of pid {pid} ({path}): {message}")]
    Rss {
        pid: u32,
        path: String,
        message: String,
    },
    #[error("{0}")]
    Kex(String),
    #[error("{failed} of {wanted} connections could not be opened; first failure: {first}")]
    Failed {
        failed: usize,
        wanted: usize,
        first: String,
    },
}

/// What to hold and whose memory to read.
#[derive(Clone, Debug)]
pub struct HoldConfig {
    /// `host:port` (usually HAProxy in front of the proxies).
    pub addr: String,
    pub credentials: Vec<Credential>,
    /// Connections to open and hold.
    pub sessions: usize,
    /// Connections being opened at once.
    pub parallel: usize,
    /// Processes whose resident memory is summed (the proxies).
    pub pids: Vec<u32>,
    /// Limit on opening each connection.
    pub timeout: Duration,
    /// Time between the last connection opened and the second reading.
    pub settle: Duration,
    pub kex: Option<String>,
}

/// The measurement, in KiB.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HoldResult {
    pub sessions: usize,
    pub pids: Vec<u32>,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub kib_per_session: f64,
}

/// Resident memory of one process, from `status_text` (the contents of
/// `/proc/PID/status`).
pub fn vm_rss_kib(status_text: &str) -> Option<u64> {
    status_text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Sum of the resident memory of `pids`.
pub fn total_rss_kib(pids: &[u32]) -> Result<u64, HoldError> {
    pids.iter()
        .map(|&pid| {
            let path = format!("/proc/{pid}/status");
            let text = std::fs::read_to_string(Path::new(&path)).map_err(|e| HoldError::Rss {
                pid,
                path: path.clone(),
                message: e.to_string(),
            })?;
            vm_rss_kib(&text).ok_or_else(|| HoldError::Rss {
                pid,
                path,
                message: "no VmRSS line".to_owned(),
            })
        })
        .sum()
}

impl HoldResult {
    fn new(sessions: usize, pids: Vec<u32>, before: u64, after: u64) -> Self {
        HoldResult {
            sessions,
            pids,
            rss_before_kib: before,
            rss_after_kib: after,
            kib_per_session: after.saturating_sub(before) as f64 / sessions.max(1) as f64,
        }
    }
}

/// Opens `config.sessions` authenticated connections (client `i` logs in as
/// credential `i mod n`), holds them, reads the memory of `config.pids`
/// before and after, then closes them. Any connection that cannot be opened
/// fails the whole measurement: a figure over fewer sessions would flatter.
pub async fn hold(config: &HoldConfig) -> Result<HoldResult, HoldError> {
    if config.credentials.is_empty() {
        return Err(HoldError::NoCredentials);
    }
    let russh_config = client::russh::config(config.kex.as_deref()).map_err(HoldError::Kex)?;
    let before = total_rss_kib(&config.pids)?;
    let permits = Arc::new(Semaphore::new(config.parallel.max(1)));
    let mut tasks = JoinSet::new();
    for i in 0..config.sessions {
        let job = Job {
            addr: config.addr.clone(),
            credential: config.credentials[i % config.credentials.len()].clone(),
            command: String::new(),
            timeout: config.timeout,
            kex: config.kex.clone(),
        };
        let permits = permits.clone();
        let russh_config = russh_config.clone();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            client::russh::open_idle(&job, russh_config).await
        });
    }
    let mut held = Vec::with_capacity(config.sessions);
    let mut failures = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(idle)) => held.push(idle),
            Ok(Err(failure)) => failures.push(format!(
                "{} at {:?}: {}",
                failure.kind.as_str(),
                failure.step,
                failure.detail
            )),
            Err(e) => failures.push(format!("client task failed: {e}")),
        }
    }
    if let Some(first) = failures.first() {
        return Err(HoldError::Failed {
            failed: failures.len(),
            wanted: config.sessions,
            first: first.clone(),
        });
    }
    tokio::time::sleep(config.settle).await;
    let after = total_rss_kib(&config.pids)?;
    drop(held);
    Ok(HoldResult::new(
        config.sessions,
        config.pids.clone(),
        before,
        after,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss_from_proc_status() {
        let text = "Name:\tenvgate-proxy\nVmPeak:\t  900 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(vm_rss_kib(text), Some(12345));
        assert_eq!(vm_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn reads_this_process_and_divides_growth_by_sessions() {
        let own = total_rss_kib(&[std::process::id()]).expect("own /proc status");
        assert!(own > 0);
        let result = HoldResult::new(1000, vec![1, 2], 20_000, 70_000);
        assert_eq!(result.kib_per_session, 50.0);
        // Memory that shrank is no growth, not a negative cost.
        assert_eq!(HoldResult::new(10, vec![1], 500, 400).kib_per_session, 0.0);
    }

    #[test]
    fn a_missing_process_is_an_error_naming_it() {
        let err = total_rss_kib(&[u32::MAX]).unwrap_err();
        assert!(err.to_string().contains(&u32::MAX.to_string()), "{err}");
    }
}

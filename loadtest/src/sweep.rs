//! The experiment: for each concurrency level, that many clients start
//! together behind a gate, each runs one full connection, and every one of
//! them ends as a record — success or classified failure, never dropped.
//!
//! With a comparison endpoint the same level runs against both, one after the
//! other, and the order alternates from level to level (target first on the
//! 1st, 3rd, … level, comparison first on the others) so that a machine
//! getting slower or faster during the run does not favour one side.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::client::{
    self, ClientKind, ConnectionRecord, Credential, Failure, FailureKind, Job, Outcome, Step,
    Timeline,
};
use crate::scrape::{self, PhaseMean, Totals};
use crate::stats::{LevelSummary, Ratio};

/// Label of the endpoint under test in records and tables.
pub const TARGET: &str = "target";
/// Label of the comparison endpoint (`--compare`).
pub const COMPARE: &str = "compare";

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("no concurrency levels given")]
    NoLevels,
    #[error("level 0 makes no sense: every level needs at least one client")]
    ZeroLevel,
    #[error("endpoint {0} has no user credentials")]
    NoCredentials(String),
    #[error("{0}")]
    Kex(String),
    #[error(
        "--fresh-users needs one user per client over the whole sweep: {needed} clients, but endpoint {endpoint} has {available} users"
    )]
    NotEnoughFreshUsers {
        endpoint: String,
        needed: usize,
        available: usize,
    },
}

/// An SSH endpoint and the logins clients use there. Clients take the
/// credentials in turn (client `i` of a level uses credential `i mod n`), or
/// with fresh users each client of the whole sweep takes the next unused one.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub label: String,
    /// `host:port`.
    pub addr: String,
    pub credentials: Vec<Credential>,
}

#[derive(Clone, Debug)]
pub struct SweepConfig {
    pub target: Endpoint,
    pub compare: Option<Endpoint>,
    pub levels: Vec<u32>,
    pub command: String,
    pub client: ClientKind,
    /// Limit on each connection, from its start to its close.
    pub timeout: Duration,
    /// Every client is a different user, never reused across levels.
    pub fresh_users: bool,
    /// `/metrics` URLs scraped before and after each level at the target.
    pub metrics: Vec<String>,
    pub metrics_timeout: Duration,
    /// The `ssh` binary for the OpenSSH client kind.
    pub ssh_binary: PathBuf,
    /// The one key exchange both client kinds offer (`None`: their defaults).
    pub kex: Option<String>,
    /// Quiet time between two runs, so one level's teardown does not weigh
    /// on the next level's connects.
    pub pause: Duration,
    /// Draw a progress bar on stderr (only if stderr is a terminal).
    pub progress: bool,
}

impl SweepConfig {
    /// A configuration with the defaults the command line uses.
    pub fn new(target: Endpoint, levels: Vec<u32>, command: impl Into<String>) -> Self {
        SweepConfig {
            target,
            compare: None,
            levels,
            command: command.into(),
            client: ClientKind::Russh,
            timeout: Duration::from_secs(60),
            fresh_users: false,
            metrics: Vec::new(),
            metrics_timeout: Duration::from_secs(5),
            ssh_binary: PathBuf::from("ssh"),
            kex: Some(client::DEFAULT_KEX.to_owned()),
            pause: Duration::from_millis(500),
            progress: false,
        }
    }

    fn russh_config(&self) -> Result<Arc<::russh::client::Config>, SweepError> {
        client::russh::config(self.kex.as_deref()).map_err(SweepError::Kex)
    }

    pub fn validate(&self) -> Result<(), SweepError> {
        if self.levels.is_empty() {
            return Err(SweepError::NoLevels);
        }
        if self.levels.contains(&0) {
            return Err(SweepError::ZeroLevel);
        }
        self.russh_config()?;
        let needed: usize = self.levels.iter().map(|&l| l as usize).sum();
        for ep in std::iter::once(&self.target).chain(self.compare.as_ref()) {
            if ep.credentials.is_empty() {
                return Err(SweepError::NoCredentials(ep.addr.clone()));
            }
            if self.fresh_users && ep.credentials.len() < needed {
                return Err(SweepError::NotEnoughFreshUsers {
                    endpoint: ep.addr.clone(),
                    needed,
                    available: ep.credentials.len(),
                });
            }
        }
        Ok(())
    }
}

/// One level at one endpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LevelResult {
    pub summary: LevelSummary,
    /// Wall time from the gate's release to the last client's end.
    pub wall_ms: f64,
    /// Mean server-side time per phase during this level (target only, when
    /// `--metrics` was given).
    pub server_phases: Vec<PhaseMean>,
    /// Increase of `envgate_connections_total` per result during this level.
    pub server_connections: BTreeMap<String, f64>,
    /// Why the server-side figures are missing, if they are.
    pub scrape_error: Option<String>,
}

/// Target against comparison at one level.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub level: u32,
    /// Turnaround, target / comparison.
    pub turnaround: Option<Ratio>,
    /// Mean of each client-side step, target / comparison.
    pub step_means: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepResult {
    pub command: String,
    pub client: ClientKind,
    /// The pinned key exchange, if any.
    pub kex: Option<String>,
    pub target: String,
    pub compare: Option<String>,
    pub levels: Vec<LevelResult>,
    pub comparisons: Vec<Comparison>,
    pub records: Vec<ConnectionRecord>,
}

impl SweepResult {
    /// The level results of one endpoint, in level order.
    pub fn levels_of<'a>(
        &'a self,
        endpoint: &'a str,
    ) -> impl Iterator<Item = &'a LevelResult> + 'a {
        self.levels
            .iter()
            .filter(move |l| l.summary.endpoint == endpoint)
    }

    pub fn failures(&self) -> usize {
        self.records.iter().filter(|r| !r.succeeded()).count()
    }
}

/// Holds every client of a level until all of them are ready, then lets them
/// go at the same instant (a watch channel wakes all waiters at once).
pub struct StartGate {
    expected: usize,
    arrived: AtomicUsize,
    release: watch::Sender<Option<Instant>>,
}

impl StartGate {
    pub fn new(expected: usize) -> Self {
        StartGate {
            expected,
            arrived: AtomicUsize::new(0),
            release: watch::Sender::new(None),
        }
    }

    /// Waits until all `expected` clients arrived and returns the release
    /// instant. If the others do not arrive within `limit` the caller goes
    /// anyway (its start offset then shows the delay).
    pub async fn arrive_and_wait(&self, limit: Duration) -> Instant {
        let mut rx = self.release.subscribe();
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 >= self.expected {
            self.release.send_replace(Some(Instant::now()));
        }
        match tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await {
            Ok(Ok(released)) => released.expect("wait_for returned a released gate"),
            _ => Instant::now(),
        }
    }

    pub fn arrived(&self) -> usize {
        self.arrived.load(Ordering::Acquire)
    }
}

/// Runs the whole sweep. The library entry point: the command line and the
/// fleet test both call this.
pub async fn run_sweep(config: &SweepConfig) -> Result<SweepResult, SweepError> {
    config.validate()?;
    let russh_config = config.russh_config()?;
    let per_level = if config.compare.is_some() { 2 } else { 1 };
    let total: u64 = config
        .levels
        .iter()
        .map(|&l| u64::from(l) * per_level)
        .sum();
    let progress = progress_bar(config.progress, total);

    let mut levels = Vec::new();
    let mut comparisons = Vec::new();
    let mut records = Vec::new();
    let mut first_credential = 0usize;
    for (i, &level) in config.levels.iter().enumerate() {
        let mut order: Vec<&Endpoint> = std::iter::once(&config.target)
            .chain(config.compare.as_ref())
            .collect();
        if i % 2 == 1 {
            order.reverse();
        }
        let mut summaries = BTreeMap::new();
        for endpoint in order {
            progress.set_message(format!("{} level {level}", endpoint.label));
            let scrape = endpoint.label == TARGET && !config.metrics.is_empty();
            let before = if scrape {
                Some(scrape::scrape_all(&config.metrics, config.metrics_timeout).await)
            } else {
                None
            };
            let started = Instant::now();
            let level_records = run_level(
                config,
                &russh_config,
                endpoint,
                level,
                first_credential,
                &progress,
            )
            .await;
            let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
            // The servers record teardown and count a connection after its client has
            // gone, so the quiet time comes before the second scrape, not after it.
            tokio::time::sleep(config.pause).await;
            let after = if scrape {
                Some(scrape::scrape_all(&config.metrics, config.metrics_timeout).await)
            } else {
                None
            };
            let (server_phases, server_connections, scrape_error) = server_side(before, after);

            let refs: Vec<&ConnectionRecord> = level_records.iter().collect();
            let summary = LevelSummary::of(&endpoint.label, level, &refs);
            summaries.insert(endpoint.label.clone(), summary.clone());
            levels.push(LevelResult {
                summary,
                wall_ms,
                server_phases,
                server_connections,
                scrape_error,
            });
            records.extend(level_records);
        }
        if let (Some(t), Some(c)) = (summaries.get(TARGET), summaries.get(COMPARE)) {
            comparisons.push(compare(level, t, c));
        }
        first_credential += level as usize;
    }
    progress.finish_and_clear();
    // Keep the table in level order with the target first, whatever the run order was.
    levels.sort_by(|a, b| {
        (a.summary.level, a.summary.endpoint != TARGET)
            .cmp(&(b.summary.level, b.summary.endpoint != TARGET))
    });
    Ok(SweepResult {
        command: config.command.clone(),
        client: config.client,
        kex: config.kex.clone(),
        target: config.target.addr.clone(),
        compare: config.compare.as_ref().map(|c| c.addr.clone()),
        levels,
        comparisons,
        records,
    })
}

type ServerSide = (Vec<PhaseMean>, BTreeMap<String, f64>, Option<String>);

fn server_side(
    before: Option<Result<Totals, scrape::ScrapeError>>,
    after: Option<Result<Totals, scrape::ScrapeError>>,
) -> ServerSide {
    match (before, after) {
        (Some(Ok(b)), Some(Ok(a))) => (
            scrape::delta_means(&b, &a),
            scrape::connection_deltas(&b, &a),
            None,
        ),
        (Some(Err(e)), _) | (_, Some(Err(e))) => (Vec::new(), BTreeMap::new(), Some(e.to_string())),
        _ => (Vec::new(), BTreeMap::new(), None),
    }
}

fn compare(level: u32, target: &LevelSummary, baseline: &LevelSummary) -> Comparison {
    let turnaround = match (&target.turnaround, &baseline.turnaround) {
        (Some(t), Some(b)) => Some(t.ratio(b)),
        _ => None,
    };
    let step_means = target
        .steps
        .iter()
        .filter_map(|(name, t)| {
            let b = baseline.steps.get(name)?;
            (b.mean > 0.0).then(|| (name.clone(), t.mean / b.mean))
        })
        .collect();
    Comparison {
        level,
        turnaround,
        step_means,
    }
}

fn progress_bar(enabled: bool, total: u64) -> ProgressBar {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} {msg:>18} [{bar:40}] {pos}/{len} connections {elapsed}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Runs one level at one endpoint: `level` clients released together.
/// Returns exactly `level` records, ordered by client index.
async fn run_level(
    config: &SweepConfig,
    russh_config: &Arc<::russh::client::Config>,
    endpoint: &Endpoint,
    level: u32,
    first_credential: usize,
    progress: &ProgressBar,
) -> Vec<ConnectionRecord> {
    let gate = Arc::new(StartGate::new(level as usize));
    let mut tasks = JoinSet::new();
    for index in 0..level {
        let slot = if config.fresh_users {
            first_credential + index as usize
        } else {
            index as usize
        };
        let credential = endpoint.credentials[slot % endpoint.credentials.len()].clone();
        let job = Job {
            addr: endpoint.addr.clone(),
            credential,
            command: config.command.clone(),
            timeout: config.timeout,
            kex: config.kex.clone(),
        };
        let gate = gate.clone();
        let russh_config = russh_config.clone();
        let ssh = config.ssh_binary.clone();
        let kind = config.client;
        let label = endpoint.label.clone();
        let progress = progress.clone();
        let gate_limit = config.timeout;
        tasks.spawn(async move {
            let released = gate.arrive_and_wait(gate_limit).await;
            let start_offset = released.elapsed();
            let run = async {
                match kind {
                    ClientKind::Russh => client::russh::run(&job, russh_config).await,
                    ClientKind::Openssh => client::openssh::run(&job, &ssh).await,
                }
            };
            let outcome = std::panic::AssertUnwindSafe(run)
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    let timeline = Timeline::start();
                    Outcome {
                        total: Duration::ZERO,
                        timeline,
                        exit_status: None,
                        output_bytes: 0,
                        failure: Some(Failure::new(
                            FailureKind::ClientError,
                            Step::Connect,
                            format!("client panicked: {message}"),
                        )),
                    }
                });
            progress.inc(1);
            ConnectionRecord::from_outcome(
                &label,
                level,
                index,
                kind,
                &job.credential.user,
                start_offset,
                &outcome,
            )
        });
    }
    let mut records = Vec::with_capacity(level as usize);
    while let Some(joined) = tasks.join_next().await {
        // The task body catches panics itself; a join error can only be a
        // cancellation, which nothing here does.
        if let Ok(record) = joined {
            records.push(record);
        }
    }
    records.sort_by_key(|r| r.index);
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gate_releases_all_clients_together() {
        let n = 50;
        let gate = Arc::new(StartGate::new(n));
        let mut tasks = JoinSet::new();
        for i in 0..n {
            let gate = gate.clone();
            tasks.spawn(async move {
                // Stagger arrivals so that an early release would show.
                tokio::time::sleep(Duration::from_millis(i as u64 * 2)).await;
                let released = gate.arrive_and_wait(Duration::from_secs(10)).await;
                let passed = Instant::now();
                (released, passed, gate.arrived())
            });
        }
        let mut results = Vec::new();
        while let Some(r) = tasks.join_next().await {
            results.push(r.unwrap());
        }
        assert_eq!(results.len(), n);
        let release = results[0].0;
        for (released, passed, arrived_seen) in &results {
            assert_eq!(*released, release, "every client sees one release instant");
            assert_eq!(*arrived_seen, n, "nobody passes before all arrived");
            assert!(*passed >= release);
            assert!(
                passed.duration_since(release) < Duration::from_secs(2),
                "released together, not one by one"
            );
        }
    }

    #[tokio::test]
    async fn gate_gives_up_waiting_for_missing_clients() {
        let gate = StartGate::new(2);
        let before = Instant::now();
        gate.arrive_and_wait(Duration::from_millis(50)).await;
        assert!(before.elapsed() >= Duration::from_millis(50));
        assert_eq!(gate.arrived(), 1);
    }

    fn credential(user: &str) -> Credential {
        let key = russh::keys::PrivateKey::from(
            russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[7; 32]),
        );
        Credential {
            user: user.into(),
            key_path: PathBuf::from("/nonexistent"),
            key: Arc::new(key),
        }
    }

    fn endpoint(addr: &str, users: usize) -> Endpoint {
        Endpoint {
            label: TARGET.into(),
            addr: addr.into(),
            credentials: (0..users).map(|i| credential(&format!("u{i}"))).collect(),
        }
    }

    #[test]
    fn validation_catches_bad_levels_and_too_few_fresh_users() {
        let mut config = SweepConfig::new(endpoint("127.0.0.1:1", 5), vec![1, 5], "date");
        assert!(config.validate().is_ok());
        config.fresh_users = true;
        assert!(matches!(
            config.validate(),
            Err(SweepError::NotEnoughFreshUsers {
                needed: 6,
                available: 5,
                ..
            })
        ));
        config.fresh_users = false;
        config.levels = vec![];
        assert!(matches!(config.validate(), Err(SweepError::NoLevels)));
        config.levels = vec![0];
        assert!(matches!(config.validate(), Err(SweepError::ZeroLevel)));
        config.levels = vec![1];
        config.kex = Some("sntrup761x25519-sha512".into());
        assert!(
            matches!(config.validate(), Err(SweepError::Kex(_))),
            "russh has no sntrup"
        );
    }

    #[tokio::test]
    async fn refused_connections_are_recorded_and_classified() {
        // Bind then drop: nothing listens on this port afterwards.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut config = SweepConfig::new(
            endpoint(&format!("127.0.0.1:{port}"), 3),
            vec![1, 4],
            "date",
        );
        config.fresh_users = true;
        config.compare = Some(Endpoint {
            label: COMPARE.into(),
            ..endpoint(&format!("127.0.0.1:{port}"), 5)
        });
        config.pause = Duration::ZERO;
        config.timeout = Duration::from_secs(5);
        assert!(
            config.validate().is_err(),
            "3 fresh users cannot cover 5 clients"
        );
        config
            .target
            .credentials
            .extend((3..5).map(|i| credential(&format!("u{i}"))));
        let result = run_sweep(&config).await.unwrap();
        assert_eq!(
            result.records.len(),
            10,
            "1+4 clients at each of two endpoints"
        );
        assert_eq!(result.failures(), 10);
        assert!(
            result
                .records
                .iter()
                .all(|r| r.failure == Some(FailureKind::ConnectRefused))
        );
        assert!(
            result
                .records
                .iter()
                .all(|r| r.failure_step == Some(Step::Connect))
        );
        // Fresh users: the level of 4 continues after the level of 1.
        let users: Vec<&str> = result
            .records
            .iter()
            .filter(|r| r.endpoint == TARGET && r.level == 4)
            .map(|r| r.user.as_str())
            .collect();
        assert_eq!(users, ["u1", "u2", "u3", "u4"]);
        let level4 = result
            .levels_of(TARGET)
            .find(|l| l.summary.level == 4)
            .unwrap();
        assert_eq!(level4.summary.failures[&FailureKind::ConnectRefused], 4);
        assert_eq!(level4.summary.turnaround, None);
        assert_eq!(result.levels.len(), 4);
        assert_eq!(result.levels[0].summary.endpoint, TARGET);
        assert_eq!(result.comparisons.len(), 2);
    }
}

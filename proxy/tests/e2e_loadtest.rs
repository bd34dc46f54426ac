//! End to end: `envgate-loadtest`'s sweep (levels 1 and 5, in-process russh
//! clients) through HAProxy into the real binaries: no failed connection, and
//! every phase histogram of the proxy and the control plane moved.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use envgate_loadtest::report::summary_table;
use envgate_loadtest::sweep::{Endpoint, SweepConfig, TARGET, run_sweep};
use envgate_loadtest::users;
use support::{Fleet, FleetOptions, eventually};

/// Every phase series a user's connections pass through: the first one
/// (token cache miss, container created) or a later one (cache hit), as
/// `phase{labels}` prefixes (`exec_start` carries the data path as its label).
const PHASES: [&str; 9] = [
    "accept",
    "auth{cache=hit}",
    "auth{cache=miss}",
    "placement{result=ok}",
    "placement{outcome=created}",
    "container_create{outcome=ok}",
    "exec_start{path=",
    "session",
    "teardown",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_sweep_succeeds_and_moves_every_phase() {
    // One proxy, so a user's second connection finds its token in that proxy's cache.
    let fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        ..FleetOptions::default()
    })
    .await;
    let mut credentials = vec![users::credential("demo", &fleet.key_of("demo")).expect("demo key")];
    for name in ["lt1", "lt2"] {
        let key = fleet.add_user(name, "busybox", None).await;
        credentials.push(users::credential(name, &key).expect("generated key"));
    }
    // Level 1: demo (cache miss, container created). Level 5: demo, lt1, lt2, demo, lt1 —
    // demo's token is cached by then, lt1 and lt2 get containers.
    let target = Endpoint {
        label: TARGET.into(),
        addr: format!("127.0.0.1:{}", fleet.ssh_port),
        credentials,
    };
    let mut config = SweepConfig::new(target, vec![1, 5], "date");
    config.metrics = std::iter::once(&fleet.controlplane_ops)
        .chain(&fleet.proxy_ops)
        .map(|addr| format!("http://{addr}/metrics"))
        .collect();
    config.timeout = Duration::from_secs(60);
    let result = run_sweep(&config).await.expect("sweep runs");
    let table = summary_table(&result);

    assert_eq!(result.records.len(), 6, "{table}");
    assert_eq!(result.failures(), 0, "{table}");
    assert!(
        result
            .records
            .iter()
            .all(|r| r.output_bytes > 0 && r.exit_status == Some(0)),
        "every client read `date`'s output and exit status 0:\n{table}"
    );

    let mut observed: BTreeMap<String, f64> = BTreeMap::new();
    for level in result.levels_of(TARGET) {
        assert_eq!(level.scrape_error, None, "{table}");
        for phase in &level.server_phases {
            *observed.entry(phase.key()).or_default() += phase.count;
        }
    }
    let still: Vec<&str> = PHASES
        .into_iter()
        .filter(|p| {
            let moved: f64 = observed
                .iter()
                .filter(|(key, _)| key.starts_with(*p))
                .map(|(_, count)| count)
                .sum();
            moved < 1.0
        })
        .collect();
    assert!(
        still.is_empty(),
        "phases that did not move: {still:?}; observed {observed:?}\n{table}"
    );
    // Connections are counted by result once the proxy is done with them.
    let proxy_ops = fleet.proxy_ops[0].clone();
    eventually(
        Duration::from_secs(15),
        "6 connections counted ok",
        || async {
            let body = Fleet::metrics(&proxy_ops).await.ok_or("no /metrics")?;
            let line = r#"envgate_connections_total{result="ok"} 6"#;
            if body.lines().any(|l| l == line) {
                Ok(())
            } else {
                Err(format!("no line {line} in:\n{body}"))
            }
        },
    )
    .await;
}

//! End to end: an operator can see each phase of a connection in the Prometheus metrics.

mod support;

use std::time::Duration;

use support::{Fleet, FleetOptions, eventually};

/// The `phase` labels of `envgate_phase_duration_seconds` series in a Prometheus text body.
fn phases(body: &str) -> Vec<String> {
    body.lines()
        .filter(|l| l.starts_with("envgate_phase_duration_seconds"))
        .filter_map(|l| l.split("phase=\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_phase_of_a_connection_is_in_the_metrics() {
    // One proxy, so the connection's phases are all in one proxy's metrics.
    let fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        ..FleetOptions::default()
    })
    .await;
    fleet.ssh("demo", "true", None).await.assert_success();
    let proxy_ops = fleet.proxy_ops[0].clone();
    eventually(
        Duration::from_secs(15),
        "proxy phases accept, auth, exec_start, session, teardown",
        || async {
            let body = Fleet::metrics(&proxy_ops).await.ok_or("no /metrics")?;
            let seen = phases(&body);
            let missing: Vec<_> = ["accept", "auth", "exec_start", "session", "teardown"]
                .into_iter()
                .filter(|p| !seen.iter().any(|s| s == p))
                .collect();
            if missing.is_empty() && body.contains("envgate_connections_total") {
                Ok(())
            } else {
                Err(format!("missing {missing:?} in:\n{body}"))
            }
        },
    )
    .await;
    let body = Fleet::metrics(&fleet.controlplane_ops)
        .await
        .expect("control plane /metrics");
    let seen = phases(&body);
    for phase in ["placement", "container_create"] {
        assert!(
            seen.iter().any(|s| s == phase),
            "control plane metrics lack phase {phase}:\n{body}"
        );
    }
}

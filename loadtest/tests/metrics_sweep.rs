//! `--metrics`: the sweep scrapes every URL before and after each level and
//! reports the per-level mean of each phase, summed over the processes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use envgate_loadtest::sweep::{Endpoint, SweepConfig, TARGET, run_sweep};
use envgate_loadtest::{Credential, FailureKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A /metrics endpoint whose auth histogram grows by one 10 ms observation
/// per scrape, like a process that served one connection in between.
async fn growing_metrics() -> (String, Arc<AtomicU32>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let scrapes = Arc::new(AtomicU32::new(0));
    let counter = scrapes.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            let k = counter.fetch_add(1, Ordering::SeqCst);
            let body = format!(
                "# TYPE envgate_phase_duration_seconds histogram\n\
                 envgate_phase_duration_seconds_sum{{phase=\"auth\",cache=\"miss\"}} {}\n\
                 envgate_phase_duration_seconds_count{{phase=\"auth\",cache=\"miss\"}} {k}\n\
                 envgate_connections_total{{result=\"ok\"}} {k}\n",
                f64::from(k) * 0.010
            );
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(reply.as_bytes()).await;
        }
    });
    (url, scrapes)
}

fn nowhere() -> (Endpoint, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let key = russh::keys::PrivateKey::from(
        russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[1; 32]),
    );
    let credential = Credential {
        user: "demo".into(),
        key_path: "/nonexistent".into(),
        key: Arc::new(key),
    };
    (
        Endpoint {
            label: TARGET.into(),
            addr: format!("127.0.0.1:{port}"),
            credentials: vec![credential],
        },
        port,
    )
}

#[tokio::test]
async fn phase_means_per_level_from_two_processes() {
    let (proxy, proxy_scrapes) = growing_metrics().await;
    let (controlplane, _) = growing_metrics().await;
    let (target, _) = nowhere();
    let mut config = SweepConfig::new(target, vec![1, 3], "date");
    config.metrics = vec![proxy, controlplane];
    config.pause = Duration::ZERO;
    let result = run_sweep(&config).await.unwrap();

    assert_eq!(
        proxy_scrapes.load(Ordering::SeqCst),
        4,
        "before and after each of two levels"
    );
    assert_eq!(result.records.len(), 4);
    assert!(
        result
            .records
            .iter()
            .all(|r| r.failure == Some(FailureKind::ConnectRefused))
    );
    for level in &result.levels {
        assert_eq!(level.scrape_error, None);
        assert_eq!(level.server_phases.len(), 1, "{:?}", level.server_phases);
        let auth = &level.server_phases[0];
        assert_eq!(
            (auth.phase.as_str(), auth.labels.as_str()),
            ("auth", "cache=miss")
        );
        assert_eq!(auth.count, 2.0, "one observation in each process");
        assert!((auth.mean_ms - 10.0).abs() < 1e-6, "{auth:?}");
        assert_eq!(level.server_connections["ok"], 2.0);
    }
}

#[tokio::test]
async fn an_unreachable_metrics_url_is_reported_not_fatal() {
    let (target, port) = nowhere();
    let mut config = SweepConfig::new(target, vec![2], "date");
    config.metrics = vec![format!("http://127.0.0.1:{port}/metrics")];
    config.pause = Duration::ZERO;
    let result = run_sweep(&config).await.unwrap();
    assert_eq!(result.records.len(), 2, "the level ran anyway");
    let error = result.levels[0]
        .scrape_error
        .as_deref()
        .expect("the scrape failure is recorded");
    assert!(error.contains(&port.to_string()), "{error}");
    assert!(result.levels[0].server_phases.is_empty());
}

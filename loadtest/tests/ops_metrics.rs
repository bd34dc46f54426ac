//! The scraper against the real ops endpoint both envgate binaries serve
//! (`envgate_proto::ops`), with phases recorded through `record_phase`.

use std::time::Duration;

use envgate_loadtest::scrape;
use envgate_proto::ops;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn phase_means_from_the_real_exporter() {
    let handle = ops::init_metrics();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(ops::serve_ops(
        listener,
        handle,
        ops::Readiness::default(),
        shutdown.clone(),
    ));

    ops::record_phase(
        "auth",
        Duration::from_millis(5),
        &[("cache", "hit".to_owned())],
    );
    let urls = [url];
    let before = scrape::scrape_all(&urls, Duration::from_secs(5))
        .await
        .unwrap();

    for _ in 0..3 {
        ops::record_phase(
            "auth",
            Duration::from_millis(20),
            &[("cache", "miss".to_owned())],
        );
    }
    ops::record_phase("placement", Duration::from_millis(100), &[]);
    ops::record_phase(
        "exec_start",
        Duration::from_millis(70),
        &[("path", "runtime_exec".to_owned())],
    );
    let after = scrape::scrape_all(&urls, Duration::from_secs(5))
        .await
        .unwrap();

    let means = scrape::delta_means(&before, &after);
    let find = |key: &str| {
        means
            .iter()
            .find(|m| m.key() == key)
            .unwrap_or_else(|| panic!("{key} in {means:?}"))
    };
    let miss = find("auth{cache=miss}");
    assert_eq!(miss.count, 3.0);
    assert!((miss.mean_ms - 20.0).abs() < 0.01, "{miss:?}");
    assert!((find("placement").mean_ms - 100.0).abs() < 0.01);
    assert!((find("exec_start{path=runtime_exec}").mean_ms - 70.0).abs() < 0.01);
    assert!(
        means.iter().all(|m| m.key() != "auth{cache=hit}"),
        "no new cache hits during the level: {means:?}"
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

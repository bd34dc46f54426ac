//! Sweeps against a real OpenSSH `sshd` that the test starts itself with
//! `deploy/local/floor-sshd` on a free loopback port.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use envgate_loadtest::client::Step;
use envgate_loadtest::sweep::{COMPARE, Endpoint, SweepConfig, TARGET, run_sweep};
use envgate_loadtest::{ClientKind, FailureKind, SweepResult, plot, report, users};

const FLOOR_SSHD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/floor-sshd");

/// A running floor sshd, stopped on drop.
struct FloorSshd {
    dir: PathBuf,
    addr: String,
    user: String,
}

impl FloorSshd {
    fn start(dir: &Path, keys: &Path) -> FloorSshd {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = dir.join("floor");
        let out = Command::new("bash")
            .arg(FLOOR_SSHD)
            .args(["start", "--dir"])
            .arg(&dir)
            .args(["--port", &port.to_string(), "--keys"])
            .arg(keys)
            .output()
            .expect("run floor-sshd");
        assert!(
            out.status.success(),
            "floor-sshd start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let mut words = stdout.split_whitespace();
        let addr = words.next().unwrap().to_owned();
        let user = words.next().unwrap().to_owned();
        assert_eq!(addr, format!("127.0.0.1:{port}"));
        FloorSshd { dir, addr, user }
    }

    fn endpoint(&self, label: &str, keys: &Path, count: usize) -> Endpoint {
        let credentials = users::credentials_from_dir(keys, count).unwrap();
        Endpoint {
            label: label.into(),
            addr: self.addr.clone(),
            credentials: users::as_user(&credentials, &self.user),
        }
    }
}

impl Drop for FloorSshd {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(FLOOR_SSHD)
            .args(["stop", "--dir"])
            .arg(&self.dir)
            .status();
    }
}

fn config(target: Endpoint, client: ClientKind, command: &str) -> SweepConfig {
    let mut config = SweepConfig::new(target, vec![1, 5], command);
    config.client = client;
    config.timeout = Duration::from_secs(60);
    config.pause = Duration::from_millis(100);
    config
}

fn assert_all_succeeded(result: &SweepResult, endpoints: usize) {
    assert_eq!(
        result.records.len(),
        6 * endpoints,
        "1 + 5 clients per endpoint"
    );
    let failed: Vec<_> = result.records.iter().filter(|r| !r.succeeded()).collect();
    assert!(failed.is_empty(), "failures: {failed:#?}");
    for r in &result.records {
        assert_eq!(r.exit_status, Some(0));
        assert!(r.output_bytes > 0, "the command's output arrived: {r:?}");
        assert!(r.total_ms > 0.0);
        assert!(
            r.start_offset_ms < 2000.0,
            "the clients started together: {r:?}"
        );
    }
    for level in &result.levels {
        let t = level
            .summary
            .turnaround
            .expect("successful connections have a turnaround");
        assert!(t.min <= t.p50 && t.p50 <= t.p90 && t.p90 <= t.max);
        assert_eq!(level.summary.succeeded, level.summary.level as usize);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn russh_sweep_against_sshd_with_comparison() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    users::generate(&keys, "lt", 5).unwrap();
    let sshd = FloorSshd::start(tmp.path(), &keys);

    let mut config = config(
        sshd.endpoint(TARGET, &keys, 5),
        ClientKind::Russh,
        "echo loadtest-ok",
    );
    config.compare = Some(sshd.endpoint(COMPARE, &keys, 5));
    let result = run_sweep(&config).await.unwrap();
    assert_all_succeeded(&result, 2);

    for r in &result.records {
        // Output: "loadtest-ok\n" is 12 bytes.
        assert_eq!(r.output_bytes, 12, "{r:?}");
        let steps: Vec<f64> = r
            .steps()
            .iter()
            .map(|(name, v)| v.unwrap_or_else(|| panic!("{name} missing: {r:?}")))
            .collect();
        assert!(steps.iter().all(|&v| v >= 0.0));
        let sum: f64 = steps.iter().sum();
        assert!(
            sum <= r.total_ms + 0.001,
            "steps add up to at most the turnaround: {sum} > {}",
            r.total_ms
        );
        assert!(
            sum >= r.total_ms * 0.9,
            "the steps cover the turnaround: {sum} vs {}",
            r.total_ms
        );
        assert!(r.handshake_ms.unwrap() > 0.0 && r.auth_ms.unwrap() > 0.0);
    }
    // Five clients spread over five users.
    let level5: Vec<&str> = result
        .records
        .iter()
        .filter(|r| r.level == 5 && r.endpoint == TARGET)
        .map(|r| r.user.as_str())
        .collect();
    assert_eq!(level5.len(), 5);
    assert_eq!(result.comparisons.len(), 2);
    for c in &result.comparisons {
        let ratio = c.turnaround.expect("both sides succeeded");
        assert!(ratio.mean.unwrap() > 0.0);
        assert!(c.step_means.contains_key("handshake"));
    }

    // Everything a user of the tool gets: files, plots, table.
    let out = tmp.path().join("out");
    report::write_results(&out, &result).unwrap();
    assert_eq!(
        report::read_csv(&out.join(report::RECORDS_CSV)).unwrap(),
        result.records
    );
    let plots = plot::write_plots(&out, &result, None).unwrap();
    assert!(plots.iter().any(|p| p.ends_with("turnaround.png")));
    assert!(plots.iter().any(|p| p.ends_with("client_steps.svg")));
    let table = report::summary_table(&result);
    assert!(table.lines().any(|l| l.starts_with("ratio")), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_sweep_against_sshd() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    users::generate(&keys, "lt", 2).unwrap();
    let sshd = FloorSshd::start(tmp.path(), &keys);

    let result = run_sweep(&config(
        sshd.endpoint(TARGET, &keys, 2),
        ClientKind::Openssh,
        "date",
    ))
    .await
    .unwrap();
    assert_all_succeeded(&result, 1);
    for r in &result.records {
        assert_eq!(r.client, ClientKind::Openssh);
        assert_eq!(
            r.handshake_ms, None,
            "the ssh binary only shows the turnaround"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_classified_against_sshd() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    users::generate(&keys, "lt", 1).unwrap();
    let sshd = FloorSshd::start(tmp.path(), &keys);
    // A key sshd does not know.
    let stranger_dir = tmp.path().join("stranger");
    users::generate(&stranger_dir, "st", 1).unwrap();

    for client in [ClientKind::Russh, ClientKind::Openssh] {
        let mut exit3 = config(
            sshd.endpoint(TARGET, &keys, 1),
            client,
            "echo failing >&2; exit 3",
        );
        exit3.levels = vec![2];
        let result = run_sweep(&exit3).await.unwrap();
        assert_eq!(result.records.len(), 2);
        for r in &result.records {
            assert_eq!(
                r.failure,
                Some(FailureKind::NonZeroExit),
                "{client:?}: {r:?}"
            );
            assert_eq!(r.exit_status, Some(3));
            assert!(r.failure_detail.contains("exit status 3: failing"), "{r:?}");
        }
        assert_eq!(
            result.levels[0].summary.failures[&FailureKind::NonZeroExit],
            2
        );

        let mut rejected = config(sshd.endpoint(TARGET, &stranger_dir, 1), client, "date");
        rejected.levels = vec![1];
        let result = run_sweep(&rejected).await.unwrap();
        let r = &result.records[0];
        assert_eq!(
            r.failure,
            Some(FailureKind::AuthRejected),
            "{client:?}: {r:?}"
        );
        if client == ClientKind::Russh {
            assert_eq!(r.failure_step, Some(Step::Auth));
            assert!(r.handshake_ms.is_some() && r.auth_ms.is_none());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_keys_log_in_with_a_sha2_signature() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let rsa = keys.join("rsa");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f"])
        .arg(&rsa)
        .status()
        .expect("run ssh-keygen");
    assert!(keygen.success());
    let sshd = FloorSshd::start(tmp.path(), &keys);
    let target = Endpoint {
        label: TARGET.into(),
        addr: sshd.addr.clone(),
        credentials: vec![users::credential(&sshd.user, &rsa).unwrap()],
    };
    let result = run_sweep(&config(target, ClientKind::Russh, "date"))
        .await
        .unwrap();
    assert_all_succeeded(&result, 1);
}

//! The binary as an operator runs it: `sweep` against a floor sshd with a
//! comparison, then `report` on its output directory.

use std::path::Path;
use std::process::Command;

use envgate_loadtest::users;

const FLOOR_SSHD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/floor-sshd");
const BIN: &str = env!("CARGO_BIN_EXE_envgate-loadtest");

fn floor(action: &str, dir: &Path, extra: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(FLOOR_SSHD)
        .arg(action)
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "floor-sshd {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

struct Stop<'a>(&'a Path);
impl Drop for Stop<'_> {
    fn drop(&mut self) {
        floor("stop", self.0, &[]);
    }
}

#[test]
fn sweep_then_report_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    users::generate(&keys, "lt", 3).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let floor_dir = tmp.path().join("floor");
    let started = floor(
        "start",
        &floor_dir,
        &["--port", &port, "--keys", keys.to_str().unwrap()],
    );
    let _stop = Stop(&floor_dir);
    let mut words = started.split_whitespace();
    let addr = words.next().unwrap().to_owned();
    let user = words.next().unwrap().to_owned();
    let out_dir = tmp.path().join("out");

    // Flags from the environment, as documented.
    let sweep = Command::new(BIN)
        .arg("sweep")
        .env("ENVGATE_LOADTEST_TARGET", &addr)
        .env("ENVGATE_LOADTEST_LEVELS", "1,3")
        .env("ENVGATE_LOADTEST_COMMAND", "echo hello")
        .env("ENVGATE_LOADTEST_KEY_DIR", &keys)
        .args([
            "--users",
            "3",
            "--compare",
            &addr,
            "--compare-user",
            &user,
            "--pause-ms",
            "100",
            "--timeout",
            "60",
        ])
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&sweep.stdout);
    let stderr = String::from_utf8_lossy(&sweep.stderr);
    // The target logs in as lt000N, whom this sshd does not know: every target
    // connection is refused at auth, every comparison connection works.
    assert_eq!(
        sweep.status.code(),
        Some(2),
        "failures give exit status 2\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("auth_rejected=1"), "{stdout}");
    assert!(stdout.contains("auth_rejected=3"), "{stdout}");
    assert!(stdout.contains("4 of 8 connections failed"), "{stdout}");
    let compare_rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("compare"))
        .collect();
    assert!(
        compare_rows
            .iter()
            .any(|l| l.split_whitespace().take(4).eq(["compare", "3", "3", "0"])),
        "{stdout}"
    );
    for file in [
        "connections.csv",
        "connections.json",
        "summary.json",
        "turnaround.png",
        "turnaround.svg",
    ] {
        assert!(out_dir.join(file).metadata().unwrap().len() > 0, "{file}");
    }

    let report = Command::new(BIN)
        .arg("report")
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let table = String::from_utf8_lossy(&report.stdout);
    assert!(table.contains("auth_rejected=3"), "{table}");

    let bad = Command::new(BIN)
        .args(["sweep", "--target", &addr])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("give either --user NAME --key FILE"));
}

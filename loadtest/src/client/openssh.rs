//! The OpenSSH client: spawns the real `ssh` binary for each connection, as
//! the study did (`ssh host date`), and times it from spawn to exit. Only the
//! turnaround and the exit status are visible from outside the process.

use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

use super::{Failure, FailureKind, Job, Outcome, Step, Timeline, first_line};

/// `ssh`'s own exit status when it failed (as opposed to the remote command's).
const SSH_ERROR_STATUS: i32 = 255;

/// The argument list for one connection: no user config, no agent, no
/// known_hosts, key-only, batch mode.
pub fn args(job: &Job) -> Vec<String> {
    let (host, port) = split_addr(&job.addr);
    let connect_timeout = job.timeout.as_secs().max(1);
    let mut args: Vec<String> = [
        "-F",
        "/dev/null",
        "-T",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityAgent=none",
        "-o",
        "PreferredAuthentications=publickey",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(kex) = &job.kex {
        args.extend(["-o".to_owned(), format!("KexAlgorithms={kex}")]);
    }
    args.extend([
        "-o".to_owned(),
        format!("ConnectTimeout={connect_timeout}"),
        "-i".to_owned(),
        job.credential.key_path.display().to_string(),
        "-p".to_owned(),
        port.to_owned(),
        "-l".to_owned(),
        job.credential.user.clone(),
        host.to_owned(),
        "--".to_owned(),
        job.command.clone(),
    ]);
    args
}

fn split_addr(addr: &str) -> (&str, &str) {
    match addr.rsplit_once(':') {
        Some((host, port)) => (host.trim_start_matches('[').trim_end_matches(']'), port),
        None => (addr, "22"),
    }
}

/// Runs one job with the `ssh` binary at `ssh`; the process is killed if it
/// outlives `job.timeout`.
pub async fn run(job: &Job, ssh: &Path) -> Outcome {
    let mut timeline = Timeline::start();
    let mut command = Command::new(ssh);
    command
        .args(args(job))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // fork+exec blocks for milliseconds on a loaded machine; done on the
    // async workers it would hold up every other client's reads (inflating
    // their turnaround), so it runs on the blocking pool.
    let spawned = match tokio::task::spawn_blocking(move || command.spawn()).await {
        Ok(spawned) => spawned,
        Err(e) => Err(std::io::Error::other(e.to_string())),
    };
    let outcome = match spawned {
        Err(e) => Err(Failure::new(
            FailureKind::ClientError,
            Step::Process,
            format!("cannot start {}: {e}", ssh.display()),
        )),
        Ok(child) => match tokio::time::timeout(job.timeout, child.wait_with_output()).await {
            Err(_) => Err(Failure::timeout(Step::Process)),
            Ok(Err(e)) => Err(Failure::new(
                FailureKind::ClientError,
                Step::Process,
                e.to_string(),
            )),
            Ok(Ok(output)) => Ok(output),
        },
    };
    timeline.mark(Step::Process);
    let total = timeline.elapsed();
    match outcome {
        Err(failure) => Outcome {
            timeline,
            total,
            exit_status: None,
            output_bytes: 0,
            failure: Some(failure),
        },
        Ok(output) => {
            let output_bytes = (output.stdout.len() + output.stderr.len()) as u64;
            let stderr = String::from_utf8_lossy(&output.stderr);
            let code = output.status.code();
            let failure = classify(code, &stderr);
            let exit_status = match code {
                Some(SSH_ERROR_STATUS) | None => None,
                Some(code) => Some(code as u32),
            };
            Outcome {
                timeline,
                total,
                exit_status,
                output_bytes,
                failure,
            }
        }
    }
}

/// Classifies an `ssh` run from its exit code and stderr. `ssh` exits 255 on
/// its own errors and otherwise with the remote command's status.
pub fn classify(code: Option<i32>, stderr: &str) -> Option<Failure> {
    let line = first_line(stderr);
    let kind = match code {
        Some(0) => return None,
        None => {
            return Some(Failure::new(
                FailureKind::ExitSignal,
                Step::Process,
                "ssh was killed by a signal",
            ));
        }
        Some(SSH_ERROR_STATUS) => {
            let text = stderr.to_ascii_lowercase();
            if text.contains("permission denied")
                || text.contains("too many authentication failures")
            {
                FailureKind::AuthRejected
            } else if text.contains("connection refused") {
                FailureKind::ConnectRefused
            } else if text.contains("timed out") {
                FailureKind::Timeout
            } else if text.contains("kex_exchange_identification")
                || text.contains("connection closed by")
                || text.contains("connection reset")
                || text.contains("no matching")
                || text.contains("host key verification failed")
            {
                FailureKind::HandshakeFailed
            } else if text.contains("channel") || text.contains("exec request failed") {
                FailureKind::ChannelError
            } else if text.contains("could not resolve")
                || text.contains("no route")
                || text.contains("network is unreachable")
            {
                FailureKind::ConnectError
            } else {
                FailureKind::ClientError
            }
        }
        Some(code) => {
            return Some(Failure::new(
                FailureKind::NonZeroExit,
                Step::Process,
                format!("exit status {code}: {line}"),
            ));
        }
    };
    Some(Failure::new(kind, Step::Process, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_ssh_failures_from_stderr() {
        let kind = |code, text: &str| classify(code, text).map(|f| f.kind);
        assert_eq!(kind(Some(0), ""), None);
        assert_eq!(
            kind(Some(255), "demo@127.0.0.1: Permission denied (publickey)."),
            Some(FailureKind::AuthRejected)
        );
        assert_eq!(
            kind(
                Some(255),
                "ssh: connect to host 127.0.0.1 port 1: Connection refused"
            ),
            Some(FailureKind::ConnectRefused)
        );
        assert_eq!(
            kind(
                Some(255),
                "ssh: connect to host 127.0.0.1 port 2222: Connection timed out"
            ),
            Some(FailureKind::Timeout)
        );
        assert_eq!(
            kind(
                Some(255),
                "kex_exchange_identification: read: Connection reset by peer"
            ),
            Some(FailureKind::HandshakeFailed)
        );
        assert_eq!(
            kind(Some(255), "something new"),
            Some(FailureKind::ClientError)
        );
        assert_eq!(kind(None, ""), Some(FailureKind::ExitSignal));
        let envgate = classify(
            Some(1),
            "envgate: unknown environment \"nope\"; available: busybox\n",
        )
        .unwrap();
        assert_eq!(envgate.kind, FailureKind::NonZeroExit);
        assert_eq!(
            envgate.detail,
            "exit status 1: envgate: unknown environment \"nope\"; available: busybox"
        );
    }

    #[test]
    fn arguments_pin_kex_and_keep_the_command_last() {
        let key = russh::keys::PrivateKey::from(
            russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[1; 32]),
        );
        let mut job = Job {
            addr: "127.0.0.1:2222".into(),
            credential: crate::client::Credential {
                user: "demo+debian".into(),
                key_path: "/keys/demo".into(),
                key: std::sync::Arc::new(key),
            },
            command: "date -u".into(),
            timeout: std::time::Duration::from_secs(30),
            kex: Some("curve25519-sha256".into()),
        };
        let a = args(&job);
        let joined = a.join(" ");
        assert!(
            joined.contains("-o KexAlgorithms=curve25519-sha256"),
            "{joined}"
        );
        assert!(joined.contains("-o ConnectTimeout=30"), "{joined}");
        assert!(
            joined.ends_with("-i /keys/demo -p 2222 -l demo+debian 127.0.0.1 -- date -u"),
            "{joined}"
        );
        job.kex = None;
        assert!(!args(&job).join(" ").contains("KexAlgorithms"));
    }

    #[test]
    fn splits_host_and_port() {
        assert_eq!(split_addr("127.0.0.1:2222"), ("127.0.0.1", "2222"));
        assert_eq!(split_addr("[::1]:22"), ("::1", "22"));
        assert_eq!(split_addr("host"), ("host", "22"));
    }
}

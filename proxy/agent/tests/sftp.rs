//! `envgate-agent sftp-server` against the real OpenSSH `sftp` client, connected directly
//! (`sftp -D`), in a scratch directory: every batch command a user types, byte-exact
//! transfers, the refusals they see, and garbage on the wire.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_envgate-agent");

/// Runs `sftp -b -` with `batch` in `dir`: (success, stdout, stderr).
fn sftp(dir: &Path, batch: &str) -> (bool, String, String) {
    let mut child = Command::new("sftp")
        .args(["-b", "-", "-D", &format!("{AGENT} sftp-server")])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the OpenSSH sftp client");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(batch.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn random_bytes(len: usize) -> Vec<u8> {
    // A fixed xorshift stream: incompressible enough, and the same every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn every_batch_command_works_and_transfers_are_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(5 * 1024 * 1024 + 17);
    std::fs::write(dir.path().join("local"), &data).unwrap();
    let (ok, out, err) = sftp(
        dir.path(),
        "put local up\n\
         get up down\n\
         mkdir d\n\
         rename up d/moved\n\
         chmod 640 d/moved\n\
         symlink d/moved ln\n\
         ls -l\n\
         ls -l d\n\
         rm ln\n\
         rename d/moved gone\n\
         rmdir d\n\
         ls\n",
    );
    assert!(ok, "{out}\n{err}");
    assert_eq!(std::fs::read(dir.path().join("down")).unwrap(), data);
    assert_eq!(std::fs::read(dir.path().join("gone")).unwrap(), data);
    // `ls -l` shows the server's long names: type letter, permissions, sizes, names.
    let listing: Vec<(String, String, String)> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 9)
        .map(|f| (f[0].to_owned(), f[4].to_owned(), f[f.len() - 1].to_owned()))
        .collect();
    let size = data.len().to_string();
    let expected = [
        (
            "drwxr-xr-x",
            listing.first().map_or("", |l| l.1.as_str()),
            "d",
        ),
        ("-rw-r--r--", &size, "down"),
        ("lrwxrwxrwx", "7", "ln"),
        ("-rw-r--r--", &size, "local"),
        ("-rw-r-----", &size, "moved"),
    ]
    .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()));
    assert_eq!(listing, expected, "{out}");
    assert!(out.ends_with("down   gone   local  \n"), "{out}");
}

#[test]
fn refusals_are_one_clear_line_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a"), "a").unwrap();
    std::fs::write(dir.path().join("b"), "b").unwrap();
    // `-` before a command: sftp goes on after it fails.
    let (ok, out, err) = sftp(
        dir.path(),
        "-get missing\n\
         -rename a b\n\
         -rmdir a\n\
         -mkdir a\n\
         -cd nowhere\n\
         get a copy\n",
    );
    assert!(ok, "{out}\n{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        [
            format!("File \"{}/missing\" not found.", real(dir.path())),
            format!(
                "remote rename \"{0}/a\" to \"{0}/b\": Failure",
                real(dir.path())
            ),
            format!("remote rmdir \"{}/a\": Failure", real(dir.path())),
            format!("remote mkdir \"{}/a\": Failure", real(dir.path())),
            format!(
                "realpath {}/nowhere: No such file or directory",
                real(dir.path())
            ),
        ],
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("copy")).unwrap(),
        "a"
    );
    assert_eq!(std::fs::read_to_string(dir.path().join("b")).unwrap(), "b");
}

fn real(path: &Path) -> String {
    std::fs::canonicalize(path).unwrap().display().to_string()
}

#[test]
fn garbage_on_the_wire_ends_the_server_without_a_crash() {
    for input in [
        random_bytes(100_000),
        // A length far past the limit, then nothing.
        vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
        // A valid length with a body cut short.
        vec![0, 0, 0, 50, 1, 0, 0, 0],
        Vec::new(),
    ] {
        let mut child = Command::new(AGENT)
            .arg("sftp-server")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.take().unwrap().write_all(&input);
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                panic!("the server kept running after its input ended");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{status:?}");
    }
}

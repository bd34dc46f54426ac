//! `envgate-agent scp` as the remote side of the real OpenSSH `scp -O`: the client runs it
//! through a stand-in for ssh (`scp -S`) that does what the remote shell would, with no `scp`
//! on `PATH`, so the agent serves the protocol itself.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const AGENT: &str = env!("CARGO_BIN_EXE_envgate-agent");

/// Writes the ssh stand-in: it runs the remote command (`scp -t …`) as `sh -c` would, with the
/// agent in place of `scp`.
fn fake_ssh(dir: &Path) -> String {
    let path = dir.join("ssh");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nfor last; do :; done\ncd \"$HOME_DIR\" && PATH=/nonexistent eval \"exec {AGENT} $last\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

/// `scp -O -S <stand-in> args…` with the "remote" home at `home`: (exit code, stderr).
fn scp(work: &Path, home: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new("scp")
        .arg("-O")
        .arg("-S")
        .arg(fake_ssh(work))
        .args(args)
        .current_dir(work)
        .env("HOME_DIR", home)
        .output()
        .expect("run the OpenSSH scp client");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(root.join("sub/b.bin"), vec![7u8; 300_000]).unwrap();
    std::fs::write(root.join("sub/deeper/c"), "").unwrap();
    std::fs::set_permissions(root.join("a.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
}

fn same_tree(a: &Path, b: &Path) {
    for rel in ["a.txt", "sub/b.bin", "sub/deeper/c"] {
        assert_eq!(
            std::fs::read(a.join(rel)).unwrap(),
            std::fs::read(b.join(rel)).unwrap(),
            "{rel}"
        );
    }
}

#[test]
fn files_and_trees_go_both_ways_with_modes_kept() {
    let work = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    tree(&work.path().join("local"));

    let (code, err) = scp(work.path(), home.path(), &["-p", "local/a.txt", "host:"]);
    assert_eq!((code, err.as_str()), (0, ""));
    let (code, err) = scp(
        work.path(),
        home.path(),
        &["-r", "-p", "local", "host:copy"],
    );
    assert_eq!((code, err.as_str()), (0, ""));
    same_tree(&work.path().join("local"), &home.path().join("copy"));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&home.path().join("a.txt")), 0o640);

    let (code, err) = scp(work.path(), home.path(), &["-r", "host:copy", "back"]);
    assert_eq!((code, err.as_str()), (0, ""));
    same_tree(&work.path().join("local"), &work.path().join("back"));
    let (code, err) = scp(work.path(), home.path(), &["host:copy/a.txt", "one.txt"]);
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(
        std::fs::read_to_string(work.path().join("one.txt")).unwrap(),
        "alpha\n"
    );
}

#[test]
fn missing_and_unwritable_paths_are_one_line_each() {
    let work = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("f"), "x").unwrap();
    std::fs::write(home.path().join("plain"), "x").unwrap();

    let (code, err) = scp(work.path(), home.path(), &["host:missing", "."]);
    assert_eq!(code, 1);
    assert_eq!(err, "scp: missing: No such file or directory\n");

    let (code, err) = scp(work.path(), home.path(), &["f", "host:plain/inside"]);
    assert_eq!(code, 1);
    assert_eq!(err, "scp: plain/inside: Not a directory\n");

    // A directory without -r is refused, and the file beside it still arrives.
    std::fs::create_dir(home.path().join("d")).unwrap();
    std::fs::write(home.path().join("g"), "g").unwrap();
    let (code, err) = scp(work.path(), home.path(), &["host:d", "host:g", "."]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err, "scp: d: not a regular file\n");
    assert_eq!(std::fs::read_to_string(work.path().join("g")).unwrap(), "g");
}

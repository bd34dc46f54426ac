//! End to end: files in and out with the real OpenSSH `sftp` and `scp`, through HAProxy and
//! the proxies, into images that ship no SFTP server (the agent serves it, as the user).

mod support;

use std::path::Path;

use support::{Fleet, SshOutput, run};

/// Bytes that do not compress and differ at every offset.
fn payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn sftp_batch(fleet: &Fleet, login: &str, dir: &Path, batch: &str) -> SshOutput {
    let mut argv = fleet.file_tool_argv("sftp", login);
    argv.extend(["-b".to_string(), "-".to_string()]);
    argv.push(format!("{login}@127.0.0.1"));
    let batch = format!("lcd {}\n{batch}", dir.display());
    run(&argv, Some(batch.as_bytes()), &[]).await
}

async fn scp(fleet: &Fleet, login: &str, from: &str, to: &str) -> SshOutput {
    let mut argv = fleet.file_tool_argv("scp", login);
    argv.extend([from.to_string(), to.to_string()]);
    run(&argv, None, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_puts_gets_and_manages_files_in_both_images_as_the_user() {
    let fleet = Fleet::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = payload(8 * 1024 * 1024 + 3);
    std::fs::write(dir.path().join("data.bin"), &data).unwrap();
    for login in ["demo", "demo+debian"] {
        let out = sftp_batch(
            &fleet,
            login,
            dir.path(),
            "put data.bin\n\
             mkdir box\n\
             rename data.bin box/data.bin\n\
             chmod 600 box/data.bin\n\
             symlink box/data.bin link\n\
             get link back.bin\n\
             ls -l box\n\
             rm link\n\
             -put data.bin /etc/not-yours\n\
             pwd\n",
        )
        .await;
        out.assert_success();
        assert_eq!(
            std::fs::read(dir.path().join("back.bin")).unwrap(),
            data,
            "{login}: the round trip is byte-exact"
        );
        std::fs::remove_file(dir.path().join("back.bin")).unwrap();
        assert!(
            out.stdout.contains("-rw-------")
                && out.stdout.contains("Remote working directory: /home/demo"),
            "{login}: {out:#?}"
        );
        // A path the user may not write is one line, and the batch went on to `pwd`.
        assert_eq!(
            out.stderr_lines(),
            [r#"dest open "/etc/not-yours": Permission denied"#],
            "{login}: {out:#?}"
        );

        // In the container the file is the user's own, and the same bytes.
        let inside = fleet
            .ssh(
                login,
                "stat -c '%U %a %s' box/data.bin; sha256sum box/data.bin | cut -d' ' -f1; rm -r box",
                None,
            )
            .await;
        inside.assert_success();
        assert_eq!(
            inside.stdout,
            format!("demo 600 {}\n{}\n", data.len(), support::sha256_hex(&data)),
            "{login}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scp_copies_both_ways_byte_exact() {
    let fleet = Fleet::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = payload(3 * 1024 * 1024 + 11);
    let local = dir.path().join("up.bin");
    std::fs::write(&local, &data).unwrap();
    for login in ["demo", "demo+debian"] {
        let up = scp(
            &fleet,
            login,
            &local.display().to_string(),
            &format!("{login}@127.0.0.1:copy.bin"),
        )
        .await;
        up.assert_success();
        let back = dir.path().join("back.bin");
        let down = scp(
            &fleet,
            login,
            &format!("{login}@127.0.0.1:copy.bin"),
            &back.display().to_string(),
        )
        .await;
        down.assert_success();
        assert_eq!(std::fs::read(&back).unwrap(), data, "{login}");
        std::fs::remove_file(&back).unwrap();

        let missing = scp(
            &fleet,
            login,
            &format!("{login}@127.0.0.1:no-such-file"),
            &back.display().to_string(),
        )
        .await;
        assert_eq!(missing.code, Some(1), "{missing:#?}");
        assert_eq!(
            missing.stderr_lines(),
            ["scp: no-such-file: No such file or directory"],
            "{login}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subsystems_other_than_sftp_and_sftp_into_self_service_are_refused_clearly() {
    let fleet = Fleet::start().await;
    let mut argv = fleet.ssh_key_argv("demo", &fleet.key_of("demo"));
    argv.insert(1, "-s".to_string());
    argv.push("netconf".to_string());
    let out = run(&argv, None, &[]).await;
    assert_eq!(out.code, Some(255), "{out:#?}");
    assert!(
        out.stderr.contains("subsystem request failed on channel 0"),
        "{out:#?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = sftp_batch(&fleet, "demo+envgate", dir.path(), "ls\n").await;
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stderr.contains(
            "envgate: the envgate pseudo-environment has no files; connect to one of your environments"
        ),
        "{out:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_scp_works_in_images_without_scp() {
    let fleet = Fleet::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    let data = payload(2 * 1024 * 1024 + 5);
    std::fs::write(tree.join("sub/data.bin"), &data).unwrap();
    std::fs::write(tree.join("notes.txt"), "notes\n").unwrap();
    for login in ["demo", "demo+debian"] {
        let mut up = fleet.file_tool_argv("scp", login);
        up.extend([
            "-O".to_string(),
            "-r".to_string(),
            tree.display().to_string(),
            format!("{login}@127.0.0.1:legacy"),
        ]);
        run(&up, None, &[]).await.assert_success();
        let back = dir.path().join("back");
        let mut down = fleet.file_tool_argv("scp", login);
        down.extend([
            "-O".to_string(),
            "-r".to_string(),
            format!("{login}@127.0.0.1:legacy"),
            back.display().to_string(),
        ]);
        run(&down, None, &[]).await.assert_success();
        assert_eq!(
            std::fs::read(back.join("sub/data.bin")).unwrap(),
            data,
            "{login}"
        );
        assert_eq!(
            std::fs::read_to_string(back.join("notes.txt")).unwrap(),
            "notes\n"
        );
        std::fs::remove_dir_all(&back).unwrap();

        let mut missing = fleet.file_tool_argv("scp", login);
        missing.extend([
            "-O".to_string(),
            format!("{login}@127.0.0.1:nothing-here"),
            dir.path().display().to_string(),
        ]);
        let out = run(&missing, None, &[]).await;
        assert_eq!(out.code, Some(1), "{out:#?}");
        assert_eq!(
            out.stderr_lines(),
            ["scp: nothing-here: No such file or directory"],
            "{login}"
        );
        let owner = fleet
            .ssh(login, "stat -c %U legacy/sub/data.bin; rm -r legacy", None)
            .await;
        assert_eq!(owner.stdout, "demo\n", "{login}: {owner:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsync_works_where_the_image_has_it_and_says_so_where_not() {
    let fleet = Fleet::start().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("nested")).unwrap();
    let data = payload(1024 * 1024 + 9);
    std::fs::write(src.join("nested/data.bin"), &data).unwrap();
    std::fs::write(src.join("top.txt"), "top\n").unwrap();
    // rsync runs ssh with these options and the key of the user.
    let ssh = fleet.ssh_key_argv("demo", &fleet.key_of("demo"));
    let rsh = ssh[..ssh.len() - 4].join(" ");

    let rsync = |from: String, to: String| {
        let argv = vec![
            "rsync".to_string(),
            "-a".to_string(),
            "-e".to_string(),
            rsh.clone(),
            from,
            to,
        ];
        async move { run(&argv, None, &[]).await }
    };
    let up = rsync(
        format!("{}/", src.display()),
        "demo+debian@127.0.0.1:synced/".to_string(),
    )
    .await;
    up.assert_success();
    let back = dir.path().join("back");
    let down = rsync(
        "demo+debian@127.0.0.1:synced/".to_string(),
        format!("{}/", back.display()),
    )
    .await;
    down.assert_success();
    assert_eq!(std::fs::read(back.join("nested/data.bin")).unwrap(), data);
    assert_eq!(
        std::fs::read_to_string(back.join("top.txt")).unwrap(),
        "top\n"
    );

    // busybox has no rsync: one line that says so, not "command not found (code 127)".
    let out = rsync(
        format!("{}/", src.display()),
        "demo@127.0.0.1:synced/".to_string(),
    )
    .await;
    assert_ne!(out.code, Some(0));
    assert_eq!(
        out.stderr_lines().first().copied(),
        Some(
            "envgate: this environment has no rsync; use scp or sftp, or an environment whose image has rsync"
        ),
        "{out:#?}"
    );
}

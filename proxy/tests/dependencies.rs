//! The proxy's core links no Docker code: built without its default features (no `docker`),
//! nothing in its dependency tree is bollard. Checked with `cargo tree` over the lock file,
//! against the default build as the control: there, bollard is linked (through
//! `envgate-runtime/docker`), so the check would see it if the feature gate leaked.

use std::process::Command;

/// The crates `cargo tree` lists for the proxy's library and binary with `features`.
fn normal_dependencies(features: &[&str]) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let output = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "--manifest-path",
            manifest,
            "-p",
            "envgate-proxy",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .args(features)
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn without_the_docker_feature_the_proxy_links_no_docker_code() {
    let with_docker = normal_dependencies(&[]);
    assert!(
        with_docker.iter().any(|c| c == "bollard"),
        "the default build links Docker exec: {with_docker:?}"
    );
    let without = normal_dependencies(&["--no-default-features"]);
    assert!(
        without.iter().any(|c| c == "envgate-runtime"),
        "the session-start trait is still there: {without:?}"
    );
    let docker: Vec<&String> = without
        .iter()
        .filter(|c| c.starts_with("bollard"))
        .collect();
    assert!(
        docker.is_empty(),
        "Docker code without the feature: {docker:?}"
    );
}

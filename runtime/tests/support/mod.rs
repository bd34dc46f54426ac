//! What the Docker tests share: the `docker` command, unique names, a container spec, and a
//! cleanup that removes everything one test made in the real engine (containers, home
//! volumes, warm-pool home slots, pulled images), even when an assertion failed.

#![allow(dead_code)]

pub mod registry;

use std::path::Path;
use std::process::Command;

use envgate_runtime::docker::slots;

/// The image every test starts (built locally by `deploy/local/images`).
pub const IMAGE: &str = "envgate/busybox:latest";
/// Warm pools' home slots: the control plane's default, so no test leaves a second shared
/// mount behind.
pub const SLOTS: &str = "/var/lib/envgate/slots";

/// `docker <args>`'s standard output; empty when it cannot run.
pub fn docker(args: &[&str]) -> String {
    Command::new("docker")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// `<prefix><8 random hex>`: an instance (or tag) of this test only.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{:08x}", rand::random::<u32>())
}

/// The ids of `instance`'s containers, running or not.
pub fn instance_containers(instance: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=envgate.instance={instance}"),
    ])
    .split_whitespace()
    .map(str::to_owned)
    .collect()
}

/// Removes one test's instance from the engine when dropped: its containers, its home
/// volumes, its warm-pool slots (unmounted first: a slot may hold a user's home) and
/// `images` (unique references, so nobody else's).
pub struct Cleanup {
    pub instance: String,
    pub images: Vec<String>,
}

impl Cleanup {
    pub fn new(instance: &str) -> Self {
        Self {
            instance: instance.to_owned(),
            images: Vec::new(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ids = instance_containers(&self.instance);
        if !ids.is_empty() {
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            docker(&[&["rm", "-f"][..], &ids].concat());
        }
        let slots_dir = Path::new(SLOTS).join(&self.instance);
        if let Ok(entries) = std::fs::read_dir(&slots_dir) {
            for entry in entries.flatten() {
                slots::release(&entry.path());
            }
        }
        let _ = std::fs::remove_dir(&slots_dir);
        let volumes = docker(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("name=envgate-{}-", self.instance),
        ]);
        let volumes: Vec<&str> = volumes.split_whitespace().collect();
        if !volumes.is_empty() {
            docker(&[&["volume", "rm", "-f"][..], &volumes].concat());
        }
        for image in &self.images {
            registry::remove_image(image);
        }
    }
}

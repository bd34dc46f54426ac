//! End to end: an environment whose image the engine lacks. The control plane pulls it from a
//! registry (served on loopback by the test, `controlplane/tests/common/registry.rs`) while
//! the user watches progress lines on their terminal; a registry that is not there is a clear
//! one-line refusal; ten users arriving at once on the missing image cost one pull.

mod support;

#[path = "../../runtime/tests/support/registry.rs"]
mod registry;

use std::time::Duration;

use registry::{Options, Registry};
use support::{Fleet, environment};

/// Removes the images a test pulled (their references are unique to the test). Declared
/// before the fleet, so it runs after the fleet has removed the containers using them.
struct PulledImages(Vec<String>);

impl Drop for PulledImages {
    fn drop(&mut self) {
        for image in &self.0 {
            registry::remove_image(image);
        }
    }
}

async fn registry(layer_delay: Duration) -> Registry {
    Registry::start(Options {
        repository: "envgate-test/pulled".into(),
        tag: format!("e2e-{:08x}", rand::random::<u32>()),
        layer_delay,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_pulled_while_the_terminal_shows_progress() {
    let registry = registry(Duration::from_millis(2500)).await;
    let _pulled = PulledImages(vec![registry.image.clone()]);
    let fleet = Fleet::start().await;
    assert!(!registry::image_present(&registry.image));
    fleet
        .put_environment(environment("pulled", &registry.image, "/bin/sh", false))
        .await;

    let mut argv = fleet.ssh_terminal_argv("demo+pulled");
    argv.push("cat /envgate-pulled".to_string());
    let out = support::run(&argv, None, &[]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    // Progress goes to the terminal's stderr, the command's output to stdout.
    let progress = out.stderr.replace('\r', "");
    let start = format!("pulling image {} …\n", registry.image);
    let done = format!("pulled image {} in ", registry.image);
    let (Some(started), Some(finished)) = (progress.find(&start), progress.find(&done)) else {
        panic!("expected the pull's start and done lines: {out:#?}");
    };
    assert!(started < finished, "{out:#?}");
    assert_eq!(out.stdout.replace('\r', ""), registry.marker, "{out:#?}");
    assert!(registry::image_present(&registry.image));

    // The image is there now: the next user's first login does not pull.
    fleet.add_user("bob", "pulled", None).await;
    let before = registry.manifest_requests();
    let mut argv = fleet.ssh_terminal_argv("bob");
    argv.push("cat /envgate-pulled".to_string());
    let out = support::run(&argv, None, &[]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(!out.stderr.contains("pulling image"), "{out:#?}");
    assert_eq!(registry.manifest_requests(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_is_not_there_is_a_clear_refusal_that_leaves_nothing() {
    let image = format!("{}/envgate-test/nope:1", registry::closed_address());
    let _pulled = PulledImages(vec![image.clone()]);
    let fleet = Fleet::start().await;
    fleet
        .put_environment(environment("nope", &image, "/bin/sh", false))
        .await;

    let out = fleet.ssh("demo+nope", "echo never", None).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(out.stdout, "", "the command never ran: {out:#?}");
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "{out:#?}");
    // Which image, in one line; the registry's answer is in the log under the request id.
    let id = support::request_id_in(
        lines[0],
        &format!(
            "envgate: environment \"nope\" cannot start: its image {image} could not be pulled"
        ),
    );
    let detail = fleet.log_line_with("controlplane", id);
    assert!(detail.contains("connection refused"), "{detail:?}");
    assert!(
        fleet
            .etcd_records("containers/demo/nope")
            .await
            .expect("etcd read")
            .is_empty()
    );
    assert!(
        fleet
            .containers(Some("demo"))
            .iter()
            .all(|c| c.environment != "nope")
    );
    // The same fleet still serves environments whose image is there.
    fleet.ssh("demo", "true", None).await.assert_success();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_first_logins_on_a_missing_image_share_one_pull() {
    // Slow layers keep the pull under way while all ten logins arrive.
    let registry = registry(Duration::from_secs(4)).await;
    let _pulled = PulledImages(vec![registry.image.clone()]);
    let fleet = Fleet::start().await;
    assert!(!registry::image_present(&registry.image));
    fleet
        .put_environment(environment("pulled", &registry.image, "/bin/sh", false))
        .await;
    let users: Vec<String> = (0..10).map(|i| format!("puller{i}")).collect();
    for user in &users {
        fleet.add_user(user, "pulled", None).await;
    }

    let logins = users
        .iter()
        .map(|user| fleet.ssh(user, "cat /envgate-pulled", None));
    let outs = futures::future::join_all(logins).await;
    for out in &outs {
        out.assert_success();
        assert_eq!(out.stdout, registry.marker, "{out:#?}");
    }
    // One pull: the engine asks for the manifest at most twice per pull (HEAD, then GET).
    assert!(
        (1..=2).contains(&registry.manifest_requests()),
        "{} manifest requests",
        registry.manifest_requests()
    );
    let pulled = fleet
        .containers(None)
        .into_iter()
        .filter(|c| c.environment == "pulled")
        .count();
    assert_eq!(pulled, 10);
}

//! What a Pod's status means for the user waiting on it. Read from each watch event; the
//! reasons are the kubelet's own (`ImagePullBackOff`, `ErrImagePull`, …), turned into one line
//! that names the environment and what to fix.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

use super::objects::{INSTALL_CONTAINER, MAIN_CONTAINER};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Not running yet; the line (if any) says what it waits for.
    Waiting(Option<String>),
    /// The user's container runs and the Pod has an address.
    Running { ip: String },
    /// It will not run without someone changing something; one line for the user.
    Failed(String),
    /// The user's image cannot be pulled: the kubelet's reason, and the line for the user.
    ImageFailed {
        image: String,
        reason: String,
        line: String,
    },
}

/// Waiting reasons that do not resolve by waiting.
const IMAGE_REASONS: &[&str] = &["ImagePullBackOff", "ErrImagePull", "InvalidImageName"];
const CONFIG_REASONS: &[&str] = &[
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// Where `pod` stands for environment `environment`.
pub fn progress(pod: &Pod, environment: &str) -> Progress {
    let Some(status) = &pod.status else {
        return Progress::Waiting(None);
    };
    let init = status
        .init_container_statuses
        .as_deref()
        .unwrap_or_default();
    let main = status.container_statuses.as_deref().unwrap_or_default();
    for container in init.iter().chain(main) {
        if let Some(failed) = container_failure(container, environment) {
            return failed;
        }
    }
    match status.phase.as_deref() {
        Some("Failed") | Some("Succeeded") => {
            let why = status
                .message
                .clone()
                .or_else(|| status.reason.clone())
                .unwrap_or_else(|| "it exited".to_owned());
            return Progress::Failed(format!(
                "environment {environment:?}: the container stopped before sessions could start: {why}"
            ));
        }
        Some("Running") => {
            let main_running = main
                .iter()
                .find(|c| c.name == MAIN_CONTAINER)
                .and_then(|c| c.state.as_ref())
                .is_some_and(|s| s.running.is_some());
            if let Some(ip) = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())
                && main_running
            {
                return Progress::Running { ip: ip.to_owned() };
            }
        }
        _ => {}
    }
    let unschedulable = status
        .conditions
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        });
    if let Some(condition) = unschedulable {
        return Progress::Waiting(Some(format!(
            "waiting for a node that fits: {}",
            condition.message.as_deref().unwrap_or("none fits yet")
        )));
    }
    let pulling = init
        .iter()
        .chain(main)
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.as_deref())
        .any(|reason| reason == "PodInitializing" || reason == "ContainerCreating");
    Progress::Waiting(pulling.then(|| "starting the container (pulling its image)".to_owned()))
}

fn container_failure(container: &ContainerStatus, environment: &str) -> Option<Progress> {
    let image = container.image.as_str();
    let what = if container.name == INSTALL_CONTAINER {
        "the agent image"
    } else {
        "image"
    };
    let state = container.state.as_ref()?;
    if let Some(waiting) = &state.waiting {
        let reason = waiting.reason.as_deref().unwrap_or_default();
        let message = waiting.message.as_deref().unwrap_or(reason);
        if IMAGE_REASONS.contains(&reason) {
            let line =
                format!("environment {environment:?}: {what} {image} cannot be pulled: {message}");
            if container.name == INSTALL_CONTAINER {
                return Some(Progress::Failed(line));
            }
            return Some(Progress::ImageFailed {
                image: image.to_owned(),
                reason: message.to_owned(),
                line,
            });
        }
        if CONFIG_REASONS.contains(&reason) {
            return Some(Progress::Failed(format!(
                "environment {environment:?}: the container cannot be created: {message}"
            )));
        }
        if reason == "CrashLoopBackOff" {
            return Some(Progress::Failed(format!(
                "environment {environment:?}: the container keeps exiting: {message}"
            )));
        }
    }
    if let Some(terminated) = &state.terminated
        && terminated.exit_code != 0
    {
        let why = terminated
            .message
            .as_deref()
            .or(terminated.reason.as_deref())
            .unwrap_or("no reason given");
        let which = if container.name == INSTALL_CONTAINER {
            "copying the agent"
        } else {
            "the container"
        };
        return Some(Progress::Failed(format!(
            "environment {environment:?}: {which} exited with status {}: {why}",
            terminated.exit_code
        )));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p"},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn kube_image_pull_back_off_is_one_line_naming_the_image() {
        let p = pod(serde_json::json!({
            "phase": "Pending",
            "containerStatuses": [{
                "name": "env", "image": "registry.lab/nope:1", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": {"waiting": {"reason": "ImagePullBackOff",
                    "message": "Back-off pulling image \"registry.lab/nope:1\""}}
            }]
        }));
        assert_eq!(
            progress(&p, "dev"),
            Progress::ImageFailed {
                image: "registry.lab/nope:1".to_owned(),
                reason: "Back-off pulling image \"registry.lab/nope:1\"".to_owned(),
                line: "environment \"dev\": image registry.lab/nope:1 cannot be pulled: \
                       Back-off pulling image \"registry.lab/nope:1\""
                    .to_owned()
            }
        );
    }

    #[test]
    fn kube_agent_image_failures_say_it_is_the_agent_image() {
        let p = pod(serde_json::json!({
            "phase": "Pending",
            "initContainerStatuses": [{
                "name": "envgate-agent-install", "image": "agent:9", "imageID": "",
                "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}
            }]
        }));
        assert_eq!(
            progress(&p, "dev"),
            Progress::Failed(
                "environment \"dev\": the agent image agent:9 cannot be pulled: not found"
                    .to_owned()
            )
        );
    }

    #[test]
    fn kube_running_needs_the_main_container_and_an_address() {
        let running = |ip: &str| {
            pod(serde_json::json!({
                "phase": "Running", "podIP": ip,
                "containerStatuses": [{
                    "name": "env", "image": "i", "imageID": "", "ready": true,
                    "restartCount": 0, "state": {"running": {"startedAt": "2026-12-06T02:00:00Z"}}
                }]
            }))
        };
        assert_eq!(
            progress(&running("10.0.0.7"), "dev"),
            Progress::Running {
                ip: "10.0.0.7".to_owned()
            }
        );
        assert_eq!(progress(&running(""), "dev"), Progress::Waiting(None));
    }

    #[test]
    fn kube_unschedulable_waits_and_says_why() {
        let p = pod(serde_json::json!({
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]
        }));
        assert_eq!(
            progress(&p, "cuda"),
            Progress::Waiting(Some(
                "waiting for a node that fits: 0/3 nodes are available: 3 Insufficient \
                 nvidia.com/gpu."
                    .to_owned()
            ))
        );
    }

    #[test]
    fn kube_a_failed_pod_or_crash_loop_is_final() {
        let p = pod(serde_json::json!({"phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: memory."}));
        assert_eq!(
            progress(&p, "dev"),
            Progress::Failed(
                "environment \"dev\": the container stopped before sessions could start: The \
                 node was low on resource: memory."
                    .to_owned()
            )
        );
        let p = pod(serde_json::json!({
            "phase": "Running",
            "containerStatuses": [{"name": "env", "image": "i", "imageID": "", "ready": false,
                "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff",
                "message": "back-off 40s restarting failed container"}}}]
        }));
        assert!(
            matches!(progress(&p, "dev"), Progress::Failed(line) if line.contains("keeps exiting"))
        );
        let p = pod(serde_json::json!({
            "phase": "Pending",
            "initContainerStatuses": [{"name": "envgate-agent-install", "image": "a",
                "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]
        }));
        assert_eq!(
            progress(&p, "dev"),
            Progress::Failed(
                "environment \"dev\": copying the agent exited with status 1: Error".to_owned()
            )
        );
    }
}

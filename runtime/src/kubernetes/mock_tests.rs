//! The runtime against kube's `Client` over a `tower_test` mock: each test answers the
//! requests one by one, asserting method, path, query and body, and answers with the API
//! server's own bodies (objects, lists, watch events, `Status` for 404/409/403).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::channel::mpsc;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tower_test::mock::{Handle, SendResponse};

use super::fake::{self, FakeBody};
use super::objects::parse_toleration;
use super::*;
use crate::types::RuntimeError;

type MockHandle = Handle<Request<kube::client::Body>, Response<FakeBody>>;

const NS: &str = "envgate-users";

fn runtime(start_timeout: Duration) -> (KubernetesRuntime, MockHandle) {
    let (service, handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<FakeBody>>();
    let client = Client::new(service, NS);
    let config = KubernetesConfig {
        namespace: NS.to_owned(),
        agent_image: "registry.lab/envgate-agent:0.1".to_owned(),
        start_timeout,
        home: HomeSettings {
            storage_class: Some("fast".to_owned()),
            size: "20Gi".to_owned(),
            access_mode: "ReadWriteOnce".to_owned(),
        },
    };
    (KubernetesRuntime::new(client, config), handle)
}

fn cuda_input() -> PodSpecInput {
    PodSpecInput {
        instance: "lab".to_owned(),
        user: "alice".to_owned(),
        environment: "cuda".to_owned(),
        session: None,
        image: "registry.lab/cuda:12".to_owned(),
        env: vec!["LANG=C.UTF-8".to_owned()],
        working_dir: String::new(),
        cpus: 4.0,
        memory_bytes: 16 << 30,
        gpus: 1,
        settings: PodSettings {
            node_selector: BTreeMap::from([("accelerator".to_owned(), "a100".to_owned())]),
            tolerations: vec![parse_toleration("nvidia.com/gpu:NoSchedule").unwrap()],
            image_pull_policy: Some("IfNotPresent".to_owned()),
            image_pull_secrets: vec!["lab-registry".to_owned()],
        },
    }
}

/// The next request: method, path, decoded query, JSON body (Null when empty).
struct Seen {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Value,
    respond: SendResponse<Response<FakeBody>>,
}

async fn next(handle: &mut MockHandle) -> Seen {
    let (request, respond) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("the runtime made no further request")
        .expect("the client is gone");
    let (parts, body) = request.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let query = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                k.to_owned(),
                v.replace("%3D", "=")
                    .replace("%2C", ",")
                    .replace("%2F", "/"),
            )
        })
        .collect();
    Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query,
        body: if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        },
        respond,
    }
}

/// The next request, which must be `method path`.
async fn expect(handle: &mut MockHandle, method: &str, path: &str) -> Seen {
    let seen = next(handle).await;
    assert_eq!((seen.method.as_str(), seen.path.as_str()), (method, path));
    seen
}

/// Answers with the API server's `Status` body for `code`.
fn reply_status(respond: SendResponse<Response<FakeBody>>, code: u16, reason: &str, message: &str) {
    respond.send_response(fake::status(code, reason, message));
}

fn reply(respond: SendResponse<Response<FakeBody>>, code: u16, body: &Value) {
    respond.send_response(fake::json_response(
        StatusCode::from_u16(code).unwrap(),
        body,
    ));
}

/// Answers a watch with a stream the test feeds event by event.
fn reply_watch(respond: SendResponse<Response<FakeBody>>) -> mpsc::UnboundedSender<Value> {
    let (events, receiver) = mpsc::unbounded::<Value>();
    let stream =
        receiver.map(|event| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{event}\n")))));
    let response = Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap();
    respond.send_response(response);
    events
}

fn pod_with_status(name: &str, status: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "uid": "pod-uid-1", "resourceVersion": "12"},
        "spec": {"containers": [{"name": "env", "image": "registry.lab/cuda:12"}]},
        "status": status,
    })
}

fn running_status(ip: &str) -> Value {
    json!({"phase": "Running", "podIP": ip, "containerStatuses": [{
        "name": "env", "image": "registry.lab/cuda:12", "imageID": "", "ready": true,
        "restartCount": 0, "state": {"running": {"startedAt": "2026-12-06T02:00:01Z"}}}]})
}

/// Answers the secret, pod and owner-patch requests of a start; returns the pod's name and
/// the secret the Secret carried (base64-decoded).
async fn answer_creation(handle: &mut MockHandle) -> (String, String, Value) {
    let secret = expect(handle, "POST", "/api/v1/namespaces/envgate-users/secrets").await;
    let secret_name = secret.body["metadata"]["name"].as_str().unwrap().to_owned();
    let encoded = secret.body["data"]["secret"].as_str().unwrap().to_owned();
    reply(secret.respond, 201, &secret.body);
    let pod = expect(handle, "POST", "/api/v1/namespaces/envgate-users/pods").await;
    let name = pod.body["metadata"]["name"].as_str().unwrap().to_owned();
    assert_eq!(secret_name, format!("{name}-agent"));
    let mut created = pod.body.clone();
    created["metadata"]["uid"] = json!("pod-uid-1");
    created["status"] = json!({"phase": "Pending"});
    reply(pod.respond, 201, &created);
    let patch = expect(
        handle,
        "PATCH",
        &format!("/api/v1/namespaces/envgate-users/secrets/{secret_name}"),
    )
    .await;
    let owner = &patch.body["metadata"]["ownerReferences"][0];
    assert_eq!(
        (
            owner["kind"].as_str(),
            owner["name"].as_str(),
            owner["uid"].as_str()
        ),
        (Some("Pod"), Some(name.as_str()), Some("pod-uid-1"))
    );
    reply(patch.respond, 200, &secret.body);
    (name, encoded, pod.body)
}

/// Answers the watcher's first list (the Pod as given) and opens its watch.
async fn answer_list_and_watch(
    handle: &mut MockHandle,
    name: &str,
    listed: Value,
) -> mpsc::UnboundedSender<Value> {
    let list = expect(handle, "GET", "/api/v1/namespaces/envgate-users/pods").await;
    assert_eq!(
        list.query.get("fieldSelector").map(String::as_str),
        Some(format!("metadata.name={name}").as_str())
    );
    assert_eq!(list.query.get("watch"), None);
    reply(
        list.respond,
        200,
        &json!({"apiVersion": "v1", "kind": "PodList",
            "metadata": {"resourceVersion": "12"}, "items": [listed]}),
    );
    let watch = next(handle).await;
    assert_eq!(watch.path, "/api/v1/namespaces/envgate-users/pods");
    assert_eq!(watch.query.get("watch").map(String::as_str), Some("true"));
    assert_eq!(
        watch.query.get("fieldSelector").map(String::as_str),
        Some(format!("metadata.name={name}").as_str())
    );
    assert_eq!(
        watch.query.get("resourceVersion").map(String::as_str),
        Some("12")
    );
    reply_watch(watch.respond)
}

/// Answers the cleanup after a failed start: the pod, then its secret, deleted.
async fn answer_cleanup(handle: &mut MockHandle, name: &str) {
    let delete = expect(
        handle,
        "DELETE",
        &format!("/api/v1/namespaces/envgate-users/pods/{name}"),
    )
    .await;
    reply(
        delete.respond,
        200,
        &pod_with_status(name, json!({"phase": "Pending"})),
    );
    let delete = expect(
        handle,
        "DELETE",
        &format!("/api/v1/namespaces/envgate-users/secrets/{name}-agent"),
    )
    .await;
    reply_status(
        delete.respond,
        404,
        "NotFound",
        &format!("secrets \"{name}-agent\" not found"),
    );
}

fn recorder() -> (Arc<Mutex<Vec<String>>>, impl Fn(&str) + Send + Sync) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    (lines, move |line: &str| {
        sink.lock().unwrap().push(line.to_owned())
    })
}

#[tokio::test]
async fn kube_start_sends_the_exact_pod_and_waits_on_a_watch_until_running() {
    let (runtime, mut handle) = runtime(Duration::from_secs(600));
    let input = cuda_input();
    let (lines, progress) = recorder();
    let server = async {
        let (name, encoded, pod) = answer_creation(&mut handle).await;
        // The Pod as sent: agent init container, emptyDir, secret, claim, limits, GPU,
        // labels, placement and pull settings.
        let spec = &pod["spec"];
        let init = &spec["initContainers"][0];
        assert_eq!(init["name"], "envgate-agent-install");
        assert_eq!(init["image"], "registry.lab/envgate-agent:0.1");
        assert_eq!(
            init["command"],
            json!(["cp", "/envgate-agent", "/.envgate/agent"])
        );
        assert_eq!(init["volumeMounts"][0]["mountPath"], "/.envgate");
        let main = &spec["containers"][0];
        assert_eq!(main["image"], "registry.lab/cuda:12");
        assert_eq!(main["command"], json!(["/.envgate/agent"]));
        assert_eq!(
            main["args"],
            json!([
                "--listen-tcp",
                "0.0.0.0:7022",
                "--secret-file",
                "/run/envgate-secret/secret"
            ])
        );
        assert_eq!(main["imagePullPolicy"], "IfNotPresent");
        assert_eq!(
            main["resources"]["limits"],
            json!({"cpu": "4000m", "memory": (16u64 << 30).to_string(), "nvidia.com/gpu": "1"})
        );
        assert_eq!(main["resources"]["requests"], main["resources"]["limits"]);
        assert_eq!(main["env"], json!([{"name": "LANG", "value": "C.UTF-8"}]));
        assert_eq!(
            spec["volumes"],
            json!([
                {"name": "envgate-agent", "emptyDir": {}},
                {"name": "envgate-agent-secret",
                 "secret": {"secretName": format!("{name}-agent"), "defaultMode": 0o400}},
                {"name": "home", "persistentVolumeClaim":
                    {"claimName": "envgate-lab-home-alice", "readOnly": false}},
            ])
        );
        assert_eq!(spec["nodeSelector"], json!({"accelerator": "a100"}));
        assert_eq!(
            spec["tolerations"],
            json!([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
        );
        assert_eq!(spec["imagePullSecrets"], json!([{"name": "lab-registry"}]));
        assert_eq!(spec["automountServiceAccountToken"], false);
        assert_eq!(
            pod["metadata"]["labels"],
            json!({"envgate.managed-by": "envgate", "envgate.instance": "lab",
                   "envgate.user": "alice", "envgate.environment": "cuda"})
        );
        let events = answer_list_and_watch(
            &mut handle,
            &name,
            pod_with_status(&name, json!({"phase": "Pending"})),
        )
        .await;
        events
            .unbounded_send(
                json!({"type": "MODIFIED", "object": pod_with_status(&name, json!({
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}]}))}),
            )
            .unwrap();
        events
            .unbounded_send(json!({"type": "MODIFIED",
                "object": pod_with_status(&name, running_status("10.244.1.9"))}))
            .unwrap();
        (name, encoded, events)
    };
    let (started, (name, encoded, _events)) =
        tokio::join!(runtime.start(&input, &progress), server);
    let started = started.unwrap();
    assert_eq!(started.name, name);
    assert_eq!(started.agent_address, "10.244.1.9:7022");
    assert_eq!(
        base64_decode(&encoded),
        started.secret.as_bytes(),
        "the Secret holds the secret the proxy is given"
    );
    assert_eq!(started.secret.len(), 64);
    assert_eq!(
        lines.lock().unwrap().as_slice(),
        ["waiting for a node that fits: 0/2 nodes are available: 2 Insufficient nvidia.com/gpu."]
    );
}

#[tokio::test]
async fn kube_image_pull_back_off_is_one_clear_line_and_leaves_nothing() {
    let (runtime, mut handle) = runtime(Duration::from_secs(600));
    let input = cuda_input();
    let server = async {
        let (name, _, _) = answer_creation(&mut handle).await;
        let events = answer_list_and_watch(
            &mut handle,
            &name,
            pod_with_status(&name, json!({"phase": "Pending"})),
        )
        .await;
        events
            .unbounded_send(json!({"type": "MODIFIED", "object": pod_with_status(&name, json!({
                "phase": "Pending",
                "containerStatuses": [{"name": "env", "image": "registry.lab/cuda:12",
                    "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"waiting": {"reason": "ImagePullBackOff",
                        "message": "Back-off pulling image \"registry.lab/cuda:12\": not found"}}}]}))}))
            .unwrap();
        answer_cleanup(&mut handle, &name).await;
        events
    };
    let (result, _events) = tokio::join!(runtime.start(&input, &|_: &str| {}), server);
    let failure = result.unwrap_err();
    assert_eq!(
        failure.to_string(),
        "environment \"cuda\": image registry.lab/cuda:12 cannot be pulled: Back-off pulling \
         image \"registry.lab/cuda:12\": not found"
    );
    assert_eq!(
        RuntimeError::from(failure),
        RuntimeError::PullFailed {
            image: "registry.lab/cuda:12".to_owned(),
            reason: "Back-off pulling image \"registry.lab/cuda:12\": not found".to_owned(),
        },
        "the control plane's line names the environment and the image"
    );
}

#[tokio::test]
async fn kube_crash_loop_back_off_is_one_clear_line() {
    let (runtime, mut handle) = runtime(Duration::from_secs(600));
    let input = cuda_input();
    let server = async {
        let (name, _, _) = answer_creation(&mut handle).await;
        let crashing = pod_with_status(
            &name,
            json!({
            "phase": "Running",
            "containerStatuses": [{"name": "env", "image": "registry.lab/cuda:12",
                "imageID": "", "ready": false, "restartCount": 4,
                "state": {"waiting": {"reason": "CrashLoopBackOff",
                    "message": "back-off 1m20s restarting failed container=env"}}}]}),
        );
        // The first list already shows it: no watch is opened.
        let list = next(&mut handle).await;
        assert_eq!(list.path, "/api/v1/namespaces/envgate-users/pods");
        reply(
            list.respond,
            200,
            &json!({"apiVersion": "v1", "kind": "PodList",
                "metadata": {"resourceVersion": "12"}, "items": [crashing]}),
        );
        answer_cleanup(&mut handle, &name).await;
    };
    let (result, ()) = tokio::join!(runtime.start(&input, &|_: &str| {}), server);
    assert_eq!(
        result.unwrap_err().to_string(),
        "environment \"cuda\": the container keeps exiting: back-off 1m20s restarting failed \
         container=env"
    );
}

#[tokio::test(start_paused = true)]
async fn kube_a_pod_that_never_runs_times_out_with_what_it_waited_for() {
    // Below the 10 s the mock side waits for each request, so the runtime's timeout comes first.
    let (runtime, mut handle) = runtime(Duration::from_secs(5));
    let input = cuda_input();
    let server = async {
        let (name, _, _) = answer_creation(&mut handle).await;
        let pending = pod_with_status(
            &name,
            json!({
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector."}]}),
        );
        let events = answer_list_and_watch(&mut handle, &name, pending).await;
        // Nothing more happens on the watch: the start timeout passes (the clock is paused
        // and advances by itself while everyone waits).
        answer_cleanup(&mut handle, &name).await;
        events
    };
    let (result, _events) = tokio::join!(runtime.start(&input, &|_: &str| {}), server);
    let line = result.unwrap_err().to_string();
    assert!(
        line.starts_with("environment \"cuda\": pod envgate-lab-alice-cuda-")
            && line.ends_with(
                " did not start within 5s (waiting for a node that fits: 0/2 nodes are \
                 available: 2 node(s) didn't match Pod's node affinity/selector.)"
            ),
        "{line}"
    );
}

#[tokio::test]
async fn kube_a_pod_deleted_while_starting_is_reported() {
    let (runtime, mut handle) = runtime(Duration::from_secs(600));
    let input = cuda_input();
    let server = async {
        let (name, _, _) = answer_creation(&mut handle).await;
        let pending = pod_with_status(&name, json!({"phase": "Pending"}));
        let events = answer_list_and_watch(&mut handle, &name, pending.clone()).await;
        events
            .unbounded_send(json!({"type": "DELETED", "object": pending}))
            .unwrap();
        let delete = next(&mut handle).await;
        assert_eq!(delete.method, "DELETE");
        reply_status(
            delete.respond,
            404,
            "NotFound",
            &format!("pods \"{name}\" not found"),
        );
        let delete = next(&mut handle).await;
        reply_status(delete.respond, 404, "NotFound", "gone");
        (name, events)
    };
    let (result, (name, _events)) = tokio::join!(runtime.start(&input, &|_: &str| {}), server);
    assert_eq!(
        result.unwrap_err().to_string(),
        format!("environment \"cuda\": pod {name} was deleted while starting")
    );
}

#[tokio::test]
async fn kube_a_pod_name_conflict_removes_the_secret_and_says_so() {
    let (runtime, mut handle) = runtime(Duration::from_secs(600));
    let input = cuda_input();
    let server = async {
        let secret = next(&mut handle).await;
        let secret_name = secret.body["metadata"]["name"].as_str().unwrap().to_owned();
        reply(secret.respond, 201, &secret.body);
        let pod = next(&mut handle).await;
        let name = pod.body["metadata"]["name"].as_str().unwrap().to_owned();
        reply_status(
            pod.respond,
            409,
            "AlreadyExists",
            &format!("pods \"{name}\" already exists"),
        );
        let delete = expect(
            &mut handle,
            "DELETE",
            &format!("/api/v1/namespaces/envgate-users/secrets/{secret_name}"),
        )
        .await;
        reply(delete.respond, 200, &secret.body);
        name
    };
    let (result, name) = tokio::join!(runtime.start(&input, &|_: &str| {}), server);
    assert_eq!(
        result.unwrap_err(),
        Failure::Failed(format!("pod {name} already exists; try again"))
    );
}

#[tokio::test]
async fn kube_home_claim_is_created_when_missing() {
    let (runtime, mut handle) = runtime(Duration::from_secs(600));
    let server = async {
        let get = expect(
            &mut handle,
            "GET",
            "/api/v1/namespaces/envgate-users/persistentvolumeclaims/envgate-lab-home-alice",
        )
        .await;
        reply_status(
            get.respond,
            404,
            "NotFound",
            "persistentvolumeclaims \"envgate-lab-home-alice\" not found",
        );
        let create = expect(
            &mut handle,
            "POST",
            "/api/v1/namespaces/envgate-users/persistentvolumeclaims",
        )
        .await;
        assert_eq!(
            create.body["spec"],
            json!({"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                   "resources": {"requests": {"storage": "20Gi"}}})
        );
        assert_eq!(create.body["metadata"]["labels"]["envgate.role"], "home");
        assert_eq!(
            create.body["metadata"]["annotations"]["envgate.user"],
            "alice"
        );
        reply(create.respond, 201, &create.body);
    };
    let (name, ()) = tokio::join!(runtime.ensure_home("lab", "alice"), server);
    assert_eq!(name.unwrap(), "envgate-lab-home-alice");
}

#[tokio::test]
async fn kube_home_claim_made_by_another_replica_meanwhile_is_reused() {
    let (runtime, mut handle) = runtime(Duration::from_secs(600));
    let server = async {
        let get = next(&mut handle).await;
        reply_status(get.respond, 404, "NotFound", "not found");
        let create = next(&mut handle).await;
        reply_status(
            create.respond,
            409,
            "AlreadyExists",
            "persistentvolumeclaims \"envgate-lab-home-alice\" already exists",
        );
    };
    let (name, ()) = tokio::join!(runtime.ensure_home("lab", "alice"), server);
    assert_eq!(name.unwrap(), "envgate-lab-home-alice");
}

#[tokio::test]
async fn kube_forbidden_names_the_role() {
    let (runtime, mut handle) = runtime(Duration::from_secs(600));
    let server = async {
        let get = next(&mut handle).await;
        reply_status(
            get.respond,
            403,
            "Forbidden",
            "persistentvolumeclaims \"envgate-lab-home-alice\" is forbidden: User \
                 \"system:serviceaccount:envgate:envgate-controlplane\" cannot get resource \
                 \"persistentvolumeclaims\" in API group \"\" in the namespace \"envgate-users\"",
        );
    };
    let (result, ()) = tokio::join!(runtime.ensure_home("lab", "alice"), server);
    let Failure::Unavailable(line) = result.unwrap_err() else {
        panic!("a refusal of our credentials is the runtime being unavailable");
    };
    assert!(line.starts_with("kubernetes refused to read the home claim: persistentvolumeclaims"));
    assert!(line.ends_with("(check the control plane's Role)"), "{line}");
}

#[tokio::test]
async fn kube_remove_deletes_pod_and_secret_and_tolerates_404() {
    let (runtime, mut handle) = runtime(Duration::from_secs(600));
    let server = async {
        let pod = expect(
            &mut handle,
            "DELETE",
            "/api/v1/namespaces/envgate-users/pods/envgate-lab-alice-dev-1",
        )
        .await;
        reply_status(pod.respond, 404, "NotFound", "pods \"x\" not found");
        let secret = expect(
            &mut handle,
            "DELETE",
            "/api/v1/namespaces/envgate-users/secrets/envgate-lab-alice-dev-1-agent",
        )
        .await;
        reply_status(secret.respond, 404, "NotFound", "not found");
    };
    let (result, ()) = tokio::join!(runtime.remove("envgate-lab-alice-dev-1"), server);
    result.unwrap();
}

#[tokio::test]
async fn kube_list_selects_by_labels_and_reads_exact_names_from_annotations() {
    let (runtime, mut handle) = runtime(Duration::from_secs(600));
    let server = async {
        let list = expect(&mut handle, "GET", "/api/v1/namespaces/envgate-users/pods").await;
        assert_eq!(
            list.query.get("labelSelector").map(String::as_str),
            Some("envgate.managed-by=envgate,envgate.instance=lab")
        );
        let mut running = pod_with_status("p1", running_status("10.0.0.1"));
        running["metadata"]["labels"] = json!({"envgate.user": "x-1234abcd",
            "envgate.environment": "dev", "envgate.session": "s1"});
        running["metadata"]["annotations"] = json!({"envgate.user": "_x", "envgate.session": "s1"});
        running["metadata"]["creationTimestamp"] = json!("2026-12-06T02:00:00Z");
        let mut finished = pod_with_status("p2", json!({"phase": "Succeeded"}));
        finished["metadata"]["labels"] =
            json!({"envgate.user": "bob", "envgate.environment": "dev"});
        reply(
            list.respond,
            200,
            &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "3"},
                "items": [running, finished]}),
        );
    };
    let (listed, ()) = tokio::join!(runtime.list("lab"), server);
    let listed = listed.unwrap();
    assert_eq!(
        listed,
        [
            ListedPod {
                name: "p1".to_owned(),
                user: "_x".to_owned(),
                environment: "dev".to_owned(),
                session: Some("s1".to_owned()),
                created_at: 1_796_522_400,
                running: true,
            },
            ListedPod {
                name: "p2".to_owned(),
                user: "bob".to_owned(),
                environment: "dev".to_owned(),
                session: None,
                created_at: 0,
                running: false,
            },
        ]
    );
}

#[tokio::test]
async fn kube_is_running_reads_the_one_pod() {
    let (runtime, mut handle) = runtime(Duration::from_secs(600));
    let server = async {
        let get = next(&mut handle).await;
        assert_eq!(get.path, "/api/v1/namespaces/envgate-users/pods/gone");
        reply_status(get.respond, 404, "NotFound", "pods \"gone\" not found");
        let get = next(&mut handle).await;
        let mut deleting = pod_with_status("p", running_status("10.0.0.2"));
        deleting["metadata"]["deletionTimestamp"] = json!("2026-12-06T02:00:00Z");
        reply(get.respond, 200, &deleting);
        let get = next(&mut handle).await;
        reply(
            get.respond,
            200,
            &pod_with_status("p", running_status("10.0.0.2")),
        );
    };
    let (answers, ()) = tokio::join!(
        async {
            (
                runtime.is_running("gone").await.unwrap(),
                runtime.is_running("p").await.unwrap(),
                runtime.is_running("p").await.unwrap(),
            )
        },
        server
    );
    assert_eq!(answers, (false, false, true));
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

//! A **fake** Kubernetes API server for tests: an in-memory tower `Service` that kube's
//! `Client` talks to, implementing only the endpoints the runtime calls (create, get, list,
//! watch, merge-patch and delete of pods, secrets and persistent volume claims in a
//! namespace, with equality label selectors and `metadata.name` field selectors). Its
//! "kubelet" moves a created Pod to Running with an address at once (or to a status the test
//! chooses), and deleting a Pod deletes the Secrets it owns, as the garbage collector would.
//!
//! No API server can run on the machines this project is built on; this fake is what the
//! runtime conformance suite runs against. It answers with the API server's own shapes
//! (objects, lists, watch events, `Status` bodies for 404 and 409), but it is not Kubernetes:
//! admission, scheduling, quotas and real kubelet timing are not modelled (see
//! docs/operations.md for what a first run on a real cluster must confirm).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::StreamExt;
use futures::channel::mpsc;
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};

pub type FakeBody = BoxBody<Bytes, Infallible>;

/// One request the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Decoded query parameters.
    pub query: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// (namespace, resource, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    resource_version: u64,
    next_ip: u32,
    requests: Vec<Recorded>,
    watchers: Vec<Watcher>,
    /// The status the "kubelet" gives every new Pod; `None`: Running with an address.
    pod_status: Option<Value>,
    /// Images no registry has: their Pods wait in `ErrImagePull`.
    missing_images: std::collections::BTreeSet<String>,
}

struct Watcher {
    namespace: String,
    resource: String,
    selector: Selector,
    events: mpsc::UnboundedSender<Bytes>,
}

#[derive(Clone, Default)]
struct Selector {
    labels: Vec<(String, String)>,
    name: Option<String>,
}

impl Selector {
    fn from_query(query: &BTreeMap<String, String>) -> Self {
        let pairs = |text: Option<&String>| -> Vec<(String, String)> {
            text.map(|t| {
                t.split(',')
                    .filter_map(|p| p.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect()
            })
            .unwrap_or_default()
        };
        Self {
            labels: pairs(query.get("labelSelector")),
            name: pairs(query.get("fieldSelector"))
                .into_iter()
                .find(|(k, _)| k == "metadata.name")
                .map(|(_, v)| v),
        }
    }

    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        self.name
            .as_deref()
            .is_none_or(|name| meta["name"].as_str() == Some(name))
            && self
                .labels
                .iter()
                .all(|(k, v)| meta["labels"][k].as_str() == Some(v.as_str()))
    }
}

impl FakeApiServer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every new Pod gets `status` instead of running (e.g. a container in
    /// `ImagePullBackOff`).
    pub fn with_pod_status(self, status: Value) -> Self {
        self.lock().pod_status = Some(status);
        self
    }

    /// Pods of `image` wait in `ErrImagePull`, as the kubelet reports an image no registry has.
    pub fn image_missing(&self, image: &str) {
        self.lock().missing_images.insert(image.to_owned());
    }

    /// A kube client talking to this fake, defaulting to `namespace`.
    pub fn client(&self, namespace: &str) -> kube::Client {
        kube::Client::new(self.clone(), namespace)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// The (resource, RBAC verb) of every request so far, as the API server authorises them.
    pub fn api_calls(&self) -> std::collections::BTreeSet<(String, String)> {
        self.requests()
            .iter()
            .filter_map(|r| {
                let parts: Vec<&str> = r.path.trim_matches('/').split('/').collect();
                let (resource, named) = match parts.as_slice() {
                    ["api", "v1", "namespaces", _, resource] => (*resource, false),
                    ["api", "v1", "namespaces", _, resource, _] => (*resource, true),
                    _ => return None,
                };
                let watch = r
                    .query
                    .get("watch")
                    .is_some_and(|w| w == "true" || w == "1");
                let verb = match (r.method.as_str(), named, watch) {
                    ("GET", _, true) => "watch",
                    ("GET", true, _) => "get",
                    ("GET", false, _) => "list",
                    ("POST", _, _) => "create",
                    ("PATCH", _, _) => "patch",
                    ("PUT", _, _) => "update",
                    ("DELETE", true, _) => "delete",
                    ("DELETE", false, _) => "deletecollection",
                    _ => return None,
                };
                Some((resource.to_owned(), verb.to_owned()))
            })
            .collect()
    }

    /// The stored object, as the API server would return it.
    pub fn object(&self, namespace: &str, resource: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(namespace.to_owned(), resource.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Names of the stored objects of `resource`.
    pub fn names(&self, namespace: &str, resource: &str) -> Vec<String> {
        self.lock()
            .objects
            .keys()
            .filter(|(ns, r, _)| ns == namespace && r == resource)
            .map(|(_, _, name)| name.clone())
            .collect()
    }

    /// Deletes an object as someone else would (`kubectl delete`), with the garbage
    /// collector's cascade.
    pub fn delete_outside(&self, namespace: &str, resource: &str, name: &str) {
        self.lock().delete(namespace, resource, name);
    }

    /// Sets a Pod's status as its kubelet would (e.g. the container exited), notifying watches.
    pub fn set_pod_status(&self, namespace: &str, name: &str, status: Value) {
        let mut state = self.lock();
        let key = (namespace.to_owned(), "pods".to_owned(), name.to_owned());
        if let Some(mut pod) = state.objects.get(&key).cloned() {
            pod["status"] = status;
            state.store(key, pod, "MODIFIED");
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding it has failed already; the data is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle(&self, method: &Method, path: &str, query: &str, body: &[u8]) -> Response<FakeBody> {
        let query = parse_query(query);
        let mut state = self.lock();
        state.requests.push(Recorded {
            method: method.to_string(),
            path: path.to_owned(),
            query: query.clone(),
        });
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (namespace, resource, name) = match parts.as_slice() {
            ["api", "v1", "namespaces", ns, resource] => (*ns, *resource, None),
            ["api", "v1", "namespaces", ns, resource, name] => (*ns, *resource, Some(*name)),
            _ => return status(404, "NotFound", &format!("the fake has no {path}")),
        };
        if !matches!(resource, "pods" | "secrets" | "persistentvolumeclaims") {
            return status(404, "NotFound", &format!("the fake has no {resource}"));
        }
        let key = |name: &str| (namespace.to_owned(), resource.to_owned(), name.to_owned());
        match (method.clone(), name) {
            (Method::POST, None) => {
                let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
                    return status(400, "BadRequest", "the body is not JSON");
                };
                let Some(name) = object["metadata"]["name"].as_str().map(str::to_owned) else {
                    return status(422, "Invalid", "metadata.name: Required value");
                };
                if state.objects.contains_key(&key(&name)) {
                    return status(
                        409,
                        "AlreadyExists",
                        &format!("{resource} \"{name}\" already exists"),
                    );
                }
                state.resource_version += 1;
                let meta = &mut object["metadata"];
                meta["namespace"] = json!(namespace);
                meta["uid"] = json!(format!("uid-{}", state.resource_version));
                meta["creationTimestamp"] = json!("2026-12-06T02:00:00Z");
                if resource == "pods" {
                    object["status"] = json!({"phase": "Pending"});
                }
                state.store(key(&name), object.clone(), "ADDED");
                if resource == "pods" {
                    let image = object["spec"]["containers"][0]["image"]
                        .as_str()
                        .unwrap_or("");
                    let missing = state.missing_images.contains(image).then(|| {
                        json!({"phase": "Pending", "containerStatuses": [{
                            "name": "env", "image": image, "imageID": "", "ready": false,
                            "restartCount": 0, "state": {"waiting": {"reason": "ErrImagePull",
                                "message": format!("failed to pull image \"{image}\": not found")}}
                        }]})
                    });
                    let status = missing.or_else(|| state.pod_status.clone()).unwrap_or_else(|| {
                        state.next_ip += 1;
                        json!({
                            "phase": "Running",
                            "podIP": format!("10.244.0.{}", state.next_ip),
                            "containerStatuses": [{
                                "name": "env", "image": object["spec"]["containers"][0]["image"],
                                "imageID": "", "ready": true, "restartCount": 0,
                                "state": {"running": {"startedAt": "2026-12-06T02:00:01Z"}}
                            }]
                        })
                    });
                    let mut running = object.clone();
                    running["status"] = status;
                    state.store(key(&name), running, "MODIFIED");
                }
                json_response(StatusCode::CREATED, &object)
            }
            (Method::GET, Some(name)) => match state.objects.get(&key(name)) {
                Some(object) => json_response(StatusCode::OK, object),
                None => not_found(resource, name),
            },
            (Method::GET, None) => {
                let selector = Selector::from_query(&query);
                let items: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|((ns, r, _), o)| {
                        ns == namespace && r == resource && selector.matches(o)
                    })
                    .map(|(_, o)| o.clone())
                    .collect();
                if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                    let (events, receiver) = mpsc::unbounded();
                    for item in items {
                        events.unbounded_send(event_line("ADDED", &item)).ok();
                    }
                    state.watchers.push(Watcher {
                        namespace: namespace.to_owned(),
                        resource: resource.to_owned(),
                        selector,
                        events,
                    });
                    let stream = receiver.map(|line| Ok::<_, Infallible>(Frame::data(line)));
                    return Response::builder()
                        .status(StatusCode::OK)
                        .header("content-type", "application/json")
                        .body(BodyExt::boxed(StreamBody::new(stream)))
                        .unwrap_or_else(|_| Response::new(empty()));
                }
                let kind = match resource {
                    "pods" => "PodList",
                    "secrets" => "SecretList",
                    _ => "PersistentVolumeClaimList",
                };
                json_response(
                    StatusCode::OK,
                    &json!({
                        "apiVersion": "v1", "kind": kind,
                        "metadata": {"resourceVersion": state.resource_version.to_string()},
                        "items": items,
                    }),
                )
            }
            (Method::PATCH, Some(name)) => {
                let Ok(patch) = serde_json::from_slice::<Value>(body) else {
                    return status(400, "BadRequest", "the patch is not JSON");
                };
                let Some(mut object) = state.objects.get(&key(name)).cloned() else {
                    return not_found(resource, name);
                };
                merge(&mut object, &patch);
                state.store(key(name), object.clone(), "MODIFIED");
                json_response(StatusCode::OK, &object)
            }
            (Method::DELETE, Some(name)) => match state.delete(namespace, resource, name) {
                Some(object) => json_response(StatusCode::OK, &object),
                None => not_found(resource, name),
            },
            _ => status(405, "MethodNotAllowed", "the fake does not do that"),
        }
    }
}

impl State {
    /// Stores `object` with a new resource version and tells the matching watches.
    fn store(&mut self, key: (String, String, String), mut object: Value, event: &str) {
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        self.notify(&key, &object, event);
        self.objects.insert(key, object);
    }

    fn notify(&mut self, key: &(String, String, String), object: &Value, event: &str) {
        let line = event_line(event, object);
        self.watchers.retain(|w| {
            if w.namespace != key.0 || w.resource != key.1 || !w.selector.matches(object) {
                return !w.events.is_closed();
            }
            w.events.unbounded_send(line.clone()).is_ok()
        });
    }

    /// Deletes an object and, for a Pod, the objects it owns (the garbage collector).
    fn delete(&mut self, namespace: &str, resource: &str, name: &str) -> Option<Value> {
        let key = (namespace.to_owned(), resource.to_owned(), name.to_owned());
        let object = self.objects.remove(&key)?;
        self.notify(&key, &object, "DELETED");
        if let Some(uid) = object["metadata"]["uid"].as_str() {
            let owned: Vec<_> = self
                .objects
                .iter()
                .filter(|((ns, _, _), o)| {
                    ns == namespace
                        && o["metadata"]["ownerReferences"]
                            .as_array()
                            .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
                })
                .map(|(k, _)| k.clone())
                .collect();
            for (ns, r, n) in owned {
                self.delete(&ns, &r, &n);
            }
        }
        Some(object)
    }
}

impl tower::Service<Request<kube::client::Body>> for FakeApiServer {
    type Response = Response<FakeBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<kube::client::Body>) -> Self::Future {
        let fake = self.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let uri = parts.uri;
            Ok(fake.handle(&parts.method, uri.path(), uri.query().unwrap_or(""), &body))
        })
    }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (key, value) in fields {
        if value.is_null() {
            if let Some(map) = target.as_object_mut() {
                map.remove(key);
            }
        } else {
            merge(&mut target[key.as_str()], value);
        }
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn empty() -> FakeBody {
    BodyExt::boxed(Full::new(Bytes::new()))
}

pub(super) fn json_response(code: StatusCode, value: &Value) -> Response<FakeBody> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(Full::new(Bytes::from(value.to_string()))))
        .unwrap_or_else(|_| Response::new(empty()))
}

fn not_found(resource: &str, name: &str) -> Response<FakeBody> {
    status(404, "NotFound", &format!("{resource} \"{name}\" not found"))
}

/// A `Status` body as the API server sends with an error.
pub fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

pub(super) fn status(code: u16, reason: &str, message: &str) -> Response<FakeBody> {
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &status_body(code, reason, message),
    )
}

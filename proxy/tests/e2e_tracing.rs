//! End to end: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, one `ssh` becomes one
//! trace holding spans of the proxy (the connection and its phases) and of
//! the control plane (its RPCs), received here by an in-process OTLP
//! collector while the real binaries run.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use support::{Fleet, FleetOptions, eventually};
use tokio_stream::wrappers::TcpListenerStream;

/// One received span: its trace, its name and the `service.name` of its process.
#[derive(Clone, Debug)]
struct Received {
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    name: String,
    service: String,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().expect("collector lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(Received {
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                    name: span.name,
                    service: service.clone(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The proxy's phases that every `ssh host true` passes through.
const PROXY_PHASES: [&str; 4] = ["auth", "placement", "exec_start", "session"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ssh_is_one_trace_across_proxy_and_control_plane() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the OTLP collector");
    let endpoint = format!(
        "http://{}",
        listener.local_addr().expect("collector address")
    );
    let collector = Collector::default();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint),
            // Export batches every 200 ms instead of every 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()),
        ],
        ..FleetOptions::default()
    })
    .await;
    fleet.ssh("demo", "true", None).await.assert_success();

    // The proxy's connection span ends after the client has gone, so poll (bounded).
    let spans = eventually(
        Duration::from_secs(30),
        "a trace with the connection, its phases and control-plane spans",
        || async {
            let spans = collector.0.lock().expect("collector lock").clone();
            // The harness's readiness probe is a connection too, one that never authenticates.
            let in_trace = |trace_id: &[u8], name: &str| {
                spans
                    .iter()
                    .any(|s| s.trace_id == trace_id && s.name == name)
            };
            let connections: Vec<&Received> = spans
                .iter()
                .filter(|s| s.service == "envgate-proxy" && s.name == "connection")
                .filter(|s| in_trace(&s.trace_id, "auth"))
                .collect();
            let [connection] = connections.as_slice() else {
                return Err(format!(
                    "want exactly one authenticated proxy connection span, have {}: {spans:#?}",
                    connections.len()
                ));
            };
            let trace: Vec<Received> = spans
                .iter()
                .filter(|s| s.trace_id == connection.trace_id)
                .cloned()
                .collect();
            let names: BTreeSet<(&str, &str)> = trace
                .iter()
                .map(|s| (s.service.as_str(), s.name.as_str()))
                .collect();
            let missing: Vec<&str> = PROXY_PHASES
                .into_iter()
                .filter(|p| !names.contains(&("envgate-proxy", *p)))
                .collect();
            let controlplane = trace.iter().any(|s| s.service == "envgate-controlplane");
            if missing.is_empty() && controlplane {
                Ok(trace)
            } else {
                Err(format!(
                    "trace {} lacks proxy phases {missing:?} or control-plane spans \
                     ({controlplane}); it has {names:?}",
                    hex(&connection.trace_id)
                ))
            }
        },
    )
    .await;

    // Joined, not merely sharing an id: every span but the root has its parent in the trace.
    let ids: BTreeMap<&[u8], &Received> = spans.iter().map(|s| (&s.span_id[..], s)).collect();
    for span in &spans {
        if span.name == "connection" {
            assert!(
                span.parent_span_id.is_empty(),
                "connection is the root: {span:?}"
            );
        } else {
            assert!(
                ids.contains_key(&span.parent_span_id[..]),
                "span {span:?} has no parent in its trace:\n{spans:#?}"
            );
        }
    }
    // Every control-plane span of this trace descends from a proxy span.
    for span in spans.iter().filter(|s| s.service == "envgate-controlplane") {
        let mut at: &Received = span;
        while at.service == "envgate-controlplane" {
            at = ids[&at.parent_span_id[..]];
        }
        assert_eq!(at.service, "envgate-proxy", "{span:?}");
    }
    // One ssh, one trace: its connection span is the only one with phases under it, and
    // every phase span of the proxy belongs to it.
    let all = collector.0.lock().expect("collector lock").clone();
    let stray: Vec<&Received> = all
        .iter()
        .filter(|s| s.service == "envgate-proxy" && PROXY_PHASES.contains(&s.name.as_str()))
        .filter(|s| s.trace_id != spans[0].trace_id)
        .collect();
    assert!(
        stray.is_empty(),
        "phase spans outside the ssh's trace: {stray:#?}"
    );
    server.abort();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

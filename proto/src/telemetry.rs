//! Distributed tracing: one trace per SSH connection, with spans from the
//! proxy and the control plane joined by W3C trace context carried in gRPC
//! metadata. Exported over OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! is set; otherwise no OpenTelemetry layer is installed and spans cost what
//! plain `tracing` spans cost.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::codegen::http::HeaderMap;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Flushes and stops the trace exporter when dropped (at process exit).
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("envgate: flushing traces failed: {err}");
        }
    }
}

/// Starts logging to stderr (`RUST_LOG`-style filter, JSON lines when
/// `json`) and, when `otlp_endpoint` is given, exports spans over OTLP.
/// Must be called inside the Tokio runtime (the exporter's channel lives there).
pub fn init(
    service: &'static str,
    json: bool,
    otlp_endpoint: Option<&str>,
) -> Result<TelemetryGuard, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithExportConfig;

    let provider = match otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    if json {
        registry
            .with(fmt.json().flatten_event(true).with_current_span(true))
            .init();
    } else {
        registry.with(fmt).init();
    }
    Ok(TelemetryGuard { provider })
}

/// Writes the current span's trace context into outgoing gRPC metadata.
pub fn inject_context(metadata: &mut MetadataMap) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
}

/// Makes the W3C trace context in incoming request headers (gRPC metadata)
/// the parent of `span`.
pub fn adopt_context(span: &tracing::Span, headers: &HeaderMap) {
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    // Fails only when no OpenTelemetry layer is installed: nothing to join.
    let _ = span.set_parent(cx);
}

/// The span of one incoming gRPC call, for tonic's `Server::trace_fn`: named
/// after the method, and a child of the caller's span when the request
/// carries trace context, so the server's spans join the caller's trace.
pub fn rpc_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    // The proxy's connection id, so a failure's log line (and its request id) can be found
    // from the proxy's log of the same connection.
    let connection = request
        .headers()
        .get(crate::metadata::CONNECTION_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "rpc",
        otel.name = %request.uri().path(),
        otel.kind = "server",
        connection = %connection
    );
    adopt_context(&span, request.headers());
    span
}

/// A tonic client interceptor that propagates the caller's trace context.
pub fn propagate(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    inject_context(request.metadata_mut());
    Ok(request)
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

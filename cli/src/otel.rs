//! OTLP trace export (HTTP, protobuf), on when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (Tempo in compose): the workers' `run/<task>` spans go to the
//! global tracer provider installed here, batched on a thread of their own, and are flushed at exit. The
//! service name is `OTEL_SERVICE_NAME`, else `celeriac`; the SDK's other `OTEL_*` variables apply.

use opentelemetry_sdk::trace::SdkTracerProvider;

/// The installed provider, flushed by [`Otel::shutdown`].
pub struct Otel(Option<SdkTracerProvider>);

/// Installs the exporter when an OTLP endpoint is configured.
pub fn init() -> anyhow::Result<Otel> {
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var(k).is_ok_and(|v| !v.is_empty()));
    if !configured {
        return Ok(Otel(None));
    }
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .map_err(|e| anyhow::anyhow!("OTLP exporter: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("celeriac");
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    celeriac_worker::trace::record_spans();
    Ok(Otel(Some(provider)))
}

impl Otel {
    /// Exports what is still buffered.
    pub fn shutdown(self) {
        if let Some(p) = self.0
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "flushing traces failed");
        }
    }
}

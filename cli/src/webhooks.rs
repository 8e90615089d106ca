//! `celeriac webhooks`: the HTTP endpoints peers call back (`POST /webhooks/stripe` for the payment family
//! when `payment.webhook_secret` is set; `POST /webhooks/shopify/{tenant}` for catalog and data-sync), plus
//! `/metrics` and `/health`. Every request is verified before anything is read; the first SIGTERM/SIGINT stops
//! it after in-flight requests.

use crate::settings::GlobalArgs;
use anyhow::Context;
use celeriac_domain::{Db, Platform};
use celeriac_tasks_payment::PaymentConfig;
use celeriac_tasks_payment::events::{Endpoint, EnqueueEvent, router};
use clap::Args;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

/// `celeriac webhooks` options.
#[derive(Debug, Args)]
pub struct WebhooksArgs {
    /// Where to listen (default: `payment.webhook_addr`, else 127.0.0.1:9080); port 0 picks one.
    #[arg(long)]
    pub addr: Option<SocketAddr>,
}

/// Serves the webhook endpoints until a signal.
pub async fn run(global: &GlobalArgs, args: WebhooksArgs) -> anyhow::Result<i32> {
    let resolved = global.resolve()?;
    let database = resolved.database();
    let db = Db::connect(&database)
        .await
        .context("connecting as database_url")?;
    db.check_ready(&database).await?;
    let mut platform = Platform::new(
        database.clone(),
        Some(Arc::new(celeriac_domain::Tenants::new(db.clone()))),
        resolved.config.sections.clone(),
    );
    let config: PaymentConfig = platform
        .section("payment")
        .map_err(anyhow::Error::msg)?
        .unwrap_or_default();
    config.validate().map_err(anyhow::Error::msg)?;
    let secret = config.webhook_secret().map_err(anyhow::Error::msg)?;
    let addr = match (args.addr, &config.webhook_addr) {
        (Some(a), _) => a,
        (None, Some(a)) => a
            .parse()
            .with_context(|| format!("payment.webhook_addr {a:?}"))?,
        (None, None) => "127.0.0.1:9080".parse()?,
    };
    let sync = celeriac_tasks_sync::family(&mut platform).map_err(anyhow::Error::msg)?;
    let mut registry = platform.into_metrics();
    let metrics = Arc::new(celeriac_tasks_payment::metrics::PaymentMetrics::new(
        &mut registry,
        config.metrics_tenant_label,
    ));
    let registry = Arc::new(Mutex::new(registry));
    let canvas = resolved.canvas().await?;
    let queue = config.events_queue.clone();
    let enqueue: EnqueueEvent = Arc::new(move |event_id: String| {
        let canvas = canvas.clone();
        let queue = queue.clone();
        Box::pin(async move {
            let sig = serde_json::json!({"task": "payment.apply_event", "args": [], "kwargs": {"event_id": event_id},
                "options": {"queue": queue}, "subtask_type": null, "immutable": false});
            canvas
                .apply(&sig, &[], Default::default())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    });
    let render = {
        let registry = Arc::clone(&registry);
        Arc::new(move || {
            let mut out = String::new();
            let _ = prometheus_client::encoding::text::encode(
                &mut out,
                &registry.lock().expect("registry"),
            );
            out
        })
    };
    let mut app = celeriac_tasks_sync::webhook::router(sync);
    match secret {
        Some(secret) => {
            app = app.merge(router(Endpoint {
                secret: secret.into(),
                db,
                enqueue,
                metrics,
                render_metrics: render,
            }))
        }
        None => {
            tracing::warn!(
                "payment.webhook_secret is not set: POST /webhooks/stripe is not served"
            );
            app = app
                .route(
                    "/metrics",
                    axum::routing::get(move || {
                        let r = render.clone();
                        async move { r() }
                    }),
                )
                .route("/health", axum::routing::get(|| async { "ok" }));
        }
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    info!(address = %listener.local_addr()?, "celeriac webhooks listening");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
        .await?;
    Ok(0)
}

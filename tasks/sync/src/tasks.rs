//! The Celery tasks of the family: `catalog.ingest` and `sync.run` (both the incremental engine),
//! `sync.status`, `sync.dispatch` (the beat entry that keeps every tenant fresh), the read tasks
//! `catalog.products`, `catalog.product`, `sync.orders`, and `vision.embed_product`, which records image
//! embedding requests where the vision family is not built in (where it is, its own task answers them).

use crate::config::SyncConfig;
use crate::engine::{self, FollowUp, Mode, Run, RunError, RunOutcome};
use crate::handlers;
use crate::metrics::SyncMetrics;
use crate::source::{Shopify, ShopifySettings, SourceError, Stream};
use crate::store;
use celeriac_domain::secret::Sealer;
use celeriac_domain::{Tenant, TenantTx, Tenants};
use celeriac_task::{
    ExceptionInfo, Registry, TaskContext, TaskError, TaskOptions, backoff, random_unit,
};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Everything the tasks share.
pub struct SyncFamily {
    /// `[sync]`.
    pub config: SyncConfig,
    /// The domain database, or why there is none.
    pub tenants: Result<Arc<Tenants>, String>,
    /// Opens sealed tokens, or why it cannot.
    pub sealer: Result<Arc<Sealer>, String>,
    /// Metrics.
    pub metrics: Arc<SyncMetrics>,
}

fn configuration(m: impl Into<String>) -> TaskError {
    TaskError::celeriac("ConfigurationError", m)
}

/// A string argument (or none).
pub fn string(field: &str, v: &Value) -> Result<Option<String>, TaskError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => Err(TaskError::value_error(format!(
            "{field}: expected a string, got {other}"
        ))),
    }
}

/// A required, non-empty string argument.
pub fn required(field: &str, v: &Value) -> Result<String, TaskError> {
    string(field, v)?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| TaskError::value_error(format!("{field} is required")))
}

/// The context of a sealed token: bound to the tenant, so one tenant's cannot open as another's.
pub fn token_context(tenant: &uuid::Uuid) -> String {
    format!("sync-source-token:{tenant}")
}

/// The context of a sealed webhook secret.
pub fn webhook_context(tenant: &uuid::Uuid) -> String {
    format!("sync-webhook-secret:{tenant}")
}

impl SyncFamily {
    /// The domain database.
    pub fn tenants(&self) -> Result<&Arc<Tenants>, TaskError> {
        self.tenants.as_ref().map_err(configuration)
    }

    /// The sealer.
    pub fn sealer(&self) -> Result<&Arc<Sealer>, TaskError> {
        self.sealer.as_ref().map_err(configuration)
    }

    /// A transaction for `tenant`.
    pub async fn tx(&self, tenant: &Tenant) -> Result<TenantTx, TaskError> {
        Ok(TenantTx::begin(self.tenants()?.db(), tenant.clone()).await?)
    }

    async fn source(&self, tenant: &Tenant) -> Result<Shopify, TaskError> {
        let tx = self.tx(tenant).await?;
        let row = store::source(&tx).await?;
        tx.commit().await?;
        let row = row.ok_or_else(|| configuration(format!(
            "tenant {} has no source: celeriac tenants set-source {} --kind shopify --url URL --token-env VAR",
            tenant.slug, tenant.slug)))?;
        if !row.enabled {
            return Err(TaskError::celeriac(
                "SourceDisabled",
                format!(
                    "the source of tenant {} is disabled: {} (set it again with celeriac tenants set-source)",
                    tenant.slug,
                    row.last_error.unwrap_or_default()
                ),
            ));
        }
        let token = self
            .sealer()?
            .open(&token_context(&tenant.id), &row.token)
            .map_err(|e| configuration(e.to_string()))?;
        Shopify::new(&ShopifySettings {
            url: row.url,
            api_version: row.api_version,
            token,
            page_size: self.config.page_size,
            capacity: self.config.bucket_capacity,
            margin: self.config.bucket_margin,
            leak_per_s: self.config.leak_per_s,
            max_tries: self.config.page_tries,
            timeout: self.config.request_timeout,
        })
        .map_err(configuration)
    }

    /// Runs (or resumes) a pass of `stream` for the tenant named by `tenant_value`.
    pub async fn run_stream(
        &self,
        ctx: &TaskContext,
        tenant_value: &str,
        stream: Stream,
        mode: Mode,
    ) -> Result<Value, TaskError> {
        let tenants = self.tenants()?;
        let tenant = tenants.resolve(tenant_value).await?;
        let source = self.source(&tenant).await?;
        let handler = handlers::handler(stream);
        let follow_up: Option<FollowUp> = (stream == Stream::Products).then(|| {
            let ctx = ctx.clone();
            let queue = self.config.embed_queue.clone();
            let tid = tenant.id.to_string();
            Arc::new(move |requests: Vec<Value>| {
                let ctx = ctx.clone();
                let queue = queue.clone();
                let tid = tid.clone();
                Box::pin(async move {
                    for r in requests {
                        let sig = json!({"task": "vision.embed_product", "args": [],
                            "kwargs": {"tenant_id": tid, "product_id": r["product_id"], "image_id": r["image_id"],
                                       "src": r["src"], "content_hash": r["content_hash"]},
                            "options": {"queue": queue}, "subtask_type": null, "immutable": false});
                        if let Err(e) = ctx.apply_untracked(&sig).await {
                            warn!(error = %e, "publishing an embedding request failed; it stays pending in catalog_embed_requests");
                        }
                    }
                }) as futures::future::BoxFuture<'static, ()>
            }) as FollowUp
        });
        let observer = Observed {
            metrics: self.metrics.as_ref(),
            peers: &ctx.peers,
            peer: format!("shop:{}", source.host()),
        };
        let run = Run {
            tenants,
            tenant: &tenant,
            source: &source,
            handler: handler.as_ref(),
            mode,
            lease: Duration::from_secs_f64(self.config.lease),
            owner: &ctx.id,
            limiter: ctx.limiter.as_ref(),
            observer: &observer,
            follow_up: follow_up.as_ref(),
        };
        match engine::run(&run).await {
            Ok(RunOutcome::Busy) => Ok(
                json!({"stream": stream.as_str(), "skipped": "another run of this stream is in progress"}),
            ),
            Ok(RunOutcome::Done {
                counts,
                cursor,
                pages,
            }) => {
                self.metrics.records(
                    &tenant.slug,
                    stream,
                    counts.upserted,
                    counts.unchanged,
                    counts.deleted,
                );
                self.metrics.lag(&tenant.slug, stream, 0.0);
                if stream == Stream::Products {
                    self.refresh_embed_pending(&tenant).await;
                }
                info!(tenant = %tenant.slug, stream = stream.as_str(), pages, fetched = counts.fetched,
                      upserted = counts.upserted, unchanged = counts.unchanged, deleted = counts.deleted, "sync pass done");
                Ok(
                    json!({"fetched": counts.fetched, "upserted": counts.upserted, "unchanged": counts.unchanged,
                          "deleted": counts.deleted, "cursor": engine::cursor_json(&cursor), "pages": pages}),
                )
            }
            Err(e) => {
                let (message, outcome) = match e {
                    RunError::Source(SourceError::Unauthorized { status, message }) => {
                        let why = format!("the shop refused the token ({status}): {message}");
                        if let Ok(tx) = self.tx(&tenant).await {
                            let _ = store::disable_source(&tx, &why).await;
                            let _ = tx.commit().await;
                        }
                        (why.clone(), TaskError::celeriac("SourceUnauthorized", why))
                    }
                    RunError::Source(SourceError::Transient { message }) => {
                        let wait = backoff(5.0, ctx.retries, 600.0, true, random_unit()).max(1.0);
                        (
                            message.clone(),
                            TaskError::transient(
                                ExceptionInfo::new(
                                    "celeriac.exceptions",
                                    "SourceUnavailable",
                                    message,
                                ),
                                wait,
                                Some(self.config.max_retries),
                            ),
                        )
                    }
                    RunError::Source(e @ SourceError::Rejected { .. }) => (
                        e.to_string(),
                        TaskError::celeriac("SourceError", e.to_string()),
                    ),
                    RunError::Record(m) => (m.clone(), TaskError::celeriac("SourceError", m)),
                    RunError::Db(e) => (e.to_string(), TaskError::from(e)),
                };
                engine::record_failure(tenants, &tenant, stream, &ctx.id, &message).await;
                warn!(tenant = %tenant.slug, stream = stream.as_str(), "sync run stopped: {message}");
                Err(outcome)
            }
        }
    }

    async fn refresh_embed_pending(&self, tenant: &Tenant) {
        let Ok(tx) = self.tx(tenant).await else {
            return;
        };
        if let Ok(Some(r)) = tx
            .one("SELECT count(*) AS n FROM catalog_embed_requests WHERE tenant_id = $1 AND status = 'pending'", vec![])
            .await
            && let Ok(n) = r.try_get::<i64>("", "n")
        {
            self.metrics.embed_pending(&tenant.slug, n);
        }
        let _ = tx.commit().await;
    }

    /// `sync.dispatch`: one run per tenant with a source and stream that is not running, on the dispatch queue.
    async fn dispatch(
        &self,
        ctx: &TaskContext,
        streams: &[Stream],
        mode: Mode,
    ) -> Result<Value, TaskError> {
        let tenants = self.tenants()?;
        let (mut published, mut skipped) = (0, 0);
        for tenant in tenants.all().await? {
            let tx = self.tx(&tenant).await?;
            let source = store::source(&tx).await?;
            let running: Vec<String> = tx
                .all(
                    "SELECT stream FROM sync_state WHERE tenant_id = $1 AND lease_until > now()",
                    vec![],
                )
                .await?
                .iter()
                .filter_map(|r| r.try_get::<String>("", "stream").ok())
                .collect();
            tx.commit().await?;
            if !source.is_some_and(|s| s.enabled) {
                continue;
            }
            for stream in streams {
                if running.iter().any(|r| r == stream.as_str()) {
                    skipped += 1;
                    continue;
                }
                let (task, kwargs) = match stream {
                    Stream::Products => (
                        "catalog.ingest",
                        json!({"tenant_id": tenant.id.to_string(), "mode": mode.as_str()}),
                    ),
                    s => (
                        "sync.run",
                        json!({"tenant_id": tenant.id.to_string(), "stream": s.as_str(), "mode": mode.as_str()}),
                    ),
                };
                let sig = json!({"task": task, "args": [], "kwargs": kwargs,
                    "options": {"queue": self.config.dispatch_queue}, "subtask_type": null, "immutable": false});
                ctx.apply_untracked(&sig).await?;
                published += 1;
            }
        }
        Ok(json!({"published": published, "skipped_running": skipped}))
    }
}

/// Metrics and the shop's health from each call.
struct Observed<'a> {
    metrics: &'a SyncMetrics,
    peers: &'a celeriac_task::Peers,
    peer: String,
}

impl crate::source::FetchObserver for Observed<'_> {
    fn call(&self, stream: Stream, status: u16) {
        self.metrics.call(stream, status);
        match status {
            0 => self.peers.down(&self.peer, "no answer from the shop"),
            500..=599 => self
                .peers
                .down(&self.peer, &format!("the shop answered {status}")),
            _ => self.peers.up(&self.peer),
        }
    }
    fn throttled(&self, seconds: f64) {
        self.metrics.throttled(seconds);
    }
    fn bucket(&self, used: u32, capacity: u32) {
        self.metrics.bucket(used, capacity);
    }
}

fn mode_arg(v: &Value) -> Result<Mode, TaskError> {
    match string("mode", v)?.as_deref() {
        None | Some("incremental") => Ok(Mode::Incremental),
        Some("full") => Ok(Mode::Full),
        Some(other) => Err(TaskError::value_error(format!(
            "mode: expected \"incremental\" or \"full\", got {other:?}"
        ))),
    }
}

fn stream_arg(v: &Value) -> Result<Stream, TaskError> {
    let s = required("stream", v)?;
    Stream::parse(&s).ok_or_else(|| {
        TaskError::value_error(format!(
            "stream: expected products, orders or customers, got {s:?}"
        ))
    })
}

/// A non-negative integer argument (`limit`, `offset`).
pub fn limit(v: &Value, default: i64, field: &str) -> Result<i64, TaskError> {
    match v {
        Value::Null => Ok(default),
        v => v
            .as_i64()
            .filter(|n| *n >= 0 && !v.is_boolean())
            .ok_or_else(|| {
                TaskError::value_error(format!("{field}: expected a non-negative integer, got {v}"))
            }),
    }
}

/// Registers the tasks over `family`.
pub fn register(registry: &mut Registry, family: Arc<SyncFamily>) {
    let late = TaskOptions {
        acks_late: Some(true),
        ..Default::default()
    };
    let f = Arc::clone(&family);
    registry.task(
        "catalog.ingest",
        &["tenant_id", "mode?"],
        late.clone(),
        move |ctx: TaskContext, (t, m): (Value, Value)| {
            let f = Arc::clone(&f);
            async move {
                f.run_stream(
                    &ctx,
                    &required("tenant_id", &t)?,
                    Stream::Products,
                    mode_arg(&m)?,
                )
                .await
            }
        },
    );
    let f = Arc::clone(&family);
    registry.task(
        "sync.run",
        &["tenant_id", "stream", "mode?"],
        late.clone(),
        move |ctx: TaskContext, (t, s, m): (Value, Value, Value)| {
            let f = Arc::clone(&f);
            async move {
                f.run_stream(
                    &ctx,
                    &required("tenant_id", &t)?,
                    stream_arg(&s)?,
                    mode_arg(&m)?,
                )
                .await
            }
        },
    );
    let f = Arc::clone(&family);
    registry.task(
        "sync.dispatch",
        &["streams?", "mode?"],
        TaskOptions::default(),
        move |ctx: TaskContext, (s, m): (Value, Value)| {
            let f = Arc::clone(&f);
            async move {
                let streams = match &s {
                    Value::Null => Stream::ALL.to_vec(),
                    Value::Array(a) => a.iter().map(stream_arg).collect::<Result<_, _>>()?,
                    other => {
                        return Err(TaskError::value_error(format!(
                            "streams: expected a list, got {other}"
                        )));
                    }
                };
                f.dispatch(&ctx, &streams, mode_arg(&m)?).await
            }
        },
    );
    let f = Arc::clone(&family);
    registry.task("sync.status", &["tenant_id"], TaskOptions::default(), move |_ctx: TaskContext, (t,): (Value,)| {
        let f = Arc::clone(&f);
        async move {
            let tenant = f.tenants()?.resolve(&required("tenant_id", &t)?).await?;
            let tx = f.tx(&tenant).await?;
            let source = store::source(&tx).await?;
            let streams = store::states(&tx).await?;
            tx.commit().await?;
            for s in &streams {
                if let (Some(stream), Some(lag)) = (s["stream"].as_str().and_then(Stream::parse), s["lag_seconds"].as_f64()) {
                    f.metrics.lag(&tenant.slug, stream, lag);
                }
            }
            Ok(json!({
                "tenant": tenant.slug,
                "source": source.map(|s| json!({"kind": s.kind, "url": s.url, "api_version": s.api_version,
                                                "enabled": s.enabled, "last_error": s.last_error})),
                "streams": streams,
            }))
        }
    });
    crate::reads::register(registry, Arc::clone(&family));
}

//! The family's state. Recording batches concurrent calls into one statement per tenant (a flush task takes
//! whatever is waiting; each caller is answered once its rows are committed). Each tenant's newest model
//! version is checked at most every `refresh_ms` and a newer one replaces the old in the executor on its
//! next request (the hot swap). Popularity is read the same way. Training reads the tenant's interactions,
//! trains on a blocking thread and stores a new version.

use crate::config::RecommendConfig;
use crate::data::{Dataset, Split};
use crate::metrics::{OutcomeLabel, RecommendMetrics};
use crate::model::SasRecConfig;
use crate::serve::{Query, Request, TransformerRunner};
use crate::store::{self, Record};
use crate::train::{TrainOptions, fit};
use crate::weights::{Blob, Meta, record_bytes};
use celeriac_domain::{DomainError, Tenant, TenantTx, Tenants};
use celeriac_inference::executor::BoxedRunner;
use celeriac_inference::{BatchSettings, Device, Executor};
use celeriac_task::TaskError;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OnceCell, oneshot};
use uuid::Uuid;

/// Popular products kept per tenant.
const POPULAR: usize = 1000;

type Scores = Executor<Request, Vec<f32>>;

/// Products and their share of interactions, most popular first.
type Popular = Arc<Vec<(String, f32)>>;

/// One tenant's newest model as this worker knows it.
#[derive(Debug, Default)]
struct Slot {
    blob: Option<Arc<Blob>>,
    checked: Option<Instant>,
}

struct Pending {
    tenant: Tenant,
    record: Record,
    reply: oneshot::Sender<Result<bool, String>>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Pending>,
    flushing: Option<tokio::task::JoinHandle<()>>,
}

/// The family's shared state.
pub struct Recommend {
    /// The `[recommend]` section.
    pub config: RecommendConfig,
    metrics: Arc<RecommendMetrics>,
    tenants: Result<Arc<Tenants>, String>,
    executor: OnceCell<Result<Arc<Scores>, String>>,
    slots: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<Slot>>>>,
    popular: Mutex<HashMap<Uuid, (Instant, Popular)>>,
    queue: Arc<Mutex<Queue>>,
}

impl std::fmt::Debug for Recommend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recommend")
            .field("config", &self.config)
            .finish()
    }
}

impl Drop for Recommend {
    fn drop(&mut self) {
        if let Some(h) = self.queue.lock().ok().and_then(|mut q| q.flushing.take()) {
            h.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Recommend {
    /// The family over `config`; nothing is loaded yet.
    pub fn new(
        config: RecommendConfig,
        metrics: Arc<RecommendMetrics>,
        tenants: Result<Arc<Tenants>, String>,
    ) -> Self {
        Self {
            config,
            metrics,
            tenants,
            executor: OnceCell::new(),
            slots: Mutex::default(),
            popular: Mutex::default(),
            queue: Arc::default(),
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &RecommendMetrics {
        &self.metrics
    }

    fn tenants(&self) -> Result<&Arc<Tenants>, DomainError> {
        self.tenants
            .as_ref()
            .map_err(|_| DomainError::NotConfigured("database_url".into()))
    }

    /// The tenant named by `value` (id or slug).
    pub async fn tenant(&self, value: &str) -> Result<Tenant, DomainError> {
        self.tenants()?.resolve(value).await
    }

    /// A transaction for `tenant`.
    pub async fn begin(&self, tenant: &Tenant) -> Result<TenantTx, DomainError> {
        TenantTx::begin(self.tenants()?.db(), tenant.clone()).await
    }

    /// Every tenant.
    pub async fn all_tenants(&self) -> Result<Vec<Tenant>, DomainError> {
        self.tenants()?.all().await
    }

    /// Records one interaction; returns once it is committed (batched with concurrent calls): `true` when
    /// this call wrote it, `false` when the tenant already had its key (a redelivered task, a resent event).
    pub async fn record(&self, tenant: Tenant, record: Record) -> Result<bool, TaskError> {
        let tenants = Arc::clone(self.tenants()?);
        let (reply, answer) = oneshot::channel();
        {
            let mut q = lock(&self.queue);
            q.waiting.push(Pending {
                tenant,
                record,
                reply,
            });
            // The flush task clears `flushing` under this lock when it finds nothing waiting, so a record
            // pushed here is either taken by the running flush or starts a new one (as it does after a flush
            // that ended any other way).
            if q.flushing.as_ref().is_none_or(|h| h.is_finished()) {
                let queue = Arc::clone(&self.queue);
                let max = self.config.record_batch;
                q.flushing = Some(tokio::spawn(flush(queue, tenants, max)));
            }
        }
        match answer.await {
            Ok(Ok(written)) => {
                if written {
                    self.metrics.recorded.inc();
                } else {
                    self.metrics.duplicates.inc();
                }
                Ok(written)
            }
            Ok(Err(e)) => Err(TaskError::celeriac("DatabaseError", e)),
            Err(_) => Err(TaskError::celeriac(
                "DatabaseError",
                "the recorder stopped before writing",
            )),
        }
    }

    async fn executor(&self) -> Result<Arc<Scores>, TaskError> {
        let r = self
            .executor
            .get_or_init(|| async {
                let config = self.config.clone();
                let metrics = Arc::clone(&self.metrics.batch);
                tokio::task::spawn_blocking(move || start_executor(&config, metrics))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r)
                    .map(Arc::new)
            })
            .await;
        r.clone()
            .map_err(|e| TaskError::celeriac("RecommendError", e))
    }

    /// Scores for `query` from `model`.
    pub async fn scores(&self, model: &Arc<Blob>, query: Query) -> Result<Vec<f32>, TaskError> {
        let request = Request {
            model: Arc::clone(model),
            query,
        };
        self.executor()
            .await?
            .submit(request)
            .await
            .map_err(|e| TaskError::celeriac("RecommendError", e.to_string()))
    }

    /// The tenant's newest model, checked against the table at most every `refresh_ms`.
    pub async fn model(&self, tenant: &Tenant) -> Result<Option<Arc<Blob>>, TaskError> {
        let slot = Arc::clone(lock(&self.slots).entry(tenant.id).or_default());
        let mut slot = slot.lock().await;
        let refresh = Duration::from_millis(self.config.refresh_ms);
        if slot.checked.is_some_and(|t| t.elapsed() < refresh) {
            return Ok(slot.blob.clone());
        }
        let tx = self.begin(tenant).await?;
        let newest = store::latest_version(&tx).await?;
        let current = slot.blob.as_ref().map(|b| b.version);
        if newest != current {
            slot.blob = match newest {
                None => None,
                Some(v) => match store::load_model(&tx, v).await? {
                    Some(m) => Some(Arc::new(
                        Blob::new(tenant.id, m.version, m.weights, m.meta)
                            .map_err(|e| TaskError::celeriac("RecommendError", e))?,
                    )),
                    None => slot.blob.take(),
                },
            };
        }
        tx.commit().await?;
        slot.checked = Some(Instant::now());
        Ok(slot.blob.clone())
    }

    /// The tenant's most popular products with their share of interactions, refreshed every `refresh_ms`.
    pub async fn popular(&self, tenant: &Tenant) -> Result<Popular, TaskError> {
        let refresh = Duration::from_millis(self.config.refresh_ms);
        if let Some((at, p)) = lock(&self.popular).get(&tenant.id)
            && at.elapsed() < refresh
        {
            return Ok(Arc::clone(p));
        }
        let tx = self.begin(tenant).await?;
        let p = Arc::new(store::popular(&tx, POPULAR).await?);
        tx.commit().await?;
        lock(&self.popular).insert(tenant.id, (Instant::now(), Arc::clone(&p)));
        Ok(p)
    }

    /// Trains the tenant's model on its interactions and stores a new version (or reports that popularity
    /// keeps answering when there is too little data).
    pub async fn train(
        &self,
        tenant: &Tenant,
        epochs: Option<usize>,
        seed: Option<u64>,
    ) -> Result<Value, TaskError> {
        let started = Instant::now();
        let tx = self.begin(tenant).await?;
        let events = store::interactions(&tx).await?;
        tx.commit().await?;
        let data = Dataset::build(events);
        let customers = data.users.len();
        let interactions = data.interactions();
        let eligible = data.sequences.iter().filter(|s| s.len() >= 3).count();
        if interactions < self.config.min_interactions || eligible < self.config.min_customers {
            self.count_training("popularity");
            return Ok(json!({
                "version": null,
                "model": "popularity",
                "customers": customers,
                "items": data.item_count(),
                "interactions": interactions,
                "epochs": 0,
                "valid_ndcg10": null,
                "seconds": round3(started.elapsed().as_secs_f64()),
                "reason": format!(
                    "too little data: {interactions} interactions (at least {} needed), {eligible} customers \
                     with 3 or more (at least {} needed)",
                    self.config.min_interactions, self.config.min_customers
                ),
            }));
        }
        let c = &self.config;
        let options = TrainOptions {
            epochs: epochs.unwrap_or(c.epochs),
            patience: c.patience,
            batch_size: 128,
            learning_rate: c.learning_rate,
            seed: seed.unwrap_or(42),
            model: SasRecConfig::new(0)
                .with_dim(c.dim)
                .with_max_len(c.max_len)
                .with_dropout(c.dropout),
        };
        let items = data.item_count();
        let (trained, bytes) = tokio::task::spawn_blocking(move || {
            type B = burn::backend::Autodiff<burn::backend::Flex>;
            let split = Split::for_serving(&data.sequences);
            let t = fit::<B>(
                &split.train,
                &split.valid,
                items,
                &options,
                &Default::default(),
            );
            let bytes = record_bytes(t.model.clone());
            (t, bytes.map(|b| (b, data)))
        })
        .await
        .map_err(|e| TaskError::celeriac("RecommendError", format!("training panicked: {e}")))?;
        let (bytes, data) = bytes.map_err(|e| TaskError::celeriac("RecommendError", e))?;
        let figures = json!({
            "customers": customers,
            "items": items,
            "interactions": interactions,
            "epochs": trained.epochs,
            "best_epoch": trained.best_epoch,
            "valid_hr10": round4(trained.valid_hr10),
            "valid_ndcg10": round4(trained.valid_ndcg10),
            "train_seconds": round3(trained.seconds),
        });
        let meta = Meta {
            config: trained.config.clone(),
            items: data.items,
            figures: figures.clone(),
        };
        let meta = serde_json::to_value(&meta)
            .map_err(|e| TaskError::celeriac("RecommendError", e.to_string()))?;
        let tx = self.begin(tenant).await?;
        let version = store::save_model(&tx, bytes, meta, c.keep_versions).await?;
        tx.commit().await?;
        self.count_training("trained");
        tracing::info!(tenant = %tenant.slug, version, epochs = trained.epochs, valid_ndcg10 = trained.valid_ndcg10, "recommend: model trained");
        Ok(json!({
            "version": version,
            "model": format!("transformer v{version}"),
            "customers": customers,
            "items": items,
            "interactions": interactions,
            "epochs": trained.epochs,
            "valid_ndcg10": round4(trained.valid_ndcg10),
            "seconds": round3(started.elapsed().as_secs_f64()),
        }))
    }

    fn count_training(&self, outcome: &str) {
        self.metrics
            .trainings
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }
}

fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// Writes whatever waits, one statement per tenant per round, until nothing does.
async fn flush(queue: Arc<Mutex<Queue>>, tenants: Arc<Tenants>, max: usize) {
    loop {
        let batch: Vec<Pending> = {
            let mut q = lock(&queue);
            if q.waiting.is_empty() {
                q.flushing = None;
                return;
            }
            let n = q.waiting.len().min(max);
            q.waiting.drain(..n).collect()
        };
        let mut by_tenant: HashMap<Uuid, Vec<Pending>> = HashMap::new();
        for p in batch {
            by_tenant.entry(p.tenant.id).or_default().push(p);
        }
        for (_, pending) in by_tenant {
            let tenant = pending[0].tenant.clone();
            let records: Vec<Record> = pending.iter().map(|p| p.record.clone()).collect();
            let mut written = async {
                let tx = TenantTx::begin(tenants.db(), tenant).await?;
                let written = store::insert(&tx, &records).await?;
                tx.commit().await?;
                Ok::<_, DomainError>(written)
            }
            .await
            .map_err(|e| e.to_string());
            // One statement writes a key once: the first call carrying it is the one that wrote it.
            for p in pending {
                let answer = match &mut written {
                    Ok(keys) => Ok(keys.remove(&p.record.key)),
                    Err(e) => Err(e.clone()),
                };
                let _ = p.reply.send(answer);
            }
        }
    }
}

fn start_executor(
    config: &RecommendConfig,
    metrics: Arc<celeriac_inference::BatchMetrics>,
) -> Result<Scores, String> {
    let device =
        celeriac_inference::device::resolve("recommend", config.device, cfg!(feature = "cuda"));
    let settings = BatchSettings {
        max_batch: config.max_batch,
        max_wait: Duration::from_secs_f64(config.max_wait_ms / 1000.0),
        queue_capacity: config.queue_capacity,
    };
    let pool = match device {
        Device::Cpu => Some(celeriac_inference::device::cpu_pool(
            "recommend",
            config.threads,
        )?),
        Device::Cuda => None,
    };
    let load = move || -> Result<BoxedRunner<Request, Vec<f32>>, String> {
        match device {
            Device::Cpu => Ok(Box::new(TransformerRunner::<burn::backend::Flex>::new(
                Default::default(),
            ))),
            #[cfg(feature = "cuda")]
            Device::Cuda => Ok(Box::new(TransformerRunner::<burn::backend::Cuda>::new(
                Default::default(),
            ))),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => Err("no CUDA backend in this build".into()),
        }
    };
    Executor::start("recommend-executor", device, settings, metrics, pool, load)
        .map_err(|e| e.to_string())
}

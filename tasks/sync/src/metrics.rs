//! The family's metrics: records upserted, unchanged and deleted per stream, API calls by status, waits for
//! the rate limit, the shop's bucket, sync lag and image embedding requests pending.

use crate::source::{FetchObserver, Stream};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Tenant, stream and what happened to a record.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordLabels {
    /// Tenant slug.
    pub tenant: String,
    /// `products`, `orders`, `customers`.
    pub stream: String,
    /// `upserted`, `unchanged`, `deleted`.
    pub outcome: String,
}

/// Stream and HTTP status of an API call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// Stream.
    pub stream: String,
    /// HTTP status (`0`: no answer).
    pub status: String,
}

/// Tenant and stream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// Tenant slug.
    pub tenant: String,
    /// Stream.
    pub stream: String,
}

/// A tenant.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    /// Tenant slug.
    pub tenant: String,
}

/// The sync metrics.
#[derive(Debug, Default)]
pub struct SyncMetrics {
    records: Family<RecordLabels, Counter>,
    calls: Family<CallLabels, Counter>,
    throttled: Counter<f64, AtomicU64>,
    bucket: Gauge,
    lag: Family<StreamLabels, Gauge<f64, AtomicU64>>,
    embed_pending: Family<TenantLabel, Gauge>,
    tenant_label: bool,
}

impl SyncMetrics {
    /// Registers every series.
    pub fn new(registry: &mut Registry, tenant_label: bool) -> Self {
        let m = Self {
            tenant_label,
            ..Default::default()
        };
        registry.register(
            "celeriac_sync_records",
            "Records synced, by stream and outcome",
            m.records.clone(),
        );
        registry.register(
            "celeriac_sync_api_calls",
            "Calls to the shop's API, by stream and HTTP status",
            m.calls.clone(),
        );
        registry.register(
            "celeriac_sync_throttled_seconds",
            "Seconds waited for the shop's rate limit",
            m.throttled.clone(),
        );
        registry.register(
            "celeriac_sync_bucket_used",
            "The shop's leaky bucket as it last reported it",
            m.bucket.clone(),
        );
        registry.register(
            "celeriac_sync_lag_seconds",
            "Seconds since a stream last synced completely",
            m.lag.clone(),
        );
        registry.register(
            "celeriac_sync_embed_requests_pending",
            "Product images queued for embedding and not yet taken",
            m.embed_pending.clone(),
        );
        m
    }

    fn t(&self, tenant: &str) -> String {
        if self.tenant_label {
            tenant.into()
        } else {
            String::new()
        }
    }

    /// A run's counts.
    pub fn records(
        &self,
        tenant: &str,
        stream: Stream,
        upserted: u64,
        unchanged: u64,
        deleted: u64,
    ) {
        for (outcome, n) in [
            ("upserted", upserted),
            ("unchanged", unchanged),
            ("deleted", deleted),
        ] {
            self.records
                .get_or_create(&RecordLabels {
                    tenant: self.t(tenant),
                    stream: stream.as_str().into(),
                    outcome: outcome.into(),
                })
                .inc_by(n);
        }
    }

    /// Lag of a stream.
    pub fn lag(&self, tenant: &str, stream: Stream, seconds: f64) {
        self.lag
            .get_or_create(&StreamLabels {
                tenant: self.t(tenant),
                stream: stream.as_str().into(),
            })
            .set(seconds);
    }

    /// Embedding requests pending for a tenant.
    pub fn embed_pending(&self, tenant: &str, n: i64) {
        self.embed_pending
            .get_or_create(&TenantLabel {
                tenant: self.t(tenant),
            })
            .set(n);
    }
}

impl FetchObserver for SyncMetrics {
    fn call(&self, stream: Stream, status: u16) {
        self.calls
            .get_or_create(&CallLabels {
                stream: stream.as_str().into(),
                status: status.to_string(),
            })
            .inc();
    }
    fn throttled(&self, seconds: f64) {
        self.throttled.inc_by(seconds);
    }
    fn bucket(&self, used: u32, _capacity: u32) {
        self.bucket.set(i64::from(used));
    }
}

//! The `[sync]` section (catalog ingestion and data-sync). Shop tokens are not here: each tenant's source is
//! stored sealed (`celeriac tenants set-source`), under the key in `CELERIAC_SECRET_KEY`.

use serde::Deserialize;

/// `[sync]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Records per page (Shopify allows 250).
    pub page_size: u32,
    /// The shop's leaky bucket: capacity (Shopify REST: 40).
    pub bucket_capacity: u32,
    /// Requests left free in the bucket for the shop's other clients.
    pub bucket_margin: u32,
    /// The bucket's leak per second (Shopify REST: 2).
    pub leak_per_s: f64,
    /// Tries of one page (429, 5xx, connection errors) before the run stops and resumes later.
    pub page_tries: u32,
    /// Seconds one API call may take.
    pub request_timeout: f64,
    /// Seconds a run's lease holds without a committed page (one run per tenant and stream).
    pub lease: f64,
    /// Retries of a run that stopped on a transient source error (each resumes from the checkpoint).
    pub max_retries: i64,
    /// Queue `sync.dispatch` sends runs to.
    pub dispatch_queue: String,
    /// Queue image embedding requests go to.
    pub embed_queue: String,
    /// The webhook secret used when a tenant's source has none of its own (base64 HMAC key of the shop app).
    pub webhook_secret: Option<String>,
    /// Label metrics with the tenant slug.
    pub metrics_tenant_label: bool,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            page_size: 250,
            bucket_capacity: 40,
            bucket_margin: 4,
            leak_per_s: 2.0,
            page_tries: 6,
            request_timeout: 30.0,
            lease: 300.0,
            max_retries: 20,
            dispatch_queue: "bulk".into(),
            embed_queue: "bulk".into(),
            webhook_secret: None,
            metrics_tenant_label: true,
        }
    }
}

impl SyncConfig {
    /// Checks values types cannot; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=250).contains(&self.page_size) {
            return Err(format!(
                "sync.page_size must be 1..=250 (Shopify's limit), got {}",
                self.page_size
            ));
        }
        if self.bucket_margin >= self.bucket_capacity {
            return Err("sync.bucket_margin must be below sync.bucket_capacity".into());
        }
        for (k, v) in [
            ("leak_per_s", self.leak_per_s),
            ("request_timeout", self.request_timeout),
            ("lease", self.lease),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("sync.{k} must be positive"));
            }
        }
        Ok(())
    }
}

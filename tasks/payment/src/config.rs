//! The `[payment]` section. Secrets come from the environment (`CELERIAC_PAYMENT__SECRET_KEY`,
//! `CELERIAC_PAYMENT__WEBHOOK_SECRET`) or files (`secret_key_file`, `webhook_secret_file`); they are never
//! logged, stored in results or events, or shown by `Debug`.

use serde::Deserialize;

/// `[payment]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentConfig {
    /// Stripe's API base (`https://api.stripe.com/`; tests point it at a local Stripe-compatible server).
    pub api_base: String,
    /// The secret key (`sk_...`); better from `CELERIAC_PAYMENT__SECRET_KEY`.
    pub secret_key: Option<String>,
    /// A file holding the secret key.
    pub secret_key_file: Option<String>,
    /// The webhook endpoint's signing secret (`whsec_...`).
    pub webhook_secret: Option<String>,
    /// A file holding the webhook secret.
    pub webhook_secret_file: Option<String>,
    /// Where `celeriac webhooks` listens (`127.0.0.1:9080`); path `/webhooks/stripe`.
    pub webhook_addr: Option<String>,
    /// Queue of `payment.apply_event` tasks the webhook endpoint publishes.
    pub events_queue: String,
    /// Retries of a transient failure (429, 5xx, network) with the same idempotency key.
    pub max_retries: i64,
    /// Backoff factor in seconds (`factor * 2^tries`, full jitter).
    pub retry_backoff: f64,
    /// Cap of the backoff in seconds.
    pub retry_backoff_max: f64,
    /// Seconds Stripe keeps an idempotency key (24 h): an older unfinished charge is reconciled by searching
    /// its metadata instead of sending the key again.
    pub key_lifetime: f64,
    /// Seconds a claim holds before another attempt may take over.
    pub claim_lease: f64,
    /// Seconds one API call may take.
    pub request_timeout: f64,
    /// Label metrics with the tenant slug.
    pub metrics_tenant_label: bool,
}

impl Default for PaymentConfig {
    fn default() -> Self {
        Self {
            api_base: "https://api.stripe.com/".into(),
            secret_key: None,
            secret_key_file: None,
            webhook_secret: None,
            webhook_secret_file: None,
            webhook_addr: None,
            events_queue: "realtime".into(),
            max_retries: 10,
            retry_backoff: 1.0,
            retry_backoff_max: 300.0,
            key_lifetime: 86_400.0,
            claim_lease: 60.0,
            request_timeout: 20.0,
            metrics_tenant_label: true,
        }
    }
}

impl std::fmt::Debug for PaymentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaymentConfig")
            .field("api_base", &self.api_base)
            .field("secret_key", &self.secret_key.as_ref().map(|_| "***"))
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "***"),
            )
            .field("webhook_addr", &self.webhook_addr)
            .finish_non_exhaustive()
    }
}

fn secret(
    inline: &Option<String>,
    file: &Option<String>,
    key: &str,
) -> Result<Option<String>, String> {
    match (inline, file) {
        (Some(s), _) => Ok(Some(s.clone())),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|e| format!("payment.{key}_file {path:?}: {e}")),
        (None, None) => Ok(None),
    }
}

impl PaymentConfig {
    /// Checks values types cannot; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if !self.api_base.ends_with('/') {
            return Err(format!(
                "payment.api_base {:?} must end with '/' (requests go to <api_base>v1/...)",
                self.api_base
            ));
        }
        for (key, v) in [
            ("claim_lease", self.claim_lease),
            ("request_timeout", self.request_timeout),
            ("key_lifetime", self.key_lifetime),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!(
                    "payment.{key} must be a positive number of seconds"
                ));
            }
        }
        if self.claim_lease < self.request_timeout * 2.0 {
            return Err(
                "payment.claim_lease must be at least twice payment.request_timeout".into(),
            );
        }
        Ok(())
    }

    /// The secret key, from the inline value or its file.
    pub fn secret_key(&self) -> Result<Option<String>, String> {
        secret(&self.secret_key, &self.secret_key_file, "secret_key")
    }

    /// The webhook signing secret.
    pub fn webhook_secret(&self) -> Result<Option<String>, String> {
        secret(
            &self.webhook_secret,
            &self.webhook_secret_file,
            "webhook_secret",
        )
    }
}

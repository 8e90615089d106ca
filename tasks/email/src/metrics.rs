//! The family's metrics (on the worker's `/metrics`): mails sent, failures by reason, duplicates
//! suppressed, ambiguous claims held or resent, rate-limit waits, send latency and the outbox backlog.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A tenant label (empty when `email.metrics_tenant_label` is off).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    /// Tenant slug.
    pub tenant: String,
}

/// Tenant and failure reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// Tenant slug.
    pub tenant: String,
    /// `invalid`, `permanent`, `suppressed`, `retries_exhausted`.
    pub reason: String,
}

/// Why a mail failed (the `reason` label's closed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Bad arguments, a template that does not render.
    Invalid,
    /// The server refused for good.
    Permanent,
    /// A recipient is on the suppression list.
    Suppressed,
    /// Transient failures until `max_retries`.
    RetriesExhausted,
}

impl Failure {
    fn label(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Permanent => "permanent",
            Self::Suppressed => "suppressed",
            Self::RetriesExhausted => "retries_exhausted",
        }
    }
}

/// The email metrics.
#[derive(Debug)]
pub struct EmailMetrics {
    sent: Family<TenantLabel, Counter>,
    failed: Family<FailureLabels, Counter>,
    duplicates: Family<TenantLabel, Counter>,
    held: Family<TenantLabel, Counter>,
    resent: Family<TenantLabel, Counter>,
    rate_limited: Family<TenantLabel, Counter>,
    pending: Family<TenantLabel, Gauge>,
    send_seconds: Histogram,
    tenant_label: bool,
}

impl EmailMetrics {
    /// Registers every series in `registry`.
    pub fn new(registry: &mut Registry, tenant_label: bool) -> Self {
        let m = Self {
            sent: Family::default(),
            failed: Family::default(),
            duplicates: Family::default(),
            held: Family::default(),
            resent: Family::default(),
            rate_limited: Family::default(),
            pending: Family::default(),
            send_seconds: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            tenant_label,
        };
        registry.register(
            "celeriac_email_sent",
            "Mails the SMTP server accepted",
            m.sent.clone(),
        );
        registry.register(
            "celeriac_email_failed",
            "Mails that failed for good, by reason",
            m.failed.clone(),
        );
        registry.register(
            "celeriac_email_duplicates",
            "Sends of an idempotency key already sent: answered from the outbox, nothing sent",
            m.duplicates.clone(),
        );
        registry.register(
            "celeriac_email_held",
            "Claims that expired mid-send, kept as held (email.ambiguous = held)",
            m.held.clone(),
        );
        registry.register(
            "celeriac_email_resent",
            "Claims that expired mid-send, sent again with the same Message-ID (email.ambiguous = resend)",
            m.resent.clone(),
        );
        registry.register(
            "celeriac_email_rate_limited",
            "Sends that waited for the provider rate limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "celeriac_email_outbox_pending",
            "Outbox rows queued, sending or waiting for a retry (refreshed as mails go out)",
            m.pending.clone(),
        );
        registry.register(
            "celeriac_email_send_seconds",
            "Time of one SMTP conversation",
            m.send_seconds.clone(),
        );
        m
    }

    fn t(&self, tenant: &str) -> TenantLabel {
        TenantLabel {
            tenant: if self.tenant_label {
                tenant.to_string()
            } else {
                String::new()
            },
        }
    }

    /// A mail accepted.
    pub fn sent(&self, tenant: &str, seconds: f64) {
        self.sent.get_or_create(&self.t(tenant)).inc();
        self.send_seconds.observe(seconds);
    }

    /// A failed SMTP conversation's time.
    pub fn attempt(&self, seconds: f64) {
        self.send_seconds.observe(seconds);
    }

    /// A final failure.
    pub fn failed(&self, tenant: &str, why: Failure) {
        self.failed
            .get_or_create(&FailureLabels {
                tenant: self.t(tenant).tenant,
                reason: why.label().into(),
            })
            .inc();
    }

    /// A duplicate answered from the outbox.
    pub fn duplicate(&self, tenant: &str) {
        self.duplicates.get_or_create(&self.t(tenant)).inc();
    }

    /// An expired claim held.
    pub fn held(&self, tenant: &str) {
        self.held.get_or_create(&self.t(tenant)).inc();
    }

    /// An expired claim resent.
    pub fn resent(&self, tenant: &str) {
        self.resent.get_or_create(&self.t(tenant)).inc();
    }

    /// A rate-limit wait.
    pub fn rate_limited(&self, tenant: &str) {
        self.rate_limited.get_or_create(&self.t(tenant)).inc();
    }

    /// The tenant's backlog.
    pub fn pending(&self, tenant: &str, n: i64) {
        self.pending.get_or_create(&self.t(tenant)).set(n);
    }
}

//! The family's metrics: charges by outcome, idempotent replays, Stripe errors by type and code, refunds,
//! webhook events by type and duplicate, signature failures, and payments whose fate is unknown.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Tenant and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// Tenant slug (empty when tenant labels are off).
    pub tenant: String,
    /// `succeeded`, `requires_action`, `processing`, `declined`, `failed`, `unknown`.
    pub outcome: String,
}

/// A tenant.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    /// Tenant slug.
    pub tenant: String,
}

/// A Stripe error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `card_error`, `api_error`, `invalid_request_error`, `idempotency_error`, `network`, ...
    pub r#type: String,
    /// Stripe's code (`card_declined`, `rate_limit`, ...), or the HTTP status.
    pub code: String,
}

/// A webhook event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// Event type.
    pub r#type: String,
    /// `true` when the event id was already stored.
    pub duplicate: String,
}

/// The payment metrics.
#[derive(Debug, Default)]
pub struct PaymentMetrics {
    charges: Family<OutcomeLabels, Counter>,
    refunds: Family<OutcomeLabels, Counter>,
    replays: Family<TenantLabel, Counter>,
    errors: Family<ErrorLabels, Counter>,
    events: Family<EventLabels, Counter>,
    signature_failures: Counter,
    unknown: Family<TenantLabel, Counter>,
    tenant_label: bool,
}

impl PaymentMetrics {
    /// Registers every series.
    pub fn new(registry: &mut Registry, tenant_label: bool) -> Self {
        let m = Self {
            tenant_label,
            ..Default::default()
        };
        registry.register(
            "celeriac_payment_charges",
            "Charges by outcome",
            m.charges.clone(),
        );
        registry.register(
            "celeriac_payment_refunds",
            "Refunds by outcome",
            m.refunds.clone(),
        );
        registry.register(
            "celeriac_payment_replays",
            "Charges and refunds answered from their stored outcome (a redelivery or re-publish): nothing sent to Stripe",
            m.replays.clone(),
        );
        registry.register(
            "celeriac_payment_stripe_errors",
            "Stripe errors by type and code",
            m.errors.clone(),
        );
        registry.register(
            "celeriac_payment_webhook_events",
            "Webhook events received, by type and whether the id was seen before",
            m.events.clone(),
        );
        registry.register(
            "celeriac_payment_webhook_signature_failures",
            "Webhook requests refused for a missing or bad Stripe-Signature",
            m.signature_failures.clone(),
        );
        registry.register(
            "celeriac_payment_unknown",
            "Charges left in an unknown state (retries ran out): reconciled by re-running the charge or an event",
            m.unknown.clone(),
        );
        m
    }

    fn t(&self, tenant: &str) -> String {
        if self.tenant_label {
            tenant.to_string()
        } else {
            String::new()
        }
    }

    /// A charge ended with `outcome`.
    pub fn charge(&self, tenant: &str, outcome: &str) {
        self.charges
            .get_or_create(&OutcomeLabels {
                tenant: self.t(tenant),
                outcome: outcome.into(),
            })
            .inc();
        if outcome == "unknown" {
            self.unknown
                .get_or_create(&TenantLabel {
                    tenant: self.t(tenant),
                })
                .inc();
        }
    }

    /// A refund ended with `outcome`.
    pub fn refund(&self, tenant: &str, outcome: &str) {
        self.refunds
            .get_or_create(&OutcomeLabels {
                tenant: self.t(tenant),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// A replay.
    pub fn replay(&self, tenant: &str) {
        self.replays
            .get_or_create(&TenantLabel {
                tenant: self.t(tenant),
            })
            .inc();
    }

    /// A Stripe error.
    pub fn error(&self, kind: &str, code: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                r#type: kind.into(),
                code: code.into(),
            })
            .inc();
    }

    /// A webhook event.
    pub fn event(&self, kind: &str, duplicate: bool) {
        self.events
            .get_or_create(&EventLabels {
                r#type: kind.into(),
                duplicate: duplicate.to_string(),
            })
            .inc();
    }

    /// A refused signature.
    pub fn signature_failure(&self) {
        self.signature_failures.inc();
    }
}

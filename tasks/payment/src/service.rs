//! The outside peer: Stripe's API behind a small trait ([`PaymentApi`]) and its async-stripe implementation.
//! Every create call carries the caller's idempotency key (`RequestStrategy::Idempotent`: one attempt, the
//! same key on every try); retries happen at the task level. Answers are classified once, here.

use futures::future::BoxFuture;
use std::collections::HashMap;
use std::time::Duration;
use stripe::{Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_core::payment_intent::{
    CreatePaymentIntent, CreatePaymentIntentOffSession, SearchPaymentIntent,
};
use stripe_core::refund::CreateRefund;
use stripe_shared::{ApiErrors, ApiErrorsType, PaymentIntent};

/// A charge to create and confirm.
#[derive(Debug, Clone, PartialEq)]
pub struct ChargeRequest {
    /// Minor units.
    pub amount: i64,
    /// ISO 4217, lower case.
    pub currency: String,
    /// `pm_...`.
    pub payment_method: String,
    /// `cus_...`.
    pub customer: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Metadata (tenant and order included).
    pub metadata: HashMap<String, String>,
    /// The idempotency key.
    pub key: String,
}

/// A PaymentIntent as the family needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    /// `pi_...`.
    pub id: String,
    /// Stripe's status (`succeeded`, `requires_action`, `processing`, `requires_payment_method`, ...).
    pub status: String,
    /// Minor units.
    pub amount: i64,
    /// Currency.
    pub currency: String,
    /// The order it was created for (metadata).
    pub order_id: Option<String>,
    /// The attempt it was created for (metadata).
    pub attempt: Option<String>,
}

/// A refund as created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundOutcome {
    /// `re_...`.
    pub id: String,
    /// `succeeded`, `pending`, `failed`, ...
    pub status: String,
    /// Minor units.
    pub amount: i64,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiFailure {
    /// The card was declined (402 `card_error`): final for this attempt.
    Declined {
        /// Stripe's error code (`card_declined`, `expired_card`, ...).
        code: Option<String>,
        /// The issuer's decline code (`insufficient_funds`, ...).
        decline_code: Option<String>,
        /// Stripe's message.
        message: String,
        /// The PaymentIntent left behind.
        payment_intent: Option<String>,
    },
    /// Try again with the same key: 409 key in use, 429, `lock_timeout`, 5xx, the network, a timeout.
    Transient {
        /// HTTP status, when there was an answer.
        status: Option<u16>,
        /// What happened.
        message: String,
    },
    /// Refused for good: 400 `idempotency_error` (the key was used with other parameters: a bug) or another
    /// `invalid_request_error`, 404.
    Rejected {
        /// `idempotency_error`, `invalid_request_error`, ...
        kind: String,
        /// Stripe's error code.
        code: Option<String>,
        /// Stripe's message.
        message: String,
    },
    /// 401/403: the secret key is wrong.
    Unauthorized {
        /// Stripe's message.
        message: String,
    },
}

/// Stripe, as the tasks use it.
pub trait PaymentApi: Send + Sync {
    /// Creates and confirms a PaymentIntent (`confirm=true`, `off_session=true`) with `req.key`.
    fn create_intent<'a>(
        &'a self,
        req: &'a ChargeRequest,
    ) -> BoxFuture<'a, Result<Intent, ApiFailure>>;
    /// The PaymentIntents whose metadata names this tenant and order (reconciliation past the key's life).
    fn find_intents<'a>(
        &'a self,
        tenant: &'a str,
        order: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Intent>, ApiFailure>>;
    /// Refunds `amount` of a PaymentIntent with `key`.
    fn create_refund<'a>(
        &'a self,
        payment_intent: &'a str,
        amount: i64,
        key: &'a str,
        metadata: HashMap<String, String>,
    ) -> BoxFuture<'a, Result<RefundOutcome, ApiFailure>>;
}

/// async-stripe against `payment.api_base`.
pub struct Stripe {
    client: Client,
}

impl std::fmt::Debug for Stripe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stripe")
    }
}

impl Stripe {
    /// A client for `api_base` with `secret_key`; `timeout` bounds each call.
    pub fn new(api_base: &str, secret_key: &str, timeout: Duration) -> Result<Self, String> {
        let client = ClientBuilder::new(secret_key)
            .url(api_base)
            .timeout(timeout)
            .app_info(
                "celeriac-payments",
                Some(env!("CARGO_PKG_VERSION").into()),
                None,
            )
            .build()
            .map_err(|e| format!("payment.api_base {api_base:?}: {e}"))?;
        Ok(Self { client })
    }
}

fn intent(pi: &PaymentIntent) -> Intent {
    Intent {
        id: pi.id.as_str().to_string(),
        status: pi.status.as_str().to_string(),
        amount: pi.amount,
        currency: pi.currency.to_string(),
        order_id: pi.metadata.get("order_id").cloned(),
        attempt: pi.metadata.get("attempt").cloned(),
    }
}

fn api_message(e: &ApiErrors) -> String {
    e.message
        .clone()
        .unwrap_or_else(|| e.type_.as_str().to_string())
}

/// Classifies async-stripe's error.
pub fn classify(e: StripeError) -> ApiFailure {
    match e {
        StripeError::Stripe(err, status) => {
            let code = err.code.as_ref().map(|c| c.as_str().to_string());
            let message = api_message(&err);
            match (&err.type_, status) {
                (ApiErrorsType::CardError, _) => ApiFailure::Declined {
                    code,
                    decline_code: err.decline_code.clone(),
                    message,
                    payment_intent: err
                        .payment_intent
                        .as_ref()
                        .map(|p| p.id.as_str().to_string()),
                },
                (_, 401 | 403) => ApiFailure::Unauthorized { message },
                (_, 409 | 429) | (_, 500..=599) | (ApiErrorsType::ApiError, _) => {
                    ApiFailure::Transient {
                        status: Some(status),
                        message,
                    }
                }
                _ if code.as_deref() == Some("lock_timeout") => ApiFailure::Transient {
                    status: Some(status),
                    message,
                },
                (kind, _) => ApiFailure::Rejected {
                    kind: kind.as_str().to_string(),
                    code,
                    message,
                },
            }
        }
        StripeError::Timeout => ApiFailure::Transient {
            status: None,
            message: "no answer from Stripe in time".into(),
        },
        StripeError::ClientError(m) => ApiFailure::Transient {
            status: None,
            message: format!("cannot reach Stripe: {m}"),
        },
        StripeError::JSONDeserialize(m) => ApiFailure::Transient {
            status: None,
            message: format!("Stripe's answer could not be read: {m}"),
        },
        StripeError::ConfigError(m) => ApiFailure::Rejected {
            kind: "configuration".into(),
            code: None,
            message: m,
        },
    }
}

fn key(k: &str) -> Result<RequestStrategy, ApiFailure> {
    IdempotencyKey::new(k)
        .map(RequestStrategy::Idempotent)
        .map_err(|e| ApiFailure::Rejected {
            kind: "idempotency_key".into(),
            code: None,
            message: format!("{k:?}: {e:?}"),
        })
}

/// Quotes a value for Stripe's search language.
fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\'', "\\'")
}

impl PaymentApi for Stripe {
    fn create_intent<'a>(
        &'a self,
        req: &'a ChargeRequest,
    ) -> BoxFuture<'a, Result<Intent, ApiFailure>> {
        Box::pin(async move {
            let currency = req
                .currency
                .parse::<stripe_types::Currency>()
                .unwrap_or_else(|e| match e {});
            let mut create = CreatePaymentIntent::new(req.amount, currency)
                .payment_method(req.payment_method.clone())
                .confirm(true)
                .off_session(CreatePaymentIntentOffSession::Bool(true))
                .metadata(req.metadata.clone());
            if let Some(c) = &req.customer {
                create = create.customer(c.clone());
            }
            if let Some(d) = &req.description {
                create = create.description(d.clone());
            }
            create
                .customize()
                .request_strategy(key(&req.key)?)
                .send(&self.client)
                .await
                .map(|pi| intent(&pi))
                .map_err(classify)
        })
    }

    fn find_intents<'a>(
        &'a self,
        tenant: &'a str,
        order: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Intent>, ApiFailure>> {
        Box::pin(async move {
            let query = format!(
                "metadata['tenant_id']:'{}' AND metadata['order_id']:'{}'",
                quote(tenant),
                quote(order)
            );
            SearchPaymentIntent::new(query)
                .limit(100)
                .send(&self.client)
                .await
                .map(|list| list.data.iter().map(intent).collect())
                .map_err(classify)
        })
    }

    fn create_refund<'a>(
        &'a self,
        payment_intent: &'a str,
        amount: i64,
        k: &'a str,
        metadata: HashMap<String, String>,
    ) -> BoxFuture<'a, Result<RefundOutcome, ApiFailure>> {
        Box::pin(async move {
            CreateRefund::new()
                .payment_intent(payment_intent.to_string())
                .amount(amount)
                .metadata(metadata)
                .customize()
                .request_strategy(key(k)?)
                .send(&self.client)
                .await
                .map(|r| RefundOutcome {
                    id: r.id.as_str().to_string(),
                    status: r.status.clone().unwrap_or_else(|| "succeeded".into()),
                    amount: r.amount,
                })
                .map_err(classify)
        })
    }
}

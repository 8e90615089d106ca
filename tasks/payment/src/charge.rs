//! `payment.charge` and `payment.refund`, following platform.md §3. A charge claims its `payments` row
//! (one per order and attempt, at most one live per order) before Stripe is called and sends the key
//! `charge:<tenant>:<order_id>:<attempt>` on every try; a finished charge answers from the row (`replayed`),
//! an unfinished one sends the same key again (Stripe replays it), and one older than the key's lifetime is
//! reconciled by searching its metadata. A refund reserves its amount under a lock on the payment, so the
//! refunds of a payment never exceed what was charged.

use crate::config::PaymentConfig;
use crate::metrics::PaymentMetrics;
use crate::service::{ApiFailure, ChargeRequest, Intent, PaymentApi};
use crate::store::{self, NewPayment, Outcome, PayStatus, Payment};
use celeriac_domain::{DomainError, Tenant, TenantTx, Tenants};
use celeriac_task::{ExceptionInfo, TaskContext, TaskError, backoff, random_unit};
use chrono::Utc;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// Everything the tasks share.
pub struct Payments {
    /// `[payment]`.
    pub config: PaymentConfig,
    /// The domain database, or why there is none.
    pub tenants: Result<Arc<Tenants>, String>,
    /// Stripe, or why there is none.
    pub api: Result<Arc<dyn PaymentApi>, String>,
    /// Metrics.
    pub metrics: Arc<PaymentMetrics>,
}

/// The checked arguments of a charge.
#[derive(Debug, Clone)]
pub struct ChargeArgs {
    /// Tenant id or slug.
    pub tenant: String,
    /// Order.
    pub order_id: String,
    /// Minor units.
    pub amount: i64,
    /// Currency.
    pub currency: String,
    /// Payment method.
    pub payment_method: String,
    /// Customer.
    pub customer: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// The caller's metadata.
    pub metadata: HashMap<String, String>,
    /// Attempt.
    pub attempt: i32,
}

fn configuration(m: &str) -> TaskError {
    TaskError::celeriac("ConfigurationError", m)
}

fn declined(code: Option<&str>, decline_code: Option<&str>, message: &str) -> TaskError {
    // CardDeclined(decline_code, message): `e.args[0]` is the issuer's decline code (or Stripe's code).
    TaskError::exception(
        Some("celeriac.exceptions"),
        "CardDeclined",
        vec![
            json!(decline_code.or(code).unwrap_or("card_declined")),
            json!(message),
        ],
    )
}

fn charge_result(
    p: &Payment,
    status: PayStatus,
    payment_intent: Option<&str>,
    replayed: bool,
) -> Value {
    json!({
        "status": status.as_str(),
        "payment_intent": payment_intent.or(p.payment_intent.as_deref()),
        "amount": p.amount,
        "currency": p.currency,
        "replayed": replayed,
    })
}

/// The stored outcome of a finished charge, as the task answers it again.
fn replay(p: &Payment) -> Result<Value, TaskError> {
    match p.status {
        PayStatus::Declined => Err(declined(
            p.error_code.as_deref(),
            p.decline_code.as_deref(),
            p.last_error.as_deref().unwrap_or("declined"),
        )),
        PayStatus::Failed => Err(TaskError::celeriac(
            p.error_type.as_deref().unwrap_or("StripeError"),
            p.last_error.clone().unwrap_or_default(),
        )),
        s => Ok(charge_result(p, s, None, true)),
    }
}

impl Payments {
    /// The domain database.
    pub fn tenants(&self) -> Result<&Arc<Tenants>, TaskError> {
        self.tenants.as_ref().map_err(|e| configuration(e))
    }

    fn api(&self) -> Result<Arc<dyn PaymentApi>, TaskError> {
        self.api
            .as_ref()
            .map(Arc::clone)
            .map_err(|e| configuration(e))
    }

    /// A transaction for `tenant`.
    pub async fn tx(&self, tenant: &Tenant) -> Result<TenantTx, TaskError> {
        Ok(TenantTx::begin(self.tenants()?.db(), tenant.clone()).await?)
    }

    fn lease_until(&self) -> chrono::DateTime<Utc> {
        Utc::now() + chrono::Duration::milliseconds((self.config.claim_lease * 1000.0) as i64)
    }

    fn retry_in(&self, tries: i32) -> f64 {
        backoff(
            self.config.retry_backoff,
            i64::from(tries),
            self.config.retry_backoff_max,
            true,
            random_unit(),
        )
        .max(0.2)
    }

    /// Runs `once` again on database trouble (a few times, with backoff): an answer Stripe gave must not be
    /// lost to a blip.
    async fn recorded<F, Fut>(&self, mut once: F) -> Result<Value, TaskError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Result<Value, TaskError>, DomainError>>,
    {
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=8 {
            match once().await {
                Ok(r) => return r,
                Err(e) if e.is_transient() && attempt < 8 => {
                    warn!(error = %e, attempt, "recording Stripe's answer failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
        unreachable!("the last attempt returns")
    }

    async fn begin(&self, tenant: &Tenant) -> Result<TenantTx, DomainError> {
        let db = self
            .tenants
            .as_ref()
            .map_err(|e| DomainError::NotConfigured(e.clone()))?
            .db();
        TenantTx::begin(db, tenant.clone()).await
    }

    /// `payment.charge`.
    pub async fn charge(&self, ctx: &TaskContext, a: ChargeArgs) -> Result<Value, TaskError> {
        let tenant = self.tenants()?.resolve(&a.tenant).await?;
        let api = self.api()?;
        let key = format!("charge:{}:{}:{}", tenant.id, a.order_id, a.attempt);
        let metadata_json = json!(a.metadata);
        let tx = self.tx(&tenant).await?;
        let new = NewPayment {
            order_id: &a.order_id,
            attempt: a.attempt,
            amount: a.amount,
            currency: &a.currency,
            payment_method: &a.payment_method,
            customer: a.customer.as_deref(),
            description: a.description.as_deref(),
            metadata: &metadata_json,
            key: &key,
            task_id: &ctx.id,
        };
        let p = match store::lock_or_insert(&tx, &new).await? {
            Ok(p) => p,
            Err(live) => {
                tx.commit().await?;
                return Err(TaskError::celeriac(
                    "LiveCharge",
                    format!(
                        "order {:?} already has a live charge: attempt {} is {}; a new attempt is possible only after a final decline",
                        a.order_id, live.attempt, live.status
                    ),
                ));
            }
        };
        if (p.amount, p.currency.as_str(), p.payment_method.as_str())
            != (a.amount, a.currency.as_str(), a.payment_method.as_str())
        {
            tx.commit().await?;
            return Err(TaskError::value_error(format!(
                "order {:?} attempt {} was charged as {} {} with {}; its parameters cannot change (key {key})",
                a.order_id, a.attempt, p.amount, p.currency, p.payment_method
            )));
        }
        let now = Utc::now();
        match p.status {
            PayStatus::Succeeded
            | PayStatus::RequiresAction
            | PayStatus::Processing
            | PayStatus::Declined
            | PayStatus::Failed => {
                tx.commit().await?;
                self.metrics.replay(&tenant.slug);
                info!(tenant = %tenant.slug, order = %a.order_id, attempt = a.attempt, status = p.status.as_str(),
                      "charge already finished; answering from the payments row, Stripe not called");
                return replay(&p);
            }
            PayStatus::Claimed | PayStatus::Submitted if p.lease_until.is_some_and(|l| l > now) => {
                tx.commit().await?;
                let left = (p.lease_until.expect("lease") - now).num_milliseconds() as f64 / 1000.0;
                return Err(TaskError::Retry {
                    countdown: Some(left.max(0.2) + random_unit()),
                    eta: None,
                    exc: None,
                    max_retries: Some(-1),
                });
            }
            _ => {}
        }
        // Past the key's lifetime Stripe no longer replays it: look the charge up by its metadata instead.
        let expired = p.submitted_at.is_some_and(|t| {
            (now - t).num_milliseconds() as f64 / 1000.0 > self.config.key_lifetime
        });
        store::submit(&tx, p.id, self.lease_until()).await?;
        tx.commit().await?;
        let answer = self.observed(ctx, if expired {
            match api.find_intents(&tenant.id.to_string(), &a.order_id).await {
                Ok(found) => match found
                    .into_iter()
                    .find(|i| i.attempt.as_deref() == Some(&a.attempt.to_string()))
                {
                    Some(i) => {
                        info!(tenant = %tenant.slug, order = %a.order_id, payment_intent = %i.id,
                              "charge older than the key's lifetime reconciled by metadata; nothing created");
                        Ok(i)
                    }
                    None => api.create_intent(&self.request(&tenant, &a, &key)).await,
                },
                Err(e) => Err(e),
            }
        } else {
            api.create_intent(&self.request(&tenant, &a, &key)).await
        });
        self.record_charge(&tenant, &p, answer).await
    }

    /// Reports Stripe's health from an answer: no answer or a 5xx is an outage.
    fn observed<T>(
        &self,
        ctx: &TaskContext,
        answer: Result<T, ApiFailure>,
    ) -> Result<T, ApiFailure> {
        match &answer {
            Err(ApiFailure::Transient { status, message }) if status.is_none_or(|s| s >= 500) => {
                ctx.peers.down("stripe", message)
            }
            _ => ctx.peers.up("stripe"),
        }
        answer
    }

    fn request(&self, tenant: &Tenant, a: &ChargeArgs, key: &str) -> ChargeRequest {
        let mut metadata = a.metadata.clone();
        metadata.insert("tenant_id".into(), tenant.id.to_string());
        metadata.insert("order_id".into(), a.order_id.clone());
        metadata.insert("attempt".into(), a.attempt.to_string());
        ChargeRequest {
            amount: a.amount,
            currency: a.currency.clone(),
            payment_method: a.payment_method.clone(),
            customer: a.customer.clone(),
            description: a.description.clone(),
            metadata,
            key: key.to_string(),
        }
    }

    async fn record_charge(
        &self,
        tenant: &Tenant,
        p: &Payment,
        answer: Result<Intent, ApiFailure>,
    ) -> Result<Value, TaskError> {
        if let Err(f) = &answer {
            let (kind, code) = match f {
                ApiFailure::Declined { code, .. } => {
                    ("card_error", code.clone().unwrap_or_default())
                }
                ApiFailure::Transient { status, .. } => (
                    "transient",
                    status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "network".into()),
                ),
                ApiFailure::Rejected { kind, code, .. } => {
                    (kind.as_str(), code.clone().unwrap_or_default())
                }
                ApiFailure::Unauthorized { .. } => ("authentication_error", "401".into()),
            };
            self.metrics.error(kind, &code);
        }
        let tries = p.tries + 1;
        let max = self.config.max_retries;
        let retry_wait = self.retry_in(tries);
        self.recorded(|| async {
            let txn = self.begin(tenant).await?;
            let tx = &txn;
            let answer = answer.clone();
            let r = match answer {
                    Ok(intent) => {
                        let status = PayStatus::from_stripe(&intent.status);
                        store::register_intent(tx, &intent.id, &p.order_id).await?;
                        if status == PayStatus::Declined {
                            store::record(tx, p.id, status, &Outcome { payment_intent: Some(&intent.id),
                                error: Some("the payment method was refused"), ..Default::default() }).await?;
                            self.metrics.charge(&tenant.slug, "declined");
                            Err(declined(None, None, "the payment method was refused"))
                        } else {
                            store::record(tx, p.id, status, &Outcome { payment_intent: Some(&intent.id), ..Default::default() }).await?;
                            self.metrics.charge(&tenant.slug, status.as_str());
                            info!(tenant = %tenant.slug, order = %p.order_id, payment_intent = %intent.id, status = status.as_str(), "charge recorded");
                            Ok(charge_result(p, status, Some(&intent.id), false))
                        }
                    }
                    Err(ApiFailure::Declined { code, decline_code, message, payment_intent }) => {
                        if let Some(pi) = &payment_intent {
                            store::register_intent(tx, pi, &p.order_id).await?;
                        }
                        store::record(tx, p.id, PayStatus::Declined, &Outcome { payment_intent: payment_intent.as_deref(),
                            decline_code: decline_code.as_deref(), error_code: code.as_deref(), error_type: Some("CardDeclined"),
                            error: Some(&message) }).await?;
                        self.metrics.charge(&tenant.slug, "declined");
                        Err(declined(code.as_deref(), decline_code.as_deref(), &message))
                    }
                    Err(ApiFailure::Transient { status, message }) if i64::from(tries) > max => {
                        store::record(tx, p.id, PayStatus::Unknown, &Outcome { error: Some(&message), ..Default::default() }).await?;
                        self.metrics.charge(&tenant.slug, "unknown");
                        error!(tenant = %tenant.slug, order = %p.order_id, key = %p.key, status = ?status,
                               "charge in an unknown state after {tries} tries: {message}; re-run it to reconcile (the same key is sent)");
                        Err(TaskError::celeriac("PaymentUnknown", format!(
                            "order {:?}: Stripe did not answer after {tries} tries ({message}); the charge may or may not exist: re-run to reconcile",
                            p.order_id)))
                    }
                    Err(ApiFailure::Transient { status, message }) => {
                        store::record(tx, p.id, PayStatus::Submitted, &Outcome { error: Some(&message), ..Default::default() }).await?;
                        info!(tenant = %tenant.slug, order = %p.order_id, status = ?status, retry_in = retry_wait, "Stripe: {message}; retrying with the same key");
                        Err(TaskError::transient(ExceptionInfo::new("celeriac.exceptions", "StripeUnavailable", message), retry_wait, Some(-1)))
                    }
                    Err(ApiFailure::Rejected { kind, code, message }) => {
                        let class = if kind == "idempotency_error" { "StripeIdempotencyError" } else { "StripeInvalidRequest" };
                        store::record(tx, p.id, PayStatus::Failed, &Outcome { error_code: code.as_deref(), error_type: Some(class),
                            error: Some(&message), ..Default::default() }).await?;
                        self.metrics.charge(&tenant.slug, "failed");
                        error!(tenant = %tenant.slug, order = %p.order_id, key = %p.key, kind = %kind, code = ?code,
                               "ALERT: Stripe refused the charge request: {message}");
                        Err(TaskError::celeriac(class, message))
                    }
                    Err(ApiFailure::Unauthorized { message }) => {
                        store::record(tx, p.id, PayStatus::Submitted, &Outcome { error: Some(&message), ..Default::default() }).await?;
                        Err(configuration(&format!("payment.secret_key was refused by Stripe: {message}")))
                    }
                };
            txn.commit().await?;
            Ok(r)
        })
        .await
    }

    /// `payment.refund`.
    pub async fn refund(
        &self,
        ctx: &TaskContext,
        tenant: &str,
        order_id: &str,
        amount: Option<i64>,
        refund_id: &str,
    ) -> Result<Value, TaskError> {
        let tenant = self.tenants()?.resolve(tenant).await?;
        let api = self.api()?;
        let key = format!("refund:{}:{refund_id}", tenant.id);
        let tx = self.tx(&tenant).await?;
        let Some(p) = store::live_payment(&tx, order_id).await? else {
            return Err(TaskError::value_error(format!(
                "order {order_id:?} has no charge to refund"
            )));
        };
        if p.status != PayStatus::Succeeded {
            return Err(TaskError::value_error(format!(
                "order {order_id:?} is not charged yet (attempt {} is {})",
                p.attempt,
                p.status.as_str()
            )));
        }
        let pi = p.payment_intent.clone().ok_or_else(|| {
            TaskError::value_error(format!("order {order_id:?}: no PaymentIntent recorded"))
        })?;
        let refund = match store::find_refund(&tx, refund_id).await? {
            Some(r) if r.order_id != order_id => {
                return Err(TaskError::value_error(format!(
                    "refund_id {refund_id:?} was used for order {:?}; a refund id names one refund",
                    r.order_id
                )));
            }
            Some(r) if r.status == "succeeded" || r.status == "pending" => {
                tx.commit().await?;
                self.metrics.replay(&tenant.slug);
                return Ok(
                    json!({"status": r.status, "refund": r.stripe_refund, "amount": r.amount,
                                 "refunded": p.refunded, "replayed": true}),
                );
            }
            Some(r) if r.status == "failed" => {
                tx.commit().await?;
                return Err(TaskError::celeriac(
                    "RefundFailed",
                    r.last_error.unwrap_or_default(),
                ));
            }
            Some(r) => {
                if amount.is_some_and(|a| a != r.amount) {
                    return Err(TaskError::value_error(format!(
                        "refund {refund_id:?} was requested for {}; its amount cannot change",
                        r.amount
                    )));
                }
                r
            }
            None => {
                let reserved = store::refunds_total(&tx, p.id).await?;
                let left = p.amount - reserved;
                let want = amount.unwrap_or(left);
                if want <= 0 || want > left {
                    tx.commit().await?;
                    self.metrics.refund(&tenant.slug, "exceeds_charge");
                    return Err(TaskError::celeriac(
                        "RefundExceedsCharge",
                        format!(
                            "order {order_id:?}: a refund of {want} exceeds the {left} still refundable (charged {} {}, refunded or reserved {reserved})",
                            p.amount, p.currency
                        ),
                    ));
                }
                match store::insert_refund(&tx, &p, refund_id, want, &key).await? {
                    Some(r) => r,
                    None => {
                        // Another refund took this id meanwhile: run again to answer from it.
                        return Err(TaskError::Retry {
                            countdown: Some(0.1),
                            eta: None,
                            exc: None,
                            max_retries: Some(-1),
                        });
                    }
                }
            }
        };
        tx.commit().await?;
        let meta = HashMap::from([
            ("tenant_id".to_string(), tenant.id.to_string()),
            ("order_id".into(), order_id.into()),
            ("refund_id".into(), refund_id.into()),
        ]);
        let answer = self.observed(ctx, api.create_refund(&pi, refund.amount, &key, meta).await);
        let wait = self.retry_in(1);
        self.recorded(|| async {
            let txn = self.begin(&tenant).await?;
            let tx = &txn;
            let r = match answer.clone() {
                    Ok(out) => {
                        let status = if out.status == "failed" || out.status == "canceled" { "failed" } else if out.status == "pending" { "pending" } else { "succeeded" };
                        store::record_refund(tx, &refund, p.id, status, Some(&out.id), None).await?;
                        self.metrics.refund(&tenant.slug, status);
                        let total = store::refunds_total(tx, p.id).await?;
                        Ok(json!({"status": status, "refund": out.id, "amount": refund.amount, "refunded": total, "replayed": false}))
                    }
                    Err(ApiFailure::Transient { message, .. }) => Err(TaskError::transient(
                        ExceptionInfo::new("celeriac.exceptions", "StripeUnavailable", message), wait, None)),
                    Err(f) => {
                        let message = format!("{f:?}");
                        store::record_refund(tx, &refund, p.id, "failed", None, Some(&message)).await?;
                        self.metrics.refund(&tenant.slug, "failed");
                        Err(TaskError::celeriac("RefundFailed", message))
                    }
                };
            txn.commit().await?;
            Ok(r)
        })
        .await
    }
}

//! `email.send`, following platform.md §3: the outbox row of the idempotency key is inserted or locked,
//! rendered once, claimed (`sending` + lease) before SMTP and updated after, so a redelivery, a retry or a
//! second publish of the same key never sends a second mail.

use crate::config::{Ambiguous, EmailConfig};
use crate::metrics::{EmailMetrics, Failure};
use crate::render::{self, Addressing, Content, Invalid, Sources};
use crate::service::{SendOutcome, Transport};
use crate::store::{self, Row, Status};
use celeriac_domain::{DomainError, Tenant, TenantTx, Tenants};
use celeriac_task::{ExceptionInfo, TaskContext, TaskError, backoff, random_unit};
use chrono::{Duration as ChronoDuration, Utc};
use lettre::message::Mailbox;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

mod parts;
use parts::{
    configuration, envelope_of, observe, outcome, refused, replay_failure, required, string_arg,
    until_midnight,
};

/// Everything the tasks share: settings, the database, the SMTP pool, metrics.
pub struct Email {
    /// `[email]` (defaults when the section is absent).
    pub config: EmailConfig,
    /// The domain database, or why there is none.
    pub tenants: Result<Arc<Tenants>, String>,
    /// The SMTP pool, or why there is none.
    pub transport: Result<Arc<dyn Transport>, String>,
    /// The sender, or why there is none.
    pub from: Result<Mailbox, String>,
    /// Metrics.
    pub metrics: Arc<EmailMetrics>,
    refreshed: Mutex<HashMap<uuid::Uuid, Instant>>,
}

impl std::fmt::Debug for Email {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Email")
            .field("config", &self.config)
            .finish()
    }
}

/// The arguments of `email.send`, as bound by name.
pub type SendArgs = (
    Value,
    Value,
    Value,
    Value,
    Value,
    Value,
    Value,
    Value,
    Value,
    Value,
    Value,
    Value,
    Value,
);

impl Email {
    /// Builds the shared state.
    pub fn new(
        config: EmailConfig,
        tenants: Result<Arc<Tenants>, String>,
        transport: Result<Arc<dyn Transport>, String>,
        metrics: Arc<EmailMetrics>,
    ) -> Self {
        let from = match &config.from {
            None => Err("email.from is not set".to_string()),
            Some(f) => f
                .parse::<Mailbox>()
                .map_err(|e| format!("email.from {f:?}: {e}")),
        };
        Self {
            config,
            tenants,
            transport,
            from,
            metrics,
            refreshed: Mutex::default(),
        }
    }

    fn tenants(&self) -> Result<&Arc<Tenants>, TaskError> {
        self.tenants.as_ref().map_err(|e| configuration(e))
    }

    /// The tenant named by a `tenant_id` argument (id or slug).
    pub async fn tenant_arg(&self, v: &Value) -> Result<Tenant, TaskError> {
        let value = required("tenant_id", v)?;
        Ok(self.tenants()?.resolve(&value).await?)
    }

    /// A transaction for `tenant`.
    pub async fn tx(&self, tenant: &Tenant) -> Result<TenantTx, TaskError> {
        Ok(TenantTx::begin(self.tenants()?.db(), tenant.clone()).await?)
    }

    /// The domain of new `Message-ID`s, or why there is none.
    pub fn message_domain(&self) -> Result<String, String> {
        Ok(self.domain(self.from.as_ref().map_err(Clone::clone)?))
    }

    fn domain(&self, from: &Mailbox) -> String {
        self.config
            .message_id_domain
            .clone()
            .unwrap_or_else(|| from.email.domain().to_string())
    }

    /// `email.send`.
    pub async fn send(&self, ctx: &TaskContext, a: SendArgs) -> Result<Value, TaskError> {
        let (
            tenant_id,
            to,
            template,
            subject,
            text,
            html,
            context,
            locale,
            cc,
            bcc,
            reply_to,
            headers,
            key,
        ) = a;
        let tenant = self.tenant_arg(&tenant_id).await?;
        let transport = Arc::clone(self.transport.as_ref().map_err(|e| configuration(e))?);
        let from = self.from.as_ref().map_err(|e| configuration(e))?.clone();
        let key = string_arg("idempotency_key", &key)?.unwrap_or_else(|| ctx.id.clone());
        let locale = string_arg("locale", &locale)?;

        let tx = self.tx(&tenant).await?;
        let row = store::lock_or_insert(&tx, &key, &self.domain(&from), &ctx.id, None).await?;
        let mut resend = false;
        match row.status {
            Status::Sent => {
                tx.commit().await?;
                self.metrics.duplicate(&tenant.slug);
                info!(tenant = %tenant.slug, key = %key, outbox_id = %row.id, "email already sent; nothing sent again");
                return Ok(outcome("duplicate", &row));
            }
            Status::Held => {
                tx.commit().await?;
                return Ok(outcome("held", &row));
            }
            Status::Failed => {
                tx.commit().await?;
                return Err(replay_failure(&row));
            }
            Status::Sending if row.lease_until.is_some_and(|l| l > Utc::now()) => {
                tx.commit().await?;
                // Another attempt holds the claim: come back when it must have finished.
                let left = (row.lease_until.expect("lease") - Utc::now()).num_milliseconds() as f64
                    / 1000.0;
                return Err(TaskError::Retry {
                    countdown: Some(left.clamp(0.5, self.config.claim_lease) + random_unit()),
                    eta: None,
                    exc: None,
                    max_retries: Some(-1),
                });
            }
            Status::Sending => match self.config.ambiguous {
                Ambiguous::Held => {
                    let why = "the claim expired while sending: the server may or may not have accepted the mail";
                    store::hold(&tx, row.id, why).await?;
                    tx.commit().await?;
                    self.metrics.held(&tenant.slug);
                    warn!(tenant = %tenant.slug, key = %key, outbox_id = %row.id, message_id = %row.message_id,
                          "email held: {why}; resend or drop it by hand (email.ambiguous = held)");
                    return Ok(outcome("held", &row));
                }
                Ambiguous::Resend => {
                    self.metrics.resent(&tenant.slug);
                    warn!(tenant = %tenant.slug, key = %key, outbox_id = %row.id, message_id = %row.message_id,
                          "email claim expired while sending; sending again with the same Message-ID (email.ambiguous = resend)");
                    resend = true;
                }
            },
            Status::Queued | Status::Retry => {}
        }
        let mut row = row;
        if row.raw.is_none() {
            let prepared = match self
                .prepare(
                    &tx,
                    &from,
                    to,
                    cc,
                    bcc,
                    reply_to,
                    headers,
                    template,
                    subject,
                    text,
                    html,
                    &context,
                    locale.as_deref(),
                )
                .await?
            {
                Ok(p) => p,
                Err(Invalid(msg)) => {
                    store::fail(&tx, row.id, "ValueError", &msg, None).await?;
                    tx.commit().await?;
                    self.metrics.failed(&tenant.slug, Failure::Invalid);
                    return Err(TaskError::value_error(msg));
                }
            };
            let (rendered, addressing, used_locale, template) = prepared;
            let (raw, envelope) =
                match render::build(&from, &addressing, &rendered, &row.message_id) {
                    Ok(b) => b,
                    Err(Invalid(msg)) => {
                        store::fail(&tx, row.id, "ValueError", &msg, None).await?;
                        tx.commit().await?;
                        self.metrics.failed(&tenant.slug, Failure::Invalid);
                        return Err(TaskError::value_error(msg));
                    }
                };
            let mut recipients = addressing.to_json();
            recipients["envelope_from"] = json!(envelope.from().map(|a| a.to_string()));
            recipients["rcpt"] = json!(addressing.recipients());
            store::set_rendered(
                &tx,
                row.id,
                &store::RenderedMail {
                    from: &from.to_string(),
                    recipients: &recipients,
                    subject: &rendered.subject,
                    raw: &raw,
                    template: template.as_deref(),
                    locale: used_locale.as_deref(),
                },
            )
            .await?;
            row.raw = Some(raw);
            row.recipients = recipients;
        }
        let (envelope, rcpts) = envelope_of(&row)?;
        let blocked = store::suppressed(&tx, &rcpts).await?;
        if !blocked.is_empty() {
            let msg = format!(
                "suppressed recipient(s): {} (a permanent refusal earlier)",
                blocked.join(", ")
            );
            store::fail(&tx, row.id, "Suppressed", &msg, None).await?;
            tx.commit().await?;
            self.metrics.failed(&tenant.slug, Failure::Suppressed);
            return Err(TaskError::celeriac("Suppressed", msg));
        }
        // The provider's limit: wait without holding the row, then lock it again and re-check.
        let tx = match self.config.rate_interval() {
            None => tx,
            Some(interval) => {
                tx.commit().await?;
                self.wait_for_rate(ctx, &tenant, transport.account(), interval)
                    .await?;
                let tx = self.tx(&tenant).await?;
                let again =
                    store::lock_or_insert(&tx, &key, &self.domain(&from), &ctx.id, None).await?;
                let claimable = matches!(again.status, Status::Queued | Status::Retry)
                    || (resend
                        && again.status == Status::Sending
                        && again.lease_until == row.lease_until);
                if !claimable {
                    tx.commit().await?;
                    // Someone else moved it on meanwhile: run again to answer from its new state.
                    return Err(TaskError::Retry {
                        countdown: Some(0.1),
                        eta: None,
                        exc: None,
                        max_retries: Some(-1),
                    });
                }
                tx
            }
        };
        if let Some(quota) = self.config.daily_quota
            && row.attempts == 0
            && !store::take_quota(&tx, Utc::now().date_naive(), quota).await?
        {
            {
                let msg = format!(
                    "tenant {} reached its daily quota of {quota} mails; retrying after midnight UTC",
                    tenant.slug
                );
                store::record_retry(&tx, row.id, None, &msg).await?;
                tx.commit().await?;
                warn!(tenant = %tenant.slug, key = %key, "{msg}");
                return Err(TaskError::Retry {
                    countdown: Some(until_midnight()),
                    eta: None,
                    exc: None,
                    max_retries: Some(-1),
                });
            }
        }
        let lease_until =
            Utc::now() + ChronoDuration::milliseconds((self.config.claim_lease * 1000.0) as i64);
        store::claim(&tx, row.id, lease_until).await?;
        tx.commit().await?;

        let started = Instant::now();
        let answer = transport
            .send(&envelope, row.raw.as_deref().unwrap_or_default())
            .await;
        let took = started.elapsed().as_secs_f64();
        observe(ctx, &answer);
        self.record(ctx, &tenant, &row, &rcpts, answer, took).await
    }

    async fn wait_for_rate(
        &self,
        ctx: &TaskContext,
        tenant: &Tenant,
        account: &str,
        interval: Duration,
    ) -> Result<(), TaskError> {
        let Some(limiter) = ctx.limiter.as_ref() else {
            return Ok(());
        };
        let key = format!("email:{}:{account}", tenant.id);
        let mut counted = false;
        loop {
            match limiter.take(&key, interval, 1).await {
                Ok(None) => return Ok(()),
                Ok(Some(wait)) => {
                    if !counted {
                        self.metrics.rate_limited(&tenant.slug);
                        counted = true;
                    }
                    if wait > Duration::from_secs(2) {
                        return Err(TaskError::Retry {
                            countdown: Some(wait.as_secs_f64()),
                            eta: None,
                            exc: None,
                            max_retries: Some(-1),
                        });
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    warn!(error = %e, "shared rate limiter unavailable; sending without it");
                    return Ok(());
                }
            }
        }
    }

    /// Records the server's answer, retrying the database a few times: a mail the server accepted must not
    /// be left looking unsent because of a database blip.
    async fn record(
        &self,
        ctx: &TaskContext,
        tenant: &Tenant,
        row: &Row,
        rcpts: &[String],
        answer: SendOutcome,
        took: f64,
    ) -> Result<Value, TaskError> {
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=8 {
            match self
                .record_once(ctx, tenant, row, rcpts, &answer, took)
                .await
            {
                Err(DomainOrTask::Domain(e)) if e.is_transient() && attempt < 8 => {
                    warn!(error = %e, attempt, outbox_id = %row.id, "recording the SMTP answer failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(DomainOrTask::Domain(e)) => return Err(e.into()),
                Err(DomainOrTask::Task(t)) => return Err(t),
                Ok(v) => return Ok(v),
            }
        }
        unreachable!("the loop returns on its last attempt")
    }

    async fn record_once(
        &self,
        ctx: &TaskContext,
        tenant: &Tenant,
        row: &Row,
        rcpts: &[String],
        answer: &SendOutcome,
        took: f64,
    ) -> Result<Value, DomainOrTask> {
        let tx = TenantTx::begin(
            self.tenants().map_err(DomainOrTask::Task)?.db(),
            tenant.clone(),
        )
        .await?;
        let result = match answer {
            SendOutcome::Accepted { code } => {
                store::record_sent(&tx, row.id, i32::from(*code)).await?;
                self.metrics.sent(&tenant.slug, took);
                info!(tenant = %tenant.slug, task_id = %ctx.id, outbox_id = %row.id, message_id = %row.message_id, "email sent");
                Ok(outcome("sent", row))
            }
            SendOutcome::Transient { code, message } => {
                self.metrics.attempt(took);
                let exc = ExceptionInfo::new(
                    "celeriac.exceptions",
                    "SMTPTransientError",
                    message.clone(),
                );
                // Retries are counted against max_retries only when the server answered (4xx): a server that
                // cannot be reached is waited for, as the worker waits for its broker.
                if code.is_some() && i64::from(row.attempts) > self.config.max_retries {
                    store::fail(
                        &tx,
                        row.id,
                        "SMTPTransientError",
                        message,
                        code.map(i32::from),
                    )
                    .await?;
                    self.metrics.failed(&tenant.slug, Failure::RetriesExhausted);
                    Err(TaskError::Failed(exc))
                } else {
                    store::record_retry(&tx, row.id, code.map(i32::from), message).await?;
                    let wait = backoff(
                        self.config.retry_backoff,
                        i64::from(row.attempts),
                        self.config.retry_backoff_max,
                        true,
                        random_unit(),
                    );
                    match code {
                        Some(_) => {
                            info!(tenant = %tenant.slug, outbox_id = %row.id, code = ?code, retry_in = wait, "SMTP answered a transient failure: {message}")
                        }
                        None => {
                            debug!(tenant = %tenant.slug, outbox_id = %row.id, retry_in = wait, "SMTP unreachable: {message}")
                        }
                    }
                    Err(TaskError::transient(exc, wait.max(0.5), Some(-1)))
                }
            }
            SendOutcome::Permanent { code, message } => {
                self.metrics.attempt(took);
                if matches!(code, 550 | 551 | 553) {
                    let bad = refused(message, rcpts);
                    store::suppress(&tx, &bad, message, i32::from(*code)).await?;
                }
                store::fail(
                    &tx,
                    row.id,
                    "SMTPPermanentError",
                    message,
                    Some(i32::from(*code)),
                )
                .await?;
                self.metrics.failed(&tenant.slug, Failure::Permanent);
                Err(TaskError::celeriac("SMTPPermanentError", message.clone()))
            }
            SendOutcome::Unknown { message } => {
                self.metrics.attempt(took);
                match self.config.ambiguous {
                    Ambiguous::Held => {
                        store::hold(&tx, row.id, message).await?;
                        self.metrics.held(&tenant.slug);
                        warn!(tenant = %tenant.slug, outbox_id = %row.id, "email held: {message}");
                        Ok(outcome("held", row))
                    }
                    Ambiguous::Resend => {
                        store::record_retry(&tx, row.id, None, message).await?;
                        self.metrics.resent(&tenant.slug);
                        Err(TaskError::transient(
                            ExceptionInfo::new(
                                "celeriac.exceptions",
                                "SMTPTransientError",
                                message.clone(),
                            ),
                            1.0,
                            Some(-1),
                        ))
                    }
                }
            }
        };
        self.refresh_pending(&tx, tenant).await?;
        tx.commit().await?;
        result.map_err(DomainOrTask::Task)
    }

    async fn refresh_pending(&self, tx: &TenantTx, tenant: &Tenant) -> Result<(), DomainError> {
        let due = {
            let mut seen = self.refreshed.lock().expect("refreshed");
            let now = Instant::now();
            match seen.get(&tenant.id) {
                Some(t) if now.duration_since(*t) < Duration::from_secs(5) => false,
                _ => {
                    seen.insert(tenant.id, now);
                    true
                }
            }
        };
        if due {
            self.metrics
                .pending(&tenant.slug, store::pending(tx).await?);
        }
        Ok(())
    }

    /// Checks the arguments and renders: `Ok(Err(..))` is bad input (the row fails), `Err` a database error.
    #[allow(clippy::too_many_arguments)]
    async fn prepare(
        &self,
        tx: &TenantTx,
        _from: &Mailbox,
        to: Value,
        cc: Value,
        bcc: Value,
        reply_to: Value,
        headers: Value,
        template: Value,
        subject: Value,
        text: Value,
        html: Value,
        context: &Value,
        locale: Option<&str>,
    ) -> Result<
        Result<(render::Rendered, Addressing, Option<String>, Option<String>), Invalid>,
        TaskError,
    > {
        let addressing = match render::addressing(&to, &cc, &bcc, &reply_to, &headers) {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        let content = match render::content(&template, &subject, &text, &html) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        let (sources, used_locale, name) = match content {
            Content::Inline {
                subject,
                text,
                html,
            } => (
                Sources {
                    subject,
                    text,
                    html,
                    origin: "inline".into(),
                },
                None,
                None,
            ),
            Content::Template { name } => {
                let chain = render::locale_chain(locale, &self.config.default_locale);
                match store::template(tx, &name, &chain).await? {
                    Some((l, s)) => (s, Some(l), Some(name)),
                    None => {
                        return Ok(Err(Invalid(format!(
                            "template: unknown template {name:?} (locales tried: {})",
                            chain.join(", ")
                        ))));
                    }
                }
            }
        };
        Ok(render::render(&sources, context).map(|r| (r, addressing, used_locale, name)))
    }
}

/// A database error (retried while recording) or a task outcome.
enum DomainOrTask {
    Domain(DomainError),
    Task(TaskError),
}

impl From<DomainError> for DomainOrTask {
    fn from(e: DomainError) -> Self {
        Self::Domain(e)
    }
}

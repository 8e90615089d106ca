//! The family's database access, all through a [`TenantTx`] (`$1` is always the tenant): the outbox row of
//! an idempotency key (insert-or-lock, render, claim, record), templates, the suppression list and the daily
//! quota.

use crate::render::Sources;
use celeriac_domain::{DomainError, TenantTx};
use chrono::{DateTime, NaiveDate, Utc};
use sea_orm::{QueryResult, Value};
use serde_json::Value as Json;
use uuid::Uuid;

/// An outbox row's status (the column's closed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Waiting to be sent.
    Queued,
    /// Claimed: an attempt is talking to the server (until `lease_until`).
    Sending,
    /// The server accepted it.
    Sent,
    /// A transient failure; a retry is scheduled.
    Retry,
    /// Ambiguous (a claim expired mid-send); an operator decides.
    Held,
    /// Failed for good.
    Failed,
}

impl Status {
    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sending => "sending",
            Self::Sent => "sent",
            Self::Retry => "retry",
            Self::Held => "held",
            Self::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Result<Self, DomainError> {
        Ok(match s {
            "queued" => Self::Queued,
            "sending" => Self::Sending,
            "sent" => Self::Sent,
            "retry" => Self::Retry,
            "held" => Self::Held,
            "failed" => Self::Failed,
            other => {
                return Err(DomainError::Db(sea_orm::DbErr::Type(format!(
                    "email_outbox.status {other:?}"
                ))));
            }
        })
    }
}

/// An outbox row (what the task needs of it).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Outbox id.
    pub id: Uuid,
    /// Idempotency key.
    pub key: String,
    /// Status.
    pub status: Status,
    /// Attempts so far.
    pub attempts: i32,
    /// Claim expiry.
    pub lease_until: Option<DateTime<Utc>>,
    /// `Message-ID`.
    pub message_id: String,
    /// The rendered message, once rendered.
    pub raw: Option<Vec<u8>>,
    /// Sender and recipients as stored.
    pub recipients: Json,
    /// Envelope sender.
    pub mail_from: Option<String>,
    /// Subject.
    pub subject: Option<String>,
    /// Last SMTP code.
    pub last_code: Option<i32>,
    /// Last error.
    pub last_error: Option<String>,
    /// Exception class of a final failure.
    pub error_type: Option<String>,
    /// Template and locale used.
    pub template: Option<String>,
    /// Locale.
    pub locale: Option<String>,
    /// Campaign.
    pub campaign_id: Option<String>,
    /// First task id.
    pub task_id: Option<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Accepted by the server.
    pub sent_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, idempotency_key, status, attempts, lease_until, message_id, raw, recipients, mail_from, \
     subject, last_code, last_error, error_type, template, locale, campaign_id, task_id, created_at, sent_at";

fn row(r: &QueryResult) -> Result<Row, DomainError> {
    let g = |c: &str| -> Result<Option<String>, DomainError> { Ok(r.try_get("", c)?) };
    Ok(Row {
        id: r.try_get("", "id")?,
        key: r.try_get("", "idempotency_key")?,
        status: Status::parse(&r.try_get::<String>("", "status")?)?,
        attempts: r.try_get("", "attempts")?,
        lease_until: r.try_get("", "lease_until")?,
        message_id: r.try_get("", "message_id")?,
        raw: r.try_get("", "raw")?,
        recipients: r.try_get("", "recipients")?,
        mail_from: g("mail_from")?,
        subject: g("subject")?,
        last_code: r.try_get("", "last_code")?,
        last_error: g("last_error")?,
        error_type: g("error_type")?,
        template: g("template")?,
        locale: g("locale")?,
        campaign_id: g("campaign_id")?,
        task_id: g("task_id")?,
        created_at: r.try_get("", "created_at")?,
        sent_at: r.try_get("", "sent_at")?,
    })
}

/// A new row's identity: its id and the `Message-ID` derived from it.
pub fn new_identity(domain: &str) -> (Uuid, String) {
    let id = Uuid::new_v4();
    (id, format!("<{}@{domain}>", id.simple()))
}

/// Inserts the key's row as `queued` unless it exists, then locks it (`FOR UPDATE`) for this transaction.
pub async fn lock_or_insert(
    tx: &TenantTx,
    key: &str,
    domain: &str,
    task_id: &str,
    campaign_id: Option<&str>,
) -> Result<Row, DomainError> {
    let (id, message_id) = new_identity(domain);
    tx.execute(
        "INSERT INTO email_outbox (tenant_id, id, idempotency_key, status, message_id, task_id, campaign_id) \
         VALUES ($1, $2, $3, 'queued', $4, $5, $6) ON CONFLICT (tenant_id, idempotency_key) DO NOTHING",
        vec![
            id.into(),
            key.into(),
            message_id.into(),
            task_id.into(),
            campaign_id.map(str::to_string).into(),
        ],
    )
    .await?;
    let r = tx
        .one(
            &format!(
                "SELECT {COLUMNS} FROM email_outbox WHERE tenant_id = $1 AND idempotency_key = $2 FOR UPDATE"
            ),
            vec![key.into()],
        )
        .await?
        .ok_or_else(|| {
            DomainError::Db(sea_orm::DbErr::RecordNotFound(format!(
                "email_outbox row for key {key:?} after insert"
            )))
        })?;
    row(&r)
}

/// A rendered mail as the outbox keeps it.
#[derive(Debug, Clone, Copy)]
pub struct RenderedMail<'a> {
    /// Sender.
    pub from: &'a str,
    /// Recipients and envelope.
    pub recipients: &'a Json,
    /// Subject.
    pub subject: &'a str,
    /// The message bytes.
    pub raw: &'a [u8],
    /// Template name.
    pub template: Option<&'a str>,
    /// Locale used.
    pub locale: Option<&'a str>,
}

/// Stores what was rendered (kept byte for byte: a retry or resend sends exactly these bytes).
pub async fn set_rendered(
    tx: &TenantTx,
    id: Uuid,
    mail: &RenderedMail<'_>,
) -> Result<(), DomainError> {
    let RenderedMail {
        from,
        recipients,
        subject,
        raw,
        template,
        locale,
    } = *mail;
    tx.execute(
        "UPDATE email_outbox SET mail_from = $3, recipients = $4, subject = $5, raw = $6, template = $7, \
         locale = $8, updated_at = now() WHERE tenant_id = $1 AND id = $2",
        vec![
            id.into(),
            from.into(),
            recipients.clone().into(),
            subject.into(),
            raw.to_vec().into(),
            template.map(str::to_string).into(),
            locale.map(str::to_string).into(),
        ],
    )
    .await?;
    Ok(())
}

/// Marks the row `failed` for good.
pub async fn fail(
    tx: &TenantTx,
    id: Uuid,
    error_type: &str,
    message: &str,
    code: Option<i32>,
) -> Result<(), DomainError> {
    tx.execute(
        "UPDATE email_outbox SET status = 'failed', error_type = $3, last_error = $4, last_code = COALESCE($5, last_code), \
         lease_until = NULL, updated_at = now() WHERE tenant_id = $1 AND id = $2",
        vec![id.into(), error_type.into(), message.into(), code.into()],
    )
    .await?;
    Ok(())
}

/// Marks the row `held` (an expired claim under the `held` policy).
pub async fn hold(tx: &TenantTx, id: Uuid, message: &str) -> Result<(), DomainError> {
    tx.execute(
        "UPDATE email_outbox SET status = 'held', last_error = $3, lease_until = NULL, updated_at = now() \
         WHERE tenant_id = $1 AND id = $2",
        vec![id.into(), message.into()],
    )
    .await?;
    Ok(())
}

/// Claims the row for one SMTP attempt: `sending` until `lease_until`.
pub async fn claim(tx: &TenantTx, id: Uuid, lease_until: DateTime<Utc>) -> Result<(), DomainError> {
    tx.execute(
        "UPDATE email_outbox SET status = 'sending', attempts = attempts + 1, lease_until = $3, updated_at = now() \
         WHERE tenant_id = $1 AND id = $2",
        vec![id.into(), lease_until.into()],
    )
    .await?;
    Ok(())
}

/// Records the server's acceptance.
pub async fn record_sent(tx: &TenantTx, id: Uuid, code: i32) -> Result<(), DomainError> {
    tx.execute(
        "UPDATE email_outbox SET status = 'sent', last_code = $3, sent_at = now(), lease_until = NULL, \
         updated_at = now() WHERE tenant_id = $1 AND id = $2",
        vec![id.into(), code.into()],
    )
    .await?;
    Ok(())
}

/// Records a transient failure: the row waits for its retry, still owned by its key.
pub async fn record_retry(
    tx: &TenantTx,
    id: Uuid,
    code: Option<i32>,
    message: &str,
) -> Result<(), DomainError> {
    tx.execute(
        "UPDATE email_outbox SET status = 'retry', last_code = $3, last_error = $4, lease_until = NULL, \
         updated_at = now() WHERE tenant_id = $1 AND id = $2",
        vec![id.into(), code.into(), message.into()],
    )
    .await?;
    Ok(())
}

/// The addresses among `addresses` (lower case) on the tenant's suppression list.
pub async fn suppressed(tx: &TenantTx, addresses: &[String]) -> Result<Vec<String>, DomainError> {
    let rows = tx
        .all(
            "SELECT address FROM email_suppressions WHERE tenant_id = $1 AND address = ANY($2) ORDER BY address",
            vec![addresses.to_vec().into()],
        )
        .await?;
    rows.iter()
        .map(|r| Ok(r.try_get::<String>("", "address")?))
        .collect()
}

/// Puts addresses on the suppression list.
pub async fn suppress(
    tx: &TenantTx,
    addresses: &[String],
    reason: &str,
    code: i32,
) -> Result<(), DomainError> {
    for a in addresses {
        tx.execute(
            "INSERT INTO email_suppressions (tenant_id, address, reason, code) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant_id, address) DO UPDATE SET reason = EXCLUDED.reason, code = EXCLUDED.code",
            vec![a.to_ascii_lowercase().into(), reason.into(), code.into()],
        )
        .await?;
    }
    Ok(())
}

/// Counts one mail against the day's quota; false when the quota is already used up.
pub async fn take_quota(tx: &TenantTx, day: NaiveDate, quota: u32) -> Result<bool, DomainError> {
    let n = tx
        .execute(
            "INSERT INTO email_quota (tenant_id, day, sent) VALUES ($1, $2, 1) \
             ON CONFLICT (tenant_id, day) DO UPDATE SET sent = email_quota.sent + 1 \
             WHERE email_quota.sent < $3",
            vec![day.into(), (quota as i32).into()],
        )
        .await?;
    Ok(n == 1)
}

/// The first of `locales` in which the template exists.
pub async fn template(
    tx: &TenantTx,
    name: &str,
    locales: &[String],
) -> Result<Option<(String, Sources)>, DomainError> {
    for locale in locales {
        if let Some(r) = tx
            .one(
                "SELECT subject, text_body, html_body FROM email_templates \
                 WHERE tenant_id = $1 AND name = $2 AND locale = $3",
                vec![name.into(), locale.clone().into()],
            )
            .await?
        {
            return Ok(Some((
                locale.clone(),
                Sources {
                    subject: r.try_get("", "subject")?,
                    text: r.try_get("", "text_body")?,
                    html: r.try_get("", "html_body")?,
                    origin: format!("template {name:?} ({locale})"),
                },
            )));
        }
    }
    Ok(None)
}

/// Creates or replaces a template.
pub async fn put_template(
    tx: &TenantTx,
    name: &str,
    locale: &str,
    sources: &Sources,
) -> Result<(), DomainError> {
    tx.execute(
        "INSERT INTO email_templates (tenant_id, name, locale, subject, text_body, html_body) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, name, locale) DO UPDATE SET \
         subject = EXCLUDED.subject, text_body = EXCLUDED.text_body, html_body = EXCLUDED.html_body, updated_at = now()",
        vec![
            name.into(),
            locale.into(),
            sources.subject.clone().into(),
            sources.text.clone().into(),
            sources.html.clone().into(),
        ],
    )
    .await?;
    Ok(())
}

/// The row of an idempotency key or outbox id.
pub async fn find(
    tx: &TenantTx,
    key: Option<&str>,
    id: Option<Uuid>,
) -> Result<Option<Row>, DomainError> {
    let (sql, v): (String, Value) = match (key, id) {
        (_, Some(id)) => (
            format!("SELECT {COLUMNS} FROM email_outbox WHERE tenant_id = $1 AND id = $2"),
            id.into(),
        ),
        (Some(k), None) => (
            format!(
                "SELECT {COLUMNS} FROM email_outbox WHERE tenant_id = $1 AND idempotency_key = $2"
            ),
            k.into(),
        ),
        (None, None) => return Ok(None),
    };
    tx.one(&sql, vec![v]).await?.as_ref().map(row).transpose()
}

/// Rows waiting to be sent (queued, sending or retry).
pub async fn pending(tx: &TenantTx) -> Result<i64, DomainError> {
    Ok(tx
        .one(
            "SELECT count(*) AS n FROM email_outbox WHERE tenant_id = $1 AND status IN ('queued', 'sending', 'retry')",
            vec![],
        )
        .await?
        .map(|r| r.try_get::<i64>("", "n"))
        .transpose()?
        .unwrap_or(0))
}

/// Inserts `queued` rows for a campaign's keys (existing keys untouched); returns each key's status after.
pub async fn queue_campaign(
    tx: &TenantTx,
    keys: &[String],
    domain: &str,
    campaign_id: &str,
    template: &str,
    task_id: &str,
) -> Result<Vec<(String, Status)>, DomainError> {
    let mut ids = Vec::with_capacity(keys.len());
    let mut mids = Vec::with_capacity(keys.len());
    for _ in keys {
        let (id, mid) = new_identity(domain);
        ids.push(id);
        mids.push(mid);
    }
    tx.execute(
        "INSERT INTO email_outbox (tenant_id, id, idempotency_key, status, message_id, campaign_id, template, task_id) \
         SELECT $1, u.id, u.k, 'queued', u.m, $5, $6, $7 FROM unnest($2::uuid[], $3::text[], $4::text[]) AS u(id, k, m) \
         ON CONFLICT (tenant_id, idempotency_key) DO NOTHING",
        vec![
            ids.into(),
            keys.to_vec().into(),
            mids.into(),
            campaign_id.into(),
            template.into(),
            task_id.into(),
        ],
    )
    .await?;
    let rows = tx
        .all(
            "SELECT idempotency_key, status FROM email_outbox WHERE tenant_id = $1 AND idempotency_key = ANY($2)",
            vec![keys.to_vec().into()],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get::<String>("", "idempotency_key")?,
                Status::parse(&r.try_get::<String>("", "status")?)?,
            ))
        })
        .collect()
}

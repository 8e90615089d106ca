//! `email_outbox`: one row per (tenant, idempotency key). The row is claimed (`sending` with a lease) before
//! SMTP and records the outcome after, so a redelivered or re-published task never sends a second mail.

use sea_orm::entity::prelude::*;

/// An outbox row.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "email_outbox")]
pub struct Model {
    /// Owner.
    #[sea_orm(primary_key, auto_increment = false)]
    pub tenant_id: Uuid,
    /// Outbox id (also the local part of the `Message-ID`).
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The idempotency key (default: the Celery task id).
    pub idempotency_key: String,
    /// `queued`, `sending`, `sent`, `retry`, `held` or `failed`.
    pub status: String,
    /// SMTP attempts made.
    pub attempts: i32,
    /// While `sending`: until when the claim holds.
    pub lease_until: Option<ChronoDateTimeUtc>,
    /// Last SMTP reply code.
    pub last_code: Option<i32>,
    /// Last error text.
    #[sea_orm(column_type = "Text", nullable)]
    pub last_error: Option<String>,
    /// Exception class of a final failure (`ValueError`, `Suppressed`, ...).
    pub error_type: Option<String>,
    /// The stable `Message-ID` (`<...>`).
    pub message_id: String,
    /// Sender.
    pub mail_from: Option<String>,
    /// `{"to": [...], "cc": [...], "bcc": [...], "reply_to": ...}`.
    #[sea_orm(column_type = "JsonBinary")]
    pub recipients: Json,
    /// Rendered subject.
    pub subject: Option<String>,
    /// The rendered message, byte for byte what is sent.
    pub raw: Option<Vec<u8>>,
    /// Template name, when sent from one.
    pub template: Option<String>,
    /// Locale used.
    pub locale: Option<String>,
    /// Campaign of a bulk send.
    pub campaign_id: Option<String>,
    /// Celery task id of the first attempt.
    pub task_id: Option<String>,
    /// Created.
    pub created_at: ChronoDateTimeUtc,
    /// Last change.
    pub updated_at: ChronoDateTimeUtc,
    /// When the server accepted it.
    pub sent_at: Option<ChronoDateTimeUtc>,
}

/// No relations are navigated from here.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

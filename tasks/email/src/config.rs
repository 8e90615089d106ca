//! The `[email]` section. Every key can also come from the environment (`CELERIAC_EMAIL__SMTP_URL`, ...);
//! the SMTP password from `CELERIAC_EMAIL__SMTP_PASSWORD` or the file named by `smtp_password_file`, never
//! from logs or results.

use celeriac_task::RateLimit;
use serde::Deserialize;
use std::time::Duration;

/// What to do with a mail whose claim expired while `sending` (the worker died between handing the mail to
/// the server and recording the answer): the one window no sender can close.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Ambiguous {
    /// Keep it as `held` (the task returns `held`), count it and warn: an operator decides.
    #[default]
    Held,
    /// Send it again with the same `Message-ID` (receivers that deduplicate by Message-ID show it once).
    Resend,
}

/// `[email]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmailConfig {
    /// `smtp://host:port` (plain), `smtp://host:587?tls=required` (STARTTLS), `smtps://host:465` (TLS);
    /// user and password may be in the URL.
    pub smtp_url: Option<String>,
    /// SMTP password (better: `CELERIAC_EMAIL__SMTP_PASSWORD` or `smtp_password_file`).
    pub smtp_password: Option<String>,
    /// A file holding the SMTP password.
    pub smtp_password_file: Option<String>,
    /// The sender (`"Shop <noreply@example.com>"`).
    pub from: Option<String>,
    /// Idle SMTP connections kept open.
    pub pool_size: u32,
    /// Provider rate limit, cluster-wide per tenant and SMTP account (`"50/s"`, `"1000/m"`).
    pub rate_limit: Option<String>,
    /// Mails per tenant per UTC day; past it, sends wait for the next day.
    pub daily_quota: Option<u32>,
    /// Policy for an expired `sending` claim.
    pub ambiguous: Ambiguous,
    /// Seconds a claim holds before another attempt may treat it as abandoned (at least twice `send_timeout`).
    pub claim_lease: f64,
    /// Seconds one SMTP conversation may take.
    pub send_timeout: f64,
    /// Retries of a transient SMTP failure (4xx, connection) before the mail fails.
    pub max_retries: i64,
    /// Backoff factor in seconds (`factor * 2^retries`, full jitter).
    pub retry_backoff: f64,
    /// Cap of the backoff in seconds.
    pub retry_backoff_max: f64,
    /// Locale of last resort for stored templates.
    pub default_locale: String,
    /// Domain of generated `Message-ID`s (default: the sender's domain).
    pub message_id_domain: Option<String>,
    /// Queue `email.send_bulk` sends its mails to.
    pub bulk_queue: String,
    /// Label metrics with the tenant slug (turn off with many tenants).
    pub metrics_tenant_label: bool,
    /// Name sent in EHLO.
    pub hello_name: Option<String>,
}

impl Default for EmailConfig {
    fn default() -> Self {
        Self {
            smtp_url: None,
            smtp_password: None,
            smtp_password_file: None,
            from: None,
            pool_size: 8,
            rate_limit: None,
            daily_quota: None,
            ambiguous: Ambiguous::Held,
            claim_lease: 120.0,
            send_timeout: 30.0,
            max_retries: 8,
            retry_backoff: 2.0,
            retry_backoff_max: 300.0,
            default_locale: "en".into(),
            message_id_domain: None,
            bulk_queue: "bulk".into(),
            metrics_tenant_label: true,
            hello_name: None,
        }
    }
}

impl EmailConfig {
    /// Checks values types cannot; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(r) = &self.rate_limit {
            RateLimit::parse(r, true).map_err(|e| format!("email.rate_limit: {e}"))?;
        }
        if !(self.send_timeout.is_finite() && self.send_timeout > 0.0) {
            return Err("email.send_timeout must be a positive number of seconds".into());
        }
        if !(self.claim_lease.is_finite() && self.claim_lease >= 2.0 * self.send_timeout) {
            return Err(format!(
                "email.claim_lease ({}) must be at least twice email.send_timeout ({}): a claim must outlive the conversation it covers",
                self.claim_lease, self.send_timeout
            ));
        }
        if self.daily_quota == Some(0) {
            return Err("email.daily_quota must be at least 1 (leave it out for no quota)".into());
        }
        Ok(())
    }

    /// The rate limit's interval between mails.
    pub fn rate_interval(&self) -> Option<Duration> {
        self.rate_limit
            .as_deref()
            .and_then(|r| RateLimit::parse(r, true).ok())
            .map(|r| r.interval)
    }

    /// The claim lease.
    pub fn lease(&self) -> Duration {
        Duration::from_secs_f64(self.claim_lease)
    }
}

//! The outside peer: an SMTP server behind a small trait ([`Transport`]), and its lettre implementation (an
//! async connection pool over rustls). Answers are classified once, here: accepted, transient (4xx,
//! connection trouble: retry with the same claim), permanent (5xx: fail, suppress), or unknown (no answer
//! in time: the server may have the mail).

use crate::config::EmailConfig;
use futures::future::BoxFuture;
use lettre::address::Envelope;
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use std::time::Duration;

/// How a send ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// The server took it (2xx).
    Accepted {
        /// Reply code.
        code: u16,
    },
    /// Try again later: 4xx, a refused or broken connection, a timeout.
    Transient {
        /// Reply code, when the server answered.
        code: Option<u16>,
        /// What happened.
        message: String,
    },
    /// No answer within `send_timeout` after the conversation began: the server may or may not have the
    /// mail (handled like an expired claim, by `email.ambiguous`).
    Unknown {
        /// What happened.
        message: String,
    },
    /// The server refused for good (5xx).
    Permanent {
        /// Reply code.
        code: u16,
        /// The server's text.
        message: String,
    },
}

/// Sends one rendered message.
pub trait Transport: Send + Sync {
    /// Hands `raw` to the server for the envelope's recipients.
    fn send<'a>(&'a self, envelope: &'a Envelope, raw: &'a [u8]) -> BoxFuture<'a, SendOutcome>;
    /// The account the provider limits (`host:port/user`), for the shared rate limit's key.
    fn account(&self) -> &str;
}

/// SMTP over lettre's pool.
pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    timeout: Duration,
    account: String,
}

impl std::fmt::Debug for Smtp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Smtp")
            .field("account", &self.account)
            .finish()
    }
}

/// The URL with any password removed (what logs and errors may show).
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "<invalid url>".into(),
    }
}

impl Smtp {
    /// Builds the pool from `email.smtp_url` and the password settings. Connects lazily.
    pub fn new(config: &EmailConfig, url: &str) -> Result<Self, String> {
        let parsed =
            url::Url::parse(url).map_err(|e| format!("email.smtp_url ({}): {e}", redact(url)))?;
        let password = match (&config.smtp_password, &config.smtp_password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(file)) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| format!("email.smtp_password_file {file:?}: {e}"))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            ),
            (None, None) => None,
        };
        let mut builder = match parsed.scheme() {
            "smtp" if !url.contains("tls=") => {
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(
                    parsed.host_str().unwrap_or("localhost"),
                )
                .port(parsed.port().unwrap_or(25))
            }
            "smtp" | "smtps" => AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                .map_err(|e| format!("email.smtp_url ({}): {e}", redact(url)))?,
            other => {
                return Err(format!(
                    "email.smtp_url: unknown scheme {other:?} (use smtp:// or smtps://)"
                ));
            }
        };
        let user = (!parsed.username().is_empty()).then(|| parsed.username().to_string());
        if let Some(user) = &user {
            let pass = password
                .clone()
                .or_else(|| parsed.password().map(str::to_string))
                .unwrap_or_default();
            builder = builder.credentials(Credentials::new(user.clone(), pass));
        }
        if let Some(name) = &config.hello_name {
            builder = builder.hello_name(ClientId::Domain(name.clone()));
        } else {
            builder = builder.hello_name(ClientId::Domain("celeriac.localdomain".into()));
        }
        let timeout = Duration::from_secs_f64(config.send_timeout);
        let transport = builder
            .timeout(Some(timeout))
            .pool_config(
                PoolConfig::new()
                    .max_size(config.pool_size.max(1))
                    .idle_timeout(Duration::from_secs(60)),
            )
            .build();
        let account = format!(
            "{}:{}/{}",
            parsed.host_str().unwrap_or(""),
            parsed.port_or_known_default().unwrap_or(25),
            user.unwrap_or_default()
        );
        Ok(Self {
            transport,
            timeout,
            account,
        })
    }
}

/// Classifies lettre's error.
fn classify(e: &lettre::transport::smtp::Error) -> SendOutcome {
    let code = e.status().map(u16::from);
    let message = e.to_string();
    if e.is_permanent() {
        SendOutcome::Permanent {
            code: code.unwrap_or(550),
            message,
        }
    } else {
        SendOutcome::Transient { code, message }
    }
}

impl Transport for Smtp {
    fn send<'a>(&'a self, envelope: &'a Envelope, raw: &'a [u8]) -> BoxFuture<'a, SendOutcome> {
        Box::pin(async move {
            match tokio::time::timeout(self.timeout, self.transport.send_raw(envelope, raw)).await {
                Ok(Ok(reply)) => SendOutcome::Accepted {
                    code: reply.code().into(),
                },
                Ok(Err(e)) => classify(&e),
                Err(_) => SendOutcome::Unknown {
                    message: format!("no answer from the SMTP server within {:?}", self.timeout),
                },
            }
        })
    }

    fn account(&self) -> &str {
        &self.account
    }
}

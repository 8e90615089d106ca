//! The outside peer: an SMTP server behind a small trait ([`Transport`]), and its implementation over lettre's
//! SMTP client (a pool of `TCP_NODELAY` connections; STARTTLS and TLS with rustls). Answers are classified once, here: accepted, transient (4xx,
//! connection trouble: retry with the same claim), permanent (5xx: fail, suppress), or unknown (no answer
//! in time: the server may have the mail).

use crate::config::EmailConfig;
use futures::future::BoxFuture;
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
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

/// How the connection is secured (from the URL).
#[derive(Debug, Clone)]
enum Security {
    /// Plain TCP (`smtp://host:port`).
    None,
    /// STARTTLS (`?tls=required` or `?tls=opportunistic`).
    StartTls {
        /// Refuse a server without STARTTLS.
        required: bool,
    },
    /// TLS from the first byte (`smtps://`).
    Wrapper,
}

/// SMTP connections kept open and reused. lettre's own pool writes the message body and the final dot as
/// two segments without `TCP_NODELAY`, which costs a delayed-ACK round (40 ms on Linux) per mail; these
/// connections are made here with `TCP_NODELAY` and handed to lettre's client.
pub struct Smtp {
    host: String,
    port: u16,
    security: Security,
    credentials: Option<Credentials>,
    hello: ClientId,
    timeout: Duration,
    idle: std::sync::Mutex<Vec<(AsyncSmtpConnection, std::time::Instant)>>,
    max_idle: usize,
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
    /// Reads `email.smtp_url` and the password settings. Connects lazily.
    pub fn new(config: &EmailConfig, url: &str) -> Result<Self, String> {
        let parsed =
            url::Url::parse(url).map_err(|e| format!("email.smtp_url ({}): {e}", redact(url)))?;
        let tls = parsed
            .query_pairs()
            .find(|(k, _)| k == "tls")
            .map(|(_, v)| v.into_owned());
        let (security, default_port) = match (parsed.scheme(), tls.as_deref()) {
            ("smtp", None | Some("none")) => (Security::None, 25),
            ("smtp", Some("required")) => (Security::StartTls { required: true }, 587),
            ("smtp", Some("opportunistic")) => (Security::StartTls { required: false }, 587),
            ("smtps", None) => (Security::Wrapper, 465),
            (scheme, tls) => {
                return Err(format!(
                    "email.smtp_url ({}): unsupported scheme {scheme:?} with tls={tls:?} (use smtp://, smtp://...?tls=required, smtp://...?tls=opportunistic or smtps://)",
                    redact(url)
                ));
            }
        };
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
        let user = (!parsed.username().is_empty()).then(|| {
            url::form_urlencoded::parse(parsed.username().as_bytes())
                .map(|(k, _)| k.into_owned())
                .collect::<String>()
        });
        let credentials = user.as_ref().map(|u| {
            let pass = password
                .clone()
                .or_else(|| parsed.password().map(str::to_string))
                .unwrap_or_default();
            Credentials::new(u.clone(), pass)
        });
        let host = parsed
            .host_str()
            .ok_or_else(|| format!("email.smtp_url ({}): no host", redact(url)))?
            .to_string();
        let port = parsed.port().unwrap_or(default_port);
        let account = format!("{host}:{port}/{}", user.unwrap_or_default());
        Ok(Self {
            host,
            port,
            security,
            credentials,
            hello: ClientId::Domain(
                config
                    .hello_name
                    .clone()
                    .unwrap_or_else(|| "celeriac.localdomain".into()),
            ),
            timeout: Duration::from_secs_f64(config.send_timeout),
            idle: std::sync::Mutex::default(),
            max_idle: config.pool_size.max(1) as usize,
            account,
        })
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, Failure> {
        let tls = || TlsParameters::new(self.host.clone());
        let mut conn = match self.security {
            Security::Wrapper => {
                AsyncSmtpConnection::connect_tokio1(
                    (self.host.as_str(), self.port),
                    Some(self.timeout),
                    &self.hello,
                    Some(tls()?),
                    None,
                )
                .await?
            }
            _ => {
                let stream = tokio::time::timeout(
                    self.timeout,
                    tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
                )
                .await
                .map_err(|_| {
                    connect_error(format!(
                        "connecting to {}:{} timed out",
                        self.host, self.port
                    ))
                })?
                .map_err(|e| {
                    connect_error(format!("connecting to {}:{}: {e}", self.host, self.port))
                })?;
                stream.set_nodelay(true).map_err(connect_error)?;
                AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.hello).await?
            }
        };
        if let Security::StartTls { required } = self.security {
            if conn.can_starttls() {
                conn.starttls(tls()?, &self.hello).await?;
            } else if required {
                let _ = conn.quit().await;
                return Err(connect_error(
                    "the server does not offer STARTTLS and email.smtp_url requires it (tls=required)",
                ));
            }
        }
        if let Some(c) = &self.credentials {
            conn.auth(&[Mechanism::Plain, Mechanism::Login], c).await?;
        }
        Ok(conn)
    }

    /// An idle connection that still answers, or a new one.
    async fn checkout(&self) -> Result<AsyncSmtpConnection, Failure> {
        loop {
            let taken = self.idle.lock().expect("smtp pool").pop();
            let Some((mut conn, since)) = taken else {
                return self.connect().await;
            };
            // A connection idle for a while may have been closed by the server: ask before using it.
            if since.elapsed() < Duration::from_secs(2) || conn.test_connected().await {
                return Ok(conn);
            }
        }
    }

    fn checkin(&self, conn: AsyncSmtpConnection) {
        if conn.has_broken() {
            return;
        }
        let mut idle = self.idle.lock().expect("smtp pool");
        if idle.len() < self.max_idle {
            idle.push((conn, std::time::Instant::now()));
        }
    }
}

/// Why a conversation failed: lettre's answer, or ours (connecting, STARTTLS missing).
#[derive(Debug)]
enum Failure {
    Smtp(lettre::transport::smtp::Error),
    Connect(String),
}

impl From<lettre::transport::smtp::Error> for Failure {
    fn from(e: lettre::transport::smtp::Error) -> Self {
        Self::Smtp(e)
    }
}

fn connect_error(message: impl std::fmt::Display) -> Failure {
    Failure::Connect(message.to_string())
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
            // Connecting (and STARTTLS, AUTH) cannot deliver anything: a failure there is transient.
            let mut conn = match tokio::time::timeout(self.timeout, self.checkout()).await {
                Ok(Ok(c)) => c,
                Ok(Err(Failure::Smtp(e))) => return classify(&e),
                Ok(Err(Failure::Connect(message))) => {
                    return SendOutcome::Transient {
                        code: None,
                        message,
                    };
                }
                Err(_) => {
                    return SendOutcome::Transient {
                        code: None,
                        message: format!("connecting to {}:{} timed out", self.host, self.port),
                    };
                }
            };
            // Once the conversation began, no answer in time leaves the mail's fate unknown.
            match tokio::time::timeout(self.timeout, conn.send(envelope, raw)).await {
                Ok(reply) => {
                    self.checkin(conn);
                    match reply {
                        Ok(r) => SendOutcome::Accepted {
                            code: r.code().into(),
                        },
                        Err(e) => classify(&e),
                    }
                }
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

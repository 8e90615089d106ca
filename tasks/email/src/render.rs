//! From task arguments to the bytes sent: argument checks (each error names its field), minijinja rendering
//! with strict undefined (HTML auto-escaped, text and subject not), and the MIME message with its stable
//! `Message-ID`. Pure: no database, no network.

use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};
use serde_json::{Value, json};

/// A bad argument: becomes `ValueError(message)`, with the outbox row `failed` and nothing sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the mail is made of.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    /// A template stored for the tenant.
    Template {
        /// Its name.
        name: String,
    },
    /// Templates given inline.
    Inline {
        /// Subject template.
        subject: String,
        /// Plain-text template.
        text: Option<String>,
        /// HTML template.
        html: Option<String>,
    },
}

/// The template sources of one mail (stored or inline).
#[derive(Debug, Clone, PartialEq)]
pub struct Sources {
    /// Subject.
    pub subject: String,
    /// Plain text.
    pub text: Option<String>,
    /// HTML.
    pub html: Option<String>,
    /// Where they came from, for error messages (`template "welcome" (de)` or `inline`).
    pub origin: String,
}

/// A rendered mail.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// Subject line.
    pub subject: String,
    /// Plain-text body.
    pub text: Option<String>,
    /// HTML body.
    pub html: Option<String>,
}

/// Checked recipients and headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Addressing {
    /// `To`.
    pub to: Vec<Mailbox>,
    /// `Cc`.
    pub cc: Vec<Mailbox>,
    /// Envelope-only recipients.
    pub bcc: Vec<Mailbox>,
    /// `Reply-To`.
    pub reply_to: Option<Mailbox>,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
}

impl Addressing {
    /// Every envelope recipient, lower case, deduplicated, in order.
    pub fn recipients(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for m in self.to.iter().chain(&self.cc).chain(&self.bcc) {
            let a = m.email.to_string().to_ascii_lowercase();
            if !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }

    /// As stored in the outbox row.
    pub fn to_json(&self) -> Value {
        let list = |v: &[Mailbox]| v.iter().map(|m| m.to_string()).collect::<Vec<_>>();
        json!({
            "to": list(&self.to),
            "cc": list(&self.cc),
            "bcc": list(&self.bcc),
            "reply_to": self.reply_to.as_ref().map(|m| m.to_string()),
        })
    }
}

const RESERVED: [&str; 12] = [
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "message-id",
    "date",
    "reply-to",
    "sender",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
];

fn mailbox(field: &str, v: &Value) -> Result<Mailbox, Invalid> {
    let s = v
        .as_str()
        .ok_or_else(|| Invalid(format!("{field}: expected an address string, got {v}")))?;
    s.trim().parse::<Mailbox>().map_err(|e| {
        // The bare-address parser says what is wrong ("Invalid email domain"); the mailbox one only
        // "Invalid input".
        let why = match s.trim().parse::<lettre::Address>() {
            Err(a) => a.to_string(),
            Ok(_) => e.to_string(),
        };
        Invalid(format!("{field}: invalid address {s:?} ({why})"))
    })
}

/// An address or a list of them (`to`, `cc`, `bcc`).
pub fn mailboxes(field: &str, v: &Value) -> Result<Vec<Mailbox>, Invalid> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items.iter().map(|i| mailbox(field, i)).collect(),
        other => Ok(vec![mailbox(field, other)?]),
    }
}

/// Checks `to`, `cc`, `bcc`, `reply_to` and `headers`.
pub fn addressing(
    to: &Value,
    cc: &Value,
    bcc: &Value,
    reply_to: &Value,
    headers: &Value,
) -> Result<Addressing, Invalid> {
    let to = mailboxes("to", to)?;
    if to.is_empty() {
        return Err(Invalid("to: at least one recipient is required".into()));
    }
    let reply_to = match reply_to {
        Value::Null => None,
        v => Some(mailbox("reply_to", v)?),
    };
    let headers = match headers {
        Value::Null => Vec::new(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| {
                if RESERVED.contains(&k.to_ascii_lowercase().as_str()) {
                    return Err(Invalid(format!(
                        "headers: {k:?} is set by the mailer; use the task's own argument"
                    )));
                }
                HeaderName::new_from_ascii(k.clone())
                    .map_err(|_| Invalid(format!("headers: invalid header name {k:?}")))?;
                let v = v.as_str().ok_or_else(|| {
                    Invalid(format!("headers: the value of {k:?} must be a string"))
                })?;
                if v.contains(['\r', '\n']) {
                    return Err(Invalid(format!(
                        "headers: the value of {k:?} contains a line break"
                    )));
                }
                Ok((k.clone(), v.to_string()))
            })
            .collect::<Result<_, _>>()?,
        other => return Err(Invalid(format!("headers: expected a dict, got {other}"))),
    };
    Ok(Addressing {
        to,
        cc: mailboxes("cc", cc)?,
        bcc: mailboxes("bcc", bcc)?,
        reply_to,
        headers,
    })
}

/// Which templates: a stored one, or inline `subject` + `text`/`html`.
pub fn content(
    template: &Value,
    subject: &Value,
    text: &Value,
    html: &Value,
) -> Result<Content, Invalid> {
    let opt = |field: &str, v: &Value| match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => Err(Invalid(format!("{field}: expected a string, got {other}"))),
    };
    let (template, subject, text, html) = (
        opt("template", template)?,
        opt("subject", subject)?,
        opt("text", text)?,
        opt("html", html)?,
    );
    match (template, subject) {
        (Some(_), Some(_)) => Err(Invalid(
            "give either template or subject with text/html, not both".into(),
        )),
        (Some(name), None) if text.is_none() && html.is_none() => {
            if name.trim().is_empty() {
                return Err(Invalid("template: the name is empty".into()));
            }
            Ok(Content::Template { name })
        }
        (Some(_), None) => Err(Invalid(
            "text/html: not allowed with template (the template has its own)".into(),
        )),
        (None, Some(subject)) => {
            if text.is_none() && html.is_none() {
                return Err(Invalid("text or html is required with subject".into()));
            }
            Ok(Content::Inline {
                subject,
                text,
                html,
            })
        }
        (None, None) => Err(Invalid(
            "template, or subject with text and/or html, is required".into(),
        )),
    }
}

/// The locales tried for a stored template: `de-AT`, `de`, then the default.
pub fn locale_chain(locale: Option<&str>, default: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(l) = locale.filter(|l| !l.is_empty()) {
        out.push(l.to_string());
        if let Some((lang, _)) = l.split_once(['-', '_']) {
            out.push(lang.to_string());
        }
    }
    out.push(default.to_string());
    out.dedup();
    out
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    env.set_auto_escape_callback(|name| {
        if name.ends_with("html") {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    env
}

fn describe(err: &minijinja::Error, part: &str, origin: &str, source: &str) -> Invalid {
    let mut msg = format!("{part}: {origin}: {}", err.kind());
    match (err.kind(), err.range().and_then(|r| source.get(r))) {
        (ErrorKind::UndefinedError, Some(expr)) => msg.push_str(&format!(" '{}'", expr.trim())),
        _ => {
            if let Some(d) = err.detail() {
                msg.push_str(": ");
                msg.push_str(d);
            }
        }
    }
    if let Some(line) = err.line() {
        msg.push_str(&format!(" at line {line}"));
    }
    Invalid(msg)
}

/// Checks that each source compiles (what `email.template_put` refuses).
pub fn check_sources(sources: &Sources) -> Result<(), Invalid> {
    let env = environment();
    let parts = [
        ("subject", Some(&sources.subject)),
        ("text", sources.text.as_ref()),
        ("html", sources.html.as_ref()),
    ];
    for (part, src) in parts {
        if let Some(src) = src {
            env.template_from_named_str(part, src)
                .map_err(|e| describe(&e, part, &sources.origin, src))?;
        }
    }
    Ok(())
}

/// Renders the three parts with `context` (a dict). Any undefined variable is an error naming it.
pub fn render(sources: &Sources, context: &Value) -> Result<Rendered, Invalid> {
    if !matches!(context, Value::Object(_) | Value::Null) {
        return Err(Invalid(format!("context: expected a dict, got {context}")));
    }
    let ctx = if context.is_null() {
        json!({})
    } else {
        context.clone()
    };
    let env = environment();
    let one = |part: &'static str, src: &str| -> Result<String, Invalid> {
        env.render_named_str(part, src, &ctx)
            .map_err(|e| describe(&e, part, &sources.origin, src))
    };
    let subject = one("subject", &sources.subject)?;
    if subject.contains(['\r', '\n']) {
        return Err(Invalid(format!(
            "subject: {}: the rendered subject contains a line break",
            sources.origin
        )));
    }
    Ok(Rendered {
        subject: subject.trim().to_string(),
        text: sources
            .text
            .as_deref()
            .map(|s| one("text", s))
            .transpose()?,
        html: sources
            .html
            .as_deref()
            .map(|s| one("html", s))
            .transpose()?,
    })
}

/// Builds the message as sent: headers in a fixed order, the given `Message-ID`, text and/or HTML.
pub fn build(
    from: &Mailbox,
    addressing: &Addressing,
    rendered: &Rendered,
    message_id: &str,
) -> Result<(Vec<u8>, lettre::address::Envelope), Invalid> {
    let mut b = lettre::Message::builder()
        .message_id(Some(message_id.to_string()))
        .from(from.clone())
        .subject(rendered.subject.clone());
    for m in &addressing.to {
        b = b.to(m.clone());
    }
    for m in &addressing.cc {
        b = b.cc(m.clone());
    }
    for m in &addressing.bcc {
        b = b.bcc(m.clone());
    }
    if let Some(r) = &addressing.reply_to {
        b = b.reply_to(r.clone());
    }
    for (k, v) in &addressing.headers {
        let name = HeaderName::new_from_ascii(k.clone())
            .map_err(|_| Invalid(format!("headers: invalid header name {k:?}")))?;
        b = b.raw_header(HeaderValue::new(name, v.clone()));
    }
    let message = match (&rendered.text, &rendered.html) {
        (Some(t), Some(h)) => b.multipart(MultiPart::alternative_plain_html(t.clone(), h.clone())),
        (Some(t), None) => b.singlepart(SinglePart::plain(t.clone())),
        (None, Some(h)) => b.singlepart(SinglePart::html(h.clone())),
        (None, None) => b.header(ContentType::TEXT_PLAIN).body(String::new()),
    }
    .map_err(|e| Invalid(format!("the message could not be built: {e}")))?;
    Ok((message.formatted(), message.envelope().clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(subject: &str, text: Option<&str>, html: Option<&str>) -> Sources {
        Sources {
            subject: subject.into(),
            text: text.map(str::to_string),
            html: html.map(str::to_string),
            origin: "inline".into(),
        }
    }

    #[test]
    fn strict_undefined_names_the_variable_and_escapes_html_only() {
        let s = inline(
            "Hi {{ name }}",
            Some("<{{ name }}>"),
            Some("<p>{{ name }}</p>"),
        );
        let r = render(&s, &json!({"name": "A&B"})).unwrap();
        assert_eq!(r.subject, "Hi A&B");
        assert_eq!(r.text.as_deref(), Some("<A&B>"));
        assert_eq!(r.html.as_deref(), Some("<p>A&amp;B</p>"));
        let err = render(
            &inline("x", None, Some("<p>\n{{ user.name }}</p>")),
            &json!({"user": {}}),
        )
        .unwrap_err();
        assert_eq!(err.0, "html: inline: undefined value 'user.name' at line 2");
        let err = render(&inline("{{ missing }}", Some("t"), None), &json!({})).unwrap_err();
        assert_eq!(
            err.0,
            "subject: inline: undefined value 'missing' at line 1"
        );
    }

    #[test]
    fn arguments_are_checked_field_by_field() {
        let e = |r: Result<Addressing, Invalid>| r.unwrap_err().0;
        assert_eq!(
            e(addressing(
                &json!("not an address"),
                &Value::Null,
                &Value::Null,
                &Value::Null,
                &Value::Null
            )),
            "to: invalid address \"not an address\" (Missing domain or user)"
        );
        assert_eq!(
            e(addressing(
                &json!([]),
                &Value::Null,
                &Value::Null,
                &Value::Null,
                &Value::Null
            )),
            "to: at least one recipient is required"
        );
        assert_eq!(
            e(addressing(
                &json!("a@x.org"),
                &json!(["b@"]),
                &Value::Null,
                &Value::Null,
                &Value::Null
            )),
            "cc: invalid address \"b@\" (Invalid email domain)"
        );
        assert_eq!(
            e(addressing(
                &json!("a@x.org"),
                &Value::Null,
                &Value::Null,
                &Value::Null,
                &json!({"Subject": "x"})
            )),
            "headers: \"Subject\" is set by the mailer; use the task's own argument"
        );
        let a = addressing(
            &json!(["A <A@x.org>", "b@x.org"]),
            &json!("c@x.org"),
            &json!("b@X.org"),
            &Value::Null,
            &json!({"X-Campaign": "7"}),
        )
        .unwrap();
        assert_eq!(a.recipients(), vec!["a@x.org", "b@x.org", "c@x.org"]);
        assert_eq!(
            content(&json!("w"), &json!("s"), &Value::Null, &Value::Null)
                .unwrap_err()
                .0,
            "give either template or subject with text/html, not both"
        );
        assert_eq!(
            content(&Value::Null, &json!("s"), &Value::Null, &Value::Null)
                .unwrap_err()
                .0,
            "text or html is required with subject"
        );
    }

    #[test]
    fn locales_fall_back_to_the_language_then_the_default() {
        assert_eq!(locale_chain(Some("de-AT"), "en"), vec!["de-AT", "de", "en"]);
        assert_eq!(locale_chain(Some("en"), "en"), vec!["en"]);
        assert_eq!(locale_chain(None, "en"), vec!["en"]);
    }

    #[test]
    fn the_message_carries_its_message_id_and_hides_bcc() {
        let a = addressing(
            &json!("to@x.org"),
            &Value::Null,
            &json!("hidden@x.org"),
            &Value::Null,
            &Value::Null,
        )
        .unwrap();
        let r = render(&inline("S", Some("T"), Some("<b>H</b>")), &json!({})).unwrap();
        let from: Mailbox = "Shop <shop@x.org>".parse().unwrap();
        let (raw, env) = build(&from, &a, &r, "<abc@x.org>").unwrap();
        let text = String::from_utf8(raw).unwrap();
        assert!(text.contains("Message-ID: <abc@x.org>\r\n"), "{text}");
        assert!(!text.to_ascii_lowercase().contains("hidden@x.org"));
        assert_eq!(env.to().len(), 2);
        assert!(text.contains("multipart/alternative"));
    }
}

//! The Celery tasks of the family, registered under their dotted names: `email.send` (the pipeline is in
//! `send`), `email.send_bulk`, `email.template_put`, `email.template_get` and `email.status`.

use crate::render::{self, Sources};
use crate::send::{Email, SendArgs};
use crate::store::{self, Status};
use celeriac_task::{Registry, TaskContext, TaskError, TaskOptions};
use serde_json::{Value, json};
use std::sync::Arc;

fn string(field: &str, v: &Value) -> Result<Option<String>, TaskError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => Err(TaskError::value_error(format!(
            "{field}: expected a string, got {other}"
        ))),
    }
}

fn required(field: &str, v: &Value) -> Result<String, TaskError> {
    string(field, v)?
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| TaskError::value_error(format!("{field} is required")))
}

fn check_locale(locale: &str) -> Result<(), TaskError> {
    let ok = locale.split(['-', '_']).enumerate().all(|(i, part)| {
        let n = part.len();
        if i == 0 {
            (2..=3).contains(&n) && part.chars().all(|c| c.is_ascii_alphabetic())
        } else {
            (2..=8).contains(&n) && part.chars().all(|c| c.is_ascii_alphanumeric())
        }
    });
    if ok {
        Ok(())
    } else {
        Err(TaskError::value_error(format!(
            "locale: {locale:?} is not a locale tag such as en or de-AT"
        )))
    }
}

/// Registers the tasks over `email`.
pub fn register(registry: &mut Registry, email: Arc<Email>) {
    // A mail is sent at most once per key whatever happens to the worker: the task acknowledges late so a
    // crash redelivers it, and the outbox claim turns the redelivery into a replay.
    let send_opts = TaskOptions {
        acks_late: Some(true),
        ..Default::default()
    };
    let e = Arc::clone(&email);
    registry.task(
        "email.send",
        &[
            "tenant_id",
            "to",
            "template?",
            "subject?",
            "text?",
            "html?",
            "context?",
            "locale?",
            "cc?",
            "bcc?",
            "reply_to?",
            "headers?",
            "idempotency_key?",
        ],
        send_opts.clone(),
        move |ctx: TaskContext, a: SendArgs| {
            let e = Arc::clone(&e);
            async move { e.send(&ctx, a).await }
        },
    );
    let e = Arc::clone(&email);
    registry.task(
        "email.send_bulk",
        &[
            "tenant_id",
            "template",
            "recipients",
            "campaign_id",
            "locale?",
        ],
        send_opts,
        move |ctx: TaskContext,
              (tenant, template, recipients, campaign, locale): (
            Value,
            Value,
            Value,
            Value,
            Value,
        )| {
            let e = Arc::clone(&e);
            async move { send_bulk(&e, &ctx, tenant, template, recipients, campaign, locale).await }
        },
    );
    let e = Arc::clone(&email);
    registry.task(
        "email.template_put",
        &["tenant_id", "name", "locale", "subject", "text?", "html?"],
        TaskOptions::default(),
        move |_ctx: TaskContext,
              (tenant, name, locale, subject, text, html): (
            Value,
            Value,
            Value,
            Value,
            Value,
            Value,
        )| {
            let e = Arc::clone(&e);
            async move {
                let tenant = e.tenant_arg(&tenant).await?;
                put_template(e.tx(&tenant).await?, &name, &locale, &subject, &text, &html).await
            }
        },
    );
    let e = Arc::clone(&email);
    registry.task(
        "email.template_get",
        &["tenant_id", "name", "locale?"],
        TaskOptions::default(),
        move |_ctx: TaskContext, (tenant, name, locale): (Value, Value, Value)| {
            let e = Arc::clone(&e);
            async move {
                let tenant = e.tenant_arg(&tenant).await?;
                get_template(
                    e.tx(&tenant).await?,
                    &name,
                    &locale,
                    &e.config.default_locale,
                )
                .await
            }
        },
    );
    let e = Arc::clone(&email);
    registry.task(
        "email.status",
        &["tenant_id", "idempotency_key?", "outbox_id?"],
        TaskOptions::default(),
        move |_ctx: TaskContext, (tenant, key, id): (Value, Value, Value)| {
            let e = Arc::clone(&e);
            async move {
                let key = string("idempotency_key", &key)?;
                let id = string("outbox_id", &id)?
                    .map(|s| uuid::Uuid::parse_str(&s).map_err(|_| TaskError::value_error(format!("outbox_id: {s:?} is not a UUID"))))
                    .transpose()?;
                if key.is_none() && id.is_none() {
                    return Err(TaskError::value_error("idempotency_key or outbox_id is required"));
                }
                let tenant = e.tenant_arg(&tenant).await?;
                let tx = e.tx(&tenant).await?;
                let row = store::find(&tx, key.as_deref(), id).await?;
                tx.commit().await?;
                Ok(row.map(|r| json!({
                    "outbox_id": r.id.to_string(),
                    "idempotency_key": r.key,
                    "status": r.status.as_str(),
                    "attempts": r.attempts,
                    "message_id": r.message_id,
                    "from": r.mail_from,
                    "to": r.recipients.get("to").cloned().unwrap_or(Value::Null),
                    "cc": r.recipients.get("cc").cloned().unwrap_or(Value::Null),
                    "subject": r.subject,
                    "template": r.template,
                    "locale": r.locale,
                    "campaign_id": r.campaign_id,
                    "last_code": r.last_code,
                    "last_error": r.last_error,
                    "error_type": r.error_type,
                    "created_at": r.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    "sent_at": r.sent_at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
                })).unwrap_or(Value::Null))
            }
        },
    );
}

/// `email.template_put` (also `celeriac email template put`): checks the sources compile, then stores them.
pub async fn put_template(
    tx: celeriac_domain::TenantTx,
    name: &Value,
    locale: &Value,
    subject: &Value,
    text: &Value,
    html: &Value,
) -> Result<Value, TaskError> {
    let name = required("name", name)?;
    let locale = required("locale", locale)?;
    check_locale(&locale)?;
    let sources = Sources {
        subject: required("subject", subject)?,
        text: string("text", text)?,
        html: string("html", html)?,
        origin: format!("template {name:?} ({locale})"),
    };
    if sources.text.is_none() && sources.html.is_none() {
        return Err(TaskError::value_error("text or html is required"));
    }
    render::check_sources(&sources).map_err(|e| TaskError::value_error(e.0))?;
    store::put_template(&tx, &name, &locale, &sources).await?;
    tx.commit().await?;
    Ok(json!({"name": name, "locale": locale, "stored": true}))
}

/// `email.template_get` (also `celeriac email template get`): the template in the first locale of the
/// fallback chain that has it.
pub async fn get_template(
    tx: celeriac_domain::TenantTx,
    name: &Value,
    locale: &Value,
    default_locale: &str,
) -> Result<Value, TaskError> {
    let name = required("name", name)?;
    let locale = string("locale", locale)?;
    let chain = render::locale_chain(locale.as_deref(), default_locale);
    let found = store::template(&tx, &name, &chain).await?;
    tx.commit().await?;
    let (l, s) = found.ok_or_else(|| {
        TaskError::value_error(format!(
            "template: unknown template {name:?} (locales tried: {})",
            chain.join(", ")
        ))
    })?;
    Ok(json!({"name": name, "locale": l, "subject": s.subject, "text": s.text, "html": s.html}))
}

/// `email.send_bulk`: one outbox row per recipient (key `campaign:<campaign_id>:<address>`), then one
/// `email.send` per recipient not yet finished, on the bulk queue. Run again (a redelivery), it publishes
/// what is still open and sends nothing twice.
async fn send_bulk(
    e: &Email,
    ctx: &TaskContext,
    tenant: Value,
    template: Value,
    recipients: Value,
    campaign: Value,
    locale: Value,
) -> Result<Value, TaskError> {
    let template = required("template", &template)?;
    let campaign = required("campaign_id", &campaign)?;
    let locale = string("locale", &locale)?;
    let Value::Array(list) = recipients else {
        return Err(TaskError::value_error(format!(
            "recipients: expected a list of {{\"to\", \"context\"}}, got {recipients}"
        )));
    };
    let mut entries = Vec::with_capacity(list.len());
    for (i, r) in list.iter().enumerate() {
        let to = r
            .get("to")
            .ok_or_else(|| TaskError::value_error(format!("recipients[{i}].to is required")))?;
        let boxes = render::mailboxes(&format!("recipients[{i}].to"), to)
            .map_err(|e| TaskError::value_error(e.0))?;
        let [mailbox] = boxes.as_slice() else {
            return Err(TaskError::value_error(format!(
                "recipients[{i}].to: exactly one address per recipient"
            )));
        };
        let context = r.get("context").cloned().unwrap_or_else(|| json!({}));
        if !context.is_object() {
            return Err(TaskError::value_error(format!(
                "recipients[{i}].context: expected a dict"
            )));
        }
        let key = format!(
            "campaign:{campaign}:{}",
            mailbox.email.to_string().to_ascii_lowercase()
        );
        entries.push((key, to.clone(), context, r.get("locale").cloned()));
    }
    let tenant = e.tenant_arg(&tenant).await?;
    let keys: Vec<String> = entries.iter().map(|(k, ..)| k.clone()).collect();
    let domain = e
        .message_domain()
        .map_err(|m| TaskError::celeriac("ConfigurationError", m))?;
    let tx = e.tx(&tenant).await?;
    let states = store::queue_campaign(&tx, &keys, &domain, &campaign, &template, &ctx.id).await?;
    tx.commit().await?;
    let open: std::collections::HashSet<String> = states
        .into_iter()
        .filter(|(_, s)| !matches!(s, Status::Sent | Status::Failed | Status::Held))
        .map(|(k, _)| k)
        .collect();
    let mut published = 0;
    for (key, to, context, own_locale) in &entries {
        if !open.contains(key) {
            continue;
        }
        let sig = json!({
            "task": "email.send", "args": [],
            "kwargs": {"tenant_id": tenant.id.to_string(), "to": to, "template": template, "context": context,
                       "locale": own_locale.clone().unwrap_or_else(|| json!(locale)), "idempotency_key": key},
            "options": {"queue": e.config.bulk_queue}, "subtask_type": null, "immutable": false,
        });
        ctx.apply_untracked(&sig).await?;
        published += 1;
    }
    Ok(
        json!({"campaign_id": campaign, "recipients": entries.len(), "published": published,
              "finished": entries.len() - published}),
    )
}

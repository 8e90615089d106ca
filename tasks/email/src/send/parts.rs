//! The small pieces of `email.send`: argument parsing, the values and failures it answers with, the
//! envelope of an outbox row, refused recipients, the daily quota's reset and the SMTP server's health.

use crate::service::SendOutcome;
use crate::store::Row;
use celeriac_task::{TaskContext, TaskError, random_unit};
use chrono::{Duration as ChronoDuration, Utc};
use lettre::Address;
use lettre::address::Envelope;
use serde_json::{Value, json};

pub(super) fn configuration(message: &str) -> TaskError {
    TaskError::celeriac("ConfigurationError", message)
}

/// Reports the SMTP server's health from an answer: no answer, a cut connection or a 421 (service not
/// available) is an outage; any other reply means it is there.
pub(super) fn observe(ctx: &TaskContext, answer: &SendOutcome) {
    match answer {
        SendOutcome::Transient {
            code: None | Some(421),
            message,
        }
        | SendOutcome::Unknown { message } => ctx.peers.down("smtp", message),
        _ => ctx.peers.up("smtp"),
    }
}

pub(super) fn string_arg(field: &str, v: &Value) -> Result<Option<String>, TaskError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => Err(TaskError::value_error(format!(
            "{field}: expected a string, got {other}"
        ))),
    }
}

pub(super) fn required(field: &str, v: &Value) -> Result<String, TaskError> {
    string_arg(field, v)?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| TaskError::value_error(format!("{field} is required")))
}

pub(super) fn outcome(status: &str, row: &Row) -> Value {
    json!({"status": status, "outbox_id": row.id.to_string(), "message_id": row.message_id})
}

/// The failure a finished `failed` row answers with again (a re-publish replays the outcome).
pub(super) fn replay_failure(row: &Row) -> TaskError {
    let msg = row.last_error.clone().unwrap_or_else(|| "failed".into());
    match row.error_type.as_deref() {
        Some("ValueError") | None => TaskError::value_error(msg),
        Some(other) => TaskError::celeriac(other, msg),
    }
}

/// The recipients a permanent refusal names (all of them when there is one recipient and none is named).
pub(super) fn refused(message: &str, rcpts: &[String]) -> Vec<String> {
    let lower = message.to_ascii_lowercase();
    let named: Vec<String> = rcpts
        .iter()
        .filter(|r| lower.contains(r.as_str()))
        .cloned()
        .collect();
    if named.is_empty() && rcpts.len() == 1 {
        rcpts.to_vec()
    } else {
        named
    }
}

/// Seconds until the next UTC midnight (when the daily quota resets).
pub(super) fn until_midnight() -> f64 {
    let now = Utc::now();
    let next = (now.date_naive() + ChronoDuration::days(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight");
    (next.and_utc() - now).num_milliseconds().max(1000) as f64 / 1000.0 + random_unit() * 60.0
}

pub(super) fn envelope_of(row: &Row) -> Result<(Envelope, Vec<String>), TaskError> {
    let rcpts: Vec<String> = row.recipients["rcpt"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let from = row.recipients["envelope_from"]
        .as_str()
        .and_then(|s| s.parse::<Address>().ok());
    let to = rcpts
        .iter()
        .filter_map(|s| s.parse::<Address>().ok())
        .collect();
    let env = Envelope::new(from, to).map_err(|e| {
        TaskError::celeriac(
            "DatabaseError",
            format!("outbox {}: bad envelope: {e}", row.id),
        )
    })?;
    Ok((env, rcpts))
}

//! What celeriac declares on RabbitMQ, exactly as Celery does (spec §3.1): the `celery` direct exchange,
//! durable task queues bound by their own name, the `celeryev` topic exchange, the `celery.pidbox` fanout and
//! `reply.celery.pidbox` direct exchanges with their transient queues; plus kombu's native delayed delivery
//! topology (`celery_delayed_0..27`, `celery_delayed_delivery`) that parks ETA tasks inside RabbitMQ.
//!
//! A queue that already exists with other arguments is reported by name and argument, with what the broker
//! has and what the configuration asks for, instead of RabbitMQ's bare `PRECONDITION_FAILED`.

use crate::BrokerError;
use serde_json::{Map, Value};

/// Celery's default task exchange.
pub const TASK_EXCHANGE: &str = "celery";
/// The events exchange (topic).
pub const EVENT_EXCHANGE: &str = "celeryev";
/// The remote-control broadcast exchange (fanout).
pub const PIDBOX_EXCHANGE: &str = "celery.pidbox";
/// The remote-control reply exchange (direct).
pub const REPLY_EXCHANGE: &str = "reply.celery.pidbox";
/// Where revoked task ids are kept for workers that start later.
pub const REVOKED_QUEUE: &str = "celeriac.revoked";
/// Number of binary delay levels of native delayed delivery (kombu `MAX_NUMBER_OF_BITS_TO_USE`).
pub const DELAY_BITS: u32 = 28;
/// The exchange delayed messages leave through (kombu `CELERY_DELAYED_DELIVERY_EXCHANGE`).
pub const DELAYED_DELIVERY_EXCHANGE: &str = "celery_delayed_delivery";

/// Arguments of the pidbox and reply queues (`control_queue_ttl` 300 s, `control_queue_expires` 10 s).
pub fn control_queue_args() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("x-expires".into(), 10_000.into());
    m.insert("x-message-ttl".into(), 300_000.into());
    m
}

/// Name of delay level `n` (its exchange and its queue).
pub fn level_name(n: u32) -> String {
    format!("celery_delayed_{n}")
}

/// Arguments of the queue of delay level `n` (kombu's, quorum flavour).
pub fn level_queue_args(n: u32) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("x-queue-type".into(), "quorum".into());
    m.insert("x-overflow".into(), "reject-publish".into());
    m.insert(
        "x-message-ttl".into(),
        (1u64 << n).saturating_mul(1000).into(),
    );
    m.insert(
        "x-dead-letter-exchange".into(),
        if n > 0 {
            level_name(n - 1)
        } else {
            DELAYED_DELIVERY_EXCHANGE.to_string()
        }
        .into(),
    );
    m.insert("x-dead-letter-strategy".into(), "at-least-once".into());
    m
}

/// Binding key of level `n`'s queue on level `n`'s exchange: bit `n` set (`*.` for every higher bit).
pub fn level_queue_binding(n: u32) -> String {
    format!("{}1.#", "*.".repeat((DELAY_BITS - 1 - n) as usize))
}

/// Binding key of level `n-1`'s exchange (or, for `n == 0`, the delivery exchange) on level `n`'s
/// exchange: bit `n` clear.
pub fn level_skip_binding(n: u32) -> String {
    format!("{}0.#", "*.".repeat((DELAY_BITS - 1 - n) as usize))
}

/// Routing key that delays a message by `secs` (1 ≤ secs < 2^28) and then delivers it with
/// `routing_key` (kombu `calculate_routing_key`).
pub fn delay_routing_key(secs: u64, routing_key: &str) -> String {
    let secs = secs.clamp(1, (1u64 << DELAY_BITS) - 1);
    let bits: Vec<String> = (0..DELAY_BITS)
        .rev()
        .map(|b| ((secs >> b) & 1).to_string())
        .collect();
    format!("{}.{routing_key}", bits.join("."))
}

/// Turns a failed declaration into an error that names the queue, the argument and both values.
pub fn declare_error(queue: &str, wanted: &Map<String, Value>, err: lapin::Error) -> BrokerError {
    let text = err.to_string();
    let Some(rest) = text.split("inequivalent arg '").nth(1) else {
        return BrokerError::Amqp(err);
    };
    let argument = rest.split('\'').next().unwrap_or_default().to_string();
    let broker_has = rest
        .split("but current is ")
        .nth(1)
        .map(|s| s.trim().trim_end_matches('"').to_string())
        .unwrap_or_else(|| "something else".into());
    let ours = match argument.as_str() {
        "durable" => "true (task queues are durable)".to_string(),
        a => wanted
            .get(a)
            .map_or_else(|| "no value".to_string(), ToString::to_string),
    };
    BrokerError::QueueMismatch {
        queue: queue.to_string(),
        argument,
        ours,
        theirs: broker_has,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_keys_as_kombu() {
        // kombu: '.'.join(f'{countdown:028b}') + '.' + routing_key
        assert_eq!(
            delay_routing_key(5, "celery"),
            "0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.1.celery"
        );
        assert_eq!(delay_routing_key(0, "q").split('.').nth(27), Some("1"));
    }

    #[test]
    fn level_bindings_as_kombu() {
        assert_eq!(level_queue_binding(27), "1.#");
        assert_eq!(level_queue_binding(26), "*.1.#");
        assert_eq!(level_skip_binding(27), "0.#");
        assert_eq!(level_queue_binding(0), format!("{}1.#", "*.".repeat(27)));
        assert_eq!(level_queue_args(3)["x-message-ttl"], 8000);
        assert_eq!(
            level_queue_args(0)["x-dead-letter-exchange"],
            "celery_delayed_delivery"
        );
        assert_eq!(
            level_queue_args(5)["x-dead-letter-exchange"],
            "celery_delayed_4"
        );
    }
}

//! Fetching and giving back: one Lua script per round trip that acks, pops a batch across the queues in the
//! configured order and records each message in `unacked`; restoring a message to its priority list marked
//! redelivered; decoding an envelope into a delivery.

use super::{RedisBroker, scripts};
use crate::{Delivery, Held, Result, caps};
use celeriac_protocol::envelope::{self, Envelope};
use celeriac_protocol::receive::receive;
use celeriac_protocol::time;

impl RedisBroker {
    pub(super) async fn run_fetch(
        &self,
        queues: &[String],
        max: usize,
        acks: &[String],
        pre_popped: Option<(usize, Vec<u8>)>,
    ) -> Result<(i64, Vec<Delivery>)> {
        let script = &*scripts::FETCH;
        let mut inv = script.prepare_invoke();
        inv.key(self.keys.unacked()).key(self.keys.unacked_index());
        for q in queues {
            for k in self.keys.queue_lists(q) {
                inv.key(k);
            }
        }
        let (caps, passes) = caps(&self.options.queue_order, queues.len(), max);
        let (pre_raw, pre_idx) = match pre_popped {
            Some((i, raw)) => (raw, i + 1),
            None => (Vec::new(), 0),
        };
        inv.arg(self.lease_now())
            .arg(max)
            .arg(self.keys.deadletter_prefix())
            .arg(time::rfc3339_micros(chrono::Utc::now()))
            .arg(pre_raw)
            .arg(pre_idx)
            .arg(passes)
            .arg(acks.len());
        for tag in acks {
            inv.arg(tag);
        }
        for (q, cap) in queues.iter().zip(caps) {
            inv.arg(q).arg(cap);
        }
        let mut conn = self.conn.clone();
        let (dead, flat): (i64, Vec<Vec<u8>>) = inv.invoke_async(&mut conn).await?;
        let mut out = Vec::with_capacity(flat.len() / 3);
        let mut it = flat.into_iter();
        while let (Some(queue), Some(tag), Some(raw)) = (it.next(), it.next(), it.next()) {
            out.push(decode_delivery(
                String::from_utf8_lossy(&queue).into_owned(),
                String::from_utf8_lossy(&tag).into_owned(),
                raw,
            ));
        }
        Ok((dead, out))
    }

    pub(super) async fn restore_raw(
        &self,
        tag: &str,
        raw: &[u8],
        exchange: &str,
        routing_key: &str,
        front: bool,
    ) -> Result<bool> {
        let _ = exchange; // Celery routes tasks through the anonymous exchange: the routing key is the queue.
        let marked = envelope::mark_redelivered(raw).unwrap_or_else(|_| raw.to_vec());
        let priority = Envelope::parse(&marked).map(|e| e.priority()).unwrap_or(0);
        let target = self.keys.queue_for_priority(routing_key, priority);
        let mut conn = self.conn.clone();
        let restored: i64 = scripts::RESTORE_ONE
            .key(self.keys.unacked())
            .key(self.keys.unacked_index())
            .key(target)
            .arg(tag)
            .arg(marked)
            .arg(if front { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await?;
        Ok(restored == 1)
    }
}

/// A delivery from a kombu envelope taken from `queue` under `tag` (an undecodable one keeps its error).
pub(crate) fn decode_delivery(queue: String, tag: String, raw: Vec<u8>) -> Delivery {
    let (exchange, routing_key, redelivered, message) = match receive(&raw) {
        Ok(r) => {
            let rk = if r.routing_key.is_empty() {
                queue.clone()
            } else {
                r.routing_key
            };
            (r.exchange, rk, r.redelivered, r.message)
        }
        Err(e) => (String::new(), queue.clone(), false, Err(e)),
    };
    Delivery {
        held: Held {
            tag,
            queue,
            raw,
            exchange,
            routing_key,
            redelivered,
            amqp_properties: None,
        },
        message,
    }
}

//! Consuming: one consumer per task queue feeding per-queue buffers (tracking the contiguous delivery tags
//! for `multiple` acks), taking from them in the configured queue order, and the watchdog that restarts a
//! consumer gone silent while messages wait.

use super::{Inner, Link, WATCHDOG_SILENCE, is_not_found, short, table, tag_of};
use crate::{BrokerError, Delivery, Held, Result};
use futures::StreamExt;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Instant;
use tracing::{info, warn};

impl Inner {
    pub(super) async fn start_consumers(
        self: &Arc<Self>,
        link: &Arc<Link>,
        queues: &[String],
    ) -> Result<()> {
        let mut consumers = link.consumers.lock().await;
        let gone: Vec<String> = consumers
            .keys()
            .filter(|q| !queues.contains(q))
            .cloned()
            .collect();
        for q in gone {
            if let Some((tag, handle)) = consumers.remove(&q) {
                let _ = link
                    .consume
                    .basic_cancel(short(&tag), BasicCancelOptions::default())
                    .await;
                handle.abort();
                let buffered: Vec<AmqpDelivery> = {
                    let mut st = self.state.lock().expect("state");
                    st.buffers.remove(&q).map(Vec::from).unwrap_or_default()
                };
                let tags = buffered.iter().map(|d| d.delivery_tag).collect();
                let _ = self.enqueue_frames(tags, false, true, false).await;
                info!(queue = %q, "stopped consuming");
            }
        }
        for q in queues {
            if consumers.contains_key(q) {
                continue;
            }
            let tag = format!("celeriac-{}-{}", uuid::Uuid::new_v4().simple(), q);
            let consumer = link
                .consume
                .basic_consume(
                    short(q),
                    short(&tag),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    if is_not_found(&e) {
                        BrokerError::NotConnected(format!(
                            "queue {q:?} does not exist on RabbitMQ: {e}"
                        ))
                    } else {
                        BrokerError::Amqp(e)
                    }
                })?;
            let handle = tokio::spawn(pump(
                Arc::downgrade(self),
                link.generation,
                q.clone(),
                consumer,
            ));
            consumers.insert(q.clone(), (tag, handle));
        }
        Ok(())
    }

    pub(super) fn arrived(&self, generation: u64, queue: &str, d: AmqpDelivery) {
        let mut st = self.state.lock().expect("state");
        if st.generation != generation {
            return; // RabbitMQ gives it to someone else: its channel is gone.
        }
        st.last_delivery = Instant::now();
        let tag = d.delivery_tag;
        if tag == st.contiguous + 1 {
            st.contiguous = tag;
            let st = &mut *st;
            while st.ahead.remove(&(st.contiguous + 1)) {
                st.contiguous += 1;
            }
        } else if tag > st.contiguous {
            st.ahead.insert(tag);
        }
        st.buffers
            .entry(queue.to_string())
            .or_default()
            .push_back(d);
        drop(st);
        self.arrived.notify_one();
    }

    /// Takes up to `max` buffered deliveries of connection `generation` in the configured queue order;
    /// `None` when that connection is gone (nothing is taken then).
    pub(super) fn take(
        &self,
        generation: u64,
        queues: &[String],
        max: usize,
    ) -> Option<Vec<(String, AmqpDelivery)>> {
        let mut st = self.state.lock().expect("state");
        if st.generation != generation {
            return None;
        }
        let mut out = Vec::new();
        let caps = crate::caps(&self.options.queue_order, queues.len(), max);
        for pass in 0..caps.1 {
            for (i, q) in queues.iter().enumerate() {
                let room = max - out.len();
                let cap = if pass == 0 { caps.0[i].min(room) } else { room };
                if let Some(buf) = st.buffers.get_mut(q) {
                    let n = cap.min(buf.len());
                    out.extend(buf.drain(..n).map(|d| (q.clone(), d)));
                }
            }
        }
        for (q, d) in &out {
            st.outstanding.insert(d.delivery_tag, q.clone());
        }
        if !out.is_empty() {
            st.waiting_since = None;
        }
        Some(out)
    }

    /// Restarts consumers that stopped receiving while messages wait (celery#8030-style silent stalls).
    pub(super) async fn watchdog(&self) {
        let Some(link) = self.current() else { return };
        let (stalled_for, silent_for, consuming, outstanding) = {
            let st = self.state.lock().expect("state");
            let mut per_queue: HashMap<String, usize> = HashMap::new();
            for q in st.outstanding.values() {
                *per_queue.entry(q.clone()).or_default() += 1;
            }
            (
                st.waiting_since.map(|t| t.elapsed()),
                st.last_delivery.elapsed(),
                st.consuming.clone(),
                per_queue,
            )
        };
        let Some(stalled_for) = stalled_for else {
            return;
        };
        if stalled_for < WATCHDOG_SILENCE || silent_for < WATCHDOG_SILENCE {
            return;
        }
        let prefetch = usize::from(self.options.prefetch);
        for q in consuming {
            if prefetch > 0 && outstanding.get(&q).copied().unwrap_or(0) >= prefetch {
                continue; // QoS is full with messages the worker holds: not a stall.
            }
            let Ok(ch) = link.conn.create_channel().await else {
                return;
            };
            let count = ch
                .queue_declare(
                    short(&q),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|d| d.message_count())
                .unwrap_or(0);
            let _ = ch.close(200, short("ok")).await;
            if count > 0 {
                warn!(queue = %q, waiting = count, silent_for = ?silent_for,
                    "watchdog: the consumer received nothing while messages wait; restarting the connection");
                self.lost(link.generation, "consumer stalled");
                return;
            }
        }
    }
}

pub(super) async fn pump(
    inner: Weak<Inner>,
    generation: u64,
    queue: String,
    mut consumer: lapin::Consumer,
) {
    while let Some(d) = consumer.next().await {
        let Some(inner) = inner.upgrade() else { return };
        match d {
            Ok(d) => inner.arrived(generation, &queue, d),
            Err(e) => {
                inner.lost(generation, &format!("consumer of {queue}: {e}"));
                return;
            }
        }
    }
    if let Some(inner) = inner.upgrade() {
        let still_wanted = inner
            .state
            .lock()
            .expect("state")
            .consuming
            .contains(&queue);
        if still_wanted {
            inner.lost(
                generation,
                &format!("RabbitMQ cancelled the consumer of {queue}"),
            );
        }
    }
}

pub(super) fn to_delivery(generation: u64, queue: String, d: AmqpDelivery) -> Delivery {
    let message = table::decode_task(&d.properties, &d.data);
    Delivery {
        held: Held {
            tag: tag_of(generation, d.delivery_tag),
            queue,
            raw: d.data,
            exchange: d.exchange.as_str().to_string(),
            routing_key: d.routing_key.as_str().to_string(),
            redelivered: d.redelivered,
            amqp_properties: Some(Arc::new(d.properties)),
        },
        message,
    }
}

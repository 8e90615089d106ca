//! [`Broker`] for [`AmqpBroker`]: the worker's view of RabbitMQ, over the connection, consumer, settle,
//! publisher, delay and control parts.

use super::{
    AmqpBroker, durable_queue, held_properties, is_not_found, parse_tag, short, table, to_delivery,
    topology, transient_consumer,
};
use crate::prelude::*;
use crate::{BrokerError, Delivery, Held, Result};
use async_trait::async_trait;
use celeriac_protocol::TaskMessage;
use futures::StreamExt;
use lapin::BasicProperties;
use lapin::ExchangeKind;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::Map;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[async_trait]
impl BrokerCore for AmqpBroker {
    async fn declare(&self, queues: &[String]) -> Result<()> {
        let link = self.inner.link().await?;
        for q in queues {
            self.inner.declare_queue(&link, q).await?;
            self.inner
                .declared
                .lock()
                .expect("declared")
                .insert(q.clone());
        }
        Ok(())
    }

    async fn fetch(
        &self,
        queues: &[String],
        max: usize,
        acks: &[String],
        wait: Duration,
    ) -> Result<Vec<Delivery>> {
        let link = match self.inner.current() {
            Some(l) => l,
            None => {
                // Acks of a lost connection are moot: RabbitMQ requeues those messages (the caller retries
                // them; by then their generation is stale and they are dropped).
                return Err(BrokerError::NotConnected(
                    "no connection to RabbitMQ (reconnecting)".into(),
                ));
            }
        };
        self.ack(acks).await?;
        let changed = {
            let mut st = self.inner.state.lock().expect("state");
            let changed = st.consuming != queues;
            if changed {
                st.consuming = queues.to_vec();
            }
            changed
        };
        if changed {
            self.inner.start_consumers(&link, queues).await?;
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let generation = link.generation;
            let Some(taken) = self.inner.take(generation, queues, max) else {
                return Err(BrokerError::NotConnected(
                    "the RabbitMQ connection was lost".into(),
                ));
            };
            if !taken.is_empty() || !acks.is_empty() || max == 0 {
                return Ok(taken
                    .into_iter()
                    .map(|(q, d)| to_delivery(generation, q, d))
                    .collect());
            }
            {
                let mut st = self.inner.state.lock().expect("state");
                st.waiting_since.get_or_insert_with(Instant::now);
            }
            tokio::select! {
                _ = self.inner.arrived.notified() => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
            }
        }
    }

    async fn ack(&self, tags: &[String]) -> Result<()> {
        if tags.is_empty() {
            return Ok(());
        }
        let current = self.inner.current_tags(tags);
        if current.is_empty() {
            return Ok(());
        }
        // basic.ack has no reply: queue the frames and go on (they leave in settling order).
        self.inner.enqueue_frames(current, true, false, true).await
    }

    async fn flush_acks(&self) -> Result<()> {
        // An empty batch that reports back: settles leave in order, so every earlier ack was sent.
        self.inner
            .enqueue_frames(Vec::new(), true, true, false)
            .await
    }

    async fn requeue(&self, held: &[&Held], _front: bool) -> Result<usize> {
        let tags: Vec<String> = held.iter().map(|h| h.tag.clone()).collect();
        let current = self.inner.current_tags(&tags);
        // basic.reject(requeue=True): back to its place in the queue, redelivered=1 (spec §3.3).
        self.inner.enqueue(current, false).await?;
        Ok(held.len())
    }

    async fn dead_letter(&self, held: &Held, reason: &str) -> Result<()> {
        let queue = format!("celeriac.deadletter.{}", held.queue);
        let (link, ch) = self.inner.temp_channel().await?;
        ch.queue_declare(short(&queue), durable_queue(), self.inner.own_queue_args())
            .await?;
        let _ = ch.close(200, short("ok")).await;
        drop(link);
        let mut props = held_properties(held);
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            short("x-celeriac-reason"),
            AMQPValue::LongString(LongString::from(reason.as_bytes())),
        );
        headers.insert(
            short("x-celeriac-queue"),
            AMQPValue::LongString(LongString::from(held.queue.as_bytes())),
        );
        headers.insert(
            short("x-celeriac-at"),
            AMQPValue::LongString(LongString::from(
                celeriac_protocol::time::rfc3339_micros(chrono::Utc::now()).as_bytes(),
            )),
        );
        props = props.with_headers(headers).with_delivery_mode(2);
        self.inner
            .publish_confirmed("", &queue, &held.raw, props, &queue)
            .await?;
        self.ack(std::slice::from_ref(&held.tag)).await
    }

    fn holds_cost_prefetch(&self) -> bool {
        true
    }

    async fn publish(&self, message: &TaskMessage, queue: &str) -> Result<()> {
        let first = !self
            .inner
            .declared
            .lock()
            .expect("declared")
            .contains(queue);
        if first {
            self.declare(&[queue.to_string()]).await?;
        }
        let (body, props) = table::encode_task(message);
        // Celery converts the direct `celery` exchange to the default exchange (spec §3.2).
        self.inner
            .publish_confirmed("", queue, &body, props, queue)
            .await
    }

    async fn queue_length(&self, queue: &str) -> Result<u64> {
        let (_link, ch) = self.inner.temp_channel().await?;
        let res = ch
            .queue_declare(
                short(queue),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match res {
            Ok(q) => {
                let _ = ch.close(200, short("ok")).await;
                Ok(u64::from(q.message_count()))
            }
            Err(e) if is_not_found(&e) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    async fn purge(&self, queue: &str) -> Result<u64> {
        let (_link, ch) = self.inner.temp_channel().await?;
        match ch
            .queue_purge(short(queue), QueuePurgeOptions::default())
            .await
        {
            Ok(n) => {
                let _ = ch.close(200, short("ok")).await;
                Ok(u64::from(n))
            }
            Err(e) if is_not_found(&e) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    async fn ping(&self) -> Result<()> {
        match self.inner.current() {
            Some(_) => Ok(()),
            None => Err(BrokerError::NotConnected(
                "no connection to RabbitMQ (reconnecting)".into(),
            )),
        }
    }

    fn is_connected(&self) -> bool {
        self.inner.current().is_some()
    }

    fn transport(&self) -> &'static str {
        "amqp"
    }
}

#[async_trait]
impl Leases for AmqpBroker {
    async fn renew(&self, _tags: &[String]) -> Result<()> {
        Ok(()) // RabbitMQ holds unacked messages until their channel closes: no lease to renew.
    }

    async fn restore_visible(&self) -> Result<usize> {
        Ok(0) // RabbitMQ requeues a dead consumer's messages itself.
    }
}

#[async_trait]
impl Parking for AmqpBroker {
    async fn park(&self, held: &Held, due: chrono::DateTime<chrono::Utc>) -> Result<bool> {
        let Some((generation, _)) = parse_tag(&held.tag) else {
            return Ok(false);
        };
        let link = self.inner.link().await?;
        if link.generation != generation {
            return Ok(false); // its channel is gone: RabbitMQ already requeued it
        }
        self.inner.ensure_delay(&link, &held.queue).await?;
        let secs = (due - chrono::Utc::now()).num_seconds().max(1) as u64;
        let rk = topology::delay_routing_key(secs, &held.queue);
        let props = held_properties(held);
        self.inner
            .publish_confirmed(
                &topology::level_name(topology::DELAY_BITS - 1),
                &rk,
                &held.raw,
                props,
                &held.queue,
            )
            .await?;
        self.ack(std::slice::from_ref(&held.tag)).await?;
        Ok(true)
    }

    async fn unpark_due(
        &self,
        _queues: &[String],
        _by: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize> {
        Ok(0) // RabbitMQ dead-letters parked messages back into their queue when due.
    }

    async fn parked(&self, _queue: &str) -> Result<u64> {
        Ok(0)
    }
}

#[async_trait]
impl SharedLimits for AmqpBroker {
    async fn take_shared_token(
        &self,
        _key: &str,
        _interval: Duration,
        _burst: u32,
    ) -> Result<Option<Duration>> {
        Err(BrokerError::Unsupported(
            "cluster-wide rate limits need a Redis broker; with RabbitMQ each worker limits on its own",
        ))
    }
}

#[async_trait]
impl EventBus for AmqpBroker {
    async fn publish_events(&self, events: &[(String, Vec<u8>)]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let link = self.inner.link().await?;
        self.inner
            .ensure_exchange(&link, topology::EVENT_EXCHANGE, ExchangeKind::Topic, true)
            .await?;
        for (rk, envelope) in events {
            let Ok((body, props)) = table::from_envelope(envelope, 1) else {
                continue;
            };
            link.consume
                .basic_publish(
                    short(topology::EVENT_EXCHANGE),
                    short(rk),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await?;
        }
        Ok(())
    }

    async fn event_stream(&self) -> Result<futures::stream::BoxStream<'static, Vec<u8>>> {
        let link = self.inner.link().await?;
        let ch = link.conn.create_channel().await?;
        let queue = format!("celeryev.{}", uuid::Uuid::new_v4());
        // As Celery's event receiver: transient, expires 60 s after its consumer left, events live 5 s.
        let mut args = Map::new();
        args.insert("x-expires".into(), 60_000.into());
        args.insert("x-message-ttl".into(), 5_000.into());
        let consumer = transient_consumer(
            &ch,
            topology::EVENT_EXCHANGE,
            ExchangeKind::Topic,
            true,
            &queue,
            "#",
            &args,
        )
        .await?;
        Ok(
            futures::stream::unfold((consumer, ch), |(mut consumer, ch)| async move {
                match consumer.next().await {
                    Some(Ok(d)) => Some((
                        table::to_envelope(
                            &d.properties,
                            &d.data,
                            d.exchange.as_str(),
                            d.routing_key.as_str(),
                        ),
                        (consumer, ch),
                    )),
                    _ => None,
                }
            })
            .boxed(),
        )
    }
}

#[async_trait]
impl RemoteControl for AmqpBroker {
    async fn control_requests(&self) -> Result<futures::stream::BoxStream<'static, Vec<u8>>> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.inner.pidbox.lock().expect("pidbox") = Some(tx);
        let link = self.inner.link().await?;
        self.inner.start_pidbox(&link).await?;
        Ok(
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
                .boxed(),
        )
    }

    async fn control_reply(&self, routing_key: &str, envelope: &[u8]) -> Result<()> {
        let link = self.inner.link().await?;
        self.inner
            .ensure_exchange(&link, topology::REPLY_EXCHANGE, ExchangeKind::Direct, false)
            .await?;
        let (body, props) = table::from_envelope(envelope, 1)?;
        link.consume
            .basic_publish(
                short(topology::REPLY_EXCHANGE),
                short(routing_key),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await?;
        Ok(())
    }

    async fn add_revoked(&self, ids: &[String], keep: Duration) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let (_link, ch) = self.inner.temp_channel().await?;
        ch.queue_declare(
            short(topology::REVOKED_QUEUE),
            durable_queue(),
            self.inner.own_queue_args(),
        )
        .await?;
        let _ = ch.close(200, short("ok")).await;
        for id in ids {
            let props = BasicProperties::default()
                .with_content_type("text/plain".into())
                .with_delivery_mode(2)
                .with_expiration(keep.as_millis().to_string().as_str().into());
            self.inner
                .publish_confirmed(
                    "",
                    topology::REVOKED_QUEUE,
                    id.as_bytes(),
                    props,
                    topology::REVOKED_QUEUE,
                )
                .await?;
        }
        Ok(())
    }

    async fn revoked(&self) -> Result<Vec<String>> {
        let (_link, ch) = self.inner.temp_channel().await?;
        ch.queue_declare(
            short(topology::REVOKED_QUEUE),
            durable_queue(),
            self.inner.own_queue_args(),
        )
        .await?;
        let mut ids = Vec::new();
        // Read without acknowledging; closing the channel puts every message back for the next reader.
        while let Some(m) = ch
            .basic_get(short(topology::REVOKED_QUEUE), BasicGetOptions::default())
            .await?
        {
            ids.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
        }
        let _ = ch.close(200, short("ok")).await;
        Ok(ids)
    }

    async fn control_call(
        &self,
        envelope: &[u8],
        oid: &str,
        timeout: Duration,
        limit: Option<usize>,
    ) -> Result<Vec<Vec<u8>>> {
        let (link, ch) = self.inner.temp_channel().await?;
        let queue = format!("{oid}.reply.celery.pidbox");
        let mut consumer = transient_consumer(
            &ch,
            topology::REPLY_EXCHANGE,
            ExchangeKind::Direct,
            false,
            &queue,
            oid,
            &topology::control_queue_args(),
        )
        .await?;
        ch.exchange_declare(
            short(topology::PIDBOX_EXCHANGE),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let (body, props) = table::from_envelope(envelope, 2)?;
        ch.basic_publish(
            short(topology::PIDBOX_EXCHANGE),
            short(""),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut replies = Vec::new();
        loop {
            if limit.is_some_and(|l| replies.len() >= l) {
                break;
            }
            tokio::select! {
                m = consumer.next() => match m {
                    Some(Ok(d)) => replies.push(table::to_envelope(&d.properties, &d.data, d.exchange.as_str(), d.routing_key.as_str())),
                    _ => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let _ = ch
            .queue_delete(short(&queue), QueueDeleteOptions::default())
            .await;
        let _ = ch.close(200, short("ok")).await;
        drop(link);
        Ok(replies)
    }
}

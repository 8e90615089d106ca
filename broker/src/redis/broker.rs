//! [`Broker`] for [`RedisBroker`]: kombu's Redis transport as the worker sees it.

use super::{RedisBroker, keys, now_secs, scripts};
use crate::prelude::*;
use crate::{BrokerError, Delivery, Held, Result};
use async_trait::async_trait;
use celeriac_protocol::envelope;
use celeriac_protocol::{TaskMessage, json, time};
use keys::Keys;
use redis::{AsyncCommands, Value};
use std::time::Duration;

#[async_trait]
impl BrokerCore for RedisBroker {
    async fn declare(&self, queues: &[String]) -> Result<()> {
        let mut pipe = redis::pipe();
        for q in queues {
            let member = Keys::binding_member(q, q);
            pipe.sadd(self.keys.binding(keys::DEFAULT_EXCHANGE), &member)
                .ignore();
            pipe.sadd(self.keys.binding_permanent(keys::DEFAULT_EXCHANGE), &member)
                .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        self.declared
            .lock()
            .expect("declared set")
            .extend(queues.iter().cloned());
        Ok(())
    }

    async fn fetch(
        &self,
        queues: &[String],
        max: usize,
        acks: &[String],
        wait: Duration,
    ) -> Result<Vec<Delivery>> {
        if queues.is_empty() || max == 0 {
            self.ack(acks).await?;
            if acks.is_empty() {
                tokio::time::sleep(wait).await;
            }
            return Ok(Vec::new());
        }
        let (dead, got) = self.run_fetch(queues, max, acks, None).await?;
        if !got.is_empty() || dead > 0 || !acks.is_empty() {
            if dead > 0 {
                tracing::warn!(
                    count = dead,
                    "moved undecodable envelopes to the dead-letter list"
                );
            }
            return Ok(got);
        }
        // Idle: block until something arrives, then record it (and whatever followed it) in one script.
        let mut keys = Vec::with_capacity(queues.len() * 4 + 1);
        for q in queues {
            keys.extend(self.keys.queue_lists(q));
        }
        // Last, so a message waiting in a queue always wins over the wake token.
        keys.push(self.wake.clone());
        let popped: Option<(String, Vec<u8>)> = {
            let mut blocking = self.blocking.lock().await;
            blocking.brpop(&keys, wait.as_secs_f64()).await?
        };
        let Some((key, raw)) = popped else {
            return Ok(Vec::new());
        };
        if key == self.wake {
            return Ok(Vec::new());
        }
        let idx = keys
            .iter()
            .position(|k| *k == key)
            .map(|i| i / 4)
            .unwrap_or(0);
        let (dead, got) = self.run_fetch(queues, max, &[], Some((idx, raw))).await?;
        if dead > 0 {
            tracing::warn!(
                count = dead,
                "moved undecodable envelopes to the dead-letter list"
            );
        }
        Ok(got)
    }

    async fn ack(&self, tags: &[String]) -> Result<()> {
        if tags.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .zrem(self.keys.unacked_index(), tags)
            .ignore()
            .hdel(self.keys.unacked(), tags)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    async fn requeue(&self, held: &[&Held], front: bool) -> Result<usize> {
        let mut n = 0;
        for d in held {
            if self
                .restore_raw(&d.tag, &d.raw, &d.exchange, &d.routing_key, front)
                .await?
            {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn dead_letter(&self, delivery: &Held, reason: &str) -> Result<()> {
        let (raw, encoding) = match std::str::from_utf8(&delivery.raw) {
            Ok(s) => (s.to_string(), None),
            Err(_) => {
                use base64::Engine;
                (
                    base64::engine::general_purpose::STANDARD.encode(&delivery.raw),
                    Some("base64"),
                )
            }
        };
        let mut entry = serde_json::Map::new();
        entry.insert("reason".into(), reason.into());
        entry.insert("raw".into(), raw.into());
        if let Some(e) = encoding {
            entry.insert("raw_encoding".into(), e.into());
        }
        entry.insert("queue".into(), delivery.queue.clone().into());
        entry.insert("at".into(), time::rfc3339_micros(chrono::Utc::now()).into());
        entry.insert("delivery_tag".into(), delivery.tag.clone().into());
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .lpush(self.keys.deadletter(&delivery.queue), json::to_vec(&entry))
            .ignore()
            .zrem(self.keys.unacked_index(), &delivery.tag)
            .ignore()
            .hdel(self.keys.unacked(), &delivery.tag)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    async fn publish(&self, message: &TaskMessage, queue: &str) -> Result<()> {
        let tag = uuid::Uuid::new_v4().to_string();
        let body = envelope::encode_task(message, "", queue, &tag);
        let key = self
            .keys
            .queue_for_priority(queue, message.properties.priority);
        let first = !self.declared.lock().expect("declared set").contains(queue);
        if first {
            self.declare(&[queue.to_string()]).await?;
        }
        let mut conn = self.conn.clone();
        let _: i64 = conn.lpush(key, body).await?;
        Ok(())
    }

    async fn queue_length(&self, queue: &str) -> Result<u64> {
        let mut pipe = redis::pipe();
        for k in self.keys.queue_lists(queue) {
            pipe.llen(k);
        }
        let mut conn = self.conn.clone();
        let lens: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(lens.iter().sum())
    }

    async fn purge(&self, queue: &str) -> Result<u64> {
        let lists = self.keys.queue_lists(queue);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for k in &lists {
            pipe.llen(k);
        }
        for k in &lists {
            pipe.del(k).ignore();
        }
        let mut conn = self.conn.clone();
        let lens: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(lens.iter().sum())
    }

    async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: Value = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    async fn interrupt_fetch(&self) -> Result<()> {
        // One token is enough; a stale one (no pop was waiting) only ends the next idle wait early.
        let mut conn = self.conn.clone();
        redis::pipe()
            .del(&self.wake)
            .ignore()
            .lpush(&self.wake, "1")
            .ignore()
            .expire(&self.wake, 60)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    fn transport(&self) -> &'static str {
        "redis"
    }
}

#[async_trait]
impl Leases for RedisBroker {
    async fn renew(&self, tags: &[String]) -> Result<()> {
        if tags.is_empty() {
            return Ok(());
        }
        let now = self.lease_now();
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(self.keys.unacked_index()).arg("XX");
        for t in tags {
            cmd.arg(&now).arg(t);
        }
        let mut conn = self.conn.clone();
        cmd.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    async fn restore_visible(&self) -> Result<usize> {
        let mut conn = self.conn.clone();
        let token = uuid::Uuid::new_v4().simple().to_string();
        let got: Option<String> = redis::cmd("SET")
            .arg(self.keys.unacked_mutex())
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(300_000)
            .query_async(&mut conn)
            .await?;
        if got.is_none() {
            return Ok(0); // another consumer is sweeping
        }
        let ceil = now_secs() - self.options.visibility_timeout.as_secs_f64();
        let result = async {
            let tags: Vec<String> = conn.zrangebyscore(self.keys.unacked_index(), "-inf", ceil).await?;
            let mut restored = 0;
            for tag in tags {
                let stored: Option<Vec<u8>> = conn.hget(self.keys.unacked(), &tag).await?;
                let Some(stored) = stored else {
                    let _: () = conn.zrem(self.keys.unacked_index(), &tag).await?;
                    continue;
                };
                match serde_json::from_slice::<(serde_json::Value, String, String)>(&stored) {
                    Ok((env, exchange, routing_key)) => {
                        let raw = json::to_vec(&env);
                        if self.restore_raw(&tag, &raw, &exchange, &routing_key, true).await? {
                            restored += 1;
                        }
                    }
                    Err(e) => {
                        tracing::error!(%tag, error = %e, "unacked entry is not [envelope, exchange, routing_key]; leaving it");
                    }
                }
            }
            Ok::<_, BrokerError>(restored)
        }
        .await;
        let _: i64 = scripts::RELEASE_MUTEX
            .key(self.keys.unacked_mutex())
            .arg(&token)
            .invoke_async(&mut conn)
            .await?;
        let restored = result?;
        if restored > 0 {
            tracing::warn!(
                restored,
                "restored unacknowledged messages whose visibility timeout passed"
            );
        }
        Ok(restored)
    }
}

#[async_trait]
impl Parking for RedisBroker {
    async fn park(&self, held: &Held, due: chrono::DateTime<chrono::Utc>) -> Result<bool> {
        let mut conn = self.conn.clone();
        let parked: i64 = scripts::PARK
            .key(self.keys.unacked())
            .key(self.keys.unacked_index())
            .key(self.keys.eta(&held.routing_key))
            .arg(&held.tag)
            .arg(due.timestamp_micros() as f64 / 1e6)
            .arg(&held.raw)
            .invoke_async(&mut conn)
            .await?;
        Ok(parked == 1)
    }

    async fn unpark_due(
        &self,
        queues: &[String],
        by: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize> {
        let mut conn = self.conn.clone();
        let mut total = 0;
        for q in queues {
            let mut inv = scripts::UNPARK.prepare_invoke();
            inv.key(self.keys.eta(q));
            for k in self.keys.queue_lists(q) {
                inv.key(k);
            }
            let moved: i64 = inv
                .arg(by.timestamp_micros() as f64 / 1e6)
                .arg(1000)
                .invoke_async(&mut conn)
                .await?;
            total += moved as usize;
        }
        Ok(total)
    }

    async fn parked(&self, queue: &str) -> Result<u64> {
        let mut conn = self.conn.clone();
        Ok(conn.zcard(self.keys.eta(queue)).await?)
    }
}

#[async_trait]
impl SharedLimits for RedisBroker {
    async fn take_shared_token(
        &self,
        key: &str,
        interval: Duration,
        burst: u32,
    ) -> Result<Option<Duration>> {
        let mut conn = self.conn.clone();
        let wait_ms: i64 = scripts::RATE_LIMIT
            .key(self.keys.rate_limit(key))
            .arg(interval.as_millis().max(1) as u64)
            .arg(burst.max(1))
            .invoke_async(&mut conn)
            .await?;
        Ok((wait_ms >= 0).then(|| Duration::from_millis(wait_ms as u64)))
    }
}

#[async_trait]
impl EventBus for RedisBroker {
    async fn publish_events(&self, events: &[(String, Vec<u8>)]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (rk, envelope) in events {
            // kombu's fanout over Pub/Sub: channel `/<db>.celeryev/<routing key>`, after `global_keyprefix`
            // (kombu prefixes PUBLISH and PSUBSCRIBE like keys).
            pipe.publish(
                format!("{}/{}.celeryev/{rk}", self.keys.prefix(), self.db),
                envelope,
            )
            .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    async fn event_stream(&self) -> Result<futures::stream::BoxStream<'static, Vec<u8>>> {
        use futures::StreamExt;
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub
            .psubscribe(format!("{}/{}.celeryev/*", self.keys.prefix(), self.db))
            .await?;
        Ok(pubsub
            .into_on_message()
            .filter_map(|m| async move { m.get_payload::<Vec<u8>>().ok() })
            .boxed())
    }
}

#[async_trait]
impl RemoteControl for RedisBroker {
    async fn control_requests(&self) -> Result<futures::stream::BoxStream<'static, Vec<u8>>> {
        use futures::StreamExt;
        let mut pubsub = self.client.get_async_pubsub().await?;
        // kombu's fanout channel for exchange `celery.pidbox` with an empty routing key.
        pubsub
            .subscribe(format!("{}/{}.celery.pidbox", self.keys.prefix(), self.db))
            .await?;
        Ok(pubsub
            .into_on_message()
            .filter_map(|m| async move { m.get_payload::<Vec<u8>>().ok() })
            .boxed())
    }

    async fn control_reply(&self, routing_key: &str, envelope: &[u8]) -> Result<()> {
        // Direct exchange on Redis: the binding table names the queue(s) bound with this routing key.
        let mut conn = self.conn.clone();
        let members: Vec<Vec<u8>> = conn
            .smembers(self.keys.binding("reply.celery.pidbox"))
            .await?;
        for m in members {
            let text = String::from_utf8_lossy(&m).into_owned();
            let parts: Vec<&str> = text.split(keys::SEP).collect();
            if parts.len() == 3 && parts[0] == routing_key {
                let _: i64 = conn
                    .lpush(format!("{}{}", self.keys.prefix(), parts[2]), envelope)
                    .await?;
            }
        }
        Ok(())
    }

    async fn add_revoked(&self, ids: &[String], keep: Duration) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let key = format!("{}celeriac.revoked", self.keys.prefix());
        let now = now_secs();
        let mut pipe = redis::pipe();
        pipe.atomic();
        for id in ids {
            pipe.zadd(&key, id, now).ignore();
        }
        pipe.zrembyscore(&key, "-inf", now - keep.as_secs_f64())
            .ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    async fn revoked(&self) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        Ok(conn
            .zrange(format!("{}celeriac.revoked", self.keys.prefix()), 0, -1)
            .await?)
    }

    async fn control_call(
        &self,
        envelope: &[u8],
        oid: &str,
        timeout: Duration,
        limit: Option<usize>,
    ) -> Result<Vec<Vec<u8>>> {
        let queue = format!("{oid}.reply.celery.pidbox");
        let member = Keys::binding_member(oid, &queue);
        let binding = self.keys.binding("reply.celery.pidbox");
        let mut conn = self.conn.clone();
        let _: i64 = conn.sadd(&binding, &member).await?;
        let _: i64 = conn
            .publish(
                format!("{}/{}.celery.pidbox", self.keys.prefix(), self.db),
                envelope,
            )
            .await?;
        let lists = self.keys.queue_lists(&queue);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut replies = Vec::new();
        // Poll the reply lists on the shared connection (a blocking pop would need a connection of its own
        // per call, or serialize concurrent calls behind one): replies arrive within 20 ms.
        loop {
            let mut got = false;
            for list in &lists {
                let raw: Option<Vec<u8>> = conn.rpop(list, None).await?;
                if let Some(raw) = raw {
                    replies.push(raw);
                    got = true;
                }
            }
            if limit.is_some_and(|l| replies.len() >= l) {
                break;
            }
            if got {
                continue;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            tokio::time::sleep(left.min(Duration::from_millis(20))).await;
        }
        let _: i64 = conn.srem(&binding, &member).await?;
        let _: i64 = conn.del(&lists).await?;
        Ok(replies)
    }
}

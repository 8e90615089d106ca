//! A broker whose acks land late: every ack, alone or carried by a fetch, waits `delay` before it reaches the
//! real broker (a congested link, a broker busy with a GC pause). Everything else goes straight through.

use async_trait::async_trait;
use celeriac_broker::prelude::*;
use celeriac_broker::{Delivery, Held, Result};
use celeriac_protocol::TaskMessage;
use futures::stream::BoxStream;
use std::sync::Arc;
use std::time::Duration;

pub struct SlowAcks {
    pub inner: Arc<dyn Broker>,
    pub delay: Duration,
}

#[async_trait]
impl BrokerCore for SlowAcks {
    async fn declare(&self, queues: &[String]) -> Result<()> {
        self.inner.declare(queues).await
    }

    async fn fetch(
        &self,
        queues: &[String],
        max: usize,
        acks: &[String],
        wait: Duration,
    ) -> Result<Vec<Delivery>> {
        if !acks.is_empty() {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.fetch(queues, max, acks, wait).await
    }

    async fn ack(&self, tags: &[String]) -> Result<()> {
        tokio::time::sleep(self.delay).await;
        self.inner.ack(tags).await
    }

    async fn flush_acks(&self) -> Result<()> {
        self.inner.flush_acks().await
    }

    async fn requeue(&self, held: &[&Held], front: bool) -> Result<usize> {
        self.inner.requeue(held, front).await
    }

    async fn dead_letter(&self, held: &Held, reason: &str) -> Result<()> {
        self.inner.dead_letter(held, reason).await
    }

    async fn publish(&self, message: &TaskMessage, queue: &str) -> Result<()> {
        self.inner.publish(message, queue).await
    }

    async fn queue_length(&self, queue: &str) -> Result<u64> {
        self.inner.queue_length(queue).await
    }

    async fn purge(&self, queue: &str) -> Result<u64> {
        self.inner.purge(queue).await
    }

    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }

    async fn interrupt_fetch(&self) -> Result<()> {
        self.inner.interrupt_fetch().await
    }

    fn transport(&self) -> &'static str {
        self.inner.transport()
    }
}

#[async_trait]
impl Leases for SlowAcks {
    async fn renew(&self, tags: &[String]) -> Result<()> {
        self.inner.renew(tags).await
    }

    async fn restore_visible(&self) -> Result<usize> {
        self.inner.restore_visible().await
    }
}

#[async_trait]
impl Parking for SlowAcks {
    async fn park(&self, held: &Held, due: chrono::DateTime<chrono::Utc>) -> Result<bool> {
        self.inner.park(held, due).await
    }

    async fn unpark_due(
        &self,
        queues: &[String],
        by: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize> {
        self.inner.unpark_due(queues, by).await
    }

    async fn parked(&self, queue: &str) -> Result<u64> {
        self.inner.parked(queue).await
    }
}

#[async_trait]
impl SharedLimits for SlowAcks {
    async fn take_shared_token(
        &self,
        key: &str,
        interval: Duration,
        burst: u32,
    ) -> Result<Option<Duration>> {
        self.inner.take_shared_token(key, interval, burst).await
    }
}

#[async_trait]
impl EventBus for SlowAcks {
    async fn publish_events(&self, events: &[(String, Vec<u8>)]) -> Result<()> {
        self.inner.publish_events(events).await
    }

    async fn event_stream(&self) -> Result<BoxStream<'static, Vec<u8>>> {
        self.inner.event_stream().await
    }
}

#[async_trait]
impl RemoteControl for SlowAcks {
    async fn control_requests(&self) -> Result<BoxStream<'static, Vec<u8>>> {
        self.inner.control_requests().await
    }

    async fn control_reply(&self, routing_key: &str, envelope: &[u8]) -> Result<()> {
        self.inner.control_reply(routing_key, envelope).await
    }

    async fn add_revoked(&self, ids: &[String], keep: Duration) -> Result<()> {
        self.inner.add_revoked(ids, keep).await
    }

    async fn revoked(&self) -> Result<Vec<String>> {
        self.inner.revoked().await
    }

    async fn control_call(
        &self,
        envelope: &[u8],
        oid: &str,
        timeout: Duration,
        limit: Option<usize>,
    ) -> Result<Vec<Vec<u8>>> {
        self.inner.control_call(envelope, oid, timeout, limit).await
    }
}

//! An in-memory broker for fast runtime tests (feature `test-utils`): the [`Broker`] contract without a
//! server. Messages travel as the kombu envelopes the Redis transport writes and are decoded on fetch, so a
//! worker sees what it would see from Redis; unacked messages are held until acked, requeued,
//! dead-lettered or parked. What a test needs to look at is public: [`MemoryBroker::unacked`],
//! [`MemoryBroker::dead_letters`], [`MemoryBroker::events`].
//!
//! One process only: remote control and events reach the streams of this same broker. Rate limits shared
//! by every worker answer [`BrokerError::Unsupported`], as RabbitMQ does.

use crate::prelude::*;
use crate::{BrokerError, Delivery, Held, QueueOrder, Result, caps};
use async_trait::async_trait;
use celeriac_protocol::TaskMessage;
use celeriac_protocol::envelope;
use futures::StreamExt;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{Notify, broadcast, mpsc};

/// A message given to a consumer and not yet settled.
#[derive(Debug, Clone)]
struct Unacked {
    queue: String,
    raw: Vec<u8>,
}

/// Parked messages of a queue: `(due, raw message)`.
type Parked = Vec<(chrono::DateTime<chrono::Utc>, Vec<u8>)>;

#[derive(Debug, Default)]
struct State {
    queues: HashMap<String, VecDeque<Vec<u8>>>,
    declared: BTreeSet<String>,
    unacked: HashMap<String, Unacked>,
    parked: HashMap<String, Parked>,
    dead: HashMap<String, Vec<(String, Vec<u8>)>>,
    revoked: BTreeSet<String>,
    events: Vec<(String, Vec<u8>)>,
    pidbox: Vec<mpsc::UnboundedSender<Vec<u8>>>,
    replies: HashMap<String, Vec<Vec<u8>>>,
    next_tag: u64,
}

/// A broker living in this process. Share it as `Arc<dyn Broker>` (or keep an `Arc<MemoryBroker>` to
/// look inside).
#[derive(Debug)]
pub struct MemoryBroker {
    state: Mutex<State>,
    arrived: Notify,
    replied: Notify,
    interrupted: Notify,
    events: broadcast::Sender<Vec<u8>>,
    order: QueueOrder,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new(QueueOrder::Priority)
    }
}

impl MemoryBroker {
    /// An empty broker serving several queues in `order`.
    pub fn new(order: QueueOrder) -> Self {
        Self {
            state: Mutex::new(State::default()),
            arrived: Notify::new(),
            replied: Notify::new(),
            interrupted: Notify::new(),
            events: broadcast::channel(4096).0,
            order,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("memory broker state")
    }

    /// Tags of the messages held by consumers and not yet settled.
    pub fn unacked(&self) -> Vec<String> {
        let mut tags: Vec<String> = self.state().unacked.keys().cloned().collect();
        tags.sort();
        tags
    }

    /// The dead-lettered messages of `queue`: `(reason, raw message)`.
    pub fn dead_letters(&self, queue: &str) -> Vec<(String, Vec<u8>)> {
        self.state().dead.get(queue).cloned().unwrap_or_default()
    }

    /// Every event published so far: `(routing key, envelope)`.
    pub fn events(&self) -> Vec<(String, Vec<u8>)> {
        self.state().events.clone()
    }

    /// Gives every unacked message back to the front of its queue, marked redelivered, as the visibility
    /// timeout does for a worker that died holding them; returns how many.
    pub fn restore_unacked(&self) -> usize {
        let held: Vec<Unacked> = self.state().unacked.drain().map(|(_, u)| u).collect();
        for u in &held {
            self.give_back(&u.queue, &u.raw, true);
        }
        self.arrived.notify_waiters();
        held.len()
    }

    /// Puts raw bytes on a queue as a client would (a test of undecodable input).
    pub fn push_raw(&self, queue: &str, raw: Vec<u8>) {
        self.state()
            .queues
            .entry(queue.to_string())
            .or_default()
            .push_front(raw);
        self.arrived.notify_waiters();
    }

    /// Takes up to `max` messages in queue order, recording them as unacked.
    fn take(&self, queues: &[String], max: usize) -> Vec<Delivery> {
        let mut st = self.state();
        let (first, passes) = caps(&self.order, queues.len(), max);
        let mut taken: Vec<(String, Vec<u8>)> = Vec::new();
        for pass in 0..passes {
            for (i, q) in queues.iter().enumerate() {
                let room = max - taken.len();
                let cap = if pass == 0 { first[i].min(room) } else { room };
                if let Some(list) = st.queues.get_mut(q) {
                    // As the Redis transport: publish pushes left, consumers pop right.
                    for _ in 0..cap.min(list.len()) {
                        let raw = list.pop_back().expect("counted");
                        taken.push((q.clone(), raw));
                    }
                }
            }
        }
        taken
            .into_iter()
            .map(|(queue, raw)| {
                st.next_tag += 1;
                let tag = format!("mem-{}", st.next_tag);
                st.unacked.insert(
                    tag.clone(),
                    Unacked {
                        queue: queue.clone(),
                        raw: raw.clone(),
                    },
                );
                crate::redis::decode_delivery(queue, tag, raw)
            })
            .collect()
    }

    fn give_back(&self, queue: &str, raw: &[u8], front: bool) {
        let marked = envelope::mark_redelivered(raw).unwrap_or_else(|_| raw.to_vec());
        let mut st = self.state();
        let list = st.queues.entry(queue.to_string()).or_default();
        if front {
            list.push_back(marked);
        } else {
            list.push_front(marked);
        }
    }
}

#[async_trait]
impl BrokerCore for MemoryBroker {
    async fn declare(&self, queues: &[String]) -> Result<()> {
        self.state().declared.extend(queues.iter().cloned());
        Ok(())
    }

    async fn fetch(
        &self,
        queues: &[String],
        max: usize,
        acks: &[String],
        wait: Duration,
    ) -> Result<Vec<Delivery>> {
        self.ack(acks).await?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let arrived = self.arrived.notified();
            let interrupted = self.interrupted.notified();
            let got = if max == 0 {
                Vec::new()
            } else {
                self.take(queues, max)
            };
            if !got.is_empty() || !acks.is_empty() {
                return Ok(got);
            }
            tokio::select! {
                _ = arrived => {}
                _ = interrupted => return Ok(Vec::new()),
                _ = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
            }
        }
    }

    async fn ack(&self, tags: &[String]) -> Result<()> {
        let mut st = self.state();
        for t in tags {
            st.unacked.remove(t);
        }
        Ok(())
    }

    async fn requeue(&self, held: &[&Held], front: bool) -> Result<usize> {
        let mut n = 0;
        for h in held {
            if self.state().unacked.remove(&h.tag).is_some() {
                self.give_back(&h.routing_key, &h.raw, front);
                n += 1;
            }
        }
        self.arrived.notify_waiters();
        Ok(n)
    }

    async fn dead_letter(&self, held: &Held, reason: &str) -> Result<()> {
        let mut st = self.state();
        st.unacked.remove(&held.tag);
        st.dead
            .entry(held.queue.clone())
            .or_default()
            .push((reason.to_string(), held.raw.clone()));
        Ok(())
    }

    async fn publish(&self, message: &TaskMessage, queue: &str) -> Result<()> {
        let tag = uuid::Uuid::new_v4().to_string();
        let body = envelope::encode_task(message, "", queue, &tag);
        self.state()
            .queues
            .entry(queue.to_string())
            .or_default()
            .push_front(body);
        self.arrived.notify_waiters();
        Ok(())
    }

    async fn queue_length(&self, queue: &str) -> Result<u64> {
        Ok(self.state().queues.get(queue).map_or(0, VecDeque::len) as u64)
    }

    async fn purge(&self, queue: &str) -> Result<u64> {
        Ok(self
            .state()
            .queues
            .remove(queue)
            .map_or(0, |q| q.len() as u64))
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    async fn interrupt_fetch(&self) -> Result<()> {
        self.interrupted.notify_waiters();
        Ok(())
    }

    fn transport(&self) -> &'static str {
        "memory"
    }
}

#[async_trait]
impl Leases for MemoryBroker {
    async fn renew(&self, _tags: &[String]) -> Result<()> {
        Ok(()) // one process: nobody else restores what a consumer holds
    }

    async fn restore_visible(&self) -> Result<usize> {
        Ok(0)
    }
}

#[async_trait]
impl Parking for MemoryBroker {
    async fn park(&self, held: &Held, due: chrono::DateTime<chrono::Utc>) -> Result<bool> {
        let mut st = self.state();
        if st.unacked.remove(&held.tag).is_none() {
            return Ok(false);
        }
        st.parked
            .entry(held.routing_key.clone())
            .or_default()
            .push((due, held.raw.clone()));
        Ok(true)
    }

    async fn unpark_due(
        &self,
        queues: &[String],
        by: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize> {
        let mut moved = 0;
        {
            let mut st = self.state();
            for q in queues {
                let Some(parked) = st.parked.get_mut(q) else {
                    continue;
                };
                let (due, later): (Vec<_>, Vec<_>) = std::mem::take(parked)
                    .into_iter()
                    .partition(|(d, _)| *d <= by);
                *parked = later;
                let list = st.queues.entry(q.clone()).or_default();
                for (_, raw) in due {
                    list.push_back(raw);
                    moved += 1;
                }
            }
        }
        if moved > 0 {
            self.arrived.notify_waiters();
        }
        Ok(moved)
    }

    async fn parked(&self, queue: &str) -> Result<u64> {
        Ok(self.state().parked.get(queue).map_or(0, Vec::len) as u64)
    }
}

#[async_trait]
impl SharedLimits for MemoryBroker {
    async fn take_shared_token(
        &self,
        _key: &str,
        _interval: Duration,
        _burst: u32,
    ) -> Result<Option<Duration>> {
        Err(BrokerError::Unsupported(
            "cluster-wide rate limits need a Redis broker; the in-memory broker limits per worker",
        ))
    }
}

#[async_trait]
impl EventBus for MemoryBroker {
    async fn publish_events(&self, events: &[(String, Vec<u8>)]) -> Result<()> {
        self.state().events.extend(events.iter().cloned());
        for (_, envelope) in events {
            let _ = self.events.send(envelope.clone());
        }
        Ok(())
    }

    async fn event_stream(&self) -> Result<futures::stream::BoxStream<'static, Vec<u8>>> {
        let rx = self.events.subscribe();
        Ok(futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(m) => return Some((m, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed())
    }
}

#[async_trait]
impl RemoteControl for MemoryBroker {
    async fn control_requests(&self) -> Result<futures::stream::BoxStream<'static, Vec<u8>>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.state().pidbox.push(tx);
        Ok(
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
                .boxed(),
        )
    }

    async fn control_reply(&self, routing_key: &str, envelope: &[u8]) -> Result<()> {
        self.state()
            .replies
            .entry(routing_key.to_string())
            .or_default()
            .push(envelope.to_vec());
        self.replied.notify_waiters();
        Ok(())
    }

    async fn add_revoked(&self, ids: &[String], _keep: Duration) -> Result<()> {
        self.state().revoked.extend(ids.iter().cloned());
        Ok(())
    }

    async fn revoked(&self) -> Result<Vec<String>> {
        Ok(self.state().revoked.iter().cloned().collect())
    }

    async fn control_call(
        &self,
        envelope: &[u8],
        oid: &str,
        timeout: Duration,
        limit: Option<usize>,
    ) -> Result<Vec<Vec<u8>>> {
        {
            let mut st = self.state();
            st.replies.insert(oid.to_string(), Vec::new());
            st.pidbox.retain(|tx| tx.send(envelope.to_vec()).is_ok());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let replied = self.replied.notified();
            let n = self.state().replies.get(oid).map_or(0, Vec::len);
            if limit.is_some_and(|l| n >= l) {
                break;
            }
            tokio::select! {
                _ = replied => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        Ok(self.state().replies.remove(oid).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn task(id: &str) -> TaskMessage {
        TaskMessage::new("t.add", id, vec![2.into(), 3.into()], Map::new())
    }

    #[tokio::test]
    async fn a_message_is_held_until_acked_and_given_back_marked() {
        let b = MemoryBroker::default();
        b.publish(&task("a"), "q").await.unwrap();
        b.publish(&task("b"), "q").await.unwrap();
        let q = vec!["q".to_string()];
        let got = b.fetch(&q, 1, &[], Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].message.as_ref().unwrap().id(), "a");
        assert_eq!(b.unacked(), vec![got[0].held.tag.clone()]);
        assert_eq!(b.requeue(&[&got[0].held], true).await.unwrap(), 1);
        let again = b.fetch(&q, 2, &[], Duration::ZERO).await.unwrap();
        let ids: Vec<&str> = again
            .iter()
            .map(|d| d.message.as_ref().unwrap().id())
            .collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(again[0].held.redelivered);
        assert!(!again[1].held.redelivered);
        let tags: Vec<String> = again.iter().map(|d| d.held.tag.clone()).collect();
        assert!(
            b.fetch(&q, 2, &tags, Duration::ZERO)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(b.unacked().is_empty());
        assert_eq!(b.queue_length("q").await.unwrap(), 0);

        b.publish(&task("c"), "q").await.unwrap();
        let held = b.fetch(&q, 1, &[], Duration::ZERO).await.unwrap();
        assert_eq!(b.restore_unacked(), 1);
        let back = b.fetch(&q, 1, &[], Duration::ZERO).await.unwrap();
        assert_eq!(back[0].message.as_ref().unwrap().id(), "c");
        assert!(back[0].held.redelivered);
        assert_ne!(back[0].held.tag, held[0].held.tag);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_fetch_waits_for_a_message_or_its_time() {
        let b = std::sync::Arc::new(MemoryBroker::default());
        let q = vec!["q".to_string()];
        let started = tokio::time::Instant::now();
        assert!(
            b.fetch(&q, 4, &[], Duration::from_secs(5))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        let publisher = std::sync::Arc::clone(&b);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            publisher.publish(&task("late"), "q").await.unwrap();
        });
        let got = b.fetch(&q, 4, &[], Duration::from_secs(5)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(started.elapsed(), Duration::from_secs(6));
    }

    #[tokio::test]
    async fn parked_messages_come_back_when_due_and_garbage_is_dead_lettered() {
        let b = MemoryBroker::default();
        let q = vec!["q".to_string()];
        b.publish(&task("eta"), "q").await.unwrap();
        let got = b.fetch(&q, 1, &[], Duration::ZERO).await.unwrap();
        let due = chrono::Utc::now() + chrono::Duration::seconds(60);
        assert!(b.park(&got[0].held, due).await.unwrap());
        assert!(b.unacked().is_empty());
        assert_eq!(b.parked("q").await.unwrap(), 1);
        assert_eq!(b.unpark_due(&q, chrono::Utc::now()).await.unwrap(), 0);
        assert_eq!(b.unpark_due(&q, due).await.unwrap(), 1);
        assert_eq!(b.queue_length("q").await.unwrap(), 1);

        b.purge("q").await.unwrap();
        b.push_raw("q", b"not an envelope".to_vec());
        let bad = b.fetch(&q, 1, &[], Duration::ZERO).await.unwrap();
        assert!(bad[0].message.is_err());
        b.dead_letter(&bad[0].held, "undecodable").await.unwrap();
        assert_eq!(
            b.dead_letters("q"),
            vec![("undecodable".to_string(), b"not an envelope".to_vec())]
        );
        assert!(b.unacked().is_empty());
    }
}

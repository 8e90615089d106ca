//! Acknowledgements: acks and rejects of the current connection generation, queued under the state lock and
//! sent in settling order by one task, with `multiple` acks below every still-unsettled tag.

use super::{Inner, parse_tag};
use crate::{BrokerError, Result};
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use std::sync::Weak;
use tokio::sync::mpsc;
use tracing::warn;

/// One acknowledgement frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settle {
    Ack { tag: u64, multiple: bool },
    Reject { tag: u64 },
}

/// Frames for one connection generation, sent in order; `done` hears when they were written.
pub(super) struct SettleBatch {
    generation: u64,
    ops: Vec<Settle>,
    done: Option<tokio::sync::oneshot::Sender<Result<()>>>,
}

/// Sends acks and rejects in the order they were settled. Acks are never answered by the broker, so nobody
/// needs to wait for them (the fetch path does not); rejects are awaited by their caller. One ordered
/// stream matters: a `multiple` ack must never overtake an earlier single ack or reject of a lower tag.
pub(super) async fn settle_loop(inner: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<SettleBatch>) {
    while let Some(batch) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let res = match inner.current() {
            Some(link) if link.generation == batch.generation && !batch.ops.is_empty() => {
                type Frame =
                    std::pin::Pin<Box<dyn std::future::Future<Output = lapin::Result<()>> + Send>>;
                let frames: Vec<Frame> = batch
                    .ops
                    .iter()
                    .map(|op| -> Frame {
                        let ch = link.consume.clone();
                        match *op {
                            Settle::Ack { tag, multiple } => Box::pin(async move {
                                ch.basic_ack(tag, BasicAckOptions { multiple }).await
                            }),
                            Settle::Reject { tag } => Box::pin(async move {
                                ch.basic_reject(tag, BasicRejectOptions { requeue: true })
                                    .await
                            }),
                        }
                    })
                    .collect();
                futures::future::join_all(frames)
                    .await
                    .into_iter()
                    .find_map(std::result::Result::err)
                    .map_or(Ok(()), |e| Err(BrokerError::Amqp(e)))
            }
            // A lost connection: RabbitMQ already requeued those messages.
            _ => Ok(()),
        };
        match batch.done {
            Some(done) => {
                let _ = done.send(res);
            }
            None => {
                if let Err(e) = res {
                    warn!(error = %e, "sending acknowledgements failed; RabbitMQ will redeliver those messages");
                }
            }
        }
    }
}

impl Inner {
    /// Settles `tags` of the current connection and queues their frames for [`settle_loop`], under the state
    /// lock so the order of frames is the order of settling. Acks below every still-unsettled tag (held by
    /// the worker, buffered, or possibly still on its way) go in one `multiple` ack. With `wait`, returns
    /// once the frames were written.
    pub(super) async fn enqueue(&self, tags: Vec<u64>, ack: bool) -> Result<()> {
        self.enqueue_frames(tags, ack, true, true).await
    }

    pub(super) async fn enqueue_frames(
        &self,
        mut tags: Vec<u64>,
        ack: bool,
        wait: bool,
        outstanding: bool,
    ) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut st = self.state.lock().expect("state");
            if outstanding {
                for t in &tags {
                    st.outstanding.remove(t);
                }
            }
            let ops = if ack {
                let mut floor = st.contiguous + 1;
                if let Some(min) = st.outstanding.keys().min() {
                    floor = floor.min(*min);
                }
                for buf in st.buffers.values() {
                    if let Some(front) = buf.front() {
                        floor = floor.min(front.delivery_tag);
                    }
                }
                tags.sort_unstable();
                let below = tags.partition_point(|t| *t < floor);
                let mut ops = Vec::with_capacity(tags.len() - below + 1);
                if below >= 1 {
                    ops.push(Settle::Ack {
                        tag: tags[below - 1],
                        multiple: below >= 2,
                    });
                }
                ops.extend(tags[below..].iter().map(|&tag| Settle::Ack {
                    tag,
                    multiple: false,
                }));
                ops
            } else {
                tags.iter().map(|&tag| Settle::Reject { tag }).collect()
            };
            let batch = SettleBatch {
                generation: st.generation,
                ops,
                done: wait.then_some(tx),
            };
            if self.settles.send(batch).is_err() {
                return Ok(()); // closing: the connection goes, RabbitMQ requeues
            }
        }
        if wait {
            rx.await.unwrap_or(Ok(()))
        } else {
            Ok(())
        }
    }

    /// Delivery tags of `tags` that belong to the current connection (older ones were requeued by
    /// RabbitMQ when their channel closed).
    pub(super) fn current_tags(&self, tags: &[String]) -> Vec<u64> {
        let generation = self.state.lock().expect("state").generation;
        tags.iter()
            .filter_map(|t| parse_tag(t))
            .filter(|(g, _)| *g == generation)
            .map(|(_, t)| t)
            .collect()
    }
}

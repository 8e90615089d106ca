//! Remote control and events: the transient, auto-acked consumer shape of Celery's pidbox, reply and event
//! queues, and this worker's `<node>.celery.pidbox` consumer feeding the control stream.

use super::{Inner, Link, short, table, topology, transient_queue};
use crate::Result;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};
use serde_json::{Map, Value};
use std::sync::Arc;

/// A transient queue (exclusive, auto-delete, `args`) bound to `exchange` (declared as `kind`, `durable`)
/// with `routing_key`, consumed without acks: the shape of Celery's pidbox, reply and event queues.
pub(super) async fn transient_consumer(
    ch: &Channel,
    exchange: &str,
    kind: ExchangeKind,
    durable: bool,
    queue: &str,
    routing_key: &str,
    args: &Map<String, Value>,
) -> Result<lapin::Consumer> {
    ch.exchange_declare(
        short(exchange),
        kind,
        ExchangeDeclareOptions {
            durable,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(short(queue), transient_queue(), table::to_table(args))
        .await?;
    ch.queue_bind(
        short(queue),
        short(exchange),
        short(routing_key),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(ch
        .basic_consume(
            short(queue),
            short(""),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?)
}

impl Inner {
    pub(super) async fn start_pidbox(self: &Arc<Self>, link: &Arc<Link>) -> Result<()> {
        let Some(tx) = self.pidbox.lock().expect("pidbox").clone() else {
            return Ok(());
        };
        let node = self
            .options
            .node_name
            .clone()
            .unwrap_or_else(|| format!("celeriac-{}", uuid::Uuid::new_v4().simple()));
        let queue = format!("{node}.celery.pidbox");
        let ch = link.conn.create_channel().await?;
        let mut consumer = transient_consumer(
            &ch,
            topology::PIDBOX_EXCHANGE,
            ExchangeKind::Fanout,
            false,
            &queue,
            "",
            &topology::control_queue_args(),
        )
        .await?;
        let handle = tokio::spawn(async move {
            let _ch = ch;
            while let Some(Ok(d)) = consumer.next().await {
                let env = table::to_envelope(
                    &d.properties,
                    &d.data,
                    d.exchange.as_str(),
                    d.routing_key.as_str(),
                );
                if tx.send(env).is_err() {
                    break;
                }
            }
        });
        *link.pidbox.lock().expect("pidbox") = Some(handle);
        Ok(())
    }
}

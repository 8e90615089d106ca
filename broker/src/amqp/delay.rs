//! ETA parking: kombu's native delayed delivery topology (a cascade of `celery_delayed_<n>` topic
//! exchanges and TTL queues dead-lettering into `celery_delayed_delivery`), declared once per connection.

use super::{Inner, Link, durable_queue, short, table, topology};
use crate::Result;
use lapin::ExchangeKind;
use lapin::options::{ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions};
use lapin::types::FieldTable;
use tracing::debug;

impl Inner {
    /// Declares kombu's native delayed delivery topology (once per connection) and binds `queue` to its
    /// delivery exchange with `#.<queue>`.
    pub(super) async fn ensure_delay(&self, link: &Link, queue: &str) -> Result<()> {
        let mut setup = link.setup.lock().await;
        let bound = format!("delay:{queue}");
        if setup.contains(&bound) {
            return Ok(());
        }
        let mut ch = link.conn.create_channel().await?;
        if !setup.contains("delay") {
            let topic = |durable| ExchangeDeclareOptions {
                durable,
                ..ExchangeDeclareOptions::default()
            };
            for n in (0..topology::DELAY_BITS).rev() {
                let name = topology::level_name(n);
                ch.exchange_declare(
                    short(&name),
                    ExchangeKind::Topic,
                    topic(true),
                    FieldTable::default(),
                )
                .await?;
                let args = topology::level_queue_args(n);
                if let Err(e) = ch
                    .queue_declare(short(&name), durable_queue(), table::to_table(&args))
                    .await
                {
                    // Declared by kombu as classic queues: use them as they are.
                    debug!(error = %e, queue = %name, "delay queue exists with other arguments");
                    ch = link.conn.create_channel().await?;
                }
                ch.queue_bind(
                    short(&name),
                    short(&name),
                    short(&topology::level_queue_binding(n)),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            }
            ch.exchange_declare(
                short(topology::DELAYED_DELIVERY_EXCHANGE),
                ExchangeKind::Topic,
                topic(true),
                FieldTable::default(),
            )
            .await?;
            for n in (0..topology::DELAY_BITS).rev() {
                let destination = if n > 0 {
                    topology::level_name(n - 1)
                } else {
                    topology::DELAYED_DELIVERY_EXCHANGE.to_string()
                };
                ch.exchange_bind(
                    short(&destination),
                    short(&topology::level_name(n)),
                    short(&topology::level_skip_binding(n)),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            }
            setup.insert("delay".into());
        }
        ch.queue_bind(
            short(queue),
            short(topology::DELAYED_DELIVERY_EXCHANGE),
            short(&format!("#.{queue}")),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let _ = ch.close(200, short("ok")).await;
        setup.insert(bound);
        Ok(())
    }
}

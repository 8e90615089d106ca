//! Publishing: Celery's task queue declaration, exchanges declared once per connection, and publishes that
//! wait for their confirm (`mandatory`: unroutable is an error; a nack is a full queue).

use super::{CONFIRM_TIMEOUT, Inner, Link, durable_queue, short, table, topology};
use crate::{BrokerError, Held, Result};
use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, ExchangeKind};
use tracing::warn;

impl Inner {
    /// Declares a task queue as Celery does (durable, bound to the `celery` direct exchange by its name) with
    /// the configured arguments.
    pub(super) async fn declare_queue(&self, link: &Link, queue: &str) -> Result<()> {
        let ch = link.conn.create_channel().await?;
        ch.exchange_declare(
            short(topology::TASK_EXCHANGE),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
        let args = self
            .options
            .queue_arguments
            .get(queue)
            .cloned()
            .unwrap_or_default();
        let mut args = args;
        for (k, v) in &self.options.common_queue_arguments {
            args.entry(k.clone()).or_insert_with(|| v.clone());
        }
        if let Err(e) = ch
            .queue_declare(short(queue), durable_queue(), table::to_table(&args))
            .await
        {
            return Err(topology::declare_error(queue, &args, e));
        }
        ch.queue_bind(
            short(queue),
            short(topology::TASK_EXCHANGE),
            short(queue),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let _ = ch.close(200, short("ok")).await;
        Ok(())
    }

    /// Publishes with a confirm; `mandatory` turns "no queue" into an error.
    pub(super) async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
        queue_for_errors: &str,
    ) -> Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let link = self.link().await?;
            let res = async {
                let confirm = link
                    .publish
                    .basic_publish(
                        short(exchange),
                        short(routing_key),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        body,
                        props.clone(),
                    )
                    .await?;
                tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
                    .await
                    .map_err(|_| {
                        BrokerError::NotConnected(format!(
                            "RabbitMQ did not confirm a publish to {queue_for_errors:?} within {CONFIRM_TIMEOUT:?}"
                        ))
                    })?
                    .map_err(BrokerError::Amqp)
            }
            .await;
            match res {
                Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => return Ok(()),
                Ok(Confirmation::Ack(Some(returned))) => {
                    return Err(BrokerError::Unroutable {
                        exchange: exchange.to_string(),
                        routing_key: routing_key.to_string(),
                        reason: returned.reply_text.as_str().to_string(),
                    });
                }
                Ok(Confirmation::Nack(_)) => {
                    return Err(BrokerError::QueueFull {
                        queue: queue_for_errors.to_string(),
                    });
                }
                Err(e) if attempt < 3 => {
                    warn!(error = %e, attempt, queue = %queue_for_errors, "publish not confirmed; retrying");
                    self.lost(link.generation, "publish failed");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Declares an exchange once per connection.
    pub(super) async fn ensure_exchange(
        &self,
        link: &Link,
        name: &str,
        kind: ExchangeKind,
        durable: bool,
    ) -> Result<()> {
        let mut setup = link.setup.lock().await;
        let key = format!("exchange:{name}");
        if setup.contains(&key) {
            return Ok(());
        }
        let ch = link.conn.create_channel().await?;
        ch.exchange_declare(
            short(name),
            kind,
            ExchangeDeclareOptions {
                durable,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
        let _ = ch.close(200, short("ok")).await;
        setup.insert(key);
        Ok(())
    }
}

pub(super) fn held_properties(held: &Held) -> BasicProperties {
    held.amqp_properties.as_deref().cloned().unwrap_or_default()
}

//! The `rpc://` result backend (spec §3.5): each state change of a task is published to the default
//! exchange with routing key = the task's `reply_to` (the client's reply queue), `correlation_id` = the task
//! id, `delivery_mode` 1, empty headers, and the same meta JSON the Redis backend stores. Only the client
//! that sent a task can read its result, so [`ResultBackend::get`] and [`ResultBackend::wait`] are
//! unsupported here, and, as in Celery, chords are not supported.

use crate::{BackendError, Result, ResultBackend};
use async_trait::async_trait;
use celeriac_protocol::ResultMeta;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;
use std::time::Duration;
use tokio::sync::Mutex;
use tracing::warn;

/// Sends results to reply queues over RabbitMQ.
pub struct RpcBackend {
    uri: String,
    link: Mutex<Option<(Connection, Channel)>>,
}

impl std::fmt::Debug for RpcBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcBackend")
            .field("url", &celeriac_broker::url::redact(&self.uri))
            .finish()
    }
}

async fn open(uri: &str) -> Result<(Connection, Channel)> {
    let props = ConnectionProperties::default().with_connection_name(
        lapin::types::LongString::from("celeriac rpc results".as_bytes()),
    );
    let nodes = celeriac_broker::amqp::nodes::Nodes::new(uri, Default::default());
    let conn = nodes.connect(props).await.map_err(|e| match e {
        celeriac_broker::BrokerError::Amqp(e) => BackendError::Amqp(e),
        other => BackendError::Connect(other.to_string()),
    })?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((conn, ch))
}

impl RpcBackend {
    /// Connects to RabbitMQ (`uri` as lapin reads it).
    pub async fn connect(uri: String) -> Result<Self> {
        let link = open(&uri).await?;
        Ok(Self {
            uri,
            link: Mutex::new(Some(link)),
        })
    }

    async fn publish_all(&self, metas: &[ResultMeta]) -> Result<usize> {
        let mut guard = self.link.lock().await;
        let usable = guard
            .as_ref()
            .is_some_and(|(c, ch)| c.status().connected() && ch.status().connected());
        if !usable {
            *guard = Some(open(&self.uri).await?);
        }
        let (_, ch) = guard.as_ref().expect("opened above");
        let mut confirms = Vec::new();
        for m in metas {
            let Some(reply_to) = m.reply_to.as_deref().filter(|r| !r.is_empty()) else {
                continue;
            };
            let props = BasicProperties::default()
                .with_content_type(ShortString::from("application/json"))
                .with_content_encoding(ShortString::from("utf-8"))
                .with_correlation_id(ShortString::from(m.task_id.as_str()))
                .with_priority(0)
                .with_delivery_mode(1)
                .with_headers(FieldTable::default());
            confirms.push(
                ch.basic_publish(
                    ShortString::from(""),
                    ShortString::from(reply_to),
                    BasicPublishOptions::default(),
                    &m.to_json(),
                    props,
                )
                .await?,
            );
        }
        let n = confirms.len();
        for c in confirms {
            match tokio::time::timeout(Duration::from_secs(30), c).await {
                Ok(r) => {
                    r?;
                }
                Err(_) => {
                    *guard = None;
                    return Err(BackendError::Unsupported(
                        "RabbitMQ did not confirm a result within 30 s",
                    ));
                }
            }
        }
        Ok(n)
    }
}

#[async_trait]
impl ResultBackend for RpcBackend {
    async fn chord_part_return(
        &self,
        _group_id: &str,
        _task_id: &str,
        _group_index: Option<i64>,
        _state: &str,
        _result: &Value,
    ) -> Result<Option<crate::ChordReady>> {
        Err(BackendError::Unsupported(
            "The \"rpc\" result backend does not support chords!",
        ))
    }

    async fn store(&self, metas: &[ResultMeta]) -> Result<usize> {
        match self.publish_all(metas).await {
            Ok(n) => Ok(n),
            Err(e) => {
                warn!(error = %e, "sending results failed; reconnecting and sending again");
                *self.link.lock().await = None;
                self.publish_all(metas).await
            }
        }
    }

    async fn get(&self, _task_id: &str) -> Result<Option<Value>> {
        Err(BackendError::Unsupported(
            "rpc:// results can only be read by the client that sent the task (from its reply queue)",
        ))
    }

    async fn wait(&self, _task_id: &str, _timeout: Duration) -> Result<Option<Value>> {
        Err(BackendError::Unsupported(
            "rpc:// results can only be read by the client that sent the task (from its reply queue)",
        ))
    }
}

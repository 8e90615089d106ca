//! The connection: connecting through the failover list, the live link and waiting for one, forgetting a
//! lost one, and the supervisor that reconnects with backoff, redeclares and resumes consuming.

use super::{Inner, Link, RECONNECT_WAIT, WATCHDOG_SILENCE, short, table};
use crate::{BrokerError, Result};
use lapin::options::{BasicQosOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, LongString};
use lapin::{Channel, ConnectionProperties};
use serde_json::Map;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Reconnects after a loss (backoff 0.5 s doubling to 10 s) and watches consumers.
pub(super) async fn supervise(inner: Weak<Inner>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(500);
    let mut next_watch = Instant::now() + WATCHDOG_SILENCE;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        if inner.current().is_none() {
            match Inner::reconnect(&inner).await {
                Ok(link) => {
                    backoff = Duration::from_millis(500);
                    let consuming = inner.state.lock().expect("state").consuming.clone();
                    info!(generation = link.generation, queues = ?consuming, "reconnected to RabbitMQ; consuming again");
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "reconnecting to RabbitMQ failed");
                    drop(inner);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
            continue;
        }
        if Instant::now() >= next_watch {
            next_watch = Instant::now() + Duration::from_secs(5);
            inner.watchdog().await;
        }
    }
}

impl Inner {
    /// Arguments of celeriac's own durable queues (revoked ids, dead letters): the task queues' type, so that
    /// with quorum task queues they survive the loss of a cluster node too.
    pub(super) fn own_queue_args(&self) -> FieldTable {
        let mut args = Map::new();
        if let Some(t) = self.options.common_queue_arguments.get("x-queue-type") {
            args.insert("x-queue-type".into(), t.clone());
        }
        table::to_table(&args)
    }

    pub(super) fn current(&self) -> Option<Arc<Link>> {
        let guard = self.link.lock().expect("link");
        guard
            .as_ref()
            .filter(|l| l.conn.status().connected() && l.consume.status().connected())
            .cloned()
    }

    /// The live link, waiting up to [`RECONNECT_WAIT`] for the supervisor to bring one back.
    pub(super) async fn link(&self) -> Result<Arc<Link>> {
        let deadline = Instant::now() + RECONNECT_WAIT;
        loop {
            if let Some(l) = self.current() {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                return Err(BrokerError::NotConnected(format!(
                    "no connection to RabbitMQ at {} (reconnecting)",
                    crate::url::redact(&self.uri)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Forgets a link that failed (`why`); the supervisor reconnects.
    pub(super) fn lost(&self, generation: u64, why: &str) {
        let mut guard = self.link.lock().expect("link");
        if guard.as_ref().is_some_and(|l| l.generation == generation) {
            warn!(%why, generation, "lost the RabbitMQ connection; unacknowledged messages go back to their queues");
            let old = guard.take();
            drop(guard);
            let mut st = self.state.lock().expect("state");
            st.buffers.clear();
            st.outstanding.clear();
            drop(st);
            self.arrived.notify_one();
            if let Some(old) = old {
                tokio::spawn(async move {
                    let _ = old.conn.close(320, short("celeriac reconnecting")).await;
                });
            }
        }
    }

    pub(super) async fn reconnect(this: &Arc<Self>) -> Result<Arc<Link>> {
        let _one = this.connecting.lock().await;
        if let Some(l) = this.current() {
            return Ok(l);
        }
        let name = this
            .options
            .node_name
            .clone()
            .unwrap_or_else(|| "celeriac".into());
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(format!("celeriac {name}").as_bytes()));
        let conn = this.nodes.connect(props).await?;
        let consume = conn.create_channel().await?;
        consume
            .basic_qos(this.options.prefetch, BasicQosOptions { global: false })
            .await?;
        let publish = conn.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let generation = this.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let link = Arc::new(Link {
            generation,
            conn,
            consume,
            publish,
            consumers: tokio::sync::Mutex::new(HashMap::new()),
            pidbox: Mutex::new(None),
            setup: tokio::sync::Mutex::new(HashSet::new()),
        });
        let declared: Vec<String> = this
            .declared
            .lock()
            .expect("declared")
            .iter()
            .cloned()
            .collect();
        for q in &declared {
            this.declare_queue(&link, q).await?;
        }
        let consuming = {
            let mut st = this.state.lock().expect("state");
            st.generation = generation;
            st.buffers.clear();
            st.outstanding.clear();
            st.contiguous = 0;
            st.ahead.clear();
            st.last_delivery = Instant::now();
            st.consuming.clone()
        };
        *this.link.lock().expect("link") = Some(Arc::clone(&link));
        this.start_consumers(&link, &consuming).await?;
        if this.pidbox.lock().expect("pidbox").is_some() {
            this.start_pidbox(&link).await?;
        }
        Ok(link)
    }

    pub(super) async fn temp_channel(&self) -> Result<(Arc<Link>, Channel)> {
        let link = self.link().await?;
        let ch = link.conn.create_channel().await?;
        Ok((link, ch))
    }
}

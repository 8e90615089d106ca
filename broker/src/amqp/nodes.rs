//! The RabbitMQ nodes a broker connection may use: one URI, or a cluster's nodes as kombu's failover list
//! (`amqp://h1//;amqp://h2//;amqp://h3//`). A connection goes to the node that served last; when that fails,
//! to the others in Celery's `broker_failover_strategy` order (`round-robin`: the list from the next node on;
//! `shuffle`: a random order each time).

use crate::{BrokerError, FailoverStrategy, Result};
use lapin::{Connection, ConnectionProperties};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tracing::{info, warn};

/// How long one node may take to accept a connection before the next is tried.
const NODE_TIMEOUT: Duration = Duration::from_secs(5);

/// The nodes and the one in use.
#[derive(Debug)]
pub struct Nodes {
    uris: Vec<String>,
    strategy: FailoverStrategy,
    current: AtomicUsize,
}

impl Nodes {
    /// The nodes of a normalized URI list.
    pub fn new(uris: &str, strategy: FailoverStrategy) -> Self {
        Self {
            uris: crate::url::amqp_nodes(uris),
            strategy,
            current: AtomicUsize::new(0),
        }
    }

    /// The order to try: the node in use first, then the others by the strategy.
    fn order(&self) -> Vec<usize> {
        let n = self.uris.len();
        let first = self.current.load(Ordering::Relaxed) % n.max(1);
        let mut rest: Vec<usize> = (1..n).map(|k| (first + k) % n).collect();
        if self.strategy == FailoverStrategy::Shuffle {
            let state = std::collections::hash_map::RandomState::new();
            rest.sort_by_key(|i| {
                let mut h = state.build_hasher();
                h.write_usize(*i);
                h.finish()
            });
        }
        std::iter::once(first).chain(rest).collect()
    }

    /// Connects to the first node of [`Nodes::order`] that accepts.
    pub async fn connect(&self, props: ConnectionProperties) -> Result<Connection> {
        let mut last = None;
        for i in self.order() {
            let uri = &self.uris[i];
            match tokio::time::timeout(NODE_TIMEOUT, Connection::connect(uri, props.clone())).await
            {
                Ok(Ok(conn)) => {
                    let previous = self.current.swap(i, Ordering::Relaxed);
                    if self.uris.len() > 1 && previous != i {
                        info!(node = %crate::url::redact(uri), "connected to another RabbitMQ node of the list");
                    }
                    return Ok(conn);
                }
                Ok(Err(e)) => {
                    if self.uris.len() > 1 {
                        warn!(node = %crate::url::redact(uri), error = %e, "RabbitMQ node refused; trying the next");
                    }
                    last = Some(BrokerError::Amqp(e));
                }
                Err(_) => {
                    last = Some(BrokerError::NotConnected(format!(
                        "connecting to RabbitMQ at {} timed out",
                        crate::url::redact(uri)
                    )))
                }
            }
        }
        Err(last.unwrap_or_else(|| BrokerError::NotConnected("no RabbitMQ node in the URL".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_starts_at_the_node_in_use() {
        let n = Nodes::new("amqp://a;amqp://b;amqp://c", FailoverStrategy::RoundRobin);
        assert_eq!(n.order(), vec![0, 1, 2]);
        n.current.store(1, Ordering::Relaxed);
        assert_eq!(n.order(), vec![1, 2, 0]);
    }

    #[test]
    fn shuffle_tries_every_node_once() {
        let n = Nodes::new(
            "amqp://a;amqp://b;amqp://c;amqp://d",
            FailoverStrategy::Shuffle,
        );
        n.current.store(2, Ordering::Relaxed);
        let mut o = n.order();
        assert_eq!(o[0], 2);
        o.sort();
        assert_eq!(o, vec![0, 1, 2, 3]);
    }
}

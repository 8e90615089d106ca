//! The kombu-compatible Redis transport. Python Celery workers and celeriac workers share its queues:
//! LPUSH to publish, pop from the right, `unacked`/`unacked_index` for ack emulation, RPUSH to restore,
//! LPUSH to requeue, binding tables for tools. Unlike kombu it fetches a batch per round trip while a queue
//! is non-empty, blocks (BRPOP) only when idle, and renews the lease of messages it is still working on.
//!
//! # Layout
//! This file holds the broker's connections and state; as in `amqp/`, the [`Broker`](crate::Broker) trait
//! is in `broker`, over the parts:
//! - `consumer`: the fetch script's round trip, restoring a message, decoding an envelope.
//! - [`keys`]: key names.
//! - [`scripts`]: the Lua scripts (fetch, restore, park, rate limit, mutex release).

mod broker;
mod consumer;
pub mod keys;
pub mod scripts;

#[cfg(feature = "test-utils")]
pub(crate) use consumer::decode_delivery;

use crate::url::RedisTarget;
use crate::{BrokerOptions, Result};
use keys::Keys;
use redis::Client;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Connects Redis clients with the timeouts a broker needs; `response` bounds every command.
pub async fn connection(
    target: &RedisTarget,
    response: Option<Duration>,
) -> Result<ConnectionManager> {
    let client = Client::open(target.info.clone())?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(response)
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(2));
    Ok(ConnectionManager::new_with_config(client, config).await?)
}

/// A Redis broker.
pub struct RedisBroker {
    conn: ConnectionManager,
    blocking: tokio::sync::Mutex<ConnectionManager>,
    keys: Keys,
    options: BrokerOptions,
    /// Database number: fanout channels are `/<db>.<exchange>/<routing key>`.
    db: i64,
    /// For Pub/Sub connections.
    client: Client,
    declared: Mutex<HashSet<String>>,
    /// A list of this instance's own that its blocking pop also watches: a token pushed there ends the pop
    /// (see [`Broker::interrupt_fetch`](crate::Broker::interrupt_fetch)).
    wake: String,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("prefix", &self.keys.prefix())
            .finish()
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Visibility timeouts from this long up get whole-second lease scores.
const WHOLE_SECOND_LEASES: Duration = Duration::from_secs(60);

/// The `unacked_index` score of a lease taken or renewed at `now` (unix seconds), as kombu compares it
/// (`now - visibility_timeout`). With a visibility timeout of a minute or more it is `now` rounded up to a
/// whole second: a lease then looks at most a second younger (restored at most a second later, never
/// earlier), and Redis stores and compares an integral score as an integer, where a fractional one is
/// written out in 17 digits and parsed back with `strtod` for every entry an insert walks past (ZADD into
/// the index was 7 % of Redis's time per task). Shorter timeouts keep microseconds.
fn lease_score(now: f64, visibility_timeout: Duration) -> String {
    if visibility_timeout >= WHOLE_SECOND_LEASES {
        format!("{}", now.ceil() as u64)
    } else {
        format!("{now:.6}")
    }
}

impl RedisBroker {
    /// The score of a lease taken or renewed now.
    fn lease_now(&self) -> String {
        lease_score(now_secs(), self.options.visibility_timeout)
    }

    /// Connects (two connections: one for pipelined commands, one for blocking pops).
    pub async fn connect(target: RedisTarget, options: BrokerOptions) -> Result<Self> {
        let conn = connection(&target, Some(Duration::from_secs(30))).await?;
        let blocking = connection(&target, None).await?;
        let keys = Keys::new(options.global_keyprefix.clone());
        let wake = format!(
            "{}celeriac.wake.{}",
            keys.prefix(),
            uuid::Uuid::new_v4().simple()
        );
        Ok(Self {
            conn,
            blocking: tokio::sync::Mutex::new(blocking),
            keys,
            options,
            db: target.db,
            client: Client::open(target.info.clone())?,
            declared: Mutex::new(HashSet::new()),
            wake,
        })
    }

    /// Key names used by this broker.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }
}

#[cfg(test)]
mod tests {
    use super::lease_score;
    use crate::{QueueOrder, caps};
    use std::time::Duration;

    #[test]
    fn leases_score_whole_seconds_rounded_up_from_a_minute_of_visibility() {
        let hour = Duration::from_secs(3600);
        assert_eq!(lease_score(1_796_681_220.000_001, hour), "1796681221");
        assert_eq!(lease_score(1_796_681_220.0, hour), "1796681220");
        assert_eq!(
            lease_score(1_796_681_220.25, Duration::from_secs(60)),
            "1796681221"
        );
        // Short timeouts keep microseconds: a second would be a large share of them.
        assert_eq!(
            lease_score(1_796_681_220.25, Duration::from_millis(600)),
            "1796681220.250000"
        );
    }

    #[test]
    fn weighted_caps_split_the_batch() {
        assert_eq!(caps(&QueueOrder::Priority, 2, 16), (vec![16, 16], 1));
        assert_eq!(
            caps(&QueueOrder::Weighted(vec![3, 1]), 2, 16),
            (vec![12, 4], 2)
        );
        assert_eq!(
            caps(&QueueOrder::Weighted(vec![1, 0]), 2, 5),
            (vec![5, 0], 2)
        );
    }
}

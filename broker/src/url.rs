//! Broker URLs in the forms Celery users write them: `redis://[:password@]host[:port][/db]`,
//! `rediss://...` (TLS), and kombu's `redis+socket:///path/to.sock?virtual_host=N` (also `socket://`,
//! `unix://`). `?db=N` and `?virtual_host=N` select the database.

use crate::error::BrokerError;
use ::redis::{ConnectionInfo, IntoConnectionInfo};

/// A parsed broker URL.
#[derive(Debug, Clone)]
pub enum BrokerUrl {
    /// Redis, with what the redis client needs.
    Redis(RedisTarget),
}

/// Where a Redis broker or backend lives.
#[derive(Debug, Clone)]
pub struct RedisTarget {
    /// Connection parameters.
    pub info: ConnectionInfo,
    /// Database number (Pub/Sub channel prefixes use it: `/0.celeryev`).
    pub db: i64,
}

/// Masks the password in a URL for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

impl BrokerUrl {
    /// Parses a broker URL.
    pub fn parse(url: &str) -> Result<Self, BrokerError> {
        let err = |reason: String| BrokerError::Url {
            url: redact(url),
            reason,
        };
        let scheme = url.split("://").next().unwrap_or("");
        match scheme {
            "redis" | "rediss" | "redis+socket" | "socket" | "unix" | "redis+unix" => {
                Ok(Self::Redis(parse_redis(url).map_err(err)?))
            }
            "amqp" | "amqps" | "pyamqp" => Err(err(
                "AMQP brokers are not supported by this build yet (the RabbitMQ transport is a separate issue)".into(),
            )),
            "" => Err(err("missing scheme; expected redis://, rediss:// or redis+socket://".into())),
            other => Err(err(format!("unsupported scheme {other:?}; expected redis://, rediss:// or redis+socket://"))),
        }
    }
}

/// Parses a Redis URL (also used for the result backend).
pub fn parse_redis(url: &str) -> Result<RedisTarget, String> {
    let normalized = if let Some(rest) = url
        .strip_prefix("redis+socket://")
        .or_else(|| url.strip_prefix("socket://"))
    {
        // kombu: redis+socket:///tmp/redis.sock?virtual_host=3
        let rest = rest.replacen("virtual_host=", "db=", 1);
        format!("unix://{rest}")
    } else {
        url.to_string()
    };
    let parsed = ::url::Url::parse(&normalized).map_err(|e| e.to_string())?;
    let mut info = parsed.into_connection_info().map_err(|e| e.to_string())?;
    if info.redis_settings().db() == 0 {
        // redis-rs reads `?db=` only for unix sockets; accept it (and kombu's virtual_host) for TCP too.
        if let Some(db) = ::url::Url::parse(&normalized).ok().and_then(|u| {
            u.query_pairs()
                .find(|(k, _)| k == "db" || k == "virtual_host")
                .map(|(_, v)| v.to_string())
        }) {
            let db: i64 = db
                .parse()
                .map_err(|_| format!("database {db:?} is not a number"))?;
            let settings = info.redis_settings().clone().set_db(db);
            info = info.set_redis_settings(settings);
        }
    }
    let db = info.redis_settings().db();
    Ok(RedisTarget { info, db })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_celery_url_forms() {
        let BrokerUrl::Redis(t) = BrokerUrl::parse("redis://127.0.0.1:6379/5").unwrap();
        assert_eq!(t.db, 5);
        let BrokerUrl::Redis(t) = BrokerUrl::parse("redis://:secret@localhost/2").unwrap();
        assert_eq!(t.db, 2);
        assert_eq!(t.info.redis_settings().password(), Some("secret"));
        let BrokerUrl::Redis(t) =
            BrokerUrl::parse("redis+socket:///tmp/redis.sock?virtual_host=3").unwrap();
        assert_eq!(t.db, 3);
        let BrokerUrl::Redis(t) = BrokerUrl::parse("redis://localhost:6379?db=4").unwrap();
        assert_eq!(t.db, 4);
    }

    #[test]
    fn rejects_unknown_schemes_with_reason() {
        let e = BrokerUrl::parse("amqp://guest:pw@localhost//")
            .unwrap_err()
            .to_string();
        assert!(e.contains("amqp://***@localhost//"), "{e}");
        assert!(e.contains("RabbitMQ"), "{e}");
        let e = BrokerUrl::parse("sqs://x").unwrap_err().to_string();
        assert!(e.contains("unsupported scheme \"sqs\""), "{e}");
    }
}

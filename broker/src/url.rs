//! Broker URLs in the forms Celery users write them: `redis://[:password@]host[:port][/db]`,
//! `rediss://...` (TLS), and kombu's `redis+socket:///path/to.sock?virtual_host=N` (also `socket://`,
//! `unix://`). `?db=N` and `?virtual_host=N` select the database. RabbitMQ: `amqp://user:pass@host:port/vhost`,
//! `amqps://...` (TLS) and kombu's `pyamqp://`; as in kombu, `amqp://host//` and `amqp://host/` both mean the
//! vhost `/`. Redis behind Sentinel: kombu's `sentinel://host:26379;sentinel://host2:26379/0` list.

use crate::error::BrokerError;
use ::redis::{ConnectionInfo, IntoConnectionInfo};

/// A parsed broker URL.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum BrokerUrl {
    /// Redis, with what the redis client needs.
    Redis(RedisTarget),
    /// RabbitMQ: the URI as lapin reads it (vhost percent-encoded); a cluster's nodes as kombu's failover
    /// list, `;`-separated (see [`amqp_nodes`]).
    Amqp(String),
    /// Redis behind Sentinel (kombu's `sentinel://host:26379;sentinel://host2:26379`); connecting needs the
    /// master's name (see [`crate::sentinel`]).
    Sentinel(crate::sentinel::SentinelUrl),
}

/// Where a Redis broker or backend lives.
#[derive(Debug, Clone)]
pub struct RedisTarget {
    /// Connection parameters.
    pub info: ConnectionInfo,
    /// Database number (Pub/Sub channel prefixes use it: `/0.celeryev`).
    pub db: i64,
}

/// Masks the password in a URL (in each item of a `;`-separated list) for messages.
pub fn redact(url: &str) -> String {
    url.split(';')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}://***@{}", &u[..s], &u[at + 1..]),
            _ => u.to_string(),
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// The Redis target of a `redis://`-family or `sentinel://` URL (the latter through the local relay that
/// follows the master; see [`crate::sentinel`]).
pub async fn redis_target(
    url: &str,
    sentinel: &crate::sentinel::SentinelOptions,
) -> Result<RedisTarget, String> {
    if crate::sentinel::is_sentinel_url(url) {
        crate::sentinel::target(url, sentinel).await
    } else {
        parse_redis(url)
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
            "amqp" | "amqps" | "pyamqp" | "librabbitmq" => {
                let nodes = url
                    .split(';')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(parse_amqp)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(err)?;
                Ok(Self::Amqp(nodes.join(";")))
            }
            "sentinel" => Ok(Self::Sentinel(crate::sentinel::parse(url).map_err(err)?)),
            "" => Err(err("missing scheme; expected redis://, rediss://, redis+socket://, sentinel://, amqp:// or amqps://".into())),
            other => Err(err(format!("unsupported scheme {other:?}; expected redis://, rediss://, redis+socket://, sentinel://, amqp:// or amqps://"))),
        }
    }
}

/// The nodes of a normalized AMQP URI list (kombu's failover form `amqp://h1//;amqp://h2//`).
pub fn amqp_nodes(uris: &str) -> Vec<String> {
    uris.split(';')
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

/// Normalizes a kombu AMQP URL for lapin: `pyamqp`/`librabbitmq` → `amqp`, default user `guest:guest`,
/// port 5672 (5671 for TLS), and the vhost as kombu reads it (`/` when the path is empty or `//`).
pub fn parse_amqp(url: &str) -> Result<String, String> {
    let (scheme, rest) = url.split_once("://").ok_or("missing ://")?;
    let tls = scheme == "amqps";
    let scheme = if tls { "amqps" } else { "amqp" };
    let parsed = ::url::Url::parse(&format!("{scheme}://{rest}")).map_err(|e| e.to_string())?;
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .unwrap_or("localhost");
    let port = parsed.port().unwrap_or(if tls { 5671 } else { 5672 });
    let user = if parsed.username().is_empty() {
        "guest"
    } else {
        parsed.username()
    };
    let password = parsed.password().unwrap_or("guest");
    let path = parsed.path();
    let vhost = match path.strip_prefix('/') {
        None | Some("") | Some("/") => "/".to_string(),
        Some(v) => ::url::form_urlencoded::parse(format!("v={v}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default(),
    };
    let vhost: String = ::url::form_urlencoded::byte_serialize(vhost.as_bytes()).collect();
    let query = parsed.query().map(|q| format!("?{q}")).unwrap_or_default();
    Ok(format!(
        "{scheme}://{user}:{password}@{host}:{port}/{vhost}{query}"
    ))
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
        let BrokerUrl::Redis(t) = BrokerUrl::parse("redis://127.0.0.1:6379/5").unwrap() else {
            panic!()
        };
        assert_eq!(t.db, 5);
        let BrokerUrl::Redis(t) = BrokerUrl::parse("redis://:secret@localhost/2").unwrap() else {
            panic!()
        };
        assert_eq!(t.db, 2);
        assert_eq!(t.info.redis_settings().password(), Some("secret"));
        let BrokerUrl::Redis(t) =
            BrokerUrl::parse("redis+socket:///tmp/redis.sock?virtual_host=3").unwrap()
        else {
            panic!()
        };
        assert_eq!(t.db, 3);
        let BrokerUrl::Redis(t) = BrokerUrl::parse("redis://localhost:6379?db=4").unwrap() else {
            panic!()
        };
        assert_eq!(t.db, 4);
    }

    #[test]
    fn amqp_urls_as_kombu_reads_them() {
        let amqp = |u: &str| match BrokerUrl::parse(u).unwrap() {
            BrokerUrl::Amqp(s) => s,
            _ => panic!(),
        };
        assert_eq!(
            amqp("amqp://guest:guest@localhost:5672//"),
            "amqp://guest:guest@localhost:5672/%2F"
        );
        assert_eq!(
            amqp("pyamqp://localhost"),
            "amqp://guest:guest@localhost:5672/%2F"
        );
        assert_eq!(amqp("amqp://u:p@h/prod"), "amqp://u:p@h:5672/prod");
        assert_eq!(
            amqp("amqps://u:p@h/%2Fx?heartbeat=30"),
            "amqps://u:p@h:5671/%2Fx?heartbeat=30"
        );
    }

    #[test]
    fn amqp_failover_lists() {
        let BrokerUrl::Amqp(list) =
            BrokerUrl::parse("amqp://u:p@h1:5672//;amqp://u:p@h2:5673//; pyamqp://h3").unwrap()
        else {
            panic!()
        };
        assert_eq!(
            amqp_nodes(&list),
            vec![
                "amqp://u:p@h1:5672/%2F",
                "amqp://u:p@h2:5673/%2F",
                "amqp://guest:guest@h3:5672/%2F"
            ]
        );
        assert_eq!(
            redact("amqp://u:p@h1//;amqp://u:p@h2//"),
            "amqp://***@h1//;amqp://***@h2//"
        );
    }

    #[test]
    fn rejects_unknown_schemes_with_reason() {
        let e = BrokerUrl::parse("sqs://x").unwrap_err().to_string();
        assert!(e.contains("unsupported scheme \"sqs\""), "{e}");
    }
}

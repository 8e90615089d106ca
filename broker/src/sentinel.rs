//! Redis Sentinel, as kombu's `sentinel://` transport and result backend use it:
//! `sentinel://[:password@]host:26379[/db];sentinel://host2:26379/db`, with the master's name in
//! `broker_transport_options.master_name` (`result_backend_transport_options.master_name` for results) and the
//! sentinels' own credentials in `sentinel_kwargs = { password = "..." }`. The password in the URL is the
//! master's, as in kombu.
//!
//! Every Redis connection of this process to one Sentinel-managed master goes through one local relay per
//! (sentinels, master name), on a loopback port: the broker's and the backend's connection managers, their
//! Pub/Sub connections and beat's all connect to the relay and never learn where the master is. The relay
//! - asks the sentinels where the master is (`SENTINEL MASTER`, every second, believing the highest
//!   `config-epoch`);
//! - listens to every sentinel's announcements: at `+try-failover` for its master it cuts every relayed
//!   connection and holds new ones (so no write lands on a master that is about to be demoted and whose
//!   writes the promoted replica would never see), and at `+switch-master` it forwards to the new master;
//! - cuts every relayed connection whenever the master's address changes, so the clients reconnect (to the
//!   new master) by themselves, as they do after any lost connection.
//!
//! A relay lives as long as the process (the last acks of a warm shutdown go through it). Plain TCP only:
//! TLS to sentinels or masters is not supported.

use crate::url::RedisTarget;
use ::redis::{Client, IntoConnectionInfo, RedisConnectionInfo};
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, info, warn};

/// How long a new connection waits for a master before it is closed.
const WAIT_FOR_MASTER: Duration = Duration::from_secs(10);
/// How long a relay holds connections after `+try-failover` without hearing `+switch-master`.
const FAILOVER_HOLD: Duration = Duration::from_secs(20);
/// How often the sentinels are asked where the master is.
const POLL: Duration = Duration::from_secs(1);

/// kombu's Sentinel transport options (`master_name`, `sentinel_kwargs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SentinelOptions {
    /// The name the sentinels monitor the master under.
    pub master_name: Option<String>,
    /// Credentials for the sentinels themselves (`sentinel_kwargs`).
    pub sentinel_kwargs: SentinelKwargs,
}

/// `sentinel_kwargs`: how to authenticate to the sentinels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SentinelKwargs {
    /// ACL user of the sentinels.
    pub username: Option<String>,
    /// Password of the sentinels.
    pub password: Option<String>,
}

/// A parsed `sentinel://` URL list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// The sentinels, in the order given.
    pub sentinels: Vec<(String, u16)>,
    /// The master's user (from the first URL that names one).
    pub username: Option<String>,
    /// The master's password.
    pub password: Option<String>,
    /// The database.
    pub db: i64,
}

/// Whether `url` is kombu's Sentinel form.
pub fn is_sentinel_url(url: &str) -> bool {
    url.trim_start().starts_with("sentinel://")
}

/// Parses `sentinel://[[user]:password@]host[:port][/db]` items separated by `;`.
pub fn parse(url: &str) -> Result<SentinelUrl, String> {
    let mut out = SentinelUrl {
        sentinels: Vec::new(),
        username: None,
        password: None,
        db: 0,
    };
    let mut db_seen = false;
    for item in url.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let rest = item.strip_prefix("sentinel://").ok_or_else(|| {
            format!("{item:?}: every item of a Sentinel list starts with sentinel://")
        })?;
        let parsed = ::url::Url::parse(&format!("redis://{rest}")).map_err(|e| format!("{e}"))?;
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{item:?}: no host"))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        out.sentinels.push((host, parsed.port().unwrap_or(26379)));
        if let Some(p) = parsed.password().filter(|_| out.password.is_none()) {
            out.password = Some(decode(p));
            out.username = Some(decode(parsed.username())).filter(|u| !u.is_empty());
        }
        let path = parsed.path().trim_matches('/');
        if !path.is_empty() && !db_seen {
            out.db = path
                .parse()
                .map_err(|_| format!("{item:?}: database {path:?} is not a number"))?;
            db_seen = true;
        }
    }
    if out.sentinels.is_empty() {
        return Err("no sentinel in the URL".into());
    }
    Ok(out)
}

fn decode(s: &str) -> String {
    ::url::form_urlencoded::parse(format!("v={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Where the relay forwards now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Master {
    /// Not known yet (or the sentinels do not know the name).
    Unknown,
    /// Forwarding to this address.
    At(String, u16),
    /// A failover started away from this address: connections are held until the new master is announced.
    FailingOver { from: (String, u16), since: Instant },
}

struct Relay {
    addr: SocketAddr,
    tasks: Vec<AbortHandle>,
    state: watch::Receiver<Master>,
}

impl Relay {
    fn alive(&self) -> bool {
        self.tasks.iter().all(|t| !t.is_finished())
    }
}

type RelayKey = (Vec<(String, u16)>, String, SentinelKwargs);

static RELAYS: LazyLock<Mutex<HashMap<RelayKey, Arc<Relay>>>> = LazyLock::new(Default::default);

/// The Redis target for a `sentinel://` URL: the local relay to the master named in `options`, with the
/// URL's password and database. Waits (up to 10 s) until a sentinel names the master.
pub async fn target(url: &str, options: &SentinelOptions) -> Result<RedisTarget, String> {
    let parsed = parse(url)?;
    let name = options
        .master_name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or("a sentinel:// URL needs the master's name: set master_name in broker_transport_options (or result_backend_transport_options for results), as with kombu")?;
    let key = (
        parsed.sentinels.clone(),
        name.clone(),
        options.sentinel_kwargs.clone(),
    );
    let relay = {
        let mut relays = RELAYS.lock().expect("relays");
        match relays.get(&key) {
            Some(r) if r.alive() => r.clone(),
            _ => {
                let r = Arc::new(start(&key)?);
                relays.insert(key, r.clone());
                r
            }
        }
    };
    let mut state = relay.state.clone();
    let known = tokio::time::timeout(
        WAIT_FOR_MASTER,
        state.wait_for(|m| matches!(m, Master::At(..))),
    )
    .await;
    if !matches!(known, Ok(Ok(_))) {
        return Err(format!(
            "no sentinel of {} names a master {name:?} (is master_name right, and are the sentinels up?)",
            list(&parsed.sentinels)
        ));
    }
    let auth = match (&parsed.username, &parsed.password) {
        (Some(u), Some(p)) => format!("{}:{}@", enc(u), enc(p)),
        (None, Some(p)) => format!(":{}@", enc(p)),
        _ => String::new(),
    };
    let info = format!("redis://{auth}{}/{}", relay.addr, parsed.db)
        .into_connection_info()
        .map_err(|e| e.to_string())?;
    Ok(RedisTarget {
        info,
        db: parsed.db,
    })
}

fn enc(s: &str) -> String {
    ::url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn list(sentinels: &[(String, u16)]) -> String {
    sentinels
        .iter()
        .map(|(h, p)| format!("{h}:{p}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn start(key: &RelayKey) -> Result<Relay, String> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let addr = std_listener.local_addr().map_err(|e| e.to_string())?;
    let listener = TcpListener::from_std(std_listener).map_err(|e| e.to_string())?;
    let (tx, rx) = watch::channel(Master::Unknown);
    let tx = Arc::new(tx);
    let (sentinels, name, kwargs) = key.clone();
    let clients: Vec<Client> = sentinels
        .iter()
        .map(|(h, p)| sentinel_client(h, *p, &kwargs))
        .collect::<Result<_, _>>()?;
    let mut tasks = vec![
        tokio::spawn(accept(listener, rx.clone())).abort_handle(),
        tokio::spawn(poll(clients.clone(), name.clone(), tx.clone())).abort_handle(),
    ];
    for client in clients {
        tasks.push(tokio::spawn(listen(client, name.clone(), tx.clone())).abort_handle());
    }
    info!(relay = %addr, master = %name, sentinels = %list(&sentinels), "following the Redis master through Sentinel");
    Ok(Relay {
        addr,
        tasks,
        state: rx,
    })
}

fn sentinel_client(host: &str, port: u16, kwargs: &SentinelKwargs) -> Result<Client, String> {
    let mut redis = RedisConnectionInfo::default();
    if let Some(p) = &kwargs.password {
        redis = redis.set_password(p.clone());
    }
    if let Some(u) = &kwargs.username {
        redis = redis.set_username(u.clone());
    }
    let info = format!("redis://{host}:{port}")
        .into_connection_info()
        .map_err(|e| e.to_string())?
        .set_redis_settings(redis);
    Client::open(info).map_err(|e| e.to_string())
}

/// Asks every sentinel where `name`'s master is and believes the newest configuration (the highest
/// `config-epoch`: a sentinel that has not heard of a failover yet still names the old master).
/// `Ok(None)` when the sentinels that answer do not know the name, `Err` when none answers.
async fn ask(clients: &[Client], name: &str) -> Result<Option<(String, u16)>, String> {
    let answers = futures::future::join_all(clients.iter().map(|client| async move {
        tokio::time::timeout(Duration::from_secs(1), async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            ::redis::cmd("SENTINEL")
                .arg("MASTER")
                .arg(name)
                .query_async::<HashMap<String, String>>(&mut conn)
                .await
        })
        .await
    }))
    .await;
    let mut best: Option<(u64, (String, u16))> = None;
    let mut unknown = false;
    let mut last = String::from("no sentinel");
    for answer in answers {
        match answer {
            Ok(Ok(fields)) => {
                let epoch = fields
                    .get("config-epoch")
                    .and_then(|e| e.parse().ok())
                    .unwrap_or(0);
                let at = fields
                    .get("ip")
                    .zip(fields.get("port").and_then(|p| p.parse().ok()));
                if let Some((h, p)) = at.filter(|_| best.as_ref().is_none_or(|(e, _)| epoch > *e)) {
                    best = Some((epoch, (h.clone(), p)));
                }
            }
            Ok(Err(e)) if e.to_string().contains("No such master") => unknown = true,
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "no answer within 1 s".into(),
        }
    }
    match best {
        Some((_, at)) => Ok(Some(at)),
        None if unknown => Ok(None),
        None => Err(last),
    }
}

/// Moves the relay to `at` unless a failover away from it is being held.
fn settle(tx: &watch::Sender<Master>, at: Option<(String, u16)>, name: &str) {
    tx.send_if_modified(|m| {
        let next = match (&*m, at) {
            (Master::FailingOver { from, since }, Some(a))
                if *from == a && since.elapsed() < FAILOVER_HOLD =>
            {
                return false;
            }
            (_, Some((h, p))) => Master::At(h, p),
            (_, None) => Master::Unknown,
        };
        if *m == next {
            return false;
        }
        match &next {
            Master::At(h, p) => info!(master = %name, "Redis master of {name:?} is {h}:{p}"),
            _ => warn!(master = %name, "no sentinel knows a master named {name:?}"),
        }
        *m = next;
        true
    });
}

async fn poll(clients: Vec<Client>, name: String, tx: Arc<watch::Sender<Master>>) {
    let mut quiet = false;
    loop {
        match ask(&clients, &name).await {
            Ok(at) => {
                quiet = false;
                settle(&tx, at, &name);
            }
            Err(e) if !quiet => {
                quiet = true;
                warn!(master = %name, error = %e, "no sentinel answers; keeping the last known master");
            }
            Err(_) => {}
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Follows one sentinel's announcements for `name`.
async fn listen(client: Client, name: String, tx: Arc<watch::Sender<Master>>) {
    use futures::StreamExt;
    loop {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub
                .subscribe(&["+try-failover", "+switch-master"])
                .await?;
            Ok::<_, ::redis::RedisError>(pubsub)
        };
        let mut pubsub = match tokio::time::timeout(Duration::from_secs(2), subscribed).await {
            Ok(Ok(p)) => p,
            _ => {
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let payload: String = msg.get_payload().unwrap_or_default();
            let words: Vec<&str> = payload.split_whitespace().collect();
            match msg.get_channel_name() {
                // "master <name> <ip> <port>"
                "+try-failover" if words.get(1) == Some(&name.as_str()) => {
                    let Some(from) = words
                        .get(2)
                        .zip(words.get(3).and_then(|p| p.parse().ok()))
                        .map(|(h, p)| (h.to_string(), p))
                    else {
                        continue;
                    };
                    tx.send_if_modified(|m| {
                        if *m != Master::At(from.0.clone(), from.1) {
                            return false;
                        }
                        warn!(master = %name, "a failover of {name:?} started: holding connections until the new master is announced");
                        *m = Master::FailingOver {
                            from: from.clone(),
                            since: Instant::now(),
                        };
                        true
                    });
                }
                // "<name> <old ip> <old port> <new ip> <new port>"
                "+switch-master" if words.first() == Some(&name.as_str()) => {
                    if let (Some(h), Some(Ok(p))) = (words.get(3), words.get(4).map(|p| p.parse()))
                    {
                        tx.send_if_modified(|m| {
                            let next = Master::At(h.to_string(), p);
                            if *m == next {
                                return false;
                            }
                            info!(master = %name, "Redis master of {name:?} switched to {h}:{p}");
                            *m = next;
                            true
                        });
                    }
                }
                _ => {}
            }
        }
        debug!(master = %name, "a sentinel's announcements stopped; subscribing again");
    }
}

async fn accept(listener: TcpListener, state: watch::Receiver<Master>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    connections.spawn(forward(client, state.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "sentinel relay: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Relays one connection to the master of now, until either side closes or the master changes.
async fn forward(mut client: TcpStream, mut state: watch::Receiver<Master>) {
    let Ok(Ok(master)) = tokio::time::timeout(
        WAIT_FOR_MASTER,
        state.wait_for(|m| matches!(m, Master::At(..))),
    )
    .await
    .map(|r| r.map(|m| m.clone())) else {
        return;
    };
    let Master::At(host, port) = master.clone() else {
        return;
    };
    let upstream = tokio::time::timeout(
        Duration::from_secs(5),
        TcpStream::connect((host.as_str(), port)),
    )
    .await;
    let Ok(Ok(mut upstream)) = upstream else {
        debug!("sentinel relay: the master {host}:{port} does not answer");
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        _ = state.wait_for(|m| *m != master) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kombu_sentinel_lists() {
        let u = parse("sentinel://:pw@10.0.0.1:26379/3;sentinel://10.0.0.2:26380/3; sentinel://h3")
            .unwrap();
        assert_eq!(
            u.sentinels,
            vec![
                ("10.0.0.1".to_string(), 26379),
                ("10.0.0.2".to_string(), 26380),
                ("h3".to_string(), 26379)
            ]
        );
        assert_eq!(u.password.as_deref(), Some("pw"));
        assert_eq!(u.username, None);
        assert_eq!(u.db, 3);
        let u = parse("sentinel://app:p%40ss@h:1").unwrap();
        assert_eq!(
            (u.username.as_deref(), u.password.as_deref(), u.db),
            (Some("app"), Some("p@ss"), 0)
        );
    }

    #[test]
    fn rejects_malformed_lists() {
        assert!(
            parse("sentinel://h:1;redis://h:2")
                .unwrap_err()
                .contains("starts with sentinel://")
        );
        assert!(
            parse("sentinel://h:1/x")
                .unwrap_err()
                .contains("not a number")
        );
        assert!(parse(";").unwrap_err().contains("no sentinel"));
    }

    #[tokio::test]
    async fn needs_a_master_name() {
        let e = target("sentinel://127.0.0.1:1", &SentinelOptions::default())
            .await
            .unwrap_err();
        assert!(e.contains("master_name"), "{e}");
    }
}

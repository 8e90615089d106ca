//! The outside peers a worker depends on (the broker, the result backend, the domain database, an SMTP server,
//! a payment API, a shop), each reported up or down by whatever talks to it. One warning when a peer goes
//! away and one line when it is back (never one per task or per retry); the worker's `/health` names the peers
//! that are down and `/metrics` shows each peer's current outage.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct State {
    down_since: Option<Instant>,
    error: String,
    failures: u64,
}

/// A peer that is down now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outage {
    /// The peer (`broker`, `result_backend`, `postgres`, `smtp`, `stripe`, `shop`).
    pub peer: String,
    /// For how long.
    pub since: Duration,
    /// The first error of the outage.
    pub error: String,
}

/// Every peer's state, shared by the runtime and the task families.
#[derive(Debug, Default)]
pub struct Peers {
    state: Mutex<BTreeMap<String, State>>,
}

impl Peers {
    /// A new registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// `peer` answered: logs once when it comes back.
    pub fn up(&self, peer: &str) {
        let mut s = self.state.lock().expect("peers");
        let entry = s.entry(peer.to_string()).or_insert(State {
            down_since: None,
            error: String::new(),
            failures: 0,
        });
        if let Some(since) = entry.down_since.take() {
            tracing::warn!(
                peer,
                outage_s = since.elapsed().as_secs_f64(),
                failures = entry.failures,
                "{peer} is back after {:.1} s",
                since.elapsed().as_secs_f64()
            );
            entry.failures = 0;
        }
    }

    /// `peer` failed with `error` (a connection error, a timeout, a 5xx): logs once per outage.
    pub fn down(&self, peer: &str, error: &str) {
        let mut s = self.state.lock().expect("peers");
        let entry = s.entry(peer.to_string()).or_insert(State {
            down_since: None,
            error: String::new(),
            failures: 0,
        });
        entry.failures += 1;
        if entry.down_since.is_none() {
            entry.down_since = Some(Instant::now());
            entry.error = error.to_string();
            tracing::warn!(peer, %error, "{peer} is down: {error} (tasks that need it retry; one line when it is back)");
        }
    }

    /// The peers down now.
    pub fn outages(&self) -> Vec<Outage> {
        self.state
            .lock()
            .expect("peers")
            .iter()
            .filter_map(|(peer, st)| {
                st.down_since.map(|since| Outage {
                    peer: peer.clone(),
                    since: since.elapsed(),
                    error: st.error.clone(),
                })
            })
            .collect()
    }

    /// Every peer seen, with its current outage in seconds (0 when up).
    pub fn snapshot(&self) -> Vec<(String, f64)> {
        self.state
            .lock()
            .expect("peers")
            .iter()
            .map(|(peer, st)| {
                (
                    peer.clone(),
                    st.down_since
                        .map(|t| t.elapsed().as_secs_f64())
                        .unwrap_or(0.0),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_one_state_change_however_many_failures() {
        let p = Peers::new();
        p.up("postgres");
        assert!(p.outages().is_empty());
        for i in 0..100 {
            p.down("postgres", &format!("connection refused #{i}"));
        }
        let o = p.outages();
        assert_eq!(o.len(), 1);
        assert_eq!(
            (o[0].peer.as_str(), o[0].error.as_str()),
            ("postgres", "connection refused #0")
        );
        p.up("postgres");
        assert!(p.outages().is_empty());
        assert_eq!(p.snapshot(), vec![("postgres".to_string(), 0.0)]);
    }
}

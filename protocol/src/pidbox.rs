//! Remote control (kombu's pidbox): the commands ([`ControlCommand`]) and which workers a request is for:
//! its `destination` list, else its `pattern` (kombu's default `glob` matcher: `*` any run, `?` one
//! character), else every worker.

use serde_json::Value;

/// The remote-control commands Celery's `celery inspect` / `celery control` and Flower send, once for every
/// crate (the worker answers them, the CLI and flower-compat send them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ControlCommand {
    /// `ping`: answers `pong`.
    Ping,
    /// `clock`: the Lamport clock.
    Clock,
    /// `registered`: the task names.
    Registered,
    /// `active_queues`: the queues consumed.
    ActiveQueues,
    /// `active`: tasks running.
    Active,
    /// `reserved`: tasks received, not yet running.
    Reserved,
    /// `scheduled`: tasks waiting for their ETA.
    Scheduled,
    /// `revoked`: the revoked ids.
    Revoked,
    /// `conf`: the configuration.
    Conf,
    /// `query_task`: the state of given ids.
    QueryTask,
    /// `stats`: counters, pool, broker.
    Stats,
    /// `enable_events`: task events on.
    EnableEvents,
    /// `disable_events`: task events off.
    DisableEvents,
    /// `heartbeat`: a `worker-heartbeat` now.
    Heartbeat,
    /// `revoke`: revoke ids (optionally terminating).
    Revoke,
    /// `terminate`: revoke and stop running ids.
    Terminate,
    /// `rate_limit`: a task's rate limit.
    RateLimit,
    /// `time_limit`: a task's soft and hard limits.
    TimeLimit,
    /// `pool_grow`: more concurrency.
    PoolGrow,
    /// `pool_shrink`: less concurrency.
    PoolShrink,
    /// `add_consumer`: consume one more queue.
    AddConsumer,
    /// `cancel_consumer`: stop consuming a queue.
    CancelConsumer,
    /// `shutdown`: a warm shutdown.
    Shutdown,
}

impl ControlCommand {
    /// Every command the worker answers.
    pub const ALL: [ControlCommand; 23] = [
        ControlCommand::Ping,
        ControlCommand::Clock,
        ControlCommand::Registered,
        ControlCommand::ActiveQueues,
        ControlCommand::Active,
        ControlCommand::Reserved,
        ControlCommand::Scheduled,
        ControlCommand::Revoked,
        ControlCommand::Conf,
        ControlCommand::QueryTask,
        ControlCommand::Stats,
        ControlCommand::EnableEvents,
        ControlCommand::DisableEvents,
        ControlCommand::Heartbeat,
        ControlCommand::Revoke,
        ControlCommand::Terminate,
        ControlCommand::RateLimit,
        ControlCommand::TimeLimit,
        ControlCommand::PoolGrow,
        ControlCommand::PoolShrink,
        ControlCommand::AddConsumer,
        ControlCommand::CancelConsumer,
        ControlCommand::Shutdown,
    ];

    /// The `method` field.
    pub fn as_str(self) -> &'static str {
        match self {
            ControlCommand::Ping => "ping",
            ControlCommand::Clock => "clock",
            ControlCommand::Registered => "registered",
            ControlCommand::ActiveQueues => "active_queues",
            ControlCommand::Active => "active",
            ControlCommand::Reserved => "reserved",
            ControlCommand::Scheduled => "scheduled",
            ControlCommand::Revoked => "revoked",
            ControlCommand::Conf => "conf",
            ControlCommand::QueryTask => "query_task",
            ControlCommand::Stats => "stats",
            ControlCommand::EnableEvents => "enable_events",
            ControlCommand::DisableEvents => "disable_events",
            ControlCommand::Heartbeat => "heartbeat",
            ControlCommand::Revoke => "revoke",
            ControlCommand::Terminate => "terminate",
            ControlCommand::RateLimit => "rate_limit",
            ControlCommand::TimeLimit => "time_limit",
            ControlCommand::PoolGrow => "pool_grow",
            ControlCommand::PoolShrink => "pool_shrink",
            ControlCommand::AddConsumer => "add_consumer",
            ControlCommand::CancelConsumer => "cancel_consumer",
            ControlCommand::Shutdown => "shutdown",
        }
    }

    /// The command of a `method` field; `None` for one celeriac does not know.
    pub fn parse(method: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == method)
    }
}

impl std::fmt::Display for ControlCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the request `req` is addressed to the worker named `me`.
pub fn selected(req: &Value, me: &str) -> bool {
    match req.get("destination") {
        Some(Value::Array(d)) => d.iter().any(|n| n.as_str() == Some(me)),
        _ => match req.get("pattern").and_then(Value::as_str) {
            Some(p) => glob(p, me),
            None => true,
        },
    }
}

/// `fnmatch`-style matching of `*` and `?` over characters, in time linear in `pattern × text` whatever the
/// pattern (no backtracking blow-up on many stars).
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // Where the last star was, and the text position it matched up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_commands_round_trip() {
        for c in ControlCommand::ALL {
            assert_eq!(ControlCommand::parse(c.as_str()), Some(c));
        }
        assert_eq!(
            ControlCommand::parse("active_queues"),
            Some(ControlCommand::ActiveQueues)
        );
        assert_eq!(ControlCommand::parse("dump_everything"), None);
    }
    use serde_json::json;

    #[test]
    fn glob_patterns() {
        assert!(glob("w*@vm", "w1@vm"));
        assert!(glob("*", "x"));
        assert!(glob("*", ""));
        assert!(!glob("w*@vm", "x1@vm"));
        assert!(glob("w1@vm", "w1@vm"));
        assert!(glob("w?@vm", "w1@vm"));
        assert!(!glob("w?@vm", "w12@vm"));
        assert!(glob("*@*", "celery@host"));
        assert!(!glob("a*b", "a"));
    }

    #[test]
    fn multibyte_names_and_many_stars_are_safe() {
        // Used to slice inside a character (a panic in the pidbox loop) and to backtrack exponentially.
        assert!(glob("*é*", "wé@vm"));
        assert!(!glob("w*x", "wé"));
        let pattern = format!("{}b", "*a".repeat(40));
        assert!(!glob(&pattern, &"a".repeat(200)));
    }

    #[test]
    fn destination_wins_over_pattern() {
        assert!(selected(
            &json!({"destination": ["w1"], "pattern": "x*"}),
            "w1"
        ));
        assert!(!selected(&json!({"destination": ["w2"]}), "w1"));
        assert!(selected(
            &json!({"destination": null, "pattern": "w*"}),
            "w1"
        ));
        assert!(selected(&json!({}), "w1"));
    }
}

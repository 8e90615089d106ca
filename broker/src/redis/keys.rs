//! Redis key names exactly as kombu spells them (with `global_keyprefix` in front of every one).

/// kombu's separator between a queue name and its priority step, and inside binding members.
pub const SEP: &str = "\x06\x16";

/// kombu's `priority_steps`.
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];

/// The default exchange Celery binds task queues to.
pub const DEFAULT_EXCHANGE: &str = "celery";

/// Key names under one prefix.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `global_keyprefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The list holding messages of `queue` at this priority: the step is the largest of 0/3/6/9 not above
    /// `priority`; step 0 has no suffix (`celery`, `celery\x06\x163`, ...).
    pub fn queue_for_priority(&self, queue: &str, priority: u8) -> String {
        let step = PRIORITY_STEPS
            .iter()
            .rev()
            .find(|s| **s <= priority)
            .copied()
            .unwrap_or(0);
        if step == 0 {
            format!("{}{queue}", self.prefix)
        } else {
            format!("{}{queue}{SEP}{step}", self.prefix)
        }
    }

    /// All four priority lists of a queue, most urgent (lowest number) first, as consumers read them.
    pub fn queue_lists(&self, queue: &str) -> [String; 4] {
        PRIORITY_STEPS.map(|p| self.queue_for_priority(queue, p))
    }

    /// The `unacked` hash: delivery tag → `[envelope, exchange, routing_key]`.
    pub fn unacked(&self) -> String {
        format!("{}unacked", self.prefix)
    }

    /// The `unacked_index` sorted set: delivery tag scored by delivery time.
    pub fn unacked_index(&self) -> String {
        format!("{}unacked_index", self.prefix)
    }

    /// The mutex serialising visibility-timeout sweeps.
    pub fn unacked_mutex(&self) -> String {
        format!("{}unacked_mutex", self.prefix)
    }

    /// kombu's binding table of an exchange.
    pub fn binding(&self, exchange: &str) -> String {
        format!("{}_kombu.binding.{exchange}", self.prefix)
    }

    /// kombu 5.7's marker that a binding table is permanent.
    pub fn binding_permanent(&self, exchange: &str) -> String {
        format!("{}_kombu.binding_permanent.{exchange}", self.prefix)
    }

    /// A binding member: `routing_key SEP pattern SEP queue`.
    pub fn binding_member(routing_key: &str, queue: &str) -> String {
        format!("{routing_key}{SEP}{SEP}{queue}")
    }

    /// Prefix of celeriac's dead-letter lists.
    pub fn deadletter_prefix(&self) -> String {
        format!("{}celeriac.deadletter.", self.prefix)
    }

    /// celeriac's set of parked ETA messages of a queue (scored by due time).
    pub fn eta(&self, queue: &str) -> String {
        format!("{}celeriac.eta.{queue}", self.prefix)
    }

    /// A shared rate limiter's state.
    pub fn rate_limit(&self, name: &str) -> String {
        format!("{}celeriac.ratelimit.{name}", self.prefix)
    }

    /// The dead-letter list of a queue.
    pub fn deadletter(&self, queue: &str) -> String {
        format!("{}celeriac.deadletter.{queue}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_lists_match_kombu() {
        let k = Keys::default();
        let got: Vec<_> = [0u8, 1, 2, 3, 5, 6, 8, 9, 255]
            .iter()
            .map(|p| k.queue_for_priority("celery", *p))
            .collect();
        assert_eq!(
            got,
            [
                "celery",
                "celery",
                "celery",
                "celery\x06\x163",
                "celery\x06\x163",
                "celery\x06\x166",
                "celery\x06\x166",
                "celery\x06\x169",
                "celery\x06\x169"
            ]
        );
        assert_eq!(
            Keys::binding_member("celery", "celery"),
            "celery\x06\x16\x06\x16celery"
        );
    }

    #[test]
    fn prefix_applies_to_every_key() {
        let k = Keys::new("t1:");
        assert_eq!(k.queue_lists("q")[3], "t1:q\x06\x169");
        assert_eq!(k.unacked(), "t1:unacked");
        assert_eq!(k.unacked_index(), "t1:unacked_index");
        assert_eq!(k.binding("celery"), "t1:_kombu.binding.celery");
        assert_eq!(k.deadletter("bulk"), "t1:celeriac.deadletter.bulk");
    }
}

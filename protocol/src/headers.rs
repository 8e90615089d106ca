//! A v2 header table sorted as it is read: one slot per header [`TaskHeaders`] models, every other header kept
//! in arrival order. Built from a JSON object map ([`HeaderSlots::from_map`], the AMQP and generic paths) or
//! straight from the JSON text ([`HeaderSlots`]' `Deserialize`, the Redis consumer's one-pass decoding), with
//! the same rules either way: a repeated header keeps its last value (and, among the others, its first
//! position), as a JSON object read into a map does.

use crate::error::ProtocolError;
use crate::message::TaskHeaders;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};
use std::borrow::Cow;

/// How many headers [`TaskHeaders`] has a field for.
const KNOWN: usize = 19;

/// The slot of a header [`TaskHeaders`] has a field for (a `match`: the compiler dispatches on length first).
fn slot_of(name: &str) -> Option<usize> {
    Some(match name {
        "task" => 0,
        "id" => 1,
        "timelimit" => 2,
        "lang" => 3,
        "shadow" => 4,
        "eta" => 5,
        "expires" => 6,
        "group" => 7,
        "group_index" => 8,
        "retries" => 9,
        "root_id" => 10,
        "parent_id" => 11,
        "argsrepr" => 12,
        "kwargsrepr" => 13,
        "origin" => 14,
        "ignore_result" => 15,
        "replaced_task_nesting" => 16,
        "stamped_headers" => 17,
        "stamps" => 18,
        _ => return None,
    })
}

/// A header table, sorted: the modelled headers by name, the rest in arrival order.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct HeaderSlots {
    known: [Option<Value>; KNOWN],
    extra: Map<String, Value>,
}

impl HeaderSlots {
    /// Sorts a header table.
    pub fn from_map(m: Map<String, Value>) -> Self {
        let mut slots = Self::default();
        for (k, v) in m {
            match slot_of(&k) {
                Some(i) => slots.known[i] = Some(v),
                None => {
                    slots.extra.insert(k, v);
                }
            }
        }
        slots
    }

    /// Adds one header as read (a repeated one replaces the earlier value).
    fn insert(&mut self, k: Cow<'_, str>, v: Value) {
        match slot_of(&k) {
            Some(i) => self.known[i] = Some(v),
            None => {
                self.extra.insert(k.into_owned(), v);
            }
        }
    }

    /// A header's value, modelled or not.
    pub fn get(&self, name: &str) -> Option<&Value> {
        match slot_of(name) {
            Some(i) => self.known[i].as_ref(),
            None => self.extra.get(name),
        }
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        let i = slot_of(name).expect("a known header");
        self.known[i].take()
    }
}

impl<'de> Deserialize<'de> for HeaderSlots {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Slots;
        impl<'de> Visitor<'de> for Slots {
            type Value = HeaderSlots;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<HeaderSlots, A::Error> {
                let mut slots = HeaderSlots::default();
                while let Some(Key(k)) = map.next_key()? {
                    let v: Value = map.next_value()?;
                    slots.insert(k, v);
                }
                Ok(slots)
            }
        }
        d.deserialize_map(Slots)
    }
}

/// A map key, borrowed from the input when it has no escapes.
pub(crate) struct Key<'de>(pub(crate) Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct K;
        impl<'de> Visitor<'de> for K {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(K)
    }
}

impl TaskHeaders {
    /// Reads v2 headers from the broker's header table. Only `task` and `id` are required; the rest default
    /// the way Celery's worker defaults them for older clients; every other header stays in `extra` in its
    /// order.
    pub fn from_map(m: Map<String, Value>) -> Result<Self, ProtocolError> {
        Self::from_slots(HeaderSlots::from_map(m))
    }

    /// [`TaskHeaders::from_map`] for a table already sorted.
    pub fn from_slots(mut s: HeaderSlots) -> Result<Self, ProtocolError> {
        let task = string_of(s.take("task"))
            .ok_or_else(|| ProtocolError::malformed("headers", "no 'task'"))?;
        let id = string_of(s.take("id"))
            .ok_or_else(|| ProtocolError::malformed("headers", "no 'id'"))?;
        let timelimit = match s.take("timelimit") {
            Some(Value::Array(a)) if a.len() == 2 => {
                let mut it = a.into_iter();
                [
                    it.next().unwrap_or(Value::Null),
                    it.next().unwrap_or(Value::Null),
                ]
            }
            _ => [Value::Null, Value::Null],
        };
        Ok(Self {
            lang: string_of(s.take("lang")).unwrap_or_else(|| "py".into()),
            task,
            id,
            shadow: string_of(s.take("shadow")),
            eta: string_of(s.take("eta")),
            expires: string_of(s.take("expires")),
            group: string_of(s.take("group")),
            group_index: s.take("group_index").and_then(|v| v.as_i64()),
            retries: s.take("retries").and_then(|v| v.as_i64()).unwrap_or(0),
            timelimit,
            root_id: string_of(s.take("root_id")),
            parent_id: string_of(s.take("parent_id")),
            argsrepr: string_of(s.take("argsrepr")),
            kwargsrepr: string_of(s.take("kwargsrepr")),
            origin: string_of(s.take("origin")),
            ignore_result: s.take("ignore_result").and_then(|v| v.as_bool()),
            replaced_task_nesting: s
                .take("replaced_task_nesting")
                .and_then(|v| v.as_i64())
                .unwrap_or(0),
            stamped_headers: s.take("stamped_headers").filter(|v| !v.is_null()),
            stamps: match s.take("stamps") {
                Some(Value::Object(m)) => m,
                _ => Map::new(),
            },
            extra: s.extra,
        })
    }
}

/// A header's value as a string: `None` when absent or null; a non-string value in its JSON form.
fn string_of(v: Option<Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s),
        Some(Value::Null) | None => None,
        Some(other) => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_from_text_or_from_a_map_alike() {
        let text =
            r#"{"x-b": 1, "task": "t", "x-a": 2, "id": 7, "task": "u", "x-b": 3, "stamps": null}"#;
        let slots: HeaderSlots = serde_json::from_str(text).unwrap();
        let map: Map<String, Value> = serde_json::from_str(text).unwrap();
        assert_eq!(slots, HeaderSlots::from_map(map));
        let h = TaskHeaders::from_slots(slots).unwrap();
        assert_eq!((h.task.as_str(), h.id.as_str()), ("u", "7"));
        assert_eq!(
            serde_json::to_string(&h.extra).unwrap(),
            r#"{"x-b":3,"x-a":2}"#
        );
        assert!(serde_json::from_str::<HeaderSlots>("null").is_err());
        assert!(serde_json::from_str::<HeaderSlots>(r#"{"a": 1e999}"#).is_err());
    }
}

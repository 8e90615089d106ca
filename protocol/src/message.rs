//! Task messages. Protocol v2 is what Celery 5 sends (headers + `[args, kwargs, embed]` body) and the only form
//! we publish; protocol v1 (everything in a dict body) and the "hybrid" form are accepted and converted to the
//! v2 shape, as Celery's `proto1_to_proto2` / `hybrid_to_proto2` do.

use crate::codec;
use crate::error::ProtocolError;
use crate::headers::HeaderSlots;
use crate::repr;
use serde::Serialize;
use serde_json::{Map, Value};

/// The `embed` part of a v2 body: what the worker runs or publishes after the task.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Embed {
    /// `link` signatures (dicts).
    pub callbacks: Option<Vec<Value>>,
    /// `link_error` signatures (dicts).
    pub errbacks: Option<Vec<Value>>,
    /// Remaining chain steps in reverse order (the next one is last).
    pub chain: Option<Vec<Value>>,
    /// The chord body this task is a header member of.
    pub chord: Option<Value>,
}

/// Protocol v2 headers, in the exact order Celery 5.7 writes them; headers we do not model (custom ones,
/// `celery_beat_task`, `redelivered`, `compression`) are kept in `extra`, in arrival order, after them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskHeaders {
    /// Always `"py"` from Celery; kept as received.
    pub lang: String,
    /// Registered task name.
    pub task: String,
    /// Task id (uuid).
    pub id: String,
    /// Display name override.
    pub shadow: Option<String>,
    /// ISO-8601 ETA.
    pub eta: Option<String>,
    /// ISO-8601 expiry.
    pub expires: Option<String>,
    /// Group id for group and chord members.
    pub group: Option<String>,
    /// Position in the group.
    pub group_index: Option<i64>,
    /// Retry count.
    pub retries: i64,
    /// `[hard, soft]` time limits in seconds.
    pub timelimit: [Value; 2],
    /// First task of the workflow.
    pub root_id: Option<String>,
    /// Task that published this one.
    pub parent_id: Option<String>,
    /// Python repr of the args.
    pub argsrepr: Option<String>,
    /// Python repr of the kwargs.
    pub kwargsrepr: Option<String>,
    /// Publisher node name.
    pub origin: Option<String>,
    /// Do not store a result (`null` from `send_task`, `false`/`true` from `apply_async`).
    pub ignore_result: Option<bool>,
    /// Depth of `self.replace()`.
    pub replaced_task_nesting: i64,
    /// Names of stamp headers.
    pub stamped_headers: Option<Value>,
    /// Stamp values.
    pub stamps: Map<String, Value>,
    /// Every other header, in arrival order.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl TaskHeaders {
    /// Headers for a new task published by us, as `apply_async` fills them.
    pub fn new(task: impl Into<String>, id: impl Into<String>) -> Self {
        let id = id.into();
        Self {
            lang: "py".into(),
            task: task.into(),
            root_id: Some(id.clone()),
            id,
            shadow: None,
            eta: None,
            expires: None,
            group: None,
            group_index: None,
            retries: 0,
            timelimit: [Value::Null, Value::Null],
            parent_id: None,
            argsrepr: None,
            kwargsrepr: None,
            origin: None,
            ignore_result: Some(false),
            replaced_task_nesting: 0,
            stamped_headers: None,
            stamps: Map::new(),
            extra: Map::new(),
        }
    }

    /// The headers as an ordered JSON object.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("headers serialize")
    }

    /// `timelimit` as `(hard, soft)` seconds.
    pub fn time_limits(&self) -> (Option<f64>, Option<f64>) {
        (self.timelimit[0].as_f64(), self.timelimit[1].as_f64())
    }
}

/// The message properties that matter to Celery (transport-specific ones live in the transport).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskProperties {
    /// Equals the task id.
    pub correlation_id: String,
    /// The client's reply queue (rpc backend); always sent by Celery.
    pub reply_to: Option<String>,
    /// 2 = persistent.
    pub delivery_mode: u8,
    /// 0..=255; Redis maps it to priority sub-lists.
    pub priority: u8,
    /// Per-message TTL in milliseconds, as a string (from `expires`).
    pub expiration: Option<String>,
}

impl TaskProperties {
    /// Properties for a new task.
    pub fn new(id: &str) -> Self {
        Self {
            correlation_id: id.to_string(),
            reply_to: None,
            delivery_mode: 2,
            priority: 0,
            expiration: None,
        }
    }
}

/// A decoded task message in the v2 shape, whatever protocol it arrived in.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    /// v2 headers.
    pub headers: TaskHeaders,
    /// Properties.
    pub properties: TaskProperties,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// Callbacks, errbacks, chain, chord.
    pub embed: Embed,
    /// Which protocol the message arrived in (1 or 2).
    pub protocol: u8,
}

impl TaskMessage {
    /// A new v2 message for `task` with these arguments; `argsrepr`/`kwargsrepr` are filled in.
    pub fn new(
        task: impl Into<String>,
        id: impl Into<String>,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> Self {
        let mut headers = TaskHeaders::new(task, id);
        headers.argsrepr = Some(repr::args_repr(&args));
        headers.kwargsrepr = Some(repr::kwargs_repr(&kwargs));
        let properties = TaskProperties::new(&headers.id);
        Self {
            headers,
            properties,
            args,
            kwargs,
            embed: Embed::default(),
            protocol: 2,
        }
    }

    /// Task id.
    pub fn id(&self) -> &str {
        &self.headers.id
    }

    /// Task name.
    pub fn task(&self) -> &str {
        &self.headers.task
    }

    /// The v2 body `[args, kwargs, embed]` as Python's json would write it.
    pub fn encode_body(&self) -> Vec<u8> {
        crate::json::to_vec(&(&self.args, &self.kwargs, &self.embed))
    }

    /// Decodes a message from its transport parts: the header table, properties, content type/encoding and
    /// the raw (already base64-decoded) body.
    pub fn decode(
        headers: Map<String, Value>,
        properties: TaskProperties,
        content_type: &str,
        content_encoding: &str,
        body: &[u8],
    ) -> Result<Self, ProtocolError> {
        let headers = HeaderSlots::from_map(headers);
        Self::decode_slots(headers, properties, content_type, content_encoding, body)
    }

    /// [`TaskMessage::decode`] with the header table already sorted into [`HeaderSlots`].
    pub fn decode_slots(
        headers: HeaderSlots,
        properties: TaskProperties,
        content_type: &str,
        content_encoding: &str,
        body: &[u8],
    ) -> Result<Self, ProtocolError> {
        let compression = headers.get("compression").and_then(Value::as_str);
        let payload = codec::decode_body(content_type, content_encoding, compression, body)?;
        if headers.get("task").is_some() {
            let headers = TaskHeaders::from_slots(headers)?;
            match payload {
                Value::Object(map) if map.contains_key("args") => {
                    Self::from_hybrid(headers, properties, map)
                }
                payload => Self::from_v2(headers, properties, payload),
            }
        } else {
            match payload {
                Value::Object(map) if map.contains_key("task") => Self::from_v1(map, properties),
                _ => Err(ProtocolError::malformed(
                    "message",
                    "no 'task' header and the body is not a protocol 1 task dict",
                )),
            }
        }
    }

    fn from_v2(
        headers: TaskHeaders,
        properties: TaskProperties,
        payload: Value,
    ) -> Result<Self, ProtocolError> {
        let Value::Array(parts) = payload else {
            return Err(ProtocolError::malformed(
                "body",
                "expected [args, kwargs, embed]",
            ));
        };
        let [args, kwargs, embed]: [Value; 3] = parts.try_into().map_err(|p: Vec<Value>| {
            ProtocolError::malformed(
                "body",
                format!("expected 3 items [args, kwargs, embed], got {}", p.len()),
            )
        })?;
        let Value::Array(args) = args else {
            return Err(ProtocolError::malformed("body", "args is not a list"));
        };
        let kwargs = match kwargs {
            Value::Object(k) => k,
            Value::Null => Map::new(),
            _ => return Err(ProtocolError::malformed("body", "kwargs is not a dict")),
        };
        let embed = match embed {
            Value::Object(e) => embed_from_map(e)?,
            Value::Null => Embed::default(),
            _ => return Err(ProtocolError::malformed("body", "embed is not a dict")),
        };
        Ok(Self {
            headers,
            properties,
            args,
            kwargs,
            embed,
            protocol: 2,
        })
    }

    fn from_hybrid(
        headers: TaskHeaders,
        properties: TaskProperties,
        mut body: Map<String, Value>,
    ) -> Result<Self, ProtocolError> {
        let args = match body.shift_remove("args") {
            Some(Value::Array(a)) => a,
            Some(Value::Null) | None => Vec::new(),
            _ => return Err(ProtocolError::malformed("body", "args is not a list")),
        };
        let kwargs = match body.shift_remove("kwargs") {
            Some(Value::Object(k)) => k,
            Some(Value::Null) | None => Map::new(),
            _ => return Err(ProtocolError::malformed("body", "kwargs is not a dict")),
        };
        let embed = embed_from_map(body)?;
        Ok(Self {
            headers,
            properties,
            args,
            kwargs,
            embed,
            protocol: 2,
        })
    }

    fn from_v1(
        mut body: Map<String, Value>,
        properties: TaskProperties,
    ) -> Result<Self, ProtocolError> {
        let mut h = Map::new();
        for key in ["task", "id", "eta", "expires", "retries", "timelimit"] {
            if let Some(v) = body.shift_remove(key) {
                h.insert(key.into(), v);
            }
        }
        if let Some(g) = body
            .shift_remove("taskset")
            .filter(|v| !v.is_null())
            .or_else(|| body.shift_remove("group"))
        {
            h.insert("group".into(), g);
        }
        if let Some(gi) = body.shift_remove("group_index") {
            h.insert("group_index".into(), gi);
        }
        let mut headers = TaskHeaders::from_map(h)?;
        let args = match body.shift_remove("args") {
            Some(Value::Array(a)) => a,
            Some(Value::Null) | None => Vec::new(),
            _ => {
                return Err(ProtocolError::malformed(
                    "body",
                    "protocol 1 args is not a list",
                ));
            }
        };
        let kwargs = match body.shift_remove("kwargs") {
            Some(Value::Object(k)) => k,
            Some(Value::Null) | None => Map::new(),
            _ => {
                return Err(ProtocolError::malformed(
                    "body",
                    "protocol 1 kwargs is not a dict",
                ));
            }
        };
        headers.argsrepr = Some(repr::args_repr(&args));
        headers.kwargsrepr = Some(repr::kwargs_repr(&kwargs));
        headers.root_id = None;
        let embed = Embed {
            callbacks: list_or_none(body.shift_remove("callbacks"))?,
            errbacks: list_or_none(body.shift_remove("errbacks"))?,
            chain: None,
            chord: body.shift_remove("chord").filter(|v| !v.is_null()),
        };
        Ok(Self {
            headers,
            properties,
            args,
            kwargs,
            embed,
            protocol: 1,
        })
    }
}

fn list_or_none(v: Option<Value>) -> Result<Option<Vec<Value>>, ProtocolError> {
    match v {
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(Value::Null) | None => Ok(None),
        Some(_) => Err(ProtocolError::malformed(
            "embed",
            "callbacks/errbacks/chain must be lists",
        )),
    }
}

fn embed_from_map(mut e: Map<String, Value>) -> Result<Embed, ProtocolError> {
    Ok(Embed {
        callbacks: list_or_none(e.shift_remove("callbacks"))?,
        errbacks: list_or_none(e.shift_remove("errbacks"))?,
        chain: list_or_none(e.shift_remove("chain"))?,
        chord: e.shift_remove("chord").filter(|v| !v.is_null()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn v2_body_bytes_match_celery() {
        let m = TaskMessage::new("tasks.add", "x", vec![json!(2), json!(3)], Map::new());
        assert_eq!(
            String::from_utf8(m.encode_body()).unwrap(),
            r#"[[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
        );
        assert_eq!(m.headers.argsrepr.as_deref(), Some("(2, 3)"));
        assert_eq!(m.headers.kwargsrepr.as_deref(), Some("{}"));
    }

    #[test]
    fn bodies_that_are_not_args_kwargs_embed_are_rejected() {
        let h = json!({"task": "t", "id": "1"}).as_object().unwrap().clone();
        for body in [
            r#"{"a": 1}"#,
            r#"[1, 2, 3]"#,
            r#"[[], {}]"#,
            r#""text""#,
            r#"[[], [], {}]"#,
        ] {
            let err = TaskMessage::decode(
                h.clone(),
                TaskProperties::new("1"),
                "application/json",
                "utf-8",
                body.as_bytes(),
            );
            assert!(
                matches!(err, Err(ProtocolError::Malformed { .. })),
                "{body}: {err:?}"
            );
        }
    }

    #[test]
    fn unknown_headers_are_kept_in_order() {
        let h = json!({"task": "t", "id": "1", "custom": "h", "celery_beat_task": true});
        let m = TaskMessage::decode(
            h.as_object().unwrap().clone(),
            TaskProperties::new("1"),
            "application/json",
            "utf-8",
            b"[[], {}, {}]",
        )
        .unwrap();
        let keys: Vec<_> = m.headers.extra.keys().cloned().collect();
        assert_eq!(keys, ["custom", "celery_beat_task"]);
    }
}

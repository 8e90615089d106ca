//! Celery canvases from Rust: build signatures, chains, groups and chords as the dicts Celery uses, and
//! apply them, publishing the same messages a Python client would, so Python and celeriac workers both run
//! them. The worker uses the same code to publish callbacks, the next chain step and chord bodies.
//!
//! # Layout
//! - [`sig`] and friends: builders for signature dicts (`sig("bench.add", [2, 2])`, [`chain`], [`group`],
//!   [`chord`], [`immutable`], [`with_option`]).
//! - [`Canvas`]: applies any signature dict (task, chain, group, chord, chunks, xmap, xstarmap).
//! - [`Applied`]: what was published, with Celery's result tuples (`children`).

pub mod trace;

use celeriac_backend::{BackendError, ResultBackend};
use celeriac_broker::{Broker, BrokerError};
use celeriac_protocol::{Signature, TaskMessage, Value, time};
use serde_json::{Map, json};
use std::collections::HashMap;
use std::sync::Arc;
use thiserror::Error;

/// Why a canvas could not be applied.
#[derive(Debug, Error)]
pub enum CanvasError {
    /// Publishing failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The result backend (chord size) failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The signature is not one we understand.
    #[error("invalid signature: {0}")]
    Invalid(String),
}

/// A signature dict for `task` with positional arguments.
pub fn sig(task: &str, args: impl IntoIterator<Item = Value>) -> Value {
    json!(Signature::new(task, args.into_iter().collect()))
}

/// `.si()`: the parent's result is not prepended.
pub fn immutable(mut s: Value) -> Value {
    s["immutable"] = Value::Bool(true);
    s
}

/// Sets one option (`queue`, `task_id`, `priority`, `countdown`, `link`, ...).
pub fn with_option(mut s: Value, key: &str, value: Value) -> Value {
    if !s["options"].is_object() {
        s["options"] = json!({});
    }
    s["options"][key] = value;
    s
}

fn canvas_sig(task: &str, kind: &str, kwargs: Value) -> Value {
    json!({"task": task, "args": [], "kwargs": kwargs, "options": {}, "subtask_type": kind, "immutable": false})
}

/// `chain(a, b, c)`.
pub fn chain(tasks: Vec<Value>) -> Value {
    canvas_sig("celery.chain", "chain", json!({"tasks": tasks}))
}

/// `group(a, b, c)`.
pub fn group(tasks: Vec<Value>) -> Value {
    canvas_sig("celery.group", "group", json!({"tasks": tasks}))
}

/// `chord(header, body)`.
pub fn chord(header: Vec<Value>, body: Value) -> Value {
    canvas_sig(
        "celery.chord",
        "chord",
        json!({"header": group(header), "body": body, "kwargs": {}}),
    )
}

/// What applying a canvas published.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// One task message (for a chain or chord: the task whose result is the canvas's result).
    Task(String),
    /// A group: its id and members.
    Group {
        /// Group id.
        id: String,
        /// Members in order.
        members: Vec<Applied>,
    },
}

impl Applied {
    /// The id whose result is the canvas's result (the group id for a group).
    pub fn id(&self) -> &str {
        match self {
            Self::Task(id) | Self::Group { id, .. } => id,
        }
    }

    /// Celery's `as_tuple()`: `[[id, null], null]`, or for a group `[[gid, null], [members...]]`.
    pub fn as_tuple(&self) -> Value {
        match self {
            Self::Task(id) => json!([[id, null], null]),
            Self::Group { id, members } => {
                json!([
                    [id, null],
                    members.iter().map(Applied::as_tuple).collect::<Vec<_>>()
                ])
            }
        }
    }
}

/// Options a caller adds when applying (the parent relation, chain continuation, group membership).
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// The task that publishes this one.
    pub parent_id: Option<String>,
    /// The workflow's first task.
    pub root_id: Option<String>,
    /// Remaining chain steps (reversed: the next one last).
    pub chain: Option<Vec<Value>>,
    /// Group membership.
    pub group_id: Option<String>,
    /// Position in the group.
    pub group_index: Option<i64>,
    /// The chord body a header task carries.
    pub chord: Option<Value>,
    /// Inherited priority.
    pub priority: Option<u8>,
}

/// Applies signatures: publishes their messages through a broker (and sets chord sizes in the backend).
#[derive(Clone)]
pub struct Canvas {
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    default_queue: String,
    routes: HashMap<String, String>,
    origin: String,
    reply_to: String,
    /// Publish a `task-sent` event for every task (Celery's `task_send_sent_event`).
    sent_events: bool,
    clock: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Canvas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canvas")
            .field("default_queue", &self.default_queue)
            .finish()
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn parse(sig: &Value) -> Result<Signature, CanvasError> {
    serde_json::from_value(sig.clone()).map_err(|e| CanvasError::Invalid(format!("{e}: {sig}")))
}

fn tasks_of(s: &Signature, key: &str) -> Result<Vec<Value>, CanvasError> {
    let v = s.kwargs.get(key).or_else(|| s.args.first());
    match v {
        Some(Value::Array(items)) => Ok(items.clone()),
        Some(single @ Value::Object(_)) if key == "header" => {
            match single.get("subtask_type").and_then(Value::as_str) {
                Some("group") => Ok(single["kwargs"]["tasks"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()),
                _ => Ok(vec![single.clone()]),
            }
        }
        _ => Err(CanvasError::Invalid(format!("{} without {key}", s.task))),
    }
}

fn kind(v: &Value) -> Option<&str> {
    v.get("subtask_type").and_then(Value::as_str)
}

/// Gives every task of a canvas its id now (Celery's `freeze`) and returns the id of its result. A part
/// that is not a signature (not a JSON object) is left as it is, to be refused with a clear error when it is
/// applied; freezing never panics on what a client sent.
pub fn freeze(s: &mut Value) -> String {
    if s.is_null() {
        // As serde_json's indexing did: a missing part becomes a signature with an id.
        *s = json!({});
    }
    let Some(obj) = s.as_object_mut() else {
        return new_id();
    };
    if !obj.get("options").is_some_and(Value::is_object) {
        obj.insert("options".into(), json!({}));
    }
    let kind = obj
        .get("subtask_type")
        .and_then(Value::as_str)
        .map(str::to_string);
    let tasks = |obj: &mut Map<String, Value>| {
        obj.get_mut("kwargs")
            .and_then(|k| k.get_mut("tasks"))
            .and_then(Value::as_array_mut)
            .map(std::mem::take)
    };
    let own_id = |obj: &mut Map<String, Value>| {
        let options = obj
            .get_mut("options")
            .and_then(Value::as_object_mut)
            .expect("set above");
        let id = options
            .get("task_id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(new_id);
        options.insert("task_id".into(), json!(id));
        id
    };
    match kind.as_deref() {
        Some("chain") => {
            let mut last = String::new();
            if let Some(mut list) = tasks(obj) {
                for t in list.iter_mut() {
                    last = freeze(t);
                }
                obj["kwargs"]["tasks"] = Value::Array(list);
            }
            last
        }
        Some("group") => {
            let gid = own_id(obj);
            if let Some(mut list) = tasks(obj) {
                for t in list.iter_mut() {
                    freeze(t);
                }
                obj["kwargs"]["tasks"] = Value::Array(list);
            }
            gid
        }
        Some("chord") => match obj.get_mut("kwargs") {
            Some(Value::Object(k)) => freeze(k.entry("body").or_insert(Value::Null)),
            _ => new_id(),
        },
        _ => own_id(obj),
    }
}

/// Flattens nested chains and turns "a group followed by more steps" into a chord, as Celery does when a
/// chain is built.
fn upgrade_chain(tasks: Vec<Value>) -> Vec<Value> {
    let mut flat = Vec::new();
    for t in tasks {
        if kind(&t) == Some("chain") {
            flat.extend(upgrade_chain(
                t["kwargs"]["tasks"].as_array().cloned().unwrap_or_default(),
            ));
        } else {
            flat.push(t);
        }
    }
    if let Some(pos) = flat.iter().position(|t| kind(t) == Some("group"))
        && pos + 1 < flat.len()
    {
        let rest = flat.split_off(pos + 1);
        let header = flat.pop().expect("the group");
        let members = header["kwargs"]["tasks"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let body = if rest.len() == 1 {
            rest.into_iter().next().expect("one")
        } else {
            chain(rest)
        };
        let mut c = chord(members, body);
        c["options"] = header["options"].clone();
        flat.push(c);
    }
    flat
}

impl Canvas {
    /// A canvas publisher. `origin` is the publisher's node name (`gen<pid>@host` for workers and clients).
    pub fn new(
        broker: Arc<dyn Broker>,
        backend: Arc<dyn ResultBackend>,
        default_queue: impl Into<String>,
        routes: HashMap<String, String>,
        origin: impl Into<String>,
    ) -> Self {
        Self {
            broker,
            backend,
            default_queue: default_queue.into(),
            routes,
            origin: origin.into(),
            reply_to: new_id(),
            sent_events: false,
            clock: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Publishes a `task-sent` event after each task, as Celery clients do with `task_send_sent_event`.
    pub fn with_sent_events(mut self, on: bool) -> Self {
        self.sent_events = on;
        self
    }

    /// Celery's `task-sent` event for a message just published to `queue` (best effort, as Celery's).
    pub async fn sent_event(&self, msg: &TaskMessage, queue: &str) {
        use celeriac_protocol::event;
        let h = &msg.headers;
        let mut fields = serde_json::Map::new();
        for (k, v) in [
            ("uuid", json!(h.id)),
            ("root_id", json!(h.root_id)),
            ("parent_id", json!(h.parent_id)),
            ("name", json!(h.task)),
            ("args", json!(h.argsrepr)),
            ("kwargs", json!(h.kwargsrepr)),
            ("retries", json!(h.retries)),
            ("eta", json!(h.eta)),
            ("expires", json!(h.expires)),
            ("queue", json!(queue)),
            ("exchange", json!("")),
            ("routing_key", json!(queue)),
        ] {
            fields.insert(k.into(), v);
        }
        let header = event::EventHeader {
            hostname: &self.origin,
            utcoffset: 0.0,
            pid: std::process::id(),
            clock: self
                .clock
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1,
            timestamp: chrono::Utc::now().timestamp_micros() as f64 / 1e6,
        };
        let body = event::body(&header, "task-sent", &fields);
        let rk = event::routing_key("task-sent");
        let envelope = event::envelope(&body, &self.origin, &rk, &new_id());
        if let Err(e) = self.broker.publish_events(&[(rk, envelope)]).await {
            tracing::debug!(error = %e, "publishing a task-sent event failed");
        }
    }

    /// Applies a signature dict, `args` prepended to mutable signatures (a parent's result).
    pub async fn apply(
        &self,
        sig: &Value,
        args: &[Value],
        opts: ApplyOptions,
    ) -> Result<Applied, CanvasError> {
        let mut sig = sig.clone();
        freeze(&mut sig);
        self.apply_frozen(&sig, args, opts).await
    }

    fn apply_frozen<'a>(
        &'a self,
        sig: &'a Value,
        args: &'a [Value],
        opts: ApplyOptions,
    ) -> futures::future::BoxFuture<'a, Result<Applied, CanvasError>> {
        Box::pin(async move {
            let s = parse(sig)?;
            match s.subtask_type.as_deref() {
                None | Some("xmap") | Some("xstarmap") => self.apply_task(&s, args, opts).await,
                Some("chain") => self.apply_chain(&s, args, opts).await,
                Some("group") => self.apply_group(&s, args, opts).await,
                Some("chord") => self.apply_chord(&s, args, opts).await,
                Some("chunks") => {
                    // Celery's chunks: a group of starmaps over slices of the iterable.
                    let task = s.kwargs.get("task").cloned().unwrap_or(Value::Null);
                    let items = s
                        .kwargs
                        .get("it")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    let n = s
                        .kwargs
                        .get("n")
                        .and_then(Value::as_u64)
                        .unwrap_or(1)
                        .max(1) as usize;
                    let members = items
                        .chunks(n)
                        .map(|c| {
                            canvas_sig("celery.starmap", "xstarmap", json!({"task": task, "it": c}))
                        })
                        .collect();
                    let mut g = group(members);
                    g["options"] = json!(s.options);
                    freeze(&mut g);
                    self.apply_frozen(&g, args, opts).await
                }
                Some(other) => Err(CanvasError::Invalid(format!(
                    "unsupported canvas type {other:?}"
                ))),
            }
        })
    }

    async fn apply_task(
        &self,
        s: &Signature,
        prepend: &[Value],
        opts: ApplyOptions,
    ) -> Result<Applied, CanvasError> {
        let o = &s.options;
        let str_opt = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
        let id = str_opt("task_id").unwrap_or_else(new_id);
        let args = if s.immutable {
            s.args.clone()
        } else {
            prepend.iter().chain(&s.args).cloned().collect()
        };
        let mut msg = TaskMessage::new(&s.task, id.clone(), args, s.kwargs.clone());
        let h = &mut msg.headers;
        h.origin = Some(self.origin.clone());
        h.parent_id = opts.parent_id.clone();
        h.root_id = Some(opts.root_id.clone().unwrap_or_else(|| id.clone()));
        h.group = opts.group_id.clone().or_else(|| str_opt("group_id"));
        h.group_index = opts
            .group_index
            .or_else(|| o.get("group_index").and_then(Value::as_i64));
        h.shadow = str_opt("shadow");
        // Celery's `headers`, `argsrepr` and `kwargsrepr` publishing options.
        if let Some(Value::Object(extra)) = o.get("headers") {
            for (k, v) in extra {
                h.extra.insert(k.clone(), v.clone());
            }
        }
        if let Some(r) = str_opt("argsrepr") {
            h.argsrepr = Some(r);
        }
        if let Some(r) = str_opt("kwargsrepr") {
            h.kwargsrepr = Some(r);
        }
        let now = chrono::Utc::now();
        if let Some(c) = o.get("countdown").and_then(Value::as_f64) {
            h.eta = Some(time::isoformat(
                now + chrono::Duration::microseconds((c * 1e6) as i64),
            ));
        }
        if let Some(e) = str_opt("eta") {
            h.eta = Some(e);
        }
        match o.get("expires") {
            Some(Value::Number(n)) => {
                let secs = n.as_f64().unwrap_or_default();
                h.expires = Some(time::isoformat(
                    now + chrono::Duration::microseconds((secs * 1e6) as i64),
                ));
                msg.properties.expiration = Some(((secs.max(0.0) * 1000.0) as u64).to_string());
            }
            Some(Value::String(e)) => h.expires = Some(e.clone()),
            _ => {}
        }
        if o.contains_key("time_limit") || o.contains_key("soft_time_limit") {
            h.timelimit = [
                o.get("time_limit").cloned().unwrap_or(Value::Null),
                o.get("soft_time_limit").cloned().unwrap_or(Value::Null),
            ];
        }
        if let Some(p) = opts.priority.or_else(|| {
            o.get("priority")
                .and_then(Value::as_u64)
                .map(|p| p.min(255) as u8)
        }) {
            msg.properties.priority = p;
        }
        msg.properties.reply_to =
            Some(str_opt("reply_to").unwrap_or_else(|| self.reply_to.clone()));
        let as_list = |v: Option<&Value>| match v {
            Some(Value::Array(a)) if !a.is_empty() => Some(a.clone()),
            Some(d @ Value::Object(_)) => Some(vec![d.clone()]),
            _ => None,
        };
        msg.embed.callbacks = as_list(o.get("link"));
        msg.embed.errbacks = as_list(o.get("link_error"));
        msg.embed.chain = opts.chain.clone().or_else(|| as_list(o.get("chain")));
        msg.embed.chord = opts
            .chord
            .clone()
            .or_else(|| o.get("chord").cloned().filter(|c| !c.is_null()));
        let queue = str_opt("queue")
            .or_else(|| str_opt("routing_key"))
            .or_else(|| self.routes.get(&s.task).cloned())
            .unwrap_or_else(|| self.default_queue.clone());
        trace::inject(&mut msg.headers.extra);
        self.broker.publish(&msg, &queue).await?;
        if self.sent_events {
            self.sent_event(&msg, &queue).await;
        }
        Ok(Applied::Task(id))
    }

    async fn apply_chain(
        &self,
        s: &Signature,
        prepend: &[Value],
        opts: ApplyOptions,
    ) -> Result<Applied, CanvasError> {
        let mut tasks = upgrade_chain(tasks_of(s, "tasks")?);
        if tasks.is_empty() {
            return Err(CanvasError::Invalid("empty chain".into()));
        }
        for t in tasks.iter_mut() {
            freeze(t);
        }
        let last_id = {
            let mut last = tasks.last().cloned().expect("non-empty");
            freeze(&mut last)
        };
        let first = tasks.remove(0);
        tasks.reverse();
        let mut rest = tasks;
        if let Some(outer) = &opts.chain {
            // Applying a chain as a step of another chain: its steps come first.
            rest.splice(0..0, outer.iter().cloned());
        }
        let applied = self
            .apply_frozen(
                &first,
                prepend,
                ApplyOptions {
                    chain: (!rest.is_empty()).then_some(rest),
                    ..opts
                },
            )
            .await?;
        let _ = applied;
        Ok(Applied::Task(last_id))
    }

    async fn apply_group(
        &self,
        s: &Signature,
        prepend: &[Value],
        opts: ApplyOptions,
    ) -> Result<Applied, CanvasError> {
        let gid = s
            .options
            .get("task_id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(new_id);
        let tasks = tasks_of(s, "tasks")?;
        let mut members = Vec::with_capacity(tasks.len());
        for (i, t) in tasks.iter().enumerate() {
            let member_opts = ApplyOptions {
                group_id: Some(gid.clone()),
                group_index: Some(i as i64),
                chain: None,
                ..opts.clone()
            };
            members.push(self.apply_frozen(t, prepend, member_opts).await?);
        }
        Ok(Applied::Group { id: gid, members })
    }

    async fn apply_chord(
        &self,
        s: &Signature,
        prepend: &[Value],
        opts: ApplyOptions,
    ) -> Result<Applied, CanvasError> {
        let header_sig = s.kwargs.get("header").cloned().unwrap_or(Value::Null);
        let header = tasks_of(s, "header")?;
        let gid = header_sig
            .pointer("/options/task_id")
            .and_then(Value::as_str)
            .or_else(|| s.options.get("task_id").and_then(Value::as_str))
            .map(str::to_string)
            .unwrap_or_else(new_id);
        let mut body = s
            .kwargs
            .get("body")
            .cloned()
            .ok_or_else(|| CanvasError::Invalid("chord without body".into()))?;
        let body_id = freeze(&mut body);
        body["options"]["group_id"] = json!(gid);
        if body["options"].get("reply_to").is_none() {
            body["options"]["reply_to"] = json!(self.reply_to);
        }
        if let Some(rest) = &opts.chain {
            // Steps after the chord continue from its body.
            body["options"]["chain"] = json!(rest);
        }
        if header.is_empty() {
            self.apply_frozen(
                &body,
                &[json!([])],
                ApplyOptions {
                    chain: None,
                    ..opts
                },
            )
            .await?;
            return Ok(Applied::Task(body_id));
        }
        let n = header.len();
        for (i, t) in header.iter().enumerate() {
            if i + 1 == n {
                // 5.7 clients record the header size just before the last header task.
                self.backend.set_chord_size(&gid, n).await?;
            }
            let member_opts = ApplyOptions {
                group_id: Some(gid.clone()),
                group_index: Some(i as i64),
                chord: Some(body.clone()),
                chain: None,
                ..opts.clone()
            };
            self.apply_frozen(t, prepend, member_opts).await?;
        }
        Ok(Applied::Task(body_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freezing_what_is_not_a_signature_does_not_panic() {
        // Found by the fuzz smoke: a number where a step or the options belong used to panic.
        let mut c =
            json!({"subtask_type": "chain", "kwargs": {"tasks": [1, "x", null]}, "options": 3});
        let last = freeze(&mut c);
        assert_eq!(c["kwargs"]["tasks"][0], json!(1));
        assert_eq!(c["kwargs"]["tasks"][2]["options"]["task_id"], json!(last));
        let mut g = json!({"subtask_type": "group", "kwargs": 5});
        let gid = freeze(&mut g);
        assert_eq!(g["options"]["task_id"], json!(gid));
        let mut n = json!(7);
        freeze(&mut n);
        assert_eq!(n, json!(7));
    }

    #[test]
    fn builders_make_celery_dicts() {
        let c = chain(vec![
            sig("bench.add", [json!(2), json!(2)]),
            immutable(sig("bench.mul", [json!(3), json!(3)])),
        ]);
        assert_eq!(c["subtask_type"], json!("chain"));
        assert_eq!(c["kwargs"]["tasks"][1]["immutable"], json!(true));
        assert_eq!(
            celeriac_protocol::json::to_string(&sig("t", [json!(1)])),
            r#"{"task": "t", "args": [1], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false}"#
        );
    }

    #[test]
    fn freeze_assigns_ids_and_returns_the_result_id() {
        let mut c = chain(vec![sig("a", []), sig("b", [])]);
        let id = freeze(&mut c);
        assert_eq!(c["kwargs"]["tasks"][1]["options"]["task_id"], json!(id));
        assert!(c["kwargs"]["tasks"][0]["options"]["task_id"].is_string());
        let mut g = with_option(group(vec![sig("a", [])]), "task_id", json!("g1"));
        assert_eq!(freeze(&mut g), "g1");
        let mut ch = chord(
            vec![sig("a", [])],
            with_option(sig("b", []), "task_id", json!("body")),
        );
        assert_eq!(freeze(&mut ch), "body");
    }

    #[test]
    fn group_then_task_in_a_chain_becomes_a_chord() {
        let tasks = upgrade_chain(vec![
            sig("first", []),
            group(vec![sig("a", []), sig("b", [])]),
            sig("sum", []),
            sig("after", []),
        ]);
        assert_eq!(tasks.len(), 2);
        assert_eq!(tasks[1]["subtask_type"], json!("chord"));
        assert_eq!(
            tasks[1]["kwargs"]["header"]["kwargs"]["tasks"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert_eq!(tasks[1]["kwargs"]["body"]["subtask_type"], json!("chain"));
    }

    #[test]
    fn result_tuples_match_celery() {
        let a = Applied::Group {
            id: "g".into(),
            members: vec![Applied::Task("t1".into())],
        };
        assert_eq!(a.as_tuple(), json!([["g", null], [[["t1", null], null]]]));
    }
}

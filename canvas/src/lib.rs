//! Celery canvases from Rust: build signatures, chains, groups and chords as the dicts Celery uses, and
//! apply them, publishing the same messages a Python client would, so Python and celeriac workers both run
//! them. The worker uses the same code to publish callbacks, the next chain step and chord bodies.
//!
//! # Layout
//! - [`sig`] and friends: builders for signature dicts (`sig("bench.add", [2, 2])`, [`chain`], [`group`],
//!   [`chord`], [`immutable`], [`with_option`]).
//! - [`Canvas`]: applies any signature dict (task, chain, group, chord, chunks, xmap, xstarmap); its
//!   publishing is in `apply`.
//! - [`Applied`]: what was published, with Celery's result tuples (`children`).

mod apply;
pub mod trace;

use celeriac_backend::{BackendError, ResultBackend};
use celeriac_broker::BrokerError;
use celeriac_broker::prelude::*;
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

//! Task states, exceptions as Python rebuilds them, and the result meta a backend stores
//! (`{"status", "result", "traceback", "children", "date_done", [group_id], [parent_id], [extended...], "task_id"}`).

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value, json};

/// Celery task states (custom states such as `PROGRESS` are `Custom`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Never stored: a missing key means pending.
    Pending,
    /// Received by a worker.
    Received,
    /// Started (`task_track_started`).
    Started,
    /// Ready: returned a value.
    Success,
    /// Ready: raised.
    Failure,
    /// Will be retried.
    Retry,
    /// Ready: revoked or expired.
    Revoked,
    /// Rejected.
    Rejected,
    /// A custom state (`update_state(state='PROGRESS')`).
    Custom(String),
}

impl State {
    /// The wire name.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Pending => "PENDING",
            Self::Received => "RECEIVED",
            Self::Started => "STARTED",
            Self::Success => "SUCCESS",
            Self::Failure => "FAILURE",
            Self::Retry => "RETRY",
            Self::Revoked => "REVOKED",
            Self::Rejected => "REJECTED",
            Self::Custom(s) => s,
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Self {
        match s {
            "PENDING" => Self::Pending,
            "RECEIVED" => Self::Received,
            "STARTED" => Self::Started,
            "SUCCESS" => Self::Success,
            "FAILURE" => Self::Failure,
            "RETRY" => Self::Retry,
            "REVOKED" => Self::Revoked,
            "REJECTED" => Self::Rejected,
            other => Self::Custom(other.to_string()),
        }
    }

    /// Celery's `states.precedence`: the index in `PRECEDENCE` (lower = later in a task's life); a custom
    /// state sits where Celery puts unknown ones (`None`, between FAILURE and REVOKED).
    pub fn precedence(&self) -> usize {
        match self {
            Self::Success => 0,
            Self::Failure => 1,
            Self::Custom(_) => 2,
            Self::Revoked => 3,
            Self::Started => 4,
            Self::Received => 5,
            Self::Rejected => 6,
            Self::Retry => 7,
            Self::Pending => 8,
        }
    }

    /// SUCCESS, FAILURE, REVOKED: `date_done` is set and waiting clients stop.
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Success | Self::Failure | Self::Revoked)
    }
}

/// An exception as Celery's json result serializer writes it; Python imports `exc_module`, looks up
/// `exc_type` and raises `cls(*exc_message)`, synthesizing a class when the module is unknown.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ExceptionInfo {
    /// Class `__qualname__`, e.g. `ValueError`.
    pub exc_type: String,
    /// `exc.args`.
    pub exc_message: Vec<Value>,
    /// Class `__module__`, e.g. `builtins`; `None` makes Python synthesize the class.
    pub exc_module: Option<String>,
}

impl ExceptionInfo {
    /// An exception of a Python class with one message argument.
    pub fn new(module: &str, exc_type: &str, message: impl Into<String>) -> Self {
        Self {
            exc_type: exc_type.into(),
            exc_message: vec![Value::String(message.into())],
            exc_module: Some(module.into()),
        }
    }

    /// The Python `repr()` Celery shows in events and logs: `ValueError('boom')`.
    pub fn repr(&self) -> String {
        format!(
            "{}{}",
            self.exc_type,
            crate::repr::args_repr(&self.exc_message).replace(",)", ")")
        )
    }

    /// A Python-style traceback text for the `traceback` field.
    pub fn traceback(&self, task: &str) -> String {
        let module = self.exc_module.as_deref().filter(|m| *m != "builtins");
        let name = match module {
            Some(m) => format!("{m}.{}", self.exc_type),
            None => self.exc_type.clone(),
        };
        let msg: Vec<String> = self
            .exc_message
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect();
        format!(
            "Traceback (most recent call last):\n  celeriac task {task:?}\n{name}: {}\n",
            msg.join(", ")
        )
    }
}

/// What the worker stores for one task.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultMeta {
    /// Task id.
    pub task_id: String,
    /// State.
    pub status: State,
    /// Return value, exception dict or custom meta.
    pub result: Value,
    /// Python traceback text.
    pub traceback: Option<String>,
    /// Result tuples of tasks this task published; `None` writes `null`.
    pub children: Option<Vec<Value>>,
    /// ISO `date_done` (ready states only).
    pub date_done: Option<String>,
    /// The request's group id.
    pub group_id: Option<String>,
    /// The request's parent id.
    pub parent_id: Option<String>,
    /// `result_extended` fields (`name`, `args`, `kwargs`, `worker`, `retries`, `queue`), in order.
    pub extended: Option<Map<String, Value>>,
    /// The request's `reply_to` (not stored: the `rpc://` backend sends the meta to this queue).
    pub reply_to: Option<String>,
}

impl ResultMeta {
    /// A meta with the common defaults (`children: []`, nothing else).
    pub fn new(task_id: impl Into<String>, status: State, result: Value) -> Self {
        Self {
            task_id: task_id.into(),
            status,
            result,
            traceback: None,
            children: Some(Vec::new()),
            date_done: None,
            group_id: None,
            parent_id: None,
            extended: None,
            reply_to: None,
        }
    }

    /// A FAILURE meta for an exception.
    pub fn failure(
        task_id: impl Into<String>,
        exc: &ExceptionInfo,
        traceback: Option<String>,
    ) -> Self {
        let mut m = Self::new(task_id, State::Failure, json!(exc));
        m.traceback = traceback;
        m
    }

    /// The JSON Celery stores, byte-compatible.
    pub fn to_json(&self) -> Vec<u8> {
        crate::json::to_vec(self)
    }
}

impl Serialize for ResultMeta {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("status", self.status.as_str())?;
        m.serialize_entry("result", &self.result)?;
        m.serialize_entry("traceback", &self.traceback)?;
        m.serialize_entry("children", &self.children)?;
        m.serialize_entry("date_done", &self.date_done)?;
        if let Some(g) = &self.group_id {
            m.serialize_entry("group_id", g)?;
        }
        if let Some(p) = &self.parent_id {
            m.serialize_entry("parent_id", p)?;
        }
        if let Some(ext) = &self.extended {
            for (k, v) in ext {
                m.serialize_entry(k, v)?;
            }
        }
        m.serialize_entry("task_id", &self.task_id)?;
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_order_as_celerys_precedence() {
        let order = [
            "SUCCESS", "FAILURE", "PROGRESS", "REVOKED", "STARTED", "RECEIVED", "REJECTED",
            "RETRY", "PENDING",
        ];
        for (i, s) in order.iter().enumerate() {
            assert_eq!(State::parse(s).precedence(), i, "{s}");
            assert_eq!(State::parse(s).as_str(), *s);
        }
    }

    #[test]
    fn success_meta_bytes_match_capture() {
        let mut m = ResultMeta::new(
            "fc5ef3d7-36f4-4d5c-8b4d-e8ea13c72231",
            State::Success,
            json!(5),
        );
        m.date_done = Some("2026-11-21T04:17:15.930178+00:00".into());
        assert_eq!(
            String::from_utf8(m.to_json()).unwrap(),
            r#"{"status": "SUCCESS", "result": 5, "traceback": null, "children": [], "date_done": "2026-11-21T04:17:15.930178+00:00", "task_id": "fc5ef3d7-36f4-4d5c-8b4d-e8ea13c72231"}"#
        );
    }

    #[test]
    fn failure_meta_with_group_and_parent() {
        let exc = ExceptionInfo::new("builtins", "ValueError", "boom");
        let mut m = ResultMeta::failure("t", &exc, None);
        m.group_id = Some("g".into());
        m.parent_id = Some("p".into());
        assert_eq!(
            String::from_utf8(m.to_json()).unwrap(),
            r#"{"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"}, "traceback": null, "children": [], "date_done": null, "group_id": "g", "parent_id": "p", "task_id": "t"}"#
        );
        assert_eq!(exc.repr(), "ValueError('boom')");
    }
}

//! Canvas signatures as Celery serializes them into `embed` and options: a dict with the keys `task`, `args`,
//! `kwargs`, `options`, `subtask_type`, `immutable`, in that order.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One signature (`add.s(2, 2)`), or a canvas type when `subtask_type` is set (`chain`, `group`, `chord`,
/// `chunks`, `xmap`, `xstarmap`; the nested structure then lives in `kwargs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    /// Registered task name.
    pub task: String,
    /// Positional arguments.
    #[serde(default)]
    pub args: Vec<Value>,
    /// Keyword arguments.
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// Publishing options (`task_id`, `queue`, `priority`, `link`, ...).
    #[serde(default)]
    pub options: Map<String, Value>,
    /// `null` for a plain task signature, else the canvas type.
    #[serde(default)]
    pub subtask_type: Option<String>,
    /// `.si()`: the parent's result is not prepended.
    #[serde(default)]
    pub immutable: bool,
}

impl Signature {
    /// A plain mutable signature with no options.
    pub fn new(task: impl Into<String>, args: Vec<Value>) -> Self {
        Self {
            task: task.into(),
            args,
            kwargs: Map::new(),
            options: Map::new(),
            subtask_type: None,
            immutable: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_matches_celery() {
        let s = Signature::new("tasks.mul", vec![json!(10)]);
        assert_eq!(
            crate::json::to_string(&s),
            r#"{"task": "tasks.mul", "args": [10], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false}"#
        );
    }
}

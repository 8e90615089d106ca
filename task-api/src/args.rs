//! Helpers for checking task arguments the way a Python task would, with errors that read as Celery's.

use crate::TaskError;
use serde_json::Value;

/// Python's name for the type a JSON value decodes to (`type(v).__name__`).
pub fn python_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// An id argument (a customer, a product, an event) given as a string or an integer: trimmed, 1 to 256
/// characters; otherwise `ValueError` naming the argument.
pub fn id_arg(name: &str, v: &Value) -> Result<String, TaskError> {
    let s = match v {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        other => {
            return Err(TaskError::value_error(format!(
                "{name}: expected a string or an integer id, got {}",
                python_type_name(other)
            )));
        }
    };
    if s.is_empty() || s.len() > 256 {
        return Err(TaskError::value_error(format!(
            "{name}: expected 1 to 256 characters"
        )));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_are_strings_or_integers_of_1_to_256_characters() {
        assert_eq!(id_arg("p", &json!(" a1 ")).unwrap(), "a1");
        assert_eq!(id_arg("p", &json!(1001)).unwrap(), "1001");
        let err = |v: Value| match id_arg("product_id", &v) {
            Err(TaskError::Failed(e)) => e.exc_message[0].as_str().unwrap_or_default().to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            err(json!(1.5)),
            "product_id: expected a string or an integer id, got float"
        );
        assert_eq!(
            err(json!(null)),
            "product_id: expected a string or an integer id, got NoneType"
        );
        assert_eq!(err(json!(" ")), "product_id: expected 1 to 256 characters");
        assert_eq!(
            err(json!("x".repeat(257))),
            "product_id: expected 1 to 256 characters"
        );
    }
}

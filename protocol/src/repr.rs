//! Python's `repr()` of JSON values, as Celery's `saferepr` writes the `argsrepr` and `kwargsrepr` headers
//! (`(2, 3)`, `('boom',)`, `{'k': [1, 2], 'u': 'ü'}`), truncated like Celery at 1024 characters.

use crate::json::py_float_repr;
use serde_json::{Map, Value};
use std::fmt::Write;

/// Celery's default `argsrepr_maxsize` / `kwargsrepr_maxsize`.
pub const MAX_REPR: usize = 1024;

/// `repr(tuple(args))`: `()`, `(1,)`, `(1, 2)`.
pub fn args_repr(args: &[Value]) -> String {
    let mut out = String::from("(");
    for (i, v) in args.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        value_repr(&mut out, v);
    }
    if args.len() == 1 {
        out.push(',');
    }
    out.push(')');
    truncate(out)
}

/// `repr(kwargs)`: `{}`, `{'k': 1}`.
pub fn kwargs_repr(kwargs: &Map<String, Value>) -> String {
    let mut out = String::new();
    map_repr(&mut out, kwargs);
    truncate(out)
}

/// `repr(value)` for any JSON value (`None`, `True`, lists, dicts with quoted keys).
pub fn repr(value: &Value) -> String {
    let mut out = String::new();
    value_repr(&mut out, value);
    out
}

fn truncate(mut s: String) -> String {
    if s.chars().count() > MAX_REPR {
        s = s.chars().take(MAX_REPR).collect();
        s.push_str("...");
    }
    s
}

fn map_repr(out: &mut String, map: &Map<String, Value>) {
    out.push('{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        str_repr(out, k);
        out.push_str(": ");
        value_repr(out, v);
    }
    out.push('}');
}

fn value_repr(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => {
                let _ = write!(out, "{i}");
            }
            (None, Some(u), _) => {
                let _ = write!(out, "{u}");
            }
            (None, None, Some(f)) => out.push_str(&py_float_repr(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => str_repr(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                value_repr(out, v);
            }
            out.push(']');
        }
        Value::Object(map) => map_repr(out, map),
    }
}

/// Python's string repr: single quotes unless the text has `'` and no `"`; printable non-ASCII kept.
fn str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn args_tuple_forms() {
        assert_eq!(args_repr(&[]), "()");
        assert_eq!(args_repr(&[json!("boom")]), "('boom',)");
        assert_eq!(args_repr(&[json!(2), json!(3)]), "(2, 3)");
        assert_eq!(
            args_repr(&[json!(null), json!(true), json!(1.5)]),
            "(None, True, 1.5)"
        );
    }

    #[test]
    fn kwargs_as_python_dict() {
        let kw = json!({"k": [1, 2], "u": "ü"});
        assert_eq!(
            kwargs_repr(kw.as_object().unwrap()),
            "{'k': [1, 2], 'u': 'ü'}"
        );
        let kw = json!({"q": "it's", "d": "say \"hi\" it's", "n": "a\nb\\"});
        assert_eq!(
            kwargs_repr(kw.as_object().unwrap()),
            r#"{'q': "it's", 'd': 'say "hi" it\'s', 'n': 'a\nb\\'}"#
        );
    }

    #[test]
    fn long_reprs_are_truncated() {
        let long = json!("x".repeat(2000));
        let r = args_repr(&[long]);
        assert_eq!(r.chars().count(), MAX_REPR + 3);
        assert!(r.ends_with("..."));
    }
}

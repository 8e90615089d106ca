//! Which workers a remote-control request (kombu's pidbox) is for: its `destination` list, else its
//! `pattern` (kombu's default `glob` matcher: `*` any run, `?` one character), else every worker.

use serde_json::Value;

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

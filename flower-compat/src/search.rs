//! Flower 2.2's task search language (`flower/utils/search.py`), parsed here and evaluated by the database:
//! terms are case-insensitive substrings of all fields (`uuid`, `name`, `state`, `worker`, `args`, `kwargs`,
//! `result`) or of one (`name:`, `worker:`, `args:`, `kwargs:`, `result:`); `state:X` and `kwargs:k=v` are
//! exact; terms combine with implicit or explicit `AND`, `OR` and parentheses; `"quoted phrases"` keep spaces.
//! Substring terms need at least 3 characters. Errors carry Flower's messages and positions.

use std::fmt;

/// Fields a term may name.
const FIELDS: [&str; 6] = ["name", "state", "worker", "args", "kwargs", "result"];
const MIN_SUBSTRING: usize = 3;
const MAX_LENGTH: usize = 2048;
const MAX_TOKENS: usize = 128;
const MAX_DEPTH: usize = 5;

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// Everything matches (empty query).
    All,
    /// One term: `field` (`None`: any field) and its casefolded value.
    Term {
        /// Field name, or none for all fields.
        field: Option<String>,
        /// Casefolded value.
        value: String,
    },
    /// All children match.
    And(Vec<Query>),
    /// Any child matches.
    Or(Vec<Query>),
}

/// Flower's `QuerySyntaxError`: `message` and where.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    message: String,
    position: Option<usize>,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(p) => write!(f, "{} at position {p}.", self.message),
            None => write!(f, "{}.", self.message),
        }
    }
}

fn err(message: impl Into<String>, position: Option<usize>) -> SyntaxError {
    SyntaxError {
        message: message.into(),
        position,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    LParen,
    RParen,
    And,
    Or,
    Term,
    Eof,
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    value: String,
    position: usize,
}

fn tokenize(q: &[char]) -> Result<Vec<Token>, SyntaxError> {
    let mut tokens = Vec::new();
    let mut i = 0;
    let push = |tokens: &mut Vec<Token>, kind, value: String, position| {
        tokens.push(Token {
            kind,
            value,
            position,
        });
        if tokens.len() > MAX_TOKENS {
            return Err(err(format!("Query exceeds {MAX_TOKENS} tokens"), None));
        }
        Ok(())
    };
    while i < q.len() {
        if q[i].is_whitespace() {
            i += 1;
            continue;
        }
        let position = i;
        if q[i] == '(' || q[i] == ')' {
            let kind = if q[i] == '(' {
                Kind::LParen
            } else {
                Kind::RParen
            };
            push(&mut tokens, kind, q[i].to_string(), position)?;
            i += 1;
            continue;
        }
        let (mut value, mut quoted, mut in_quote) = (String::new(), false, false);
        while i < q.len() {
            let c = q[i];
            if c == '\\' && i + 1 < q.len() && (q[i + 1] == '"' || q[i + 1] == '\\') {
                value.push(q[i + 1]);
                i += 2;
                continue;
            }
            if c == '"' {
                quoted = true;
                in_quote = !in_quote;
                i += 1;
                continue;
            }
            if !in_quote && (c.is_whitespace() || c == '(' || c == ')') {
                break;
            }
            value.push(c);
            i += 1;
        }
        if in_quote {
            return Err(err("Unterminated quoted phrase", Some(position)));
        }
        if value.is_empty() {
            return Err(err("Empty search term", Some(position)));
        }
        let kind = match value.as_str() {
            "AND" if !quoted => Kind::And,
            "OR" if !quoted => Kind::Or,
            "NOT" if !quoted => return Err(err("NOT is not supported", Some(position))),
            _ => Kind::Term,
        };
        push(&mut tokens, kind, value, position)?;
    }
    tokens.push(Token {
        kind: Kind::Eof,
        value: String::new(),
        position: q.len(),
    });
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    i: usize,
}

impl Parser {
    fn current(&self) -> &Token {
        &self.tokens[self.i]
    }

    fn parse_or(&mut self, depth: usize) -> Result<Query, SyntaxError> {
        let mut children = vec![self.parse_and(depth)?];
        while self.current().kind == Kind::Or {
            let op = self.current().position;
            self.i += 1;
            if matches!(
                self.current().kind,
                Kind::Eof | Kind::RParen | Kind::And | Kind::Or
            ) {
                return Err(err("OR must be followed by a search term", Some(op)));
            }
            children.push(self.parse_and(depth)?);
        }
        Ok(combine(children, true))
    }

    fn parse_and(&mut self, depth: usize) -> Result<Query, SyntaxError> {
        let mut children = vec![self.parse_primary(depth)?];
        while !matches!(self.current().kind, Kind::Eof | Kind::RParen | Kind::Or) {
            if self.current().kind == Kind::And {
                let op = self.current().position;
                self.i += 1;
                if matches!(
                    self.current().kind,
                    Kind::Eof | Kind::RParen | Kind::And | Kind::Or
                ) {
                    return Err(err("AND must be followed by a search term", Some(op)));
                }
            }
            children.push(self.parse_primary(depth)?);
        }
        Ok(combine(children, false))
    }

    fn parse_primary(&mut self, depth: usize) -> Result<Query, SyntaxError> {
        let token = self.current().clone();
        if token.kind == Kind::LParen {
            if depth >= MAX_DEPTH {
                return Err(err(
                    format!("Query exceeds maximum nesting depth of {MAX_DEPTH}"),
                    Some(token.position),
                ));
            }
            self.i += 1;
            if self.current().kind == Kind::RParen {
                return Err(err("Empty group", Some(token.position)));
            }
            let e = self.parse_or(depth + 1)?;
            if self.current().kind != Kind::RParen {
                return Err(err("Missing closing parenthesis", Some(token.position)));
            }
            self.i += 1;
            return Ok(e);
        }
        if token.kind != Kind::Term {
            return Err(err("Expected a search term", Some(token.position)));
        }
        self.i += 1;
        parse_term(&token)
    }
}

fn combine(children: Vec<Query>, or: bool) -> Query {
    let mut flat: Vec<Query> = Vec::new();
    for child in children {
        let inner = match child {
            Query::Or(c) if or => c,
            Query::And(c) if !or => c,
            other => vec![other],
        };
        for c in inner {
            if !flat.contains(&c) {
                flat.push(c);
            }
        }
    }
    if flat.len() == 1 {
        return flat.pop().expect("one");
    }
    if or {
        Query::Or(flat)
    } else {
        Query::And(flat)
    }
}

fn parse_term(token: &Token) -> Result<Query, SyntaxError> {
    let mut field = None;
    let mut value = token.value.clone();
    if let Some((f, v)) = value.split_once(':') {
        let f = f.to_lowercase();
        if FIELDS.contains(&f.as_str()) {
            field = Some(f);
            value = v.to_string();
        }
    }
    if field.is_none() && value.starts_with('-') {
        return Err(err(
            "Negation with '-' is not supported",
            Some(token.position),
        ));
    }
    if value.is_empty() {
        return Err(err(
            "Search qualifier requires a value",
            Some(token.position),
        ));
    }
    let exact = field.as_deref() == Some("state")
        || (field.as_deref() == Some("kwargs") && value.contains('='));
    if !exact && value.trim().chars().count() < MIN_SUBSTRING {
        return Err(err(
            format!("Substring search terms must contain at least {MIN_SUBSTRING} characters"),
            Some(token.position),
        ));
    }
    Ok(Query::Term {
        field,
        value: value.to_lowercase(),
    })
}

/// Parses a search string.
pub fn parse(raw: &str) -> Result<Query, SyntaxError> {
    let q = raw.trim();
    if q.chars().count() > MAX_LENGTH {
        return Err(err(format!("Query exceeds {MAX_LENGTH} characters"), None));
    }
    let chars: Vec<char> = q.chars().collect();
    let mut p = Parser {
        tokens: tokenize(&chars)?,
        i: 0,
    };
    if p.current().kind == Kind::Eof {
        return Ok(Query::All);
    }
    let e = p.parse_or(0)?;
    if p.current().kind != Kind::Eof {
        let t = p.current();
        return Err(err(format!("Unexpected '{}'", t.value), Some(t.position)));
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn term(field: Option<&str>, value: &str) -> Query {
        Query::Term {
            field: field.map(str::to_string),
            value: value.into(),
        }
    }

    #[test]
    fn flower_queries() {
        assert_eq!(parse("").unwrap(), Query::All);
        assert_eq!(
            parse("state:FAILURE").unwrap(),
            term(Some("state"), "failure")
        );
        assert_eq!(
            parse("bench.fail OR state:REVOKED").unwrap(),
            Query::Or(vec![
                term(None, "bench.fail"),
                term(Some("state"), "revoked")
            ])
        );
        assert_eq!(
            parse(r#"args:"(1, 10)" Bench.Add"#).unwrap(),
            Query::And(vec![term(Some("args"), "(1, 10)"), term(None, "bench.add")])
        );
        assert_eq!(parse("kwargs:x=5").unwrap(), term(Some("kwargs"), "x=5"));
        assert_eq!(
            parse("(abc OR def) AND ghi").unwrap(),
            Query::And(vec![
                Query::Or(vec![term(None, "abc"), term(None, "def")]),
                term(None, "ghi")
            ])
        );
    }

    #[test]
    fn flower_errors() {
        assert_eq!(
            parse("ab").unwrap_err().to_string(),
            "Substring search terms must contain at least 3 characters at position 0."
        );
        assert_eq!(
            parse(r#"name:"abc"#).unwrap_err().to_string(),
            "Unterminated quoted phrase at position 0."
        );
        assert_eq!(
            parse("abc OR").unwrap_err().to_string(),
            "OR must be followed by a search term at position 4."
        );
        assert_eq!(
            parse("NOT abc").unwrap_err().to_string(),
            "NOT is not supported at position 0."
        );
        assert_eq!(
            parse("abc )").unwrap_err().to_string(),
            "Unexpected ')' at position 4."
        );
    }
}

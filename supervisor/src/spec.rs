//! The stack file: which services run, with which command, after which others are healthy.
//!
//! ```toml
//! [vars]                      # ${name} in commands, env and health; --var name=value overrides
//! python = "python3"
//!
//! [env]                       # every service's environment (a service's own env wins)
//! CELERIAC_DATABASE_SCHEMA = "${schema}"
//!
//! [services.migrate]
//! command = ["${celeriac}", "migrate", "up"]
//! oneshot = true              # must exit 0 before its dependents start
//!
//! [services.email]
//! command = ["${celeriac}", "worker", "-Q", "email", "--metrics-addr", "127.0.0.1:9091"]
//! depends_on = ["migrate"]
//! health = { http = "http://127.0.0.1:9091/health" }
//!
//! [services.prometheus]
//! command = ["prometheus", "--config.file=compose/prometheus.yml"]
//! optional = "apt-get install prometheus"   # skipped, with this hint, when the program is missing
//! ```
//!
//! `${celeriac}` is this binary; a `${NAME}` that is neither a var nor given is read from the environment.

use crate::SupervisorError;
use indexmap::IndexMap;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

/// How a service shows that it is ready.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Health {
    /// An HTTP GET answered 2xx.
    Http(String),
    /// A TCP connection accepted.
    Tcp(String),
}

/// One service as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    depends_on: Vec<String>,
    #[serde(default)]
    health: Option<Health>,
    #[serde(default)]
    oneshot: bool,
    #[serde(default)]
    optional: Option<String>,
    #[serde(default)]
    ready_timeout: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StackFile {
    #[serde(default)]
    vars: BTreeMap<String, String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    services: IndexMap<String, ServiceFile>,
}

/// One service, variables substituted.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// Its name (the log prefix).
    pub name: String,
    /// Program and arguments.
    pub command: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Services that must be ready (or, for one-shots, done) first.
    pub depends_on: Vec<String>,
    /// How it shows readiness; none: ready once started.
    pub health: Option<Health>,
    /// Runs once and must exit 0; never restarted.
    pub oneshot: bool,
    /// When set and the program is missing: skipped, with this hint.
    pub optional: Option<String>,
    /// How long it may take to become ready (or, for one-shots, to finish).
    pub ready_timeout: Duration,
}

/// A validated stack.
#[derive(Debug, Clone, PartialEq)]
pub struct Stack {
    /// The services.
    pub services: Vec<Service>,
}

impl Stack {
    /// Parses and validates `text`; `vars` (from the command line) override the file's `[vars]`.
    pub fn parse(text: &str, vars: &HashMap<String, String>) -> Result<Self, SupervisorError> {
        let file: StackFile =
            toml::from_str(text).map_err(|e| SupervisorError::Stack(e.to_string()))?;
        let mut all: HashMap<String, String> = file.vars.into_iter().collect();
        all.extend(vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        if !all.contains_key("celeriac") {
            let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("celeriac"));
            all.insert("celeriac".into(), exe.display().to_string());
        }
        let sub = |s: &str, what: &str| {
            substitute(s, &all).map_err(|v| {
            SupervisorError::Stack(format!("{what}: ${{{v}}} is neither in [vars], nor given with --var, nor set in the environment"))
        })
        };
        let mut services = Vec::new();
        for (name, f) in &file.services {
            if f.command.is_empty() {
                return Err(SupervisorError::Stack(format!(
                    "services.{name}: command is empty"
                )));
            }
            for dep in &f.depends_on {
                if !file.services.contains_key(dep) {
                    return Err(SupervisorError::Stack(format!(
                        "services.{name}: depends on {dep:?}, which is not a service"
                    )));
                }
            }
            let what = format!("services.{name}");
            services.push(Service {
                name: name.clone(),
                command: f
                    .command
                    .iter()
                    .map(|c| sub(c, &what))
                    .collect::<Result<_, _>>()?,
                env: file
                    .env
                    .iter()
                    .chain(&f.env)
                    .map(|(k, v)| Ok((k.clone(), sub(v, &what)?)))
                    .collect::<Result<_, SupervisorError>>()?,
                depends_on: f.depends_on.clone(),
                health: match &f.health {
                    Some(Health::Http(u)) => Some(Health::Http(sub(u, &what)?)),
                    Some(Health::Tcp(a)) => Some(Health::Tcp(sub(a, &what)?)),
                    None => None,
                },
                oneshot: f.oneshot,
                optional: f.optional.clone(),
                ready_timeout: Duration::from_secs_f64(f.ready_timeout.unwrap_or(if f.oneshot {
                    300.0
                } else {
                    120.0
                })),
            });
        }
        let stack = Self { services };
        stack.check_cycles()?;
        Ok(stack)
    }

    /// The service named `name`.
    pub fn get(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    fn check_cycles(&self) -> Result<(), SupervisorError> {
        fn visit<'a>(
            stack: &'a Stack,
            name: &'a str,
            path: &mut Vec<&'a str>,
            done: &mut Vec<&'a str>,
        ) -> Result<(), SupervisorError> {
            if done.contains(&name) {
                return Ok(());
            }
            if let Some(at) = path.iter().position(|p| *p == name) {
                let mut cycle: Vec<&str> = path[at..].to_vec();
                cycle.push(name);
                return Err(SupervisorError::Stack(format!(
                    "depends_on forms a cycle: {}",
                    cycle.join(" -> ")
                )));
            }
            path.push(name);
            for dep in &stack.get(name).expect("validated").depends_on {
                visit(stack, dep, path, done)?;
            }
            path.pop();
            done.push(name);
            Ok(())
        }
        let mut done = Vec::new();
        for s in &self.services {
            visit(self, &s.name, &mut Vec::new(), &mut done)?;
        }
        Ok(())
    }
}

/// Replaces every `${name}`; `Err(name)` for one that is not known.
fn substitute(s: &str, vars: &HashMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[at..]);
            return Ok(out);
        };
        let name = &after[..end];
        match vars.get(name).cloned().or_else(|| std::env::var(name).ok()) {
            Some(v) => out.push_str(&v),
            None => return Err(name.to_string()),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Stack, String> {
        Stack::parse(text, &HashMap::new()).map_err(|e| e.to_string())
    }

    #[test]
    fn substitutes_vars_and_keeps_order() {
        let mut vars = HashMap::new();
        vars.insert("port".to_string(), "9091".to_string());
        let s = Stack::parse(
            r#"
            [vars]
            py = "python3"
            port = "1"
            [services.b]
            command = ["${py}", "-m", "x", "--port", "${port}"]
            health = { tcp = "127.0.0.1:${port}" }
            [services.a]
            command = ["${celeriac}", "worker"]
            depends_on = ["b"]
            oneshot = true
            env = { B = "own" }
            [env]
            A = "all-${port}"
            B = "shared"
            "#,
            &vars,
        )
        .unwrap();
        let b = s.get("b").unwrap();
        assert_eq!(b.command, vec!["python3", "-m", "x", "--port", "9091"]);
        assert_eq!(b.health, Some(Health::Tcp("127.0.0.1:9091".into())));
        assert_eq!(b.ready_timeout, Duration::from_secs(120));
        let a = s.get("a").unwrap();
        assert_eq!(
            a.command[0],
            std::env::current_exe().unwrap().display().to_string()
        );
        assert_eq!(a.ready_timeout, Duration::from_secs(300));
        assert_eq!(a.env["A"], "all-9091");
        assert_eq!(a.env["B"], "own");
        assert_eq!(b.env["B"], "shared");
    }

    #[test]
    fn bad_stacks_are_named() {
        let e = parse("[services.a]\ncommand = [\"x\"]\ndepends_on = [\"b\"]").unwrap_err();
        assert!(
            e.contains("depends on \"b\", which is not a service"),
            "{e}"
        );
        let e = parse("[services.a]\ncommand = [\"x\"]\ndepends_on = [\"b\"]\n[services.b]\ncommand = [\"y\"]\ndepends_on = [\"a\"]").unwrap_err();
        assert!(e.contains("cycle: a -> b -> a"), "{e}");
        let e = parse("[services.a]\ncommand = [\"${nope_not_set_anywhere}\"]").unwrap_err();
        assert!(e.contains("${nope_not_set_anywhere} is neither"), "{e}");
        let e = parse("[services.a]\ncommand = []").unwrap_err();
        assert!(e.contains("command is empty"), "{e}");
        let e = parse("[services.a]\ncommand = [\"x\"]\nrestart = true").unwrap_err();
        assert!(e.contains("unknown field `restart`"), "{e}");
    }
}

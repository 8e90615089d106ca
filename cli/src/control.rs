//! `celeriac inspect METHOD` and `celeriac control METHOD`: remote control from the command line, as
//! `celery inspect` / `celery control`: the request is broadcast on the pidbox, replies are collected for
//! `--timeout` seconds and printed like `celery` prints them (`->  node: OK` and the value), or as JSON.

use crate::settings::GlobalArgs;
use anyhow::Context;
use clap::Args;
use serde_json::{Value, json};
use std::time::Duration;

/// `celeriac inspect` / `celeriac control` options.
#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The command (`ping`, `stats`, `active`, `registered`, `revoke`, `rate_limit`, ...).
    pub method: String,
    /// Positional arguments of the command (`revoke ID...`, `rate_limit TASK RATE`, `add_consumer QUEUE`).
    pub args: Vec<String>,
    /// Only these nodes (comma separated).
    #[arg(short = 'd', long)]
    pub destination: Option<String>,
    /// Seconds to wait for replies.
    #[arg(short = 't', long, default_value_t = 1.0)]
    pub timeout: f64,
    /// Print the replies as one JSON object.
    #[arg(short = 'j', long)]
    pub json: bool,
    /// With `revoke`: terminate running tasks too.
    #[arg(long)]
    pub terminate: bool,
}

/// Arguments as `celery.app.control` sends them for each command.
fn arguments(a: &ControlArgs) -> anyhow::Result<Value> {
    let arg = |i: usize, what: &str| {
        a.args
            .get(i)
            .cloned()
            .with_context(|| format!("{} needs {what}", a.method))
    };
    Ok(match a.method.as_str() {
        "revoke" => json!({"task_id": a.args, "terminate": a.terminate, "signal": "SIGTERM"}),
        "rate_limit" => {
            json!({"task_name": arg(0, "a task name")?, "rate_limit": arg(1, "a rate")?})
        }
        "time_limit" => json!({"task_name": arg(0, "a task name")?,
            "hard": a.args.get(1).and_then(|v| v.parse::<f64>().ok()), "soft": a.args.get(2).and_then(|v| v.parse::<f64>().ok())}),
        "add_consumer" => {
            json!({"queue": arg(0, "a queue")?, "exchange": null, "exchange_type": "direct", "routing_key": null})
        }
        "cancel_consumer" => json!({"queue": arg(0, "a queue")?}),
        "pool_grow" | "pool_shrink" => {
            json!({"n": a.args.first().and_then(|v| v.parse::<u64>().ok()).unwrap_or(1)})
        }
        "registered" => json!({"taskinfoitems": []}),
        "active" => json!({"safe": null}),
        "conf" => json!({"with_defaults": false}),
        "query_task" => json!({"ids": a.args}),
        _ => json!({}),
    })
}

/// Runs the command and prints the replies; exit status 1 when no node replied.
pub async fn run(global: &GlobalArgs, a: ControlArgs) -> anyhow::Result<i32> {
    let resolved = global.resolve()?;
    let broker = resolved.broker().await?;
    let destination: Option<Vec<String>> = a
        .destination
        .as_ref()
        .map(|d| d.split(',').map(|n| n.trim().to_string()).collect());
    let replies = celeriac_broker::pidbox::call(
        broker.as_ref(),
        &a.method,
        arguments(&a)?,
        destination.as_deref(),
        Duration::from_secs_f64(a.timeout.max(0.05)),
    )
    .await?;
    if a.json {
        println!(
            "{}",
            celeriac_protocol::json::to_string(&Value::Object(replies.clone()))
        );
    } else {
        for (node, value) in &replies {
            println!("->  {node}: OK");
            match value.get("ok").and_then(Value::as_str) {
                Some(text) if value.as_object().is_some_and(|o| o.len() == 1) => {
                    println!("        {text}")
                }
                _ => {
                    for line in serde_json::to_string_pretty(value)?.lines() {
                        println!("    {line}");
                    }
                }
            }
        }
        if replies.is_empty() {
            eprintln!("Error: No nodes replied within time constraint");
        } else {
            println!();
            println!(
                "{} node{} online.",
                replies.len(),
                if replies.len() == 1 { "" } else { "s" }
            );
        }
    }
    Ok(if replies.is_empty() { 1 } else { 0 })
}

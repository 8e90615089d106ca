//! `celeriac call`: publishes one task exactly as a Celery 5.7 client would and prints its id.

use crate::settings::GlobalArgs;
use anyhow::Context;
use celeriac_protocol::{TaskMessage, Value, time};
use clap::Args;

/// `celeriac call` options.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// Task name.
    pub task: String,
    /// Positional arguments as a JSON list.
    #[arg(short = 'a', long, default_value = "[]")]
    pub args: String,
    /// Keyword arguments as a JSON object.
    #[arg(short = 'k', long, default_value = "{}")]
    pub kwargs: String,
    /// Queue (default: task_routes, then task_default_queue).
    #[arg(short = 'Q', long)]
    pub queue: Option<String>,
    /// Run no earlier than this many seconds from now.
    #[arg(long)]
    pub countdown: Option<f64>,
    /// Run no earlier than this ISO-8601 time.
    #[arg(long)]
    pub eta: Option<String>,
    /// Discard if not started within this many seconds.
    #[arg(long)]
    pub expires: Option<f64>,
    /// Message priority (0-9 on Redis: lower runs first).
    #[arg(long)]
    pub priority: Option<u8>,
    /// Task id (default: a new uuid4).
    #[arg(long)]
    pub task_id: Option<String>,
}

/// Builds the message for a call.
pub fn build(args: &CallArgs) -> anyhow::Result<TaskMessage> {
    let positional: Value =
        serde_json::from_str(&args.args).context("--args must be a JSON list")?;
    let Value::Array(positional) = positional else {
        anyhow::bail!("--args must be a JSON list, e.g. '[2, 3]'")
    };
    let kwargs: Value =
        serde_json::from_str(&args.kwargs).context("--kwargs must be a JSON object")?;
    let Value::Object(kwargs) = kwargs else {
        anyhow::bail!("--kwargs must be a JSON object, e.g. '{{\"x\": 1}}'")
    };
    let id = args
        .task_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut msg = TaskMessage::new(&args.task, id, positional, kwargs);
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    msg.headers.origin = Some(format!("gen{}@{host}", std::process::id()));
    msg.properties.reply_to = Some(uuid::Uuid::new_v4().to_string());
    let now = chrono::Utc::now();
    if let Some(c) = args.countdown {
        let eta = now + chrono::Duration::microseconds((c * 1e6) as i64);
        msg.headers.eta = Some(time::isoformat(eta));
    }
    if let Some(e) = &args.eta {
        let t =
            time::parse_iso(e).with_context(|| format!("--eta {e:?} is not an ISO-8601 time"))?;
        msg.headers.eta = Some(time::isoformat(t));
    }
    if let Some(x) = args.expires {
        let at = now + chrono::Duration::microseconds((x * 1e6) as i64);
        msg.headers.expires = Some(time::isoformat(at));
        msg.properties.expiration = Some(((x.max(0.0) * 1000.0) as u64).to_string());
    }
    if let Some(p) = args.priority {
        msg.properties.priority = p;
    }
    Ok(msg)
}

/// Publishes the task and prints its id.
pub async fn run(global: &GlobalArgs, args: CallArgs) -> anyhow::Result<i32> {
    let resolved = global.resolve()?;
    let msg = build(&args)?;
    let queue = args
        .queue
        .clone()
        .unwrap_or_else(|| resolved.config.queue_for(&args.task).to_string());
    let broker = resolved.broker().await?;
    broker
        .publish(&msg, &queue)
        .await
        .with_context(|| format!("publishing {} to queue {queue:?}", args.task))?;
    if resolved.config.task_send_sent_event {
        resolved.canvas().await?.sent_event(&msg, &queue).await;
    }
    println!("{}", msg.id());
    Ok(0)
}

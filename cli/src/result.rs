//! `celeriac result`: waits for a task's result (like `AsyncResult.get()`) and prints the stored meta.
//! Exit status: 0 SUCCESS, 1 FAILURE/REVOKED, 2 still not ready when the timeout passed.

use crate::settings::GlobalArgs;
use clap::Args;
use std::time::Duration;

/// `celeriac result` options.
#[derive(Debug, Args)]
pub struct ResultArgs {
    /// Task id.
    pub id: String,
    /// Seconds to wait for a ready state (0: read once).
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
}

/// Prints the meta.
pub async fn run(global: &GlobalArgs, args: ResultArgs) -> anyhow::Result<i32> {
    let resolved = global.resolve()?;
    let backend = resolved.backend().await?;
    let meta = if args.timeout > 0.0 {
        backend
            .wait(&args.id, Duration::from_secs_f64(args.timeout))
            .await?
    } else {
        backend.get(&args.id).await?
    };
    let meta = meta.unwrap_or_else(
        || serde_json::json!({"status": "PENDING", "result": null, "task_id": args.id}),
    );
    println!("{}", celeriac_protocol::json::to_string(&meta));
    Ok(match meta.get("status").and_then(|s| s.as_str()) {
        Some("SUCCESS") => 0,
        Some("FAILURE" | "REVOKED") => 1,
        _ => 2,
    })
}

//! `celeriac purge`: deletes every waiting message of the given queues (all priorities) and prints the count.

use crate::settings::{GlobalArgs, split_queues};
use clap::Args;

/// `celeriac purge` options.
#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Queues to purge (default: task_default_queue).
    #[arg(short = 'Q', long)]
    pub queues: Option<String>,
}

/// Purges and prints how many messages were deleted.
pub async fn run(global: &GlobalArgs, args: PurgeArgs) -> anyhow::Result<i32> {
    let resolved = global.resolve()?;
    let queues = match &args.queues {
        Some(q) => split_queues(q),
        None => vec![resolved.config.task_default_queue.clone()],
    };
    let broker = resolved.broker().await?;
    let mut total = 0;
    for q in &queues {
        total += broker.purge(q).await?;
    }
    eprintln!(
        "Purged {total} message{} from {} known task queue{}.",
        if total == 1 { "" } else { "s" },
        queues.len(),
        if queues.len() == 1 { "" } else { "s" }
    );
    println!("{total}");
    Ok(0)
}

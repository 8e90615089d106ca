//! `celeriac apply`: applies a canvas given as Celery's signature JSON (`json.dumps(chain(...))`) through the
//! Rust canvas API and prints the id of its result: the last task of a chain, a chord's body, or a group's
//! id followed by its members' ids, one per line.

use crate::settings::GlobalArgs;
use anyhow::Context;
use celeriac_canvas::{Applied, ApplyOptions};
use clap::Args;

/// `celeriac apply` options.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The signature as JSON (a task, chain, group or chord dict), or @FILE to read it from a file.
    #[arg(long)]
    pub canvas: String,
}

fn print(applied: &Applied) {
    println!("{}", applied.id());
    if let Applied::Group { members, .. } = applied {
        for m in members {
            println!("{}", m.id());
        }
    }
}

/// Applies and prints.
pub async fn run(global: &GlobalArgs, args: ApplyArgs) -> anyhow::Result<i32> {
    let resolved = global.resolve()?;
    let text = match args.canvas.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => args.canvas.clone(),
    };
    let sig: serde_json::Value =
        serde_json::from_str(&text).context("--canvas must be a signature as JSON")?;
    let canvas = resolved.canvas().await?;
    let applied = canvas.apply(&sig, &[], ApplyOptions::default()).await?;
    print(&applied);
    Ok(0)
}

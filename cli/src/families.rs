//! The task families the `celeriac` binary registers, from one list (platform.md §1), and the platform they
//! register against: the domain database (checked: migrated, a role row-level security applies to) and their
//! configuration sections.

use crate::settings::Resolved;
use anyhow::Context;
use celeriac_domain::{Db, Platform, Tenants};
use celeriac_worker::Registry;
use std::sync::Arc;

/// A family's registration function.
type Register = fn(&mut Registry, &mut Platform) -> Result<(), String>;

/// Every family: its config section name and its `register`. A later family's task replaces an earlier
/// one's of the same name: vision's `vision.embed_product` (embeds the image) replaces sync's (records the
/// request), so vision stays after sync.
const FAMILIES: &[(&str, Register)] = &[
    ("email", celeriac_tasks_email::register),
    ("payment", celeriac_tasks_payment::register),
    ("sync", celeriac_tasks_sync::register),
    #[cfg(feature = "vision")]
    ("vision", celeriac_tasks_vision::register),
    #[cfg(feature = "recommend")]
    ("recommend", celeriac_tasks_recommend::register),
];

/// The config sections that belong to families (`[email]`, ...).
pub fn section_names() -> Vec<&'static str> {
    FAMILIES.iter().map(|(name, _)| *name).collect()
}

/// Connects the domain database when `database_url` is set and checks it is ready for workers.
pub async fn platform(
    resolved: &Resolved,
    peers: Arc<celeriac_worker::task::Peers>,
) -> anyhow::Result<Platform> {
    let database = resolved.database();
    let tenants = match &database.url {
        None => None,
        Some(url) => {
            let db = Db::connect(&database).await.with_context(|| {
                format!(
                    "connecting to the domain database {}",
                    celeriac_domain::config::redact(url)
                )
            })?;
            db.check_ready(&database).await?;
            Some(Arc::new(Tenants::new(db.with_peers(Arc::clone(&peers)))))
        }
    };
    Ok(Platform::new(database, tenants, resolved.config.sections.clone()).with_peers(peers))
}

/// Registers every family.
pub fn register_all(registry: &mut Registry, platform: &mut Platform) -> anyhow::Result<()> {
    for (name, register) in FAMILIES {
        register(registry, platform)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("the {name} task family's configuration"))?;
    }
    Ok(())
}

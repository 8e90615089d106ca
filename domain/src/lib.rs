//! The platform's domain layer (`../shared/spec/platform.md`): the domain database, tenants and the only
//! door task code has to tenant tables, and what a task family receives when it registers.
//!
//! # Layout
//! - [`config`]: where the domain database is ([`DatabaseConfig`]).
//! - [`db`]: the application-role pool ([`Db`]) and the start-up checks (migrated, role not privileged).
//! - [`tenant`]: tenant ids and slugs ([`Tenants`]), the transaction-scoped [`TenantTx`].
//! - [`admin`]: what runs as the owner role: migrations, the application role's grants, adding tenants.
//! - [`platform`]: [`Platform`], what a family's `register` gets (its config section, the database).
//! - [`secret`]: per-tenant secrets sealed under `CELERIAC_SECRET_KEY`.
//! - [`error`]: [`DomainError`] and how it reaches a Celery client.
//! - `testing` (feature `test-utils`): a migrated schema of its own per test.

pub mod admin;
pub mod config;
pub mod db;
pub mod error;
pub mod platform;
pub mod secret;
pub mod tenant;
#[cfg(feature = "test-utils")]
pub mod testing;

pub use config::DatabaseConfig;
pub use db::Db;
pub use error::DomainError;
pub use platform::Platform;
pub use tenant::{Tenant, TenantTx, Tenants};

//! The application-role pool workers use for tenant tables, and the checks a worker makes before it starts:
//! the domain migrations are applied, and the role cannot bypass row-level security.

use crate::config::{DatabaseConfig, redact};
use crate::error::DomainError;
use celeriac_migrations::{DomainMigrator, MigratorTraitReexport};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, Statement};
use std::time::Duration;

/// The domain database as the application role (a pool; cheap to clone).
#[derive(Debug, Clone)]
pub struct Db {
    conn: DatabaseConnection,
    peers: std::sync::Arc<celeriac_task::Peers>,
}

/// Pool options shared by the application and owner connections.
pub(crate) fn options(url: &str, schema: Option<&str>, max: u32) -> ConnectOptions {
    let mut opts = ConnectOptions::new(url.to_string());
    opts.max_connections(max)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(10))
        .idle_timeout(Duration::from_secs(300))
        // A connection that died with its server is found and replaced before a task gets it.
        .test_before_acquire(true)
        .sqlx_logging(false)
        // A wait for a connection is reported once per outage through the peers registry, not per acquire.
        .map_sqlx_postgres_pool_opts(|o| o.acquire_slow_level(log::LevelFilter::Off));
    if let Some(s) = schema {
        opts.set_schema_search_path(s.to_string());
    }
    opts
}

impl Db {
    /// Connects to `database_url` (as set, else [`DomainError::NotConfigured`]).
    pub async fn connect(config: &DatabaseConfig) -> Result<Self, DomainError> {
        let url = config
            .url
            .as_deref()
            .ok_or_else(|| DomainError::NotConfigured("database_url".into()))?;
        let conn = Database::connect(options(
            url,
            config.schema.as_deref(),
            config.max_connections.max(1),
        ))
        .await?;
        Ok(Self {
            conn,
            peers: Default::default(),
        })
    }

    /// Reports the database's health to `peers` (as `postgres`) from now on.
    pub fn with_peers(mut self, peers: std::sync::Arc<celeriac_task::Peers>) -> Self {
        self.peers = peers;
        self
    }

    /// Records how a use of the database went: a connection error makes it down (one warning per outage).
    pub fn report(&self, outcome: Result<(), &DomainError>) {
        match outcome {
            Ok(()) => self.peers.up("postgres"),
            Err(e) if e.is_transient() => self.peers.down("postgres", &e.to_string()),
            Err(_) => {}
        }
    }

    /// Records that a use has waited `waited` for a connection: the database is reported down until a use
    /// succeeds.
    pub fn report_waiting(&self, waited: Duration) {
        self.peers.down(
            "postgres",
            &format!("no database connection for {:.0} s", waited.as_secs_f64()),
        );
    }

    /// The pool (for entity queries outside tenant tables, e.g. `tenants`).
    pub fn conn(&self) -> &DatabaseConnection {
        &self.conn
    }

    /// What a worker checks before it consumes: every domain migration applied, and a role that row-level
    /// security applies to. The error names the command that fixes it.
    pub async fn check_ready(&self, config: &DatabaseConfig) -> Result<(), DomainError> {
        let pending = DomainMigrator::get_pending_migrations_read_only(&self.conn)
            .await
            .map_err(|e| {
                DomainError::NotMigrated(format!(
                    "cannot read the domain migrations in {}: {e}; run `celeriac migrate up` (as database_admin_url)",
                    redact(config.url.as_deref().unwrap_or_default())
                ))
            })?;
        if !pending.is_empty() {
            let names: Vec<String> = pending.iter().map(|m| m.name().to_string()).collect();
            return Err(DomainError::NotMigrated(format!(
                "the domain database is not migrated: {} pending migration(s) ({}); run `celeriac migrate up`",
                names.len(),
                names.join(", ")
            )));
        }
        let row = self
            .conn
            .query_one_raw(Statement::from_string(
                self.conn.get_database_backend(),
                "SELECT current_user::text AS role, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user",
            ))
            .await?;
        if let Some(r) = row {
            let role: String = r.try_get("", "role")?;
            let superuser: bool = r.try_get("", "rolsuper")?;
            let bypass: bool = r.try_get("", "rolbypassrls")?;
            if superuser || bypass {
                return Err(DomainError::PrivilegedRole(format!(
                    "database_url connects as {role:?}, which is {}: row-level security would not keep tenants apart; \
                     connect workers as the application role (e.g. postgres://celeriac_app@host/db) and keep the owner in database_admin_url",
                    if superuser {
                        "a superuser"
                    } else {
                        "BYPASSRLS"
                    }
                )));
            }
        }
        Ok(())
    }
}

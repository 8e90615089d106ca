//! What runs as the owner role (`database_admin_url`): the domain migrations, the application role and its
//! grants, and adding tenants. `celeriac migrate` and `celeriac tenants` are thin layers over this.

use crate::config::{DatabaseConfig, redact, role_of};
use crate::db::options;
use crate::error::DomainError;
use celeriac_entities::tenant;
use celeriac_migrations::{DomainMigrator, MigrationStatus, MigratorTraitReexport};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ConnectionTrait, Database, DatabaseConnection, DbBackend,
    EntityTrait, QueryOrder, Statement, TransactionTrait,
};
use uuid::Uuid;

/// A migration command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateOp {
    /// Apply every pending migration.
    Up,
    /// Roll back the last N.
    Down(u32),
    /// Report applied and pending ones.
    Status,
    /// Drop every table of the schema, then apply all (development and tests only).
    Fresh,
}

/// One migration's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationState {
    /// Name (`m20261206_000003_tenants`).
    pub name: String,
    /// Applied?
    pub applied: bool,
}

/// The domain database as its owner.
#[derive(Debug)]
pub struct Admin {
    conn: DatabaseConnection,
    config: DatabaseConfig,
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn duplicate(e: &sea_orm::DbErr) -> bool {
    let text = e.to_string();
    text.contains("already exists") || text.contains("duplicate key")
}

impl Admin {
    /// Connects as `database_admin_url`, creating `database_schema` if it is set and missing.
    pub async fn connect(config: &DatabaseConfig) -> Result<Self, DomainError> {
        let url = config
            .admin_url
            .as_deref()
            .ok_or_else(|| DomainError::NotConfigured("database_admin_url".into()))?;
        let conn = Database::connect(options(url, config.schema.as_deref(), 4)).await?;
        if let Some(schema) = &config.schema
            && let Err(e) = conn
                .execute_unprepared(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {}",
                    quote_ident(schema)
                ))
                .await
            // Two processes creating it at once: the loser sees a duplicate; the schema is there.
            && !duplicate(&e)
        {
            return Err(e.into());
        }
        Ok(Self {
            conn,
            config: config.clone(),
        })
    }

    /// The owner connection.
    pub fn conn(&self) -> &DatabaseConnection {
        &self.conn
    }

    /// Runs a migration command (serialized across processes by an advisory lock), then, after `up` and
    /// `fresh`, makes sure the application role exists and holds exactly its grants. Returns every
    /// migration's state afterwards.
    pub async fn migrate(&self, op: MigrateOp) -> Result<Vec<MigrationState>, DomainError> {
        let lock = self.conn.begin().await?;
        lock.execute_unprepared(
            "SELECT pg_advisory_xact_lock(hashtext('celeriac_domain_migrations'))",
        )
        .await?;
        match op {
            MigrateOp::Up => DomainMigrator::up(&self.conn, None).await?,
            MigrateOp::Down(n) => DomainMigrator::down(&self.conn, Some(n)).await?,
            MigrateOp::Status => {}
            MigrateOp::Fresh => DomainMigrator::fresh(&self.conn).await?,
        }
        lock.commit().await?;
        if matches!(op, MigrateOp::Up | MigrateOp::Fresh) {
            self.grant_app_role().await?;
        }
        self.status().await
    }

    /// Every migration with its state.
    pub async fn status(&self) -> Result<Vec<MigrationState>, DomainError> {
        Ok(DomainMigrator::get_migration_with_status(&self.conn)
            .await?
            .iter()
            .map(|m| MigrationState {
                name: m.name().to_string(),
                applied: matches!(m.status(), MigrationStatus::Applied),
            })
            .collect())
    }

    /// Creates the role of `database_url` when missing (LOGIN, with the URL's password), and grants it what
    /// workers need: read `tenants` and the migration table, read and write the tenant tables (row-level
    /// security decides which rows). The role is never a superuser or `BYPASSRLS` by our hand.
    pub async fn grant_app_role(&self) -> Result<(), DomainError> {
        let Some(url) = self.config.url.as_deref() else {
            return Ok(());
        };
        let role = role_of(url).ok_or_else(|| {
            DomainError::NotConfigured(format!("a user name in database_url ({})", redact(url)))
        })?;
        let exists = self
            .conn
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT 1 AS one FROM pg_roles WHERE rolname = $1",
                [role.clone().into()],
            ))
            .await?
            .is_some();
        if !exists {
            let password = url::Url::parse(url)
                .ok()
                .and_then(|u| u.password().map(str::to_string))
                .map(|p| format!(" PASSWORD {}", quote_literal(&p)))
                .unwrap_or_default();
            if let Err(e) = self
                .conn
                .execute_unprepared(&format!(
                    "CREATE ROLE {} LOGIN NOSUPERUSER NOBYPASSRLS{password}",
                    quote_ident(&role)
                ))
                .await
                && !duplicate(&e)
            {
                return Err(DomainError::NotConfigured(format!(
                    "the application role {role:?} (database_url): it does not exist and creating it failed ({e}); \
                     create it as a PostgreSQL administrator: CREATE ROLE {} LOGIN",
                    quote_ident(&role)
                )));
            }
        }
        let r = quote_ident(&role);
        let schema: String = self
            .conn
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT current_schema()::text AS s",
            ))
            .await?
            .map(|row| row.try_get("", "s"))
            .transpose()?
            .unwrap_or_else(|| "public".into());
        let s = quote_ident(&schema);
        self.conn
            .execute_unprepared(&format!(
                "GRANT USAGE ON SCHEMA {s} TO {r};
                 GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {r};
                 REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {s}.tenants FROM {r};
                 REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {s}.celeriac_domain_migrations FROM {r};"
            ))
            .await?;
        Ok(())
    }

    /// Adds a tenant; returns its id.
    pub async fn add_tenant(&self, slug: &str, name: Option<&str>) -> Result<Uuid, DomainError> {
        let id = Uuid::new_v4();
        tenant::ActiveModel {
            id: Set(id),
            slug: Set(slug.to_string()),
            name: Set(name.unwrap_or(slug).to_string()),
            created_at: Set(chrono::Utc::now()),
            settings: Set(serde_json::json!({})),
        }
        .insert(&self.conn)
        .await?;
        Ok(id)
    }

    /// Every tenant, oldest first.
    pub async fn tenants(&self) -> Result<Vec<tenant::Model>, DomainError> {
        Ok(tenant::Entity::find()
            .order_by_asc(tenant::Column::CreatedAt)
            .all(&self.conn)
            .await?)
    }
}

//! Tenants and the one door task code has to tenant tables. A task names its tenant by id or slug
//! ([`Tenants::resolve`]); [`TenantTx`] opens a transaction, sets `app.tenant_id` for that transaction only
//! (safe with a pool), and its helpers bind the tenant as `$1`, so every query filters on it. Row-level
//! security is the backstop: a query that forgets the filter still sees only this tenant's rows.

use crate::db::Db;
use crate::error::DomainError;
use celeriac_entities::tenant;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait, QueryFilter,
    QueryResult, Statement, TransactionTrait, Value,
};
use std::collections::HashMap;
use std::sync::RwLock;
use uuid::Uuid;

/// How long opening a transaction may wait for a connection before the database is reported down.
const SLOW_CONNECTION: std::time::Duration = std::time::Duration::from_secs(1);

/// A resolved tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// Id.
    pub id: Uuid,
    /// Slug.
    pub slug: String,
}

/// Resolves tenant ids and slugs, remembering hits (tenants are added, never renamed in place).
#[derive(Debug)]
pub struct Tenants {
    db: Db,
    known: RwLock<HashMap<String, Tenant>>,
}

impl Tenants {
    /// Over `db`.
    pub fn new(db: Db) -> Self {
        Self {
            db,
            known: RwLock::default(),
        }
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The tenant with this id (a UUID) or slug; [`DomainError::UnknownTenant`] with the value as given.
    pub async fn resolve(&self, value: &str) -> Result<Tenant, DomainError> {
        if let Some(t) = self.known.read().expect("tenants").get(value) {
            return Ok(t.clone());
        }
        let query = match Uuid::parse_str(value) {
            Ok(id) => tenant::Entity::find_by_id(id),
            Err(_) => tenant::Entity::find().filter(tenant::Column::Slug.eq(value)),
        };
        let found = query
            .one(self.db.conn())
            .await?
            .ok_or_else(|| DomainError::UnknownTenant(value.to_string()))?;
        let t = Tenant {
            id: found.id,
            slug: found.slug,
        };
        self.known
            .write()
            .expect("tenants")
            .insert(value.to_string(), t.clone());
        Ok(t)
    }

    /// Opens a [`TenantTx`] for the tenant named by `value` (id or slug).
    pub async fn begin(&self, value: &str) -> Result<TenantTx, DomainError> {
        let t = self.resolve(value).await?;
        TenantTx::begin(&self.db, t).await
    }

    /// Every tenant (for housekeeping that visits each one, such as gauges).
    pub async fn all(&self) -> Result<Vec<Tenant>, DomainError> {
        Ok(tenant::Entity::find()
            .all(self.db.conn())
            .await?
            .into_iter()
            .map(|m| Tenant {
                id: m.id,
                slug: m.slug,
            })
            .collect())
    }
}

/// A transaction bound to one tenant: `app.tenant_id` is set for its lifetime only. Dropped without
/// [`TenantTx::commit`], it rolls back.
#[derive(Debug)]
pub struct TenantTx {
    txn: DatabaseTransaction,
    tenant: Tenant,
}

impl TenantTx {
    /// Begins a transaction for `tenant`.
    pub async fn begin(db: &Db, tenant: Tenant) -> Result<Self, DomainError> {
        let id = tenant.id.to_string();
        let opening = async {
            let txn = db.conn().begin().await?;
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT set_config('app.tenant_id', $1, true)",
                [id.into()],
            ))
            .await?;
            Ok::<_, DomainError>(txn)
        };
        tokio::pin!(opening);
        // The pool waits for a connection (up to its acquire timeout) while the server is away: a wait this long
        // already tells the operator that PostgreSQL is down, before any error does.
        let opened = tokio::select! {
            opened = &mut opening => opened,
            () = tokio::time::sleep(SLOW_CONNECTION) => {
                db.report_waiting(SLOW_CONNECTION);
                opening.await
            }
        };
        db.report(opened.as_ref().map(|_| ()));
        Ok(Self {
            txn: opened?,
            tenant,
        })
    }

    /// The tenant.
    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    /// The transaction, for sea-orm entity operations (row-level security keeps them to this tenant).
    pub fn conn(&self) -> &DatabaseTransaction {
        &self.txn
    }

    fn statement(&self, sql: &str, values: Vec<Value>) -> Statement {
        debug_assert!(
            sql.contains("$1"),
            "TenantTx SQL must filter on the tenant ($1): {sql}"
        );
        let mut all = Vec::with_capacity(values.len() + 1);
        all.push(Value::from(self.tenant.id));
        all.extend(values);
        Statement::from_sql_and_values(DbBackend::Postgres, sql, all)
    }

    /// Runs `sql` with `$1` = the tenant id and `values` as `$2...`; returns the rows affected.
    pub async fn execute(&self, sql: &str, values: Vec<Value>) -> Result<u64, DomainError> {
        Ok(self
            .txn
            .execute_raw(self.statement(sql, values))
            .await?
            .rows_affected())
    }

    /// One row of `sql` (`$1` = the tenant id).
    pub async fn one(
        &self,
        sql: &str,
        values: Vec<Value>,
    ) -> Result<Option<QueryResult>, DomainError> {
        Ok(self.txn.query_one_raw(self.statement(sql, values)).await?)
    }

    /// Every row of `sql` (`$1` = the tenant id).
    pub async fn all(
        &self,
        sql: &str,
        values: Vec<Value>,
    ) -> Result<Vec<QueryResult>, DomainError> {
        Ok(self.txn.query_all_raw(self.statement(sql, values)).await?)
    }

    /// Commits.
    pub async fn commit(self) -> Result<(), DomainError> {
        Ok(self.txn.commit().await?)
    }
}

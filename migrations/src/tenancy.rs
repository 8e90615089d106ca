//! SQL shared by the domain migrations: the row-level-security backstop every tenant-owned table gets
//! (platform.md §2). With no tenant set (`app.tenant_id` unset or reset to '' after a transaction), the
//! policy compares with NULL and a query sees zero rows.

/// `ENABLE` + `FORCE ROW LEVEL SECURITY` and the tenant policy on `table` (idempotent).
pub fn tenant_rls(table: &str) -> String {
    format!(
        "ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
         ALTER TABLE {table} FORCE ROW LEVEL SECURITY;
         DROP POLICY IF EXISTS tenant_isolation ON {table};
         CREATE POLICY tenant_isolation ON {table}
           USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid)
           WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid);"
    )
}

/// Refuses any backend but PostgreSQL: row-level security is what keeps tenants apart.
pub fn require_postgres(
    manager: &sea_orm_migration::SchemaManager<'_>,
) -> Result<(), sea_orm_migration::DbErr> {
    if manager.get_database_backend() != sea_orm_migration::sea_orm::DbBackend::Postgres {
        return Err(sea_orm_migration::DbErr::Migration(
            "the domain database must be PostgreSQL (tenant isolation relies on row-level security)".into(),
        ));
    }
    Ok(())
}

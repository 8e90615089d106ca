//! Test support (feature `test-utils`): a domain database of its own for one test, in its own PostgreSQL
//! schema, migrated, with the application role granted; dropped by [`TestDatabase::drop_schema`].
//! `CELERIAC_TEST_POSTGRES` is the owner URL (default `postgres://postgres@127.0.0.1:5432/test`);
//! `CELERIAC_TEST_APP_ROLE` the application role (default `celeriac_app`).

use crate::admin::{Admin, MigrateOp};
use crate::config::DatabaseConfig;
use crate::db::Db;
use crate::tenant::Tenants;
use std::sync::Arc;

/// One test's domain database.
#[derive(Debug)]
pub struct TestDatabase {
    /// Settings pointing at the schema (owner and application role).
    pub config: DatabaseConfig,
    /// The owner connection.
    pub admin: Admin,
    /// The schema.
    pub schema: String,
}

/// The owner URL of the test database.
pub fn admin_url() -> String {
    std::env::var("CELERIAC_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The same database as the application role.
pub fn app_url() -> String {
    let role = std::env::var("CELERIAC_TEST_APP_ROLE").unwrap_or_else(|_| "celeriac_app".into());
    let mut u = url::Url::parse(&admin_url()).expect("CELERIAC_TEST_POSTGRES is a URL");
    u.set_username(&role).expect("a user name");
    u.set_password(None).expect("no password");
    u.to_string()
}

impl TestDatabase {
    /// A fresh schema named `<prefix>_<random>`, migrated.
    pub async fn create(prefix: &str) -> Self {
        let schema = format!(
            "{prefix}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let config = DatabaseConfig::new(Some(app_url()), Some(admin_url()), Some(schema.clone()));
        let admin = Admin::connect(&config)
            .await
            .expect("connecting as the owner");
        admin.migrate(MigrateOp::Up).await.expect("migrating");
        Self {
            config,
            admin,
            schema,
        }
    }

    /// The application role's pool and tenants.
    pub async fn tenants(&self) -> Arc<Tenants> {
        Arc::new(Tenants::new(
            Db::connect(&self.config)
                .await
                .expect("connecting as the application role"),
        ))
    }

    /// Drops the schema and everything in it.
    pub async fn drop_schema(self) {
        use sea_orm::ConnectionTrait;
        let _ = self
            .admin
            .conn()
            .execute_unprepared(&format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.schema
            ))
            .await;
    }
}

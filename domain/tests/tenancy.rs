//! Tenant isolation against the real PostgreSQL, as the application role: through `TenantTx` and through raw
//! SQL that forgets the tenant filter, tenant B reads, updates and deletes none of tenant A's rows; with no
//! tenant set nothing is visible; writing another tenant's id is refused. Plus the start-up checks: an
//! unmigrated database and a privileged role are refused with the command or setting that fixes it.

use celeriac_domain::admin::{Admin, MigrateOp};
use celeriac_domain::testing::{TestDatabase, admin_url};
use celeriac_domain::{DatabaseConfig, Db, DomainError, TenantTx};
use sea_orm::{ConnectionTrait, DbBackend, Statement};

async fn count(tx: &TenantTx, sql: &str) -> i64 {
    tx.conn()
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap()
}

async fn raw(tx: &TenantTx, sql: &str) -> u64 {
    tx.conn()
        .execute_unprepared(sql)
        .await
        .unwrap()
        .rows_affected()
}

#[tokio::test]
async fn tenants_never_see_each_other() {
    let t = TestDatabase::create("tenancy").await;
    let a = t.admin.add_tenant("shop-a", Some("Shop A")).await.unwrap();
    let b = t.admin.add_tenant("shop-b", None).await.unwrap();
    let tenants = t.tenants().await;
    assert_eq!(tenants.resolve("shop-a").await.unwrap().id, a);
    assert_eq!(
        tenants.resolve(&b.to_string()).await.unwrap().slug,
        "shop-b"
    );
    match tenants.resolve("nope").await {
        Err(DomainError::UnknownTenant(v)) => assert_eq!(v, "nope"),
        other => panic!("{other:?}"),
    }

    // Two templates of A, one of B, written through the handle.
    for (tenant, name) in [
        ("shop-a", "welcome"),
        ("shop-a", "bye"),
        ("shop-b", "welcome"),
    ] {
        let tx = tenants.begin(tenant).await.unwrap();
        let n = tx
            .execute(
                "INSERT INTO email_templates (tenant_id, name, locale, subject, text_body) VALUES ($1, $2, 'en', 's', 't')",
                vec![name.into()],
            )
            .await
            .unwrap();
        assert_eq!(n, 1);
        tx.commit().await.unwrap();
    }

    // B through the handle: its own row only.
    let tx = tenants.begin("shop-b").await.unwrap();
    let rows = tx
        .all(
            "SELECT name FROM email_templates WHERE tenant_id = $1",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    // B with raw SQL that forgets the filter: row-level security still hides A.
    assert_eq!(
        count(&tx, "SELECT count(*) AS n FROM email_templates").await,
        1
    );
    assert_eq!(
        count(
            &tx,
            &format!("SELECT count(*) AS n FROM email_templates WHERE tenant_id = '{a}'")
        )
        .await,
        0
    );
    assert_eq!(
        raw(&tx, "UPDATE email_templates SET subject = 'pwned'").await,
        1
    );
    assert_eq!(
        raw(
            &tx,
            &format!("UPDATE email_templates SET subject = 'x' WHERE tenant_id = '{a}'")
        )
        .await,
        0
    );
    assert_eq!(
        raw(
            &tx,
            &format!("DELETE FROM email_templates WHERE tenant_id = '{a}'")
        )
        .await,
        0
    );
    // Writing a row for A from B's transaction is refused (WITH CHECK).
    let err = tx
        .conn()
        .execute_unprepared(&format!(
            "INSERT INTO email_templates (tenant_id, name, locale, subject) VALUES ('{a}', 'evil', 'en', 's')"
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("row-level security"), "{err}");
    drop(tx); // rolled back

    let tx = tenants.begin("shop-b").await.unwrap();
    assert_eq!(raw(&tx, "DELETE FROM email_templates").await, 1);
    tx.commit().await.unwrap();

    // A still has both, untouched.
    let tx = tenants.begin("shop-a").await.unwrap();
    assert_eq!(
        count(
            &tx,
            "SELECT count(*) AS n FROM email_templates WHERE subject = 's'"
        )
        .await,
        2
    );
    tx.commit().await.unwrap();

    // No tenant set (a plain pooled connection, after transactions that set one): nothing at all.
    let db = tenants.db().conn();
    for _ in 0..3 {
        let n: i64 = db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT count(*) AS n FROM email_templates",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get("", "n")
            .unwrap();
        assert_eq!(n, 0);
    }
    let updated = db
        .execute_unprepared("UPDATE email_templates SET subject = 'x'")
        .await
        .unwrap();
    assert_eq!(updated.rows_affected(), 0);
    t.drop_schema().await;
}

#[tokio::test]
async fn workers_refuse_an_unmigrated_database_and_a_privileged_role() {
    let t = TestDatabase::create("ready").await;
    let db = Db::connect(&t.config).await.unwrap();
    db.check_ready(&t.config).await.unwrap();

    // One migration rolled back: the worker names what is pending and the command to run.
    let states = t.admin.migrate(MigrateOp::Down(1)).await.unwrap();
    let pending: Vec<&str> = states
        .iter()
        .filter(|s| !s.applied)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(pending.len(), 1);
    assert_eq!(Some(pending[0]), states.last().map(|s| s.name.as_str()));
    let err = db.check_ready(&t.config).await.unwrap_err().to_string();
    assert!(
        err.contains(&format!("1 pending migration(s) ({})", pending[0])),
        "{err}"
    );
    assert!(err.contains("run `celeriac migrate up`"), "{err}");
    t.admin.migrate(MigrateOp::Up).await.unwrap();
    db.check_ready(&t.config).await.unwrap();

    // The owner (a superuser here) as database_url: refused, row-level security would not apply.
    let privileged = DatabaseConfig::new(Some(admin_url()), None, Some(t.schema.clone()));
    let err = Db::connect(&privileged)
        .await
        .unwrap()
        .check_ready(&privileged)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a superuser: row-level security would not keep tenants apart"),
        "{err}"
    );

    // Status lists every migration, oldest first, all applied: tenants, then the families' tables.
    let admin = Admin::connect(&t.config).await.unwrap();
    let names: Vec<(String, bool)> = admin
        .status()
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.name, s.applied))
        .collect();
    assert!(names.iter().all(|(_, applied)| *applied), "{names:?}");
    assert_eq!(names[0].0, "m20261206_000003_tenants");
    assert_eq!(names[1].0, "m20261206_000004_email");
    assert!(names.windows(2).all(|w| w[0].0 < w[1].0), "{names:?}");
    t.drop_schema().await;
}

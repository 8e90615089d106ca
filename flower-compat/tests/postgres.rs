//! The task history in PostgreSQL (`CELERIAC_TEST_POSTGRES`, default `postgres://postgres@127.0.0.1:5432/test`),
//! in a schema of its own: migrations create the table, tasks survive reopening, filters and retention work.

use celeriac_flower::state::TaskRecord;
use celeriac_flower::store::{TaskQuery, TaskStore};
use sea_orm::{ConnectionTrait, Database};

fn pg_url() -> String {
    std::env::var("CELERIAC_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn task(uuid: &str, state: &str, t: f64) -> TaskRecord {
    TaskRecord {
        uuid: uuid.into(),
        name: Some("tasks.add".into()),
        state: state.into(),
        received: Some(t),
        timestamp: Some(t),
        worker: Some("w1@vm".into()),
        result: Some("5".into()),
        ..TaskRecord::default()
    }
}

#[tokio::test]
async fn history_survives_reopening_with_retention() {
    let schema = format!("flower_{}", &uuid_like()[..12]);
    let admin = Database::connect(pg_url()).await.unwrap();
    admin
        .execute_unprepared(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    {
        let store = TaskStore::open(&pg_url(), Some(&schema), 2, None)
            .await
            .unwrap();
        store
            .save(&[
                task("a", "SUCCESS", 1.0),
                task("b", "FAILURE", 2.0),
                task("c", "SUCCESS", 3.0),
            ])
            .await
            .unwrap();
    }
    // Reopen: migrations are idempotent and the rows are still there.
    let store = TaskStore::open(&pg_url(), Some(&schema), 2, None)
        .await
        .unwrap();
    assert_eq!(store.count().await.unwrap(), 3);
    assert_eq!(store.get("b").await.unwrap().unwrap().state, "FAILURE");
    let failed: Vec<String> = store
        .list(&TaskQuery {
            search: Some(celeriac_flower::search::parse("state:FAILURE").unwrap()),
            ..TaskQuery::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.uuid)
        .collect();
    assert_eq!(failed, ["b"]);
    assert_eq!(store.prune(10.0).await.unwrap(), 1);
    let left: Vec<String> = store
        .list(&TaskQuery::default())
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.uuid)
        .collect();
    assert_eq!(left, ["c", "b"]);
    admin
        .execute_unprepared(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

fn uuid_like() -> String {
    format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

//! The task history, persisted through sea-orm in SQLite (default) or PostgreSQL: upserts of changed tasks,
//! Flower's task list filters (worker, name, state, received range, search, sort, limit/offset), task types
//! and retention (at most `max_tasks` rows, none older than `max_age`).

use crate::search::Query;
use crate::state::TaskRecord;
use celeriac_entities::flower_task::{ActiveModel, Column, Entity};
use sea_orm::sea_query::{Expr, ExprTrait, Func, LikeExpr, OnConflict, SimpleExpr};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectOptions, Database, DatabaseConnection, DbErr,
    EntityTrait, Order, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
};
use std::time::Duration;

/// Flower's task list query (`/api/tasks`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskQuery {
    /// At most this many.
    pub limit: Option<u64>,
    /// Skip this many.
    pub offset: u64,
    /// Field to sort by; `-field` for descending.
    pub sort_by: Option<String>,
    /// Only this worker.
    pub workername: Option<String>,
    /// Only this task name.
    pub taskname: Option<String>,
    /// Only this state.
    pub state: Option<String>,
    /// Received at or after (Unix time).
    pub received_start: Option<f64>,
    /// Received before (Unix time).
    pub received_end: Option<f64>,
    /// Flower's search query ([`crate::search`]).
    pub search: Option<crate::search::Query>,
}

/// Where tasks are kept.
#[derive(Debug, Clone)]
pub struct TaskStore {
    db: DatabaseConnection,
    max_tasks: u64,
    max_age: Option<Duration>,
}

fn to_model(t: &TaskRecord) -> ActiveModel {
    ActiveModel {
        uuid: Set(t.uuid.clone()),
        name: Set(t.name.clone()),
        state: Set(t.state.clone()),
        received: Set(t.received),
        sent: Set(t.sent),
        started: Set(t.started),
        rejected: Set(t.rejected),
        succeeded: Set(t.succeeded),
        failed: Set(t.failed),
        retried: Set(t.retried),
        revoked: Set(t.revoked),
        args: Set(t.args.clone()),
        kwargs: Set(t.kwargs.clone()),
        eta: Set(t.eta.clone()),
        expires: Set(t.expires.clone()),
        retries: Set(t.retries),
        worker: Set(t.worker.clone()),
        result: Set(t.result.clone()),
        exception: Set(t.exception.clone()),
        timestamp: Set(t.timestamp),
        runtime: Set(t.runtime),
        traceback: Set(t.traceback.clone()),
        exchange: Set(t.exchange.clone()),
        routing_key: Set(t.routing_key.clone()),
        clock: Set(t.clock),
        client: Set(t.client.clone()),
        root_id: Set(t.root_id.clone()),
        parent_id: Set(t.parent_id.clone()),
        children: Set(t.children.clone()),
    }
}

fn column(name: &str) -> Option<Column> {
    Some(match name {
        "uuid" => Column::Uuid,
        "name" => Column::Name,
        "state" => Column::State,
        "received" => Column::Received,
        "sent" => Column::Sent,
        "started" => Column::Started,
        "succeeded" => Column::Succeeded,
        "failed" => Column::Failed,
        "retried" => Column::Retried,
        "revoked" => Column::Revoked,
        "rejected" => Column::Rejected,
        "timestamp" => Column::Timestamp,
        "runtime" => Column::Runtime,
        "worker" => Column::Worker,
        "args" => Column::Args,
        "kwargs" => Column::Kwargs,
        "result" => Column::Result,
        "retries" => Column::Retries,
        "eta" => Column::Eta,
        "expires" => Column::Expires,
        "clock" => Column::Clock,
        _ => return None,
    })
}

impl TaskStore {
    /// Opens the database at `url` (`sqlite://path?mode=rwc`, `sqlite::memory:`, `postgres://...`; for
    /// PostgreSQL `schema` sets the search path) and creates the table if needed.
    pub async fn open(
        url: &str,
        schema: Option<&str>,
        max_tasks: u64,
        max_age: Option<Duration>,
    ) -> Result<Self, DbErr> {
        use celeriac_migrations::MigratorTraitReexport;
        let mut opts = ConnectOptions::new(url.to_string());
        opts.sqlx_logging(false);
        if url.starts_with("sqlite:") {
            // One writer; an in-memory database must stay on one connection to stay the same database.
            opts.max_connections(1);
        }
        if let Some(s) = schema {
            opts.set_schema_search_path(s.to_string());
        }
        let db = Database::connect(opts).await?;
        celeriac_migrations::FlowerMigrator::up(&db, None).await?;
        Ok(Self {
            db,
            max_tasks,
            max_age,
        })
    }

    /// One task.
    pub async fn get(&self, uuid: &str) -> Result<Option<TaskRecord>, DbErr> {
        Entity::find_by_id(uuid.to_string()).one(&self.db).await
    }

    /// Writes tasks (insert or replace by uuid), in one statement.
    pub async fn save(&self, tasks: &[TaskRecord]) -> Result<(), DbErr> {
        if tasks.is_empty() {
            return Ok(());
        }
        let update: Vec<Column> = [
            Column::Name,
            Column::State,
            Column::Received,
            Column::Sent,
            Column::Started,
            Column::Rejected,
            Column::Succeeded,
            Column::Failed,
            Column::Retried,
            Column::Revoked,
            Column::Args,
            Column::Kwargs,
            Column::Eta,
            Column::Expires,
            Column::Retries,
            Column::Worker,
            Column::Result,
            Column::Exception,
            Column::Timestamp,
            Column::Runtime,
            Column::Traceback,
            Column::Exchange,
            Column::RoutingKey,
            Column::Clock,
            Column::Client,
            Column::RootId,
            Column::ParentId,
            Column::Children,
        ]
        .into();
        for chunk in tasks.chunks(200) {
            Entity::insert_many(chunk.iter().map(to_model))
                .on_conflict(
                    OnConflict::column(Column::Uuid)
                        .update_columns(update.clone())
                        .to_owned(),
                )
                .exec(&self.db)
                .await?;
        }
        Ok(())
    }

    /// Flower's task list: filters, search, then Flower's order (`sort_by`, or newest event first).
    pub async fn list(&self, q: &TaskQuery) -> Result<Vec<TaskRecord>, DbErr> {
        let mut cond = Condition::all();
        // Flower compares names, workers and states casefolded.
        if let Some(w) = &q.workername {
            cond = cond.add(lower(Column::Worker).eq(w.to_lowercase()));
        }
        if let Some(n) = &q.taskname {
            cond = cond.add(lower(Column::Name).eq(n.to_lowercase()));
        }
        if let Some(s) = &q.state {
            cond = cond.add(lower(Column::State).eq(s.to_lowercase()));
        }
        // A task never received stays in every received range (Flower's `_task_in_time_range`).
        if let Some(t) = q.received_start {
            cond = cond.add(
                Condition::any()
                    .add(Column::Received.is_null())
                    .add(Column::Received.gte(t)),
            );
        }
        if let Some(t) = q.received_end {
            cond = cond.add(
                Condition::any()
                    .add(Column::Received.is_null())
                    .add(Column::Received.lte(t)),
            );
        }
        if let Some(query) = &q.search {
            cond = cond.add(search_condition(query));
        }
        let mut find = Entity::find().filter(cond);
        match q.sort_by.as_deref() {
            Some(s) => {
                let (field, order) = match s.strip_prefix('-') {
                    Some(f) => (f, Order::Desc),
                    None => (s, Order::Asc),
                };
                if let Some(c) = column(field) {
                    // Flower's key (has value, value, uuid), reversed as a whole when descending: missing
                    // values first ascending, last descending; strings casefolded.
                    let value: SimpleExpr = match field {
                        "received" | "started" | "runtime" | "timestamp" | "succeeded"
                        | "failed" | "retried" | "revoked" | "rejected" | "sent" | "retries"
                        | "clock" => Expr::col(c),
                        _ => lower(c),
                    };
                    find = find
                        .order_by(Expr::col(c).is_not_null(), order.clone())
                        .order_by(value, order.clone())
                        .order_by(Column::Uuid, order);
                }
            }
            None => {
                // Newest event first (Flower: `timestamp or 0`, then uuid, descending).
                find = find
                    .order_by(
                        Func::coalesce([Expr::col(Column::Timestamp), Expr::val(0.0)]),
                        Order::Desc,
                    )
                    .order_by(Column::Uuid, Order::Desc);
            }
        }
        // SQLite needs a LIMIT with OFFSET; "no limit" is the largest one.
        find = find
            .offset(q.offset)
            .limit(q.limit.unwrap_or(i64::MAX as u64));
        find.all(&self.db).await
    }

    /// Task names seen, sorted.
    pub async fn types(&self) -> Result<Vec<String>, DbErr> {
        let rows: Vec<Option<String>> = Entity::find()
            .select_only()
            .column(Column::Name)
            .distinct()
            .into_tuple()
            .all(&self.db)
            .await?;
        let mut names: Vec<String> = rows.into_iter().flatten().collect();
        names.sort();
        Ok(names)
    }

    /// Every task id kept.
    pub async fn ids(&self) -> Result<Vec<String>, DbErr> {
        Entity::find()
            .select_only()
            .column(Column::Uuid)
            .into_tuple()
            .all(&self.db)
            .await
    }

    /// Rows kept.
    pub async fn count(&self) -> Result<u64, DbErr> {
        Entity::find().count(&self.db).await
    }

    /// Applies retention: deletes tasks whose last event is older than `max_age` (relative to `now`), then
    /// the oldest beyond `max_tasks`. Returns how many were deleted.
    pub async fn prune(&self, now: f64) -> Result<u64, DbErr> {
        let mut deleted = 0;
        if let Some(age) = self.max_age {
            deleted += Entity::delete_many()
                .filter(Column::Timestamp.lt(now - age.as_secs_f64()))
                .exec(&self.db)
                .await?
                .rows_affected;
        }
        let total = self.count().await?;
        if total > self.max_tasks {
            let excess = total - self.max_tasks;
            let oldest: Vec<String> = Entity::find()
                .select_only()
                .column(Column::Uuid)
                .order_by(Column::Timestamp, Order::Asc)
                .limit(excess)
                .into_tuple()
                .all(&self.db)
                .await?;
            for chunk in oldest.chunks(500) {
                deleted += Entity::delete_many()
                    .filter(Column::Uuid.is_in(chunk.to_vec()))
                    .exec(&self.db)
                    .await?
                    .rows_affected;
            }
        }
        Ok(deleted)
    }
}

fn lower(c: Column) -> SimpleExpr {
    Func::lower(Expr::col(c)).into()
}

/// `%value%` with LIKE's wildcards escaped.
fn contains_pattern(value: &str) -> LikeExpr {
    let escaped = value
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    LikeExpr::new(format!("%{escaped}%")).escape('\\')
}

/// A search query as a condition on the casefolded columns.
fn search_condition(q: &Query) -> Condition {
    match q {
        Query::All => Condition::all(),
        Query::And(children) => children
            .iter()
            .fold(Condition::all(), |c, child| c.add(search_condition(child))),
        Query::Or(children) => children
            .iter()
            .fold(Condition::any(), |c, child| c.add(search_condition(child))),
        Query::Term { field, value } => match field.as_deref() {
            Some("state") => Condition::all().add(lower(Column::State).eq(value.clone())),
            Some("kwargs") if value.contains('=') => {
                // Flower matches `key=value` against the kwargs dict: here against its repr,
                // `'key': value` or `'key': 'value'`.
                let (k, v) = value.split_once('=').expect("checked");
                let (k, v) = (k.trim(), v.trim());
                Condition::any()
                    .add(lower(Column::Kwargs).like(contains_pattern(&format!("'{k}': {v}"))))
                    .add(lower(Column::Kwargs).like(contains_pattern(&format!("'{k}': '{v}'"))))
            }
            Some(f) => match column(f) {
                Some(c) => Condition::all().add(lower(c).like(contains_pattern(value))),
                None => Condition::all(),
            },
            None => [
                Column::Uuid,
                Column::Name,
                Column::State,
                Column::Worker,
                Column::Args,
                Column::Kwargs,
                Column::Result,
            ]
            .into_iter()
            .fold(Condition::any(), |c, col| {
                c.add(lower(col).like(contains_pattern(value)))
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(uuid: &str, name: &str, state: &str, received: f64, worker: &str) -> TaskRecord {
        TaskRecord {
            uuid: uuid.into(),
            name: Some(name.into()),
            state: state.into(),
            received: Some(received),
            timestamp: Some(received + 1.0),
            worker: Some(worker.into()),
            args: Some(format!("({received},)")),
            children: celeriac_entities::flower_task::TaskIds(vec!["c1".into()]),
            ..TaskRecord::default()
        }
    }

    async fn store(max_tasks: u64, max_age: Option<Duration>) -> TaskStore {
        TaskStore::open("sqlite::memory:", None, max_tasks, max_age)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn saves_updates_and_reads_back() {
        let s = store(100, None).await;
        let mut t = task("a", "tasks.add", "RECEIVED", 10.0, "w1@vm");
        s.save(std::slice::from_ref(&t)).await.unwrap();
        t.state = "SUCCESS".into();
        t.result = Some("5".into());
        s.save(std::slice::from_ref(&t)).await.unwrap();
        assert_eq!(s.get("a").await.unwrap(), Some(t));
        assert_eq!(s.get("nope").await.unwrap(), None);
        assert_eq!(s.count().await.unwrap(), 1);
        assert_eq!(s.ids().await.unwrap(), ["a"]);
    }

    #[tokio::test]
    async fn filters_as_flower() {
        let s = store(100, None).await;
        s.save(&[
            task("a", "tasks.add", "SUCCESS", 10.0, "w1@vm"),
            task("b", "tasks.add", "FAILURE", 20.0, "w2@vm"),
            task("c", "tasks.mul", "SUCCESS", 30.0, "w1@vm"),
            task("d", "tasks.add", "SUCCESS", 40.0, "w1@vm"),
        ])
        .await
        .unwrap();
        let ids = |v: Vec<TaskRecord>| v.into_iter().map(|t| t.uuid).collect::<Vec<_>>();
        let q = |f: fn(&mut TaskQuery)| {
            let mut q = TaskQuery::default();
            f(&mut q);
            q
        };
        assert_eq!(
            ids(s.list(&TaskQuery::default()).await.unwrap()),
            ["d", "c", "b", "a"],
            "Flower's default order: newest event first"
        );
        assert_eq!(
            ids(s
                .list(&q(|q| {
                    q.taskname = Some("tasks.add".into());
                    q.state = Some("success".into());
                    q.sort_by = Some("-received".into());
                    q.limit = Some(3);
                }))
                .await
                .unwrap()),
            ["d", "a"]
        );
        assert_eq!(
            ids(s
                .list(&q(|q| q.workername = Some("w2@vm".into())))
                .await
                .unwrap()),
            ["b"]
        );
        assert_eq!(
            ids(s
                .list(&q(|q| {
                    q.received_start = Some(15.0);
                    q.limit = Some(2);
                    q.offset = 1;
                }))
                .await
                .unwrap()),
            ["c", "b"]
        );
        let search = |text: &str| TaskQuery {
            search: Some(crate::search::parse(text).unwrap()),
            ..TaskQuery::default()
        };
        assert_eq!(ids(s.list(&search("state:FAILURE")).await.unwrap()), ["b"]);
        assert_eq!(ids(s.list(&search("MUL")).await.unwrap()), ["c"]);
        assert_eq!(
            ids(s.list(&search("tasks.mul OR w2@vm")).await.unwrap()),
            ["c", "b"]
        );
        assert_eq!(ids(s.list(&search("args:\"(40,)\"")).await.unwrap()), ["d"]);
        assert_eq!(
            ids(s
                .list(&q(|q| q.sort_by = Some("-name".into())))
                .await
                .unwrap()),
            ["c", "d", "b", "a"]
        );
        assert_eq!(s.types().await.unwrap(), ["tasks.add", "tasks.mul"]);
    }

    #[tokio::test]
    async fn retention_by_count_and_age() {
        let s = store(2, Some(Duration::from_secs(100))).await;
        s.save(&[
            task("old", "t", "SUCCESS", 0.0, "w"),
            task("a", "t", "SUCCESS", 500.0, "w"),
            task("b", "t", "SUCCESS", 600.0, "w"),
            task("c", "t", "SUCCESS", 650.0, "w"),
        ])
        .await
        .unwrap();
        // now = 700: "old" is older than 100 s; of the rest only the newest two stay.
        assert_eq!(s.prune(700.0).await.unwrap(), 2);
        let left: Vec<String> = s
            .list(&TaskQuery::default())
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.uuid)
            .collect();
        assert_eq!(left, ["c", "b"]);
    }
}

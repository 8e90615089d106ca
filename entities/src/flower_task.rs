//! `celeriac_flower_task`: one row per task seen in Celery events, as Flower's `/api/task/info` shows it
//! (`celeriac flower` keeps its task history here, so a restart keeps it). [`Model`] is the one task record:
//! flower-compat assembles it from events (as `TaskRecord`), serves it and stores it as it is.

use sea_orm::entity::prelude::*;

/// A task's state as assembled from its events (Celery's `events.state.Task`).
#[derive(Clone, Debug, PartialEq, Default, DeriveEntityModel)]
#[sea_orm(table_name = "celeriac_flower_task")]
pub struct Model {
    /// Task id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub uuid: String,
    /// Task name (from `task-received` / `task-sent`).
    pub name: Option<String>,
    /// State (`PENDING`, `RECEIVED`, `STARTED`, `SUCCESS`, `FAILURE`, `RETRY`, `REVOKED`, `REJECTED`).
    pub state: String,
    /// Unix time of `task-received`.
    pub received: Option<f64>,
    /// Unix time of `task-sent`.
    pub sent: Option<f64>,
    /// Unix time of `task-started`.
    pub started: Option<f64>,
    /// Unix time of `task-rejected`.
    pub rejected: Option<f64>,
    /// Unix time of `task-succeeded`.
    pub succeeded: Option<f64>,
    /// Unix time of `task-failed`.
    pub failed: Option<f64>,
    /// Unix time of `task-retried`.
    pub retried: Option<f64>,
    /// Unix time of `task-revoked`.
    pub revoked: Option<f64>,
    /// `argsrepr`.
    pub args: Option<String>,
    /// `kwargsrepr`.
    pub kwargs: Option<String>,
    /// ETA (ISO 8601).
    pub eta: Option<String>,
    /// Expiry (ISO 8601).
    pub expires: Option<String>,
    /// Retries so far.
    pub retries: Option<i64>,
    /// Node name of the worker.
    pub worker: Option<String>,
    /// `repr` of the return value.
    pub result: Option<String>,
    /// `repr` of the exception.
    pub exception: Option<String>,
    /// Time of the event that set the state.
    pub timestamp: Option<f64>,
    /// Seconds the task ran.
    pub runtime: Option<f64>,
    /// Traceback text.
    pub traceback: Option<String>,
    /// Exchange it was published to.
    pub exchange: Option<String>,
    /// Routing key it was published with.
    pub routing_key: Option<String>,
    /// Logical clock of the last event.
    pub clock: i64,
    /// Node name of the client that sent it.
    pub client: Option<String>,
    /// Root task id.
    pub root_id: Option<String>,
    /// Parent task id.
    pub parent_id: Option<String>,
    /// Ids of child tasks (a JSON list in the table).
    pub children: TaskIds,
}

/// A list of task ids, stored as a JSON list in a text column.
#[derive(Clone, Debug, PartialEq, Eq, Default, DeriveValueType)]
#[sea_orm(value_type = "String")]
pub struct TaskIds(pub Vec<String>);

impl std::fmt::Display for TaskIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let json = serde_json::to_string(&self.0).map_err(|_| std::fmt::Error)?;
        f.write_str(&json)
    }
}

impl std::str::FromStr for TaskIds {
    type Err = serde_json::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_str(s).map(TaskIds)
    }
}

impl std::ops::Deref for TaskIds {
    type Target = Vec<String>;

    fn deref(&self) -> &Vec<String> {
        &self.0
    }
}

impl std::ops::DerefMut for TaskIds {
    fn deref_mut(&mut self) -> &mut Vec<String> {
        &mut self.0
    }
}

/// No relations are navigated from here.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

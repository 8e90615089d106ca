//! Domain errors, and how each reaches a Celery client: an unknown tenant or a missing setting fails the
//! task at once with a named exception; a database that is down is retried.

use celeriac_task::{ExceptionInfo, TaskError};
use sea_orm::{DbErr, RuntimeErr};
use thiserror::Error;

/// What can go wrong in the domain layer.
#[derive(Debug, Error)]
pub enum DomainError {
    /// No tenant has this id or slug.
    #[error("UnknownTenant('{0}')")]
    UnknownTenant(String),
    /// A setting the operation needs is missing.
    #[error("{0} is not set")]
    NotConfigured(String),
    /// The database is behind the code.
    #[error("{0}")]
    NotMigrated(String),
    /// The application role could bypass row-level security.
    #[error("{0}")]
    PrivilegedRole(String),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] DbErr),
}

impl DomainError {
    /// True when retrying later can help (the connection, a pool timeout, a server going away, a
    /// serialization failure), false for errors in the request itself.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Db(e) => db_err_is_transient(e),
            _ => false,
        }
    }
}

/// Classifies a sea-orm error: connection trouble and SQLSTATE classes 08 (connection), 57P0x (server
/// shutting down), 40001/40P01 (serialization, deadlock) and 53 (resources) are transient.
pub fn db_err_is_transient(e: &DbErr) -> bool {
    match e {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(s)) | DbErr::Query(RuntimeErr::SqlxError(s)) => {
            use sea_orm::sqlx::Error as S;
            match s.as_ref() {
                S::Io(_) | S::PoolTimedOut | S::PoolClosed | S::WorkerCrashed | S::Protocol(_) => {
                    true
                }
                S::Database(d) => d.code().is_some_and(|c| {
                    c.starts_with("08")
                        || c.starts_with("57P")
                        || c.starts_with("53")
                        || c == "40001"
                        || c == "40P01"
                }),
                _ => false,
            }
        }
        _ => false,
    }
}

impl From<DomainError> for TaskError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::UnknownTenant(v) => TaskError::celeriac("UnknownTenant", v),
            DomainError::NotConfigured(key) => {
                TaskError::celeriac("ConfigurationError", format!("{key} is not set"))
            }
            DomainError::NotMigrated(m) | DomainError::PrivilegedRole(m) => {
                TaskError::celeriac("ConfigurationError", m)
            }
            e @ DomainError::Db(_) if e.is_transient() => TaskError::transient(
                ExceptionInfo::new("builtins", "ConnectionError", e.to_string()),
                1.0 + celeriac_task::random_unit() * 4.0,
                None,
            ),
            DomainError::Db(e) => TaskError::celeriac("DatabaseError", e.to_string()),
        }
    }
}

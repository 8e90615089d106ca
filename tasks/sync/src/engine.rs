//! The incremental engine every stream uses (catalog products, orders, customers): one run per tenant and
//! stream at a time (a lease on its `sync_state` row); each page is upserted in one transaction together
//! with its checkpoint (the resume URL and the composite `(updated_at, id)` cursor), so a run killed anywhere
//! resumes from the last committed page with nothing lost or doubled; a full pass ends by soft-deleting what
//! the source no longer has. Singer's rule: the bookmark is written only with the records it covers.

use crate::source::{CatalogSource, FetchObserver, PageRequest, SourceError, Stream};
use crate::store::{self, Checkpoint};
use celeriac_domain::{DomainError, Tenant, TenantTx, Tenants};
use celeriac_task::SharedLimiter;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::{Value, json};
use std::sync::Arc;
use uuid::Uuid;

/// `(updated_at, id)`: records are ordered, and the cursor advanced, by both.
pub type Cursor = (DateTime<Utc>, i64);

/// Counts of one page or pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Records received.
    pub fetched: u64,
    /// Records inserted or changed.
    pub upserted: u64,
    /// Records already stored as they are.
    pub unchanged: u64,
    /// Records soft-deleted (full pass, or a delete webhook).
    pub deleted: u64,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.fetched += o.fetched;
        self.upserted += o.upserted;
        self.unchanged += o.unchanged;
        self.deleted += o.deleted;
    }

    /// As stored in `sync_state.pass_counts`.
    pub fn to_json(self) -> Value {
        json!({"fetched": self.fetched, "upserted": self.upserted, "unchanged": self.unchanged, "deleted": self.deleted})
    }

    /// From `sync_state.pass_counts`.
    pub fn from_json(v: &Value) -> Self {
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        Self {
            fetched: n("fetched"),
            upserted: n("upserted"),
            unchanged: n("unchanged"),
            deleted: n("deleted"),
        }
    }
}

/// How a stream's records are stored.
pub trait StreamHandler: Send + Sync {
    /// Which stream.
    fn stream(&self) -> Stream;
    /// A record's cursor.
    fn cursor(&self, record: &Value) -> Result<Cursor, String>;
    /// Upserts records (by `(tenant_id, external_id)`, skipping unchanged content), marking them seen by
    /// `pass`; returns the counts and follow-up work to publish once the page is committed.
    fn upsert<'a>(
        &'a self,
        tx: &'a TenantTx,
        records: &'a [Value],
        pass: Option<Uuid>,
    ) -> BoxFuture<'a, Result<(Counts, Vec<Value>), DomainError>>;
    /// After a full pass: soft-deletes every live row not seen by `pass`.
    fn sweep<'a>(&'a self, tx: &'a TenantTx, pass: Uuid)
    -> BoxFuture<'a, Result<u64, DomainError>>;
    /// Soft-deletes one record (a delete webhook).
    fn delete<'a>(
        &'a self,
        tx: &'a TenantTx,
        external_id: i64,
    ) -> BoxFuture<'a, Result<u64, DomainError>>;
}

/// A full pass (every record; deletes what is gone) or an incremental one (from the cursor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every record.
    Full,
    /// Records updated at or after the cursor.
    Incremental,
}

impl Mode {
    /// The name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Incremental => "incremental",
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// The pass completed (possibly resumed).
    Done {
        /// The pass's totals.
        counts: Counts,
        /// The cursor after it.
        cursor: Option<Cursor>,
        /// Pages committed in the pass.
        pages: u64,
    },
    /// Another run holds the lease.
    Busy,
}

/// Why a run stopped early.
#[derive(Debug)]
pub enum RunError {
    /// The source failed (the checkpoint stays: the next run resumes).
    Source(SourceError),
    /// The database failed.
    Db(DomainError),
    /// A record could not be read.
    Record(String),
}

impl From<DomainError> for RunError {
    fn from(e: DomainError) -> Self {
        Self::Db(e)
    }
}

/// Publishes follow-up work after a page commits (image embedding requests).
pub type FollowUp = Arc<dyn Fn(Vec<Value>) -> BoxFuture<'static, ()> + Send + Sync>;

/// One run's inputs.
pub struct Run<'a> {
    /// The domain database.
    pub tenants: &'a Tenants,
    /// The tenant.
    pub tenant: &'a Tenant,
    /// The source.
    pub source: &'a dyn CatalogSource,
    /// How records are stored.
    pub handler: &'a dyn StreamHandler,
    /// Full or incremental.
    pub mode: Mode,
    /// The lease (renewed with each page).
    pub lease: std::time::Duration,
    /// Who holds it (the task id).
    pub owner: &'a str,
    /// The cluster-wide limiter.
    pub limiter: Option<&'a Arc<dyn SharedLimiter>>,
    /// Metrics.
    pub observer: &'a dyn FetchObserver,
    /// Follow-up publisher.
    pub follow_up: Option<&'a FollowUp>,
}

fn ts(c: &Option<Cursor>) -> Value {
    c.map(|(t, id)| json!({"updated_at": t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true), "id": id}))
        .unwrap_or(Value::Null)
}

/// The cursor as the result and `sync.status` show it.
pub fn cursor_json(c: &Option<Cursor>) -> Value {
    ts(c)
}

/// Runs (or resumes) one pass.
pub async fn run(r: &Run<'_>) -> Result<RunOutcome, RunError> {
    let stream = r.handler.stream();
    let tx = TenantTx::begin(r.tenants.db(), r.tenant.clone()).await?;
    let Some(mut cp) = store::take_lease(&tx, stream, r.owner, r.lease).await? else {
        tx.commit().await?;
        return Ok(RunOutcome::Busy);
    };
    // A pass left unfinished is resumed as it was; otherwise a new one starts.
    if cp.resume_url.is_none() || cp.pass_id.is_none() {
        cp.pass_id = Some(Uuid::new_v4());
        cp.pass_mode = Some(r.mode.as_str().into());
        cp.counts = Counts::default();
        cp.pages = 0;
        store::start_pass(&tx, stream, &cp).await?;
    }
    tx.commit().await?;
    let pass = cp.pass_id.expect("a pass");
    let full = cp.pass_mode.as_deref() == Some("full");
    let mut request = match &cp.resume_url {
        Some(u) => PageRequest::Next(u.clone()),
        None => PageRequest::First {
            updated_at_min: (!full)
                .then(|| {
                    cp.cursor
                        .map(|(t, _)| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                })
                .flatten(),
        },
    };
    loop {
        let page = r
            .source
            .fetch(stream, &request, r.limiter, r.observer)
            .await
            .map_err(RunError::Source)?;
        let mut cursor = cp.cursor;
        for rec in &page.records {
            let c = r.handler.cursor(rec).map_err(RunError::Record)?;
            if cursor.is_none_or(|cur| c > cur) {
                cursor = Some(c);
            }
        }
        let tx = TenantTx::begin(r.tenants.db(), r.tenant.clone()).await?;
        let (counts, follow) = r.handler.upsert(&tx, &page.records, Some(pass)).await?;
        cp.counts.add(counts);
        cp.pages += 1;
        cp.cursor = cursor;
        cp.resume_url = page.next.clone();
        let last = page.next.is_none();
        if last && full {
            cp.counts.deleted += r.handler.sweep(&tx, pass).await?;
        }
        store::checkpoint(&tx, stream, &cp, r.owner, r.lease, last).await?;
        tx.commit().await?;
        if let (Some(f), false) = (r.follow_up, follow.is_empty()) {
            f(follow).await;
        }
        match page.next {
            Some(n) => request = PageRequest::Next(n),
            None => break,
        }
    }
    Ok(RunOutcome::Done {
        counts: cp.counts,
        cursor: cp.cursor,
        pages: cp.pages,
    })
}

/// Records a failed run on its state row (and releases the lease; the checkpoint stays).
pub async fn record_failure(
    tenants: &Tenants,
    tenant: &Tenant,
    stream: Stream,
    owner: &str,
    error: &str,
) {
    let done = async {
        let tx = TenantTx::begin(tenants.db(), tenant.clone()).await?;
        store::fail_run(&tx, stream, owner, error).await?;
        tx.commit().await
    }
    .await;
    if let Err(e) = done {
        tracing::warn!(error = %e, "recording a failed sync run");
    }
}

/// The checkpoint type, re-exported for the store.
pub type State = Checkpoint;

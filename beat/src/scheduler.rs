//! The scheduler: on each tick the leader (one beat among any number) sends every due slot once. A slot is
//! claimed in Redis before it is published, so during a failover, or with a paused old leader waking up,
//! no slot is sent twice; the last slot is persisted, so a restart neither re-sends nor skips.

use crate::config::{Entry, Loaded};
use crate::metrics::BeatMetrics;
use crate::schedule::due_slot;
use crate::store::BeatStore;
use celeriac_canvas::{ApplyOptions, Canvas};
use celeriac_protocol::repr;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, error, info, warn};

/// One beat process.
pub struct Beat {
    /// Unique id of this process (lease owner).
    pub id: String,
    store: Arc<dyn BeatStore>,
    canvas: Canvas,
    schedule: Loaded,
    lease: Duration,
    leading: bool,
    metrics: BeatMetrics,
}

impl std::fmt::Debug for Beat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Beat")
            .field("id", &self.id)
            .field("leading", &self.leading)
            .finish()
    }
}

/// What one tick did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tick {
    /// Whether this beat leads.
    pub leader: bool,
    /// `(entry, slot)` sent by this beat.
    pub sent: Vec<(String, DateTime<Utc>)>,
    /// When the next slot is due (for sleeping).
    pub next: Option<DateTime<Utc>>,
}

impl Beat {
    /// A beat with its schedule.
    pub fn new(
        id: String,
        store: Arc<dyn BeatStore>,
        canvas: Canvas,
        schedule: Loaded,
        lease: Duration,
        metrics: BeatMetrics,
    ) -> Self {
        Self {
            id,
            store,
            canvas,
            schedule,
            lease,
            leading: false,
            metrics,
        }
    }

    /// Replaces the schedule (reload).
    pub fn set_schedule(&mut self, schedule: Loaded) {
        self.schedule = schedule;
    }

    /// Gives up leadership (clean shutdown).
    pub async fn resign(&self) {
        if let Err(e) = self.store.resign(&self.id).await {
            warn!(error = %e, "releasing the beat lease failed");
        }
    }

    /// Runs the schedule at `now`.
    pub async fn tick(&mut self, now: DateTime<Utc>) -> Tick {
        let mut tick = Tick::default();
        let leader = match self.store.lead(&self.id, now, self.lease).await {
            Ok(l) => l,
            Err(e) => {
                error!(error = %e, "beat lease check failed");
                false
            }
        };
        if leader != self.leading {
            info!(id = %self.id, leader, "beat leadership changed");
            self.leading = leader;
        }
        self.metrics.leader.set(i64::from(leader));
        tick.leader = leader;
        if !leader {
            return tick;
        }
        let entries = self.schedule.entries.clone();
        let mut due_now = 0;
        for entry in &entries {
            if entry.start_time.is_some_and(|t| now < t) || entry.expires.is_some_and(|t| now > t) {
                continue;
            }
            if let Err(e) = self.store.init_last_run(&entry.name, now).await {
                error!(error = %e, entry = %entry.name, "beat state unavailable");
                continue;
            }
            let last = match self.store.last_run(&entry.name).await {
                Ok(Some(l)) => l,
                Ok(None) => now,
                Err(e) => {
                    error!(error = %e, entry = %entry.name, "beat state unavailable");
                    continue;
                }
            };
            let (slot, next) = due_slot(&entry.schedule, last, now, self.schedule.catch_up);
            tick.next = match (tick.next, next) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let Some(slot) = slot else {
                // Skipped slots (catch_up = "skip"): move past them without sending.
                if let Some(n) = next
                    && let Some(skipped) = entry
                        .schedule
                        .next_after(last)
                        .filter(|s| *s < n && *s <= now)
                    && self
                        .store
                        .claim(&entry.name, skipped)
                        .await
                        .unwrap_or(false)
                {
                    self.metrics.skipped(&entry.name);
                    info!(entry = %entry.name, slot = %skipped, "skipped missed slots");
                }
                continue;
            };
            due_now += 1;
            match self.store.claim(&entry.name, slot).await {
                Ok(true) => {
                    if self.publish(entry).await {
                        self.metrics
                            .sent(&entry.name, (now - slot).num_milliseconds() as f64 / 1000.0);
                        tick.sent.push((entry.name.clone(), slot));
                        if entry.one_off
                            && let Err(e) = self.store.finish_one_off(&entry.name).await
                        {
                            error!(error = %e, entry = %entry.name, "disabling a one-off entry failed");
                        }
                    }
                }
                Ok(false) => {
                    debug!(entry = %entry.name, %slot, "slot already sent by another beat")
                }
                Err(e) => error!(error = %e, entry = %entry.name, "claiming a slot failed"),
            }
        }
        self.metrics.due.set(due_now);
        tick
    }

    /// Publishes an entry as celery beat 5.7 does: `apply_async(args, kwargs, **options)` with
    /// `argsrepr` in list form and the `celery_beat_task` header.
    async fn publish(&self, entry: &Entry) -> bool {
        let mut options = entry.options.clone();
        let mut headers = match options.remove("headers") {
            Some(Value::Object(h)) => h,
            _ => Default::default(),
        };
        headers.insert("celery_beat_task".into(), Value::Bool(true));
        options.insert("headers".into(), Value::Object(headers));
        options.insert(
            "argsrepr".into(),
            json!(repr::repr(&Value::Array(entry.args.clone()))),
        );
        let sig = json!({"task": entry.task, "args": entry.args, "kwargs": entry.kwargs, "options": options,
            "subtask_type": null, "immutable": false});
        match self.canvas.apply(&sig, &[], ApplyOptions::default()).await {
            Ok(applied) => {
                info!(entry = %entry.name, task = %entry.task, id = %applied.id(), "Scheduler: Sending due task");
                true
            }
            Err(e) => {
                error!(entry = %entry.name, error = %e, "sending a scheduled task failed; the slot is lost");
                false
            }
        }
    }
}

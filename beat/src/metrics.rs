//! Beat metrics on its own `/metrics` port: slots sent and skipped per entry, how late slots were sent,
//! entries due on the last tick, and whether this beat leads.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Per-entry labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EntryLabels {
    /// Entry name.
    pub entry: String,
}

/// Beat metrics (cheap to clone).
#[derive(Clone)]
pub struct BeatMetrics {
    registry: Arc<Registry>,
    sent: Family<EntryLabels, Counter>,
    skipped: Family<EntryLabels, Counter>,
    late: Histogram,
    /// Entries due on the last tick.
    pub due: Gauge,
    /// 1 while this beat leads.
    pub leader: Gauge,
}

impl Default for BeatMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let sent = Family::<EntryLabels, Counter>::default();
        let skipped = Family::<EntryLabels, Counter>::default();
        let late = Histogram::new([0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0]);
        let due = Gauge::default();
        let leader = Gauge::default();
        registry.register("celeriac_beat_sent", "Scheduled slots sent", sent.clone());
        registry.register(
            "celeriac_beat_skipped",
            "Missed slots skipped (catch_up = skip)",
            skipped.clone(),
        );
        registry.register(
            "celeriac_beat_late_seconds",
            "How late a slot was sent",
            late.clone(),
        );
        registry.register(
            "celeriac_beat_due",
            "Entries due on the last tick",
            due.clone(),
        );
        registry.register(
            "celeriac_beat_leader",
            "1 while this beat sends",
            leader.clone(),
        );
        Self {
            registry: Arc::new(registry),
            sent,
            skipped,
            late,
            due,
            leader,
        }
    }
}

impl BeatMetrics {
    /// A slot was sent `late` seconds after it was due.
    pub fn sent(&self, entry: &str, late: f64) {
        self.sent
            .get_or_create(&EntryLabels {
                entry: entry.into(),
            })
            .inc();
        self.late.observe(late.max(0.0));
    }

    /// Missed slots were skipped.
    pub fn skipped(&self, entry: &str) {
        self.skipped
            .get_or_create(&EntryLabels {
                entry: entry.into(),
            })
            .inc();
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// The `/metrics` router.
    pub fn router(&self) -> Router {
        let m = self.clone();
        Router::new().route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                        .into_response()
                }
            }),
        )
    }
}

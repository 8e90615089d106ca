//! The family's metrics (on the worker's `/metrics`): the executor's series (`celeriac_recommend_batch_size`,
//! `_queue_wait_seconds`, `_inference_seconds`, `_queued`, `_device`), answers by the model that gave them,
//! interactions recorded, and trainings by outcome.

use celeriac_inference::BatchMetrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// The `model` label: `transformer`, `popularity` or `visual`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    /// Which model answered.
    pub model: String,
}

/// The `outcome` label of trainings: `trained` or `popularity` (too little data).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// What the training did.
    pub outcome: String,
}

/// The recommendation metrics.
#[derive(Debug, Clone)]
pub struct RecommendMetrics {
    /// The executor's series.
    pub batch: Arc<BatchMetrics>,
    /// Answers by model.
    pub answers: Family<ModelLabel, Counter>,
    /// Interactions recorded.
    pub recorded: Counter,
    /// `recommend.record` calls whose event the tenant already had (redeliveries, resent events).
    pub duplicates: Counter,
    /// Trainings by outcome.
    pub trainings: Family<OutcomeLabel, Counter>,
}

impl RecommendMetrics {
    /// Registers every series in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            batch: Arc::new(BatchMetrics::new(
                registry,
                "celeriac_recommend",
                "Histories",
            )),
            answers: Family::default(),
            recorded: Counter::default(),
            duplicates: Counter::default(),
            trainings: Family::default(),
        };
        registry.register(
            "celeriac_recommend_answers",
            "Recommendation answers by the model that gave them",
            m.answers.clone(),
        );
        registry.register(
            "celeriac_recommend_recorded",
            "Interactions recorded by recommend.record",
            m.recorded.clone(),
        );
        registry.register(
            "celeriac_recommend_duplicates",
            "recommend.record calls whose event was already recorded (a redelivered task, a resent event_id)",
            m.duplicates.clone(),
        );
        registry.register(
            "celeriac_recommend_trainings",
            "recommend.train runs by outcome (trained, or popularity for too little data)",
            m.trainings.clone(),
        );
        m
    }

    /// Counts one answer of `model`.
    pub fn answer(&self, model: &str) {
        self.answers
            .get_or_create(&ModelLabel {
                model: model.into(),
            })
            .inc();
    }
}

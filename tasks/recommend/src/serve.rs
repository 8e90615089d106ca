//! Serving: the transformer behind the shared batching executor (`celeriac-inference`). A request carries
//! the tenant's model version ([`Blob`]); the executor's runner keeps each tenant's network on the device
//! and reloads it when a request brings a newer version (the hot swap), so workers switch without a restart.
//! One batch may mix tenants: it is split by model and each part runs as one forward pass.

use crate::model::{SasRec, ids_tensor, left_pad};
use crate::weights::Blob;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use celeriac_inference::Runner;
use std::collections::HashMap;
use std::sync::Arc;

/// What to score.
#[derive(Debug, Clone)]
pub enum Query {
    /// The next item after a history (item numbers, oldest first): softmax probabilities.
    Next(Vec<u32>),
    /// Items like one item: cosine similarity of the item embeddings.
    Similar(u32),
}

/// One request: a tenant's model and a query.
#[derive(Debug, Clone)]
pub struct Request {
    /// The model version to answer with.
    pub model: Arc<Blob>,
    /// The question.
    pub query: Query,
}

struct Loaded<B: Backend> {
    version: i32,
    model: SasRec<B>,
    /// Unit-length item embeddings, row-major `[items + 1, dim]`.
    unit: Vec<f32>,
    dim: usize,
}

/// The runner: every tenant's network on one device.
pub struct TransformerRunner<B: Backend> {
    device: B::Device,
    loaded: HashMap<uuid::Uuid, Loaded<B>>,
}

impl<B: Backend> TransformerRunner<B> {
    /// An empty runner on `device`.
    pub fn new(device: B::Device) -> Self {
        Self {
            device,
            loaded: HashMap::new(),
        }
    }

    fn ensure(&mut self, blob: &Blob) -> Result<&Loaded<B>, String> {
        let stale = self
            .loaded
            .get(&blob.tenant)
            .is_none_or(|l| l.version != blob.version);
        if stale {
            let model = blob.load::<B>(&self.device)?;
            let emb = model.item_embeddings();
            let dim = emb.dims()[1];
            let mut unit: Vec<f32> = emb.into_data().iter::<f32>().collect();
            for row in unit.chunks_mut(dim) {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                row.iter_mut().for_each(|x| *x /= norm);
            }
            tracing::info!(tenant = %blob.tenant, version = blob.version, "recommend: model loaded");
            self.loaded.insert(
                blob.tenant,
                Loaded {
                    version: blob.version,
                    model,
                    unit,
                    dim,
                },
            );
        }
        Ok(&self.loaded[&blob.tenant])
    }
}

impl<B: Backend> Runner for TransformerRunner<B> {
    type Input = Request;
    type Output = Vec<f32>;

    fn run(&mut self, batch: &[Request]) -> Result<Vec<Vec<f32>>, String> {
        let mut out: Vec<Option<Vec<f32>>> = vec![None; batch.len()];
        let mut groups: Vec<(Arc<Blob>, Vec<usize>)> = Vec::new();
        for (n, r) in batch.iter().enumerate() {
            match groups.iter_mut().find(|(b, _)| Arc::ptr_eq(b, &r.model)) {
                Some((_, members)) => members.push(n),
                None => groups.push((Arc::clone(&r.model), vec![n])),
            }
        }
        let device = self.device.clone();
        for (blob, members) in groups {
            let loaded = self.ensure(&blob)?;
            let len = loaded.model.max_len();
            let mut ids = Vec::new();
            let mut next = Vec::new();
            for &n in &members {
                match &batch[n].query {
                    Query::Next(history) => {
                        left_pad(history, len, &mut ids);
                        next.push(n);
                    }
                    Query::Similar(item) => {
                        let d = loaded.dim;
                        let q = &loaded.unit[*item as usize * d..(*item as usize + 1) * d];
                        let scores = loaded
                            .unit
                            .chunks_exact(d)
                            .map(|v| v.iter().zip(q).map(|(a, b)| a * b).sum())
                            .collect();
                        out[n] = Some(scores);
                    }
                }
            }
            if next.is_empty() {
                continue;
            }
            let logits = loaded
                .model
                .next(ids_tensor::<B>(ids, next.len(), len, &device));
            let probs: Vec<f32> = softmax(logits, 1).into_data().iter::<f32>().collect();
            let width = probs.len() / next.len();
            for (row, &n) in next.iter().enumerate() {
                out[n] = Some(probs[row * width..(row + 1) * width].to_vec());
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }
}

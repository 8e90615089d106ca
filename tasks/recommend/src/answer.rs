//! The recommendation answers: `{"items": [{"product_id", "score"}], "model": "transformer vN" | "popularity"
//! | "visual", "ignored": <unknown products in the input>}`. Products the customer already has in the given
//! history, and the ones asked to exclude, are never recommended.

use crate::Recommend;
use crate::serve::Query;
use crate::store;
use crate::weights::Blob;
use celeriac_domain::Tenant;
use celeriac_task::TaskError;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Which model answered, and what.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// Products and scores, best first.
    pub items: Vec<(String, f32)>,
    /// `transformer vN`, `popularity` or `visual`.
    pub model: String,
    /// Products of the input the model does not know.
    pub ignored: usize,
}

impl Answer {
    /// The task result.
    pub fn to_json(&self) -> Value {
        let items: Vec<Value> = self
            .items
            .iter()
            .map(|(id, s)| json!({"product_id": id, "score": round6(*s)}))
            .collect();
        json!({"items": items, "model": self.model, "ignored": self.ignored})
    }

    fn kind(&self) -> &str {
        self.model.split(' ').next().unwrap_or("")
    }
}

/// `x` to six decimals (an f32's digits, without the noise of widening it to a double).
fn round6(x: f32) -> f64 {
    (x as f64 * 1e6).round() / 1e6
}

/// The `k` best ids of `scores` (over `0..=items`) that `keep` accepts, best first.
pub fn top_scores(
    scores: &[f32],
    blob: &Blob,
    k: usize,
    keep: impl Fn(&str) -> bool,
) -> Vec<(String, f32)> {
    let mut ranked: Vec<(f32, usize)> = scores
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(i, _)| keep(&blob.meta.items[i - 1]))
        .map(|(i, s)| (*s, i))
        .collect();
    let by_score = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let k = k.min(ranked.len());
    if k == 0 {
        return Vec::new();
    }
    ranked.select_nth_unstable_by(k - 1, by_score);
    ranked.truncate(k);
    ranked.sort_by(by_score);
    ranked
        .into_iter()
        .map(|(s, i)| (blob.meta.items[i - 1].clone(), s))
        .collect()
}

fn popular_answer(
    popular: &[(String, f32)],
    k: usize,
    keep: impl Fn(&str) -> bool,
    ignored: usize,
) -> Answer {
    Answer {
        items: popular
            .iter()
            .filter(|(id, _)| keep(id))
            .take(k)
            .cloned()
            .collect(),
        model: "popularity".into(),
        ignored,
    }
}

/// Splits `ids` into the model's item numbers and a count of unknown ones.
fn known(blob: Option<&Arc<Blob>>, ids: &[String]) -> (Vec<u32>, usize) {
    let Some(blob) = blob else {
        return (Vec::new(), ids.len());
    };
    let numbers: Vec<u32> = ids
        .iter()
        .filter_map(|id| blob.index.get(id).copied())
        .collect();
    let unknown = ids.len() - numbers.len();
    (numbers, unknown)
}

impl Recommend {
    /// The transformer's `k` best next products after `history` that `keep` accepts.
    async fn transformer_answer(
        &self,
        blob: &Arc<Blob>,
        history: Vec<u32>,
        k: usize,
        keep: impl Fn(&str) -> bool,
        ignored: usize,
    ) -> Result<Answer, TaskError> {
        let scores = self.scores(blob, Query::Next(history)).await?;
        Ok(Answer {
            items: top_scores(&scores, blob, k, keep),
            model: format!("transformer v{}", blob.version),
            ignored,
        })
    }

    fn counted(&self, a: Answer) -> Value {
        self.metrics().answer(a.kind());
        a.to_json()
    }

    /// `recommend.next_items`.
    pub async fn next_items(
        &self,
        tenant: &Tenant,
        history: Vec<String>,
        k: usize,
        exclude: Vec<String>,
    ) -> Result<Value, TaskError> {
        let blob = self.model(tenant).await?;
        let (numbers, mut ignored) = known(blob.as_ref(), &history);
        let skip: HashSet<&str> = history.iter().chain(&exclude).map(String::as_str).collect();
        let keep = |id: &str| !skip.contains(id);
        let answer = match blob {
            Some(blob) if !numbers.is_empty() => {
                self.transformer_answer(&blob, numbers, k, keep, ignored)
                    .await?
            }
            _ => {
                // Without a model, a history is not read at all: nothing in it counts as unknown.
                if blob.is_none() {
                    ignored = 0;
                }
                popular_answer(&self.popular(tenant).await?, k, keep, ignored)
            }
        };
        Ok(self.counted(answer))
    }

    /// `recommend.for_customer`: the customer's newest items from the database as the history.
    pub async fn for_customer(
        &self,
        tenant: &Tenant,
        customer: &str,
        k: usize,
    ) -> Result<Value, TaskError> {
        let tx = self.begin(tenant).await?;
        let history = store::history(&tx, customer, self.config.max_len).await?;
        tx.commit().await?;
        self.next_items(tenant, history, k, Vec::new()).await
    }

    /// `recommend.similar`: nearest item embeddings, blended with visual similarity where the vision family
    /// has embeddings of both products.
    pub async fn similar(
        &self,
        tenant: &Tenant,
        product: &str,
        k: usize,
    ) -> Result<Value, TaskError> {
        let blob = self.model(tenant).await?;
        let visual = if self.config.visual_weight > 0.0 {
            let tx = self.begin(tenant).await?;
            let v = store::visual_neighbours(&tx, product).await?;
            tx.commit().await?;
            v
        } else {
            HashMap::new()
        };
        let keep = |id: &str| id != product;
        let w = self.config.visual_weight;
        let answer = match blob
            .as_ref()
            .and_then(|b| b.index.get(product).map(|&i| (b, i)))
        {
            Some((blob, item)) => {
                let mut scores = self.scores(blob, Query::Similar(item)).await?;
                if !visual.is_empty() {
                    // (1 − w)·item + w·visual, a product without a vision embedding counting 0 visually.
                    for (i, s) in scores.iter_mut().enumerate().skip(1) {
                        let v = visual.get(&blob.meta.items[i - 1]).copied().unwrap_or(0.0);
                        *s = (1.0 - w) * *s + w * v;
                    }
                }
                Answer {
                    items: top_scores(&scores, blob, k, keep),
                    model: format!("transformer v{}", blob.version),
                    ignored: 0,
                }
            }
            None if !visual.is_empty() => {
                let mut items: Vec<(String, f32)> =
                    visual.into_iter().filter(|(id, _)| keep(id)).collect();
                items.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                items.truncate(k);
                Answer {
                    items,
                    model: "visual".into(),
                    ignored: 0,
                }
            }
            None => popular_answer(&self.popular(tenant).await?, k, keep, 1),
        };
        Ok(self.counted(answer))
    }

    /// `recommend.complete_outfit`: products of categories the set does not have yet, ranked by the
    /// transformer given the set (popularity without a model).
    pub async fn complete_outfit(
        &self,
        tenant: &Tenant,
        products: Vec<String>,
        k: usize,
    ) -> Result<Value, TaskError> {
        let tx = self.begin(tenant).await?;
        let categories: HashMap<String, String> =
            store::categories(&tx).await?.into_iter().collect();
        tx.commit().await?;
        let have: HashSet<&str> = products
            .iter()
            .filter_map(|p| categories.get(p).map(String::as_str))
            .collect();
        let given: HashSet<&str> = products.iter().map(String::as_str).collect();
        let keep = |id: &str| {
            !given.contains(id)
                && categories
                    .get(id)
                    .is_some_and(|c| !have.contains(c.as_str()))
        };
        let blob = self.model(tenant).await?;
        let (numbers, ignored) = known(blob.as_ref(), &products);
        let answer = match blob {
            Some(blob) if !numbers.is_empty() => {
                self.transformer_answer(&blob, numbers, k, keep, ignored)
                    .await?
            }
            Some(_) => popular_answer(&self.popular(tenant).await?, k, keep, ignored),
            None => popular_answer(&self.popular(tenant).await?, k, keep, 0),
        };
        Ok(self.counted(answer))
    }
}

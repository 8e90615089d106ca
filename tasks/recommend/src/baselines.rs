//! The baselines the transformer is measured against, and popularity, which also answers for tenants with
//! too little data: most popular items, BPR-MF (matrix factorisation trained with the Bayesian personalised
//! ranking loss and uniform negative samples) and EASE (a closed-form item-item model; Steck, 2019).

use crate::data::{Case, hr_ndcg_at_10, rank_of};
use celeriac_inference::Rng;
use rayon::prelude::*;

/// Interactions per item id (`items + 1` entries, 0 is padding) in `sequences`.
pub fn popularity(sequences: &[Vec<u32>], items: usize) -> Vec<f32> {
    let mut counts = vec![0f32; items + 1];
    for s in sequences {
        for &i in s {
            counts[i as usize] += 1.0;
        }
    }
    counts
}

/// HR@10 and NDCG@10 of `cases` under a scorer that fills `items + 1` scores for one case.
pub fn evaluate_with(
    cases: &[Case],
    items: usize,
    score: impl Fn(&Case, &mut [f32]) + Sync,
) -> (f64, f64) {
    let ranks: Vec<usize> = cases
        .par_iter()
        .map_init(
            || vec![0f32; items + 1],
            |buf, c| {
                score(c, buf);
                rank_of(buf, c)
            },
        )
        .collect();
    hr_ndcg_at_10(&ranks)
}

/// BPR-MF factors.
#[derive(Debug, Clone)]
pub struct Bpr {
    dim: usize,
    users: Vec<f32>,
    items: Vec<f32>,
    bias: Vec<f32>,
}

/// BPR-MF settings.
#[derive(Debug, Clone)]
pub struct BprOptions {
    /// Factors per user and item.
    pub dim: usize,
    /// SGD step.
    pub learning_rate: f32,
    /// L2 penalty.
    pub reg: f32,
    /// Most epochs (validation every 5 stops it early).
    pub epochs: usize,
}

impl Default for BprOptions {
    fn default() -> Self {
        Self {
            dim: 64,
            learning_rate: 0.05,
            reg: 0.005,
            epochs: 200,
        }
    }
}

impl Bpr {
    /// Trains on `train` (one sequence per user), keeping the factors with the best validation NDCG@10
    /// (checked every 5 epochs; stops after 3 checks without improvement).
    pub fn fit(
        train: &[Vec<u32>],
        valid: &[Case],
        items: usize,
        options: &BprOptions,
        seed: u64,
    ) -> Self {
        let mut rng = Rng::new(seed);
        let d = options.dim;
        let mut init = |n: usize| {
            (0..n * d)
                .map(|_| (rng.unit() as f32 - 0.5) * 0.02)
                .collect::<Vec<_>>()
        };
        let mut m = Self {
            dim: d,
            users: init(train.len()),
            items: init(items + 1),
            bias: vec![0.0; items + 1],
        };
        let seen: Vec<std::collections::HashSet<u32>> =
            train.iter().map(|s| s.iter().copied().collect()).collect();
        let pairs: Vec<(usize, u32)> = train
            .iter()
            .enumerate()
            .flat_map(|(u, s)| s.iter().map(move |&i| (u, i)))
            .collect();
        let (lr, reg) = (options.learning_rate, options.reg);
        let mut best = (f64::MIN, m.clone());
        let mut stale = 0;
        for epoch in 1..=options.epochs {
            for _ in 0..pairs.len() {
                let (u, i) = pairs[rng.below(pairs.len())];
                let j = loop {
                    let j = 1 + rng.below(items) as u32;
                    if !seen[u].contains(&j) {
                        break j;
                    }
                };
                let (pu, qi, qj) = (u * d, i as usize * d, j as usize * d);
                let mut x = m.bias[i as usize] - m.bias[j as usize];
                for k in 0..d {
                    x += m.users[pu + k] * (m.items[qi + k] - m.items[qj + k]);
                }
                let g = 1.0 / (1.0 + x.exp());
                m.bias[i as usize] += lr * (g - reg * m.bias[i as usize]);
                m.bias[j as usize] += lr * (-g - reg * m.bias[j as usize]);
                for k in 0..d {
                    let (w, a, b) = (m.users[pu + k], m.items[qi + k], m.items[qj + k]);
                    m.users[pu + k] += lr * (g * (a - b) - reg * w);
                    m.items[qi + k] += lr * (g * w - reg * a);
                    m.items[qj + k] += lr * (-g * w - reg * b);
                }
            }
            if epoch % 5 == 0 || epoch == options.epochs {
                let (_, ndcg) = evaluate_with(valid, items, |c, s| m.score(c.user, s));
                if ndcg > best.0 {
                    best = (ndcg, m.clone());
                    stale = 0;
                } else {
                    stale += 1;
                    if stale >= 3 {
                        break;
                    }
                }
            }
        }
        best.1
    }

    /// Scores of every item for `user`.
    pub fn score(&self, user: usize, out: &mut [f32]) {
        let d = self.dim;
        let p = &self.users[user * d..(user + 1) * d];
        for (i, o) in out.iter_mut().enumerate() {
            let q = &self.items[i * d..(i + 1) * d];
            *o = self.bias[i] + p.iter().zip(q).map(|(a, b)| a * b).sum::<f32>();
        }
    }
}

/// EASE's item-item weights.
#[derive(Debug, Clone)]
pub struct Ease {
    n: usize,
    weights: Vec<f32>,
}

impl Ease {
    /// The closed form on `train` with L2 penalty `lambda`: B = I − P·diag(1/diag(P)), P = (XᵀX + λI)⁻¹.
    pub fn fit(train: &[Vec<u32>], items: usize, lambda: f64) -> Self {
        let n = items + 1;
        let mut g = vec![0f64; n * n];
        for s in train {
            let mut u: Vec<u32> = s.clone();
            u.sort_unstable();
            u.dedup();
            for &a in &u {
                for &b in &u {
                    g[a as usize * n + b as usize] += 1.0;
                }
            }
        }
        for i in 0..n {
            g[i * n + i] += lambda;
        }
        invert_spd(&mut g, n);
        let mut weights = vec![0f32; n * n];
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    weights[i * n + j] = (-g[i * n + j] / g[j * n + j]) as f32;
                }
            }
        }
        Self { n, weights }
    }

    /// Picks `lambda` from `grid` by validation NDCG@10 and returns the model and the value.
    pub fn tuned(train: &[Vec<u32>], valid: &[Case], items: usize, grid: &[f64]) -> (Self, f64) {
        let mut best: Option<(f64, Self, f64)> = None;
        for &lambda in grid {
            let m = Self::fit(train, items, lambda);
            let (_, ndcg) = evaluate_with(valid, items, |c, s| m.score(&c.history, s));
            if best.as_ref().is_none_or(|b| ndcg > b.0) {
                best = Some((ndcg, m, lambda));
            }
        }
        let (_, m, lambda) = best.expect("a non-empty grid");
        (m, lambda)
    }

    /// Scores of every item after `history`.
    pub fn score(&self, history: &[u32], out: &mut [f32]) {
        out.fill(0.0);
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &i in &seen {
            let row = &self.weights[i as usize * self.n..(i as usize + 1) * self.n];
            for (o, w) in out.iter_mut().zip(row) {
                *o += w;
            }
        }
    }
}

/// Inverts the symmetric positive definite `n`×`n` matrix `a` in place (Gauss–Jordan without pivoting,
/// which is stable for such matrices), each step's row updates spread over the threads.
pub fn invert_spd(a: &mut [f64], n: usize) {
    let mut pivot_row = vec![0f64; n];
    for k in 0..n {
        let p = a[k * n + k];
        a[k * n + k] = 1.0;
        for j in 0..n {
            a[k * n + j] /= p;
        }
        pivot_row.copy_from_slice(&a[k * n..(k + 1) * n]);
        a.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            if i == k {
                return;
            }
            let f = row[k];
            if f == 0.0 {
                return;
            }
            row[k] = 0.0;
            for (x, y) in row.iter_mut().zip(&pivot_row) {
                *x -= f * y;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inversion_gives_the_identity_back() {
        let n = 3;
        let m = vec![4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0];
        let mut inv = m.clone();
        invert_spd(&mut inv, n);
        for i in 0..n {
            for j in 0..n {
                let x: f64 = (0..n).map(|k| m[i * n + k] * inv[k * n + j]).sum();
                assert!(
                    (x - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12,
                    "{i},{j}: {x}"
                );
            }
        }
    }

    #[test]
    fn popularity_counts_and_ease_follows_co_occurrence() {
        let train = vec![
            vec![1, 2],
            vec![1, 2],
            vec![1, 2, 3],
            vec![3, 4],
            vec![3, 4],
        ];
        assert_eq!(popularity(&train, 4), vec![0.0, 3.0, 3.0, 3.0, 2.0]);
        let ease = Ease::fit(&train, 4, 1.0);
        let mut s = vec![0f32; 5];
        ease.score(&[1], &mut s);
        // After item 1, item 2 (always bought with it) beats item 4 (never).
        assert!(s[2] > s[4] && s[2] > s[3], "{s:?}");
        ease.score(&[4], &mut s);
        assert!(s[3] > s[1], "{s:?}");
    }
}

//! Interactions as the models see them: items numbered `1..=n` (0 is padding), each customer's items in time
//! order, the leave-one-out split by time, and RecBole's atomic `.inter` files (MovieLens-100k for the
//! evaluation tool).

use std::collections::HashMap;

/// Each customer's items in time order, over a numbered item vocabulary.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// External id of item `i` at `items[i - 1]`.
    pub items: Vec<String>,
    /// External id of each customer, in the order of `sequences`.
    pub users: Vec<String>,
    /// Item numbers per customer, oldest first.
    pub sequences: Vec<Vec<u32>>,
}

/// One interaction: customer, item, time (any monotonic unit).
pub type Event = (String, String, i64);

impl Dataset {
    /// Groups `events` by customer and orders each customer's by time (ties keep the given order). Items are
    /// numbered in order of first appearance.
    pub fn build(events: impl IntoIterator<Item = Event>) -> Self {
        let mut items: Vec<String> = Vec::new();
        let mut item_no: HashMap<String, u32> = HashMap::new();
        let mut users: Vec<String> = Vec::new();
        let mut user_no: HashMap<String, usize> = HashMap::new();
        let mut per_user: Vec<Vec<(i64, usize, u32)>> = Vec::new();
        for (n, (user, item, at)) in events.into_iter().enumerate() {
            let i = *item_no.entry(item.clone()).or_insert_with(|| {
                items.push(item);
                items.len() as u32
            });
            let u = *user_no.entry(user.clone()).or_insert_with(|| {
                users.push(user);
                per_user.push(Vec::new());
                users.len() - 1
            });
            per_user[u].push((at, n, i));
        }
        let sequences = per_user
            .into_iter()
            .map(|mut s| {
                s.sort_unstable_by_key(|&(at, n, _)| (at, n));
                s.into_iter().map(|(_, _, i)| i).collect()
            })
            .collect();
        Self {
            items,
            users,
            sequences,
        }
    }

    /// A RecBole atomic `.inter` file: a tab-separated header naming `user_id`, `item_id` and `timestamp`
    /// fields (`name:type`), then one interaction per line.
    pub fn parse_inter(text: &str) -> Result<Self, String> {
        let mut lines = text.lines();
        let header = lines.next().ok_or("the .inter file is empty")?;
        let names: Vec<&str> = header
            .split('\t')
            .map(|f| f.split(':').next().unwrap_or(""))
            .collect();
        let col = |name: &str| {
            names
                .iter()
                .position(|n| *n == name)
                .ok_or(format!("the .inter header has no {name} field: {header:?}"))
        };
        let (u, i, t) = (col("user_id")?, col("item_id")?, col("timestamp")?);
        let mut events = Vec::new();
        for (n, line) in lines.enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split('\t').collect();
            let field = |c: usize| {
                f.get(c)
                    .copied()
                    .ok_or(format!("line {}: {} fields", n + 2, f.len()))
            };
            let at: f64 = field(t)?
                .parse()
                .map_err(|_| format!("line {}: timestamp {:?}", n + 2, field(t)))?;
            events.push((field(u)?.to_string(), field(i)?.to_string(), at as i64));
        }
        Ok(Self::build(events))
    }

    /// Number of items.
    pub fn item_count(&self) -> usize {
        self.items.len()
    }

    /// Number of interactions.
    pub fn interactions(&self) -> usize {
        self.sequences.iter().map(Vec::len).sum()
    }

    /// The first `n` customers (a slice for quick runs), items renumbered.
    pub fn first_users(&self, n: usize) -> Self {
        let events = self
            .sequences
            .iter()
            .zip(&self.users)
            .take(n)
            .flat_map(|(s, u)| {
                s.iter()
                    .enumerate()
                    .map(|(t, &i)| (u.clone(), self.items[i as usize - 1].clone(), t as i64))
            });
        Self::build(events.collect::<Vec<_>>())
    }
}

/// A history and the item that came next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// The customer (index into the split's `train`).
    pub user: usize,
    /// Items before the target, oldest first.
    pub history: Vec<u32>,
    /// The item to rank.
    pub target: u32,
}

/// Leave-one-out by time.
#[derive(Debug, Clone, Default)]
pub struct Split {
    /// What the models train on, per customer.
    pub train: Vec<Vec<u32>>,
    /// Each customer's second-to-last item after the training part.
    pub valid: Vec<Case>,
    /// Each customer's last item after everything else.
    pub test: Vec<Case>,
}

impl Split {
    /// Leave-one-out by time: each customer with at least `3` items gives the last to test and the second
    /// last to validation; shorter histories only train.
    pub fn leave_one_out(sequences: &[Vec<u32>]) -> Self {
        Self::hold_out(sequences, true)
    }

    /// A training split for serving: each customer with at least `3` items gives the last to validation
    /// (early stopping), everything else trains.
    pub fn for_serving(sequences: &[Vec<u32>]) -> Self {
        Self::hold_out(sequences, false)
    }

    fn hold_out(sequences: &[Vec<u32>], with_test: bool) -> Self {
        let mut split = Self::default();
        let held = if with_test { 2 } else { 1 };
        for (user, s) in sequences.iter().enumerate() {
            if s.len() < 3 {
                split.train.push(s.clone());
                continue;
            }
            let n = s.len();
            split.train.push(s[..n - held].to_vec());
            split.valid.push(Case {
                user,
                history: s[..n - held].to_vec(),
                target: s[n - held],
            });
            if with_test {
                split.test.push(Case {
                    user,
                    history: s[..n - 1].to_vec(),
                    target: s[n - 1],
                });
            }
        }
        split
    }
}

/// HR@k and NDCG@k of one case: the target's rank among every item (the history's items and padding
/// excluded) given `scores` over ids `0..=items`. Ties count against the target.
pub fn rank_of(scores: &[f32], case: &Case) -> usize {
    let target = scores[case.target as usize];
    let mut seen = vec![false; scores.len()];
    seen[0] = true;
    for &i in &case.history {
        seen[i as usize] = true;
    }
    seen[case.target as usize] = true;
    scores
        .iter()
        .zip(&seen)
        .filter(|(s, seen)| !**seen && **s >= target)
        .count()
}

/// HR@10 and NDCG@10 over `ranks`.
pub fn hr_ndcg_at_10(ranks: &[usize]) -> (f64, f64) {
    if ranks.is_empty() {
        return (0.0, 0.0);
    }
    let n = ranks.len() as f64;
    let hr = ranks.iter().filter(|&&r| r < 10).count() as f64 / n;
    let ndcg = ranks
        .iter()
        .filter(|&&r| r < 10)
        .map(|&r| 1.0 / ((r + 2) as f64).log2())
        .sum::<f64>()
        / n;
    (hr, ndcg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(u: &str, i: &str, t: i64) -> Event {
        (u.into(), i.into(), t)
    }

    #[test]
    fn sequences_follow_time_and_ties_keep_their_order() {
        let d = Dataset::build([
            ev("a", "x", 5),
            ev("b", "y", 1),
            ev("a", "y", 2),
            ev("a", "z", 5),
        ]);
        assert_eq!(d.items, ["x", "y", "z"]);
        assert_eq!(d.users, ["a", "b"]);
        assert_eq!(d.sequences, vec![vec![2, 1, 3], vec![2]]);
        assert_eq!(d.interactions(), 4);
    }

    #[test]
    fn inter_files_parse_and_bad_ones_say_why() {
        let d = Dataset::parse_inter(
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t3\t200\n1\t11\t4\t100\n",
        )
        .unwrap();
        assert_eq!(d.sequences, vec![vec![2, 1]]);
        assert_eq!(d.items, ["10", "11"]);
        let e = Dataset::parse_inter("user_id:token\titem_id:token\n1\t2\n").unwrap_err();
        assert!(e.contains("no timestamp field"), "{e}");
        let e = Dataset::parse_inter("user_id\titem_id\ttimestamp\n1\t2\tsoon\n").unwrap_err();
        assert!(e.contains("line 2: timestamp"), "{e}");
    }

    #[test]
    fn leave_one_out_keeps_the_last_two_for_validation_and_test() {
        let s = Split::leave_one_out(&[vec![1, 2, 3, 4], vec![5, 6]]);
        assert_eq!(s.train, vec![vec![1, 2], vec![5, 6]]);
        assert_eq!(
            s.valid,
            vec![Case {
                user: 0,
                history: vec![1, 2],
                target: 3
            }]
        );
        assert_eq!(
            s.test,
            vec![Case {
                user: 0,
                history: vec![1, 2, 3],
                target: 4
            }]
        );
    }

    #[test]
    fn ranks_exclude_the_history_and_count_ties_against_the_target() {
        let scores = [9.0, 0.5, 0.9, 0.5, 0.1, 0.7];
        let case = Case {
            user: 0,
            history: vec![2],
            target: 1,
        };
        // Padding (9.0) and item 2 (seen) do not count; items 3 (a tie) and 5 do.
        assert_eq!(rank_of(&scores, &case), 2);
        let (hr, ndcg) = hr_ndcg_at_10(&[0, 2, 12]);
        assert!((hr - 2.0 / 3.0).abs() < 1e-12);
        assert!((ndcg - (1.0 + 0.5) / 3.0).abs() < 1e-12);
    }
}

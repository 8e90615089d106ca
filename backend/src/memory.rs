//! An in-memory result backend for fast runtime tests (feature `test-utils`), with the Redis backend's
//! rules: a SUCCESS is never overwritten, [`ResultBackend::wait`] returns at the first ready state, and a
//! chord's header joins once per task id, completes at its recorded size and is dispatched by one claim.

use crate::{ChordReady, Result, ResultBackend};
use async_trait::async_trait;
use celeriac_protocol::result::{ResultMeta, State};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;

#[derive(Debug, Default)]
struct Chord {
    size: Option<usize>,
    /// `(group_index or last, task id)` → `(state, result)`.
    joined: BTreeMap<(i64, String), (String, Value)>,
    claim: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    metas: HashMap<String, Value>,
    chords: HashMap<String, Chord>,
    done: HashSet<String>,
}

/// Results kept in this process.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    state: Mutex<Inner>,
    stored: Notify,
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.state.lock().expect("memory backend state")
    }

    /// Every stored meta, by task id.
    pub fn metas(&self) -> HashMap<String, Value> {
        self.state().metas.clone()
    }
}

fn status(meta: Option<&Value>) -> Option<State> {
    meta.and_then(|m| m.get("status"))
        .and_then(Value::as_str)
        .map(State::parse)
}

#[async_trait]
impl ResultBackend for MemoryBackend {
    async fn chord_part_return(
        &self,
        group_id: &str,
        task_id: &str,
        group_index: Option<i64>,
        state: &str,
        result: &Value,
    ) -> Result<Option<ChordReady>> {
        let mut st = self.state();
        if st.done.contains(group_id) {
            return Ok(None); // a late duplicate of a chord already dispatched
        }
        let chord = st.chords.entry(group_id.to_string()).or_default();
        if chord.joined.keys().any(|(_, id)| id == task_id) {
            return Ok(None); // a redelivered header task counts once
        }
        chord.joined.insert(
            (group_index.unwrap_or(i64::MAX), task_id.to_string()),
            (state.to_string(), result.clone()),
        );
        let complete = chord.size.is_some_and(|n| chord.joined.len() == n);
        if !complete || chord.claim.is_some() {
            return Ok(None);
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        chord.claim = Some(token.clone());
        let results = chord
            .joined
            .iter()
            .map(|((_, id), (s, r))| (id.clone(), s.clone(), r.clone()))
            .collect();
        Ok(Some(ChordReady { results, token }))
    }

    async fn chord_finish(&self, group_id: &str, token: &str, failed: bool) -> Result<()> {
        let mut st = self.state();
        if failed {
            if let Some(c) = st.chords.get_mut(group_id) {
                c.size = None;
            }
            return Ok(());
        }
        if st
            .chords
            .get(group_id)
            .is_some_and(|c| c.claim.as_deref() == Some(token))
        {
            st.chords.remove(group_id);
            st.done.insert(group_id.to_string());
        }
        Ok(())
    }

    async fn set_chord_size(&self, group_id: &str, size: usize) -> Result<()> {
        let mut st = self.state();
        let chord = st.chords.entry(group_id.to_string()).or_default();
        chord.size = Some(size);
        chord.claim = None;
        Ok(())
    }

    async fn store(&self, metas: &[ResultMeta]) -> Result<usize> {
        let mut written = 0;
        {
            let mut st = self.state();
            for m in metas {
                if status(st.metas.get(&m.task_id)) == Some(State::Success) {
                    continue;
                }
                let v: Value = serde_json::from_slice(&m.to_json()).expect("a meta is JSON");
                st.metas.insert(m.task_id.clone(), v);
                written += 1;
            }
        }
        self.stored.notify_waiters();
        Ok(written)
    }

    async fn get(&self, task_id: &str) -> Result<Option<Value>> {
        Ok(self.state().metas.get(task_id).cloned())
    }

    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<Option<Value>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let stored = self.stored.notified();
            let last = self.get(task_id).await?;
            if status(last.as_ref()).is_some_and(|s| s.is_ready()) {
                return Ok(last);
            }
            tokio::select! {
                _ = stored => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(last),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn a_success_stays_and_wait_returns_the_first_ready_state() {
        let b = MemoryBackend::new();
        b.store(&[ResultMeta::new("t", State::Success, json!(5))])
            .await
            .unwrap();
        let written = b
            .store(&[ResultMeta::new("t", State::Failure, json!("late"))])
            .await
            .unwrap();
        assert_eq!(written, 0);
        let meta = b.wait("t", Duration::ZERO).await.unwrap().unwrap();
        assert_eq!(
            (meta["status"].clone(), meta["result"].clone()),
            (json!("SUCCESS"), json!(5))
        );
        assert_eq!(b.wait("none", Duration::ZERO).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_chord_joins_each_task_once_and_is_claimed_once() {
        let b = MemoryBackend::new();
        b.set_chord_size("g", 2).await.unwrap();
        async fn part(b: &MemoryBackend, id: &str, i: i64) -> Option<ChordReady> {
            b.chord_part_return("g", id, Some(i), "SUCCESS", &json!(i))
                .await
                .unwrap()
        }
        assert_eq!(part(&b, "b", 1).await, None);
        assert_eq!(
            part(&b, "b", 1).await,
            None,
            "a redelivered part counts once"
        );
        let ready = part(&b, "a", 0).await.expect("complete");
        assert_eq!(
            ready.results,
            vec![
                ("a".to_string(), "SUCCESS".to_string(), json!(0)),
                ("b".to_string(), "SUCCESS".to_string(), json!(1))
            ]
        );
        b.chord_finish("g", &ready.token, false).await.unwrap();
        assert_eq!(
            part(&b, "c", 2).await,
            None,
            "a finished chord ignores late parts"
        );
    }
}

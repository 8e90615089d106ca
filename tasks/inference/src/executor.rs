//! Dynamic batching: one executor thread per model, fed by a bounded queue. It takes the first request,
//! gathers more until `max_batch` or `max_wait`, hands the batch to the model's [`Runner`] and answers each
//! caller. A full queue makes the caller wait to enqueue (back-pressure); nothing is dropped. A panic in a
//! forward pass fails that batch's requests and the executor carries on. Dropping the [`Executor`] closes the
//! queue, lets the thread finish what it holds and joins it.

use crate::{BatchMetrics, Device};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// A model behind an executor. It lives on the executor's thread (created there by the loader), so it need
/// not be `Send`: a CUDA model stays on the thread that owns its device.
pub trait Runner {
    /// One request.
    type Input: Send + 'static;
    /// One answer.
    type Output: Send + 'static;
    /// Runs one batch and returns one answer per request, in order (an error fails the whole batch).
    fn run(&mut self, batch: &[Self::Input]) -> Result<Vec<Self::Output>, String>;
}

/// A runner chosen at run time (a CPU or a CUDA model).
pub type BoxedRunner<I, O> = Box<dyn Runner<Input = I, Output = O>>;

/// What goes wrong when calling an executor.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ExecutorError {
    /// The model failed to load.
    #[error("loading the model: {0}")]
    Load(String),
    /// The batch's forward pass failed.
    #[error("{0}")]
    Failed(String),
    /// The executor has stopped (the worker is shutting down).
    #[error("the executor has stopped")]
    Stopped,
}

/// How batches are formed.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Largest batch one forward pass takes.
    pub max_batch: usize,
    /// How long the executor waits for more requests after the first one of a batch.
    pub max_wait: Duration,
    /// Requests waiting before callers wait to enqueue.
    pub queue_capacity: usize,
}

struct Request<I, O> {
    input: I,
    enqueued: Instant,
    reply: oneshot::Sender<Result<O, ExecutorError>>,
}

/// The batching executor of one model.
pub struct Executor<I, O> {
    tx: Option<mpsc::Sender<Request<I, O>>>,
    thread: Option<JoinHandle<()>>,
    device: Device,
    metrics: Arc<BatchMetrics>,
}

impl<I, O> std::fmt::Debug for Executor<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("device", &self.device)
            .finish()
    }
}

impl<I: Send + 'static, O: Send + 'static> Executor<I, O> {
    /// Starts the thread `name`: it runs `load` (the model on `device`, warmed up), then serves batches, inside
    /// `pool` when one is given (a CPU model's threads). Returns once the model is loaded, or its error.
    pub fn start<L>(
        name: &str,
        device: Device,
        settings: BatchSettings,
        metrics: Arc<BatchMetrics>,
        pool: Option<rayon::ThreadPool>,
        load: L,
    ) -> Result<Self, ExecutorError>
    where
        L: FnOnce() -> Result<BoxedRunner<I, O>, String> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(settings.queue_capacity.max(1));
        metrics.set_device(device);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let m = Arc::clone(&metrics);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let go = move || match load() {
                    Ok(runner) => {
                        let _ = ready_tx.send(Ok(()));
                        serve(runner, settings, rx, &m);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(ExecutorError::Load(e)));
                    }
                };
                match pool {
                    Some(pool) => pool.install(go),
                    None => go(),
                }
            })
            .map_err(|e| ExecutorError::Load(e.to_string()))?;
        let ready = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(ExecutorError::Load("the executor thread died".into())));
        match ready {
            Ok(()) => Ok(Self {
                tx: Some(tx),
                thread: Some(thread),
                device,
                metrics,
            }),
            Err(e) => {
                let _ = thread.join();
                Err(e)
            }
        }
    }

    /// The device the model runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Runs `input` through the model, batched with whatever else is waiting.
    pub async fn submit(&self, input: I) -> Result<O, ExecutorError> {
        let tx = self.tx.as_ref().ok_or(ExecutorError::Stopped)?;
        let (reply, answer) = oneshot::channel();
        self.metrics.queued.inc();
        let request = Request {
            input,
            enqueued: Instant::now(),
            reply,
        };
        if tx.send(request).await.is_err() {
            self.metrics.queued.dec();
            return Err(ExecutorError::Stopped);
        }
        answer.await.unwrap_or(Err(ExecutorError::Stopped))
    }
}

impl<I, O> Drop for Executor<I, O> {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve<I: Send + 'static, O: Send + 'static>(
    mut runner: BoxedRunner<I, O>,
    settings: BatchSettings,
    mut rx: mpsc::Receiver<Request<I, O>>,
    metrics: &BatchMetrics,
) {
    let timer = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "inference executor: no timer runtime");
            return;
        }
    };
    let max_batch = settings.max_batch.max(1);
    while let Some(first) = rx.blocking_recv() {
        let deadline = tokio::time::Instant::now() + settings.max_wait;
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if settings.max_wait.is_zero() {
                        break;
                    }
                    // The timer must be created inside the runtime that drives it.
                    match timer
                        .block_on(async { tokio::time::timeout_at(deadline, rx.recv()).await })
                    {
                        Ok(Some(r)) => batch.push(r),
                        _ => break,
                    }
                }
            }
        }
        let n = batch.len();
        metrics.queued.dec_by(n as i64);
        metrics.batch_size.observe(n as f64);
        let now = Instant::now();
        let mut inputs = Vec::with_capacity(n);
        let mut replies = Vec::with_capacity(n);
        for r in batch {
            metrics
                .queue_wait
                .observe(now.duration_since(r.enqueued).as_secs_f64());
            inputs.push(r.input);
            replies.push(r.reply);
        }
        let t = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| runner.run(&inputs)));
        metrics.inference.observe(t.elapsed().as_secs_f64());
        match result {
            Ok(Ok(outputs)) if outputs.len() == n => {
                for (reply, out) in replies.into_iter().zip(outputs) {
                    let _ = reply.send(Ok(out));
                }
            }
            other => {
                let why = match other {
                    Ok(Err(e)) => e,
                    Ok(Ok(outputs)) => format!("{} answers for {n} requests", outputs.len()),
                    Err(_) => "the forward pass panicked".into(),
                };
                tracing::error!(batch = n, error = %why, "inference executor: a batch failed");
                for reply in replies {
                    let _ = reply.send(Err(ExecutorError::Failed(why.clone())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Doubler {
        fail_on: u32,
    }

    impl Runner for Doubler {
        type Input = u32;
        type Output = u32;
        fn run(&mut self, batch: &[u32]) -> Result<Vec<u32>, String> {
            if batch.contains(&self.fail_on) {
                panic!("bad input");
            }
            Ok(batch.iter().map(|x| x * 2).collect())
        }
    }

    fn executor(max_wait_ms: u64) -> (Executor<u32, u32>, prometheus_client::registry::Registry) {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(BatchMetrics::new(&mut registry, "t", "Numbers"));
        let settings = BatchSettings {
            max_batch: 16,
            max_wait: Duration::from_millis(max_wait_ms),
            queue_capacity: 8,
        };
        let e = Executor::start("t", Device::Cpu, settings, metrics, None, || {
            Ok(Box::new(Doubler { fail_on: 13 }) as BoxedRunner<u32, u32>)
        })
        .unwrap();
        (e, registry)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_caller_gets_its_own_answer_in_batches_and_a_panic_fails_only_its_batch() {
        let (e, registry) = executor(20);
        let e = Arc::new(e);
        let mut calls = Vec::new();
        for i in 0..100u32 {
            let e = Arc::clone(&e);
            calls.push(tokio::spawn(async move { (i, e.submit(i).await) }));
        }
        let mut failed = 0;
        for c in calls {
            let (i, r) = c.await.unwrap();
            match r {
                Ok(v) => assert_eq!(v, i * 2),
                Err(ExecutorError::Failed(why)) => {
                    assert_eq!(why, "the forward pass panicked");
                    failed += 1;
                }
                Err(other) => panic!("{other}"),
            }
        }
        assert!((1..=16).contains(&failed), "{failed} failed");
        assert_eq!(e.submit(21).await, Ok(42));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("t_batch_size_sum 101.0"), "{text}");
        assert!(text.contains("t_queued 0"), "{text}");
        assert!(text.contains("t_device{device=\"cpu\"} 1"), "{text}");
    }

    #[test]
    fn a_loader_error_is_returned_and_the_thread_joined() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(BatchMetrics::new(&mut registry, "t", "Numbers"));
        let settings = BatchSettings {
            max_batch: 1,
            max_wait: Duration::ZERO,
            queue_capacity: 1,
        };
        let r = Executor::<u32, u32>::start("t", Device::Cpu, settings, metrics, None, || {
            Err("no weights".into())
        });
        assert_eq!(r.unwrap_err(), ExecutorError::Load("no weights".into()));
    }
}

//! Dynamic batching: one executor thread per model, fed by a bounded queue. It takes the first request,
//! gathers more until `max_batch` or `max_wait_ms`, pads the batch to one of a few sizes warmed up at
//! start, runs one forward pass and answers each caller. A full queue makes the task wait to enqueue
//! (back-pressure); nothing is dropped. A panic in a forward pass fails that batch's requests and the
//! executor carries on. Dropping the [`Executor`] closes the queue, lets the thread finish what it holds and
//! joins it.

use crate::VisionError;
use crate::config::{DeviceChoice, VisionConfig};
use crate::idx::PIXELS;
use crate::metrics::{DeviceLabel, VisionMetrics};
use crate::model::{CLASSES, Classifier};
use crate::train::to_tensor;
use crate::weights::Weights;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// The model's answer for one image.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// Softmax over the ten classes.
    pub probs: Vec<f32>,
    /// The unit-length embedding.
    pub embedding: Vec<f32>,
}

struct Request {
    pixels: Vec<u8>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Prediction, String>>,
}

/// Where the models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// Burn's flex backend.
    Cpu,
    /// burn-cuda.
    Cuda,
}

impl Device {
    /// `cpu` or `cuda`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        }
    }
}

/// Whether a CUDA driver is installed: `/proc/driver/nvidia/version` and `libcuda.so.1` in the loader's
/// cache or `LD_LIBRARY_PATH` (a CUDA binary that loads no driver would panic on its first kernel).
pub fn cuda_driver_present() -> bool {
    if !std::path::Path::new("/proc/driver/nvidia/version").exists() {
        return false;
    }
    let in_cache = std::fs::read("/etc/ld.so.cache")
        .map(|c| c.windows(12).any(|w| w == b"libcuda.so.1"))
        .unwrap_or(false);
    let in_path = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .any(|d| !d.is_empty() && std::path::Path::new(d).join("libcuda.so.1").exists());
    in_cache || in_path
}

/// The device `choice` resolves to here, and why (logged at start).
pub fn choose_device(choice: DeviceChoice) -> (Device, &'static str) {
    let built = cfg!(feature = "cuda");
    match choice {
        DeviceChoice::Cpu => (Device::Cpu, "vision.device = cpu"),
        DeviceChoice::Auto | DeviceChoice::Cuda if !built => (
            Device::Cpu,
            "this build has no CUDA backend (build with --features cuda)",
        ),
        DeviceChoice::Auto | DeviceChoice::Cuda => {
            if cuda_driver_present() {
                (Device::Cuda, "the CUDA driver is present")
            } else {
                (Device::Cpu, "no CUDA driver on this machine (libcuda.so.1)")
            }
        }
    }
}

/// The batching executor of the classifier.
pub struct Executor {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
    device: Device,
    metrics: Arc<VisionMetrics>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("device", &self.device)
            .finish()
    }
}

struct Settings {
    max_batch: usize,
    max_wait: Duration,
    sizes: Vec<usize>,
}

impl Executor {
    /// Loads the weights on the chosen device, warms up every padded batch size and starts the thread.
    pub fn start(config: &VisionConfig, metrics: Arc<VisionMetrics>) -> Result<Self, VisionError> {
        let weights = Weights::resolve(config.weights.as_deref())?;
        let (device, why) = choose_device(config.device);
        if config.device == DeviceChoice::Cuda && device == Device::Cpu {
            tracing::warn!(
                reason = why,
                "vision.device = cuda, but the models run on the CPU"
            );
        }
        tracing::info!(
            device = device.name(),
            reason = why,
            "vision models: device chosen"
        );
        let max_batch = config.max_batch.unwrap_or(match device {
            Device::Cpu => 64,
            Device::Cuda => 256,
        });
        let mut sizes: Vec<usize> = [1, 8, 32, 128]
            .into_iter()
            .filter(|s| *s < max_batch)
            .collect();
        sizes.push(max_batch);
        let settings = Settings {
            max_batch,
            max_wait: Duration::from_secs_f64(config.max_wait_ms / 1000.0),
            sizes,
        };
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        metrics
            .device
            .get_or_create(&DeviceLabel {
                device: device.name().into(),
            })
            .set(1);
        let pool = cpu_pool(config.threads)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let m = Arc::clone(&metrics);
        let thread = std::thread::Builder::new()
            .name("vision-executor".into())
            .spawn(move || match device {
                Device::Cpu => {
                    let dev = Default::default();
                    pool.install(|| {
                        serve::<burn::backend::Flex>(&weights, &dev, settings, rx, m, ready_tx)
                    })
                }
                #[cfg(feature = "cuda")]
                Device::Cuda => {
                    let dev = Default::default();
                    serve::<burn::backend::Cuda>(&weights, &dev, settings, rx, m, ready_tx)
                }
                #[cfg(not(feature = "cuda"))]
                Device::Cuda => {
                    let _ = ready_tx.send(Err(VisionError::Weights("no CUDA backend".into())));
                }
            })
            .map_err(|e| VisionError::Executor(e.to_string()))?;
        let ready = ready_rx
            .recv()
            .map_err(|_| VisionError::Executor("the executor thread died while loading".into()));
        match ready.and_then(|r| r) {
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

    /// Runs one image (28×28 grey bytes) through the model, batched with whatever else is waiting.
    pub async fn infer(&self, pixels: Vec<u8>) -> Result<Prediction, VisionError> {
        debug_assert_eq!(pixels.len(), PIXELS);
        let tx = self.tx.as_ref().ok_or(VisionError::Stopped)?;
        let (reply, answer) = oneshot::channel();
        self.metrics.queued.inc();
        let sent = tx
            .send(Request {
                pixels,
                enqueued: Instant::now(),
                reply,
            })
            .await;
        if sent.is_err() {
            self.metrics.queued.dec();
            return Err(VisionError::Stopped);
        }
        match answer.await {
            Ok(r) => r.map_err(VisionError::Executor),
            Err(_) => Err(VisionError::Stopped),
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn cpu_pool(threads: Option<usize>) -> Result<rayon::ThreadPool, VisionError> {
    let mut b = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("vision-cpu-{i}"));
    if let Some(n) = threads {
        b = b.num_threads(n);
    }
    b.build().map_err(|e| VisionError::Executor(e.to_string()))
}

fn serve<B: Backend>(
    weights: &Weights,
    device: &B::Device,
    settings: Settings,
    mut rx: mpsc::Receiver<Request>,
    metrics: Arc<VisionMetrics>,
    ready: std::sync::mpsc::Sender<Result<(), VisionError>>,
) {
    let model: Classifier<B> = match weights.load(device) {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let started = Instant::now();
    for &size in &settings.sizes {
        let _ = forward(&model, &vec![0u8; size * PIXELS], device);
    }
    tracing::info!(
        sizes = ?settings.sizes,
        seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
        "vision classifier loaded and warmed up"
    );
    let _ = ready.send(Ok(()));
    let timer = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "vision executor: no timer runtime");
            return;
        }
    };
    let mut pixels = Vec::with_capacity(settings.max_batch * PIXELS);
    while let Some(first) = rx.blocking_recv() {
        let deadline = tokio::time::Instant::now() + settings.max_wait;
        let mut batch = vec![first];
        while batch.len() < settings.max_batch {
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
        for r in &batch {
            metrics
                .queue_wait
                .observe(now.duration_since(r.enqueued).as_secs_f64());
        }
        let padded = settings
            .sizes
            .iter()
            .copied()
            .find(|s| *s >= n)
            .unwrap_or(n);
        pixels.clear();
        for r in &batch {
            pixels.extend_from_slice(&r.pixels);
        }
        pixels.resize(padded * PIXELS, 0);
        let t = Instant::now();
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| forward(&model, &pixels, device)));
        metrics.inference.observe(t.elapsed().as_secs_f64());
        match result {
            Ok((probs, embeddings)) => {
                let d = embeddings.len() / padded;
                for (i, r) in batch.into_iter().enumerate() {
                    let _ = r.reply.send(Ok(Prediction {
                        probs: probs[i * CLASSES..(i + 1) * CLASSES].to_vec(),
                        embedding: embeddings[i * d..(i + 1) * d].to_vec(),
                    }));
                }
            }
            Err(_) => {
                tracing::error!(batch = n, "vision executor: the forward pass panicked");
                for r in batch {
                    let _ = r.reply.send(Err("the forward pass failed".into()));
                }
            }
        }
    }
}

/// One forward pass: softmax probabilities and embeddings, flattened.
fn forward<B: Backend>(
    model: &Classifier<B>,
    pixels: &[u8],
    device: &B::Device,
) -> (Vec<f32>, Vec<f32>) {
    let out = model.forward(to_tensor::<B>(pixels, device));
    let probs = softmax(out.logits, 1)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>();
    let embedding = out.embedding.into_data().convert::<f32>().to_vec::<f32>();
    (probs.unwrap_or_default(), embedding.unwrap_or_default())
}

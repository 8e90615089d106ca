//! The classifier's weights: `classifier.mpk` (Burn's named MessagePack record, full precision) and
//! `classifier.json` (the network's shape and the figures measured when it was trained). The weights in
//! `tasks/vision/weights/` are compiled into the binary; `vision.weights` points at another directory.

use crate::VisionError;
use crate::model::{Classifier, ClassifierConfig};
use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use std::path::Path;

const SHIPPED_RECORD: &[u8] = include_bytes!("../weights/classifier.mpk");
const SHIPPED_META: &str = include_str!("../weights/classifier.json");

/// What `classifier.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// The network's shape.
    pub config: ClassifierConfig,
    /// The command line that trained it.
    pub command: String,
    /// Figures measured after training (accuracy, recall@1, epochs, seconds, ...).
    pub figures: serde_json::Value,
}

/// Weights, not yet on a device.
#[derive(Debug, Clone)]
pub struct Weights {
    /// Shape and figures.
    pub meta: Meta,
    record: Vec<u8>,
}

impl Weights {
    /// The weights compiled into the binary.
    pub fn shipped() -> Result<Self, VisionError> {
        Self::parse(SHIPPED_RECORD.to_vec(), SHIPPED_META, "the shipped weights")
    }

    /// `classifier.mpk` and `classifier.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, VisionError> {
        let read = |name: &str| {
            std::fs::read(dir.join(name))
                .map_err(|e| VisionError::Weights(format!("{}: {e}", dir.join(name).display())))
        };
        let meta = String::from_utf8(read("classifier.json")?)
            .map_err(|_| VisionError::Weights("classifier.json is not UTF-8".into()))?;
        Self::parse(read("classifier.mpk")?, &meta, &dir.display().to_string())
    }

    /// The directory's weights when given, else the shipped ones.
    pub fn resolve(dir: Option<&Path>) -> Result<Self, VisionError> {
        match dir {
            Some(d) => Self::from_dir(d),
            None => Self::shipped(),
        }
    }

    fn parse(record: Vec<u8>, meta: &str, origin: &str) -> Result<Self, VisionError> {
        let meta: Meta = serde_json::from_str(meta)
            .map_err(|e| VisionError::Weights(format!("{origin}: classifier.json: {e}")))?;
        Ok(Self { meta, record })
    }

    /// A name for these weights, stored beside each embedding so that vectors of other weights are never
    /// compared with them: `classifier-` and 12 hex digits of the record's FNV-1a hash.
    pub fn model_id(&self) -> String {
        let hash = self.record.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        format!("classifier-{:012x}", hash >> 16)
    }

    /// The network on `device`, for inference.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<Classifier<B>, VisionError> {
        load_record(
            self.meta.config.init::<B>(device),
            &self.record,
            "classifier",
            device,
        )
    }

    /// Writes `model` and `meta` to `dir`.
    pub fn save<B: Backend>(
        model: Classifier<B>,
        meta: &Meta,
        dir: &Path,
    ) -> Result<(), VisionError> {
        save_module(model, meta, dir, "classifier")
    }
}

/// `module` with the parameters of `record` (Burn's named MessagePack bytes of `{name}.mpk`).
pub(crate) fn load_record<B: Backend, M: Module<B>>(
    module: M,
    record: &[u8],
    name: &str,
    device: &B::Device,
) -> Result<M, VisionError> {
    let record = NamedMpkBytesRecorder::<FullPrecisionSettings>::default()
        .load(record.to_vec(), device)
        .map_err(|e| VisionError::Weights(format!("{name}.mpk: {e}")))?;
    Ok(module.load_record(record))
}

/// Writes `model` to `{name}.mpk` and `meta` to `{name}.json` in `dir`.
pub(crate) fn save_module<B: Backend, M: Module<B>, T: Serialize>(
    model: M,
    meta: &T,
    dir: &Path,
    name: &str,
) -> Result<(), VisionError> {
    let io = |e: std::io::Error| VisionError::Weights(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let bytes = NamedMpkBytesRecorder::<FullPrecisionSettings>::default()
        .record(model.into_record(), ())
        .map_err(|e| VisionError::Weights(e.to_string()))?;
    std::fs::write(dir.join(format!("{name}.mpk")), bytes).map_err(io)?;
    let json =
        serde_json::to_string_pretty(meta).map_err(|e| VisionError::Weights(e.to_string()))?;
    std::fs::write(dir.join(format!("{name}.json")), json + "\n").map_err(io)?;
    Ok(())
}

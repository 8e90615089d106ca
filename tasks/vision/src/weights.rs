//! The classifier's weights: `classifier.mpk` (Burn's named MessagePack record, full precision) and
//! `classifier.json` (the network's shape and the figures measured when it was trained); the same network
//! fine-tuned on items cropped from composed scenes, which names the detector's boxes, as `namer.*`. The
//! weights in `tasks/vision/weights/` are compiled into the binary; `vision.weights` points at another
//! directory.

use crate::VisionError;
use crate::model::{Classifier, ClassifierConfig};
use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use std::path::Path;

const SHIPPED_RECORD: &[u8] = include_bytes!("../weights/classifier.mpk");
const SHIPPED_META: &str = include_str!("../weights/classifier.json");
const SHIPPED_NAMER_RECORD: &[u8] = include_bytes!("../weights/namer.mpk");
const SHIPPED_NAMER_META: &str = include_str!("../weights/namer.json");

/// What a classifier's weights are for; each has its own file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `vision.classify`, `vision.embed` and visual search (`classifier.*`).
    Classifier,
    /// Naming the detector's boxes (`namer.*`): trained on items cropped from composed scenes.
    Namer,
}

impl Role {
    /// The file stem: `classifier` or `namer`.
    pub fn stem(self) -> &'static str {
        match self {
            Role::Classifier => "classifier",
            Role::Namer => "namer",
        }
    }
}

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
    /// What they are for.
    pub role: Role,
    record: Vec<u8>,
}

impl Weights {
    /// The classifier compiled into the binary.
    pub fn shipped() -> Result<Self, VisionError> {
        Self::shipped_as(Role::Classifier)
    }

    /// The weights of `role` compiled into the binary.
    pub fn shipped_as(role: Role) -> Result<Self, VisionError> {
        let (record, meta) = match role {
            Role::Classifier => (SHIPPED_RECORD, SHIPPED_META),
            Role::Namer => (SHIPPED_NAMER_RECORD, SHIPPED_NAMER_META),
        };
        Self::parse(record.to_vec(), meta, "the shipped weights", role)
    }

    /// `classifier.mpk` and `classifier.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, VisionError> {
        Self::from_dir_as(dir, Role::Classifier)
    }

    /// The weights of `role` (`{stem}.mpk` and `{stem}.json`) from `dir`.
    pub fn from_dir_as(dir: &Path, role: Role) -> Result<Self, VisionError> {
        let read = |name: String| {
            std::fs::read(dir.join(&name))
                .map_err(|e| VisionError::Weights(format!("{}: {e}", dir.join(&name).display())))
        };
        let stem = role.stem();
        let meta = String::from_utf8(read(format!("{stem}.json"))?)
            .map_err(|_| VisionError::Weights(format!("{stem}.json is not UTF-8")))?;
        Self::parse(
            read(format!("{stem}.mpk"))?,
            &meta,
            &dir.display().to_string(),
            role,
        )
    }

    /// The directory's classifier when given, else the shipped one.
    pub fn resolve(dir: Option<&Path>) -> Result<Self, VisionError> {
        match dir {
            Some(d) => Self::from_dir(d),
            None => Self::shipped(),
        }
    }

    /// The weights that name the detector's boxes: the directory's `namer.*`, else its `classifier.*`
    /// (a directory with one classifier names with it), else the shipped namer.
    pub fn for_naming(dir: Option<&Path>) -> Result<Self, VisionError> {
        let has = |d: &Path, role: Role| d.join(format!("{}.json", role.stem())).exists();
        match dir {
            Some(d) if has(d, Role::Namer) => Self::from_dir_as(d, Role::Namer),
            Some(d) if has(d, Role::Classifier) => Self::from_dir(d),
            _ => Self::shipped_as(Role::Namer),
        }
    }

    fn parse(record: Vec<u8>, meta: &str, origin: &str, role: Role) -> Result<Self, VisionError> {
        let meta: Meta = serde_json::from_str(meta)
            .map_err(|e| VisionError::Weights(format!("{origin}: {}.json: {e}", role.stem())))?;
        Ok(Self { meta, role, record })
    }

    /// A name for these weights, stored beside each embedding so that vectors of other weights are never
    /// compared with them: the role's stem (`classifier-`, `namer-`) and 12 hex digits of the record's
    /// FNV-1a hash.
    pub fn model_id(&self) -> String {
        let hash = self.record.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        format!("{}-{:012x}", self.role.stem(), hash >> 16)
    }

    /// The network on `device`, for inference.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<Classifier<B>, VisionError> {
        load_record(
            self.meta.config.init::<B>(device),
            &self.record,
            self.role.stem(),
            device,
        )
    }

    /// Writes `model` and `meta` to `dir` as the weights of `role`.
    pub fn save<B: Backend>(
        model: Classifier<B>,
        meta: &Meta,
        dir: &Path,
        role: Role,
    ) -> Result<(), VisionError> {
        save_module(model, meta, dir, role.stem())
    }
}

/// What fine-tuned weights started from: the command that made them and its training time and data.
pub(crate) fn provenance(command: &str, figures: &serde_json::Value) -> serde_json::Value {
    let mut p = serde_json::json!({ "command": command });
    for key in [
        "train_seconds",
        "training_scenes",
        "training_images",
        "epochs",
        "init",
    ] {
        if let Some(v) = figures.get(key).filter(|v| !v.is_null()) {
            p[key] = v.clone();
        }
    }
    p
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

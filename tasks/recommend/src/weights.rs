//! A trained model in its stored form: Burn's named MessagePack record (full precision) in
//! `recommend_models.weights`, and in `meta` the network's shape, the item ids in model order, and the
//! training figures.

use crate::model::{SasRec, SasRecConfig};
use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// What `meta` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// The network's shape.
    pub config: SasRecConfig,
    /// External id of item `i` at `items[i - 1]`.
    pub items: Vec<String>,
    /// The training result.
    pub figures: serde_json::Value,
}

/// A model version, not yet on a device.
#[derive(Debug)]
pub struct Blob {
    /// The tenant.
    pub tenant: uuid::Uuid,
    /// The version.
    pub version: i32,
    /// Shape, items and figures.
    pub meta: Meta,
    /// Item number of each external id.
    pub index: HashMap<String, u32>,
    record: Vec<u8>,
}

impl Blob {
    /// From the stored row.
    pub fn new(
        tenant: uuid::Uuid,
        version: i32,
        record: Vec<u8>,
        meta: serde_json::Value,
    ) -> Result<Self, String> {
        let meta: Meta =
            serde_json::from_value(meta).map_err(|e| format!("model v{version}: meta: {e}"))?;
        if meta.items.len() != meta.config.items {
            return Err(format!(
                "model v{version}: {} item ids for {} items",
                meta.items.len(),
                meta.config.items
            ));
        }
        let index = meta
            .items
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i as u32 + 1))
            .collect();
        Ok(Self {
            tenant,
            version,
            meta,
            index,
            record,
        })
    }

    /// The network on `device`.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<SasRec<B>, String> {
        let record = NamedMpkBytesRecorder::<FullPrecisionSettings>::default()
            .load(self.record.clone(), device)
            .map_err(|e| format!("model v{}: {e}", self.version))?;
        Ok(self.meta.config.init::<B>(device).load_record(record))
    }
}

/// `model`'s record bytes.
pub fn record_bytes<B: Backend>(model: SasRec<B>) -> Result<Vec<u8>, String> {
    NamedMpkBytesRecorder::<FullPrecisionSettings>::default()
        .record(model.into_record(), ())
        .map_err(|e| e.to_string())
}

//! The detector: a small fully convolutional centre-heatmap network (in the manner of CenterNet). The
//! grey image (items light on dark, any size) is halved by average pooling, passes one 3×3 block, a 2×2
//! max pool, and four 3×3 blocks at a quarter of the input's resolution (dilations 1, 2, 4, 1: a receptive
//! field of about 70 px, wider than the largest item); a shared 3×3 block then feeds a 1×1 layer with five
//! outputs per cell of 4×4 px: the logit of "an item's centre is here", the log of the item's width and
//! height in pixels, and the centre's offset inside the cell. [`peaks`] turns those maps into boxes; the
//! classifier then names the item in each box (see [`crate::detect`]).

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AvgPool2d, AvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d, Relu};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::VisionError;
use crate::fold::{ConvRelu, max_pool_2x2};
use crate::weights::{load_record, save_module};

/// Pixels per cell of the output maps.
pub const STRIDE: usize = 4;
/// Output channels: centre logit, log width, log height, offset x, offset y.
pub const OUTPUTS: usize = 5;

/// The network's shape; saved beside the weights.
#[derive(Config, Debug, PartialEq)]
pub struct DetectorConfig {
    /// Channels of the first block (the others have twice as many).
    #[config(default = 12)]
    pub channels: usize,
}

/// Convolution (3×3, dilated), batch norm, ReLU.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    conv: Conv2d<B>,
    norm: BatchNorm<B>,
}

impl<B: Backend> Block<B> {
    fn new(channels_in: usize, channels_out: usize, dilation: usize, device: &B::Device) -> Self {
        Self {
            conv: Conv2dConfig::new([channels_in, channels_out], [3, 3])
                .with_dilation([dilation, dilation])
                .with_padding(PaddingConfig2d::Explicit(
                    dilation, dilation, dilation, dilation,
                ))
                .with_bias(false)
                .init(device),
            norm: BatchNormConfig::new(channels_out).init(device),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        Relu::new().forward(self.norm.forward(self.conv.forward(x)))
    }

    /// The block for inference: its batch norm folded into its convolution.
    fn folded(&self) -> ConvRelu<B> {
        ConvRelu::fold(&self.conv, &self.norm)
    }
}

/// The network.
#[derive(Module, Debug)]
pub struct Detector<B: Backend> {
    halve: AvgPool2d,
    pool: MaxPool2d,
    b1: Block<B>,
    b2: Block<B>,
    b3: Block<B>,
    b4: Block<B>,
    b5: Block<B>,
    head: Block<B>,
    out: Conv2d<B>,
}

impl DetectorConfig {
    /// A freshly initialised network on `device`.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Detector<B> {
        let c = self.channels;
        let out: Conv2d<B> = Conv2dConfig::new([2 * c, OUTPUTS], [1, 1]).init(device);
        // Start the centre logits at a prior of 0.1, as CenterNet does, so the first steps are stable, and
        // the sizes at 28 px (e^3.33), the middle of the items' range.
        let bias = out.bias.as_ref().map(|b| {
            b.clone().map(|t| {
                let v = vec![-2.19f32, 3.33, 3.33, 0.0, 0.0];
                Tensor::from_data(TensorData::new(v, [OUTPUTS]), &t.device())
            })
        });
        let out = Conv2d { bias, ..out };
        Detector {
            halve: AvgPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            b1: Block::new(1, c, 1, device),
            b2: Block::new(c, 2 * c, 1, device),
            b3: Block::new(2 * c, 2 * c, 2, device),
            b4: Block::new(2 * c, 2 * c, 4, device),
            b5: Block::new(2 * c, 2 * c, 1, device),
            head: Block::new(2 * c, 2 * c, 1, device),
            out,
        }
    }
}

impl<B: Backend> Detector<B> {
    /// Images `[n, 1, h, w]` (0..1, `h` and `w` multiples of 4) to maps `[n, 5, h/4, w/4]`.
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = self
            .pool
            .forward(self.b1.forward(self.halve.forward(images)));
        let x = self
            .b5
            .forward(self.b4.forward(self.b3.forward(self.b2.forward(x))));
        self.out.forward(self.head.forward(x))
    }

    /// The network for inference, each batch norm folded into its convolution (the same maps up to
    /// rounding; what serving and evaluation run).
    pub fn folded(&self) -> FoldedDetector<B> {
        FoldedDetector {
            halve: self.halve.clone(),
            pool: self.pool.clone(),
            blocks: [&self.b1, &self.b2, &self.b3, &self.b4, &self.b5, &self.head]
                .map(Block::folded),
            out: self.out.clone(),
        }
    }
}

/// The detector for inference ([`Detector::folded`]): six convolutions with their batch norms folded in,
/// the same pools and output layer.
#[derive(Debug, Clone)]
pub struct FoldedDetector<B: Backend> {
    halve: AvgPool2d,
    pool: MaxPool2d,
    blocks: [ConvRelu<B>; 6],
    out: Conv2d<B>,
}

impl<B: Backend> FoldedDetector<B> {
    /// What [`Detector::forward`] computes in inference.
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b1, b2, b3, b4, b5, head] = &self.blocks;
        let x = max_pool_2x2(b1.forward(self.halve.forward(images)), &self.pool);
        let x = b5.forward(b4.forward(b3.forward(b2.forward(x))));
        self.out.forward(head.forward(x))
    }
}

/// One box the detector proposes, before the classifier names it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Proposal {
    /// `[x0, y0, x1, y1]` in the input's pixels, inside the image.
    pub bbox: [f32; 4],
    /// The centre map's probability at its peak.
    pub objectness: f32,
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Boxes from one image's maps (`[5, gh, gw]`, row-major), for an image of `width`×`height` pixels: every
/// cell whose centre probability is at least `min_objectness` and the largest of its 3×3 neighbourhood.
pub fn peaks(
    maps: &[f32],
    gw: usize,
    gh: usize,
    width: usize,
    height: usize,
    min_objectness: f32,
) -> Vec<Proposal> {
    let plane = gw * gh;
    let logit = |x: usize, y: usize| maps[y * gw + x];
    let mut out = Vec::new();
    for y in 0..gh {
        for x in 0..gw {
            let v = logit(x, y);
            if sigmoid(v) < min_objectness {
                continue;
            }
            let mut is_peak = true;
            for ny in y.saturating_sub(1)..(y + 2).min(gh) {
                for nx in x.saturating_sub(1)..(x + 2).min(gw) {
                    let n = logit(nx, ny);
                    // Ties go to the first cell in reading order.
                    if n > v || (n == v && (ny, nx) < (y, x)) {
                        is_peak = false;
                    }
                }
            }
            if !is_peak {
                continue;
            }
            let at = y * gw + x;
            let bw = maps[plane + at].clamp(0.0, 7.0).exp();
            let bh = maps[2 * plane + at].clamp(0.0, 7.0).exp();
            let cx = (x as f32 + sigmoid(maps[3 * plane + at])) * STRIDE as f32;
            let cy = (y as f32 + sigmoid(maps[4 * plane + at])) * STRIDE as f32;
            let bbox = [
                (cx - bw / 2.0).max(0.0),
                (cy - bh / 2.0).max(0.0),
                (cx + bw / 2.0).min(width as f32),
                (cy + bh / 2.0).min(height as f32),
            ];
            if bbox[2] - bbox[0] >= 1.0 && bbox[3] - bbox[1] >= 1.0 {
                out.push(Proposal {
                    bbox,
                    objectness: sigmoid(v),
                });
            }
        }
    }
    out.sort_by(|a, b| b.objectness.total_cmp(&a.objectness));
    out
}

/// Grey pixels (`width`×`height`) padded with black to multiples of [`STRIDE`] (at least 8×8), scaled to
/// 0..1: the detector's input, and its padded size.
pub fn input(pixels: &[u8], width: usize, height: usize) -> (Vec<f32>, usize, usize) {
    let pw = width.div_ceil(STRIDE).max(2) * STRIDE;
    let ph = height.div_ceil(STRIDE).max(2) * STRIDE;
    let mut out = vec![0.0f32; pw * ph];
    for y in 0..height {
        for x in 0..width {
            out[y * pw + x] = pixels[y * width + x] as f32 / 255.0;
        }
    }
    (out, pw, ph)
}

/// Proposals for one grey image on `device`.
pub fn detect<B: Backend>(
    model: &FoldedDetector<B>,
    pixels: &[u8],
    width: usize,
    height: usize,
    min_objectness: f32,
    device: &B::Device,
) -> Vec<Proposal> {
    let (x, pw, ph) = input(pixels, width, height);
    let t = Tensor::<B, 4>::from_data(TensorData::new(x, [1, 1, ph, pw]), device);
    let maps = model
        .forward(t)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default();
    peaks(
        &maps,
        pw / STRIDE,
        ph / STRIDE,
        width,
        height,
        min_objectness,
    )
}

const SHIPPED_RECORD: &[u8] = include_bytes!("../weights/detector.mpk");
const SHIPPED_META: &str = include_str!("../weights/detector.json");

/// What `detector.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetectorMeta {
    /// The network's shape.
    pub config: DetectorConfig,
    /// The command line that trained it.
    pub command: String,
    /// Figures measured after training (AP, mAP, the baseline's, scenes, seconds, ...).
    pub figures: serde_json::Value,
}

/// The detector's weights, not yet on a device: `detector.mpk` and `detector.json`.
#[derive(Debug, Clone)]
pub struct DetectorWeights {
    /// Shape and figures.
    pub meta: DetectorMeta,
    record: Vec<u8>,
}

impl DetectorWeights {
    /// The weights compiled into the binary.
    pub fn shipped() -> Result<Self, VisionError> {
        if SHIPPED_RECORD.is_empty() {
            return Err(VisionError::Weights(
                "this build ships no detector weights (make train-detector)".into(),
            ));
        }
        Self::parse(SHIPPED_RECORD.to_vec(), SHIPPED_META, "the shipped weights")
    }

    /// `detector.mpk` and `detector.json` from `dir`, when `dir` holds them; else the shipped ones.
    pub fn resolve(dir: Option<&Path>) -> Result<Self, VisionError> {
        match dir.filter(|d| d.join("detector.json").exists()) {
            Some(dir) => Self::from_dir(dir),
            None => Self::shipped(),
        }
    }

    /// `detector.mpk` and `detector.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, VisionError> {
        let read = |name: &str| {
            std::fs::read(dir.join(name))
                .map_err(|e| VisionError::Weights(format!("{}: {e}", dir.join(name).display())))
        };
        let meta = String::from_utf8(read("detector.json")?)
            .map_err(|_| VisionError::Weights("detector.json is not UTF-8".into()))?;
        Self::parse(read("detector.mpk")?, &meta, &dir.display().to_string())
    }

    fn parse(record: Vec<u8>, meta: &str, origin: &str) -> Result<Self, VisionError> {
        let meta: DetectorMeta = serde_json::from_str(meta)
            .map_err(|e| VisionError::Weights(format!("{origin}: detector.json: {e}")))?;
        Ok(Self { meta, record })
    }

    /// The network on `device`, for inference.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<Detector<B>, VisionError> {
        load_record(
            self.meta.config.init::<B>(device),
            &self.record,
            "detector",
            device,
        )
    }

    /// Writes `model` and `meta` to `dir`.
    pub fn save<B: Backend>(
        model: Detector<B>,
        meta: &DetectorMeta,
        dir: &Path,
    ) -> Result<(), VisionError> {
        save_module(model, meta, dir, "detector")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_peak_becomes_its_box() {
        // A 4×4 grid (16×16 px); the peak at cell (2, 1), 8×4 px, centred at the cell's middle.
        let (gw, gh) = (4, 4);
        let mut maps = vec![-5.0f32; OUTPUTS * gw * gh];
        let at = gw + 2;
        maps[at] = 3.0;
        maps[at - 1] = 2.0; // a neighbour, not a peak
        maps[16 + at] = 8.0f32.ln();
        maps[32 + at] = 4.0f32.ln();
        maps[48 + at] = 0.0; // offset 0.5
        maps[64 + at] = 0.0;
        let p = peaks(&maps, gw, gh, 16, 16, 0.3);
        assert_eq!(p.len(), 1);
        let b = p[0].bbox;
        let want = [6.0, 4.0, 14.0, 8.0];
        for i in 0..4 {
            assert!((b[i] - want[i]).abs() < 1e-4, "{b:?}");
        }
        assert!((p[0].objectness - sigmoid(3.0)).abs() < 1e-6);
        assert!(peaks(&maps, gw, gh, 16, 16, 0.99).is_empty());
    }

    #[test]
    fn input_is_padded_to_the_stride() {
        let (x, pw, ph) = input(&[255; 10 * 5], 10, 5);
        assert_eq!((pw, ph), (12, 8));
        assert_eq!(x[0], 1.0);
        assert_eq!(x[10], 0.0);
        assert_eq!(x[12 * 5], 0.0);
    }
}

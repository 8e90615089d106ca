//! The classifier: five 3×3 convolution blocks (batch norm, ReLU, two 2×2 max pools), global average
//! pooling, a linear layer to the embedding, L2 normalisation, and a linear layer to the ten classes. The
//! normalised embedding is the penultimate layer, so the same forward pass gives `vision.embed` and
//! `vision.classify`, and cosine similarity between embeddings is what training shaped.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{
    BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d, Relu,
};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::fold::{ConvRelu, max_pool_2x2};

/// Fashion-MNIST's class names, by class id.
pub const CLASS_NAMES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Number of classes.
pub const CLASSES: usize = CLASS_NAMES.len();

/// The most probable class of a softmax and its probability (the first one on a tie).
pub fn best_class(probs: &[f32]) -> (usize, f32) {
    probs
        .iter()
        .copied()
        .enumerate()
        .take(CLASSES)
        .fold((0, f32::MIN), |m, (c, p)| if p > m.1 { (c, p) } else { m })
}

/// The shape of the network; saved beside the weights.
#[derive(Config, Debug, PartialEq)]
pub struct ClassifierConfig {
    /// Channels of the first blocks (then twice and four times as many).
    #[config(default = 16)]
    pub channels: usize,
    /// Dimension of the embedding.
    #[config(default = 128)]
    pub embedding: usize,
    /// Dropout before the embedding layer (training only).
    #[config(default = 0.2)]
    pub dropout: f64,
    /// Factor on the unit-length embedding before the class layer (a cosine classifier's temperature).
    #[config(default = 10.0)]
    pub scale: f64,
}

/// Convolution, batch norm, ReLU.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    conv: Conv2d<B>,
    norm: BatchNorm<B>,
}

impl<B: Backend> Block<B> {
    fn new(channels_in: usize, channels_out: usize, device: &B::Device) -> Self {
        Self {
            conv: Conv2dConfig::new([channels_in, channels_out], [3, 3])
                .with_padding(PaddingConfig2d::Same)
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
pub struct Classifier<B: Backend> {
    b1: Block<B>,
    b2: Block<B>,
    b3: Block<B>,
    b4: Block<B>,
    b5: Block<B>,
    pool: MaxPool2d,
    dropout: Dropout,
    embed: Linear<B>,
    classes: Linear<B>,
    scale: f64,
}

/// One forward pass: logits `[n, 10]` and unit-length embeddings `[n, d]`.
pub struct Output<B: Backend> {
    /// Class scores before the softmax.
    pub logits: Tensor<B, 2>,
    /// L2-normalised embeddings.
    pub embedding: Tensor<B, 2>,
}

impl ClassifierConfig {
    /// A freshly initialised network on `device`.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Classifier<B> {
        let c = self.channels;
        Classifier {
            b1: Block::new(1, c, device),
            b2: Block::new(c, c, device),
            b3: Block::new(c, 2 * c, device),
            b4: Block::new(2 * c, 2 * c, device),
            b5: Block::new(2 * c, 4 * c, device),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            dropout: DropoutConfig::new(self.dropout).init(),
            embed: LinearConfig::new(4 * c, self.embedding).init(device),
            classes: LinearConfig::new(self.embedding, CLASSES).init(device),
            scale: self.scale,
        }
    }
}

impl<B: Backend> Classifier<B> {
    /// Images `[n, 1, 28, 28]` (0..1, item light on dark) to logits and embeddings.
    pub fn forward(&self, images: Tensor<B, 4>) -> Output<B> {
        let x = self.pool.forward(self.b2.forward(self.b1.forward(images)));
        let x = self.pool.forward(self.b4.forward(self.b3.forward(x)));
        let x = self.b5.forward(x);
        head(
            x,
            |x| self.dropout.forward(x),
            &self.embed,
            &self.classes,
            self.scale,
        )
    }

    /// The network for inference, each batch norm folded into its convolution (the same outputs up to
    /// rounding; what serving and evaluation run).
    pub fn folded(&self) -> FoldedClassifier<B> {
        FoldedClassifier {
            blocks: [&self.b1, &self.b2, &self.b3, &self.b4, &self.b5].map(Block::folded),
            pool: self.pool.clone(),
            embed: self.embed.clone(),
            classes: self.classes.clone(),
            scale: self.scale,
        }
    }
}

/// Global average pooling, the embedding layer, L2 normalisation and the class layer.
fn head<B: Backend>(
    x: Tensor<B, 4>,
    dropout: impl Fn(Tensor<B, 2>) -> Tensor<B, 2>,
    embed: &Linear<B>,
    classes: &Linear<B>,
    scale: f64,
) -> Output<B> {
    let [n, channels, _, _] = x.dims();
    let x = x.mean_dim(3).mean_dim(2).reshape([n, channels]);
    let e = embed.forward(dropout(x));
    let norm = e.clone().powf_scalar(2.0).sum_dim(1).sqrt().clamp_min(1e-6);
    let embedding = e / norm;
    let logits = classes.forward(embedding.clone().mul_scalar(scale));
    Output { logits, embedding }
}

/// The classifier for inference ([`Classifier::folded`]): five convolutions with their batch norms folded
/// in, the same pools and head.
#[derive(Debug, Clone)]
pub struct FoldedClassifier<B: Backend> {
    blocks: [ConvRelu<B>; 5],
    pool: MaxPool2d,
    embed: Linear<B>,
    classes: Linear<B>,
    scale: f64,
}

impl<B: Backend> FoldedClassifier<B> {
    /// What [`Classifier::forward`] computes in inference.
    pub fn forward(&self, images: Tensor<B, 4>) -> Output<B> {
        let [b1, b2, b3, b4, b5] = &self.blocks;
        let x = max_pool_2x2(b2.forward(b1.forward(images)), &self.pool);
        let x = max_pool_2x2(b4.forward(b3.forward(x)), &self.pool);
        head(b5.forward(x), |x| x, &self.embed, &self.classes, self.scale)
    }
}

/// A tensor as `{"shape": [...], "data": [...]}` (row-major f32).
fn tensor_json<B: Backend, const D: usize>(t: Tensor<B, D>) -> serde_json::Value {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default();
    serde_json::json!({"shape": shape, "data": data})
}

impl<B: Backend> Block<B> {
    fn parameters(&self) -> serde_json::Value {
        serde_json::json!({
            "conv_weight": tensor_json(self.conv.weight.val()),
            "bn_gamma": tensor_json(self.norm.gamma.val()),
            "bn_beta": tensor_json(self.norm.beta.val()),
            "bn_mean": tensor_json(self.norm.running_mean.value()),
            "bn_var": tensor_json(self.norm.running_var.value()),
            "bn_epsilon": self.norm.epsilon,
        })
    }
}

impl<B: Backend> Classifier<B> {
    /// Every parameter, for rebuilding the same network elsewhere (the ONNX Runtime yardstick of
    /// `make bench-vision`): `blocks` b1..b5 (3×3 convolution weights `[out, in, 3, 3]`, no bias, "same"
    /// padding; batch-norm scale, shift, running mean and variance, epsilon), 2×2 max pools after b2 and b4,
    /// global average pooling, `embed` (weight `[in, out]`, bias), L2 normalisation, the embedding times
    /// `scale`, then `classes` (weight `[in, out]`, bias).
    pub fn parameters(&self) -> serde_json::Value {
        let linear = |l: &Linear<B>| {
            serde_json::json!({
                "weight": tensor_json(l.weight.val()),
                "bias": l.bias.as_ref().map(|b| tensor_json(b.val())),
            })
        };
        serde_json::json!({
            "blocks": [self.b1.parameters(), self.b2.parameters(), self.b3.parameters(),
                       self.b4.parameters(), self.b5.parameters()],
            "pool_after": [2, 4],
            "embed": linear(&self.embed),
            "classes": linear(&self.classes),
            "scale": self.scale,
        })
    }
}

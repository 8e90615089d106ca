//! Inference forms of the networks' blocks: each batch norm folded into the convolution before it, as ONNX
//! Runtime does when it loads a model. In inference a batch norm is an affine map per channel,
//! `(y − μ) · γ / √(σ² + ε) + β`, so `conv(x, W)` followed by it is `conv(x, W · s) + (β − μ · s)` with
//! `s = γ / √(σ² + ε)`: one convolution with a bias, then ReLU. Besides four passes over every activation,
//! this drops the broadcast arithmetic Burn 0.21's flex backend runs element by element on a batch of more
//! than one image (two thirds of a 64-image forward pass before the fold). The 2×2 max pools run as two
//! pairwise reductions ([`max_pool_2x2`]).

use burn::module::Param;
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::tensor::Tensor;
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;

/// A 3×3 convolution with its batch norm folded in, then ReLU: what a training block computes in inference.
#[derive(Debug, Clone)]
pub struct ConvRelu<B: Backend> {
    conv: Conv2d<B>,
}

impl<B: Backend> ConvRelu<B> {
    /// The block `relu(norm(conv(x)))` as one convolution with a bias, then ReLU.
    pub fn fold(conv: &Conv2d<B>, norm: &BatchNorm<B>) -> Self {
        let weight = conv.weight.val();
        let [out, _, _, _] = weight.dims();
        let scale = norm.gamma.val() / norm.running_var.value().add_scalar(norm.epsilon).sqrt();
        let bias = match &conv.bias {
            Some(b) => b.val() - norm.running_mean.value(),
            None => norm.running_mean.value().neg(),
        };
        let bias = bias * scale.clone() + norm.beta.val();
        let weight = weight * scale.reshape([out, 1, 1, 1]);
        Self {
            conv: Conv2d {
                weight: Param::from_tensor(weight),
                bias: Some(Param::from_tensor(bias)),
                ..conv.clone()
            },
        }
    }

    /// `relu(conv(x) + bias)`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        relu(self.conv.forward(x))
    }
}

/// A 2×2 max pool with stride 2, as two reductions over pairs of neighbours (a row's, then a column's): the
/// same values as [`MaxPool2d`], about twice as fast on flex, whose pool also computes every maximum's index.
/// Odd sizes go to `fallback` (which drops the last row or column, as this would not).
pub fn max_pool_2x2<B: Backend>(x: Tensor<B, 4>, fallback: &MaxPool2d) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    if h % 2 == 1 || w % 2 == 1 {
        return fallback.forward(x);
    }
    let rows = x.reshape([n * c * h, w / 2, 2]).max_dim(2);
    rows.reshape([n * c * h / 2, 2, w / 2])
        .max_dim(1)
        .reshape([n, c, h / 2, w / 2])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::pool::MaxPool2dConfig;
    use burn::nn::{BatchNormConfig, PaddingConfig2d, Relu};
    use burn::tensor::{Distribution, TensorData};

    /// Folding changes nothing but rounding: the same outputs as conv, batch norm and ReLU, with and
    /// without a bias, on a batch of several images.
    #[test]
    fn a_folded_block_computes_what_the_block_does() {
        let device = Default::default();
        for bias in [false, true] {
            let conv: Conv2d<Flex> = Conv2dConfig::new([3, 5], [3, 3])
                .with_padding(PaddingConfig2d::Same)
                .with_bias(bias)
                .init(&device);
            let mut norm: BatchNorm<Flex> = BatchNormConfig::new(5).init(&device);
            let stat = |v: Vec<f32>| Tensor::<Flex, 1>::from_data(TensorData::new(v, [5]), &device);
            norm.gamma = Param::from_tensor(stat(vec![0.5, 1.5, -1.0, 2.0, 1.0]));
            norm.beta = Param::from_tensor(stat(vec![0.1, -0.2, 0.3, 0.0, -1.0]));
            norm.running_mean =
                burn::module::RunningState::new(stat(vec![0.2, -0.1, 0.0, 0.5, 1.0]));
            norm.running_var =
                burn::module::RunningState::new(stat(vec![1.0, 0.25, 4.0, 0.5, 2.0]));
            let x = Tensor::<Flex, 4>::random([4, 3, 9, 7], Distribution::Default, &device);
            let want = Relu::new()
                .forward(norm.forward(conv.forward(x.clone())))
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let got = ConvRelu::fold(&conv, &norm)
                .forward(x)
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            assert_eq!(got.len(), 4 * 5 * 9 * 7);
            let diff = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "bias {bias}: max |diff| {diff}");
            assert!(
                want.iter().any(|v| *v > 0.1),
                "the ReLU let something through"
            );
        }
    }

    /// The pairwise pool gives exactly the module's values; odd sizes go to the module.
    #[test]
    fn the_pairwise_pool_is_the_max_pool() {
        let device = Default::default();
        let pool = MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init();
        for shape in [[3, 4, 8, 6], [1, 2, 2, 2], [2, 3, 7, 6], [2, 3, 6, 5]] {
            let x = Tensor::<Flex, 4>::random(shape, Distribution::Default, &device);
            let want = pool.forward(x.clone());
            let got = max_pool_2x2(x, &pool);
            assert_eq!(got.dims(), want.dims(), "{shape:?}");
            assert_eq!(
                got.into_data().to_vec::<f32>().unwrap(),
                want.into_data().to_vec::<f32>().unwrap(),
                "{shape:?}"
            );
        }
    }
}

//! The network: a SASRec-style causal transformer over a customer's item history. Item embeddings (row 0 is
//! padding) plus learned positions, pre-norm transformer blocks under a causal and a padding mask, a final
//! layer norm, and scores for every item from the same item embeddings (tied output). Histories are padded
//! on the left, so the last position always holds the newest item.

use burn::config::Config;
use burn::module::Module;
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::transformer::{
    TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput,
};
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig,
};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// The network's shape.
#[derive(Config, Debug)]
pub struct SasRecConfig {
    /// Items known to the model (row 0 of the embeddings is padding, so ids are `1..=items`).
    pub items: usize,
    /// Width of the embeddings.
    #[config(default = 64)]
    pub dim: usize,
    /// Transformer blocks.
    #[config(default = 2)]
    pub blocks: usize,
    /// Attention heads.
    #[config(default = 1)]
    pub heads: usize,
    /// Longest history the model reads (older items are dropped).
    #[config(default = 50)]
    pub max_len: usize,
    /// Dropout while training.
    #[config(default = 0.2)]
    pub dropout: f64,
}

/// The network.
#[derive(Module, Debug)]
pub struct SasRec<B: Backend> {
    items: Embedding<B>,
    positions: Embedding<B>,
    encoder: TransformerEncoder<B>,
    norm: LayerNorm<B>,
    dropout: Dropout,
}

impl SasRecConfig {
    /// A freshly initialised network on `device`.
    pub fn init<B: Backend>(&self, device: &B::Device) -> SasRec<B> {
        // Embeddings start at N(0, 1/dim): scaled by sqrt(dim) on input they are unit-sized, and the tied
        // output scores start near zero.
        let small = Initializer::Normal {
            mean: 0.0,
            std: 1.0 / (self.dim as f64).sqrt(),
        };
        SasRec {
            items: EmbeddingConfig::new(self.items + 1, self.dim)
                .with_initializer(small.clone())
                .init(device),
            positions: EmbeddingConfig::new(self.max_len, self.dim)
                .with_initializer(small)
                .init(device),
            encoder: TransformerEncoderConfig::new(self.dim, self.dim * 2, self.heads, self.blocks)
                .with_dropout(self.dropout)
                .with_norm_first(true)
                .init(device),
            norm: LayerNormConfig::new(self.dim).init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
        }
    }
}

impl<B: Backend> SasRec<B> {
    /// Hidden states `[batch, len, dim]` of left-padded histories `[batch, len]` (0 = padding).
    pub fn hidden(&self, histories: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [batch, len] = histories.dims();
        let device = histories.device();
        let pad = histories.clone().equal_elem(0);
        let dim = self.items.weight.dims()[1];
        let positions = Tensor::<B, 1, Int>::arange(0..len as i64, &device)
            .reshape([1, len])
            .expand([batch, len]);
        let x =
            self.items.forward(histories) * (dim as f64).sqrt() + self.positions.forward(positions);
        let x = self.dropout.forward(x);
        let input = TransformerEncoderInput::new(x)
            .mask_pad(pad)
            .mask_attn(generate_autoregressive_mask::<B>(batch, len, &device));
        self.norm.forward(self.encoder.forward(input))
    }

    /// Scores of every id (`[rows, items + 1]`, column 0 is padding) for hidden states `[rows, dim]`.
    pub fn scores(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        hidden.matmul(self.items.weight.val().transpose())
    }

    /// The next-item scores after each history's newest item: `[batch, items + 1]`.
    pub fn next(&self, histories: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [batch, len] = histories.dims();
        let h = self.hidden(histories);
        let dim = h.dims()[2];
        let last = h.slice([0..batch, len - 1..len]).reshape([batch, dim]);
        self.scores(last)
    }

    /// The item embeddings, `[items + 1, dim]` (row 0 is padding).
    pub fn item_embeddings(&self) -> Tensor<B, 2> {
        self.items.weight.val()
    }

    /// The longest history the model reads.
    pub fn max_len(&self) -> usize {
        self.positions.weight.dims()[0]
    }
}

/// `[rows, len]` ids as a tensor.
pub fn ids_tensor<B: Backend>(
    ids: Vec<i64>,
    rows: usize,
    len: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(ids, [rows, len]), device)
}

/// `history` (ids, oldest first) as `len` ids padded on the left, keeping the newest `len`.
pub fn left_pad(history: &[u32], len: usize, out: &mut Vec<i64>) {
    let keep = &history[history.len().saturating_sub(len)..];
    out.extend(std::iter::repeat_n(0, len - keep.len()));
    out.extend(keep.iter().map(|&i| i as i64));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histories_are_padded_on_the_left_and_cut_to_the_newest() {
        let mut out = Vec::new();
        left_pad(&[5, 6], 4, &mut out);
        left_pad(&[1, 2, 3, 4, 5, 6], 4, &mut out);
        assert_eq!(out, vec![0, 0, 5, 6, 3, 4, 5, 6]);
    }

    #[test]
    fn a_position_sees_only_the_items_before_it_and_never_padding() {
        type B = burn::backend::Flex;
        let device = Default::default();
        let model: SasRec<B> = SasRecConfig::new(30)
            .with_max_len(4)
            .with_dropout(0.0)
            .init(&device);
        let rows = |ids: Vec<i64>| {
            let h = model.hidden(ids_tensor(ids, 1, 4, &device));
            h.slice([0..1, 2..3]).into_data().to_vec::<f32>().unwrap()
        };
        // Position 2 reads items 0..=2 only: a different newest item (position 3) changes nothing there.
        let a = rows(vec![0, 4, 9, 11]);
        let b = rows(vec![0, 4, 9, 17]);
        assert_eq!(a, b);
        // ...while a different item before it does.
        assert_ne!(a, rows(vec![0, 5, 9, 11]));
        // Scores cover every id, padding included.
        let s = model.next(ids_tensor(vec![0, 4, 9, 11], 1, 4, &device));
        assert_eq!(s.dims(), [1, 31]);
    }
}

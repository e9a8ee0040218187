//! The two contenders behind one interface — the encoder–decoder [`Transformer`] and the
//! [`LstmSeq2Seq`] baseline — and the evaluation both are judged by.

use super::data::Data;
use crate::lstm::LstmSeq2Seq;
use crate::{Preset, Transformer};
use anyhow::Result;
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use shared::batching::{Seq2SeqBatch, Seq2SeqExample};
use shared::kernels::OpImpl;
use t0804_transformer_block::Parts;

/// The contenders, in the order of the tables and legends.
pub const NAMES: [&str; 2] = ["transformer", "lstm"];

/// A sequence-to-sequence model: the encoder–decoder Transformer or the LSTM.
pub enum Model {
    Transformer(Transformer),
    Lstm(LstmSeq2Seq),
}

impl Model {
    /// The contender `name` (one of [`NAMES`]) at the preset's size, its parameters in `vb`,
    /// computing in `compute` (bf16 over f32 parameters: mixed precision); the Transformer's
    /// norms and attention from `parts`, the LSTM's cell `lstm` (fused, or composed tensor ops
    /// and autograd).
    pub fn new(
        name: &str,
        vb: VarBuilder,
        p: &Preset,
        vocab: usize,
        (parts, lstm, compute): (&dyn Parts, OpImpl, DType),
    ) -> Result<Self> {
        Ok(match name {
            "transformer" => Model::Transformer(
                Transformer::with_parts(vb, p.transformer(vocab), parts)?
                    .with_compute_dtype(compute),
            ),
            "lstm" => Model::Lstm(
                LstmSeq2Seq::new(vb, p.lstm(vocab))?
                    .with_cell(lstm)
                    .with_compute_dtype(compute),
            ),
            other => anyhow::bail!("unknown model '{other}': choose one of {NAMES:?}"),
        })
    }

    /// Mean cross-entropy over the batch's real target tokens (a single value).
    pub fn loss(&self, b: &Seq2SeqBatch) -> candle_core::Result<Tensor> {
        match self {
            Model::Transformer(m) => m.loss(b),
            Model::Lstm(m) => m.loss(b),
        }
    }

    /// `n` tokens continuing `src`, greedily.
    pub fn generate(&self, src: &[u32], bos: u32, n: usize) -> candle_core::Result<Vec<u32>> {
        match self {
            Model::Transformer(m) => m.generate(src, bos, n, 0.0, 0),
            Model::Lstm(m) => m.generate(src, bos, n, 0.0, 0),
        }
    }
}

/// Mean target-token loss over (at most `max_batches` batches of `batch`) `pairs`: each batch's
/// loss weighted by its number of real target tokens.
pub fn evaluate(
    model: &Model,
    pairs: &[Seq2SeqExample],
    data: &Data,
    batch: usize,
    max_batches: usize,
) -> Result<f64> {
    let (total, count) = target_nll(model, pairs, data, batch, max_batches)?;
    Ok(total / count.max(1) as f64)
}

/// Total negative log-likelihood (nats) of the real target tokens of (at most `max_batches`
/// batches of `batch`) `pairs`, and their number.
pub fn target_nll(
    model: &Model,
    pairs: &[Seq2SeqExample],
    data: &Data,
    batch: usize,
    max_batches: usize,
) -> Result<(f64, usize)> {
    let (mut total, mut count) = (0.0, 0usize);
    for chunk in pairs.chunks(batch).take(max_batches) {
        let b = data.batch(chunk)?;
        let loss = model
            .loss(&b)?
            .detach()
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        total += loss * b.n_target_tokens as f64;
        count += b.n_target_tokens;
    }
    Ok((total, count))
}

/// WikiText-2 word-level test perplexity: the total NLL of the test split's tokens (all but the
/// first `src_len`, each predicted from the `src_len` tokens before its window and the target
/// tokens before it, [`Data::test_stream`]) over the words they spell — comparable with published
/// word-level results.
pub fn test_word_ppl(model: &Model, data: &Data, batch: usize) -> Result<f64> {
    let (nll, _) = target_nll(model, &data.test_stream, data, batch, usize::MAX)?;
    Ok(shared::train::word_level_perplexity(
        nll,
        data.test_stream_words,
    ))
}

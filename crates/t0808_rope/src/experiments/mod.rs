//! The experiments of 8-08, one module each, and what the trained ones share: the position
//! schemes compared, how a model of each is built, and loss per position.

pub mod formulations;
pub mod relative;
pub mod shift_task;
pub mod wikitext;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use shared::kernels::Kernels;
use std::sync::Arc;
use t0804_transformer_block::{init_lm, DecoderOnlyLm, LmConfig, LmShape, PositionKind};
use t0808_rope::RopeTables;

/// The position schemes compared, in table order: none, added to the embeddings (sinusoidal,
/// learned = rung 2), rotated inside attention (RoPE = rung 3).
pub const SCHEMES: [(&str, PositionKind); 4] = [
    ("none", PositionKind::None),
    ("sinusoidal", PositionKind::Sinusoidal),
    ("learned", PositionKind::Learned),
    ("RoPE", PositionKind::Rope),
];

/// The model family of the trained experiments and how it runs.
pub struct Models {
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub kernels: Kernels,
    pub device: Device,
    pub dtype: DType,
    pub seed: u64,
    /// Peak learning rate.
    pub lr: f64,
}

impl Models {
    /// Rung 2 (`grouped(modern(gpt2(shape)), n_kv)`: RMSNorm, SwiGLU, GQA, learned positions)
    /// with its positions replaced by `positions`; `PositionKind::Rope` gives exactly
    /// `t0808_rope::llama(shape, n_kv)`, rung 3.
    pub fn config(&self, vocab: usize, max_seq: usize, positions: PositionKind) -> LmConfig {
        let shape = LmShape {
            vocab_size: vocab,
            max_seq_len: max_seq,
            d_model: self.d_model,
            n_layers: self.n_layers,
            n_heads: self.n_heads,
        };
        let rung2 = t0807_grouped_query_attention::grouped(
            t0806_modern_blocks::modern(LmConfig::gpt2(shape)),
            self.n_kv_heads,
        );
        match positions {
            PositionKind::Rope => t0808_rope::llama(shape, self.n_kv_heads),
            _ => LmConfig { positions, ..rung2 },
        }
    }

    /// A fresh model of [`Self::config`] built with this rung's parts (RoPE tables of
    /// `max_seq` positions plugged into every attention layer), from the run's seed.
    pub fn init(
        &self,
        vocab: usize,
        max_seq: usize,
        positions: PositionKind,
    ) -> Result<(VarMap, DecoderOnlyLm)> {
        shared::params::set_seed(self.seed);
        let cfg = self.config(vocab, max_seq, positions);
        let parts = t0808_rope::parts(self.kernels);
        Ok(init_lm(&cfg, &parts, self.dtype, &self.device)?)
    }
}

/// Plugs `tables` into every attention layer of `lm` (another RoPE scaling, same weights).
pub fn plug_rope(lm: &mut DecoderOnlyLm, tables: RopeTables) {
    let plug = Arc::new(tables);
    for block in &mut lm.blocks {
        block.attn.positions = Some(plug.clone());
    }
}

/// Loss per position of `lm` on `x, y (batch, len)` where `mask` is 1, and accuracy (argmax =
/// target) at positions `< train_len` and `≥ train_len`.
pub fn per_position(
    lm: &DecoderOnlyLm,
    x: &Tensor,
    y: &Tensor,
    mask: &Tensor,
    train_len: usize,
) -> Result<(Vec<f64>, f64, f64)> {
    let logits = lm.forward(x, 0)?.to_dtype(DType::F32)?.to_vec3::<f32>()?; // (batch, len, vocab)
    let ys = y.to_vec2::<u32>()?;
    let ms = mask.to_vec2::<u8>()?;
    let (b, len) = (ys.len(), ys[0].len());
    let mut loss = vec![0f64; len];
    let (mut hits, mut counts) = ([0usize; 2], [0usize; 2]); // [within, beyond] the training length
    for r in 0..b {
        for t in (0..len).filter(|&t| ms[r][t] != 0) {
            let z = &logits[r][t];
            let max = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + z.iter().map(|v| (*v as f64 - max).exp()).sum::<f64>().ln();
            loss[t] += (lse - z[ys[r][t] as usize] as f64) / b as f64;
            let argmax = z
                .iter()
                .enumerate()
                .max_by(|p, q| p.1.total_cmp(q.1))
                .map_or(0, |m| m.0);
            let side = usize::from(t >= train_len);
            hits[side] += usize::from(argmax == ys[r][t] as usize);
            counts[side] += 1;
        }
    }
    let acc = |s: usize| hits[s] as f64 / counts[s].max(1) as f64;
    Ok((loss, acc(0), acc(1)))
}

/// Means of consecutive buckets of `k` positions, as `(first position of the bucket, mean)`.
pub fn bucket_means(v: &[f64], k: usize) -> Vec<(f64, f64)> {
    v.chunks(k)
        .enumerate()
        .map(|(i, c)| ((i * k) as f64, c.iter().sum::<f64>() / c.len() as f64))
        .collect()
}

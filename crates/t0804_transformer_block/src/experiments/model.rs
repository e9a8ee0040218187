//! The model every experiment of 8-04 trains: rung 0 of the ladder (the GPT-2-style decoder-only
//! LM) with sinusoidal positions, its norm placed before (pre-norm) or after (post-norm) each
//! sub-layer, at one of three sizes.

use anyhow::Result;
use candle_core::{DType, Device};
use candle_nn::VarMap;
use t0804_transformer_block::{
    init_lm, parts, DecoderOnlyLm, LmConfig, LmShape, NormPlacement, PositionKind,
};

/// Model size and budget: tokens `(batch, seq_len)` per step, `steps` per run.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub vocab: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub seq_len: usize,
    pub batch: usize,
    pub steps: usize,
}

impl Shape {
    /// The size for a run: a smoke test (`quick`), a few minutes on 2 CPU cores, or a GPU run.
    pub fn for_run(quick: bool, gpu: bool) -> Self {
        match (quick, gpu) {
            (true, _) => Shape {
                vocab: 2048,
                d_model: 64,
                n_layers: 2,
                n_heads: 4,
                seq_len: 32,
                batch: 8,
                steps: 40,
            },
            (false, false) => Shape {
                vocab: 4096,
                d_model: 128,
                n_layers: 4,
                n_heads: 4,
                seq_len: 64,
                batch: 16,
                steps: 300,
            },
            (false, true) => Shape {
                vocab: 8192,
                d_model: 384,
                n_layers: 6,
                n_heads: 6,
                seq_len: 256,
                batch: 32,
                steps: 1500,
            },
        }
    }
}

/// Rung 0 of the ladder (the GPT-2-style LM) with sinusoidal positions and the norm at `placement`.
pub fn model_config(s: &Shape, placement: NormPlacement) -> LmConfig {
    let shape = LmShape {
        vocab_size: s.vocab,
        max_seq_len: s.seq_len,
        d_model: s.d_model,
        n_layers: s.n_layers,
        n_heads: s.n_heads,
    };
    LmConfig {
        positions: PositionKind::Sinusoidal,
        placement,
        ..LmConfig::gpt2(shape)
    }
}

/// A fresh model of `cfg` whose parameters live in the returned `VarMap` (rung 0's parts,
/// composed ops), seeded with `seed` so that every placement starts from the same draw.
pub fn fresh_lm(
    cfg: &LmConfig,
    seed: u64,
    dtype: DType,
    dev: &Device,
) -> Result<(VarMap, DecoderOnlyLm)> {
    shared::params::set_seed(seed);
    Ok(init_lm(
        cfg,
        &parts(shared::Kernels::composed()),
        dtype,
        dev,
    )?)
}

/// A `w`-point running mean of `(x, y)` points, for readable training curves.
pub fn smooth(points: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    (0..points.len())
        .map(|i| {
            let lo = i.saturating_sub(w - 1);
            let mean = points[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i + 1 - lo) as f64;
            (points[i].0, mean)
        })
        .collect()
}

//! RoPE on the ladder: rung 3 = rung 2 with rotary instead of learned positions — the LLaMA recipe.

use crate::{RopeScaling, RopeTables};
use candle_core::{Device, Result};
use shared::kernels::Kernels;
use std::sync::Arc;
use t0802_multi_head_attention::PositionPlug;
use t0804_transformer_block::{LmConfig, LmShape, Parts, PositionKind};
use t0806_modern_blocks::ModernParts;

/// Rung 3 of the ladder: the rung below with RoPE (base `cfg.rope_theta`) in place of absolute
/// positions.
pub fn with_rope(cfg: LmConfig) -> LmConfig {
    LmConfig {
        positions: PositionKind::Rope,
        ..cfg
    }
}

/// The LLaMA recipe of `shape` with `n_kv_heads` K/V heads: 8-04's GPT-2 LM + RMSNorm + SwiGLU
/// (8-06) + grouped-query attention (8-07) + RoPE (8-08).
pub fn llama(shape: LmShape, n_kv_heads: usize) -> LmConfig {
    let rung1 = t0806_modern_blocks::modern(LmConfig::gpt2(shape));
    with_rope(t0807_grouped_query_attention::grouped(rung1, n_kv_heads))
}

/// The fastest kernels up to this rung on `device` (fused norm, SwiGLU, softmax and RoPE, on the
/// CPU and on CUDA; naive attention until 8-09).
pub fn fastest_kernels(device: &Device) -> Kernels {
    t0806_modern_blocks::fastest_kernels(device)
}

/// Rung 3's parts: 8-06's, plus RoPE tables shared by every layer.
#[derive(Debug, Clone, Copy)]
pub struct RopeParts {
    pub below: ModernParts,
}

/// This topic's parts with the run's kernels.
pub fn parts(kernels: Kernels) -> RopeParts {
    RopeParts {
        below: t0806_modern_blocks::parts(kernels),
    }
}

impl Parts for RopeParts {
    fn below(&self) -> Option<&dyn Parts> {
        Some(&self.below)
    }

    fn attention_positions(
        &self,
        cfg: &LmConfig,
        device: &Device,
    ) -> Result<Option<Arc<dyn PositionPlug>>> {
        if cfg.positions != PositionKind::Rope {
            return self.below.attention_positions(cfg, device);
        }
        let tables = RopeTables::new(
            cfg.d_head(),
            cfg.max_seq_len,
            cfg.rope_theta,
            RopeScaling::None,
            device,
        )?
        .with_impl(self.kernels().rope);
        Ok(Some(Arc::new(tables)))
    }
}

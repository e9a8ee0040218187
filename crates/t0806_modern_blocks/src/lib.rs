//! # 8-06 · Modern blocks: RMSNorm, SwiGLU, and the LLaMA recipe
//!
//! Between the 2017 Transformer and LLaMA (2023) the decoder block changed in a handful of
//! small, independent ways. This crate collects them and builds both recipes from the generic
//! stack of 8-04 ([`DecoderOnlyLm`]):
//!
//! | | original (2017) | GPT-2 (2019) | LLaMA (2023) |
//! |---|---|---|---|
//! | norm placement | **post**-norm `LN(x + f(x))` | **pre**-norm `x + f(LN(x))` + final LN | pre-norm + final norm |
//! | norm | LayerNorm | LayerNorm | **RMSNorm** |
//! | feed-forward | ReLU, `4d` | GELU, `4d` | **SwiGLU**, `≈ 8/3·d` |
//! | positions | sinusoidal, added | learned, added | **RoPE** on q, k (8-08) |
//! | attention | MHA | MHA | MHA / **GQA** (8-07) |
//! | biases | yes | yes | **none** |
//!
//! (GPT-2 is *pre*-norm: each sub-block normalises its input and the stack ends with a final
//! LayerNorm; only the original Transformer is post-norm.)
//!
//! ## RMSNorm (Zhang & Sennrich, 2019)
//! LayerNorm re-centres and re-scales; RMSNorm only re-scales, by the root mean square:
//!
//! ```text
//! RMSNorm(x) = x / √(mean(x²) + ε) ⊙ g            x: (…, d),  g: (d,)  (ones at init), ε = 1e-5
//! ```
//!
//! One reduction instead of two, no bias, and (empirically) the same quality. Computed in f32
//! even for bf16 activations: the mean of squares overflows/underflows easily in low precision.
//!
//! ## SwiGLU (Shazeer, 2020)
//! A gated feed-forward: one projection decides, element-wise, how much of another to let
//! through, with `SiLU(z) = z·σ(z)` as the gate:
//!
//! ```text
//! SwiGLU(x) = W₂ (SiLU(W₁x) ⊙ W₃x)        W₁, W₃: (d_ff, d_model),  W₂: (d_model, d_ff)
//! ```
//!
//! Three matrices instead of two, so `d_ff ≈ 8/3·d_model` keeps the parameter count of a
//! `4·d_model` GELU MLP (`3·(8/3)d² = 8d²`); [`swiglu_d_ff`] rounds it up to a multiple of 64.
//!
//! ## Fused RMSNorm ([`fused`])
//! The composed RMSNorm is half a dozen element-wise passes over memory; [`rms_norm_fused`] is
//! one custom op (forward and backward), a CUDA kernel on the GPU (`kernels/rmsnorm.cu`, `cuda`
//! feature) and a plain loop on the CPU. [`RmsNorm::with_fused`] / `ModernLmConfig::fused_norm`
//! switch a model to it; the math, the parameters and the checkpoints are the same.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fused;
pub mod softmax_fused;
pub mod swiglu_fused;
pub use fused::{rms_norm_fused, rms_norm_fused_backward, FusedRmsNorm, FusedRmsNormBackward};
pub use softmax_fused::{causal_softmax_fused, fused_softmax_kernel};

use candle_core::{bail, DType, Device, Result, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use shared::params::{expect_last_dim, normal, ones, weight};
use std::path::Path;
use std::sync::Arc;
use t0802_multi_head_attention::{MhaConfig, MultiHeadAttention};
use t0803_positional_encoding::LearnedPositions;
use t0804_transformer_block::{
    AbsolutePositions, Activation, CausalMha, DecoderOnlyBlock, DecoderOnlyLm, FeedForward, Layer,
    LayerNorm, NormPlacement,
};
use t0807_grouped_query_attention::{GqaConfig, GroupedQueryAttention};
use t0808_rope::{RopeScaling, RopeTables};

/// Root-mean-square normalisation: `x / √(mean(x²) + ε) ⊙ g`. Parameter: `weight` (g, ones).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub gain: Tensor,
    pub eps: f64,
    /// Run as the fused op ([`rms_norm_fused`]) instead of composed tensor ops. Same result.
    pub fused: bool,
}

impl RmsNorm {
    pub fn new(vb: VarBuilder, d_model: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            gain: ones(&vb, d_model, "weight")?,
            eps,
            fused: false,
        })
    }

    pub fn from_weights(gain: Tensor, eps: f64) -> Result<Self> {
        if gain.rank() != 1 {
            bail!("RmsNorm: the gain must be 1-D, got {:?}", gain.dims());
        }
        Ok(Self {
            gain,
            eps,
            fused: false,
        })
    }

    /// The same norm, computed by the fused op (`true`) or by composed tensor ops (`false`).
    pub fn with_fused(mut self, fused: bool) -> Self {
        self.fused = fused;
        self
    }
}

impl Layer for RmsNorm {
    /// `x (…, d)` → same shape; computed in f32 (f64 stays f64) and cast back.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        expect_last_dim(x, self.gain.dims()[0], "RmsNorm input")?;
        if self.fused {
            return rms_norm_fused(x, &self.gain, self.eps);
        }
        let dtype = x.dtype();
        let work = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let x = x.to_dtype(work)?;
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // (…, 1): mean of squares
        let normed = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.gain.to_dtype(work)?)?
            .to_dtype(dtype)
    }
}

/// `d_ff` for SwiGLU: `8/3·d_model` rounded up to a multiple of 64 (matches a `4·d_model` MLP's
/// parameter count).
pub fn swiglu_d_ff(d_model: usize) -> usize {
    (8 * d_model).div_ceil(3).div_ceil(64) * 64
}

/// `SiLU(z) = z·σ(z) = z / (1 + e^{−z})` from differentiable primitives.
pub fn silu(z: &Tensor) -> Result<Tensor> {
    z / (z.neg()?.exp()? + 1.0)?
}

/// The SwiGLU feed-forward `W₂(SiLU(W₁x) ⊙ W₃x)`. Parameters: `w1`, `w3 (d_ff, d_model)`, `w2 (d_model, d_ff)`.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    pub w1: Tensor,
    pub w2: Tensor,
    pub w3: Tensor,
    /// Compute the gate `SiLU(W₁x) ⊙ W₃x` with the fused op ([`swiglu_fused`]): same values.
    pub fused: bool,
}

impl SwiGlu {
    pub fn new(vb: VarBuilder, d_model: usize, d_ff: usize) -> Result<Self> {
        Ok(Self {
            w1: weight(&vb, d_ff, d_model, "w1")?,
            w2: weight(&vb, d_model, d_ff, "w2")?,
            w3: weight(&vb, d_ff, d_model, "w3")?,
            fused: false,
        })
    }

    /// The same layer, its gate computed by the fused op (`true`) or composed ops (`false`).
    pub fn with_fused(mut self, fused: bool) -> Self {
        self.fused = fused;
        self
    }

    pub fn from_weights(w1: Tensor, w2: Tensor, w3: Tensor) -> Result<Self> {
        let (d_ff, d_model) = w1.dims2()?;
        if w3.dims2()? != (d_ff, d_model) || w2.dims2()? != (d_model, d_ff) {
            bail!("SwiGlu: W1 {:?}, W2 {:?}, W3 {:?} do not fit (W2 must be ({d_model}, {d_ff}), W3 ({d_ff}, {d_model}))", w1.dims(), w2.dims(), w3.dims());
        }
        Ok(Self {
            w1,
            w2,
            w3,
            fused: false,
        })
    }
}

impl Layer for SwiGlu {
    /// `(…, d_model)` → `(…, d_model)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = shared::linear(x, &self.w1)?; // (…, d_ff)
        let up = shared::linear(x, &self.w3)?; // (…, d_ff)
        let h = if self.fused {
            swiglu_fused::swiglu_gate_fused(&a, &up)?
        } else {
            (silu(&a)? * up)?
        };
        shared::linear(&h, &self.w2)
    }
}

/// Which block recipe the modern LM uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recipe {
    /// Pre-norm RMSNorm, SwiGLU, RoPE inside GQA, no biases, untied head.
    Llama,
    /// Pre-norm LayerNorm, GELU MLP with biases, learned absolute positions, MHA with biases.
    Gpt2,
}

fn default_scaling() -> RopeScaling {
    RopeScaling::None
}

/// The configuration of a modern decoder-only LM (`config.json` of a checkpoint).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModernLmConfig {
    pub vocab_size: usize,
    pub max_seq_len: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// K/V heads (LLaMA recipe; must equal `n_heads` for GPT-2).
    pub n_kv_heads: usize,
    pub d_ff: usize,
    pub rope_theta: f64,
    pub norm_eps: f64,
    pub recipe: Recipe,
    #[serde(default = "default_scaling")]
    pub rope_scaling: RopeScaling,
    /// LLaMA recipe: RMSNorm through the fused op (CUDA kernel on the GPU). Same parameters
    /// and results as the composed norm; an implementation choice, not a different model.
    #[serde(default)]
    pub fused_norm: bool,
    /// LLaMA recipe: RoPE through the fused op (t0808's `apply_rope_fused`; CUDA kernel on the
    /// GPU). Same values as the composed rotation.
    #[serde(default)]
    pub fused_rope: bool,
    /// LLaMA recipe: the SwiGLU gate through the fused op ([`swiglu_fused`]). Same values.
    #[serde(default)]
    pub fused_swiglu: bool,
    /// LLaMA recipe, naive attention: the scale, causal mask and softmax through the fused op
    /// ([`softmax_fused`]). Same values; FlashAttention ([`with_flash_attention`]) replaces it.
    #[serde(default)]
    pub fused_softmax: bool,
}

impl ModernLmConfig {
    /// A LLaMA-recipe config with `d_ff = swiglu_d_ff(d_model)`, θ = 10 000, ε = 1e-5.
    pub fn llama(
        vocab_size: usize,
        max_seq_len: usize,
        d_model: usize,
        n_layers: usize,
        n_heads: usize,
        n_kv_heads: usize,
    ) -> Self {
        Self {
            vocab_size,
            max_seq_len,
            d_model,
            n_layers,
            n_heads,
            n_kv_heads,
            d_ff: swiglu_d_ff(d_model),
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            recipe: Recipe::Llama,
            rope_scaling: RopeScaling::None,
            fused_norm: false,
            fused_rope: false,
            fused_swiglu: false,
            fused_softmax: false,
        }
    }

    /// Every fused op of this topic switched on (or off): RMSNorm, RoPE, the SwiGLU gate and
    /// naive attention's causal softmax. Same parameters and values either way.
    pub fn with_fused_ops(self, on: bool) -> Self {
        Self {
            fused_norm: on,
            fused_rope: on,
            fused_swiglu: on,
            fused_softmax: on,
            ..self
        }
    }

    /// A GPT-2-recipe config with `d_ff = 4·d_model`.
    pub fn gpt2(
        vocab_size: usize,
        max_seq_len: usize,
        d_model: usize,
        n_layers: usize,
        n_heads: usize,
    ) -> Self {
        Self {
            d_ff: 4 * d_model,
            recipe: Recipe::Gpt2,
            ..Self::llama(vocab_size, max_seq_len, d_model, n_layers, n_heads, n_heads)
        }
    }

    pub fn gqa(&self) -> GqaConfig {
        GqaConfig::new(self.d_model, self.n_heads, self.n_kv_heads)
    }

    pub fn validate(&self) -> Result<()> {
        self.gqa().d_head()?;
        if self.vocab_size == 0 || self.max_seq_len == 0 || self.n_layers == 0 || self.d_ff == 0 {
            bail!("ModernLmConfig: vocab_size, max_seq_len, n_layers and d_ff must be positive: {self:?}");
        }
        if self.recipe == Recipe::Gpt2 && self.n_kv_heads != self.n_heads {
            bail!("the GPT-2 recipe uses multi-head attention: n_kv_heads ({}) must equal n_heads ({})", self.n_kv_heads, self.n_heads);
        }
        Ok(())
    }
}

/// Builds the LM through `vb` (fresh parameters from a `VarMap`, or a checkpoint).
///
/// Parameter names: `token_embedding (vocab, d)`; per block `blocks.<i>.attn_norm.weight`
/// (+ `.bias` for GPT-2), `blocks.<i>.attn.{q_proj,k_proj,v_proj,output_proj}` (GPT-2 adds
/// `*_bias`), `blocks.<i>.ffn_norm.*`, `blocks.<i>.ffn.{w1,w2,w3}` (LLaMA) or
/// `blocks.<i>.ffn.{w1,b1,w2,b2}` (GPT-2); `positions.position_embeddings` (GPT-2);
/// `final_norm.*`; `lm_head (vocab, d)`.
pub fn build_modern_lm(vb: VarBuilder, cfg: &ModernLmConfig) -> Result<DecoderOnlyLm> {
    cfg.validate()?;
    let d = cfg.d_model;
    let d_head = cfg.gqa().d_head()?;
    let rope = match cfg.recipe {
        Recipe::Llama => Some(Arc::new(
            RopeTables::new(
                d_head,
                cfg.max_seq_len,
                cfg.rope_theta,
                cfg.rope_scaling,
                vb.device(),
            )?
            .with_fused(cfg.fused_rope),
        )),
        Recipe::Gpt2 => None,
    };
    let norm = |vb: VarBuilder| -> Result<Box<dyn Layer>> {
        Ok(match cfg.recipe {
            Recipe::Llama => {
                Box::new(RmsNorm::new(vb, d, cfg.norm_eps)?.with_fused(cfg.fused_norm))
            }
            Recipe::Gpt2 => Box::new(LayerNorm::new(vb, d, cfg.norm_eps)?),
        })
    };
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let vb = vb.pp(format!("blocks.{i}"));
        let (attn, ffn): (Box<dyn t0804_transformer_block::Mixer>, Box<dyn Layer>) =
            match cfg.recipe {
                Recipe::Llama => (
                    Box::new(llama_attention(vb.pp("attn"), cfg, rope.clone())?),
                    Box::new(SwiGlu::new(vb.pp("ffn"), d, cfg.d_ff)?.with_fused(cfg.fused_swiglu)),
                ),
                Recipe::Gpt2 => (
                    Box::new(CausalMha {
                        mha: MultiHeadAttention::new(
                            vb.pp("attn"),
                            MhaConfig {
                                d_model: d,
                                n_heads: cfg.n_heads,
                                bias: true,
                            },
                        )?,
                    }),
                    Box::new(FeedForward::new(
                        vb.pp("ffn"),
                        d,
                        cfg.d_ff,
                        Activation::Gelu,
                        true,
                    )?),
                ),
            };
        blocks.push(DecoderOnlyBlock {
            attn_norm: norm(vb.pp("attn_norm"))?,
            attn,
            ffn_norm: norm(vb.pp("ffn_norm"))?,
            ffn,
            placement: NormPlacement::Pre,
        });
    }
    let positions: Option<Box<dyn AbsolutePositions>> = match cfg.recipe {
        Recipe::Llama => None,
        Recipe::Gpt2 => Some(Box::new(LearnedPositions::new(
            vb.pp("positions"),
            cfg.max_seq_len,
            d,
        )?)),
    };
    Ok(DecoderOnlyLm {
        token_embedding: normal(&vb, (cfg.vocab_size, d), "token_embedding", 1.0)?,
        positions,
        blocks,
        final_norm: Some(norm(vb.pp("final_norm"))?),
        lm_head: weight(&vb, cfg.vocab_size, d, "lm_head")?,
        lm_head_bias: None,
        max_seq_len: cfg.max_seq_len,
    })
}

/// The LLaMA recipe's attention: grouped-query attention with RoPE, its softmax fused when
/// `cfg.fused_softmax`.
fn llama_attention(
    vb: VarBuilder,
    cfg: &ModernLmConfig,
    rope: Option<Arc<RopeTables>>,
) -> Result<GroupedQueryAttention> {
    let attn = GroupedQueryAttention::new(vb, cfg.gqa(), rope)?;
    Ok(if cfg.fused_softmax {
        attn.with_kernel(fused_softmax_kernel)
    } else {
        attn
    })
}

/// A fresh, trainable model: the `VarMap` holding its parameters and the model.
pub fn init_modern_lm(
    cfg: &ModernLmConfig,
    dtype: DType,
    device: &Device,
) -> Result<(VarMap, DecoderOnlyLm)> {
    let varmap = VarMap::new();
    let lm = build_modern_lm(VarBuilder::from_varmap(&varmap, dtype, device), cfg)?;
    Ok((varmap, lm))
}

/// Writes `config.json` and `model.safetensors` into `dir` (created if needed).
pub fn save_modern_lm(dir: &Path, cfg: &ModernLmConfig, varmap: &VarMap) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(cfg)?)?;
    shared::params::save_params(varmap, &dir.join("model.safetensors"))?;
    Ok(())
}

/// Reads a folder written by [`save_modern_lm`]: the config and a (frozen) model on `device` in `dtype`.
pub fn load_modern_lm(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<(ModernLmConfig, DecoderOnlyLm)> {
    use anyhow::Context;
    let cfg_path = dir.join("config.json");
    let cfg: ModernLmConfig = serde_json::from_str(
        &std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("no model config at {}", cfg_path.display()))?,
    )
    .with_context(|| format!("{} is not a ModernLmConfig", cfg_path.display()))?;
    let weights = dir.join("model.safetensors");
    // Safety: the file is memory-mapped read-only and not modified while the model lives.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, device)? };
    Ok((cfg, build_modern_lm(vb, &cfg)?))
}

/// Float64 reference of RMSNorm for one row.
pub fn reference_rms_norm(x: &[f64], g: &[f64], eps: f64) -> Vec<f64> {
    let rms = (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
    x.iter().zip(g).map(|(v, g)| v / rms * g).collect()
}

/// t0807's attention-kernel hook filled with t0809's FlashAttention: exact causal attention
/// without the `(seq, seq)` score matrix. K/V heads are repeated for grouped-query attention
/// (the flash op takes one K/V head per query head).
pub fn flash_kernel(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    let group = q.dim(1)? / k.dim(1)?;
    let (k, v) = if group > 1 {
        (
            t0807_grouped_query_attention::repeat_kv(k, group)?,
            t0807_grouped_query_attention::repeat_kv(v, group)?,
        )
    } else {
        (k.contiguous()?, v.contiguous()?)
    };
    let scale = t0809_flash_attention::default_softmax_scale(q.dim(3)?);
    t0809_flash_attention::flash_attention(&q.contiguous()?, &k, &v, scale, causal)
}

/// Switches every grouped-query attention of a LLaMA-recipe model to [`flash_kernel`].
pub fn with_flash_attention(mut lm: DecoderOnlyLm) -> Result<DecoderOnlyLm> {
    for (i, block) in lm.blocks.iter_mut().enumerate() {
        let Some(gqa) = block.attn.as_any().downcast_ref::<GroupedQueryAttention>() else {
            bail!("block {i}: FlashAttention plugs into the LLaMA recipe's grouped-query attention only");
        };
        block.attn = Box::new(gqa.clone().with_kernel(flash_kernel));
    }
    Ok(lm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_width_matches_gelu_parameter_count() {
        assert_eq!(swiglu_d_ff(512), 1408); // 8/3·512 = 1365.3 → 1408
        assert_eq!(swiglu_d_ff(4096), 10944); // LLaMA-7B rounds to 256 instead: 11008
        assert_eq!(swiglu_d_ff(192), 512);
        for d in [256, 512, 768, 1024] {
            let ratio = (3 * swiglu_d_ff(d)) as f64 / (8 * d) as f64;
            assert!((1.0..1.1).contains(&ratio), "d {d}: ratio {ratio}");
        }
    }

    #[test]
    fn gpt2_recipe_refuses_grouped_heads() {
        let mut cfg = ModernLmConfig::gpt2(100, 16, 64, 1, 4);
        cfg.n_kv_heads = 2;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("n_kv_heads (2) must equal n_heads (4)"), "{e}");
    }
}

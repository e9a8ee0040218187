//! # 8-06 · Modern blocks: RMSNorm, SwiGLU, and the LLaMA recipe
//!
//! Between the 2017 Transformer and LLaMA (2023) the decoder block changed in a handful of
//! small, independent ways. This topic is **rung 1 of the ladder**: it takes 8-04's GPT-2-style
//! LM and changes its norm and feed-forward — RMSNorm, SwiGLU, no biases ([`modern`]). The other
//! LLaMA ingredients arrive one per topic: grouped-query attention in 8-07, RoPE in 8-08.
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
//! feature) and a plain loop on the CPU. The SwiGLU gate ([`swiglu_fused`]) and naive
//! attention's causal softmax ([`softmax_fused`]) are fused the same way, and so is 8-04's
//! LayerNorm ([`layernorm_fused`]: one more reduction, the mean, and a bias) and its GELU MLP's
//! bias + GELU ([`gelu_fused`]), which this rung's parts give the GPT-2-style rung and 8-05's
//! encoder–decoder. Which form runs is the run's [`Kernels`] (`norm`, `swiglu`, `gelu`,
//! `softmax`), never the model's config: the math, the parameters and the checkpoints are the
//! same.

pub mod add_norm;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fused;
pub mod gelu_fused;
pub mod layernorm_fused;
pub mod softmax_fused;
pub mod swiglu_fused;
pub use add_norm::add_rms_norm_fused;
pub use fused::{rms_norm_fused, rms_norm_fused_backward, FusedRmsNorm, FusedRmsNormBackward};
pub use gelu_fused::bias_gelu_fused;
pub use layernorm_fused::{layer_norm_fused, layer_norm_fused_backward, FusedLayerNormLayer};
pub use softmax_fused::{causal_softmax_fused, softmax_fused_up_to, FusedSoftmaxAttention};

use candle_core::{bail, DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use shared::kernels::{AttentionImpl, Kernels, OpImpl};
use shared::params::{expect_last_dim, ones, weight};
use std::sync::Arc;
use t0802_multi_head_attention::AttentionKernel;
use t0804_transformer_block::{
    Activation, FeedForward, FfnKind, Gpt2Parts, Layer, LayerNorm, LmConfig, NormKind, Parts,
};

/// Root-mean-square normalisation: `x / √(mean(x²) + ε) ⊙ g`. Parameter: `weight` (g, ones).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub gain: Tensor,
    pub eps: f64,
    /// Composed tensor ops or the fused op ([`rms_norm_fused`]): same result.
    pub imp: OpImpl,
}

impl RmsNorm {
    pub fn new(vb: VarBuilder, d_model: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            gain: ones(&vb, d_model, "weight")?,
            eps,
            imp: OpImpl::Composed,
        })
    }

    pub fn from_weights(gain: Tensor, eps: f64) -> Result<Self> {
        if gain.rank() != 1 {
            bail!("RmsNorm: the gain must be 1-D, got {:?}", gain.dims());
        }
        Ok(Self {
            gain,
            eps,
            imp: OpImpl::Composed,
        })
    }

    /// The same norm, computed by the fused op or by composed tensor ops.
    pub fn with_impl(mut self, imp: OpImpl) -> Self {
        self.imp = imp;
        self
    }
}

impl Layer for RmsNorm {
    /// The fused norm also takes the residual add in front of it ([`add_rms_norm_fused`]), unless
    /// [`add_norm::set_fused_add_norm`] turned that off; the composed norm adds, then normalises.
    fn add_then_forward(&self, x: &Tensor, a: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.imp == OpImpl::Fused && add_norm::fused_add_norm() {
            return add_rms_norm_fused(x, a, &self.gain, self.eps);
        }
        let h = shared::add::residual_add(x, a)?;
        let y = self.forward(&h)?;
        Ok((h, y))
    }

    /// `x (…, d)` → same shape; computed in f32 (f64 stays f64) and cast back.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        expect_last_dim(x, self.gain.dims()[0], "RmsNorm input")?;
        if self.imp == OpImpl::Fused {
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
    /// The gate `SiLU(W₁x) ⊙ W₃x` composed or fused ([`swiglu_fused`]): same values.
    pub imp: OpImpl,
}

impl SwiGlu {
    pub fn new(vb: VarBuilder, d_model: usize, d_ff: usize) -> Result<Self> {
        Ok(Self {
            w1: weight(&vb, d_ff, d_model, "w1")?,
            w2: weight(&vb, d_model, d_ff, "w2")?,
            w3: weight(&vb, d_ff, d_model, "w3")?,
            imp: OpImpl::Composed,
        })
    }

    /// The same layer, its gate computed by the fused op or composed ops.
    pub fn with_impl(mut self, imp: OpImpl) -> Self {
        self.imp = imp;
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
            imp: OpImpl::Composed,
        })
    }
}

impl Layer for SwiGlu {
    /// `(…, d_model)` → `(…, d_model)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = shared::linear(x, &self.w1)?; // (…, d_ff)
        let up = shared::linear(x, &self.w3)?; // (…, d_ff)
        let h = match self.imp {
            OpImpl::Fused => swiglu_fused::swiglu_gate_fused(&a, &up)?,
            OpImpl::Composed => (silu(&a)? * up)?,
        };
        shared::linear(&h, &self.w2)
    }
}

/// 8-04's GELU MLP `GELU(x·W₁ᵀ + b₁)·W₂ᵀ + b₂` with bias + GELU as one op ([`bias_gelu_fused`]);
/// the same parameters and names as [`FeedForward`] (an MLP without biases adds zeros).
#[derive(Debug, Clone)]
pub struct FusedGeluMlp {
    pub ffn: FeedForward,
}

impl FusedGeluMlp {
    /// The fused form of `ffn`, which must be a GELU MLP.
    pub fn new(ffn: FeedForward) -> Result<Self> {
        if ffn.activation != Activation::Gelu {
            bail!(
                "FusedGeluMlp: the MLP's activation is {:?}, not GELU",
                ffn.activation
            );
        }
        Ok(Self { ffn })
    }
}

impl Layer for FusedGeluMlp {
    /// `(…, d_model)` → `(…, d_model)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f = &self.ffn;
        let h = shared::linear(x, &f.w1)?; // (…, d_ff), before the bias
        match &f.biases {
            Some((b1, b2)) => {
                let a = bias_gelu_fused(&h, &b1.to_dtype(h.dtype())?)?;
                shared::linear_with_bias(&a, &f.w2, b2)
            }
            None => {
                let zeros = Tensor::zeros(f.w1.dim(0)?, h.dtype(), h.device())?;
                shared::linear(&bias_gelu_fused(&h, &zeros)?, &f.w2)
            }
        }
    }
}

/// Rung 1 of the ladder: the rung below (`cfg`) with RMSNorm, a SwiGLU feed-forward of
/// [`swiglu_d_ff`] (same parameter count as the `4·d` MLP) and no biases.
pub fn modern(cfg: LmConfig) -> LmConfig {
    LmConfig {
        norm: NormKind::RmsNorm,
        ffn: FfnKind::SwiGlu,
        d_ff: swiglu_d_ff(cfg.d_model),
        bias: false,
        ..cfg
    }
}

/// The fastest kernels this rung builds on `device`, the CPU or CUDA: the fused RMSNorm, SwiGLU
/// gate and causal softmax, with naive attention (FlashAttention arrives in 8-09).
pub fn fastest_kernels(device: &Device) -> Kernels {
    Kernels::for_device(device).with_attention(AttentionImpl::Naive)
}

/// Rung 1's parts: 8-04's, plus RMSNorm, SwiGLU, the fused causal softmax, and the fused
/// LayerNorm and bias + GELU (for the rung below and 8-05's encoder–decoder when they run here).
#[derive(Debug, Clone, Copy)]
pub struct ModernParts {
    pub below: Gpt2Parts,
}

/// This topic's parts with the run's kernels.
pub fn parts(kernels: Kernels) -> ModernParts {
    ModernParts {
        below: t0804_transformer_block::parts(kernels),
    }
}

impl Parts for ModernParts {
    fn below(&self) -> Option<&dyn Parts> {
        Some(&self.below)
    }

    fn norm(&self, vb: VarBuilder, cfg: &LmConfig) -> Result<Box<dyn Layer>> {
        match cfg.norm {
            NormKind::RmsNorm => Ok(Box::new(
                RmsNorm::new(vb, cfg.d_model, cfg.norm_eps)?.with_impl(self.kernels().norm),
            )),
            NormKind::LayerNorm if self.kernels().norm == OpImpl::Fused => {
                Ok(Box::new(FusedLayerNormLayer {
                    norm: LayerNorm::new(vb, cfg.d_model, cfg.norm_eps)?,
                }))
            }
            NormKind::LayerNorm => self.below.norm(vb, cfg),
        }
    }

    fn ffn(&self, vb: VarBuilder, cfg: &LmConfig) -> Result<Box<dyn Layer>> {
        match cfg.ffn {
            FfnKind::SwiGlu => Ok(Box::new(
                SwiGlu::new(vb, cfg.d_model, cfg.d_ff)?.with_impl(self.kernels().swiglu),
            )),
            FfnKind::Gelu if self.kernels().gelu == OpImpl::Fused => {
                Ok(Box::new(FusedGeluMlp::new(FeedForward::new(
                    vb,
                    cfg.d_model,
                    cfg.d_ff,
                    Activation::Gelu,
                    cfg.bias,
                )?)?))
            }
            _ => self.below.ffn(vb, cfg),
        }
    }

    fn attention_kernel(&self, cfg: &LmConfig) -> Result<Arc<dyn AttentionKernel>> {
        let k = self.kernels();
        match (k.attention, k.softmax) {
            (AttentionImpl::Naive, OpImpl::Fused) => Ok(Arc::new(FusedSoftmaxAttention)),
            _ => self.below.attention_kernel(cfg),
        }
    }
}

/// Float64 reference of RMSNorm for one row.
pub fn reference_rms_norm(x: &[f64], g: &[f64], eps: f64) -> Vec<f64> {
    let rms = (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
    x.iter().zip(g).map(|(v, g)| v / rms * g).collect()
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
    fn later_ingredients_name_their_topic() {
        use t0804_transformer_block::{LmShape, PositionKind};
        let shape = LmShape {
            vocab_size: 50,
            max_seq_len: 8,
            d_model: 32,
            n_layers: 1,
            n_heads: 4,
        };
        let rope = LmConfig {
            positions: PositionKind::Rope,
            ..modern(LmConfig::gpt2(shape))
        };
        let e = t0804_transformer_block::init_lm(
            &rope,
            &parts(Kernels::composed()),
            DType::F32,
            &Device::Cpu,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("RoPE arrives in 8-08"), "{e}");
        let e = t0804_transformer_block::init_lm(
            &modern(LmConfig::gpt2(shape)),
            &parts(Kernels::fused()),
            DType::F32,
            &Device::Cpu,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("FlashAttention arrives in 8-09"), "{e}");
    }
}

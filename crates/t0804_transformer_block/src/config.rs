//! The ladder's one model description: [`LmConfig`], the `config.json` of every decoder-only
//! checkpoint of the module.
//!
//! It says what the model **is** — sizes and one choice per ingredient — and never how its ops
//! run (that is the run's [`shared::Kernels`]). Each rung of the ladder changes one ingredient of
//! the rung below:
//!
//! | rung | topic | ingredient | config |
//! |---|---|---|---|
//! | 0 | 8-04 | GPT-2 style: LayerNorm, GELU MLP, learned positions, MHA, biases | [`LmConfig::gpt2`] |
//! | 1 | 8-06 | + RMSNorm + SwiGLU, no biases | `t0806_modern_blocks::modern` |
//! | 2 | 8-07 | + grouped-query attention | `t0807_grouped_query_attention::grouped` |
//! | 3 | 8-08 | + RoPE instead of learned positions = the LLaMA recipe | `t0808_rope::with_rope` |
//! | 4 | 8-09 | + FlashAttention (an execution choice: same config) | |
//! | 5 | 8-10 | + KV cache and paged decoding (inference only: same config) | |

use crate::blocks::{Activation, NormPlacement};
use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};

/// Which normalisation every block (and the final norm) uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormKind {
    /// Re-centre and re-scale, with gain and bias (8-04).
    LayerNorm,
    /// Re-scale by the root mean square, gain only (8-06).
    RmsNorm,
}

/// The feed-forward network of every block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FfnKind {
    /// `W₂·ReLU(W₁x)` (Vaswani et al., 2017).
    Relu,
    /// `W₂·GELU(W₁x)` (GPT-2).
    Gelu,
    /// `W₂(SiLU(W₁x) ⊙ W₃x)` (8-06; LLaMA).
    SwiGlu,
}

impl FfnKind {
    /// The activation of a two-matrix MLP (`None` for SwiGLU).
    pub fn activation(self) -> Option<Activation> {
        match self {
            FfnKind::Relu => Some(Activation::Relu),
            FfnKind::Gelu => Some(Activation::Gelu),
            FfnKind::SwiGlu => None,
        }
    }
}

/// Where positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PositionKind {
    /// No positions at all (attention is then permutation-equivariant, 8-03).
    None,
    /// Sinusoidal encodings added to the embeddings (Vaswani et al., 2017).
    Sinusoidal,
    /// A learned `(max_seq_len, d_model)` table added to the embeddings (GPT-2).
    Learned,
    /// Rotary embeddings applied to q and k inside attention (8-08; LLaMA), base `rope_theta`.
    Rope,
}

/// The sizes every rung shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LmShape {
    pub vocab_size: usize,
    pub max_seq_len: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
}

/// A decoder-only language model of the ladder.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LmConfig {
    pub vocab_size: usize,
    pub max_seq_len: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// K/V heads: `n_heads` (MHA) up to rung 1; fewer from rung 2 (8-07).
    pub n_kv_heads: usize,
    pub d_ff: usize,
    pub norm: NormKind,
    pub ffn: FfnKind,
    pub positions: PositionKind,
    pub placement: NormPlacement,
    /// Biases in the attention projections and the MLP (GPT-2 has them; LLaMA none).
    pub bias: bool,
    pub norm_eps: f64,
    /// RoPE's frequency base θ (used when `positions` is [`PositionKind::Rope`]).
    pub rope_theta: f64,
}

impl LmConfig {
    /// Rung 0, the GPT-2-style LM: pre-norm LayerNorm, GELU MLP of `4·d_model`, learned
    /// positions, multi-head attention, biases; ε = 1e-5.
    pub fn gpt2(shape: LmShape) -> Self {
        let LmShape {
            vocab_size,
            max_seq_len,
            d_model,
            n_layers,
            n_heads,
        } = shape;
        Self {
            vocab_size,
            max_seq_len,
            d_model,
            n_layers,
            n_heads,
            n_kv_heads: n_heads,
            d_ff: 4 * d_model,
            norm: NormKind::LayerNorm,
            ffn: FfnKind::Gelu,
            positions: PositionKind::Learned,
            placement: NormPlacement::Pre,
            bias: true,
            norm_eps: 1e-5,
            rope_theta: 10_000.0,
        }
    }

    pub fn shape(&self) -> LmShape {
        LmShape {
            vocab_size: self.vocab_size,
            max_seq_len: self.max_seq_len,
            d_model: self.d_model,
            n_layers: self.n_layers,
            n_heads: self.n_heads,
        }
    }

    /// The attention layer's config.
    pub fn attention(&self) -> t0802_multi_head_attention::MhaConfig {
        t0802_multi_head_attention::MhaConfig::new(self.d_model, self.n_heads)
            .with_kv_heads(self.n_kv_heads)
            .with_bias(self.bias)
    }

    /// `d_model / n_heads`.
    pub fn d_head(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Checks the sizes, naming what is wrong.
    pub fn validate(&self) -> Result<()> {
        self.attention().d_head()?;
        if self.vocab_size == 0 || self.max_seq_len == 0 || self.n_layers == 0 || self.d_ff == 0 {
            bail!(
                "LmConfig: vocab_size, max_seq_len, n_layers and d_ff must be positive: {self:?}"
            );
        }
        if self.positions == PositionKind::Rope && !self.d_head().is_multiple_of(2) {
            bail!(
                "RoPE rotates pairs of dimensions: d_head ({}) must be even",
                self.d_head()
            );
        }
        if !(self.norm_eps > 0.0 && self.rope_theta > 1.0) {
            bail!(
                "LmConfig: norm_eps ({}) must be > 0 and rope_theta ({}) > 1",
                self.norm_eps,
                self.rope_theta
            );
        }
        Ok(())
    }

    /// Parameters of the model: embeddings, blocks, final norm, head.
    pub fn n_params(&self) -> usize {
        let d = self.d_model;
        let norm = match self.norm {
            NormKind::LayerNorm => 2 * d,
            NormKind::RmsNorm => d,
        };
        let ffn = match self.ffn {
            FfnKind::SwiGlu => 3 * d * self.d_ff,
            _ => 2 * d * self.d_ff + if self.bias { self.d_ff + d } else { 0 },
        };
        let block = self.attention().n_params() + ffn + 2 * norm;
        let positions = if self.positions == PositionKind::Learned {
            self.max_seq_len * d
        } else {
            0
        };
        let final_norm = if self.placement == NormPlacement::Pre {
            norm
        } else {
            0
        };
        2 * self.vocab_size * d + positions + self.n_layers * block + final_norm
    }

    /// KV-cache bytes per token: `2 (K and V) × n_layers × n_kv_heads × d_head × bytes/element`.
    pub fn kv_bytes_per_token(&self, bytes_per_element: usize) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.d_head() * bytes_per_element
    }

    /// Reads a checkpoint's `config.json`: this format, or the one with a `recipe` field
    /// (`"Llama"`/`"Gpt2"`) and `fused_*` keys (the fused keys are execution choices and ignored).
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)?;
        if value.get("recipe").is_some() {
            let r: RecipeConfig = serde_json::from_value(value)?;
            if let Some(s) = r
                .rope_scaling
                .as_ref()
                .filter(|s| s.as_str() != Some("None"))
            {
                anyhow::bail!("this config asks for RoPE scaling {s}, which the ladder's LmConfig does not describe (scaling is an evaluation-time choice of t0808's RopeTables)");
            }
            return Ok(r.into_lm_config());
        }
        Ok(serde_json::from_value(value)?)
    }
}

/// The recipe-style `config.json` (`recipe: Llama | Gpt2`), read for compatibility.
#[derive(Deserialize)]
struct RecipeConfig {
    vocab_size: usize,
    max_seq_len: usize,
    d_model: usize,
    n_layers: usize,
    n_heads: usize,
    n_kv_heads: usize,
    d_ff: usize,
    rope_theta: f64,
    norm_eps: f64,
    recipe: Recipe,
    /// RoPE scaling of the old format; only `"None"` (the only value ever trained) is read.
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
}

#[derive(Deserialize)]
enum Recipe {
    Llama,
    Gpt2,
}

impl RecipeConfig {
    fn into_lm_config(self) -> LmConfig {
        let base = LmConfig {
            n_kv_heads: self.n_kv_heads,
            d_ff: self.d_ff,
            norm_eps: self.norm_eps,
            rope_theta: self.rope_theta,
            ..LmConfig::gpt2(LmShape {
                vocab_size: self.vocab_size,
                max_seq_len: self.max_seq_len,
                d_model: self.d_model,
                n_layers: self.n_layers,
                n_heads: self.n_heads,
            })
        };
        match self.recipe {
            Recipe::Gpt2 => base,
            Recipe::Llama => LmConfig {
                norm: NormKind::RmsNorm,
                ffn: FfnKind::SwiGlu,
                positions: PositionKind::Rope,
                bias: false,
                ..base
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_configs_with_fused_keys_still_load() {
        let llama = r#"{"vocab_size":100,"max_seq_len":16,"d_model":64,"n_layers":2,"n_heads":4,
            "n_kv_heads":2,"d_ff":192,"rope_theta":10000.0,"norm_eps":1e-5,"recipe":"Llama",
            "rope_scaling":"None","fused_norm":true,"fused_rope":false,"fused_swiglu":true,"fused_softmax":false}"#;
        let c = LmConfig::from_json(llama).unwrap();
        assert_eq!(
            (c.norm, c.ffn, c.positions),
            (NormKind::RmsNorm, FfnKind::SwiGlu, PositionKind::Rope)
        );
        assert_eq!((c.n_kv_heads, c.d_ff, c.bias), (2, 192, false));
        let gpt2 = llama
            .replace("\"Llama\"", "\"Gpt2\"")
            .replace("\"n_kv_heads\":2", "\"n_kv_heads\":4");
        let c = LmConfig::from_json(&gpt2).unwrap();
        assert_eq!(
            (c.norm, c.positions, c.bias),
            (NormKind::LayerNorm, PositionKind::Learned, true)
        );
        let round = LmConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(round, c);
    }

    #[test]
    fn bad_sizes_are_named() {
        let mut c = LmConfig::gpt2(LmShape {
            vocab_size: 10,
            max_seq_len: 8,
            d_model: 64,
            n_layers: 1,
            n_heads: 4,
        });
        c.n_kv_heads = 3;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("n_kv_heads (3) must divide n_heads (4)"));
        c.n_kv_heads = 4;
        c.d_ff = 0;
        assert!(c.validate().unwrap_err().to_string().contains("d_ff"));
    }
}

//! # 8-02 · Multi-head attention
//!
//! One attention head computes one weighting of the sequence. Multi-head attention runs `h`
//! heads in parallel, each on its own `d_head = d_model / h`-wide slice of learned projections,
//! so different heads can track different relations (the previous token, an equal token, the
//! subject of a verb…), then concatenates their outputs and mixes them with `W_o`:
//!
//! ```text
//! headᵢ = Attention(X·W_qᵢᵀ, X·W_kᵢᵀ, X·W_vᵢᵀ)          W_qᵢ, W_kᵢ, W_vᵢ: (d_head, d_model)
//! MHA(X) = Concat(head₁, …, head_h) · W_oᵀ               W_o: (d_model, d_model)
//! ```
//!
//! The per-head matrices are stacked row-wise into one `(h·d_head, d_model)` matrix per
//! projection (rows `i·d_head .. (i+1)·d_head` belong to head `i`, CS336's `q_proj` layout), so
//! all heads are computed by one matmul and a reshape:
//! `(batch, seq, d_model) → (batch, seq, h, d_head) → (batch, h, seq, d_head)`.
//!
//! Parameter count: `4·d_model²` (+ `4·d_model` with biases) — *the same* as one head of width
//! `d_model`: heads split the width, they do not add parameters.

use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;
use shared::params::{expect_last_dim, weight, zeros};
use t0801_self_attention::scaled_dot_product_attention;

pub use t0801_self_attention::{and_masks, causal_mask, key_padding_mask};

/// Shape of a multi-head attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MhaConfig {
    pub d_model: usize,
    pub n_heads: usize,
    /// Add a bias to each projection (GPT-2 style); the LLaMA family has none.
    pub bias: bool,
}

impl MhaConfig {
    pub fn new(d_model: usize, n_heads: usize) -> Self {
        Self {
            d_model,
            n_heads,
            bias: false,
        }
    }

    /// `d_model / n_heads`, or an error naming both when it does not divide.
    #[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` needs Rust 1.87; the workspace's MSRV is 1.85
    pub fn d_head(&self) -> Result<usize> {
        if self.n_heads == 0 || self.d_model % self.n_heads != 0 {
            bail!(
                "n_heads ({}) must divide d_model ({})",
                self.n_heads,
                self.d_model
            );
        }
        Ok(self.d_model / self.n_heads)
    }

    /// Parameters of the layer: `4·d_model²` (+ `4·d_model` biases).
    pub fn n_params(&self) -> usize {
        4 * self.d_model * self.d_model + if self.bias { 4 * self.d_model } else { 0 }
    }
}

/// Output of a multi-head attention call.
#[derive(Debug, Clone)]
pub struct MhaOutput {
    /// `(batch, n_q, d_model)`
    pub output: Tensor,
    /// Per-head attention weights `(batch, heads, n_q, n_k)`, for inspection.
    pub weights: Tensor,
}

/// Multi-head attention with raw projection matrices.
///
/// Parameter names: `q_proj`, `k_proj`, `v_proj`, `output_proj` (each `(d_model, d_model)`), and
/// with `bias` also `q_proj_bias`, …, `output_proj_bias`.
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    pub cfg: MhaConfig,
    pub w_q: Tensor,
    pub w_k: Tensor,
    pub w_v: Tensor,
    pub w_o: Tensor,
    /// `[b_q, b_k, b_v, b_o]` when `cfg.bias`.
    pub biases: Option<[Tensor; 4]>,
}

impl MultiHeadAttention {
    pub fn new(vb: VarBuilder, cfg: MhaConfig) -> Result<Self> {
        cfg.d_head()?;
        let d = cfg.d_model;
        let w = |name| weight(&vb, d, d, name);
        let biases = if cfg.bias {
            let b = |name| zeros(&vb, d, name);
            Some([
                b("q_proj_bias")?,
                b("k_proj_bias")?,
                b("v_proj_bias")?,
                b("output_proj_bias")?,
            ])
        } else {
            None
        };
        Ok(Self {
            cfg,
            w_q: w("q_proj")?,
            w_k: w("k_proj")?,
            w_v: w("v_proj")?,
            w_o: w("output_proj")?,
            biases,
        })
    }

    /// From explicit `(d_model, d_model)` weights (no biases).
    pub fn from_weights(
        n_heads: usize,
        w_q: Tensor,
        w_k: Tensor,
        w_v: Tensor,
        w_o: Tensor,
    ) -> Result<Self> {
        let (d, d_in) = w_q.dims2()?;
        let cfg = MhaConfig::new(d, n_heads);
        cfg.d_head()?;
        for (name, w) in [("W_q", &w_q), ("W_k", &w_k), ("W_v", &w_v), ("W_o", &w_o)] {
            if w.dims2()? != (d, d_in) || d != d_in {
                bail!("{name} has shape {:?}, expected ({d}, {d})", w.dims());
            }
        }
        Ok(Self {
            cfg,
            w_q,
            w_k,
            w_v,
            w_o,
            biases: None,
        })
    }

    fn project(&self, x: &Tensor, w: &Tensor, bias: usize) -> Result<Tensor> {
        match &self.biases {
            Some(b) => shared::linear_with_bias(x, w, &b[bias]),
            None => shared::linear(x, w),
        }
    }

    /// `(batch, seq, d_model)` → `(batch, heads, seq, d_head)`
    pub fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        x.reshape((b, n, self.cfg.n_heads, self.cfg.d_head()?))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `(batch, heads, seq, d_head)` → `(batch, seq, d_model)`
    pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
        let (b, h, n, d) = x.dims4()?;
        x.transpose(1, 2)?.contiguous()?.reshape((b, n, h * d))
    }

    /// Self-attention: queries, keys and values all from `x (batch, seq, d_model)`.
    /// `mask`: `u8`, broadcastable to `(batch, heads, seq, seq)`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<MhaOutput> {
        self.forward_cross(x, x, mask, None)
    }

    /// General form: queries from `x_q (batch, n_q, d_model)`, keys and values from
    /// `x_kv (batch, n_k, d_model)` (cross-attention when they differ). `head_gate (heads,)`, if
    /// given, scales each head's output before `W_o` (0 = head pruned).
    pub fn forward_cross(
        &self,
        x_q: &Tensor,
        x_kv: &Tensor,
        mask: Option<&Tensor>,
        head_gate: Option<&Tensor>,
    ) -> Result<MhaOutput> {
        expect_last_dim(x_q, self.cfg.d_model, "attention query input")?;
        expect_last_dim(x_kv, self.cfg.d_model, "attention key/value input")?;
        if let Some(g) = head_gate {
            shared::params::expect_shape(g, &[self.cfg.n_heads], "head_gate")?;
        }
        let q = self.split_heads(&self.project(x_q, &self.w_q, 0)?)?; // (batch, heads, n_q, d_head)
        let k = self.split_heads(&self.project(x_kv, &self.w_k, 1)?)?; // (batch, heads, n_k, d_head)
        let v = self.split_heads(&self.project(x_kv, &self.w_v, 2)?)?; // (batch, heads, n_k, d_head)
        let att = scaled_dot_product_attention(&q, &k, &v, mask)?;
        let heads = match head_gate {
            Some(g) => att.output.broadcast_mul(
                &g.reshape((1, self.cfg.n_heads, 1, 1))?
                    .to_dtype(att.output.dtype())?,
            )?,
            None => att.output,
        };
        let concat = Self::merge_heads(&heads)?; // (batch, n_q, d_model)
        Ok(MhaOutput {
            output: self.project(&concat, &self.w_o, 3)?,
            weights: att.weights,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn n_heads_must_divide_d_model() {
        let err = MhaConfig::new(512, 6).d_head().unwrap_err().to_string();
        assert!(
            err.contains("n_heads (6) must divide d_model (512)"),
            "{err}"
        );
        assert_eq!(MhaConfig::new(512, 8).d_head().unwrap(), 64);
    }
}

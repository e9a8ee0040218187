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
//!
//! ## One component for the whole module
//! [`MultiHeadAttention`] is *the* attention of every later topic. It has four plug points, so
//! later topics extend it instead of writing it again:
//!
//! | plug | default | extended by |
//! |---|---|---|
//! | `cfg.n_kv_heads` | `= n_heads` (MHA) | 8-07: grouped-query / multi-query attention |
//! | [`PositionPlug`] | none | 8-03: relative score bias; 8-08: RoPE |
//! | [`AttentionKernel`] | [`NaiveAttention`] | 8-06: fused causal softmax; 8-09: FlashAttention |
//! | [`KvStore`] (per call) | none | 8-10: KV cache, paged cache |
//!
//! It serves self-attention (encoder, decoder, decoder-only LM), cross-attention (8-05) and cached
//! decoding (8-10) with the same projections, head split, merge and `W_o`.

pub mod kernel;
pub mod plugs;

pub use kernel::{
    fold_query_groups, gemm_operand, group_size, grouped_causal_mask, repeat_kv, AttentionKernel,
    AttnMask, KeyPadding, LoweredMask, NaiveAttention,
};
pub use plugs::{CacheSlot, KvStore, PositionPlug};
pub use t0801_self_attention::{and_masks, causal_mask, key_padding_mask};

use candle_core::{bail, DType, Result, Tensor};
use candle_nn::VarBuilder;
use shared::kernels::HeadCopy;
use shared::params::{expect_last_dim, expect_shape, weight, zeros};
use std::sync::Arc;

/// Shape of a multi-head attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MhaConfig {
    pub d_model: usize,
    pub n_heads: usize,
    /// K/V heads: `n_heads` for multi-head attention, fewer for grouped-query attention (8-07),
    /// 1 for multi-query attention.
    pub n_kv_heads: usize,
    /// Add a bias to each projection (GPT-2 style); the LLaMA family has none.
    pub bias: bool,
}

impl MhaConfig {
    /// Multi-head attention without biases (`n_kv_heads = n_heads`).
    pub fn new(d_model: usize, n_heads: usize) -> Self {
        Self {
            d_model,
            n_heads,
            n_kv_heads: n_heads,
            bias: false,
        }
    }

    /// The same layer with `n_kv_heads` K/V heads.
    pub fn with_kv_heads(self, n_kv_heads: usize) -> Self {
        Self { n_kv_heads, ..self }
    }

    /// The same layer with (or without) projection biases.
    pub fn with_bias(self, bias: bool) -> Self {
        Self { bias, ..self }
    }

    /// `d_model / n_heads`, or an error naming the values when the heads do not divide the width
    /// or the K/V heads do not divide the query heads.
    pub fn d_head(&self) -> Result<usize> {
        if self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            bail!(
                "n_heads ({}) must divide d_model ({})",
                self.n_heads,
                self.d_model
            );
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            bail!("n_kv_heads ({}) must divide n_heads ({}): each K/V head serves a whole group of query heads", self.n_kv_heads, self.n_heads);
        }
        Ok(self.d_model / self.n_heads)
    }

    /// Width of the K and V projections, `n_kv_heads · d_head`.
    pub fn kv_width(&self) -> usize {
        self.n_kv_heads * (self.d_model / self.n_heads.max(1))
    }

    /// Parameters: `2·d_model² + 2·d_model·n_kv_heads·d_head` (`4·d_model²` for MHA), plus
    /// `2·d_model + 2·n_kv_heads·d_head` biases.
    pub fn n_params(&self) -> usize {
        let (d, kv) = (self.d_model, self.kv_width());
        2 * d * d + 2 * d * kv + if self.bias { 2 * d + 2 * kv } else { 0 }
    }
}

/// Output of a multi-head attention call that keeps the weights.
#[derive(Debug, Clone)]
pub struct MhaOutput {
    /// `(batch, n_q, d_model)`
    pub output: Tensor,
    /// Per-head attention weights `(batch, heads, n_q, n_k)`, for inspection.
    pub weights: Tensor,
}

/// Multi-head attention with raw projection matrices: the attention component of the module.
///
/// Parameter names (the checkpoint format): `q_proj (n_heads·d_head, d_model)`,
/// `k_proj`, `v_proj (n_kv_heads·d_head, d_model)`, `output_proj (d_model, n_heads·d_head)`, and
/// with `bias` also `q_proj_bias`, …, `output_proj_bias`.
#[derive(Clone)]
pub struct MultiHeadAttention {
    pub cfg: MhaConfig,
    pub w_q: Tensor,
    pub w_k: Tensor,
    pub w_v: Tensor,
    pub w_o: Tensor,
    /// `[b_q, b_k, b_v, b_o]` when `cfg.bias`.
    pub biases: Option<[Tensor; 4]>,
    /// Positions inside attention (RoPE, relative bias); `None`: the scores see no positions.
    pub positions: Option<Arc<dyn PositionPlug>>,
    /// What computes `softmax(Q·Kᵀ/√d)·V` per head.
    pub kernel: Arc<dyn AttentionKernel>,
    /// How heads are split and merged (an execution choice; same values).
    pub heads: HeadCopy,
    /// `[W_q; W_k; W_v]` stacked, `(n_heads·d_head + 2·n_kv_heads·d_head, d_model)`, with the
    /// biases likewise, when packed for inference ([`Self::with_packed_qkv`]): one GEMM instead
    /// of three.
    pub packed_qkv: Option<(Tensor, Option<Tensor>)>,
}

impl std::fmt::Debug for MultiHeadAttention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultiHeadAttention")
            .field("cfg", &self.cfg)
            .field("positions", &self.positions.is_some())
            .field("kernel", &self.kernel.name())
            .finish()
    }
}

impl MultiHeadAttention {
    pub fn new(vb: VarBuilder, cfg: MhaConfig) -> Result<Self> {
        let d_head = cfg.d_head()?;
        let (d, q, kv) = (cfg.d_model, cfg.n_heads * d_head, cfg.kv_width());
        let biases = if cfg.bias {
            Some([
                zeros(&vb, q, "q_proj_bias")?,
                zeros(&vb, kv, "k_proj_bias")?,
                zeros(&vb, kv, "v_proj_bias")?,
                zeros(&vb, d, "output_proj_bias")?,
            ])
        } else {
            None
        };
        let w_q = weight(&vb, q, d, "q_proj")?;
        let w_k = weight(&vb, kv, d, "k_proj")?;
        let w_v = weight(&vb, kv, d, "v_proj")?;
        let w_o = weight(&vb, d, q, "output_proj")?;
        Ok(Self::assemble(cfg, [w_q, w_k, w_v, w_o], biases))
    }

    /// From explicit weights (no biases): `w_q (d_model, d_model)`, `w_k, w_v (n_kv_heads·d_head,
    /// d_model)`, `w_o (d_model, d_model)`; `n_kv_heads` is read from `w_k`'s rows.
    pub fn from_weights(
        n_heads: usize,
        w_q: Tensor,
        w_k: Tensor,
        w_v: Tensor,
        w_o: Tensor,
    ) -> Result<Self> {
        let (d, d_in) = w_q.dims2()?;
        if d != d_in {
            bail!("W_q has shape {:?}, expected ({d_in}, {d_in})", w_q.dims());
        }
        let d_head = MhaConfig::new(d, n_heads).d_head()?;
        let kv_rows = w_k.dims2()?.0;
        if !kv_rows.is_multiple_of(d_head) {
            bail!("W_k has {kv_rows} rows, not a multiple of d_head {d_head}");
        }
        let cfg = MhaConfig::new(d, n_heads).with_kv_heads(kv_rows / d_head);
        cfg.d_head()?;
        for (name, w, want) in [
            ("W_k", &w_k, (cfg.kv_width(), d)),
            ("W_v", &w_v, (cfg.kv_width(), d)),
            ("W_o", &w_o, (d, d)),
        ] {
            if w.dims2()? != want {
                bail!("{name} has shape {:?}, expected {want:?} for {n_heads} heads, {} K/V heads, d_head {d_head}", w.dims(), cfg.n_kv_heads);
            }
        }
        Ok(Self::assemble(cfg, [w_q, w_k, w_v, w_o], None))
    }

    fn assemble(
        cfg: MhaConfig,
        [w_q, w_k, w_v, w_o]: [Tensor; 4],
        biases: Option<[Tensor; 4]>,
    ) -> Self {
        Self {
            cfg,
            w_q,
            w_k,
            w_v,
            w_o,
            biases,
            positions: None,
            kernel: Arc::new(NaiveAttention),
            heads: HeadCopy::RowSwap,
            packed_qkv: None,
        }
    }

    /// The same layer projecting queries, keys and values with one GEMM through `[W_q; W_k;
    /// W_v]` stacked (what inference engines do), stored in `dtype` (the activations' dtype: no
    /// cast per call). The stack is a detached copy of today's weights, for decoding: training
    /// goes on updating the three weights, not the copy, so a model that trains is built without
    /// it.
    pub fn with_packed_qkv(mut self, dtype: DType) -> Result<Self> {
        let pack = |parts: [&Tensor; 3]| -> Result<Tensor> {
            Ok(Tensor::cat(&parts, 0)?.to_dtype(dtype)?.detach())
        };
        let w = pack([&self.w_q, &self.w_k, &self.w_v])?;
        let b = match &self.biases {
            Some([b_q, b_k, b_v, _]) => Some(pack([b_q, b_k, b_v])?),
            None => None,
        };
        self.packed_qkv = Some((w, b));
        Ok(self)
    }

    /// The same layer with another attention kernel (8-06's fused softmax, 8-09's FlashAttention).
    pub fn with_kernel(mut self, kernel: Arc<dyn AttentionKernel>) -> Self {
        self.kernel = kernel;
        self
    }

    /// The same layer with positions inside attention (8-03's relative bias, 8-08's RoPE).
    pub fn with_positions(mut self, positions: Option<Arc<dyn PositionPlug>>) -> Self {
        self.positions = positions;
        self
    }

    /// The same layer with heads split and merged by `heads`.
    pub fn with_head_copy(mut self, heads: HeadCopy) -> Self {
        self.heads = heads;
        self
    }

    pub fn d_head(&self) -> usize {
        self.cfg.d_model / self.cfg.n_heads
    }

    fn project(&self, x: &Tensor, w: &Tensor, bias: usize) -> Result<Tensor> {
        match &self.biases {
            Some(b) => shared::linear_with_bias(x, w, &b[bias]),
            None => shared::linear(x, w),
        }
    }

    /// `(batch, seq, heads·d_head)` → `(batch, heads, seq, d_head)`
    pub fn split_heads(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        shared::split_heads_with(x, heads, self.heads)
    }

    /// `(batch, heads, seq, d_head)` → `(batch, seq, heads·d_head)`
    pub fn merge_heads(&self, x: &Tensor) -> Result<Tensor> {
        shared::merge_heads_with(x, self.heads)
    }

    /// Queries of `x (batch, n, d_model)`: `(batch, n_heads, n, d_head)`.
    pub fn project_q(&self, x: &Tensor) -> Result<Tensor> {
        expect_last_dim(x, self.cfg.d_model, "attention query input")?;
        self.split_heads(&self.project(x, &self.w_q, 0)?, self.cfg.n_heads)
    }

    /// Keys and values of `x (batch, n, d_model)`: each `(batch, n_kv_heads, n, d_head)`.
    pub fn project_kv(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        expect_last_dim(x, self.cfg.d_model, "attention key/value input")?;
        let k = self.split_heads(&self.project(x, &self.w_k, 1)?, self.cfg.n_kv_heads)?;
        let v = self.split_heads(&self.project(x, &self.w_v, 2)?, self.cfg.n_kv_heads)?;
        Ok((k, v))
    }

    /// Queries `(batch, n_heads, n, d_head)`, keys and values `(batch, n_kv_heads, n, d_head)` of
    /// `x (batch, n, d_model)`: one GEMM through the packed weight when the layer has one
    /// ([`Self::with_packed_qkv`]), else [`Self::project_q`] and [`Self::project_kv`].
    pub fn project_qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let Some((w, b)) = &self.packed_qkv else {
            let (k, v) = self.project_kv(x)?;
            return Ok((self.project_q(x)?, k, v));
        };
        expect_last_dim(x, self.cfg.d_model, "attention input")?;
        let y = match b {
            Some(b) => shared::linear_with_bias(x, w, b)?,
            None => shared::linear(x, w)?,
        }; // (batch, n, q_width + 2·kv_width)
        let (q_width, kv_width) = (self.cfg.n_heads * self.d_head(), self.cfg.kv_width());
        let q = self.split_heads(&y.narrow(2, 0, q_width)?, self.cfg.n_heads)?;
        let k = self.split_heads(&y.narrow(2, q_width, kv_width)?, self.cfg.n_kv_heads)?;
        let v = self.split_heads(
            &y.narrow(2, q_width + kv_width, kv_width)?,
            self.cfg.n_kv_heads,
        )?;
        Ok((q, k, v))
    }

    /// Heads `(batch, n_heads, n, d_head)` → `(batch, n, d_model)` through `W_o`.
    pub fn output(&self, heads: &Tensor) -> Result<Tensor> {
        self.project(&self.merge_heads(heads)?, &self.w_o, 3)
    }

    /// Self-attention of `x (batch, n, d_model)` whose first token sits at `start_pos`, through
    /// the kernel: project, rotate (RoPE), optionally store `k, v` and read all cached ones,
    /// attend, merge, `W_o`. With a cache the new tokens attend to every stored token too.
    pub fn self_attention(
        &self,
        x: &Tensor,
        mask: AttnMask<'_>,
        start_pos: usize,
        cache: Option<CacheSlot<'_>>,
    ) -> Result<Tensor> {
        // q (batch, n_heads, n, d_head); k, v (batch, n_kv_heads, n, d_head)
        let (q, k, v) = self.project_qkv(x)?;
        let device_pos = cache
            .as_ref()
            .and_then(|slot| slot.store.device_position().cloned());
        let (q, k) = match (&self.positions, &device_pos) {
            (Some(p), Some(pos)) => p.rotate_at(&q, &k, pos)?,
            (Some(p), None) => p.rotate(&q, &k, start_pos)?,
            (None, _) => (q, k),
        };
        let (k, v) = match cache {
            Some(slot) => slot.store.append(slot.layer, &k, &v)?, // (batch, n_kv_heads, past + n, d_head)
            None => (k, v),
        };
        let bias = self.score_bias(q.dim(2)?, k.dim(2)?)?;
        let heads = match (&device_pos, bias) {
            (None, bias) => self.kernel.attend(&q, &k, &v, mask, bias.as_ref())?,
            // The store returned its whole buffer, written up to the new token's slot; with one
            // new token per step there is nothing later for a causal mask to hide.
            (Some(pos), None) => match mask {
                AttnMask::None | AttnMask::Causal => {
                    self.kernel
                        .attend(&q, &k, &v, AttnMask::KeysUpTo(pos), None)?
                }
                _ => bail!("a store with a device position masks its own keys: the call's mask must be none or causal"),
            },
            (Some(_), Some(_)) => bail!(
                "a score-bias position scheme (relative positions) cannot decode from a device position"
            ),
        };
        self.output(&heads)
    }

    /// Cross-attention: queries from `x_q (batch, n_q, d_model)` over precomputed keys and values
    /// `(batch, n_kv_heads, n_k, d_head)` ([`Self::project_kv`] of the memory, computed once per
    /// source when decoding).
    pub fn cross_attention(
        &self,
        x_q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: AttnMask<'_>,
    ) -> Result<Tensor> {
        let q = self.project_q(x_q)?;
        self.output(&self.kernel.attend(&q, k, v, mask, None)?)
    }

    fn score_bias(&self, n_q: usize, n_k: usize) -> Result<Option<Tensor>> {
        match &self.positions {
            Some(p) => p.score_bias(n_q, n_k),
            None => Ok(None),
        }
    }

    /// Self-attention that also returns the weights (the naive path, for inspection).
    /// `mask`: `u8`, broadcastable to `(batch, heads, seq, seq)`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<MhaOutput> {
        self.forward_cross(x, x, mask, None)
    }

    /// The inspection path in general form: queries from `x_q (batch, n_q, d_model)`, keys and
    /// values from `x_kv (batch, n_k, d_model)` (cross-attention when they differ), positions
    /// applied as in [`Self::self_attention`] (at position 0), the weights kept. `head_gate
    /// (heads,)`, if given, scales each head's output before `W_o` (0 = head pruned).
    pub fn forward_cross(
        &self,
        x_q: &Tensor,
        x_kv: &Tensor,
        mask: Option<&Tensor>,
        head_gate: Option<&Tensor>,
    ) -> Result<MhaOutput> {
        if let Some(g) = head_gate {
            expect_shape(g, &[self.cfg.n_heads], "head_gate")?;
        }
        let q = self.project_q(x_q)?; // (batch, heads, n_q, d_head)
        let (k, v) = self.project_kv(x_kv)?; // (batch, kv_heads, n_k, d_head)
        let (q, k) = match &self.positions {
            Some(p) => p.rotate(&q, &k, 0)?,
            None => (q, k),
        };
        let bias = self.score_bias(q.dim(2)?, k.dim(2)?)?;
        let mask = mask.map_or(AttnMask::None, AttnMask::Explicit);
        let att = NaiveAttention.attend_with_weights(&q, &k, &v, mask, bias.as_ref())?;
        let heads = match head_gate {
            Some(g) => att.output.broadcast_mul(
                &g.reshape((1, self.cfg.n_heads, 1, 1))?
                    .to_dtype(att.output.dtype())?,
            )?,
            None => att.output,
        };
        Ok(MhaOutput {
            output: self.output(&heads)?,
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

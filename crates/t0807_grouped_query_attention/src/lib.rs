//! # 8-07 · Grouped-query and multi-query attention
//!
//! At inference every generated token must read the keys and values of *all* previous tokens,
//! so a decoder keeps them in a **KV cache** (8-10) whose size per token is
//!
//! ```text
//! bytes/token = 2 (K and V) × n_layers × n_kv_heads × d_head × bytes/element
//! ```
//!
//! With multi-head attention (`n_kv_heads = n_heads`) that cache, not the weights, dominates
//! memory traffic during long-context decoding. **Multi-query attention** (Shazeer, 2019) keeps
//! all `n_heads` query heads but only **one** K/V head shared by all of them; **grouped-query
//! attention** (Ainslie et al., 2023) sits between: `n_kv_heads` K/V heads, each shared by a
//! group of `g = n_heads / n_kv_heads` consecutive query heads.
//!
//! ```text
//! Q = X·W_qᵀ  (batch, n_heads,    seq, d_head)      W_q: (n_heads·d_head,    d_model)
//! K = X·W_kᵀ  (batch, n_kv_heads, seq, d_head)      W_k: (n_kv_heads·d_head, d_model)
//! V = X·W_vᵀ  (batch, n_kv_heads, seq, d_head)      W_v: (n_kv_heads·d_head, d_model)
//! headₕ = softmax(Qₕ·K_{⌊h/g⌋}ᵀ/√d_head + causal)·V_{⌊h/g⌋}
//! out = Concat(head₀ … head_{n_heads−1})·W_oᵀ        W_o: (d_model, n_heads·d_head)
//! ```
//!
//! One module covers all three: MHA when `n_kv_heads = n_heads`, MQA when `n_kv_heads = 1`.
//!
//! ## Sharing K/V without copying them
//! The obvious implementation repeats each K/V head `g` times (`repeat_kv`) and runs ordinary
//! MHA — materialising `g` copies of the cache it was meant to save. Instead we fold the group
//! into the query-row axis: `q (batch, n_heads, n_q, d) → (batch, n_kv, g·n_q, d)` (a free
//! reshape, because the heads of a group are consecutive), so **one batched matmul per K/V
//! head** serves its whole group: `(g·n_q, d)·(d, n_k)`. The causal mask is the `(n_q, n_k)`
//! mask stacked `g` times. [`naive_grouped_attention`] does this; a different kernel
//! (FlashAttention, 8-09) plugs in through [`AttentionKernel`].
//!
//! ## Uptraining
//! A trained MHA checkpoint becomes GQA by **mean-pooling** the K and V projection heads of each
//! group ([`mean_pool_kv_heads`]) and fine-tuning briefly (Ainslie et al., 2023: ≈5% of the
//! pre-training compute recovers most of the quality).

use candle_core::{bail, Device, Result, Tensor};
use candle_nn::VarBuilder;
use shared::params::{expect_last_dim, weight};
use std::sync::Arc;
use t0801_self_attention::{causal_mask, scaled_dot_product_attention};
use t0804_transformer_block::lm::Mixer;
use t0808_rope::RopeTables;

/// An attention kernel: `q (batch, n_heads, n_q, d_head)`, `k, v (batch, n_kv_heads, n_k,
/// d_head)` (`n_kv_heads` divides `n_heads`, query head `h` reads K/V head `h / (n_heads /
/// n_kv_heads)`), `causal` (queries are the *last* `n_q` of the `n_k` positions) →
/// `(batch, n_heads, n_q, d_head)`.
pub type AttentionKernel = fn(&Tensor, &Tensor, &Tensor, bool) -> Result<Tensor>;

/// The sizes of a grouped-query attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GqaConfig {
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
}

impl GqaConfig {
    pub fn new(d_model: usize, n_heads: usize, n_kv_heads: usize) -> Self {
        Self {
            d_model,
            n_heads,
            n_kv_heads,
        }
    }

    /// Checks the divisibility rules and returns `d_head = d_model / n_heads`.
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

    /// Query heads per K/V head, `g = n_heads / n_kv_heads`.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Parameters: `2·d_model² + 2·d_model·n_kv_heads·d_head`.
    pub fn n_params(&self) -> usize {
        let d_head = self.d_model / self.n_heads.max(1);
        2 * self.d_model * self.d_model + 2 * self.d_model * self.n_kv_heads * d_head
    }
}

/// KV-cache bytes per token: `2 × n_layers × n_kv_heads × d_head × bytes_per_element`.
pub fn kv_cache_bytes_per_token(
    n_layers: usize,
    n_kv_heads: usize,
    d_head: usize,
    bytes_per_element: usize,
) -> usize {
    2 * n_layers * n_kv_heads * d_head * bytes_per_element
}

/// The default kernel: grouped attention through t0801's scaled dot-product attention, with each
/// group of query heads folded into the query rows so no K/V head is copied.
pub fn naive_grouped_attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    let (b, n_heads, n_q, d) = q.dims4()?;
    let (_, n_kv, n_k, _) = k.dims4()?;
    let (q, g) = fold_query_groups(q, n_kv)?;
    let mask = if causal {
        Some(grouped_causal_mask(g, n_q, n_k, q.device())?)
    } else {
        None
    };
    let att = scaled_dot_product_attention(&q, &k.contiguous()?, &v.contiguous()?, mask.as_ref())?;
    att.output.reshape((b, n_heads, n_q, d))
}

/// Folds each group of `g = n_heads / n_kv_heads` query heads into the query rows:
/// `q (b, n_heads, n_q, d)` → `(b, n_kv_heads, g·n_q, d)`, rows ordered (head in group, query),
/// so that one batched matmul per K/V head serves its whole group. Returns the folded `q` and `g`;
/// `reshape((b, n_heads, n_q, d))` of an output unfolds it.
pub fn fold_query_groups(q: &Tensor, n_kv: usize) -> Result<(Tensor, usize)> {
    let (b, n_heads, n_q, d) = q.dims4()?;
    if n_kv == 0 || n_heads % n_kv != 0 {
        bail!("attention kernel: {n_kv} K/V heads cannot serve {n_heads} query heads");
    }
    let g = n_heads / n_kv;
    Ok((q.contiguous()?.reshape((b, n_kv, g * n_q, d))?, g))
}

/// The causal mask `(g·n_q, n_k)` for `g` stacked query groups (row `r` is query `r mod n_q`).
pub fn grouped_causal_mask(g: usize, n_q: usize, n_k: usize, device: &Device) -> Result<Tensor> {
    let m = causal_mask(n_q, n_k, device)?; // (n_q, n_k)
    if g == 1 {
        return Ok(m);
    }
    Tensor::cat(&vec![m; g], 0)
}

/// Reference kernel that materialises the K/V copies (`repeat_kv`) and runs plain per-head
/// attention; for tests and for kernels that need equal head counts.
pub fn repeat_kv(x: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(x.clone());
    }
    let (b, n_kv, n, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, n_kv, group, n, d))?
        .contiguous()?
        .reshape((b, n_kv * group, n, d))
}

/// Grouped-query causal self-attention with optional RoPE on q and k.
///
/// Parameter names (checkpoint keys): `q_proj (n_heads·d_head, d_model)`,
/// `k_proj`, `v_proj (n_kv_heads·d_head, d_model)`, `output_proj (d_model, n_heads·d_head)`.
#[derive(Clone)]
pub struct GroupedQueryAttention {
    pub cfg: GqaConfig,
    pub w_q: Tensor,
    pub w_k: Tensor,
    pub w_v: Tensor,
    pub w_o: Tensor,
    /// Rotary tables shared by every layer (None: no positions inside attention).
    pub rope: Option<Arc<RopeTables>>,
    pub kernel: AttentionKernel,
}

impl GroupedQueryAttention {
    pub fn new(vb: VarBuilder, cfg: GqaConfig, rope: Option<Arc<RopeTables>>) -> Result<Self> {
        let d_head = cfg.d_head()?;
        let (d, kv) = (cfg.d_model, cfg.n_kv_heads * d_head);
        let w_q = weight(&vb, cfg.n_heads * d_head, d, "q_proj")?;
        let w_k = weight(&vb, kv, d, "k_proj")?;
        let w_v = weight(&vb, kv, d, "v_proj")?;
        let w_o = weight(&vb, d, cfg.n_heads * d_head, "output_proj")?;
        Self::from_weights(cfg.n_heads, cfg.n_kv_heads, w_q, w_k, w_v, w_o, rope)
    }

    /// From explicit weights; shapes are checked against `n_heads` and `n_kv_heads`.
    pub fn from_weights(
        n_heads: usize,
        n_kv_heads: usize,
        w_q: Tensor,
        w_k: Tensor,
        w_v: Tensor,
        w_o: Tensor,
        rope: Option<Arc<RopeTables>>,
    ) -> Result<Self> {
        let (dq, d_model) = w_q.dims2()?;
        let cfg = GqaConfig::new(d_model, n_heads, n_kv_heads);
        let d_head = cfg.d_head()?;
        let kv = n_kv_heads * d_head;
        for (name, w, want) in [
            ("W_q", &w_q, (dq, d_model)),
            ("W_k", &w_k, (kv, d_model)),
            ("W_v", &w_v, (kv, d_model)),
            ("W_o", &w_o, (d_model, dq)),
        ] {
            if w.dims2()? != want {
                bail!("{name} has shape {:?}, expected {want:?} for {n_heads} heads, {n_kv_heads} K/V heads, d_head {d_head}", w.dims());
            }
        }
        if let Some(r) = &rope {
            if r.d_head != d_head {
                bail!(
                    "RoPE tables are for d_head {}, the attention has d_head {d_head}",
                    r.d_head
                );
            }
        }
        Ok(Self {
            cfg,
            w_q,
            w_k,
            w_v,
            w_o,
            rope,
            kernel: naive_grouped_attention,
        })
    }

    /// Swaps the attention kernel (e.g. FlashAttention of 8-09).
    pub fn with_kernel(mut self, kernel: AttentionKernel) -> Self {
        self.kernel = kernel;
        self
    }

    pub fn d_head(&self) -> usize {
        self.cfg.d_model / self.cfg.n_heads
    }

    /// `x (batch, seq, d_model)` → `q (batch, n_heads, seq, d_head)`, `k`, `v (batch, n_kv_heads, seq, d_head)`.
    pub fn project_qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        expect_last_dim(x, self.cfg.d_model, "grouped-query attention input")?;
        // split_heads: 8-02's reshape → transpose(1, 2) → contiguous, as one copy
        let q = shared::split_heads(&shared::linear(x, &self.w_q)?, self.cfg.n_heads)?;
        let k = shared::split_heads(&shared::linear(x, &self.w_k)?, self.cfg.n_kv_heads)?;
        let v = shared::split_heads(&shared::linear(x, &self.w_v)?, self.cfg.n_kv_heads)?;
        Ok((q, k, v))
    }

    /// Rotates `q` and `k` for positions `start_pos …` (identity without RoPE).
    pub fn apply_rope(&self, q: &Tensor, k: &Tensor, start_pos: usize) -> Result<(Tensor, Tensor)> {
        match &self.rope {
            Some(t) => Ok((t.apply(q, start_pos)?, t.apply(k, start_pos)?)),
            None => Ok((q.clone(), k.clone())),
        }
    }

    /// Causal attention of `q (batch, n_heads, n_q, d_head)` over `k, v (batch, n_kv_heads, n_k,
    /// d_head)` with the configured kernel (queries are the last `n_q` of the `n_k` positions).
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        (self.kernel)(q, k, v, true)
    }

    /// Heads `(batch, n_heads, seq, d_head)` → `(batch, seq, d_model)` through `W_o`.
    pub fn output(&self, heads: &Tensor) -> Result<Tensor> {
        shared::linear(&shared::merge_heads(heads)?, &self.w_o)
    }

    /// Full causal self-attention of `x (batch, seq, d_model)` whose first token is at `start_pos`.
    pub fn forward(&self, x: &Tensor, start_pos: usize) -> Result<Tensor> {
        let (q, k, v) = self.project_qkv(x)?;
        let (q, k) = self.apply_rope(&q, &k, start_pos)?;
        self.output(&self.attend(&q, &k, &v)?)
    }
}

impl Mixer for GroupedQueryAttention {
    fn forward(&self, x: &Tensor, start_pos: usize) -> Result<Tensor> {
        GroupedQueryAttention::forward(self, x, start_pos)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Mean-pools the K or V projection of an MHA layer into `n_kv_heads` groups (Ainslie et al.,
/// 2023): `w (n_heads·d_head, d_model)` → `(n_kv_heads·d_head, d_model)`, K/V head `j` being the
/// mean of heads `j·g … (j+1)·g − 1`.
pub fn mean_pool_kv_heads(w: &Tensor, n_heads: usize, n_kv_heads: usize) -> Result<Tensor> {
    let (rows, d_model) = w.dims2()?;
    if n_heads == 0
        || !rows.is_multiple_of(n_heads)
        || n_kv_heads == 0
        || !n_heads.is_multiple_of(n_kv_heads)
    {
        bail!("mean_pool_kv_heads: cannot pool {rows} rows of {n_heads} heads into {n_kv_heads} K/V heads");
    }
    let d_head = rows / n_heads;
    let g = n_heads / n_kv_heads;
    w.reshape((n_kv_heads, g, d_head, d_model))?
        .mean(1)?
        .reshape((n_kv_heads * d_head, d_model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divisibility_errors_name_the_values() {
        let e = GqaConfig::new(64, 8, 3).d_head().unwrap_err().to_string();
        assert!(e.contains("n_kv_heads (3) must divide n_heads (8)"), "{e}");
        assert_eq!(GqaConfig::new(64, 8, 2).d_head().unwrap(), 8);
        assert_eq!(GqaConfig::new(64, 8, 2).group_size(), 4);
    }

    #[test]
    fn kv_bytes_llama2_7b() {
        // LLaMA-2-7B: 32 layers, 32 K/V heads of 128, fp16 → 512 KiB per token.
        assert_eq!(kv_cache_bytes_per_token(32, 32, 128, 2), 524_288);
        // LLaMA-3-8B: 32 layers, 8 K/V heads → 128 KiB.
        assert_eq!(kv_cache_bytes_per_token(32, 8, 128, 2), 131_072);
    }
}

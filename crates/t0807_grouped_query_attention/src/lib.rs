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
//! mask stacked `g` times. 8-02's attention component was built for this from the start: its
//! config has `n_kv_heads`, and its kernels accept fewer K/V heads than query heads — the naive
//! kernel and 8-06's fused softmax by folding each group into the query rows
//! ([`fold_query_groups`]), 8-09's FlashAttention by repeating the K/V heads ([`repeat_kv`]). This topic
//! is **rung 2 of the ladder** ([`grouped`]): rung 1 with `n_kv_heads < n_heads`.
//!
//! ## Uptraining
//! A trained MHA checkpoint becomes GQA by **mean-pooling** the K and V projection heads of each
//! group ([`mean_pool_kv_heads`]) and fine-tuning briefly (Ainslie et al., 2023: ≈5% of the
//! pre-training compute recovers most of the quality).

use candle_core::{bail, Result, Tensor};
pub use t0802_multi_head_attention::{
    fold_query_groups, grouped_causal_mask, repeat_kv, MhaConfig, MultiHeadAttention,
    NaiveAttention,
};
use t0804_transformer_block::LmConfig;

/// Rung 2 of the ladder: the rung below with `n_kv_heads` K/V heads (`n_heads`: MHA, 1: MQA).
pub fn grouped(cfg: LmConfig, n_kv_heads: usize) -> LmConfig {
    LmConfig { n_kv_heads, ..cfg }
}

/// An attention layer's config with `n_kv_heads` K/V heads (no biases, as in LLaMA).
pub fn gqa_config(d_model: usize, n_heads: usize, n_kv_heads: usize) -> MhaConfig {
    MhaConfig::new(d_model, n_heads).with_kv_heads(n_kv_heads)
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
        let e = gqa_config(64, 8, 3).d_head().unwrap_err().to_string();
        assert!(e.contains("n_kv_heads (3) must divide n_heads (8)"), "{e}");
        assert_eq!(gqa_config(64, 8, 2).d_head().unwrap(), 8);
        assert_eq!(gqa_config(64, 8, 2).kv_width(), 16);
    }

    #[test]
    fn kv_bytes_llama2_7b() {
        // LLaMA-2-7B: 32 layers, 32 K/V heads of 128, fp16 → 512 KiB per token.
        assert_eq!(kv_cache_bytes_per_token(32, 32, 128, 2), 524_288);
        // LLaMA-3-8B: 32 layers, 8 K/V heads → 128 KiB.
        assert_eq!(kv_cache_bytes_per_token(32, 8, 128, 2), 131_072);
    }
}

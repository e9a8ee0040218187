//! Incremental decoding: the forward pass of the decoder-only LM (t0804/t0806) and of the
//! encoder–decoder's decoder (t0805) over only the *new* tokens, reading everything older from
//! a [`KvStore`].

use crate::cache::{CacheKind, CacheShape, KvCache, KvStore};
use candle_core::{bail, DType, Result, Tensor};
use t0801_self_attention::{causal_mask, key_padding_mask, scaled_dot_product_attention};
use t0802_multi_head_attention::MultiHeadAttention;
use t0803_positional_encoding::sinusoidal;
use t0804_transformer_block::{residual, CausalMha, DecoderOnlyLm, Layer, Mixer};
use t0805_full_transformer::Transformer;
use t0807_grouped_query_attention::GroupedQueryAttention;

/// `x·Wᵀ (+ b)` with the bias of `mha` number `i` (q, k, v, o) when it has biases.
fn mha_project(mha: &MultiHeadAttention, x: &Tensor, w: &Tensor, i: usize) -> Result<Tensor> {
    match &mha.biases {
        Some(b) => shared::linear_with_bias(x, w, &b[i]),
        None => shared::linear(x, w),
    }
}

/// Cached causal attention with a plain multi-head attention (GPT-2 recipe, t0805's decoder):
/// `x (batch, t, d_model)` → `(batch, t, d_model)`.
fn mha_cached(
    mha: &MultiHeadAttention,
    x: &Tensor,
    layer: usize,
    cache: &mut dyn KvStore,
) -> Result<Tensor> {
    let q = mha.split_heads(&mha_project(mha, x, &mha.w_q, 0)?)?; // (batch, heads, t, d_head)
    let k = mha.split_heads(&mha_project(mha, x, &mha.w_k, 1)?)?;
    let v = mha.split_heads(&mha_project(mha, x, &mha.w_v, 2)?)?;
    let (k_all, v_all) = cache.append(layer, &k, &v)?; // (batch, heads, past + t, d_head)
    let mask = causal_mask(q.dim(2)?, k_all.dim(2)?, x.device())?; // end-aligned: new queries are the last rows
    let att =
        scaled_dot_product_attention(&q, &k_all.contiguous()?, &v_all.contiguous()?, Some(&mask))?;
    mha_project(
        mha,
        &MultiHeadAttention::merge_heads(&att.output)?,
        &mha.w_o,
        3,
    )
}

/// Cached grouped-query attention (LLaMA recipe): RoPE at positions `start_pos …`, only the
/// `n_kv_heads` K/V heads go into the cache.
fn gqa_cached(
    attn: &GroupedQueryAttention,
    x: &Tensor,
    layer: usize,
    start_pos: usize,
    cache: &mut dyn KvStore,
) -> Result<Tensor> {
    let (q, k, v) = attn.project_qkv(x)?; // q (batch, n_heads, t, d), k, v (batch, n_kv_heads, t, d)
    let (q, k) = attn.apply_rope(&q, &k, start_pos)?; // rotate by the absolute positions
    let (k_all, v_all) = cache.append(layer, &k, &v)?;
    attn.output(&attn.attend(&q, &k_all, &v_all)?)
}

/// The attention of one block, reached through [`Mixer::as_any`].
fn mixer_cached(
    mixer: &dyn Mixer,
    x: &Tensor,
    layer: usize,
    start_pos: usize,
    cache: &mut dyn KvStore,
) -> Result<Tensor> {
    let any = mixer.as_any();
    if let Some(gqa) = any.downcast_ref::<GroupedQueryAttention>() {
        gqa_cached(gqa, x, layer, start_pos, cache)
    } else if let Some(mha) = any.downcast_ref::<CausalMha>() {
        mha_cached(&mha.mha, x, layer, cache)
    } else {
        bail!("KV cache: block {layer}'s attention is neither GroupedQueryAttention nor CausalMha; it cannot be cached")
    }
}

/// K/V heads and `d_head` of the decoder-only LM's attention (checked identical in every layer).
pub fn lm_kv_heads(lm: &DecoderOnlyLm) -> Result<(usize, usize)> {
    let mut found = None;
    for (i, b) in lm.blocks.iter().enumerate() {
        let any = b.attn.as_any();
        let hd = if let Some(g) = any.downcast_ref::<GroupedQueryAttention>() {
            (g.cfg.n_kv_heads, g.d_head())
        } else if let Some(m) = any.downcast_ref::<CausalMha>() {
            (m.mha.cfg.n_heads, m.mha.cfg.d_head()?)
        } else {
            bail!("KV cache: block {i}'s attention type is not supported");
        };
        if found.is_some_and(|f| f != hd) {
            bail!(
                "KV cache: block {i} has (n_kv_heads, d_head) {hd:?}, block 0 {:?}",
                found.unwrap()
            );
        }
        found = Some(hd);
    }
    found.ok_or_else(|| candle_core::Error::Msg("KV cache: the model has no blocks".into()))
}

/// A contiguous cache sized for `lm`: `(batch, n_kv_heads, max_seq, d_head)` per layer.
pub fn lm_cache(
    lm: &DecoderOnlyLm,
    batch: usize,
    max_seq: usize,
    kind: CacheKind,
    dtype: DType,
) -> Result<KvCache> {
    let (n_kv_heads, d_head) = lm_kv_heads(lm)?;
    let shape = CacheShape {
        n_layers: lm.blocks.len(),
        batch,
        n_kv_heads,
        max_seq: max_seq.min(lm.max_seq_len),
        d_head,
    };
    KvCache::new(shape, kind, dtype, lm.token_embedding.device())
}

/// One incremental step of the decoder-only LM: `tokens (batch, t)` are the next `t` tokens after
/// the `cache.seq_len()` cached ones → logits `(batch, t, vocab)`. `t` = prompt length for the
/// prefill, 1 per decode step. On error the cache is left as it was.
pub fn lm_forward_cached(
    lm: &DecoderOnlyLm,
    tokens: &Tensor,
    cache: &mut dyn KvStore,
) -> Result<Tensor> {
    let t = tokens.dim(1)?;
    let start = cache.seq_len();
    let mut x = lm.embed(tokens, start)?; // checks the model's maximum context
    cache.begin(t)?; // checks (and for the paged cache allocates) room before any write
    for (i, block) in lm.blocks.iter().enumerate() {
        let h = residual(&x, block.attn_norm.as_ref(), block.placement, |y| {
            mixer_cached(block.attn.as_ref(), y, i, start, cache)
        })?;
        x = residual(&h, block.ffn_norm.as_ref(), block.placement, |y| {
            block.ffn.forward(y)
        })?;
    }
    cache.commit(t);
    let x = match &lm.final_norm {
        Some(n) => n.forward(&x)?,
        None => x,
    };
    lm.logits_from_hidden(&x)
}

/// The encoder–decoder's state while decoding one batch of sources: the encoder output's
/// cross-attention K/V of every decoder layer (computed once) and the self-attention cache.
pub struct Seq2SeqState {
    /// Per decoder layer `(K, V)`, each `(batch, heads, src_len, d_head)`.
    pub cross_kv: Vec<(Tensor, Tensor)>,
    /// `(batch, 1, 1, src_len)`, 1 = real source token.
    pub src_pad: Tensor,
    pub self_cache: KvCache,
}

/// Encodes `src (batch, S)` once and precomputes every decoder layer's cross-attention K/V.
pub fn seq2seq_start(
    model: &Transformer,
    src: &Tensor,
    src_mask: &Tensor,
    max_tgt: usize,
    kind: CacheKind,
    dtype: DType,
) -> Result<Seq2SeqState> {
    let memory = model.encode(src, src_mask)?; // (batch, S, d_model)
    let batch = src.dim(0)?;
    let mut cross_kv = Vec::with_capacity(model.decoder.len());
    for block in &model.decoder {
        let ca = &block.cross_attn;
        cross_kv.push((
            ca.split_heads(&mha_project(ca, &memory, &ca.w_k, 1)?)?,
            ca.split_heads(&mha_project(ca, &memory, &ca.w_v, 2)?)?,
        ));
    }
    let cfg = model.cfg;
    let shape = CacheShape {
        n_layers: cfg.n_decoder_layers,
        batch,
        n_kv_heads: cfg.n_heads,
        max_seq: max_tgt.min(cfg.max_len),
        d_head: cfg.d_model / cfg.n_heads,
    };
    Ok(Seq2SeqState {
        cross_kv,
        src_pad: key_padding_mask(src_mask)?,
        self_cache: KvCache::new(shape, kind, dtype, src.device())?,
    })
}

/// One incremental decoder step: `tgt (batch, t)` after the cached target tokens → logits
/// `(batch, t, vocab)`. Same numbers as [`Transformer::decode`] on the whole target prefix.
pub fn seq2seq_step(model: &Transformer, tgt: &Tensor, state: &mut Seq2SeqState) -> Result<Tensor> {
    let (_, t) = tgt.dims2()?;
    let start = state.self_cache.seq_len();
    let d = model.cfg.d_model;
    if start + t > model.cfg.max_len {
        bail!(
            "target of {} tokens is longer than the model's maximum length {}",
            start + t,
            model.cfg.max_len
        );
    }
    // √d·E[tgt] + PE at positions start … start + t − 1 (Transformer::embed always starts at 0).
    let e = (shared::embedding(&model.token_embedding, tgt)? * (d as f64).sqrt())?; // (b, t, d)
    let mut x = e.broadcast_add(&sinusoidal(t, d, start, tgt.device())?.to_dtype(e.dtype())?)?;
    state.self_cache.begin(t)?;
    for (i, block) in model.decoder.iter().enumerate() {
        let cache: &mut dyn KvStore = &mut state.self_cache;
        let h = residual(&x, &block.ln1, block.placement, |y| {
            mha_cached(&block.self_attn, y, i, cache)
        })?;
        let (ck, cv) = &state.cross_kv[i];
        let h = residual(&h, &block.ln2, block.placement, |y| {
            let ca = &block.cross_attn;
            let q = ca.split_heads(&mha_project(ca, y, &ca.w_q, 0)?)?;
            let att = scaled_dot_product_attention(&q, ck, cv, Some(&state.src_pad))?;
            mha_project(
                ca,
                &MultiHeadAttention::merge_heads(&att.output)?,
                &ca.w_o,
                3,
            )
        })?;
        x = residual(&h, &block.ln3, block.placement, |y| block.ffn.forward(y))?;
    }
    state.self_cache.commit(t);
    let x = match &model.decoder_norm {
        Some(n) => n.forward(&x)?,
        None => x,
    };
    shared::linear(&x, &model.lm_head)
}

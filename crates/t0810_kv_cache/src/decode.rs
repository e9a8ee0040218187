//! Incremental decoding: the forward pass over only the *new* tokens, reading everything older
//! from a [`KvStore`]. The decoder-only LM does it itself
//! ([`t0804_transformer_block::DecoderOnlyLm::forward_cached`]: its attention component takes the
//! store); this module sizes caches for it and drives t0805's encoder–decoder, whose
//! cross-attention keys and values are computed once per source.

use crate::cache::{CacheKind, CacheShape, KvCache, KvStore};
use candle_core::{DType, Result, Tensor};
use t0802_multi_head_attention::{AttnMask, CacheSlot, KeyPadding};
use t0804_transformer_block::DecoderOnlyLm;
use t0805_full_transformer::Transformer;

/// The default kernels for decoding on `device`: 8-09's fastest kernels, with naive attention on
/// the CPU. A decoding step has one query per sequence, so FlashAttention's tiles save no memory
/// traffic there, and the fused causal softmax that reads the cache in place decoded 1.7× more
/// tokens per second on the 2-core build machine (`decode-bench` at the CPU bench's shape,
/// `reports/cpu-bench/README.md`). On CUDA the fastest kernels stay the default.
pub fn decoding_kernels(device: &candle_core::Device) -> shared::kernels::Kernels {
    let fastest = t0809_flash_attention::fastest_kernels(device);
    if device.is_cpu() {
        fastest.with_attention(shared::kernels::AttentionImpl::Naive)
    } else {
        fastest
    }
}

/// The cache shape of `lm` for `batch` sequences of up to `max_seq` positions (at most the
/// model's context): `(batch, n_kv_heads, max_seq, d_head)` per layer.
pub fn lm_cache_shape(lm: &DecoderOnlyLm, batch: usize, max_seq: usize) -> CacheShape {
    let (n_kv_heads, d_head) = lm.kv_heads();
    CacheShape {
        n_layers: lm.blocks.len(),
        batch,
        n_kv_heads,
        max_seq: max_seq.min(lm.max_seq_len),
        d_head,
    }
}

/// A contiguous cache sized for `lm` ([`lm_cache_shape`]).
pub fn lm_cache(
    lm: &DecoderOnlyLm,
    batch: usize,
    max_seq: usize,
    kind: CacheKind,
    dtype: DType,
) -> Result<KvCache> {
    let shape = lm_cache_shape(lm, batch, max_seq);
    KvCache::new(shape, kind, dtype, lm.token_embedding.device())
}

/// One incremental step of the decoder-only LM: `tokens (batch, t)` after the `cache.seq_len()`
/// cached ones → logits `(batch, t, vocab)` ([`DecoderOnlyLm::forward_cached`]).
pub fn lm_forward_cached(
    lm: &DecoderOnlyLm,
    tokens: &Tensor,
    cache: &mut dyn KvStore,
) -> Result<Tensor> {
    lm.forward_cached(tokens, cache)
}

/// The encoder–decoder's state while decoding one batch of sources: the encoder output's
/// cross-attention K/V of every decoder layer (computed once) and the self-attention cache.
pub struct Seq2SeqState {
    /// Per decoder layer `(K, V)`, each `(batch, heads, src_len, d_head)`.
    pub cross_kv: Vec<(Tensor, Tensor)>,
    /// The sources' key padding, for every cross-attention.
    pub src_keys: KeyPadding,
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
    let src_keys = KeyPadding::from_mask(src_mask)?;
    let memory = model.encode_padded(src, &src_keys)?; // (batch, S, d_model)
    let cross_kv = model
        .decoder
        .iter()
        .map(|block| block.cross_attn.project_kv(&memory))
        .collect::<Result<Vec<_>>>()?;
    let cfg = model.cfg;
    let shape = CacheShape {
        n_layers: cfg.n_decoder_layers,
        batch: src.dim(0)?,
        n_kv_heads: cfg.n_heads,
        max_seq: max_tgt.min(cfg.max_len),
        d_head: cfg.d_model / cfg.n_heads,
    };
    Ok(Seq2SeqState {
        cross_kv,
        src_keys,
        self_cache: KvCache::new(shape, kind, dtype, src.device())?,
    })
}

/// One incremental decoder step: `tgt (batch, t)` after the cached target tokens → logits
/// `(batch, t, vocab)`. Same numbers as [`Transformer::decode`] on the whole target prefix.
pub fn seq2seq_step(model: &Transformer, tgt: &Tensor, state: &mut Seq2SeqState) -> Result<Tensor> {
    let t = tgt.dim(1)?;
    let mut x = model.embed_at(tgt, state.self_cache.seq_len())?; // checks the maximum length
    state.self_cache.begin(t)?;
    for (layer, block) in model.decoder.iter().enumerate() {
        let slot = CacheSlot {
            store: &mut state.self_cache,
            layer,
        };
        let memory_mask = AttnMask::Padding {
            keys: &state.src_keys,
            causal: false,
        };
        x = block.forward_with(
            &x,
            &state.cross_kv[layer],
            AttnMask::Causal,
            memory_mask,
            Some(slot),
        )?;
    }
    state.self_cache.commit(t)?;
    let x = match &model.decoder_norm {
        Some(n) => n.forward(&x)?,
        None => x,
    };
    shared::linear(&x, &model.lm_head)
}

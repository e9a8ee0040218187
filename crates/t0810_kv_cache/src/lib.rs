//! # 8-10 · The KV cache and autoregressive inference
//!
//! A decoder writes one token at a time. Token `t` attends to the keys and values of tokens
//! `0 … t`, and those of tokens `0 … t − 1` are the same numbers as at the previous step
//! (causality: nothing later changes them). So we compute each token's K and V **once** and keep
//! them in a **KV cache**; a decode step then runs the model on the one new token:
//!
//! ```text
//! prefill (prompt of n tokens):   K, V ← X·W_kᵀ, X·W_vᵀ of all n;   logits of the last token
//! decode step t:                  q, k, v of token t only          (batch, heads, 1, d_head)
//!                                 K ← [K; k],  V ← [V; v]           (batch, n_kv_heads, t+1, d_head)
//!                                 out = softmax(q·Kᵀ/√d)·V          one query row, no mask needed
//! ```
//!
//! Without the cache step `t` re-runs the whole prefix: `O(t)` token-passes per token, `O(n²)`
//! for a sequence. With it each step is one token-pass plus a read of the cache.
//!
//! ## Why decoding is memory-bound
//! A decode step multiplies a `(batch, d)` activation by every weight matrix: `2` FLOPs per
//! parameter per sequence, while every parameter (2 bytes in bf16) and the whole cache must be
//! read from memory. At batch 1 that is ≈ 1 FLOP per byte; an H100 does ≈ 990 TFLOP/s (bf16) but
//! reads only 3.35 TB/s, ≈ 295 FLOP/byte. The arithmetic units wait on memory: decode speed is
//! set by bytes moved (weights + cache), not FLOPs — hence batching, GQA/MQA, quantisation.
//!
//! ## Cache memory
//! `bytes = 2 (K and V) × batch × n_layers × n_kv_heads × seq × d_head × bytes/element`
//! ([`kv_cache_bytes`]): LLaMA-2-7B (32 layers, 32 heads of 128, fp16) needs 512 KiB per token,
//! 2 GiB for one 4096-token sequence; LLaMA-3-8B's GQA (8 K/V heads) a quarter of that.
//!
//! ## Contents
//! * [`cache`]: the contiguous cache, preallocated and written in place ([`KvCache`]), and the
//!   naive concatenating one; the [`KvStore`] trait the decoders write through.
//! * [`decode`]: incremental forward passes of the decoder-only LM (RoPE positions offset by the
//!   cache length, only `n_kv_heads` cached) and of the encoder–decoder (cross-attention K/V once).
//! * [`static_cache`]: the static cache whose position lives on the device, and [`graph`]:
//!   greedy decoding with it, its step captured into a CUDA graph and replayed on CUDA.
//! * [`sampling`]: greedy, temperature, top-k, top-p.
//! * [`paged`]: the paged cache of PagedAttention (block pool, block tables, copy-on-write).
//! * [`sim`]: the serving simulation (contiguous reservation vs paged blocks).
//! * the generation loops below.

pub mod argmax;
pub mod cache;
pub mod decode;
pub mod graph;
pub mod paged;
pub mod sampling;
pub mod sim;
pub mod static_cache;

pub use argmax::argmax_last;
pub use cache::{kv_cache_bytes, CacheKind, CacheShape, KvCache, KvStore};
pub use decode::{
    decoding_kernels, lm_cache, lm_cache_shape, lm_forward_cached, seq2seq_start, seq2seq_step,
    Seq2SeqState,
};
pub use graph::{greedy_next, prepare_for_graphs, GraphNodes, GreedyDecoder};
pub use paged::{BlockAllocator, PagedConfig, PagedKvCache, PagedSeq, SeqId};
pub use sampling::{allowed_tokens, Sampler, SamplingConfig};
pub use static_cache::StaticKvCache;

use candle_core::{bail, DType, Result, Tensor};
use std::time::Instant;
use t0804_transformer_block::DecoderOnlyLm;
use t0805_full_transformer::Transformer;

/// What a generation produced and how long it took.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GenStats {
    /// The generated tokens (the prompt excluded).
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Seconds to process the prompt and produce the first token.
    pub prefill_s: f64,
    /// Seconds for the remaining tokens.
    pub decode_s: f64,
}

impl GenStats {
    /// Decode speed: tokens after the first, per second.
    pub fn decode_tokens_per_s(&self) -> f64 {
        (self.tokens.len().saturating_sub(1)) as f64 / self.decode_s.max(1e-12)
    }
}

/// The last position's logits `(vocab,)` of `logits (1, t, vocab)`.
fn last_logits(logits: &Tensor) -> Result<Tensor> {
    let t = logits.dim(1)?;
    logits.get(0)?.get(t - 1)
}

/// Checks `prompt` against `lm`'s context and starts a generation's statistics.
fn start_generation(lm: &DecoderOnlyLm, prompt: &[u32]) -> Result<GenStats> {
    check_prompt(prompt, lm.max_seq_len)?;
    Ok(GenStats {
        prompt_len: prompt.len(),
        ..Default::default()
    })
}

fn check_prompt(prompt: &[u32], max_context: usize) -> Result<()> {
    if prompt.is_empty() {
        bail!("empty prompt: generation needs at least one token");
    }
    if prompt.len() > max_context {
        bail!(
            "prompt of {} tokens exceeds the maximum context of {max_context}",
            prompt.len()
        );
    }
    Ok(())
}

/// Generates up to `max_new` tokens after `prompt` with the decoder-only LM, reading and writing
/// `cache` (contiguous or paged; it may already hold a shared prefix, `prompt` is what follows).
/// Stops early at the model's (or the cache's) maximum context. `on_token` sees each token as it
/// is produced (streaming).
pub fn generate_lm(
    lm: &DecoderOnlyLm,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    cache: &mut dyn KvStore,
    on_token: &mut dyn FnMut(u32),
) -> Result<GenStats> {
    let mut stats = start_generation(lm, prompt)?;
    let dev = lm.token_embedding.device();
    let start = Instant::now();
    let mut logits = lm_forward_cached(lm, &Tensor::new(prompt, dev)?.unsqueeze(0)?, cache)?; // prefill
    while stats.tokens.len() < max_new {
        let next = sampler.sample(&last_logits(&logits)?)?;
        stats.tokens.push(next);
        on_token(next);
        if stats.tokens.len() == 1 {
            stats.prefill_s = start.elapsed().as_secs_f64();
        }
        if stats.tokens.len() == max_new || cache.seq_len() >= lm.max_seq_len {
            break;
        }
        logits = match lm_forward_cached(lm, &Tensor::new(&[next], dev)?.unsqueeze(0)?, cache) {
            Ok(l) => l,
            Err(e) if stats.tokens.len() > 1 && e.to_string().contains("KV cache full") => break,
            Err(e) => return Err(e),
        };
    }
    stats.decode_s = start.elapsed().as_secs_f64() - stats.prefill_s;
    Ok(stats)
}

/// Greedy generation with the static cache ([`GreedyDecoder`]): on CUDA the decode step is
/// captured into a CUDA graph after one real step and replayed (build the model after
/// [`prepare_for_graphs`], with naive attention), elsewhere it runs eagerly. The tokens of
/// [`generate_lm`] with a greedy sampler; each one is read back to the host for `on_token`.
pub fn generate_lm_greedy_static(
    lm: &DecoderOnlyLm,
    prompt: &[u32],
    max_new: usize,
    on_token: &mut dyn FnMut(u32),
) -> Result<GenStats> {
    let mut stats = start_generation(lm, prompt)?;
    let dev = lm.token_embedding.device();
    if max_new == 0 {
        return Ok(stats);
    }
    let max_seq = prompt.len() + max_new;
    let mut dec = GreedyDecoder::new(lm, 1, max_seq, lm.compute_dtype)?;
    let start = Instant::now();
    dec.prefill(&Tensor::new(prompt, dev)?.unsqueeze(0)?)?;
    let mut emit = |dec: &GreedyDecoder, stats: &mut GenStats| -> Result<()> {
        let next = dec.next_tokens()?[0];
        stats.tokens.push(next);
        on_token(next);
        Ok(())
    };
    emit(&dec, &mut stats)?;
    stats.prefill_s = start.elapsed().as_secs_f64();
    while stats.tokens.len() < max_new && dec.steps_left() > 0 {
        if dev.is_cuda() && !dec.is_captured() && dec.steps_left() >= 2 {
            dec.capture()?; // one real step, then the recording
        } else {
            dec.step()?;
        }
        emit(&dec, &mut stats)?;
    }
    stats.decode_s = start.elapsed().as_secs_f64() - stats.prefill_s;
    Ok(stats)
}

/// The same loop without a cache: every step re-runs the model on the whole prefix.
pub fn generate_lm_no_cache(
    lm: &DecoderOnlyLm,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    on_token: &mut dyn FnMut(u32),
) -> Result<GenStats> {
    let mut stats = start_generation(lm, prompt)?;
    let dev = lm.token_embedding.device();
    let mut seq = prompt.to_vec();
    let start = Instant::now();
    while stats.tokens.len() < max_new && seq.len() <= lm.max_seq_len {
        let logits = lm.forward(&Tensor::new(seq.as_slice(), dev)?.unsqueeze(0)?, 0)?;
        let next = sampler.sample(&last_logits(&logits)?)?;
        stats.tokens.push(next);
        on_token(next);
        if stats.tokens.len() == 1 {
            stats.prefill_s = start.elapsed().as_secs_f64();
        }
        seq.push(next);
    }
    stats.decode_s = start.elapsed().as_secs_f64() - stats.prefill_s;
    Ok(stats)
}

/// Encoder–decoder generation with the cached decoder: encode `src` once, then one decoder
/// token-pass per generated token, starting from `bos`.
pub fn generate_seq2seq(
    model: &Transformer,
    src: &[u32],
    bos: u32,
    max_new: usize,
    sampler: &mut Sampler,
    kind: CacheKind,
    on_token: &mut dyn FnMut(u32),
) -> Result<GenStats> {
    check_prompt(src, model.cfg.max_len)?;
    let dev = model.token_embedding.device();
    let src_t = Tensor::new(src, dev)?.unsqueeze(0)?;
    let src_mask = Tensor::ones((1, src.len()), DType::U8, dev)?;
    let start = Instant::now();
    let max_new = max_new.min(model.cfg.max_len);
    let mut state = seq2seq_start(
        model,
        &src_t,
        &src_mask,
        max_new.max(1),
        kind,
        model.token_embedding.dtype(),
    )?;
    let mut stats = GenStats {
        prompt_len: src.len(),
        ..Default::default()
    };
    let mut last = bos;
    while stats.tokens.len() < max_new {
        let logits = seq2seq_step(model, &Tensor::new(&[last], dev)?.unsqueeze(0)?, &mut state)?;
        last = sampler.sample(&last_logits(&logits)?)?;
        stats.tokens.push(last);
        on_token(last);
        if stats.tokens.len() == 1 {
            stats.prefill_s = start.elapsed().as_secs_f64();
        }
    }
    stats.decode_s = start.elapsed().as_secs_f64() - stats.prefill_s;
    Ok(stats)
}

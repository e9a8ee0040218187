//! The generic decoder-only language model: embeddings → N blocks → (final norm) → logits, and
//! the ladder's builder.
//!
//! A block holds two [`Layer`]s for its norms, one [`Layer`] for its feed-forward network and
//! 8-02's attention component ([`MultiHeadAttention`]) for its causal self-attention; absolute
//! position encodings (if any) are an [`AbsolutePositions`].
//!
//! ## Building a rung: [`Parts`]
//! [`build_lm`] assembles any [`LmConfig`] from a [`Parts`]: the object that knows how to make a
//! norm, a feed-forward network, attention positions and an attention kernel. This topic's
//! [`Gpt2Parts`] makes LayerNorm, GELU/ReLU MLPs, absolute positions and naive attention; each
//! later topic wraps the parts of the topic below and adds its ingredient (RMSNorm and SwiGLU in
//! 8-06, RoPE in 8-08, FlashAttention in 8-09). An ingredient that no part knows yet is an error
//! that names the topic that brings it.

use crate::blocks::*;
use crate::config::{LmConfig, NormKind, PositionKind};
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use shared::add::residual_add;
use shared::kernels::{AttentionImpl, Kernels, Lookup, OpImpl};
use shared::params::{normal, weight};
use std::path::Path;
use std::sync::Arc;
use t0802_multi_head_attention::{
    AttentionKernel, AttnMask, CacheSlot, KvStore, MultiHeadAttention, NaiveAttention, PositionPlug,
};
use t0803_positional_encoding::{sinusoidal, LearnedPositions};

/// Absolute position encodings added to the token embeddings: `(seq, d_model)` for positions
/// `start_pos .. start_pos + seq`.
pub trait AbsolutePositions: Send + Sync {
    fn encode(&self, seq_len: usize, start_pos: usize, device: &Device) -> Result<Tensor>;
    /// The longest sequence it can encode (`None`: unbounded).
    fn max_len(&self) -> Option<usize>;
}

/// Sinusoidal encodings of t0803 (no parameters, any length).
pub struct Sinusoidal {
    pub d_model: usize,
}

impl AbsolutePositions for Sinusoidal {
    fn encode(&self, seq_len: usize, start_pos: usize, device: &Device) -> Result<Tensor> {
        sinusoidal(seq_len, self.d_model, start_pos, device)
    }
    fn max_len(&self) -> Option<usize> {
        None
    }
}

impl AbsolutePositions for LearnedPositions {
    fn encode(&self, seq_len: usize, start_pos: usize, _device: &Device) -> Result<Tensor> {
        self.forward(seq_len, start_pos)
    }
    fn max_len(&self) -> Option<usize> {
        Some(self.max_len())
    }
}

/// The residual stream between blocks: its value so far, and (pre-norm) the last block's
/// feed-forward branch not yet added to it, so that the next norm can add it in the same pass
/// ([`Layer::add_then_forward`]). Its value is `x + pending`.
pub struct Stream {
    pub x: Tensor,
    pub pending: Option<Tensor>,
}

impl Stream {
    /// A stream with nothing pending.
    pub fn new(x: Tensor) -> Self {
        Self { x, pending: None }
    }

    /// The stream's value, `x + pending`.
    pub fn value(self) -> Result<Tensor> {
        match self.pending {
            Some(f) => residual_add(&self.x, &f),
            None => Ok(self.x),
        }
    }

    /// `(value, norm(value))`: the pending add and the norm in one call.
    pub fn normed(self, norm: &dyn Layer) -> Result<(Tensor, Tensor)> {
        match self.pending {
            Some(f) => norm.add_then_forward(&self.x, &f),
            None => {
                let y = norm.forward(&self.x)?;
                Ok((self.x, y))
            }
        }
    }
}

/// A decoder-only block: `h = x + Attn(N₁(x))`, `y = h + FFN(N₂(h))` (pre-norm) or the
/// post-norm arrangement. Parameter prefixes: `attn_norm`, `attn`, `ffn_norm`, `ffn`.
pub struct DecoderOnlyBlock {
    pub attn_norm: Box<dyn Layer>,
    pub attn: MultiHeadAttention,
    pub ffn_norm: Box<dyn Layer>,
    pub ffn: Box<dyn Layer>,
    pub placement: NormPlacement,
}

impl DecoderOnlyBlock {
    /// `x (batch, seq, d_model)` whose first token sits at `start_pos`; with a cache slot the
    /// block's keys and values are stored and the tokens attend to all cached ones too.
    pub fn forward(
        &self,
        x: &Tensor,
        start_pos: usize,
        cache: Option<CacheSlot<'_>>,
    ) -> Result<Tensor> {
        self.forward_stream(Stream::new(x.clone()), start_pos, cache)?
            .value()
    }

    /// [`Self::forward`] on the residual stream. Pre-norm, each residual add runs inside the norm
    /// that follows it: the stream's pending branch inside `N₁`, the attention branch inside `N₂`,
    /// and the feed-forward branch is left pending for the next block's `N₁` (or the final norm).
    pub fn forward_stream(
        &self,
        stream: Stream,
        start_pos: usize,
        cache: Option<CacheSlot<'_>>,
    ) -> Result<Stream> {
        match self.placement {
            NormPlacement::Pre => {
                let (x, attn_in) = stream.normed(self.attn_norm.as_ref())?;
                let attended =
                    self.attn
                        .self_attention(&attn_in, AttnMask::Causal, start_pos, cache)?;
                let (h, ffn_in) = self.ffn_norm.add_then_forward(&x, &attended)?;
                Ok(Stream {
                    x: h,
                    pending: Some(self.ffn.forward(&ffn_in)?),
                })
            }
            NormPlacement::Post => {
                let x = stream.value()?;
                let h = residual(&x, self.attn_norm.as_ref(), self.placement, |y| {
                    self.attn
                        .self_attention(y, AttnMask::Causal, start_pos, cache)
                })?;
                let y = residual(&h, self.ffn_norm.as_ref(), self.placement, |y| {
                    self.ffn.forward(y)
                })?;
                Ok(Stream::new(y))
            }
        }
    }
}

/// The decoder-only language model. Parameters: `token_embedding (vocab, d_model)`, the blocks
/// under `blocks.<i>`, `positions.position_embeddings` (learned positions), `final_norm`
/// (pre-norm models), `lm_head (vocab, d_model)` (untied).
pub struct DecoderOnlyLm {
    pub token_embedding: Tensor,
    pub positions: Option<Box<dyn AbsolutePositions>>,
    pub blocks: Vec<DecoderOnlyBlock>,
    pub final_norm: Option<Box<dyn Layer>>,
    pub lm_head: Tensor,
    /// Longest context the model accepts (its training context, or the learned table's size).
    pub max_seq_len: usize,
    /// How token ids are looked up (an execution choice).
    pub lookup: Lookup,
    /// The activations' dtype: the parameters' dtype, or bf16 over f32 parameters for mixed
    /// precision ([`DecoderOnlyLm::with_compute_dtype`]).
    pub compute_dtype: DType,
}

impl DecoderOnlyLm {
    pub fn vocab_size(&self) -> usize {
        self.token_embedding.dims()[0]
    }

    pub fn d_model(&self) -> usize {
        self.token_embedding.dims()[1]
    }

    /// The same model with each attention's `W_q, W_k, W_v` packed into one matrix in the
    /// compute dtype (8-02's [`MultiHeadAttention::with_packed_qkv`]): one GEMM instead of three
    /// per layer, for decoding (8-10). A detached copy: a model that trains is built without it.
    pub fn with_packed_qkv(mut self) -> Result<Self> {
        for block in &mut self.blocks {
            block.attn = block.attn.clone().with_packed_qkv(self.compute_dtype)?;
        }
        Ok(self)
    }

    /// The same model computing in `dtype` (bf16 over f32 parameters: mixed precision). The
    /// parameters, their gradients and the optimiser stay in their own dtype: every weight is
    /// cast where it is used, and the cast's backward returns the gradient in the weight's dtype.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// Token embeddings (+ absolute positions): `tokens (batch, seq)` → `(batch, seq, d_model)`.
    pub fn embed(&self, tokens: &Tensor, start_pos: usize) -> Result<Tensor> {
        let (_, t) = tokens.dims2()?;
        if t == 0 {
            bail!("empty input: the model needs at least one token");
        }
        if start_pos + t > self.max_seq_len {
            bail!(
                "sequence of {} positions exceeds the model's maximum context of {}",
                start_pos + t,
                self.max_seq_len
            );
        }
        let x = shared::embedding_with(&self.token_embedding, tokens, self.lookup)?
            .to_dtype(self.compute_dtype)?; // (batch, seq, d_model)
        match &self.positions {
            Some(p) => x.broadcast_add(&p.encode(t, start_pos, x.device())?.to_dtype(x.dtype())?),
            None => Ok(x),
        }
    }

    /// The final hidden states `(batch, seq, d_model)` (after the final norm).
    pub fn hidden(&self, tokens: &Tensor, start_pos: usize) -> Result<Tensor> {
        let mut stream = Stream::new(self.embed(tokens, start_pos)?);
        for block in &self.blocks {
            stream = block.forward_stream(stream, start_pos, None)?;
        }
        self.final_norm(stream)
    }

    /// The stream's value through the final norm (pre-norm models), its last add included.
    fn final_norm(&self, stream: Stream) -> Result<Tensor> {
        match &self.final_norm {
            Some(n) => Ok(stream.normed(n.as_ref())?.1),
            None => stream.value(),
        }
    }

    /// Hidden states → logits `(…, vocab)`.
    pub fn logits_from_hidden(&self, h: &Tensor) -> Result<Tensor> {
        shared::linear(h, &self.lm_head)
    }

    /// `tokens (batch, seq)` → logits `(batch, seq, vocab)`.
    pub fn forward(&self, tokens: &Tensor, start_pos: usize) -> Result<Tensor> {
        self.logits_from_hidden(&self.hidden(tokens, start_pos)?)
    }

    /// One incremental step (8-10): `tokens (batch, t)` are the next `t` tokens after the
    /// `cache.seq_len()` cached ones → logits `(batch, t, vocab)`. `t` = prompt length for the
    /// prefill, 1 per decode step. On error the cache is left as it was.
    pub fn forward_cached(&self, tokens: &Tensor, cache: &mut dyn KvStore) -> Result<Tensor> {
        let t = tokens.dim(1)?;
        let start = cache.seq_len();
        let mut stream = Stream::new(self.embed(tokens, start)?); // checks the model's maximum context
        cache.begin(t)?; // checks (and for a paged cache allocates) room before any write
        if self.positions.is_some() && cache.device_position().is_some() {
            bail!("a cache that keeps its position on the device needs positions inside attention (RoPE): this model's learned position table is indexed on the host");
        }
        for (layer, block) in self.blocks.iter().enumerate() {
            let slot = CacheSlot {
                store: &mut *cache,
                layer,
            };
            stream = block.forward_stream(stream, start, Some(slot))?;
        }
        let logits = self.logits_from_hidden(&self.final_norm(stream)?)?;
        cache.commit(t)?;
        Ok(logits)
    }

    /// Mean next-token cross-entropy of `targets (batch, seq)`.
    pub fn loss(&self, tokens: &Tensor, targets: &Tensor) -> Result<Tensor> {
        shared::train::cross_entropy(&self.forward(tokens, 0)?, targets, None)
    }

    /// `(n_kv_heads, d_head)` of the attention (the same in every block): what a KV cache holds
    /// per token and layer.
    pub fn kv_heads(&self) -> (usize, usize) {
        let a = &self.blocks[0].attn;
        (a.cfg.n_kv_heads, a.d_head())
    }
}

/// How to make each part of a block for a given [`LmConfig`] and [`Kernels`]. A rung of the
/// ladder wraps the parts of the rung below ([`Parts::below`]) and overrides only what its topic
/// adds; every other part comes from the rung below.
pub trait Parts {
    /// The parts of the rung below (`None` for rung 0, which makes every part itself).
    fn below(&self) -> Option<&dyn Parts>;

    /// The run's execution choice.
    fn kernels(&self) -> Kernels {
        rung_below(self).kernels()
    }

    /// A norm of `cfg.norm`, parameters under `vb`.
    fn norm(&self, vb: VarBuilder, cfg: &LmConfig) -> Result<Box<dyn Layer>> {
        rung_below(self).norm(vb, cfg)
    }

    /// A feed-forward network of `cfg.ffn`, parameters under `vb`.
    fn ffn(&self, vb: VarBuilder, cfg: &LmConfig) -> Result<Box<dyn Layer>> {
        rung_below(self).ffn(vb, cfg)
    }

    /// Positions inside attention (shared by every layer), or `None`.
    fn attention_positions(
        &self,
        cfg: &LmConfig,
        device: &Device,
    ) -> Result<Option<Arc<dyn PositionPlug>>> {
        rung_below(self).attention_positions(cfg, device)
    }

    /// The attention kernel of the run.
    fn attention_kernel(&self, cfg: &LmConfig) -> Result<Arc<dyn AttentionKernel>> {
        rung_below(self).attention_kernel(cfg)
    }
}

/// The rung below `parts`; rung 0 overrides every method, so it is never asked for one.
fn rung_below<P: Parts + ?Sized>(parts: &P) -> &dyn Parts {
    parts
        .below()
        .expect("a rung without a rung below must make every part itself")
}

/// Rung 0's parts: LayerNorm, GELU/ReLU MLPs, absolute positions, naive attention.
#[derive(Debug, Clone, Copy)]
pub struct Gpt2Parts {
    pub kernels: Kernels,
}

/// This topic's parts with the run's kernels.
pub fn parts(kernels: Kernels) -> Gpt2Parts {
    Gpt2Parts { kernels }
}

impl Parts for Gpt2Parts {
    fn below(&self) -> Option<&dyn Parts> {
        None
    }

    fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// LayerNorm, composed whatever `kernels.norm` (8-06's parts run it fused).
    fn norm(&self, vb: VarBuilder, cfg: &LmConfig) -> Result<Box<dyn Layer>> {
        match cfg.norm {
            NormKind::LayerNorm => Ok(Box::new(LayerNorm::new(vb, cfg.d_model, cfg.norm_eps)?)),
            NormKind::RmsNorm => {
                bail!("RMSNorm arrives in 8-06: build with t0806_modern_blocks::parts")
            }
        }
    }

    fn ffn(&self, vb: VarBuilder, cfg: &LmConfig) -> Result<Box<dyn Layer>> {
        match cfg.ffn.activation() {
            Some(act) => Ok(Box::new(FeedForward::new(
                vb,
                cfg.d_model,
                cfg.d_ff,
                act,
                cfg.bias,
            )?)),
            None => bail!("SwiGLU arrives in 8-06: build with t0806_modern_blocks::parts"),
        }
    }

    fn attention_positions(
        &self,
        cfg: &LmConfig,
        _device: &Device,
    ) -> Result<Option<Arc<dyn PositionPlug>>> {
        match cfg.positions {
            PositionKind::Rope => bail!("RoPE arrives in 8-08: build with t0808_rope::parts"),
            _ => Ok(None), // absolute positions act on the embeddings
        }
    }

    fn attention_kernel(&self, _cfg: &LmConfig) -> Result<Arc<dyn AttentionKernel>> {
        match (self.kernels.attention, self.kernels.softmax) {
            (AttentionImpl::Naive, OpImpl::Composed) => Ok(Arc::new(NaiveAttention)),
            (AttentionImpl::Naive, OpImpl::Fused) => {
                bail!("the fused causal softmax arrives in 8-06: build with t0806_modern_blocks::parts (or choose --softmax composed)")
            }
            (AttentionImpl::Flash, _) => {
                bail!("FlashAttention arrives in 8-09: build with t0809_flash_attention::parts (or choose --attention naive)")
            }
        }
    }
}

/// Builds the LM of `cfg` through `vb` (fresh parameters from a `VarMap`, or a checkpoint) with
/// the parts of a rung.
///
/// Parameter names (the checkpoint format): `token_embedding (vocab, d)`; per block
/// `blocks.<i>.attn_norm.*`, `blocks.<i>.attn.{q_proj,k_proj,v_proj,output_proj}` (+ `*_bias`),
/// `blocks.<i>.ffn_norm.*`, `blocks.<i>.ffn.{w1,w2}` (+ `b1, b2`) or `{w1,w2,w3}` (SwiGLU);
/// `positions.position_embeddings` (learned positions); `final_norm.*` (pre-norm); `lm_head`.
pub fn build_lm(vb: VarBuilder, cfg: &LmConfig, parts: &dyn Parts) -> Result<DecoderOnlyLm> {
    cfg.validate()?;
    let kernels = parts.kernels();
    let plug = parts.attention_positions(cfg, vb.device())?;
    let kernel = parts.attention_kernel(cfg)?;
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let vb = vb.pp(format!("blocks.{i}"));
        let attn = MultiHeadAttention::new(vb.pp("attn"), cfg.attention())?
            .with_positions(plug.clone())
            .with_kernel(kernel.clone())
            .with_head_copy(kernels.heads);
        blocks.push(DecoderOnlyBlock {
            attn_norm: parts.norm(vb.pp("attn_norm"), cfg)?,
            attn,
            ffn_norm: parts.norm(vb.pp("ffn_norm"), cfg)?,
            ffn: parts.ffn(vb.pp("ffn"), cfg)?,
            placement: cfg.placement,
        });
    }
    let d = cfg.d_model;
    let positions: Option<Box<dyn AbsolutePositions>> = match cfg.positions {
        PositionKind::Sinusoidal => Some(Box::new(Sinusoidal { d_model: d })),
        PositionKind::Learned => Some(Box::new(LearnedPositions::new(
            vb.pp("positions"),
            cfg.max_seq_len,
            d,
        )?)),
        PositionKind::None | PositionKind::Rope => None,
    };
    let final_norm = match cfg.placement {
        NormPlacement::Pre => Some(parts.norm(vb.pp("final_norm"), cfg)?),
        NormPlacement::Post => None,
    };
    Ok(DecoderOnlyLm {
        token_embedding: normal(&vb, (cfg.vocab_size, d), "token_embedding", 1.0)?,
        positions,
        blocks,
        final_norm,
        lm_head: weight(&vb, cfg.vocab_size, d, "lm_head")?,
        max_seq_len: cfg.max_seq_len,
        lookup: kernels.embedding,
        compute_dtype: vb.dtype(),
    })
}

/// A fresh, trainable model: the `VarMap` holding its parameters and the model.
pub fn init_lm(
    cfg: &LmConfig,
    parts: &dyn Parts,
    dtype: DType,
    device: &Device,
) -> Result<(VarMap, DecoderOnlyLm)> {
    let varmap = VarMap::new();
    let lm = build_lm(VarBuilder::from_varmap(&varmap, dtype, device), cfg, parts)?;
    Ok((varmap, lm))
}

/// A fresh model for mixed-precision training: its parameters in `dtype` and, when the model is
/// to compute in another dtype `compute`, the model built on `compute` copies of them
/// ([`shared::train::copies_for`]): `(parameters, copies, model)`. Train it with
/// `Trainer::for_params(&parameters, copies.as_ref(), …)`, which keeps the parameters as the f32
/// master weights and refreshes the copies after every step.
pub fn init_lm_mixed(
    cfg: &LmConfig,
    parts: &dyn Parts,
    (dtype, compute): (DType, DType),
    device: &Device,
) -> anyhow::Result<(VarMap, Option<VarMap>, DecoderOnlyLm)> {
    let (params, lm) = init_lm(cfg, parts, dtype, device)?;
    let copies = shared::train::copies_for(&params, compute)?;
    let lm = match &copies {
        Some(copies) => build_lm(VarBuilder::from_varmap(copies, compute, device), cfg, parts)?,
        None => lm,
    };
    Ok((params, copies, lm))
}

/// Writes `config.json` and `model.safetensors` into `dir` (created if needed).
pub fn save_lm(dir: &Path, cfg: &LmConfig, varmap: &VarMap) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(cfg)?)?;
    shared::params::save_params(varmap, &dir.join("model.safetensors"))?;
    Ok(())
}

/// Reads the `config.json` of a model folder (see [`LmConfig::from_json`]).
pub fn load_lm_config(dir: &Path) -> anyhow::Result<LmConfig> {
    use anyhow::Context;
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("no model config at {}", path.display()))?;
    LmConfig::from_json(&text).with_context(|| format!("{} is not an LM config", path.display()))
}

/// Reads a folder written by [`save_lm`]: the config and a (frozen) model on `device` in `dtype`.
pub fn load_lm(
    dir: &Path,
    parts: &dyn Parts,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<(LmConfig, DecoderOnlyLm)> {
    let cfg = load_lm_config(dir)?;
    let weights = dir.join("model.safetensors");
    if !weights.exists() {
        anyhow::bail!("no weights at {}", weights.display());
    }
    // Safety: the file is memory-mapped read-only and not modified while the model lives.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, device)? };
    Ok((cfg, build_lm(vb, &cfg, parts)?))
}

/// Float32 helper for tests and experiments: a `(rows, cols)` tensor as nested `Vec<f64>`.
pub fn to_rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    t.to_dtype(DType::F64)?.to_vec2::<f64>()
}

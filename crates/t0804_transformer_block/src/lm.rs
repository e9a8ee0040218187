//! The generic decoder-only language model: embeddings → N blocks → (final norm) → logits.
//!
//! Every part is pluggable. A block holds two [`Layer`]s for its norms, one [`Layer`] for its
//! feed-forward network and one [`Mixer`] for its causal self-attention; absolute position
//! encodings (if any) are an [`AbsolutePositions`]. This topic assembles the 2017/GPT-2 style
//! model ([`ClassicLmConfig`]); t0806 assembles the LLaMA recipe from the same stack.

use crate::blocks::*;
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use shared::params::{normal, weight, zeros};
use t0801_self_attention::causal_mask;
use t0802_multi_head_attention::MultiHeadAttention;
use t0803_positional_encoding::{sinusoidal, LearnedPositions};

/// A causal sequence mixer: `(batch, seq, d_model)` → same shape, token `t` seeing only `≤ t`.
/// `start_pos` is the absolute position of the first token of `x` (0 for a full forward; the
/// cache length when decoding incrementally, 8-10).
pub trait Mixer: Send + Sync {
    fn forward(&self, x: &Tensor, start_pos: usize) -> Result<Tensor>;
    /// Lets later topics (the KV cache of 8-10) reach the concrete attention type.
    fn as_any(&self) -> &dyn std::any::Any;
}

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

/// Causal multi-head self-attention of t0802 as a [`Mixer`].
pub struct CausalMha {
    pub mha: MultiHeadAttention,
}

impl Mixer for CausalMha {
    fn forward(&self, x: &Tensor, _start_pos: usize) -> Result<Tensor> {
        let seq = x.dim(1)?;
        let mask = causal_mask(seq, seq, x.device())?;
        Ok(self.mha.forward(x, Some(&mask))?.output)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A decoder-only block: `h = x + Mix(N₁(x))`, `y = h + FFN(N₂(h))` (pre-norm) or the
/// post-norm arrangement. Parameter prefixes: `attn_norm`, `attn`, `ffn_norm`, `ffn`.
pub struct DecoderOnlyBlock {
    pub attn_norm: Box<dyn Layer>,
    pub attn: Box<dyn Mixer>,
    pub ffn_norm: Box<dyn Layer>,
    pub ffn: Box<dyn Layer>,
    pub placement: NormPlacement,
}

impl DecoderOnlyBlock {
    pub fn forward(&self, x: &Tensor, start_pos: usize) -> Result<Tensor> {
        let h = residual(x, self.attn_norm.as_ref(), self.placement, |y| {
            self.attn.forward(y, start_pos)
        })?;
        residual(&h, self.ffn_norm.as_ref(), self.placement, |y| {
            self.ffn.forward(y)
        })
    }
}

/// The decoder-only language model. Parameters: `token_embedding (vocab, d_model)`, the blocks
/// under `blocks.<i>`, `final_norm` (pre-norm models), `lm_head (vocab, d_model)` (untied), and
/// `lm_head_bias` when present.
pub struct DecoderOnlyLm {
    pub token_embedding: Tensor,
    pub positions: Option<Box<dyn AbsolutePositions>>,
    pub blocks: Vec<DecoderOnlyBlock>,
    pub final_norm: Option<Box<dyn Layer>>,
    pub lm_head: Tensor,
    pub lm_head_bias: Option<Tensor>,
    /// Longest context the model accepts (its training context, or the learned table's size).
    pub max_seq_len: usize,
}

impl DecoderOnlyLm {
    pub fn vocab_size(&self) -> usize {
        self.token_embedding.dims()[0]
    }

    pub fn d_model(&self) -> usize {
        self.token_embedding.dims()[1]
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
        let x = shared::embedding(&self.token_embedding, tokens)?; // (batch, seq, d_model)
        match &self.positions {
            Some(p) => x.broadcast_add(&p.encode(t, start_pos, x.device())?.to_dtype(x.dtype())?),
            None => Ok(x),
        }
    }

    /// The final hidden states `(batch, seq, d_model)` (after the final norm).
    pub fn hidden(&self, tokens: &Tensor, start_pos: usize) -> Result<Tensor> {
        let mut x = self.embed(tokens, start_pos)?;
        for block in &self.blocks {
            x = block.forward(&x, start_pos)?;
        }
        match &self.final_norm {
            Some(n) => n.forward(&x),
            None => Ok(x),
        }
    }

    /// Hidden states → logits `(…, vocab)`.
    pub fn logits_from_hidden(&self, h: &Tensor) -> Result<Tensor> {
        match &self.lm_head_bias {
            Some(b) => shared::linear_with_bias(h, &self.lm_head, b),
            None => shared::linear(h, &self.lm_head),
        }
    }

    /// `tokens (batch, seq)` → logits `(batch, seq, vocab)`.
    pub fn forward(&self, tokens: &Tensor, start_pos: usize) -> Result<Tensor> {
        self.logits_from_hidden(&self.hidden(tokens, start_pos)?)
    }

    /// Mean next-token cross-entropy of `targets (batch, seq)`.
    pub fn loss(&self, tokens: &Tensor, targets: &Tensor) -> Result<Tensor> {
        shared::train::cross_entropy(&self.forward(tokens, 0)?, targets, None)
    }
}

/// Which absolute position scheme a classic model adds to its embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PositionKind {
    None,
    Sinusoidal,
    Learned,
}

/// The 2017 / GPT-2 style decoder-only LM: LayerNorm, multi-head attention, GELU or ReLU FFN,
/// absolute positions, pre- or post-norm.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassicLmConfig {
    pub vocab_size: usize,
    pub max_seq_len: usize,
    pub n_layers: usize,
    pub block: BlockConfig,
    pub positions: PositionKind,
}

impl ClassicLmConfig {
    pub fn validate(&self) -> Result<()> {
        self.block.mha().d_head()?;
        if self.vocab_size == 0
            || self.max_seq_len == 0
            || self.n_layers == 0
            || self.block.d_ff == 0
        {
            bail!("ClassicLmConfig: vocab_size, max_seq_len, n_layers and d_ff must be positive: {self:?}");
        }
        Ok(())
    }
}

/// Builds the classic LM through `vb` (fresh parameters or a checkpoint).
pub fn build_classic_lm(vb: VarBuilder, cfg: &ClassicLmConfig) -> Result<DecoderOnlyLm> {
    cfg.validate()?;
    let b = &cfg.block;
    let d = b.d_model;
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let vb = vb.pp(format!("blocks.{i}"));
        blocks.push(DecoderOnlyBlock {
            attn_norm: Box::new(LayerNorm::new(vb.pp("attn_norm"), d, b.eps)?),
            attn: Box::new(CausalMha {
                mha: MultiHeadAttention::new(vb.pp("attn"), b.mha())?,
            }),
            ffn_norm: Box::new(LayerNorm::new(vb.pp("ffn_norm"), d, b.eps)?),
            ffn: Box::new(FeedForward::new(
                vb.pp("ffn"),
                d,
                b.d_ff,
                b.activation,
                b.bias,
            )?),
            placement: b.placement,
        });
    }
    let positions: Option<Box<dyn AbsolutePositions>> = match cfg.positions {
        PositionKind::None => None,
        PositionKind::Sinusoidal => Some(Box::new(Sinusoidal { d_model: d })),
        PositionKind::Learned => Some(Box::new(LearnedPositions::new(
            vb.pp("positions"),
            cfg.max_seq_len,
            d,
        )?)),
    };
    let final_norm: Option<Box<dyn Layer>> = match b.placement {
        NormPlacement::Pre => Some(Box::new(LayerNorm::new(vb.pp("final_norm"), d, b.eps)?)),
        NormPlacement::Post => None,
    };
    Ok(DecoderOnlyLm {
        token_embedding: normal(&vb, (cfg.vocab_size, d), "token_embedding", 1.0)?,
        positions,
        blocks,
        final_norm,
        lm_head: weight(&vb, cfg.vocab_size, d, "lm_head")?,
        lm_head_bias: if b.bias {
            Some(zeros(&vb, cfg.vocab_size, "lm_head_bias")?)
        } else {
            None
        },
        max_seq_len: cfg.max_seq_len,
    })
}

/// Float32 helper for tests and experiments: a `(rows, cols)` tensor as nested `Vec<f64>`.
pub fn to_rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    t.to_dtype(DType::F64)?.to_vec2::<f64>()
}

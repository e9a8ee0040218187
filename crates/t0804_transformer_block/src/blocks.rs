//! LayerNorm, the feed-forward network, and the encoder and decoder blocks.

use crate::{FfnKind, LmConfig, LmShape, Parts, PositionKind};
use candle_core::{bail, DType, Result, Tensor, D};
use candle_nn::VarBuilder;
use shared::add::residual_add;
use shared::kernels::Kernels;
use shared::params::{expect_last_dim, ones, weight, zeros};
use t0802_multi_head_attention::{AttnMask, CacheSlot, MhaConfig, MultiHeadAttention};

/// A sub-layer that maps `(batch, seq, d_model)` to the same shape (norms, feed-forwards).
pub trait Layer: Send + Sync {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// `(x + a, self(x + a))`: a residual sum and this layer applied to it, for a norm that
    /// follows a residual connection. The two ops in turn here; 8-06's fused RMSNorm computes
    /// both in one pass over memory.
    fn add_then_forward(&self, x: &Tensor, a: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = residual_add(x, a)?;
        let y = self.forward(&h)?;
        Ok((h, y))
    }
}

/// Layer normalisation (Ba et al., 2016), from scratch:
/// `LN(x) = (x − μ) / √(σ² + ε) ⊙ g + b`, with `μ`, `σ²` the mean and (biased) variance over the
/// last dimension. Computed in (at least) f32 and cast back. Parameters: `weight` (g, ones), `bias` (b, zeros).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub gain: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, d_model: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            gain: ones(&vb, d_model, "weight")?,
            bias: zeros(&vb, d_model, "bias")?,
            eps,
        })
    }

    pub fn from_weights(gain: Tensor, bias: Tensor, eps: f64) -> Result<Self> {
        if gain.dims() != bias.dims() || gain.rank() != 1 {
            bail!(
                "LayerNorm: gain {:?} and bias {:?} must be equal 1-D shapes",
                gain.dims(),
                bias.dims()
            );
        }
        Ok(Self { gain, bias, eps })
    }
}

impl Layer for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        expect_last_dim(x, self.gain.dims()[0], "LayerNorm input")?;
        let dtype = x.dtype();
        let compute = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }; // never below f32
        let x = x.to_dtype(compute)?;
        let mean = x.mean_keepdim(D::Minus1)?; // (…, 1)
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?; // (…, 1)
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let g = self.gain.to_dtype(compute)?;
        let b = self.bias.to_dtype(compute)?;
        normed.broadcast_mul(&g)?.broadcast_add(&b)?.to_dtype(dtype)
    }
}

/// The non-linearity of the feed-forward network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Activation {
    /// `max(0, x)` (Vaswani et al.)
    Relu,
    /// `x·Φ(x)` in GPT-2's tanh approximation
    Gelu,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Relu => x.relu(),
            Activation::Gelu => crate::gelu::gelu(x),
        }
    }
}

/// Position-wise feed-forward network, expand → activate → project:
/// `FFN(x) = act(x·W₁ᵀ + b₁)·W₂ᵀ + b₂`, `W₁: (d_ff, d_model)`, `W₂: (d_model, d_ff)`.
/// Parameters: `w1`, `w2` (and `b1`, `b2` with biases).
#[derive(Debug, Clone)]
pub struct FeedForward {
    pub w1: Tensor,
    pub w2: Tensor,
    pub biases: Option<(Tensor, Tensor)>,
    pub activation: Activation,
}

impl FeedForward {
    pub fn new(
        vb: VarBuilder,
        d_model: usize,
        d_ff: usize,
        activation: Activation,
        bias: bool,
    ) -> Result<Self> {
        let biases = if bias {
            Some((zeros(&vb, d_ff, "b1")?, zeros(&vb, d_model, "b2")?))
        } else {
            None
        };
        Ok(Self {
            w1: weight(&vb, d_ff, d_model, "w1")?,
            w2: weight(&vb, d_model, d_ff, "w2")?,
            biases,
            activation,
        })
    }

    pub fn from_weights(
        w1: Tensor,
        w2: Tensor,
        biases: Option<(Tensor, Tensor)>,
        activation: Activation,
    ) -> Result<Self> {
        let (d_ff, d_model) = w1.dims2()?;
        if w2.dims2()? != (d_model, d_ff) {
            bail!(
                "FeedForward: W1 {:?} and W2 {:?} do not match (expected W2 ({d_model}, {d_ff}))",
                w1.dims(),
                w2.dims()
            );
        }
        Ok(Self {
            w1,
            w2,
            biases,
            activation,
        })
    }
}

impl Layer for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = match &self.biases {
            Some((b1, _)) => shared::linear_with_bias(x, &self.w1, b1)?,
            None => shared::linear(x, &self.w1)?,
        }; // (batch, seq, d_ff)
        let hidden = self.activation.apply(&hidden)?;
        match &self.biases {
            Some((_, b2)) => shared::linear_with_bias(&hidden, &self.w2, b2),
            None => shared::linear(&hidden, &self.w2),
        }
    }
}

/// Where the norm sits relative to the residual connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NormPlacement {
    /// `x + f(LN(x))` — GPT-2, LLaMA; needs a final norm after the last block.
    Pre,
    /// `LN(x + f(x))` — the original Transformer.
    Post,
}

/// One residual sub-layer: `x + f(norm(x))` (pre) or `norm(x + f(x))` (post). The `+` is
/// [`residual_add`]: Candle's addition, or on the GPU a kernel moving 16 bytes per thread.
pub fn residual(
    x: &Tensor,
    norm: &dyn Layer,
    placement: NormPlacement,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    match placement {
        NormPlacement::Pre => residual_add(x, &f(&norm.forward(x)?)?),
        NormPlacement::Post => norm.forward(&residual_add(x, &f(x)?)?),
    }
}

/// Sizes shared by the encoder and decoder blocks.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BlockConfig {
    pub d_model: usize,
    pub n_heads: usize,
    pub d_ff: usize,
    pub activation: Activation,
    pub placement: NormPlacement,
    pub bias: bool,
    pub eps: f64,
}

impl BlockConfig {
    pub fn mha(&self) -> MhaConfig {
        MhaConfig::new(self.d_model, self.n_heads).with_bias(self.bias)
    }

    /// The block in the ladder's vocabulary, for a rung's [`Parts`] to build its norms and
    /// attention kernel: a one-layer [`LmConfig`] with this block's sizes, LayerNorm and its
    /// two-matrix MLP. (Its vocabulary and length are placeholders that no part reads.)
    pub fn as_lm_block(&self) -> LmConfig {
        let ffn = match self.activation {
            Activation::Relu => FfnKind::Relu,
            Activation::Gelu => FfnKind::Gelu,
        };
        LmConfig {
            d_ff: self.d_ff,
            ffn,
            positions: PositionKind::Sinusoidal,
            placement: self.placement,
            bias: self.bias,
            norm_eps: self.eps,
            ..LmConfig::gpt2(LmShape {
                vocab_size: 1,
                max_seq_len: 1,
                d_model: self.d_model,
                n_layers: 1,
                n_heads: self.n_heads,
            })
        }
    }

    /// An attention layer of this block with the rung's kernel and head copy.
    fn attention(&self, vb: VarBuilder, parts: &dyn Parts) -> Result<MultiHeadAttention> {
        Ok(MultiHeadAttention::new(vb, self.mha())?
            .with_kernel(parts.attention_kernel(&self.as_lm_block())?)
            .with_head_copy(parts.kernels().heads))
    }
}

/// Encoder block: bidirectional self-attention + FFN, each in a residual sub-layer.
/// Parameters: `self_attn.*`, `ln1.*`, `ffn.*`, `ln2.*`. The norms (LayerNorm), the feed-forward
/// network and the attention kernel come from a rung's [`Parts`]: 8-04's composed ones, or 8-06's
/// fused LayerNorm and bias + GELU and 8-09's FlashAttention (same parameters, same values).
pub struct EncoderBlock {
    pub self_attn: MultiHeadAttention,
    pub ln1: Box<dyn Layer>,
    pub ffn: Box<dyn Layer>,
    pub ln2: Box<dyn Layer>,
    pub placement: NormPlacement,
}

impl EncoderBlock {
    /// With this topic's composed parts.
    pub fn new(vb: VarBuilder, cfg: &BlockConfig) -> Result<Self> {
        Self::with_parts(vb, cfg, &crate::parts(Kernels::composed()))
    }

    pub fn with_parts(vb: VarBuilder, cfg: &BlockConfig, parts: &dyn Parts) -> Result<Self> {
        let lm = cfg.as_lm_block();
        Ok(Self {
            self_attn: cfg.attention(vb.pp("self_attn"), parts)?,
            ln1: parts.norm(vb.pp("ln1"), &lm)?,
            ffn: parts.ffn(vb.pp("ffn"), &lm)?,
            ln2: parts.norm(vb.pp("ln2"), &lm)?,
            placement: cfg.placement,
        })
    }

    /// `x (batch, src, d_model)`; `src_mask` (`u8`, broadcastable to `(batch, heads, src, src)`)
    /// hides padding keys.
    pub fn forward(&self, x: &Tensor, src_mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_masked(x, src_mask.map_or(AttnMask::None, AttnMask::Explicit))
    }

    /// [`Self::forward`] with any mask: the source's key padding ([`AttnMask::Padding`]) lets
    /// FlashAttention skip the padding instead of masking it.
    pub fn forward_masked(&self, x: &Tensor, mask: AttnMask<'_>) -> Result<Tensor> {
        let h = residual(x, self.ln1.as_ref(), self.placement, |y| {
            self.self_attn.self_attention(y, mask, 0, None)
        })?;
        residual(&h, self.ln2.as_ref(), self.placement, |y| {
            self.ffn.forward(y)
        })
    }
}

/// Decoder block: causal self-attention, cross-attention to the encoder output, FFN.
/// Parameters: `self_attn.*`, `ln1.*`, `cross_attn.*`, `ln2.*`, `ffn.*`, `ln3.*`; norms,
/// feed-forward network and attention kernel from a rung's [`Parts`], as in [`EncoderBlock`].
pub struct DecoderBlock {
    pub self_attn: MultiHeadAttention,
    pub ln1: Box<dyn Layer>,
    pub cross_attn: MultiHeadAttention,
    pub ln2: Box<dyn Layer>,
    pub ffn: Box<dyn Layer>,
    pub ln3: Box<dyn Layer>,
    pub placement: NormPlacement,
}

impl DecoderBlock {
    /// With this topic's composed parts.
    pub fn new(vb: VarBuilder, cfg: &BlockConfig) -> Result<Self> {
        Self::with_parts(vb, cfg, &crate::parts(Kernels::composed()))
    }

    pub fn with_parts(vb: VarBuilder, cfg: &BlockConfig, parts: &dyn Parts) -> Result<Self> {
        let lm = cfg.as_lm_block();
        Ok(Self {
            self_attn: cfg.attention(vb.pp("self_attn"), parts)?,
            ln1: parts.norm(vb.pp("ln1"), &lm)?,
            cross_attn: cfg.attention(vb.pp("cross_attn"), parts)?,
            ln2: parts.norm(vb.pp("ln2"), &lm)?,
            ffn: parts.ffn(vb.pp("ffn"), &lm)?,
            ln3: parts.norm(vb.pp("ln3"), &lm)?,
            placement: cfg.placement,
        })
    }

    /// `x (batch, tgt, d_model)`, `memory (batch, src, d_model)` (the encoder output).
    /// `self_mask`: causal (and target padding) mask for `(batch, heads, tgt, tgt)`;
    /// `memory_mask`: source padding mask for `(batch, heads, tgt, src)`.
    pub fn forward(
        &self,
        x: &Tensor,
        memory: &Tensor,
        self_mask: Option<&Tensor>,
        memory_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let memory_kv = self.cross_attn.project_kv(memory)?;
        let self_mask = self_mask.map_or(AttnMask::None, AttnMask::Explicit);
        let memory_mask = memory_mask.map_or(AttnMask::None, AttnMask::Explicit);
        self.forward_with(x, &memory_kv, self_mask, memory_mask, None)
    }

    /// The block with the memory's cross-attention keys and values already projected
    /// (`(batch, heads, src, d_head)` each, [`MultiHeadAttention::project_kv`]), any masks
    /// (8-05 passes the target's and the source's key padding, causal for the self-attention)
    /// and, when decoding (8-10), a KV-cache slot for the self-attention (then `self_mask` is
    /// [`AttnMask::Causal`]: the new tokens are the last ones).
    pub fn forward_with(
        &self,
        x: &Tensor,
        memory_kv: &(Tensor, Tensor),
        self_mask: AttnMask<'_>,
        memory_mask: AttnMask<'_>,
        cache: Option<CacheSlot<'_>>,
    ) -> Result<Tensor> {
        let start_pos = cache.as_ref().map_or(0, |c| c.store.seq_len());
        let h = residual(x, self.ln1.as_ref(), self.placement, |y| {
            self.self_attn
                .self_attention(y, self_mask, start_pos, cache)
        })?;
        let (k, v) = memory_kv;
        let h = residual(&h, self.ln2.as_ref(), self.placement, |y| {
            self.cross_attn.cross_attention(y, k, v, memory_mask)
        })?;
        residual(&h, self.ln3.as_ref(), self.placement, |y| {
            self.ffn.forward(y)
        })
    }
}

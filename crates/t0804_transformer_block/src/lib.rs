//! # 8-04 · The transformer block
//!
//! A block wraps two sub-layers — attention (tokens talk to each other) and a position-wise
//! feed-forward network (each token thinks alone) — in **residual connections** and
//! **normalisation**:
//!
//! ```text
//! post-norm (Vaswani et al., 2017):   h = LN(x + Attn(x));      y = LN(h + FFN(h))
//! pre-norm  (GPT-2 and later):        h = x + Attn(LN(x));      y = h + FFN(LN(h))   (+ a final LN)
//! ```
//!
//! Pre-norm leaves an identity path from every layer's output to the loss, so gradients reach
//! early layers undiminished and training tolerates large learning rates without warm-up;
//! post-norm normalises the residual stream itself, which rescales the gradient at every layer
//! (the experiment of this topic measures the difference).
//!
//! This crate also defines the **generic decoder-only stack** and the first rung of the ladder,
//! the GPT-2-style LM ([`LmConfig::gpt2`]). [`DecoderOnlyLm`] is made of [`DecoderOnlyBlock`]s
//! whose norm and feed-forward are any [`Layer`] and whose attention is 8-02's component; later
//! topics add their ingredient through [`Parts`] (8-06 RMSNorm and SwiGLU, 8-07 grouped-query
//! attention, 8-08 RoPE, 8-09 FlashAttention) and 8-10 passes a KV cache to
//! [`DecoderOnlyLm::forward_cached`].

pub mod blocks;
pub mod config;
pub mod gelu;
pub mod lm;

pub use blocks::*;
pub use config::*;
pub use lm::*;

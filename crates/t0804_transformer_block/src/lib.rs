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
//! This crate also defines the **generic decoder-only stack** that later topics plug their own
//! components into: [`DecoderOnlyLm`] is made of [`DecoderOnlyBlock`]s whose norm and
//! feed-forward are any [`Layer`] and whose attention is any [`Mixer`] (t0806 plugs RMSNorm and
//! SwiGLU, t0807 grouped-query attention, t0808 RoPE).

pub mod blocks;
pub mod lm;

pub use blocks::*;
pub use lm::*;

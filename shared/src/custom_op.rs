//! What every custom op of the module (embedding, cross-entropy, AdamW, RMSNorm, RoPE, SwiGLU,
//! FlashAttention) needs on the CPU side: the contiguous elements a layout describes. The CUDA
//! side is in [`crate::cuda`].

use candle_core::{bail, Layout, Result};

/// `(start, end)` of the elements of a contiguous `layout`; `what` names the tensor in the error.
pub fn contiguous_range(layout: &Layout, what: &str) -> Result<(usize, usize)> {
    match layout.contiguous_offsets() {
        Some(r) => Ok(r),
        None => bail!("{what} must be contiguous (layout {:?})", layout.dims()),
    }
}

/// The elements of `data` that a contiguous `layout` describes.
pub fn contiguous_slice<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    let (a, b) = contiguous_range(layout, what)?;
    Ok(&data[a..b])
}

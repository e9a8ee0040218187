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

/// `match dtype { F32 => run!(f32, f32), F64 => run!(f64, f64), BF16 => run!(bf16, f32),
/// F16 => run!(f16, f32), _ => error }`: the per-dtype dispatch of a custom op (CPU loops or CUDA
/// launches), calling the op's own `run!(storage type, accumulator type)` macro; `what` names the
/// op in the error. `for_float_dtype!(dtype, what, run, no_f64)` leaves f64 out (kernels built
/// for f32, bf16 and f16 only).
#[macro_export]
macro_rules! for_float_dtype {
    ($dtype:expr, $what:expr, $run:ident, no_f64) => {
        match $dtype {
            candle_core::DType::F32 => $run!(f32, f32),
            candle_core::DType::BF16 => $run!(half::bf16, f32),
            candle_core::DType::F16 => $run!(half::f16, f32),
            dt => candle_core::bail!("{}: dtype {dt:?} not supported (f32, bf16, f16)", $what),
        }
    };
    ($dtype:expr, $what:expr, $run:ident) => {
        match $dtype {
            candle_core::DType::F32 => $run!(f32, f32),
            candle_core::DType::F64 => $run!(f64, f64),
            candle_core::DType::BF16 => $run!(half::bf16, f32),
            candle_core::DType::F16 => $run!(half::f16, f32),
            dt => candle_core::bail!(
                "{}: dtype {dt:?} not supported (f32, f64, bf16, f16)",
                $what
            ),
        }
    };
}

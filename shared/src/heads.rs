//! # Splitting a projection into heads, and merging them back
//!
//! Multi-head attention (8-02) reshapes a projection `(batch, seq, heads·d_head)` into
//! `(batch, seq, heads, d_head)` and swaps the middle axes, so that each head's rows are
//! contiguous for its matmuls; after attention, the inverse swap merges the heads:
//!
//! ```text
//! split   (b, n, h·d) → (b, n, h, d) → (b, h, n, d)      x.reshape(…).transpose(1, 2).contiguous()
//! merge   (b, h, n, d) → (b, n, h, d) → (b, n, h·d)      x.transpose(1, 2).contiguous().reshape(…)
//! ```
//!
//! Both are the same data movement, [`swap_axes_1_2`]: `out[a, c, b, :] = in[a, b, c, :]`. Its
//! backward is the same swap of the gradient. In Candle the `contiguous()` of a transposed view is
//! a general strided copy that computes a four-level index for every element (dims and strides
//! read from memory, a division and a remainder per level) and moves each element alone; a
//! training step of the 8-06 model does 32 of them on (64, 256, 16, 32) activations. The op here
//! moves whole `d_head` rows in 16-byte units (`kernels/heads.cu`, `cuda` feature only): 9.9 µs
//! per swap in bf16 on an H200 (`ncu`, 2026-11-27), and the bf16 step went from 11.9 to 9.4 ms.
//! On the CPU it is a loop of row copies. Same values, bit for bit.
//!
//! [`HeadCopy::Transpose`] (a field of the run's [`crate::kernels::Kernels`]) uses Candle's
//! `transpose(1, 2).contiguous()` instead, for side-by-side measurements.

use crate::custom_op::contiguous_slice;
use crate::kernels::HeadCopy;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};

/// `(batch, seq, heads·d_head)` → `(batch, heads, seq, d_head)`, contiguous.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    split_heads_with(x, heads, HeadCopy::RowSwap)
}

/// `(batch, heads, seq, d_head)` → `(batch, seq, heads·d_head)`, contiguous.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    merge_heads_with(x, HeadCopy::RowSwap)
}

/// [`split_heads`] with the copy chosen by `how`.
pub fn split_heads_with(x: &Tensor, heads: usize, how: HeadCopy) -> Result<Tensor> {
    let (b, n, width) = x.dims3().map_err(|_| {
        candle_core::Error::Msg(format!(
            "split_heads: expected (batch, seq, heads·d_head), got {:?}",
            x.dims()
        ))
    })?;
    if heads == 0 || !width.is_multiple_of(heads) {
        bail!("split_heads: {heads} heads do not divide the width {width}");
    }
    swap_with(&x.reshape((b, n, heads, width / heads))?, how)
}

/// [`merge_heads`] with the copy chosen by `how`.
pub fn merge_heads_with(x: &Tensor, how: HeadCopy) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4().map_err(|_| {
        candle_core::Error::Msg(format!(
            "merge_heads: expected (batch, heads, seq, d_head), got {:?}",
            x.dims()
        ))
    })?;
    swap_with(x, how)?.reshape((b, n, h * d))
}

fn swap_with(x: &Tensor, how: HeadCopy) -> Result<Tensor> {
    match how {
        HeadCopy::RowSwap => swap_axes_1_2(x),
        HeadCopy::Transpose => x.transpose(1, 2)?.contiguous(),
    }
}

/// `(A, B, C, R)` → `(A, C, B, R)` with `out[a, c, b, :] = in[a, b, c, :]`, contiguous;
/// differentiable (the backward swaps the gradient back). Float dtypes run the op of this module;
/// others Candle's `transpose(1, 2).contiguous()`.
pub fn swap_axes_1_2(x: &Tensor) -> Result<Tensor> {
    let (a, b, c, r) = x.dims4().map_err(|_| {
        candle_core::Error::Msg(format!(
            "swap_axes_1_2: expected a 4-D tensor, got {:?}",
            x.dims()
        ))
    })?;
    if b == 1 || c == 1 {
        // The swap moves nothing in memory: a reshape of the contiguous tensor is the answer.
        return x.contiguous()?.reshape((a, c, b, r));
    }
    if !x.dtype().is_float() {
        return x.transpose(1, 2)?.contiguous();
    }
    x.contiguous()?.apply_op1(SwapAxes12)
}

#[derive(Debug, Clone, Copy)]
struct SwapAxes12;

fn cpu_swap<T: Copy>(x: &[T], (a, b, c, r): (usize, usize, usize, usize)) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for ai in 0..a {
        for ci in 0..c {
            for bi in 0..b {
                let start = ((ai * b + bi) * c + ci) * r;
                out.extend_from_slice(&x[start..start + r]);
            }
        }
    }
    out
}

impl CustomOp1 for SwapAxes12 {
    fn name(&self) -> &'static str {
        "swap-axes-1-2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                <$t>::to_cpu_storage_owned(cpu_swap(
                    contiguous_slice(s.as_slice::<$t>()?, l, "swap_axes_1_2: input")?,
                    dims,
                ))
            };
        }
        let out = crate::for_float_dtype!(s.dtype(), "swap_axes_1_2", run);
        Ok((out, swapped_shape(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = l.shape().dims4()?;
        Ok((cuda::swap(s, l, dims)?, swapped_shape(dims)))
    }

    fn bwd(&self, _x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(swap_axes_1_2(grad)?))
    }
}

fn swapped_shape((a, b, c, r): (usize, usize, usize, usize)) -> Shape {
    Shape::from((a, c, b, r))
}

/// Launching `kernels/heads.cu`.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{contiguous_view, grid_stride, load_kernel};
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::CudaStorage;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/heads.ptx"));
    const MODULE: &str = "shared_heads";

    pub fn swap(
        s: &CudaStorage,
        l: &Layout,
        dims: (usize, usize, usize, usize),
    ) -> Result<CudaStorage> {
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                swap_t::<$t>(s, l, dims)
            };
        }
        crate::for_float_dtype!(s.dtype(), "swap_axes_1_2 (cuda)", run)
    }

    fn swap_t<T: CudaDType + DeviceRepr>(
        s: &CudaStorage,
        l: &Layout,
        (a, b, c, r): (usize, usize, usize, usize),
    ) -> Result<CudaStorage> {
        let dev = s.device().clone();
        let (input, offset) = contiguous_view::<T>(s, l, "swap_axes_1_2 (cuda): input")?;
        let size = std::mem::size_of::<T>();
        let n = a * b * c * r;
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(n)? };
        if n == 0 {
            return Ok(CudaStorage::wrap_cuda_slice(out, dev));
        }
        // The widest unit dividing a row's bytes and the input's byte offset (allocations are
        // at least 256-byte aligned; the output is a fresh one).
        let (row_bytes, offset_bytes) = (r * size, offset * size);
        // Every float dtype has at least 2 bytes, so the 2-byte unit always fits.
        let (unit, name) = [(16, "u128"), (8, "u64"), (4, "u32"), (2, "u16")]
            .into_iter()
            .find(|&(u, _)| row_bytes % u == 0 && offset_bytes % u == 0)
            .unwrap_or((2, "u16"));
        let (units_per_row, units) = (row_bytes / unit, n * size / unit);
        let func = load_kernel(&dev, MODULE, PTX, &format!("swap12_{name}"), 0)?;
        let args = [b, c, units_per_row, units].map(|x| x as i64);
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder.arg(&input).arg(&mut out);
        for x in &args {
            builder.arg(x);
        }
        // SAFETY: argument types and order match the kernel; both buffers hold `units` units.
        unsafe { builder.launch(grid_stride(units)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn composed(x: &Tensor) -> Result<Tensor> {
        x.transpose(1, 2)?.contiguous()
    }

    #[test]
    fn swap_equals_transpose_contiguous_for_every_float_dtype() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2. * 3. * 5. * 7., &dev)?.reshape((2, 3, 5, 7))?;
        for dt in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            let x = x.to_dtype(dt)?;
            let ours = swap_axes_1_2(&x)?;
            assert_eq!(ours.dims(), &[2, 5, 3, 7]);
            let diff = (ours.to_dtype(DType::F64)? - composed(&x)?.to_dtype(DType::F64)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            assert_eq!(diff, 0.0, "{dt:?}");
        }
        Ok(())
    }

    #[test]
    fn split_then_merge_is_the_identity() -> Result<()> {
        let x = Tensor::randn(0f32, 1., (2, 6, 12), &Device::Cpu)?;
        let heads = split_heads(&x, 4)?;
        assert_eq!(heads.dims(), &[2, 4, 6, 3]);
        // head h, position t = columns h·3 … h·3+2 of row t
        let direct = x.narrow(2, 6, 3)?.narrow(1, 5, 1)?.flatten_all()?;
        let from_split = heads.narrow(1, 2, 1)?.narrow(2, 5, 1)?.flatten_all()?;
        assert_eq!(direct.to_vec1::<f32>()?, from_split.to_vec1::<f32>()?);
        assert_eq!(
            merge_heads(&heads)?.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn gradient_is_the_swapped_gradient() -> Result<()> {
        let x = candle_core::Var::randn(0f32, 1., (2, 3, 4, 5), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1., (2, 4, 3, 5), &Device::Cpu)?;
        let grads = (swap_axes_1_2(&x)? * &w)?.sum_all()?.backward()?;
        let g = grads.get(&x).expect("x has a gradient");
        // d/dx Σ swap(x)·w = swap⁻¹(w)
        assert_eq!(
            g.flatten_all()?.to_vec1::<f32>()?,
            composed(&w)?.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3, 10), DType::F32, &dev).unwrap();
        assert!(split_heads(&x, 3).is_err());
        assert!(split_heads(&x, 0).is_err());
        assert!(merge_heads(&x).is_err());
        assert!(swap_axes_1_2(&x).is_err());
    }
}

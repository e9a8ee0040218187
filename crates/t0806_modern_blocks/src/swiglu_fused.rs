//! # The SwiGLU gate as one op
//!
//! `SiLU(a) ⊙ b` composed from tensor ops ([`crate::silu`] then a multiplication) is five graph
//! nodes (negate, exp, add 1, divide, multiply); the backward of each is one or two more passes,
//! and Candle's autograd adds a pass per node to accumulate its gradient. As one op:
//!
//! ```text
//! forward   h  = a·σ(a)·b
//! backward  da = g·b·σ(a)·(1 + a·(1 − σ(a)))        db = g·a·σ(a)
//! ```
//!
//! one pass forward, one backward (writing `[da | db]` into one buffer: a custom op has one
//! output). On the CPU, loops; on CUDA, `kernels/swiglu.cu` (`cuda` feature only).

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use shared::custom_op::contiguous_slice;

/// `SiLU(a) ⊙ b` for `a`, `b` of one shape and dtype; differentiable in both.
pub fn swiglu_gate_fused(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() || a.dtype() != b.dtype() {
        bail!(
            "swiglu_gate_fused: a {:?} {:?} and b {:?} {:?} must match",
            a.dims(),
            a.dtype(),
            b.dims(),
            b.dtype()
        );
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, SwiGluGate)
}

#[derive(Debug, Clone, Copy)]
struct SwiGluGate;

/// `(a, b, g) → [da | db]` (flat, 2n elements).
#[derive(Debug, Clone, Copy)]
struct SwiGluGateBackward;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Values in f32 arithmetic for f32/bf16/f16 (rounded to f32 like the kernel), f64 for f64.
fn round<T: WithDType>(x: f64) -> f64 {
    if T::DTYPE == DType::F64 {
        x
    } else {
        x as f32 as f64
    }
}

fn cpu_forward<T: WithDType>(a: &[T], b: &[T]) -> Vec<T> {
    a.iter()
        .zip(b)
        .map(|(&a, &b)| {
            let x = a.to_f64();
            T::from_f64(round::<T>(x * sigmoid(x) * b.to_f64()))
        })
        .collect()
}

fn cpu_backward<T: WithDType>(a: &[T], b: &[T], g: &[T]) -> Vec<T> {
    let mut out = Vec::with_capacity(2 * a.len());
    let sig: Vec<f64> = a.iter().map(|x| sigmoid(x.to_f64())).collect();
    for ((&x, &y), (&gi, &s)) in a.iter().zip(b).zip(g.iter().zip(&sig)) {
        let (x, gi) = (x.to_f64(), gi.to_f64());
        out.push(T::from_f64(round::<T>(
            gi * y.to_f64() * s * (1.0 + x * (1.0 - s)),
        )));
    }
    for ((&x, &gi), &s) in a.iter().zip(g).zip(&sig) {
        out.push(T::from_f64(round::<T>(gi.to_f64() * x.to_f64() * s)));
    }
    out
}

impl CustomOp2 for SwiGluGate {
    fn name(&self) -> &'static str {
        "swiglu-gate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                <$t>::to_cpu_storage_owned(cpu_forward::<$t>(
                    contiguous_slice(s1.as_slice::<$t>()?, l1, "swiglu gate: a")?,
                    contiguous_slice(s2.as_slice::<$t>()?, l2, "swiglu gate: b")?,
                ))
            };
        }
        let h = shared::for_float_dtype!(s1.dtype(), "swiglu gate", run);
        Ok((h, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::forward(s1, l1, s2, l2)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _h: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = a.elem_count();
        let packed = a.apply_op3_no_bwd(b, &g.contiguous()?, &SwiGluGateBackward)?; // [da | db]
        let da = packed.narrow(0, 0, n)?.reshape(a.shape())?;
        let db = packed.narrow(0, n, n)?.reshape(b.shape())?;
        Ok((Some(da), Some(db)))
    }
}

impl CustomOp3 for SwiGluGateBackward {
    fn name(&self) -> &'static str {
        "swiglu-gate-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                <$t>::to_cpu_storage_owned(cpu_backward::<$t>(
                    contiguous_slice(s1.as_slice::<$t>()?, l1, "swiglu gate: a")?,
                    contiguous_slice(s2.as_slice::<$t>()?, l2, "swiglu gate: b")?,
                    contiguous_slice(s3.as_slice::<$t>()?, l3, "swiglu gate: gradient")?,
                ))
            };
        }
        let out = shared::for_float_dtype!(s1.dtype(), "swiglu gate backward", run);
        Ok((out, Shape::from(2 * l1.shape().elem_count())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::backward(s1, l1, s2, l2, s3, l3)?;
        Ok((out, Shape::from(2 * l1.shape().elem_count())))
    }
}

/// Launching `kernels/swiglu.cu`.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::CudaStorage;
    use half::{bf16, f16};
    use shared::cuda::{contiguous_view, load_kernel};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx"));
    const MODULE: &str = "t0806_swiglu";
    use shared::cuda::grid_stride as config;

    fn name(dtype: DType) -> Result<&'static str> {
        use DType::*;
        shared::cuda::dtype_suffix(dtype, &[F32, BF16, F16], "swiglu gate")
    }

    pub fn forward(
        sa: &CudaStorage,
        la: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
    ) -> Result<CudaStorage> {
        match sa.dtype() {
            DType::F32 => fwd::<f32>(sa, la, sb, lb),
            DType::BF16 => fwd::<bf16>(sa, la, sb, lb),
            DType::F16 => fwd::<f16>(sa, la, sb, lb),
            dt => bail!("swiglu gate (cuda): dtype {dt:?} not supported (f32, bf16, f16)"),
        }
    }

    fn fwd<T: CudaDType + DeviceRepr>(
        sa: &CudaStorage,
        la: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
    ) -> Result<CudaStorage> {
        let dev = sa.device().clone();
        let (a, _) = contiguous_view::<T>(sa, la, "swiglu gate (cuda): a")?;
        let (b, _) = contiguous_view::<T>(sb, lb, "swiglu gate (cuda): b")?;
        let n = la.shape().elem_count();
        // SAFETY: every element is written.
        let mut h = unsafe { dev.alloc::<T>(n)? };
        if n > 0 {
            let func = load_kernel(
                &dev,
                MODULE,
                PTX,
                &format!("swiglu_fwd_{}", name(sa.dtype())?),
                0,
            )?;
            let n_i = n as i64;
            let stream = dev.cuda_stream();
            let mut builder = stream.launch_builder(&func);
            builder.arg(&a).arg(&b).arg(&mut h).arg(&n_i);
            // SAFETY: argument types match the kernel; all buffers hold n elements.
            unsafe { builder.launch(config(n)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(h, dev))
    }

    pub fn backward(
        sa: &CudaStorage,
        la: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
        sg: &CudaStorage,
        lg: &Layout,
    ) -> Result<CudaStorage> {
        match sa.dtype() {
            DType::F32 => bwd::<f32>(sa, la, sb, lb, sg, lg),
            DType::BF16 => bwd::<bf16>(sa, la, sb, lb, sg, lg),
            DType::F16 => bwd::<f16>(sa, la, sb, lb, sg, lg),
            dt => bail!("swiglu gate (cuda): dtype {dt:?} not supported (f32, bf16, f16)"),
        }
    }

    fn bwd<T: CudaDType + DeviceRepr>(
        sa: &CudaStorage,
        la: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
        sg: &CudaStorage,
        lg: &Layout,
    ) -> Result<CudaStorage> {
        let dev = sa.device().clone();
        let (a, _) = contiguous_view::<T>(sa, la, "swiglu gate (cuda): a")?;
        let (b, _) = contiguous_view::<T>(sb, lb, "swiglu gate (cuda): b")?;
        let (g, _) = contiguous_view::<T>(sg, lg, "swiglu gate (cuda): gradient")?;
        let n = la.shape().elem_count();
        // SAFETY: every element of [da | db] is written.
        let mut out = unsafe { dev.alloc::<T>(2 * n)? };
        if n > 0 {
            let func = load_kernel(
                &dev,
                MODULE,
                PTX,
                &format!("swiglu_bwd_{}", name(sa.dtype())?),
                0,
            )?;
            let n_i = n as i64;
            let stream = dev.cuda_stream();
            let mut builder = stream.launch_builder(&func);
            builder.arg(&a).arg(&b).arg(&g).arg(&mut out).arg(&n_i);
            // SAFETY: argument types match the kernel; out holds 2n elements.
            unsafe { builder.launch(config(n)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

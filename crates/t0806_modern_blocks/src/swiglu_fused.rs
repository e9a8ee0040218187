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
//! output). On the CPU, loops in f32 over the cores ([`shared::cpu`]); on CUDA, `kernels/swiglu.cu` (`cuda` feature only).

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use shared::cpu::{Element, Real};
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

/// `σ(x) = 1/(1 + e⁻ˣ)` in the loop's arithmetic `A` (f32, or f64 for f64 tensors).
#[inline(always)]
fn sigmoid<A: Real>(x: A) -> A {
    A::one() / (A::one() + (A::zero() - x).exp())
}

/// Elements per task of the row-parallel loops (the gate is element-wise: any split will do).
const CHUNK: usize = 4096;

/// `h = a·σ(a)·b`, in f32 arithmetic for f32/bf16/f16 (as the kernel computes), f64 for f64.
fn cpu_forward<T: Element, A: Real>(a: &[T], b: &[T]) -> Vec<T> {
    let mut h = shared::cpu::zeros::<T>(a.len());
    shared::cpu::for_each_row(&mut h, CHUNK, |i, out| {
        let (a, b) = (&a[i * CHUNK..], &b[i * CHUNK..]);
        for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
            let x = A::of(a);
            *o = (x * sigmoid(x) * A::of(b)).to();
        }
    });
    h
}

/// `[da | db]` with `da = g·b·σ(a)·(1 + a·(1 − σ(a)))` and `db = g·a·σ(a)`.
fn cpu_backward<T: Element, A: Real>(a: &[T], b: &[T], g: &[T]) -> Vec<T> {
    let n = a.len();
    let mut out = shared::cpu::zeros::<T>(2 * n);
    let (da, db) = out.split_at_mut(n);
    shared::cpu::for_each_row(da, CHUNK, |i, da| {
        let at = i * CHUNK;
        let (a, b, g) = (&a[at..], &b[at..], &g[at..]);
        for (((d, &x), &y), &gi) in da.iter_mut().zip(a).zip(b).zip(g) {
            let (x, s) = (A::of(x), sigmoid(A::of(x)));
            *d = (A::of(gi) * A::of(y) * s * (A::one() + x * (A::one() - s))).to();
        }
    });
    shared::cpu::for_each_row(db, CHUNK, |i, db| {
        let at = i * CHUNK;
        for ((d, &x), &gi) in db.iter_mut().zip(&a[at..]).zip(&g[at..]) {
            let x = A::of(x);
            *d = (A::of(gi) * x * sigmoid(x)).to();
        }
    });
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
            ($t:ty, $a:ty) => {
                <$t>::to_cpu_storage_owned(cpu_forward::<$t, $a>(
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
            ($t:ty, $a:ty) => {
                <$t>::to_cpu_storage_owned(cpu_backward::<$t, $a>(
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
    use candle_core::CudaStorage;
    use shared::cuda::{launch_elementwise, PtxModule};

    const SWIGLU: PtxModule = PtxModule {
        name: "t0806_swiglu",
        ptx: include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx")),
    };

    /// `h = SiLU(a)·b`: `swiglu_fwd_<dtype>(a, b, h, n)`.
    pub fn forward(
        sa: &CudaStorage,
        la: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
    ) -> Result<CudaStorage> {
        let n = la.shape().elem_count();
        let inputs = [(sa, la, "a"), (sb, lb, "b")];
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                launch_elementwise::<$t>(&SWIGLU, "swiglu_fwd", &inputs, n, n, &[n as i64])
            };
        }
        shared::for_float_dtype!(sa.dtype(), "swiglu gate (cuda)", run, no_f64)
    }

    /// `[da | db]` (`2n` elements): `swiglu_bwd_<dtype>(a, b, g, out, n)`.
    pub fn backward(
        sa: &CudaStorage,
        la: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
        sg: &CudaStorage,
        lg: &Layout,
    ) -> Result<CudaStorage> {
        let n = la.shape().elem_count();
        let inputs = [(sa, la, "a"), (sb, lb, "b"), (sg, lg, "gradient")];
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                launch_elementwise::<$t>(&SWIGLU, "swiglu_bwd", &inputs, 2 * n, n, &[n as i64])
            };
        }
        shared::for_float_dtype!(sa.dtype(), "swiglu gate backward (cuda)", run, no_f64)
    }
}

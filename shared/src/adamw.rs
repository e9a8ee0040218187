//! # AdamW's update as in-place ops
//!
//! Written with tensor ops, one AdamW step is a dozen element-wise passes per parameter tensor
//! (scale m, scale g, add, square g, scale, add, divide twice, square root, add ε, divide,
//! scale θ, subtract), each allocating its result. Here the same arithmetic is three in-place
//! passes (Candle `InplaceOp`s: the moments, then the parameter), reading each tensor once and
//! writing it once:
//!
//! ```text
//! m ← β₁·m + (1 − β₁)·(s·g)            v ← β₂·v + (1 − β₂)·(s·g)²
//! θ ← θ·(1 − lr·λ) − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
//! ```
//!
//! where `s` is the gradient-clipping factor `min(1, max_norm/‖g‖)`, folded in here so the
//! gradients need not be rescaled first. On the CPU, loops; on CUDA, `kernels/adamw.cu`.
//! Arithmetic in f32 (f64 for f64 parameters), each stored value rounded once.

use crate::custom_op::contiguous_range;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor, WithDType};
use half::{bf16, f16};

/// `m ← β·m + (1 − β)·(s·g)`, or with `(s·g)²` when `square`: a moment, updated in place.
pub fn update_moment(m: &Tensor, g: &Tensor, beta: f64, scale: f64, square: bool) -> Result<()> {
    check(m, g, "moment")?;
    m.inplace_op2(
        &g.contiguous()?,
        &Moment {
            beta,
            scale,
            square,
        },
    )
}

/// `θ ← θ·(1 − lr·λ) − lr·(m/c₁)/(√(v/c₂) + ε)` in place (`c₁, c₂` the bias corrections).
#[allow(clippy::too_many_arguments)]
pub fn update_parameter(
    theta: &Tensor,
    m: &Tensor,
    v: &Tensor,
    lr: f64,
    weight_decay: f64,
    eps: f64,
    bias_correction1: f64,
    bias_correction2: f64,
) -> Result<()> {
    check(theta, m, "parameter")?;
    check(theta, v, "parameter")?;
    let op = Update {
        lr,
        decay: weight_decay,
        eps,
        bc1: bias_correction1,
        bc2: bias_correction2,
    };
    theta.inplace_op3(m, v, &op)
}

/// `Σ x²` over every element of `x`, as a one-element f32 tensor (one pass, f32 accumulation; the
/// CPU sums in f64): the per-tensor part of the global gradient norm.
pub fn sum_of_squares(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&SumOfSquares)
}

#[derive(Debug, Clone, Copy)]
struct SumOfSquares;

impl candle_core::CustomOp1 for SumOfSquares {
    fn name(&self) -> &'static str {
        "sum-of-squares"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, candle_core::Shape)> {
        let (a, b) = contiguous_range(l, "sum of squares: input")?;
        fn sum<T: WithDType>(v: &[T]) -> f32 {
            v.iter().map(|x| x.to_f64() * x.to_f64()).sum::<f64>() as f32
        }
        let total = match s {
            CpuStorage::F32(v) => sum(&v[a..b]),
            CpuStorage::F64(v) => sum(&v[a..b]),
            CpuStorage::BF16(v) => sum(&v[a..b]),
            CpuStorage::F16(v) => sum(&v[a..b]),
            other => bail!("sum of squares: dtype {:?} not supported", other.dtype()),
        };
        Ok((CpuStorage::F32(vec![total]), candle_core::Shape::from(1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        Ok((cuda::sum_of_squares(s, l)?, candle_core::Shape::from(1)))
    }
}

fn check(dst: &Tensor, src: &Tensor, what: &str) -> Result<()> {
    if dst.dims() != src.dims() || dst.dtype() != src.dtype() {
        bail!(
            "AdamW {what} update: {:?} {:?} vs {:?} {:?} must match",
            dst.dims(),
            dst.dtype(),
            src.dims(),
            src.dtype()
        );
    }
    if !dst.is_contiguous() {
        bail!("AdamW {what} update: the updated tensor must be contiguous");
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Moment {
    beta: f64,
    scale: f64,
    square: bool,
}

#[derive(Debug, Clone, Copy)]
struct Update {
    lr: f64,
    decay: f64,
    eps: f64,
    bc1: f64,
    bc2: f64,
}

/// `f(x)` in `A` arithmetic (f32, or f64 for f64 tensors), rounded once to `T`.
fn cpu_moment<T: WithDType>(m: &mut [T], g: &[T], op: Moment, f32_math: bool) {
    let round = |x: f64| if f32_math { x as f32 as f64 } else { x };
    for (mi, gi) in m.iter_mut().zip(g) {
        let mut x = round(op.scale * gi.to_f64());
        if op.square {
            x = round(x * x);
        }
        *mi = T::from_f64(op.beta * mi.to_f64() + (1.0 - op.beta) * x);
    }
}

fn cpu_update<T: WithDType>(theta: &mut [T], m: &[T], v: &[T], op: Update) {
    for ((t, mi), vi) in theta.iter_mut().zip(m).zip(v) {
        let step = (mi.to_f64() / op.bc1) / ((vi.to_f64() / op.bc2).sqrt() + op.eps);
        *t = T::from_f64(t.to_f64() * (1.0 - op.lr * op.decay) - op.lr * step);
    }
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let (a, b) = contiguous_range(dst_l, "AdamW: moment")?;
        let (c, d) = contiguous_range(gl, "AdamW: gradient")?;
        match (dst, g) {
            (CpuStorage::F32(m), CpuStorage::F32(g)) => {
                cpu_moment(&mut m[a..b], &g[c..d], *self, true)
            }
            (CpuStorage::F64(m), CpuStorage::F64(g)) => {
                cpu_moment(&mut m[a..b], &g[c..d], *self, false)
            }
            (CpuStorage::BF16(m), CpuStorage::BF16(g)) => {
                cpu_moment::<bf16>(&mut m[a..b], &g[c..d], *self, true)
            }
            (CpuStorage::F16(m), CpuStorage::F16(g)) => {
                cpu_moment::<f16>(&mut m[a..b], &g[c..d], *self, true)
            }
            (m, g) => bail!(
                "AdamW moment: dtypes {:?} and {:?} not supported",
                m.dtype(),
                g.dtype()
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        cuda::moment(dst, dst_l, g, gl, *self)
    }
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let (a, b) = contiguous_range(dst_l, "AdamW: parameter")?;
        let (c, d) = contiguous_range(ml, "AdamW: first moment")?;
        let (e, f) = contiguous_range(vl, "AdamW: second moment")?;
        match (dst, m, v) {
            (CpuStorage::F32(t), CpuStorage::F32(m), CpuStorage::F32(v)) => {
                cpu_update(&mut t[a..b], &m[c..d], &v[e..f], *self)
            }
            (CpuStorage::F64(t), CpuStorage::F64(m), CpuStorage::F64(v)) => {
                cpu_update(&mut t[a..b], &m[c..d], &v[e..f], *self)
            }
            (CpuStorage::BF16(t), CpuStorage::BF16(m), CpuStorage::BF16(v)) => {
                cpu_update(&mut t[a..b], &m[c..d], &v[e..f], *self)
            }
            (CpuStorage::F16(t), CpuStorage::F16(m), CpuStorage::F16(v)) => {
                cpu_update(&mut t[a..b], &m[c..d], &v[e..f], *self)
            }
            (t, _, _) => bail!("AdamW update: dtype {:?} not supported", t.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        m: &candle_core::CudaStorage,
        ml: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<()> {
        cuda::update(dst, dst_l, m, ml, v, vl, *self)
    }
}

/// Launching `kernels/adamw.cu`.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{contiguous_view, load_kernel};
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));
    const MODULE: &str = "shared_adamw";
    use crate::cuda::grid_stride as config;

    pub fn moment(
        dst: &mut CudaStorage,
        dst_l: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        op: Moment,
    ) -> Result<()> {
        match dst.dtype() {
            DType::F32 => moment_t::<f32, f32>(dst, dst_l, g, gl, op, "f32"),
            DType::F64 => moment_t::<f64, f64>(dst, dst_l, g, gl, op, "f64"),
            DType::BF16 => moment_t::<bf16, f32>(dst, dst_l, g, gl, op, "bf16"),
            DType::F16 => moment_t::<f16, f32>(dst, dst_l, g, gl, op, "f16"),
            dt => bail!("AdamW moment (cuda): dtype {dt:?} not supported"),
        }
    }

    /// Scalars travel as the kernel's accumulator type `A`.
    trait Scalar: DeviceRepr + Copy {
        fn of(x: f64) -> Self;
    }
    impl Scalar for f32 {
        fn of(x: f64) -> Self {
            x as f32
        }
    }
    impl Scalar for f64 {
        fn of(x: f64) -> Self {
            x
        }
    }

    fn moment_t<T: CudaDType + DeviceRepr, A: Scalar>(
        dst: &mut CudaStorage,
        dst_l: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        op: Moment,
        name: &str,
    ) -> Result<()> {
        let dev = dst.device().clone();
        let (gv, _) = contiguous_view::<T>(g, gl, "AdamW (cuda): gradient")?;
        let (a, b) = contiguous_range(dst_l, "AdamW: moment")?;
        let mut m = dst.as_cuda_slice_mut::<T>()?.slice_mut(a..b);
        let n = b - a;
        if n == 0 {
            return Ok(());
        }
        let func = load_kernel(&dev, MODULE, PTX, &format!("adamw_moment_{name}"), 0)?;
        let (n_i, beta, scale, square) =
            (n as i64, A::of(op.beta), A::of(op.scale), op.square as i32);
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder
            .arg(&mut m)
            .arg(&gv)
            .arg(&n_i)
            .arg(&beta)
            .arg(&scale)
            .arg(&square);
        // SAFETY: argument types match the kernel; both buffers hold n elements.
        unsafe { builder.launch(config(n)) }.w()?;
        Ok(())
    }

    pub fn sum_of_squares(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
        let dev = s.device().clone();
        let mut out = dev.alloc_zeros::<f32>(1)?;
        let (a, b) = contiguous_range(l, "sum of squares: input")?;
        let n = b - a;
        if n > 0 {
            use DType::*;
            let name =
                crate::cuda::dtype_suffix(s.dtype(), &[F32, F64, BF16, F16], "sum of squares")?;
            let func = load_kernel(&dev, MODULE, PTX, &format!("sum_of_squares_{name}"), 0)?;
            // A few blocks per multiprocessor: each thread sums many elements before the
            // reductions, and each block ends in one atomic add.
            let mut cfg = config(n);
            cfg.grid_dim.0 = cfg.grid_dim.0.min(132 * 4);
            let n_i = n as i64;
            let stream = dev.cuda_stream();
            let mut builder = stream.launch_builder(&func);
            macro_rules! arg {
                ($t:ty) => {{
                    let (x, _) = contiguous_view::<$t>(s, l, "sum of squares: input")?;
                    builder.arg(&x).arg(&mut out).arg(&n_i);
                    // SAFETY: argument types match the kernel; out holds one float.
                    unsafe { builder.launch(cfg) }.w()?;
                }};
            }
            match s.dtype() {
                F32 => arg!(f32),
                F64 => arg!(f64),
                BF16 => arg!(bf16),
                F16 => arg!(f16),
                _ => unreachable!("dtype_suffix accepted it"),
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    pub fn update(
        dst: &mut CudaStorage,
        dst_l: &Layout,
        m: &CudaStorage,
        ml: &Layout,
        v: &CudaStorage,
        vl: &Layout,
        op: Update,
    ) -> Result<()> {
        match dst.dtype() {
            DType::F32 => update_t::<f32, f32>(dst, dst_l, m, ml, v, vl, op, "f32"),
            DType::F64 => update_t::<f64, f64>(dst, dst_l, m, ml, v, vl, op, "f64"),
            DType::BF16 => update_t::<bf16, f32>(dst, dst_l, m, ml, v, vl, op, "bf16"),
            DType::F16 => update_t::<f16, f32>(dst, dst_l, m, ml, v, vl, op, "f16"),
            dt => bail!("AdamW update (cuda): dtype {dt:?} not supported"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn update_t<T: CudaDType + DeviceRepr, A: Scalar>(
        dst: &mut CudaStorage,
        dst_l: &Layout,
        m: &CudaStorage,
        ml: &Layout,
        v: &CudaStorage,
        vl: &Layout,
        op: Update,
        name: &str,
    ) -> Result<()> {
        let dev = dst.device().clone();
        let (mv, _) = contiguous_view::<T>(m, ml, "AdamW (cuda): first moment")?;
        let (vv, _) = contiguous_view::<T>(v, vl, "AdamW (cuda): second moment")?;
        let (a, b) = contiguous_range(dst_l, "AdamW: parameter")?;
        let mut theta = dst.as_cuda_slice_mut::<T>()?.slice_mut(a..b);
        let n = b - a;
        if n == 0 {
            return Ok(());
        }
        let func = load_kernel(&dev, MODULE, PTX, &format!("adamw_update_{name}"), 0)?;
        let n_i = n as i64;
        let [lr, decay, eps, bc1, bc2] = [op.lr, op.decay, op.eps, op.bc1, op.bc2].map(A::of);
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder
            .arg(&mut theta)
            .arg(&mv)
            .arg(&vv)
            .arg(&n_i)
            .arg(&lr)
            .arg(&decay)
            .arg(&eps)
            .arg(&bc1)
            .arg(&bc2);
        // SAFETY: argument types match the kernel; all buffers hold n elements.
        unsafe { builder.launch(config(n)) }.w()?;
        Ok(())
    }
}

//! # Fused RoPE: one pass instead of a dozen
//!
//! [`crate::apply_rope`] is the lesson's code: split the pairs with `narrow` (strided views),
//! four broadcast multiplications, a subtraction, an addition and a `stack` to interleave the
//! result, and as many nodes again in the backward pass. Every one is a full pass over the
//! `(batch, heads, seq, d_head)` activation, and the strided ones are slow on the GPU.
//! [`apply_rope_fused`] computes the same rotation as one Candle custom op: each pair is read
//! once and written once. Its backward is the same op rotating the other way, because the
//! gradient of a rotation is its transpose, the inverse rotation: `R_mᵀ = R_{−m}`, i.e. `sin → −sin`.
//!
//! On the CPU it is a loop (f32 arithmetic; f64 stays f64); on CUDA it launches
//! `kernels/rope.cu` (`cuda` feature only).

use crate::RopeTables;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use shared::cpu::{for_each_row, Element, Real};
use shared::custom_op::contiguous_slice;

/// RoPE of `x (batch, heads, seq, d_head)` at positions `start_pos …`, as one op: the same values
/// as [`crate::apply_rope`] (to rounding), differentiable in `x`.
pub fn apply_rope_fused(x: &Tensor, tables: &RopeTables, start_pos: usize) -> Result<Tensor> {
    let (_, _, t, _) = crate::check_input(x, tables)?;
    let (cos, sin) = tables.rows(start_pos, t, DType::F32)?; // (seq, d/2)
    apply_rope_fused_rows(x, &cos, &sin)
}

/// [`apply_rope_fused`] with the `f32` table rows `cos, sin (seq, d_head/2)` given.
pub fn apply_rope_fused_rows(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        FusedRope { inverse: false },
    )
}

/// `(x, cos, sin) → y`: rotate every pair by `+mθ` (or by `−mθ` when `inverse`).
#[derive(Debug, Clone, Copy)]
struct FusedRope {
    inverse: bool,
}

/// `(seq, d/2)` of the tables, checked against `x`'s `(…, seq, d)`.
fn dims(lx: &Layout, lc: &Layout) -> Result<(usize, usize)> {
    let (seq, half) = lc.shape().dims2()?;
    let xd = lx.dims();
    if xd.len() != 4 || xd[2] != seq || xd[3] != 2 * half {
        bail!(
            "fused RoPE: x {xd:?} must be (batch, heads, {seq}, {}) for tables of ({seq}, {half})",
            2 * half
        );
    }
    Ok((seq, half))
}

/// `(x₂ₖ, x₂ₖ₊₁) → (x₂ₖ·cos − x₂ₖ₊₁·sin, x₂ₖ·sin + x₂ₖ₊₁·cos)` at each row's position, in f32
/// (f64 for f64 tensors), rows of `(batch·heads·seq)` over the cores.
fn cpu_rope<T: Element, A: Real>(
    x: &[T],
    cos: &[f32],
    sin: &[f32],
    seq: usize,
    half: usize,
    sign: f64,
) -> Vec<T> {
    let mut y = shared::cpu::zeros::<T>(x.len());
    let d = 2 * half;
    let sign = A::from_f64(sign);
    for_each_row(&mut y, d, |row, out| {
        let pos = row % seq;
        let (cos, sin) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
        let xr = &x[row * d..][..d];
        for (((o, p), &c), &s) in out
            .chunks_exact_mut(2)
            .zip(xr.chunks_exact(2))
            .zip(cos)
            .zip(sin)
        {
            let (c, s) = (A::from_f64(c as f64), sign * A::from_f64(s as f64));
            let (re, im) = (A::of(p[0]), A::of(p[1]));
            o[0] = (re * c - im * s).to();
            o[1] = (re * s + im * c).to();
        }
    });
    y
}

impl CustomOp3 for FusedRope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sc: &CpuStorage,
        lc: &Layout,
        ss: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (seq, half) = dims(lx, lc)?;
        let cos = contiguous_slice(sc.as_slice::<f32>()?, lc, "fused RoPE: cos")?;
        let sin = contiguous_slice(ss.as_slice::<f32>()?, ls, "fused RoPE: sin")?;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        macro_rules! run {
            ($t:ty, $a:ty) => {
                <$t>::to_cpu_storage_owned(cpu_rope::<$t, $a>(
                    contiguous_slice(sx.as_slice::<$t>()?, lx, "fused RoPE: x")?,
                    cos,
                    sin,
                    seq,
                    half,
                    sign,
                ))
            };
        }
        let y = shared::for_float_dtype!(sx.dtype(), "fused RoPE", run);
        Ok((y, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sc: &candle_core::CudaStorage,
        lc: &Layout,
        ss: &candle_core::CudaStorage,
        ls: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (seq, half) = dims(lx, lc)?;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let y = cuda::rope(sx, lx, sc, lc, ss, ls, seq, half, sign)?;
        Ok((y, lx.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = FusedRope {
            inverse: !self.inverse,
        };
        let dx = dy.contiguous()?.apply_op3_no_bwd(cos, sin, &back)?;
        Ok((Some(dx), None, None))
    }
}

/// Launching `kernels/rope.cu`.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::CudaStorage;
    use shared::cuda::{contiguous_view, load_kernel};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rope.ptx"));
    const MODULE: &str = "t0808_rope";

    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        sx: &CudaStorage,
        lx: &Layout,
        sc: &CudaStorage,
        lc: &Layout,
        ss: &CudaStorage,
        ls: &Layout,
        seq: usize,
        half: usize,
        sign: f32,
    ) -> Result<CudaStorage> {
        let name = shared::cuda::dtype_suffix(
            sx.dtype(),
            &[DType::F32, DType::BF16, DType::F16],
            "fused RoPE",
        )?;
        macro_rules! launch {
            ($t:ty, $_a:ty) => {
                run::<$t>(sx, lx, sc, lc, ss, ls, seq, half, sign, name)
            };
        }
        shared::for_float_dtype!(sx.dtype(), "fused RoPE (cuda)", launch, no_f64)
    }

    #[allow(clippy::too_many_arguments)]
    fn run<T: CudaDType + DeviceRepr>(
        sx: &CudaStorage,
        lx: &Layout,
        sc: &CudaStorage,
        lc: &Layout,
        ss: &CudaStorage,
        ls: &Layout,
        seq: usize,
        half: usize,
        sign: f32,
        name: &str,
    ) -> Result<CudaStorage> {
        let dev = sx.device().clone();
        let (x, _) = contiguous_view::<T>(sx, lx, "fused RoPE (cuda): x")?;
        let (cos, _) = contiguous_view::<f32>(sc, lc, "fused RoPE (cuda): cos")?;
        let (sin, _) = contiguous_view::<f32>(ss, ls, "fused RoPE (cuda): sin")?;
        let n = lx.shape().elem_count();
        // SAFETY: every pair (so every element) is written.
        let mut y = unsafe { dev.alloc::<T>(n)? };
        let pairs = n / 2;
        if pairs > 0 {
            let func = load_kernel(&dev, MODULE, PTX, &format!("rope_{name}"), 0)?;
            let cfg = shared::cuda::grid_stride(pairs);
            let (pairs_i, seq_i, half_i) = (pairs as i64, seq as i64, half as i64);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&x)
                .arg(&cos)
                .arg(&sin)
                .arg(&mut y)
                .arg(&pairs_i)
                .arg(&seq_i)
                .arg(&half_i)
                .arg(&sign);
            // SAFETY: argument types match the kernel; y holds n elements.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }
}

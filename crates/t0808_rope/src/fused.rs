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
        FusedRope {
            inverse: false,
            at: None,
        },
    )
}

/// RoPE of `x (batch, heads, seq, d_head)` at positions `pos, pos + 1, …`, `pos` being a `(1,)`
/// `u32` tensor on the device that the kernel reads (8-10's captured decode step): one op over the
/// whole tables, no gather of rows. The positions must lie inside the tables, which only the
/// caller can check on the host (the static cache's capacity, at most the model's context, for
/// which the model builds its tables). The op reads `pos` when it runs, its backward too: a
/// backward after the cache has advanced `pos` would rotate at the new position (nothing trains
/// through the static cache).
pub fn apply_rope_fused_at(x: &Tensor, tables: &RopeTables, pos: &Tensor) -> Result<Tensor> {
    crate::check_input(x, tables)?;
    crate::check_device_position(pos)?;
    x.contiguous()?.apply_op3(
        &tables.cos.contiguous()?,
        &tables.sin.contiguous()?,
        FusedRope {
            inverse: false,
            at: Some(pos.clone()),
        },
    )
}

/// `(x, cos, sin) → y`: rotate every pair by `+mθ` (or by `−mθ` when `inverse`); `m` counts from
/// 0 with table rows per position, or, with `at`, from the device position it holds over the
/// whole tables.
#[derive(Debug, Clone)]
struct FusedRope {
    inverse: bool,
    at: Option<Tensor>,
}

impl FusedRope {
    /// `(seq, d/2)`: `x`'s `(…, seq, d)` checked against the tables, whose rows are the
    /// sequence's positions (without `at`) or all positions (with it).
    fn dims(&self, lx: &Layout, lc: &Layout) -> Result<(usize, usize)> {
        let (rows, half) = lc.shape().dims2()?;
        let xd = lx.dims();
        let seq = if self.at.is_some() {
            xd.get(2).copied().unwrap_or(0)
        } else {
            rows
        };
        if xd.len() != 4 || xd[2] != seq || xd[3] != 2 * half || seq > rows {
            bail!(
                "fused RoPE: x {xd:?} must be (batch, heads, {seq}, {}) for tables of ({rows}, {half})",
                2 * half
            );
        }
        Ok((seq, half))
    }

    /// The first position on the CPU: 0, or the device position read back.
    fn cpu_start(&self, rows: usize, seq: usize) -> Result<usize> {
        let Some(at) = &self.at else { return Ok(0) };
        let start = at.to_vec1::<u32>()?[0] as usize;
        if start + seq > rows {
            bail!(
                "fused RoPE: positions {start}..{} exceed the tables' {rows}",
                start + seq
            );
        }
        Ok(start)
    }
}

/// `(x₂ₖ, x₂ₖ₊₁) → (x₂ₖ·cos − x₂ₖ₊₁·sin, x₂ₖ·sin + x₂ₖ₊₁·cos)` at each row's position, in f32
/// (f64 for f64 tensors), rows of `(batch·heads·seq)` over the cores.
fn cpu_rope<T: Element, A: Real>(
    x: &[T],
    cos: &[f32],
    sin: &[f32],
    (start, seq, half): (usize, usize, usize),
    sign: f64,
) -> Vec<T> {
    let mut y = shared::cpu::zeros::<T>(x.len());
    let d = 2 * half;
    let sign = A::from_f64(sign);
    for_each_row(&mut y, d, |row, out| {
        let pos = start + row % seq;
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
        let (seq, half) = self.dims(lx, lc)?;
        let start = self.cpu_start(lc.dims()[0], seq)?;
        let cos = contiguous_slice(sc.as_slice::<f32>()?, lc, "fused RoPE: cos")?;
        let sin = contiguous_slice(ss.as_slice::<f32>()?, ls, "fused RoPE: sin")?;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        macro_rules! run {
            ($t:ty, $a:ty) => {
                <$t>::to_cpu_storage_owned(cpu_rope::<$t, $a>(
                    contiguous_slice(sx.as_slice::<$t>()?, lx, "fused RoPE: x")?,
                    cos,
                    sin,
                    (start, seq, half),
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
        let (seq, half) = self.dims(lx, lc)?;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let y = cuda::rope(sx, lx, sc, lc, ss, ls, seq, half, sign, self.at.as_ref())?;
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
            at: self.at.clone(),
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
        at: Option<&Tensor>,
    ) -> Result<CudaStorage> {
        let name = shared::cuda::dtype_suffix(
            sx.dtype(),
            &[DType::F32, DType::BF16, DType::F16],
            "fused RoPE",
        )?;
        macro_rules! launch {
            ($t:ty, $_a:ty) => {
                run::<$t>(sx, lx, sc, lc, ss, ls, seq, half, sign, at, name)
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
        at: Option<&Tensor>,
        name: &str,
    ) -> Result<CudaStorage> {
        let dev = sx.device().clone();
        // The device position's storage, held for the launch (a null pointer without one).
        let at = at.map(|t| t.storage_and_layout());
        let start = match &at {
            Some((storage, layout)) => match &**storage {
                candle_core::Storage::Cuda(s) => {
                    Some(contiguous_view::<u32>(s, layout, "fused RoPE (cuda): position")?.0)
                }
                _ => bail!("fused RoPE (cuda): the device position is not on the GPU"),
            },
            None => None,
        };
        let null = 0u64;
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
            match &start {
                Some(view) => b.arg(view),
                None => b.arg(&null),
            };
            // SAFETY: argument types match the kernel; y holds n elements.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }
}

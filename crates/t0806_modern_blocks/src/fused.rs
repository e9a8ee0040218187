//! # Fused RMSNorm: one op instead of six
//!
//! The composed [`crate::RmsNorm`] is six tensor ops (`to_dtype`, `sqr`, `mean`, `+ε`, `sqrt`,
//! `div`, `mul`, `to_dtype`): each reads and writes the whole `(rows, d)` activation, and the
//! backward of each writes another one. RMSNorm is memory-bound (a handful of flops per element),
//! so its time is the number of full passes over memory. Fused, the forward reads `x` (twice,
//! the second time from cache) and writes `y` once:
//!
//! ```text
//! forward   y  = x · r ⊙ g,                 r = 1/√(mean(x²) + ε)        per row
//! backward  dx = r·(dy ⊙ g) − x · r³ · mean(dy ⊙ g ⊙ x)
//!           dg = Σ_rows dy ⊙ x · r
//! ```
//!
//! (derivation: `∂r/∂xᵢ = −r³·xᵢ/d`, so `dxᵢ = r·dyᵢ·gᵢ + Σⱼ dyⱼ·gⱼ·xⱼ·∂r/∂xᵢ`). The backward
//! recomputes `r` from `x` — it reads the row anyway for `mean(dy ⊙ g ⊙ x)` — so the forward
//! saves nothing for it.
//!
//! Two Candle custom ops carry it:
//! - [`FusedRmsNorm`], a `CustomOp2` on `(x, g) → y` whose `bwd` calls
//! - [`FusedRmsNormBackward`], a `CustomOp3` on `(x, g, dy)` returning one flat tensor
//!   `[dx | dg]` (a custom op has one output; the two gradients are views into it).
//!
//! On the CPU both are plain Rust loops over rows (fp32 accumulation; f64 stays f64); on CUDA
//! they launch `kernels/rmsnorm.cu` (one warp per row, see [`crate::cuda`], `cuda` feature only).
//! Same contract as the composed version: every sum in fp32, the result rounded once to the
//! input's dtype.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use half::{bf16, f16};
use shared::cpu::{for_each_row, for_each_row_costing, sum_by, Element, Real};
use shared::custom_op::contiguous_slice;

/// `RMSNorm(x)·g` as one op. `x (…, d)`, `g (d,)`; returns `(…, d)` in `x`'s dtype.
/// Differentiable in `x` and `g` (through [`FusedRmsNormBackward`]).
pub fn rms_norm_fused(x: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    check_args(x, g, eps, "rms_norm_fused")?;
    x.contiguous()?
        .apply_op2(&g.to_dtype(x.dtype())?.contiguous()?, FusedRmsNorm { eps })
}

/// The gradients `(dx (…, d), dg (d,))` of `Σ dy ⊙ RMSNorm(x)·g`, in `x`'s dtype.
pub fn rms_norm_fused_backward(
    x: &Tensor,
    g: &Tensor,
    dy: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    check_args(x, g, eps, "rms_norm_fused_backward")?;
    let (dx, mut params) = packed_backward(
        x,
        g,
        dy,
        &FusedRmsNormBackward { eps },
        1,
        "rms_norm_fused_backward",
    )?; // [dx | dg]
    Ok((dx, params.remove(0)))
}

/// Runs a fused norm's backward op on `(x, g, dy)` after checking `dy` against `x`, and splits its
/// packed output `[dx | p₁ | … | pₙ]` into `dx` (shaped like `x`) and the `n_params` parameter
/// gradients, each of `g`'s shape and dtype and a compact copy of its own: a parameter's gradient
/// lives until AdamW, and as a view it would keep the whole packed buffer alive with it (as would
/// `Tensor::copy`, which clones a view's whole buffer; `force_contiguous` copies the view's `d`
/// elements).
pub(crate) fn packed_backward(
    x: &Tensor,
    g: &Tensor,
    dy: &Tensor,
    op: &impl CustomOp3,
    n_params: usize,
    what: &str,
) -> Result<(Tensor, Vec<Tensor>)> {
    if dy.dims() != x.dims() || dy.dtype() != x.dtype() {
        bail!(
            "{what}: dy {:?} {:?} must match x {:?} {:?}",
            dy.dims(),
            dy.dtype(),
            x.dims(),
            x.dtype()
        );
    }
    let (d, n) = (g.dim(0)?, x.elem_count());
    let packed = x.contiguous()?.apply_op3_no_bwd(
        &g.to_dtype(x.dtype())?.contiguous()?,
        &dy.contiguous()?,
        op,
    )?;
    let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
    let params = (0..n_params)
        .map(|i| {
            packed
                .narrow(0, n + i * d, d)?
                .to_dtype(g.dtype())?
                .force_contiguous()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((dx, params))
}

fn check_args(x: &Tensor, g: &Tensor, eps: f64, what: &str) -> Result<()> {
    check_gain_and_input(x, g, what)?;
    if !(eps >= 0.0 && eps.is_finite()) {
        bail!("{what}: eps must be finite and ≥ 0, got {eps}");
    }
    Ok(())
}

/// A 1-D gain `g (d,)` and an input `x (…, d)` on its device: the checks every fused norm makes
/// at its public boundary, with messages that name `what` and the shapes.
pub(crate) fn check_gain_and_input(x: &Tensor, g: &Tensor, what: &str) -> Result<()> {
    if g.rank() != 1 {
        bail!("{what}: the gain must be 1-D, got {:?}", g.dims());
    }
    let d = g.dim(0)?;
    if x.rank() == 0 || x.dim(x.rank() - 1)? != d || d == 0 {
        bail!(
            "{what}: x {:?} must end in the gain's width {d} (> 0)",
            x.dims()
        );
    }
    if x.device().location() != g.device().location() {
        bail!(
            "{what}: x is on {:?}, the gain on {:?}",
            x.device().location(),
            g.device().location()
        );
    }
    Ok(())
}

/// RMSNorm forward as a Candle custom op on `(x (…, d), g (d,))`, both contiguous and of one
/// dtype (use [`rms_norm_fused`], which sees to both).
#[derive(Debug, Clone, Copy)]
pub struct FusedRmsNorm {
    pub eps: f64,
}

/// RMSNorm backward as a custom op on `(x (…, d), g (d,), dy (…, d))` → flat `[dx | dg]`
/// (`rows·d + d` elements, in the inputs' dtype). No backward of its own.
#[derive(Debug, Clone, Copy)]
pub struct FusedRmsNormBackward {
    pub eps: f64,
}

/// `(rows, d)` of `x (…, d)` and `g (d,)`, both contiguous.
pub(crate) fn rows_and_width(lx: &Layout, lg: &Layout) -> Result<(usize, usize)> {
    let d = match lg.dims() {
        [d] => *d,
        dims => bail!("fused RMSNorm: the gain must be 1-D, got {dims:?}"),
    };
    if lx.dims().last() != Some(&d) || d == 0 {
        bail!(
            "fused RMSNorm: x {:?} must end in the gain's width {d}",
            lx.dims()
        );
    }
    for (name, l) in [("x", lx), ("gain", lg)] {
        if !l.is_contiguous() {
            bail!("fused RMSNorm: {name} must be contiguous (layout {l:?})");
        }
    }
    Ok((lx.shape().elem_count() / d, d))
}

/// `r = 1/√(Σx²/d + ε)` of one row, in the loop's arithmetic `A` (f32 for f32, bf16 and f16,
/// as the kernel computes; f64 for f64).
fn inv_rms<T: Element, A: Real>(row: &[T], eps: f64) -> A {
    let ss: A = sum_by(row, |v| A::of(v) * A::of(v));
    A::one() / (ss / A::from_f64(row.len() as f64) + A::from_f64(eps)).sqrt()
}

/// Forward on the CPU, rows over the cores: `y = x·r·g`.
pub(crate) fn cpu_forward<T: Element, A: Real>(x: &[T], g: &[T], d: usize, eps: f64) -> Vec<T> {
    let mut y = shared::cpu::zeros::<T>(x.len());
    for_each_row(&mut y, d, |i, out| {
        let row = &x[i * d..(i + 1) * d];
        let r: A = inv_rms(row, eps);
        for ((o, &v), &w) in out.iter_mut().zip(row).zip(g) {
            *o = (A::of(v) * r * A::of(w)).to();
        }
    });
    y
}

/// Backward on the CPU: `[dx | dg]` with `dx = r·dy⊙g − r³·mean(dy⊙g⊙x)·x` (rows over the
/// cores) and `dg = Σ_rows dy⊙x·r` (a second pass, down the rows).
fn cpu_backward<T: Element, A: Real>(x: &[T], g: &[T], dy: &[T], d: usize, eps: f64) -> Vec<T> {
    let rows = x.len() / d;
    let mut r = vec![A::zero(); rows];
    for_each_row_costing(&mut r, 1, d, |i, out| {
        out[0] = inv_rms(&x[i * d..(i + 1) * d], eps)
    });
    let mut out = shared::cpu::zeros::<T>(x.len() + d);
    let (dx, dg) = out.split_at_mut(x.len());
    for_each_row(dx, d, |i, out| {
        let (row, drow, r) = (&x[i * d..(i + 1) * d], &dy[i * d..(i + 1) * d], r[i]);
        let dot: A = dot3(drow, g, row);
        let c = r * r * r * dot / A::from_f64(d as f64);
        for (((o, &v), &w), &e) in out.iter_mut().zip(row).zip(g).zip(drow) {
            *o = (r * A::of(e) * A::of(w) - c * A::of(v)).to();
        }
    });
    let mut dg_acc = vec![A::zero(); d];
    for ((row, drow), &r) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(&r) {
        for ((acc, &v), &e) in dg_acc.iter_mut().zip(row).zip(drow) {
            *acc += A::of(e) * A::of(v) * r;
        }
    }
    for (o, a) in dg.iter_mut().zip(dg_acc) {
        *o = a.to();
    }
    out
}

/// `Σⱼ aⱼ·bⱼ·cⱼ` in eight partial sums (as [`shared::cpu::sum_by`]), three slices of one length.
pub(crate) fn dot3<T: Element, A: Real>(a: &[T], b: &[T], c: &[T]) -> A {
    let mut lanes = [A::zero(); 8];
    let (mut ca, mut cb, mut cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    for ((x, y), z) in (&mut ca).zip(&mut cb).zip(&mut cc) {
        for (((l, &x), &y), &z) in lanes.iter_mut().zip(x).zip(y).zip(z) {
            *l += A::of(x) * A::of(y) * A::of(z);
        }
    }
    let tail = (ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder()))
    .fold(A::zero(), |s, ((&x, &y), &z)| {
        s + A::of(x) * A::of(y) * A::of(z)
    });
    lanes.iter().fold(tail, |s, &l| s + l)
}

impl CustomOp2 for FusedRmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, d) = rows_and_width(l1, l2)?;
        macro_rules! run {
            ($t:ty, $a:ty) => {{
                let x = contiguous_slice(s1.as_slice::<$t>()?, l1, "fused RMSNorm: input")?;
                let g = contiguous_slice(s2.as_slice::<$t>()?, l2, "fused RMSNorm: input")?;
                <$t>::to_cpu_storage_owned(cpu_forward::<$t, $a>(x, g, d, self.eps))
            }};
        }
        let y = match (s1.dtype(), s2.dtype()) {
            (DType::F32, DType::F32) => run!(f32, f32),
            (DType::F64, DType::F64) => run!(f64, f64),
            (DType::BF16, DType::BF16) => run!(bf16, f32),
            (DType::F16, DType::F16) => run!(f16, f32),
            (a, b) => {
                bail!("fused RMSNorm: x {a:?} and gain {b:?} must be one of f32, f64, bf16, f16")
            }
        };
        Ok((y, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, d) = rows_and_width(l1, l2)?;
        let y = crate::cuda::forward(
            crate::cuda::NormKernel::Rms,
            s1,
            l1,
            s2,
            l2,
            None,
            rows,
            d,
            self.eps as f32,
        )?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dg) = rms_norm_fused_backward(x, g, dy, self.eps)?;
        Ok((Some(dx), Some(dg)))
    }
}

impl CustomOp3 for FusedRmsNormBackward {
    fn name(&self) -> &'static str {
        "fused-rms-norm-backward"
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
        let (_, d) = rows_and_width(l1, l2)?;
        if l3.dims() != l1.dims() {
            bail!(
                "fused RMSNorm backward: dy {:?} must match x {:?}",
                l3.dims(),
                l1.dims()
            );
        }
        macro_rules! run {
            ($t:ty, $a:ty) => {{
                let x = contiguous_slice(s1.as_slice::<$t>()?, l1, "fused RMSNorm: input")?;
                let g = contiguous_slice(s2.as_slice::<$t>()?, l2, "fused RMSNorm: input")?;
                let dy = contiguous_slice(s3.as_slice::<$t>()?, l3, "fused RMSNorm: input")?;
                <$t>::to_cpu_storage_owned(cpu_backward::<$t, $a>(x, g, dy, d, self.eps))
            }};
        }
        let packed = shared::for_float_dtype!(s1.dtype(), "fused RMSNorm backward", run);
        Ok((packed, Shape::from(l1.shape().elem_count() + d)))
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
        let (rows, d) = rows_and_width(l1, l2)?;
        if l3.dims() != l1.dims() || !l3.is_contiguous() {
            bail!(
                "fused RMSNorm backward: dy {:?} must match x {:?} and be contiguous",
                l3.dims(),
                l1.dims()
            );
        }
        let packed = crate::cuda::backward(
            crate::cuda::NormKernel::Rms,
            s1,
            l1,
            s2,
            l2,
            s3,
            l3,
            rows,
            d,
            self.eps as f32,
        )?;
        Ok((packed, Shape::from(rows * d + d)))
    }
}

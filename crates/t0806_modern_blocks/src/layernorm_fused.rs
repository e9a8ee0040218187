//! # Fused LayerNorm: 8-04's norm as one op
//!
//! RMSNorm's fusion ([`crate::fused`]) applies to LayerNorm too, with one more reduction (the
//! mean) and a bias. The GPT-2-style rung and 8-05's encoder–decoder use it when the run's
//! [`shared::Kernels`] say `norm: fused`:
//!
//! ```text
//! forward   y  = x̂ ⊙ g + b,            x̂ = (x − μ)·r,   r = 1/√(mean((x − μ)²) + ε)   per row
//! backward  dx = r·(dy⊙g − mean(dy⊙g) − x̂·mean(dy⊙g⊙x̂))
//!           dg = Σ_rows dy ⊙ x̂,         db = Σ_rows dy
//! ```
//!
//! (derivation: `x̂` is RMSNorm of the centred row, and centring subtracts the mean of whatever
//! gradient flows back through it: hence the extra `− mean(dy⊙g)`). As with RMSNorm the backward
//! recomputes `μ` and `r` from `x`, so the forward saves nothing.
//!
//! Two custom ops: [`FusedLayerNorm`] on `(x, g, b) → y`, whose `bwd` calls
//! [`FusedLayerNormBackward`] on `(x, g, dy) → [dx | dg | db]`. CPU loops here (f32 arithmetic for
//! f32, bf16 and f16; f64 stays f64); CUDA `layernorm_*` in `kernels/rmsnorm.cu`.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use shared::cpu::{for_each_row, for_each_row_costing, sum_by, Element, Real};
use shared::custom_op::contiguous_slice;

/// `LayerNorm(x)·g + b` as one op. `x (…, d)`, `g, b (d,)`; returns `(…, d)` in `x`'s dtype.
/// Differentiable in `x`, `g` and `b` (through [`FusedLayerNormBackward`]).
pub fn layer_norm_fused(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    check_args(x, g, eps, "layer_norm_fused")?;
    if b.dims() != g.dims() {
        bail!(
            "layer_norm_fused: bias {:?} must match the gain {:?}",
            b.dims(),
            g.dims()
        );
    }
    let dt = x.dtype();
    x.contiguous()?.apply_op3(
        &g.to_dtype(dt)?.contiguous()?,
        &b.to_dtype(dt)?.contiguous()?,
        FusedLayerNorm { eps },
    )
}

/// The gradients `(dx (…, d), dg (d,), db (d,))` of `Σ dy ⊙ (LayerNorm(x)·g + b)`, in `x`'s dtype.
pub fn layer_norm_fused_backward(
    x: &Tensor,
    g: &Tensor,
    dy: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    check_args(x, g, eps, "layer_norm_fused_backward")?;
    let what = "layer_norm_fused_backward";
    let op = FusedLayerNormBackward { eps };
    let (dx, mut params) = crate::fused::packed_backward(x, g, dy, &op, 2, what)?; // [dx | dg | db]
    let db = params.pop().expect("two parameter gradients");
    let dg = params.pop().expect("two parameter gradients");
    Ok((dx, dg, db))
}

fn check_args(x: &Tensor, g: &Tensor, eps: f64, what: &str) -> Result<()> {
    crate::fused::check_gain_and_input(x, g, what)?;
    if !(eps > 0.0 && eps.is_finite()) {
        bail!("{what}: eps must be finite and > 0 (a constant row has zero variance), got {eps}");
    }
    Ok(())
}

/// LayerNorm forward as a custom op on `(x (…, d), g (d,), b (d,))`, contiguous, one dtype (use
/// [`layer_norm_fused`], which sees to both).
#[derive(Debug, Clone, Copy)]
pub struct FusedLayerNorm {
    pub eps: f64,
}

/// LayerNorm backward as a custom op on `(x (…, d), g (d,), dy (…, d))` → flat `[dx | dg | db]`
/// (`rows·d + 2d` elements, in the inputs' dtype). No backward of its own.
#[derive(Debug, Clone, Copy)]
pub struct FusedLayerNormBackward {
    pub eps: f64,
}

/// `(μ, r)` of one row in the loop's arithmetic `A`: the two-pass mean and variance.
fn mean_rstd<T: Element, A: Real>(row: &[T], eps: f64) -> (A, A) {
    let d = A::from_f64(row.len() as f64);
    let mean = sum_by(row, |v| A::of(v)) / d;
    let var: A = sum_by(row, |v| (A::of(v) - mean) * (A::of(v) - mean)) / d;
    (mean, A::one() / (var + A::from_f64(eps)).sqrt())
}

/// Forward on the CPU, rows over the cores.
fn cpu_forward<T: Element, A: Real>(x: &[T], g: &[T], b: &[T], d: usize, eps: f64) -> Vec<T> {
    let mut y = shared::cpu::zeros::<T>(x.len());
    for_each_row(&mut y, d, |i, out| {
        let row = &x[i * d..(i + 1) * d];
        let (mean, r): (A, A) = mean_rstd(row, eps);
        for (((o, &v), &w), &c) in out.iter_mut().zip(row).zip(g).zip(b) {
            *o = ((A::of(v) - mean) * r * A::of(w) + A::of(c)).to();
        }
    });
    y
}

/// Backward on the CPU: `dx` rows over the cores, then `dg`, `db` down the rows.
fn cpu_backward<T: Element, A: Real>(x: &[T], g: &[T], dy: &[T], d: usize, eps: f64) -> Vec<T> {
    let rows = x.len() / d;
    let mut stats = vec![A::zero(); 2 * rows];
    for_each_row_costing(&mut stats, 2, 2 * d, |i, out| {
        let (mean, r) = mean_rstd::<T, A>(&x[i * d..(i + 1) * d], eps);
        out.copy_from_slice(&[mean, r]);
    });
    let df = A::from_f64(d as f64);
    let mut out = shared::cpu::zeros::<T>(x.len() + 2 * d);
    let (dx, params) = out.split_at_mut(x.len());
    for_each_row(dx, d, |i, out| {
        let (row, drow) = (&x[i * d..(i + 1) * d], &dy[i * d..(i + 1) * d]);
        let (mean, r) = (stats[2 * i], stats[2 * i + 1]);
        let (mut m1, mut m2) = (A::zero(), A::zero());
        for ((&v, &w), &e) in row.iter().zip(g).zip(drow) {
            let eg = A::of(e) * A::of(w);
            m1 += eg;
            m2 += eg * (A::of(v) - mean) * r;
        }
        let (m1, m2) = (m1 / df, m2 / df);
        for (((o, &v), &w), &e) in out.iter_mut().zip(row).zip(g).zip(drow) {
            let xh = (A::of(v) - mean) * r;
            *o = (r * (A::of(e) * A::of(w) - m1 - xh * m2)).to();
        }
    });
    let (mut dg, mut db) = (vec![A::zero(); d], vec![A::zero(); d]);
    for (i, (row, drow)) in x.chunks_exact(d).zip(dy.chunks_exact(d)).enumerate() {
        let (mean, r) = (stats[2 * i], stats[2 * i + 1]);
        for (((sg, sb), &v), &e) in dg.iter_mut().zip(db.iter_mut()).zip(row).zip(drow) {
            *sg += A::of(e) * (A::of(v) - mean) * r;
            *sb += A::of(e);
        }
    }
    for (o, a) in params.iter_mut().zip(dg.into_iter().chain(db)) {
        *o = a.to();
    }
    out
}

/// The third operand of the two ops: the forward's bias (shaped like the gain) or the backward's
/// `dy` (shaped like `x`).
#[derive(Clone, Copy)]
enum Third {
    Bias,
    Dy,
}

/// `(rows, d)` of `x (…, d)` with a gain `(d,)` and the third operand, all contiguous.
fn rows_and_width(lx: &Layout, lg: &Layout, l3: &Layout, third: Third) -> Result<(usize, usize)> {
    let (rows, d) = crate::fused::rows_and_width(lx, lg)?;
    let (name, expected) = match third {
        Third::Bias => ("bias", lg.dims()),
        Third::Dy => ("dy", lx.dims()),
    };
    if l3.dims() != expected || !l3.is_contiguous() {
        bail!(
            "fused LayerNorm: {name} {:?} must be {expected:?} and contiguous",
            l3.dims()
        );
    }
    Ok((rows, d))
}

impl CustomOp3 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let (_, d) = rows_and_width(l1, l2, l3, Third::Bias)?;
        macro_rules! run {
            ($t:ty, $a:ty) => {{
                let what = "fused LayerNorm: input";
                let x = contiguous_slice(s1.as_slice::<$t>()?, l1, what)?;
                let g = contiguous_slice(s2.as_slice::<$t>()?, l2, what)?;
                let b = contiguous_slice(s3.as_slice::<$t>()?, l3, what)?;
                <$t>::to_cpu_storage_owned(cpu_forward::<$t, $a>(x, g, b, d, self.eps))
            }};
        }
        if s2.dtype() != s1.dtype() || s3.dtype() != s1.dtype() {
            bail!(
                "fused LayerNorm: x {:?}, gain {:?} and bias {:?} must share a dtype",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            );
        }
        let y = shared::for_float_dtype!(s1.dtype(), "fused LayerNorm", run);
        Ok((y, l1.shape().clone()))
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
        let (rows, d) = rows_and_width(l1, l2, l3, Third::Bias)?;
        let y = crate::cuda::forward(
            crate::cuda::NormKernel::Layer,
            s1,
            l1,
            s2,
            l2,
            Some((s3, l3)),
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
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dg, db) = layer_norm_fused_backward(x, g, dy, self.eps)?;
        Ok((Some(dx), Some(dg), Some(db)))
    }
}

impl CustomOp3 for FusedLayerNormBackward {
    fn name(&self) -> &'static str {
        "fused-layer-norm-backward"
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
        let (_, d) = rows_and_width(l1, l2, l3, Third::Dy)?;
        if s2.dtype() != s1.dtype() || s3.dtype() != s1.dtype() {
            bail!(
                "fused LayerNorm backward: x {:?}, gain {:?} and dy {:?} must share a dtype",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            );
        }
        macro_rules! run {
            ($t:ty, $a:ty) => {{
                let what = "fused LayerNorm backward: input";
                let x = contiguous_slice(s1.as_slice::<$t>()?, l1, what)?;
                let g = contiguous_slice(s2.as_slice::<$t>()?, l2, what)?;
                let dy = contiguous_slice(s3.as_slice::<$t>()?, l3, what)?;
                <$t>::to_cpu_storage_owned(cpu_backward::<$t, $a>(x, g, dy, d, self.eps))
            }};
        }
        let packed = shared::for_float_dtype!(s1.dtype(), "fused LayerNorm backward", run);
        Ok((packed, Shape::from(l1.shape().elem_count() + 2 * d)))
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
        let (rows, d) = rows_and_width(l1, l2, l3, Third::Dy)?;
        let packed = crate::cuda::backward(
            crate::cuda::NormKernel::Layer,
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
        Ok((packed, Shape::from(rows * d + 2 * d)))
    }
}

/// 8-04's [`t0804_transformer_block::LayerNorm`] computed by [`layer_norm_fused`]: the same
/// parameters (`weight`, `bias`) and values.
#[derive(Debug, Clone)]
pub struct FusedLayerNormLayer {
    pub norm: t0804_transformer_block::LayerNorm,
}

impl t0804_transformer_block::Layer for FusedLayerNormLayer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = &self.norm;
        shared::params::expect_last_dim(x, n.gain.dims()[0], "LayerNorm input")?;
        layer_norm_fused(x, &n.gain, &n.bias, n.eps)
    }
}

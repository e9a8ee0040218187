//! # GELU, GPT-2's tanh approximation, as one op
//!
//! ```text
//! GELU(x) ≈ ½·x·(1 + tanh u),            u = √(2/π)·(x + 0.044715·x³)
//! GELU′(x) = ½·(1 + tanh u) + ½·x·(1 − tanh²u)·√(2/π)·(1 + 3·0.044715·x²)
//! ```
//!
//! Candle's `Tensor::gelu` computes the same formula, one `tanhf` library call per element
//! forward and again backward, which the compiler cannot vectorise; on the CPU [`gelu`] runs the
//! formula as a custom op whose loops use [`shared::cpu::tanh_f32`] and are vectorised. On CUDA
//! it is Candle's own GELU kernel.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use shared::cpu::{Element, Real};
use shared::custom_op::contiguous_slice;

/// `√(2/π)`.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of the approximation.
const CUBIC: f64 = 0.044_715;

/// GELU (tanh approximation) of every element of `x`; differentiable.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu()
    }
}

#[derive(Debug, Clone, Copy)]
struct Gelu;

/// `(x, g) → g·GELU′(x)`.
#[derive(Debug, Clone, Copy)]
struct GeluBackward;

/// Elements per task of the parallel loops (element-wise: any split will do).
const CHUNK: usize = 4096;

/// `tanh u` for the element `x`.
#[inline(always)]
fn tanh_u<A: Real>(x: A) -> A {
    let (k, c) = (A::from_f64(SQRT_2_OVER_PI), A::from_f64(CUBIC));
    (k * (x + c * x * x * x)).tanh()
}

/// `GELU(x) = ½·x·(1 + tanh u)` in the arithmetic `A` (8-06's fused bias + GELU loops use it too).
#[inline(always)]
pub fn gelu_value<A: Real>(x: A) -> A {
    A::from_f64(0.5) * x * (A::one() + tanh_u(x))
}

/// `GELU′(x) = ½·(1 + tanh u) + ½·x·(1 − tanh²u)·√(2/π)·(1 + 3·0.044715·x²)`.
#[inline(always)]
pub fn gelu_slope<A: Real>(x: A) -> A {
    let (half, k) = (A::from_f64(0.5), A::from_f64(SQRT_2_OVER_PI));
    let t = tanh_u(x);
    let du = k * (A::one() + A::from_f64(3.0 * CUBIC) * x * x);
    half * (A::one() + t) + half * x * (A::one() - t * t) * du
}

fn cpu_forward<T: Element, A: Real>(x: &[T]) -> Vec<T> {
    let mut y = shared::cpu::zeros::<T>(x.len());
    shared::cpu::for_each_row(&mut y, CHUNK, |i, out| {
        for (o, &x) in out.iter_mut().zip(&x[i * CHUNK..]) {
            *o = gelu_value(A::of(x)).to();
        }
    });
    y
}

fn cpu_backward<T: Element, A: Real>(x: &[T], g: &[T]) -> Vec<T> {
    let mut dx = shared::cpu::zeros::<T>(x.len());
    shared::cpu::for_each_row(&mut dx, CHUNK, |i, out| {
        let (x, g) = (&x[i * CHUNK..], &g[i * CHUNK..]);
        for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
            *o = (A::of(g) * gelu_slope(A::of(x))).to();
        }
    });
    dx
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        macro_rules! run {
            ($t:ty, $a:ty) => {
                <$t>::to_cpu_storage_owned(cpu_forward::<$t, $a>(contiguous_slice(
                    s.as_slice::<$t>()?,
                    l,
                    "gelu: x",
                )?))
            };
        }
        let y = shared::for_float_dtype!(s.dtype(), "gelu", run);
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluBackward)?))
    }
}

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu-tanh-backward"
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
                <$t>::to_cpu_storage_owned(cpu_backward::<$t, $a>(
                    contiguous_slice(s1.as_slice::<$t>()?, l1, "gelu: x")?,
                    contiguous_slice(s2.as_slice::<$t>()?, l2, "gelu: gradient")?,
                ))
            };
        }
        let dx = shared::for_float_dtype!(s1.dtype(), "gelu backward", run);
        Ok((dx, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use shared::compare::max_abs_diff;

    #[test]
    fn gelu_equals_candles_values_and_gradients() -> Result<()> {
        // Both sides of 0, the curved middle and the saturated tails; enough for parallel chunks.
        let n = 3 * CHUNK + 17;
        let xs: Vec<f64> = (0..n)
            .map(|k| ((k * 7919 % 2001) as f64 - 1000.0) / 90.0)
            .collect();
        for (dtype, tol) in [(DType::F64, 1e-14), (DType::F32, 2e-6)] {
            let x =
                Var::from_tensor(&Tensor::from_vec(xs.clone(), n, &Device::Cpu)?.to_dtype(dtype)?)?;
            let w = ((Tensor::arange(0u32, n as u32, &Device::Cpu)?.to_dtype(dtype)? * 0.1)?
                .cos()?
                + 0.3)?;
            let ours = gelu(x.as_tensor())?;
            let candles = x.as_tensor().gelu()?;
            assert!(
                max_abs_diff(&ours, &candles)? <= tol * 10.0,
                "{dtype:?} values"
            );
            let g_ours = (&ours * &w)?.sum_all()?.backward()?;
            let g_candle = (&candles * &w)?.sum_all()?.backward()?;
            let (a, b) = (
                g_ours.get(x.as_tensor()).expect("grad"),
                g_candle.get(x.as_tensor()).expect("grad"),
            );
            // Candle's backward rounds its constants to six digits.
            assert!(max_abs_diff(a, b)? <= 2e-5, "{dtype:?} gradients");
        }
        Ok(())
    }

    #[test]
    fn gelu_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        for x0 in [-9.0, -3.1, -1.0, -0.2, 0.0, 0.05, 0.7, 2.4, 6.0] {
            let x = Var::new(&[x0], &dev)?;
            let grad = gelu(x.as_tensor())?.sum_all()?.backward()?;
            let analytic = grad.get(x.as_tensor()).expect("grad").to_vec1::<f64>()?[0];
            let at = |v: f64| -> Result<f64> {
                gelu(&Tensor::new(&[v], &dev)?)?
                    .to_vec1::<f64>()
                    .map(|y| y[0])
            };
            let eps = 1e-6;
            let numeric = (at(x0 + eps)? - at(x0 - eps)?) / (2.0 * eps);
            assert!(
                (numeric - analytic).abs() <= 1e-8,
                "x = {x0}: {numeric} vs {analytic}"
            );
        }
        Ok(())
    }

    #[test]
    fn gelu_of_a_strided_view_is_the_gelu_of_its_values() -> Result<()> {
        let x = Tensor::arange(-8f32, 8f32, &Device::Cpu)?
            .reshape((4, 4))?
            .t()?;
        let d = max_abs_diff(&gelu(&x)?, &x.contiguous()?.gelu()?)?;
        assert!(d <= 1e-6, "{d}");
        Ok(())
    }
}

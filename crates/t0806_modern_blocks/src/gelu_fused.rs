//! # Bias + GELU as one op
//!
//! GPT-2's MLP (8-04) computes `GELU(x·W₁ᵀ + b₁)`: a bias added to every row, then the tanh
//! approximation of GELU. Composed on the GPU that is Candle's broadcast add and GELU kernels
//! forward, and backward about a dozen element-wise passes over the `(rows, d_ff)` activation (the
//! cube, the tanh, the slope's products and sums, each its own kernel and buffer) plus a column
//! reduction for `b₁`. As one op:
//!
//! ```text
//! forward   y  = GELU(h + b)                      h: (rows, n)   b: (n,)
//! backward  dh = g · GELU′(h + b)                 db = Σ_rows dh = 1ᵀ·dH  (one GEMV)
//! ```
//!
//! one pass forward, one backward, `h + b` recomputed rather than stored; the arithmetic in f32
//! (f64 for f64 tensors), one rounding per stored value. The formulas are 8-04's
//! ([`t0804_transformer_block::gelu::gelu_value`], [`gelu_slope`]); on CUDA, `kernels/gelu.cu`
//! (`cuda` feature only).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use shared::cpu::{Element, Real};
use shared::custom_op::contiguous_slice;
use t0804_transformer_block::gelu::{gelu_slope, gelu_value};

/// `GELU(h + b)` for `h: (…, n)` and `b: (n,)` of `h`'s dtype; differentiable in both.
pub fn bias_gelu_fused(h: &Tensor, b: &Tensor) -> Result<Tensor> {
    shared::bias::check_bias(h, b, "bias_gelu_fused")?;
    h.contiguous()?.apply_op2(&b.contiguous()?, BiasGelu)
}

#[derive(Debug, Clone, Copy)]
struct BiasGelu;

/// `(h, b, g) → dh = g·GELU′(h + b)`.
#[derive(Debug, Clone, Copy)]
struct BiasGeluBackward;

/// Elements per task of the parallel loops, rounded down to whole rows.
const CHUNK: usize = 4096;

/// Whole rows of `n` per task (at least one row).
fn chunk_of_rows(n: usize) -> usize {
    n.max(1) * (CHUNK / n.max(1)).max(1)
}

/// `y = GELU(h + b)`; every task holds whole rows, each zipped with `b` (no index arithmetic in
/// the inner loop, which the compiler vectorises).
fn cpu_forward<T: Element, A: Real>(h: &[T], b: &[T]) -> Vec<T> {
    let n = b.len();
    let chunk = chunk_of_rows(n);
    let mut y = shared::cpu::zeros::<T>(h.len());
    if n == 0 {
        return y;
    }
    shared::cpu::for_each_row(&mut y, chunk, |i, out| {
        for (out, h) in out.chunks_mut(n).zip(h[i * chunk..].chunks(n)) {
            for ((o, &h), &b) in out.iter_mut().zip(h).zip(b) {
                *o = gelu_value(A::of(h) + A::of(b)).to();
            }
        }
    });
    y
}

/// `dh = g·GELU′(h + b)`, row by row as the forward.
fn cpu_backward<T: Element, A: Real>(h: &[T], b: &[T], g: &[T]) -> Vec<T> {
    let n = b.len();
    let chunk = chunk_of_rows(n);
    let mut dh = shared::cpu::zeros::<T>(h.len());
    if n == 0 {
        return dh;
    }
    shared::cpu::for_each_row(&mut dh, chunk, |i, out| {
        let rows = h[i * chunk..].chunks(n).zip(g[i * chunk..].chunks(n));
        for (out, (h, g)) in out.chunks_mut(n).zip(rows) {
            for (((o, &h), &g), &b) in out.iter_mut().zip(h).zip(g).zip(b) {
                *o = (A::of(g) * gelu_slope(A::of(h) + A::of(b))).to();
            }
        }
    });
    dh
}

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu"
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
                    contiguous_slice(s1.as_slice::<$t>()?, l1, "bias + GELU: h")?,
                    contiguous_slice(s2.as_slice::<$t>()?, l2, "bias + GELU: b")?,
                ))
            };
        }
        let y = shared::for_float_dtype!(s1.dtype(), "bias + GELU", run);
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
        let y = cuda::launch("bias_gelu_fwd", &[(s1, l1, "h"), (s2, l2, "b")])?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        h: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dh = h.apply_op3_no_bwd(b, &g.contiguous()?, &BiasGeluBackward)?;
        // A constant bias (an MLP without biases passes zeros) needs no gradient.
        let db = if b.track_op() {
            Some(shared::bias::column_sums(&dh)?)
        } else {
            None
        };
        Ok((Some(dh), db))
    }
}

impl CustomOp3 for BiasGeluBackward {
    fn name(&self) -> &'static str {
        "bias-gelu-backward"
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
                    contiguous_slice(s1.as_slice::<$t>()?, l1, "bias + GELU: h")?,
                    contiguous_slice(s2.as_slice::<$t>()?, l2, "bias + GELU: b")?,
                    contiguous_slice(s3.as_slice::<$t>()?, l3, "bias + GELU: gradient")?,
                ))
            };
        }
        let dh = shared::for_float_dtype!(s1.dtype(), "bias + GELU backward", run);
        Ok((dh, l1.shape().clone()))
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
        let dh = cuda::launch(
            "bias_gelu_bwd",
            &[(s1, l1, "h"), (s2, l2, "b"), (s3, l3, "gradient")],
        )?;
        Ok((dh, l1.shape().clone()))
    }
}

/// Launching `kernels/gelu.cu`.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use candle_core::CudaStorage;
    use shared::cuda::{launch_elementwise, PtxModule};

    const GELU: PtxModule = PtxModule {
        name: "t0806_gelu",
        ptx: include_str!(concat!(env!("OUT_DIR"), "/gelu.ptx")),
    };

    /// Runs `<kernel>_<dtype>(h, b, [g,] out, n_elements, n_columns)`: the first input is `h`
    /// (its elements are the output's), the second the bias (its length the row width; `n` is a
    /// multiple of it, checked by `bias_gelu_fused`).
    pub fn launch(kernel: &str, inputs: &[(&CudaStorage, &Layout, &str)]) -> Result<CudaStorage> {
        let n = inputs[0].1.shape().elem_count();
        let sizes = [n as i64, inputs[1].1.shape().elem_count() as i64];
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                launch_elementwise::<$t>(&GELU, kernel, inputs, n, n, &sizes)
            };
        }
        shared::for_float_dtype!(inputs[0].0.dtype(), "bias + GELU (cuda)", run, no_f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use shared::compare::max_abs_diff;

    /// The composed form: broadcast add, then 8-04's GELU.
    fn composed(h: &Tensor, b: &Tensor) -> Result<Tensor> {
        t0804_transformer_block::gelu::gelu(&h.broadcast_add(b)?)
    }

    #[test]
    fn fused_equals_composed_in_f64_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        // 11 rows of 1,500 (16,500 elements: the parallel path): tasks of two rows, the last of one.
        let h = Var::from_tensor(&(Tensor::randn(0f64, 1., (11, 1, 1500), &dev)? * 2.0)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f64, 1., 1500, &dev)?)?;
        let w = Tensor::randn(0f64, 1., (11, 1, 1500), &dev)?;
        let fused = bias_gelu_fused(&h, &b)?;
        let reference = composed(&h, &b)?;
        assert!(max_abs_diff(&fused, &reference)? < 1e-14);
        let gf = (fused * &w)?.sum_all()?.backward()?;
        let gr = (reference * &w)?.sum_all()?.backward()?;
        for (v, name) in [(&h, "h"), (&b, "b")] {
            let d = max_abs_diff(gf.get(v).unwrap(), gr.get(v).unwrap())?;
            assert!(d < 1e-12, "d{name} differs by {d}");
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::new(
            &[[-2.5f64, -0.3, 0.0], [0.7, 1.9, 4.0]],
            &dev,
        )?)?;
        let b = Var::from_tensor(&Tensor::new(&[0.2f64, -0.4, 0.1], &dev)?)?;
        let loss = |h: &Tensor, b: &Tensor| -> Result<f64> {
            bias_gelu_fused(h, b)?.sum_all()?.to_scalar::<f64>()
        };
        let grads = bias_gelu_fused(&h, &b)?.sum_all()?.backward()?;
        let (dh, db) = (
            grads.get(&h).unwrap().to_vec2::<f64>()?,
            grads.get(&b).unwrap().to_vec1::<f64>()?,
        );
        let eps = 1e-6;
        let hv = h.to_vec2::<f64>()?;
        for r in 0..2 {
            for c in 0..3 {
                let mut plus = hv.clone();
                plus[r][c] += eps;
                let mut minus = hv.clone();
                minus[r][c] -= eps;
                let fd = (loss(&Tensor::new(plus, &dev)?, &b)?
                    - loss(&Tensor::new(minus, &dev)?, &b)?)
                    / (2.0 * eps);
                assert!(
                    (fd - dh[r][c]).abs() < 1e-8,
                    "dh[{r}][{c}] {} vs {fd}",
                    dh[r][c]
                );
            }
        }
        for (c, &want) in db.iter().enumerate() {
            assert!((want - (dh[0][c] + dh[1][c])).abs() < 1e-12, "db[{c}]");
        }
        Ok(())
    }

    #[test]
    fn low_precision_is_one_rounding_of_the_f64_result() -> Result<()> {
        let dev = Device::Cpu;
        let h = (Tensor::randn(0f32, 1., (17, 96), &dev)? * 3.0)?;
        let b = Tensor::randn(0f32, 1., 96, &dev)?;
        // Half an ulp relative to the value (f32 arithmetic adds a little for f32 itself).
        for (dt, rel) in [
            (DType::F32, 1e-6),
            (DType::BF16, 1.0 / 256.0),
            (DType::F16, 1.0 / 2048.0),
        ] {
            let (hd, bd) = (h.to_dtype(dt)?, b.to_dtype(dt)?);
            // The reference sees the same rounded inputs: only the output's rounding is left.
            let exact = bias_gelu_fused(&hd.to_dtype(DType::F64)?, &bd.to_dtype(DType::F64)?)?;
            let y = bias_gelu_fused(&hd, &bd)?.to_dtype(DType::F64)?;
            let (y, exact) = (
                y.flatten_all()?.to_vec1::<f64>()?,
                exact.flatten_all()?.to_vec1::<f64>()?,
            );
            for (v, e) in y.iter().zip(&exact) {
                assert!((v - e).abs() <= rel * e.abs() + 1e-6, "{dt:?}: {v} vs {e}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_constant_bias_gets_no_gradient_and_bad_shapes_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 8), &dev)?)?;
        let zeros = Tensor::zeros(8, DType::F32, &dev)?;
        let grads = bias_gelu_fused(&h, &zeros)?.sum_all()?.backward()?;
        assert!(grads.get(&zeros).is_none() && grads.get(&h).is_some());
        for b in [
            Tensor::zeros(7, DType::F32, &dev)?,
            Tensor::zeros(8, DType::F64, &dev)?,
        ] {
            let e = bias_gelu_fused(&h, &b).unwrap_err().to_string();
            assert!(e.contains("bias_gelu_fused: the bias"), "{e}");
        }
        Ok(())
    }
}

//! # Adding a bias to every row, with a backward that reads the gradient row by row
//!
//! ```text
//! forward   y = x + b             x, y: (rows, d)   b: (d,)   (any leading dims count as rows)
//! backward  dx = g                db = Σ_rows g = 1ᵀ·G     (1, rows)·(rows, d) → (d,)
//! ```
//!
//! `x.broadcast_add(&b)` computes the same `y`; its backward reduces `g` over the broadcast
//! (leading) dimensions with a generic reduction, which on CUDA gives each output column a block
//! that walks down that column with stride `d`: every load touches a different 32-byte sector, so
//! the bias gradient of a `(rows, 2048)` activation reads ~16× the bytes it needs. Written as the
//! product of a row of ones with `G` it is one GEMV, which cuBLAS (and the CPU `gemm`) read
//! row by row at full bandwidth, accumulating in f32. [`add_bias`] is that op: the forward is
//! Candle's own broadcast addition, the backward [`column_sums`].

use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `x + b` for `x: (…, d)` and `b: (d,)` of `x`'s dtype; differentiable in both, `b`'s gradient
/// computed by [`column_sums`].
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_bias(x, b, "add_bias")?;
    x.apply_op2(&b.contiguous()?, BiasAdd)
}

/// Checks that `b` is a `(d,)` bias of `x: (…, d)` in `x`'s dtype, naming `op` in the error;
/// returns `d`.
pub fn check_bias(x: &Tensor, b: &Tensor, op: &str) -> Result<usize> {
    let d = match x.dims().last() {
        Some(&d) => d,
        None => bail!("{op}: the input is a scalar, expected (…, d)"),
    };
    if b.dims() != [d] || b.dtype() != x.dtype() {
        bail!(
            "{op}: the bias {:?} {:?} must be ({d},) in the input's dtype {:?} (input {:?})",
            b.dims(),
            b.dtype(),
            x.dtype(),
            x.dims()
        );
    }
    Ok(d)
}

/// `Σ_rows g` of `g: (…, d)` as the product `(1, rows)·(rows, d)`, shape `(d,)`, in `g`'s dtype.
pub fn column_sums(g: &Tensor) -> Result<Tensor> {
    let d = match g.dims().last() {
        Some(&d) => d,
        None => bail!("column_sums: g is a scalar, expected (…, d)"),
    };
    let rows = g.elem_count() / d.max(1);
    let ones = Tensor::ones((1, rows), g.dtype(), g.device())?;
    ones.matmul(&g.contiguous()?.reshape((rows, d))?)?
        .reshape(d)
}

#[derive(Debug, Clone, Copy)]
struct BiasAdd;

/// `x + b` with `b`'s layout broadcast over `x`'s rows: the kernel `broadcast_add` launches.
fn forward<S: BackendStorage>(x: &S, lx: &Layout, b: &S, lb: &Layout) -> Result<(S, Shape)> {
    let y = x.binary_impl::<Add>(b, lx, &lb.broadcast_as(lx.shape().clone())?)?;
    Ok((y, lx.shape().clone()))
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        forward(s1, l1, s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        forward(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // A constant bias needs no gradient.
        let db = if b.track_op() {
            Some(column_sums(g)?)
        } else {
            None
        };
        Ok((Some(g.clone()), db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::max_abs_diff;
    use candle_core::{DType, Device, Var};

    #[test]
    fn add_bias_equals_broadcast_add_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1., (3, 5, 7), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f64, 1., 7, &dev)?)?;
        let w = Tensor::randn(0f64, 1., (3, 5, 7), &dev)?; // a loss that weighs every element
        let ours = add_bias(&x, &b)?;
        let theirs = x.broadcast_add(&b)?;
        assert_eq!(max_abs_diff(&ours, &theirs)?, 0.0);
        let g1 = (ours * &w)?.sum_all()?.backward()?;
        let g2 = (theirs * &w)?.sum_all()?.backward()?;
        for v in [&x, &b] {
            let d = max_abs_diff(g1.get(v).unwrap(), g2.get(v).unwrap())?;
            assert!(d < 1e-12, "gradient differs by {d}");
        }
        // db is the column sums of w: checked against a float64 loop.
        let w = w.reshape((15, 7))?.to_vec2::<f64>()?;
        let db = g1.get(&b).unwrap().to_vec1::<f64>()?;
        for (j, &v) in db.iter().enumerate() {
            let want: f64 = w.iter().map(|row| row[j]).sum();
            assert!((v - want).abs() < 1e-12, "column {j}: {v} vs {want}");
        }
        Ok(())
    }

    #[test]
    fn add_bias_of_a_strided_input_and_low_precision() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (7, 4), &dev)?.t()?; // (4, 7), not contiguous
        let b = Tensor::randn(0f32, 1., 7, &dev)?;
        assert_eq!(
            max_abs_diff(&add_bias(&x, &b)?, &x.broadcast_add(&b)?)?,
            0.0
        );
        let (xh, bh) = (x.to_dtype(DType::BF16)?, b.to_dtype(DType::BF16)?);
        let d = max_abs_diff(&add_bias(&xh, &bh)?, &xh.broadcast_add(&bh)?)?;
        assert_eq!(d, 0.0);
        Ok(())
    }

    #[test]
    fn a_bias_of_the_wrong_size_or_dtype_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &dev)?;
        for b in [
            Tensor::zeros(4, DType::F32, &dev)?,
            Tensor::zeros((1, 3), DType::F32, &dev)?,
            Tensor::zeros(3, DType::F64, &dev)?,
        ] {
            let e = add_bias(&x, &b).unwrap_err().to_string();
            assert!(e.contains("add_bias: the bias"), "{e}");
        }
        Ok(())
    }
}

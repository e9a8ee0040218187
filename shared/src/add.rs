//! # Adding two tensors of one shape, 16 bytes per thread
//!
//! Candle's CUDA addition loads and stores one element per thread; for bf16 that is two bytes
//! per access, well below what the memory system delivers. [`add`] is the same sum with a kernel
//! that moves 16 bytes per access (`kernels/add.cu`) for contiguous operands of one shape and
//! dtype (f32, bf16, f16) on the GPU, and Candle's own addition for everything else.
//!
//! Its main use is the backward pass: every tensor read by two ops (the residual stream, the
//! normalised input of the `q, k, v` projections and of SwiGLU's gate and up projections) gets
//! its gradient as a sum, about twenty activation-sized sums per training step of the ladder's
//! model. [`install_gradient_sum`] makes the patched candle-core (`third_party/README.md`) form
//! those sums with [`add`].
//!
//! The forward pass has sums of its own: the residual connections, `x + f(norm(x))`, two per
//! block. [`residual_add`] is [`add`] with a gradient (both inputs receive the output's
//! gradient unchanged), what every block of the course adds its branches with.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

/// `a + b` for tensors of one shape and dtype.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fast(a, b) {
        a.apply_op2_no_bwd(b, &Add)
    } else {
        a.add(b)
    }
}

/// Whether `a + b` can take the kernel: CUDA, one shape and dtype (f32, bf16, f16), contiguous.
fn fast(a: &Tensor, b: &Tensor) -> bool {
    a.device().is_cuda()
        && a.shape() == b.shape()
        && a.dtype() == b.dtype()
        && matches!(a.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && a.is_contiguous()
        && b.is_contiguous()
}

/// Whether [`residual_add`] takes the 16-byte kernel (the default) or Candle's addition (for
/// `train-bench --candle-residual-add`, which measures the difference).
static FAST_RESIDUAL: AtomicBool = AtomicBool::new(true);

/// `x + y` for the residual connections, differentiable: [`add`]'s kernel on the GPU for
/// contiguous operands of one shape and dtype, Candle's addition for everything else (and on the
/// CPU). The gradient of the sum reaches `x` and `y` as it is.
pub fn residual_add(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    if FAST_RESIDUAL.load(Ordering::Relaxed) && fast(x, y) {
        x.apply_op2(y, Add)
    } else {
        x.add(y)
    }
}

/// Makes [`residual_add`] use Candle's addition everywhere (`false`) or its own kernel where it
/// can (`true`, the default): a process-wide switch to measure the kernel.
pub fn set_fast_residual_add(fast: bool) {
    FAST_RESIDUAL.store(fast, Ordering::Relaxed);
}

/// Makes `Tensor::backward` form every gradient sum with [`add`] (a process-wide choice, see
/// `candle_core::backprop::set_gradient_sum`). Only CUDA tensors take another path than Candle's
/// addition, so on the CPU this changes nothing.
pub fn install_gradient_sum() {
    candle_core::backprop::set_gradient_sum(Some(add));
}

/// The sum as a custom op. Its backward hands the output's gradient to both inputs; gradient
/// sums apply it without recording it ([`add`]: they are not differentiated again).
struct Add;

impl candle_core::CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "add"
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _sum: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(grad.clone())))
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((
            a.binary_impl::<candle_core::op::Add>(b, la, lb)?,
            la.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        la: &Layout,
        b: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = la.shape().elem_count();
        let inputs = [(a, la, "a"), (b, lb, "b")];
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                crate::cuda::launch_elementwise::<$t>(
                    &cuda::ADD,
                    "add",
                    &inputs,
                    n,
                    n,
                    &[n as i64],
                )?
            };
        }
        let out = crate::for_float_dtype!(a.dtype(), "add (cuda)", run, no_f64);
        Ok((out, la.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    pub const ADD: crate::cuda::PtxModule = crate::cuda::PtxModule {
        name: "shared_add",
        ptx: include_str!(concat!(env!("OUT_DIR"), "/add.ptx")),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn add_equals_candles_addition_and_refuses_shape_mismatches() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 24.0, &dev)?.reshape((2, 3, 4))?;
        let b = a.affine(-0.5, 3.0)?;
        let want: Vec<f32> = (&a + &b)?.flatten_all()?.to_vec1()?;
        assert_eq!(add(&a, &b)?.flatten_all()?.to_vec1::<f32>()?, want);
        // A transposed view and a broadcast are Candle's affair, with Candle's result.
        let at = a.transpose(1, 2)?;
        let bt = b.transpose(1, 2)?;
        assert_eq!(
            add(&at, &bt)?.flatten_all()?.to_vec1::<f32>()?,
            (&at + &bt)?.flatten_all()?.to_vec1::<f32>()?
        );
        assert!(add(&a, &a.narrow(2, 0, 3)?).is_err());
        Ok(())
    }
}

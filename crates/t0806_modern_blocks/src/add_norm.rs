//! # The residual add fused into the RMSNorm that follows it
//!
//! In a pre-norm model every residual add is followed by a norm: the attention branch's by the
//! feed-forward branch's `N₂`, the feed-forward branch's by the next block's `N₁` (or the final
//! norm). For the first:
//!
//! ```text
//! h = x + Attn(N₁(x))          the residual add: reads x and a, writes h
//! y = RMSNorm(h) ⊙ g           the norm: reads h, writes y
//! ```
//!
//! [`add_rms_norm_fused`] does both in one pass (`kernels/rmsnorm.cu`, `add_rmsnorm_fwd_*`): it
//! reads `x` and `a`, writes `h` and `y`, and saves a read of `h` and a launch. `h` is rounded to
//! the storage dtype before it is normalised, as the separate addition rounds it, so both outputs
//! are bit for bit those of [`shared::add::residual_add`] followed by [`crate::rms_norm_fused`]
//! (on the GPU when `x` and `a` start 16-byte aligned, as every activation of the model does;
//! otherwise `y` may differ in the last bit). 8-04's `Layer::add_then_forward` is where a block
//! asks for it, and its `Stream` carries the feed-forward branch to the next norm.
//!
//! A Candle op has one output, and the graph must stay the one of the two separate ops (the
//! gradient of `h` is the sum of the norm's and the residual stream's, formed once where `h` is
//! used twice). So the pass runs inside the first of two ops:
//! - [`AddRmsNorm`] on `(x, a, g)` computes both, returns `h` and leaves `y` in a shared slot;
//!   its gradient is that of a sum (`dh` to `x` and to `a`, none to `g`);
//! - [`StashedRmsNorm`] on `(h, g)` returns the slot's `y` without computing anything; its
//!   gradient is RMSNorm's ([`crate::rms_norm_fused_backward`]).
//!
//! The backward is therefore unchanged; the forward saves one of its five activation-sized
//! passes per fused add.

use crate::fused::{check_gain_and_input, cpu_forward, rms_norm_fused_backward, rows_and_width};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use shared::cpu::{Element, Real};
use shared::custom_op::contiguous_slice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// `(x + a, RMSNorm(x + a)·g)`: the residual sum and its norm in one pass. `x`, `a` (…, d) of one
/// shape and dtype, `g (d,)`; both outputs in `x`'s dtype, differentiable in `x`, `a` and `g`.
pub fn add_rms_norm_fused(
    x: &Tensor,
    a: &Tensor,
    g: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    const WHAT: &str = "add_rms_norm_fused";
    check_gain_and_input(x, g, WHAT)?;
    if x.shape() != a.shape() || x.dtype() != a.dtype() {
        bail!(
            "{WHAT}: x {:?} {:?} and the residual branch {:?} {:?} must have one shape and dtype",
            x.dims(),
            x.dtype(),
            a.dims(),
            a.dtype()
        );
    }
    if x.device().location() != a.device().location() {
        bail!(
            "{WHAT}: x is on {:?}, the residual branch on {:?}",
            x.device().location(),
            a.device().location()
        );
    }
    if !(eps >= 0.0 && eps.is_finite()) {
        bail!("{WHAT}: eps must be finite and ≥ 0, got {eps}");
    }
    let g = g.to_dtype(x.dtype())?.contiguous()?;
    let normed = Slot::default();
    let h = x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &g,
        AddRmsNorm {
            eps,
            normed: normed.clone(),
        },
    )?;
    let y = h.apply_op2(&g, StashedRmsNorm { eps, normed })?;
    Ok((h, y))
}

/// Whether a fused [`crate::RmsNorm`] takes the residual add in front of it (the default) or
/// leaves it to [`shared::add::residual_add`] (`train-bench --unfused-add-norm`, to measure it).
static FUSED_ADD_NORM: AtomicBool = AtomicBool::new(true);

/// See [`FUSED_ADD_NORM`]: a process-wide switch.
pub fn set_fused_add_norm(fused: bool) {
    FUSED_ADD_NORM.store(fused, Ordering::Relaxed);
}

/// Whether [`set_fused_add_norm`] left the fusion on.
pub fn fused_add_norm() -> bool {
    FUSED_ADD_NORM.load(Ordering::Relaxed)
}

/// Where [`AddRmsNorm`] leaves the normalised output for [`StashedRmsNorm`] to hand on.
type Slot = Arc<Mutex<Option<Stash>>>;

/// A storage of either backend.
enum Stash {
    Cpu(CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::CudaStorage),
}

fn take(slot: &Slot) -> Result<Stash> {
    match slot.lock().expect("fused add + RMSNorm slot").take() {
        Some(s) => Ok(s),
        None => bail!(
            "fused add + RMSNorm: the normalised output was already taken (run add_rms_norm_fused)"
        ),
    }
}

/// `(x, a, g) → h = x + a`, computing `RMSNorm(h)·g` in the same pass into its slot (use
/// [`add_rms_norm_fused`], which checks the arguments and reads the slot).
#[derive(Clone)]
pub(crate) struct AddRmsNorm {
    pub eps: f64,
    normed: Slot,
}

/// `(h, g) → RMSNorm(h)·g`, taken from the slot [`AddRmsNorm`] filled; its gradient is RMSNorm's.
#[derive(Clone)]
pub(crate) struct StashedRmsNorm {
    pub eps: f64,
    normed: Slot,
}

/// `x` and the branch `a` of one shape (the public function checks it; the ops check again).
fn same_shape(lx: &Layout, la: &Layout) -> Result<()> {
    if lx.shape() != la.shape() || !la.is_contiguous() {
        bail!(
            "fused add + RMSNorm: the residual branch {:?} must be contiguous and shaped like x {:?}",
            la.shape(),
            lx.shape()
        );
    }
    Ok(())
}

/// `h = x + a` rounded to `T`, then `y = RMSNorm(h)·g` by [`crate::rms_norm_fused`]'s loop.
fn cpu_add_forward<T: Element, A: Real>(
    x: &[T],
    a: &[T],
    g: &[T],
    d: usize,
    eps: f64,
) -> (Vec<T>, Vec<T>) {
    let h: Vec<T> = x
        .iter()
        .zip(a)
        .map(|(&u, &v)| (A::of(u) + A::of(v)).to())
        .collect();
    let y = cpu_forward::<T, A>(&h, g, d, eps);
    (h, y)
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "fused-add-rms-norm"
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
        let (_, d) = rows_and_width(l1, l3)?;
        same_shape(l1, l2)?;
        macro_rules! run {
            ($t:ty, $a:ty) => {{
                let what = "fused add + RMSNorm: input";
                let x = contiguous_slice(s1.as_slice::<$t>()?, l1, what)?;
                let a = contiguous_slice(s2.as_slice::<$t>()?, l2, what)?;
                let g = contiguous_slice(s3.as_slice::<$t>()?, l3, what)?;
                let (h, y) = cpu_add_forward::<$t, $a>(x, a, g, d, self.eps);
                (
                    <$t as candle_core::WithDType>::to_cpu_storage_owned(h),
                    <$t as candle_core::WithDType>::to_cpu_storage_owned(y),
                )
            }};
        }
        let (h, y) = match (s1.dtype(), s2.dtype(), s3.dtype()) {
            (DType::F32, DType::F32, DType::F32) => run!(f32, f32),
            (DType::F64, DType::F64, DType::F64) => run!(f64, f64),
            (DType::BF16, DType::BF16, DType::BF16) => run!(bf16, f32),
            (DType::F16, DType::F16, DType::F16) => run!(f16, f32),
            (a, b, c) => bail!(
                "fused add + RMSNorm: x {a:?}, the residual branch {b:?} and the gain {c:?} must be one of f32, f64, bf16, f16"
            ),
        };
        *self.normed.lock().expect("fused add + RMSNorm slot") = Some(Stash::Cpu(y));
        Ok((h, l1.shape().clone()))
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
        let (rows, d) = rows_and_width(l1, l3)?;
        same_shape(l1, l2)?;
        let (h, y) =
            crate::cuda::add_rms_forward(s1, l1, s2, l2, s3, l3, rows, d, self.eps as f32)?;
        *self.normed.lock().expect("fused add + RMSNorm slot") = Some(Stash::Cuda(y));
        Ok((h, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _a: &Tensor,
        _g: &Tensor,
        _h: &Tensor,
        dh: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dh.clone()), Some(dh.clone()), None))
    }
}

impl CustomOp2 for StashedRmsNorm {
    fn name(&self) -> &'static str {
        "stashed-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match take(&self.normed)? {
            Stash::Cpu(y) => Ok((y, l1.shape().clone())),
            #[cfg(feature = "cuda")]
            Stash::Cuda(_) => {
                bail!("fused add + RMSNorm: the normalised output is on the GPU, h on the CPU")
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        match take(&self.normed)? {
            Stash::Cuda(y) => Ok((y, l1.shape().clone())),
            Stash::Cpu(_) => {
                bail!("fused add + RMSNorm: the normalised output is on the CPU, h on the GPU")
            }
        }
    }

    fn bwd(
        &self,
        h: &Tensor,
        g: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dh, dg) = rms_norm_fused_backward(h, g, dy, self.eps)?;
        Ok((Some(dh), Some(dg)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn input(shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f64 / 500.0) - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
    }

    /// Both outputs and every gradient, fused and separate, for `loss = Σ h⊙u + Σ y⊙w`: the
    /// gradient of `h` is the sum of the two uses, as in a block.
    fn outputs(fused: bool, dtype: DType) -> Result<Vec<Vec<f64>>> {
        let (x, a, g) = (
            Var::from_tensor(&input(&[2, 3, 40], 1, dtype)?)?,
            Var::from_tensor(&input(&[2, 3, 40], 2, dtype)?)?,
            Var::from_tensor(&(input(&[40], 3, dtype)? + 1.0)?)?,
        );
        let (h, y) = if fused {
            add_rms_norm_fused(&x, &a, &g, 1e-5)?
        } else {
            let h = shared::add::residual_add(&x, &a)?;
            let y = crate::rms_norm_fused(&h, &g, 1e-5)?;
            (h, y)
        };
        let (u, w) = (input(&[2, 3, 40], 4, dtype)?, input(&[2, 3, 40], 5, dtype)?);
        let loss = ((&h * &u)?.sum_all()? + (&y * &w)?.sum_all()?)?;
        let grads = loss.backward()?;
        let mut out = vec![h.flatten_all()?, y.flatten_all()?];
        for v in [&x, &a, &g] {
            out.push(grads.get(v.as_tensor()).expect("gradient").flatten_all()?);
        }
        out.iter()
            .map(|t| t.to_dtype(DType::F64)?.to_vec1::<f64>())
            .collect()
    }

    #[test]
    fn fused_add_and_norm_equal_the_two_ops_bit_for_bit() -> Result<()> {
        for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
            let (fused, separate) = (outputs(true, dtype)?, outputs(false, dtype)?);
            for (i, name) in ["h", "y", "dx", "da", "dg"].iter().enumerate() {
                assert_eq!(fused[i], separate[i], "{dtype:?} {name}");
            }
            assert!(
                fused[1].iter().any(|&v| v != 0.0),
                "{dtype:?}: y is all zeros"
            );
        }
        Ok(())
    }

    #[test]
    fn an_f32_gain_over_bf16_activations_gets_its_gradient() -> Result<()> {
        // Mixed precision: f32 master gain, bf16 activations. The gain is cast for the op and its
        // gradient comes back through the cast, as with the separate ops.
        let grads = |fused: bool| -> Result<(Vec<f64>, Vec<f64>)> {
            let x = input(&[3, 16], 1, DType::BF16)?;
            let a = input(&[3, 16], 2, DType::BF16)?;
            let g = Var::from_tensor(&(input(&[16], 3, DType::F32)? + 1.0)?)?;
            let (h, y) = if fused {
                add_rms_norm_fused(&x, &a, &g, 1e-5)?
            } else {
                let h = shared::add::residual_add(&x, &a)?;
                let y = crate::rms_norm_fused(&h, &g, 1e-5)?;
                (h, y)
            };
            assert_eq!((h.dtype(), y.dtype()), (DType::BF16, DType::BF16));
            let w = input(&[3, 16], 4, DType::BF16)?;
            let dg = (&y * &w)?.sum_all()?.backward()?;
            let dg = dg.get(g.as_tensor()).expect("gain gradient");
            assert_eq!(dg.dtype(), DType::F32);
            let v = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>();
            Ok((v(&y)?, v(dg)?))
        };
        assert_eq!(grads(true)?, grads(false)?);
        Ok(())
    }

    #[test]
    fn fused_add_and_norm_reject_mismatched_inputs() -> Result<()> {
        let x = input(&[2, 8], 1, DType::F32)?;
        let g = input(&[8], 2, DType::F32)?;
        let err = |r: Result<(Tensor, Tensor)>| r.expect_err("an error").to_string();
        let e = err(add_rms_norm_fused(
            &x,
            &input(&[2, 4], 3, DType::F32)?,
            &g,
            1e-5,
        ));
        assert!(e.contains("one shape and dtype"), "{e}");
        let e = err(add_rms_norm_fused(
            &x,
            &input(&[2, 8], 3, DType::F64)?,
            &g,
            1e-5,
        ));
        assert!(e.contains("one shape and dtype"), "{e}");
        let e = err(add_rms_norm_fused(
            &x,
            &x,
            &input(&[4], 2, DType::F32)?,
            1e-5,
        ));
        assert!(e.contains("gain's width"), "{e}");
        let e = err(add_rms_norm_fused(&x, &x, &g, f64::NAN));
        assert!(e.contains("eps"), "{e}");
        Ok(())
    }
}

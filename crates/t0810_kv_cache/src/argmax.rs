//! Greedy decoding's argmax as one op: `x (…, n)` → the index of each row's largest score,
//! `(…)` `u32`, the smallest index on ties, NaN scores skipped (a row of NaN gives 0).
//!
//! Candle's `argmax` computes a strided index for every element and reduces in shared memory:
//! over a 10,000-token vocabulary at batch 1 it took 16 µs on an H100, 4 % of a captured decode
//! step. `kernels/argmax.cu` gives each row one block of 1024 threads that keep their best
//! (score, index) and reduce with warp shuffles. On the CPU, a loop with the same rule.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use shared::cpu::Element;
use shared::custom_op::contiguous_slice;

/// The index of the largest score of each row of `x (…, n)`: `(…)` `u32`.
pub fn argmax_last(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 || x.dims()[x.rank() - 1] == 0 {
        bail!(
            "argmax: needs rows of at least one score, got {:?}",
            x.dims()
        );
    }
    x.contiguous()?.apply_op1_no_bwd(&ArgmaxRows)
}

#[derive(Debug, Clone, Copy)]
struct ArgmaxRows;

/// The kernel's rule on one row.
fn argmax_row<T: Element>(row: &[T]) -> u32 {
    let mut best: Option<(f64, usize)> = None;
    for (j, v) in row.iter().map(|&v| v.as_f64()).enumerate() {
        if !v.is_nan() && best.is_none_or(|(b, _)| v > b) {
            best = Some((v, j));
        }
    }
    best.map_or(0, |(_, j)| j as u32)
}

impl CustomOp1 for ArgmaxRows {
    fn name(&self) -> &'static str {
        "argmax-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let n = dims[dims.len() - 1];
        let out_shape = Shape::from(&dims[..dims.len() - 1]);
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                contiguous_slice(s.as_slice::<$t>()?, l, "argmax: scores")?
                    .chunks_exact(n)
                    .map(argmax_row)
                    .collect::<Vec<u32>>()
            };
        }
        let out = shared::for_float_dtype!(s.dtype(), "argmax", run);
        Ok((CpuStorage::U32(out), out_shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = l.dims();
        let out_shape = Shape::from(&dims[..dims.len() - 1]);
        Ok((cuda::argmax(s, l)?, out_shape))
    }
}

/// Launching `kernels/argmax.cu`: one block of 1024 threads per row.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType};
    use shared::cuda::{contiguous_view, load_kernel};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/argmax.ptx"));
    const MODULE: &str = "t0810_argmax";

    pub fn argmax(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                launch::<$t>(s, l)
            };
        }
        shared::for_float_dtype!(s.dtype(), "argmax (cuda)", run, no_f64)
    }

    fn launch<T: CudaDType + DeviceRepr>(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
        use DType::*;
        let dev = s.device().clone();
        let (x, _) = contiguous_view::<T>(s, l, "argmax (cuda): scores")?;
        let n = l.dims()[l.dims().len() - 1];
        let rows = l.shape().elem_count() / n;
        // SAFETY: one block per row writes that row's index.
        let mut out = unsafe { dev.alloc::<u32>(rows)? };
        if rows > 0 {
            let suffix = shared::cuda::dtype_suffix(s.dtype(), &[F32, BF16, F16], "argmax")?;
            let func = load_kernel(&dev, MODULE, PTX, &format!("argmax_rows_{suffix}"), 0)?;
            let n_i = n as i64;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&x).arg(&mut out).arg(&n_i);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (1024, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: argument types match the kernel; out holds one u32 per row.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_maximum_wins_and_nan_is_skipped() {
        assert_eq!(argmax_row(&[1.0f32, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax_row(&[f32::NAN, -1.0, f32::NAN]), 1);
        assert_eq!(argmax_row(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax_row(&[f32::NEG_INFINITY; 3]), 0);
    }
}

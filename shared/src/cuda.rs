//! Plumbing shared by our CUDA custom ops (t0806's fused RMSNorm, t0809's FlashAttention):
//! loading a kernel from a crate's embedded PTX, and borrowing the contiguous part of a storage.
//! Only built with the `cuda` feature.

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaView};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result};

/// Loads kernel `name` of PTX module `module` (loaded once per device) and allows it `smem` bytes
/// of dynamic shared memory (opting in above the default 48 KiB).
pub fn load_kernel(
    dev: &CudaDevice,
    module: &str,
    ptx: &'static str,
    name: &str,
    smem: usize,
) -> Result<CudaFunction> {
    let func = dev
        .get_or_load_custom_func(name, module, ptx)?
        .into_cuda_function();
    if smem > 48 * 1024 {
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
    }
    Ok(func)
}

/// The contiguous part of a storage described by `layout`, and its start offset (elements);
/// `what` names the tensor in the error when it is not contiguous.
pub fn contiguous_view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<(CudaView<'a, T>, usize)> {
    let slice = s.as_cuda_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok((slice.slice(a..b), a)),
        None => bail!("{what} must be contiguous"),
    }
}

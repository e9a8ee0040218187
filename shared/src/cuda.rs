//! Plumbing shared by our CUDA custom ops (t0806's fused RMSNorm, t0809's FlashAttention):
//! loading a kernel from a crate's embedded PTX, and borrowing the contiguous part of a storage.
//! Only built with the `cuda` feature.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result};

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

/// The contiguous parts of several storages ([`contiguous_view`]), in order; an error names the
/// input as `"{op}: {what}"`.
pub fn contiguous_views<'a, T: CudaDType>(
    inputs: &[(&'a CudaStorage, &Layout, &str)],
    op: &str,
) -> Result<Vec<CudaView<'a, T>>> {
    inputs
        .iter()
        .map(|&(s, l, what)| Ok(contiguous_view::<T>(s, l, &format!("{op}: {what}"))?.0))
        .collect()
}

/// Threads per block of the element-wise kernels.
pub const THREADS: u32 = 256;

/// A launch for a grid-stride loop over `n` items: blocks of [`THREADS`], at most 16 blocks per
/// multiprocessor of a 132-SM Hopper (more would only queue).
pub fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as usize).clamp(1, 132 * 16) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The kernel-name suffix of a dtype (`f32`, `f64`, `bf16`, `f16`), if `supported` lists it;
/// `what` names the op in the error.
pub fn dtype_suffix(dtype: DType, supported: &[DType], what: &str) -> Result<&'static str> {
    let name = match dtype {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "",
    };
    if name.is_empty() || !supported.contains(&dtype) {
        bail!("{what} (cuda): dtype {dtype:?} not supported (only {supported:?})");
    }
    Ok(name)
}

/// A crate's embedded PTX module: its name (loaded once per device) and text.
pub struct PtxModule {
    pub name: &'static str,
    pub ptx: &'static str,
}

/// Runs the element-wise kernel `<kernel>_<dtype>(inputs…, out, sizes…)` of `module` as a
/// grid-stride loop over `n` items: the inputs' contiguous parts in order (the first one's dtype
/// picks the kernel: f32, bf16 or f16), `out` a new buffer of `out_len` elements that the kernel
/// writes entirely, then each size as an `i64`.
pub fn launch_elementwise<T: CudaDType + DeviceRepr>(
    module: &PtxModule,
    kernel: &str,
    inputs: &[(&CudaStorage, &Layout, &str)],
    out_len: usize,
    n: usize,
    sizes: &[i64],
) -> Result<CudaStorage> {
    let Some(&(first, _, _)) = inputs.first() else {
        bail!("{kernel}: no inputs");
    };
    let dev = first.device().clone();
    let views = contiguous_views::<T>(inputs, kernel)?;
    // SAFETY: the kernel writes every element of `out` (the caller's contract).
    let mut out = unsafe { dev.alloc::<T>(out_len)? };
    if n > 0 {
        use DType::*;
        let suffix = dtype_suffix(first.dtype(), &[F32, BF16, F16], kernel)?;
        let func = load_kernel(
            &dev,
            module.name,
            module.ptx,
            &format!("{kernel}_{suffix}"),
            0,
        )?;
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        for view in &views {
            builder.arg(view);
        }
        builder.arg(&mut out);
        for size in sizes {
            builder.arg(size);
        }
        // SAFETY: the kernel takes the inputs, the output and the sizes in this order, as the
        // caller states; the buffers hold what the caller's sizes say.
        unsafe { builder.launch(grid_stride(n)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

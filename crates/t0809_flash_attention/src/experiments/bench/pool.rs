//! The device's current memory pool (Candle allocates with `cuMemAllocAsync`, from it): its
//! high-water mark of bytes in use, for peak memory (the release threshold, which keeps freed
//! memory cached between timed runs, is `shared::device::keep_freed_memory`).

use candle_core::cuda_backend::cudarc::driver::{result, sys};
use candle_core::CudaDevice;

fn handle(dev: &CudaDevice) -> Option<sys::CUmemoryPool> {
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().ok()?;
    unsafe { result::device::get_mem_pool(ctx.cu_device()) }.ok()
}

fn attr(pool: sys::CUmemoryPool, a: sys::CUmemPool_attribute) -> Option<u64> {
    let mut v: u64 = 0;
    unsafe { result::mem_pool::get_attribute(pool, a, &mut v as *mut u64 as *mut _) }.ok()?;
    Some(v)
}

/// Resets the high-water mark to the current use; returns the current use.
pub fn reset_peak(dev: &CudaDevice) -> Option<u64> {
    let pool = handle(dev)?;
    let mut zero: u64 = 0;
    unsafe {
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            &mut zero as *mut u64 as *mut _,
        )
    }
    .ok()?;
    attr(
        pool,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
    )
}

/// The high-water mark of bytes in use since the last [`reset_peak`].
pub fn peak(dev: &CudaDevice) -> Option<u64> {
    attr(
        handle(dev)?,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
    )
}

//! Launching `kernels/rmsnorm.cu` (compiled to PTX by `build.rs`) from the fused RMSNorm and
//! LayerNorm ops' `cuda_fwd`. Only built with the `cuda` feature.
//!
//! - Forward: `rmsnorm_fwd_{f32,bf16,f16}_v{1,V}`, 8 warps (rows) per block of 256 threads,
//!   one grid-stride sweep. The `_v4` (f32) / `_v8` (bf16, f16) variants move 16 bytes per lane
//!   and load; they need `d % V == 0` and 16-byte aligned row starts (`offset % V == 0`).
//! - Backward: `rmsnorm_bwd_*` writes `dx` into the packed `[dx | dg]` output and one row of
//!   per-block partial `dg` sums (f32, `d` floats of shared memory per block), then
//!   `rmsnorm_dg_reduce_*` sums the partial rows into the `dg` tail. The backward grid is one
//!   wave: `#SMs × resident blocks per SM` (from the occupancy calculator), at most one block per
//!   8 rows.
//! - LayerNorm ([`NormKernel::Layer`]) runs `layernorm_*` with the same grid: its forward adds the
//!   bias, its backward's partial rows are `[dg | db]` (2d floats) and the packed output
//!   `[dx | dg | db]`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rmsnorm.ptx"));
const MODULE: &str = "t0806_rmsnorm";
const THREADS: u32 = 256;
const WARPS: usize = THREADS as usize / 32;

/// Which fused norm a launch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKernel {
    /// `x·r ⊙ g` (`rmsnorm_*`): one parameter vector.
    Rms,
    /// `(x − μ)·r ⊙ g + b` (`layernorm_*`): gain and bias.
    Layer,
}

impl NormKernel {
    fn prefix(self) -> &'static str {
        match self {
            NormKernel::Rms => "rmsnorm",
            NormKernel::Layer => "layernorm",
        }
    }

    /// Parameter vectors of width `d` whose gradients the backward packs after `dx`.
    fn n_params(self) -> usize {
        match self {
            NormKernel::Rms => 1,
            NormKernel::Layer => 2,
        }
    }
}

/// Loads a kernel of our module (see `shared::cuda::load_kernel`).
fn kernel(dev: &CudaDevice, name: &str, smem: usize) -> Result<CudaFunction> {
    shared::cuda::load_kernel(dev, MODULE, PTX, name, smem)
}

/// The contiguous part of a storage, and its start offset (see `shared::cuda::contiguous_view`).
fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<(CudaView<'a, T>, usize)> {
    shared::cuda::contiguous_view(s, layout, &format!("fused RMSNorm (cuda): {what}"))
}

/// `(suffix, V)`: the kernel name suffix and the elements per 16-byte vector of a dtype.
fn suffix(dtype: DType) -> Result<(&'static str, usize)> {
    Ok(match dtype {
        DType::F32 => ("f32", 4),
        DType::BF16 => ("bf16", 8),
        DType::F16 => ("f16", 8),
        dt => bail!("fused RMSNorm (cuda): dtype {dt:?} not supported (f32, bf16, f16)"),
    })
}

/// The vector width to use: `V` when `d` and every start offset allow 16-byte accesses, else 1.
fn vector_width(v: usize, d: usize, offsets: &[usize]) -> usize {
    if d.is_multiple_of(v) && offsets.iter().all(|o| o.is_multiple_of(v)) {
        v
    } else {
        1
    }
}

/// The forwards' grid: one warp per row, 8 rows per block of 256 threads.
fn forward_grid(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(WARPS) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check_sizes(rows: usize, d: usize) -> Result<()> {
    if rows > i32::MAX as usize || d > i32::MAX as usize {
        bail!("fused RMSNorm (cuda): {rows} rows × {d} columns exceed the kernel's 32-bit indices");
    }
    Ok(())
}

/// Forward: `y (rows, d)` in the input dtype; `bias` is LayerNorm's (and required by it).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    norm: NormKernel,
    sx: &CudaStorage,
    lx: &Layout,
    sg: &CudaStorage,
    lg: &Layout,
    bias: Option<(&CudaStorage, &Layout)>,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<CudaStorage> {
    check_sizes(rows, d)?;
    if (norm == NormKernel::Layer) != bias.is_some() {
        bail!("fused norm (cuda): LayerNorm takes a bias, RMSNorm none");
    }
    if sx.dtype() != sg.dtype() || bias.is_some_and(|(sb, _)| sb.dtype() != sx.dtype()) {
        bail!(
            "fused {norm:?}Norm (cuda): x is {:?}, the gain {:?}, the bias {:?}",
            sx.dtype(),
            sg.dtype(),
            bias.map(|(sb, _)| sb.dtype())
        );
    }
    macro_rules! run {
        ($t:ty, $_a:ty) => {
            fwd::<$t>(norm, sx, lx, sg, lg, bias, rows, d, eps)
        };
    }
    shared::for_float_dtype!(sx.dtype(), "fused RMSNorm (cuda)", run, no_f64)
}

#[allow(clippy::too_many_arguments)]
fn fwd<T: CudaDType + DeviceRepr>(
    norm: NormKernel,
    sx: &CudaStorage,
    lx: &Layout,
    sg: &CudaStorage,
    lg: &Layout,
    bias: Option<(&CudaStorage, &Layout)>,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<CudaStorage> {
    let dev = sx.device().clone();
    let (x, ox) = view::<T>(sx, lx, "x")?;
    let (g, og) = view::<T>(sg, lg, "gain")?;
    let b = bias.map(|(sb, lb)| view::<T>(sb, lb, "bias")).transpose()?;
    let (name, v) = suffix(sx.dtype())?;
    let ob = b.as_ref().map_or(0, |(_, o)| *o);
    let v = vector_width(v, d, &[ox, og, ob]);
    // SAFETY: every element of y is written (every row, every column).
    let mut y = unsafe { dev.alloc::<T>(rows * d)? };
    if rows == 0 {
        return Ok(CudaStorage::wrap_cuda_slice(y, dev));
    }
    let func = kernel(&dev, &format!("{}_fwd_{name}_v{v}", norm.prefix()), 0)?;
    let cfg = forward_grid(rows);
    let (rows_i, d_i) = (rows as i32, d as i32);
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(&x).arg(&g);
    if let Some((bias, _)) = &b {
        launch.arg(bias);
    }
    launch.arg(&mut y).arg(&rows_i).arg(&d_i).arg(&eps);
    // SAFETY: the arguments match the kernel's signature; y holds rows·d elements.
    unsafe { launch.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}

/// Backward: the packed `[dx (rows·d) | dg (d)]` (RMSNorm) or `[dx | dg | db]` (LayerNorm) in
/// the input dtype.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    norm: NormKernel,
    sx: &CudaStorage,
    lx: &Layout,
    sg: &CudaStorage,
    lg: &Layout,
    sdy: &CudaStorage,
    ldy: &Layout,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<CudaStorage> {
    check_sizes(rows, d)?;
    if sx.dtype() != sg.dtype() || sx.dtype() != sdy.dtype() {
        bail!(
            "fused RMSNorm backward (cuda): x {:?}, gain {:?}, dy {:?} must share a dtype",
            sx.dtype(),
            sg.dtype(),
            sdy.dtype()
        );
    }
    macro_rules! run {
        ($t:ty, $_a:ty) => {
            bwd::<$t>(norm, sx, lx, sg, lg, sdy, ldy, rows, d, eps)
        };
    }
    shared::for_float_dtype!(sx.dtype(), "fused RMSNorm backward (cuda)", run, no_f64)
}

#[allow(clippy::too_many_arguments)]
fn bwd<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    norm: NormKernel,
    sx: &CudaStorage,
    lx: &Layout,
    sg: &CudaStorage,
    lg: &Layout,
    sdy: &CudaStorage,
    ldy: &Layout,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<CudaStorage> {
    let dev = sx.device().clone();
    let (x, ox) = view::<T>(sx, lx, "x")?;
    let (g, og) = view::<T>(sg, lg, "gain")?;
    let (dy, ody) = view::<T>(sdy, ldy, "dy")?;
    let (name, v) = suffix(sx.dtype())?;
    let v = vector_width(v, d, &[ox, og, ody]);
    let stream = dev.cuda_stream();
    let pd = norm.n_params() * d; // width of the parameters' gradients, [dg] or [dg | db]
    if rows == 0 {
        // No rows: dx is empty and the parameters' gradients are 0.
        return Ok(CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<T>(pd)?, dev));
    }

    // 1. dx and per-block partial parameter gradients.
    let smem = pd * std::mem::size_of::<f32>();
    let func = kernel(&dev, &format!("{}_bwd_{name}_v{v}", norm.prefix()), smem)?;
    let per_sm = func
        .occupancy_max_active_blocks_per_multiprocessor(THREADS, smem, None)
        .w()?;
    if per_sm == 0 {
        bail!("fused RMSNorm backward (cuda): width {d} needs {smem} bytes of shared memory per block, more than the GPU offers");
    }
    let sms = stream
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()? as usize;
    let blocks = rows.div_ceil(WARPS).min(sms * per_sm as usize).max(1);
    // SAFETY: dx (every row) and the parameter gradients (step 2) cover the whole packed buffer;
    // every block writes its whole row of partial sums.
    let mut packed = unsafe { dev.alloc::<T>(rows * d + pd)? };
    let mut partial = unsafe { dev.alloc::<f32>(blocks * pd)? };
    {
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (rows_i, d_i) = (rows as i32, d as i32);
        let mut dx = packed.slice_mut(..rows * d);
        let mut b = stream.launch_builder(&func);
        b.arg(&x)
            .arg(&g)
            .arg(&dy)
            .arg(&mut dx)
            .arg(&mut partial)
            .arg(&rows_i)
            .arg(&d_i)
            .arg(&eps);
        // SAFETY: the arguments match the kernel's signature; buffers are sized above.
        unsafe { b.launch(cfg) }.w()?;
    }

    // 2. dg (and db) = column sums of the partial rows.
    {
        let func = kernel(&dev, &format!("rmsnorm_dg_reduce_{name}"), 0)?;
        let cfg = LaunchConfig {
            grid_dim: (pd.div_ceil(32) as u32, 1, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let (parts_i, d_i) = (blocks as i32, pd as i32);
        let mut dg = packed.slice_mut(rows * d..);
        let mut b = stream.launch_builder(&func);
        b.arg(&partial).arg(&mut dg).arg(&parts_i).arg(&d_i);
        // SAFETY: partial holds blocks·pd floats, dg pd elements.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(packed, dev))
}

/// The residual add and RMSNorm in one pass: `h = x + a` and `y = RMSNorm(h)·g`, both `(rows, d)`
/// in the input dtype (`add_rmsnorm_fwd_*`, the forward's grid). `y` equals the separate norm's
/// bit for bit when `x` and `a` start 16-byte aligned (the same vector width); otherwise each
/// lane sums other elements and `y` may differ in the last bit.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_forward(
    sx: &CudaStorage,
    lx: &Layout,
    sa: &CudaStorage,
    la: &Layout,
    sg: &CudaStorage,
    lg: &Layout,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<(CudaStorage, CudaStorage)> {
    check_sizes(rows, d)?;
    if sx.dtype() != sa.dtype() || sx.dtype() != sg.dtype() {
        bail!(
            "fused add + RMSNorm (cuda): x is {:?}, the residual branch {:?}, the gain {:?}",
            sx.dtype(),
            sa.dtype(),
            sg.dtype()
        );
    }
    macro_rules! run {
        ($t:ty, $_a:ty) => {
            add_fwd::<$t>(sx, lx, sa, la, sg, lg, rows, d, eps)
        };
    }
    shared::for_float_dtype!(sx.dtype(), "fused add + RMSNorm (cuda)", run, no_f64)
}

#[allow(clippy::too_many_arguments)]
fn add_fwd<T: CudaDType + DeviceRepr>(
    sx: &CudaStorage,
    lx: &Layout,
    sa: &CudaStorage,
    la: &Layout,
    sg: &CudaStorage,
    lg: &Layout,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<(CudaStorage, CudaStorage)> {
    let dev = sx.device().clone();
    let (x, ox) = view::<T>(sx, lx, "x")?;
    let (a, oa) = view::<T>(sa, la, "residual branch")?;
    let (g, og) = view::<T>(sg, lg, "gain")?;
    let (name, v) = suffix(sx.dtype())?;
    let v = vector_width(v, d, &[ox, oa, og]);
    // SAFETY: every element of h and y is written (every row, every column).
    let mut h = unsafe { dev.alloc::<T>(rows * d)? };
    let mut y = unsafe { dev.alloc::<T>(rows * d)? };
    if rows > 0 {
        let func = kernel(&dev, &format!("add_rmsnorm_fwd_{name}_v{v}"), 0)?;
        let cfg = forward_grid(rows);
        let (rows_i, d_i) = (rows as i32, d as i32);
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&x).arg(&a).arg(&g).arg(&mut h).arg(&mut y);
        launch.arg(&rows_i).arg(&d_i).arg(&eps);
        // SAFETY: the arguments match the kernel's signature; h and y hold rows·d elements.
        unsafe { launch.launch(cfg) }.w()?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(h, dev.clone()),
        CudaStorage::wrap_cuda_slice(y, dev),
    ))
}

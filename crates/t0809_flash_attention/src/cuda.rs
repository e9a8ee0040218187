//! Launching our kernels (`kernels/flash_attn.cu` and, for Hopper, `kernels/flash_attn_hopper.cu`,
//! compiled to PTX by `build.rs`) from the custom ops' `cuda_fwd`. Only built with the `cuda`
//! feature.
//!
//! Kernel choice:
//! - on a Hopper card (sm_90), bf16/f16 with `d = 64` or `128` and 16-byte-aligned inputs: the
//!   forward `flash_fwd_wgmma_{bf16,f16}_d{64,128}` (`kernels/flash_attn_hopper.cu`: warpgroup
//!   MMA from shared memory, TMA loads, warp specialisation; at `d = 64` from 2,048 queries its
//!   three-consumer instance `flash_fwd_wgmma3_*`, [`crate::hopper_forward_consumers`]), the
//!   backward `flash_bwd_wgmma_{bf16,f16}_d{64,128}` over 1,024 keys or more
//!   ([`crate::hopper_backward`]; at any length with `FlashKernels::WarpgroupMma`,
//!   [`crate::hopper_backward_with`]), else the mma.sync one below;
//! - bf16/f16 with `d = 32`, `64` or `128` and 16-byte-aligned inputs: the tensor-core kernels
//!   `flash_{fwd,bwd}_tc_{bf16,f16}_d{32,64,128}` (mma.sync m16n8k16, fp32 accumulators);
//! - f32 with `d = 32` or `64` and 16-byte-aligned inputs: `flash_{fwd,bwd}_tiled_f32_d{32,64}`,
//!   fp32 FMA with a 4 × 4 block of scores per thread;
//! - everything else (other head sizes ≤ 128): `flash_{fwd,bwd}_simple_{f32,bf16,f16}`,
//!   fp32 FMA, one score per thread at a time.
//!
//! The backward is three launches plus a memset: `D = rowsum(dO∘O)` (`flash_bwd_dot_*`), the main
//! kernel (dK, dV written directly into the packed output, dQ accumulated in an f32 buffer: with
//! atomics or `red.global.add` vector reductions, on Hopper with the TMA's bulk reduce-add),
//! then `dQ = scale·dQacc` converted into the packed output (`flash_bwd_dq_*`).
//!
//! The Hopper kernels read their tiles through TMA tensor maps of the whole `(bh, n, d)` tensors:
//! padded key rows (from a head's key length to `n_k`) are read as they are in memory, not as
//! zeros, and must be finite.

use crate::cpu::Dims;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result};
use half::{bf16, f16};
use shared::kernels::FlashKernels;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attn.ptx"));
const MODULE: &str = "t0809_flash_attn";
/// The Hopper kernels (`compute_90a`; a module without kernels in a build for another card).
const HOPPER_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attn_hopper.ptx"));
const HOPPER_MODULE: &str = "t0809_flash_attn_hopper";

/// Keys per tile of the warpgroup-MMA forward.
const WG_FWD_BC: usize = 128;
/// The warpgroup-MMA forward's shape: a producer warpgroup and `consumers` warpgroups of 64
/// queries each (chosen by [`crate::hopper_forward_consumers`]), K and V rings of `stages`
/// (`FWD_WGMMA` in the `.cu` file): two consumers with 2 stages (`flash_fwd_wgmma_*`), or three
/// with 3 stages (`flash_fwd_wgmma3_*`, d 64 only).
#[derive(Debug, Clone, Copy)]
struct FwdTiling {
    consumers: usize,
    stages: usize,
}
impl FwdTiling {
    fn for_call(d: usize, n_q: usize) -> Self {
        match crate::hopper_forward_consumers(d, n_q) {
            3 => Self {
                consumers: 3,
                stages: 3,
            },
            _ => Self {
                consumers: 2,
                stages: 2,
            },
        }
    }
    /// The kernel's name: `flash_fwd_wgmma{3 if three consumers}_{suffix}_d{d}`.
    fn kernel(self, suffix: &str, d: usize) -> String {
        let three = if self.consumers == 3 { "3" } else { "" };
        format!("flash_fwd_wgmma{three}_{suffix}_d{d}")
    }
    /// Queries per block: 64 per consumer warpgroup.
    fn rows(self) -> usize {
        64 * self.consumers
    }
    /// Q and the K and V rings in 16-bit elements, 1024 bytes to align them to the swizzle
    /// pattern, and the mbarriers (`fwd_smem_bytes` in the `.cu` file).
    fn smem(self, d: usize) -> usize {
        let halves = self.rows() * d + 2 * self.stages * WG_FWD_BC * d;
        halves * 2 + 1024 + 8 * (1 + 4 * self.stages)
    }
}
/// Warpgroup-MMA backward (d 64 and 128): a producer and two consumer warpgroups, 128 keys per
/// block, query tiles of 64 in rings of 2 stages.
const WG_BWD_BC: usize = 128;
const WG_BWD_BR: usize = 64;
const WG_STAGES: usize = 2;
/// Row stride (floats) of a d 128 consumer's f32 dQ half in shared memory (`DQ_STRIDE`).
const WG_BWD128_DQ_STRIDE: usize = 68;
/// The backward's shared memory, as the `.cu` file counts it (`bwd_smem_bytes`): K and V, the Q
/// and dO rings and two dSᵀ buffers in 16-bit elements (at d 128 a Pᵀ buffer too), both
/// consumers' f32 dQ staging (at d 128 64 columns each, rows padded), 1024 bytes of alignment and
/// the mbarriers.
fn wg_bwd_smem(d: usize) -> usize {
    let (bc, br) = (WG_BWD_BC, WG_BWD_BR);
    let barriers = 8 * (1 + 2 * WG_STAGES + 4);
    if d == 128 {
        let halves = 2 * bc * d + 2 * WG_STAGES * br * d + 3 * bc * br;
        return halves * 2 + 2 * br * WG_BWD128_DQ_STRIDE * 4 + 1024 + barriers;
    }
    let halves = 2 * bc * d + 2 * WG_STAGES * br * d + 2 * bc * br;
    halves * 2 + 2 * br * d * 4 + 1024 + barriers
}

/// A TMA tensor map (`CUtensorMap`): 128 opaque bytes the kernel takes by value.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct TensorMap([u64; 16]);

// SAFETY: plain bytes, laid out as the driver's CUtensorMap.
unsafe impl DeviceRepr for TensorMap {}

/// The tensor map of a contiguous `(bh, n, d)` bf16/f16 tensor at device address `ptr`, seen as
/// three dimensions (column, row, head): boxes of 64 columns × `rows` rows of one head, copied
/// with the 128-byte swizzle; rows past a head's end read as zeros.
fn tensor_map(ptr: u64, dtype: DType, [bh, n, d]: [usize; 3], rows: usize) -> Result<TensorMap> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let data_type = match dtype {
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        dt => bail!("flash attention (cuda): no tensor map for {dt:?}"),
    };
    let dims = [d as u64, n as u64, bh as u64];
    let strides = [(d * 2) as u64, (n * d * 2) as u64]; // bytes, of dimensions 1 and 2
    let boxes = [64u32, rows as u32, 1];
    let element_strides = [1u32; 3];
    let mut map = TensorMap([0; 16]);
    // SAFETY: every array has the rank's length (strides one less); `map` is 128 bytes, 64-byte
    // aligned; the driver only encodes (the memory at `ptr` is read by the kernel later).
    unsafe {
        sys::cuTensorMapEncodeTiled(
            (&mut map as *mut TensorMap).cast::<sys::CUtensorMap>(),
            data_type,
            3,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
        .w()?;
    }
    Ok(map)
}

/// Whether `dev` runs the Hopper kernels: compute capability 9.0 and a build that has them.
pub fn hopper_kernels_on(dev: &CudaDevice) -> bool {
    // The module's text is searched once (a megabyte), not on every attention call.
    static BUILT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *BUILT.get_or_init(|| HOPPER_PTX.contains("flash_fwd_wgmma"))
        && matches!(dev.cuda_stream().context().compute_capability(), Ok((9, 0)))
}

/// Tensor-core kernels: forward 4 warps, tiles of 64 queries × 64 keys; backward 8 warps,
/// 128 keys per block × query tiles of 64 (d ≤ 64) or 32 (d = 128).
const TC_FWD_WARPS: u32 = 4;
const TC_FWD_BR: usize = 64;
const TC_BWD_WARPS: u32 = 8;
const TC_BWD_BC: usize = 128;
/// Simple kernels: 256 threads, 32 × 32 tiles, rows padded to 129 floats.
const S_THREADS: u32 = 256;
const S_TILE: usize = 32;
const S_ROW: usize = 129;

fn tc_bwd_br(d: usize) -> usize {
    if d <= 64 {
        64
    } else {
        32
    }
}

/// Shared memory of each kernel, matching the layouts in the `.cu` file.
fn tc_fwd_smem(d: usize) -> usize {
    3 * TC_FWD_BR * d * 2 // sQ, sK, sV in 16-bit elements
}
fn tc_bwd_smem(d: usize) -> usize {
    let br = tc_bwd_br(d);
    (2 * TC_BWD_BC * d + 2 * br * d + TC_BWD_BC * (br + 8)) * 2 + 2 * br * 4
}
/// Register-tiled f32 kernels: 256 threads, 64 × 64 tiles, rows padded to d + 4 floats.
const R_THREADS: u32 = 256;
const R_TILE: usize = 64;
fn tiled_fwd_smem(d: usize) -> usize {
    (3 * R_TILE * (d + 4) + R_TILE * (R_TILE + 4)) * 4
}
fn tiled_bwd_smem(d: usize) -> usize {
    (4 * R_TILE * (d + 4) + 2 * R_TILE * (R_TILE + 4) + 2 * R_TILE) * 4
}
fn simple_fwd_smem() -> usize {
    (3 * S_TILE * S_ROW + S_TILE * (S_TILE + 1)) * 4
}
fn simple_bwd_smem() -> usize {
    (4 * S_TILE * S_ROW + 2 * S_TILE * (S_TILE + 1) + 2 * S_TILE) * 4
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
    shared::cuda::contiguous_view(s, layout, &format!("flash attention (cuda): {what}"))
}

fn check_dims(dims: Dims) -> Result<()> {
    if dims.d != dims.d_v || dims.d > 128 {
        bail!(
            "flash attention on CUDA needs d_head = d_v ≤ 128, got d_head {} and d_v {}",
            dims.d,
            dims.d_v
        );
    }
    if dims.bh > 65_535 {
        bail!(
            "flash attention on CUDA: batch·heads = {} exceeds the grid limit 65535",
            dims.bh
        );
    }
    if dims.n_q > i32::MAX as usize / 2 || dims.n_k > i32::MAX as usize / 2 {
        bail!(
            "flash attention on CUDA: sequence too long (n_q {}, n_k {})",
            dims.n_q,
            dims.n_k
        );
    }
    Ok(())
}

/// Which family runs on `dev`: [`crate::cuda_kernel_family`] (`suffix` names the kernels' dtype).
fn family(
    dev: &CudaDevice,
    suffix: &str,
    dims: Dims,
    offsets: &[usize],
    kernels: FlashKernels,
) -> crate::CudaKernelFamily {
    let dtype = match suffix {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    crate::cuda_kernel_family(dtype, dims.d, offsets, kernels, hopper_kernels_on(dev))
}

/// `q`, `k`, `v`: storage and layout of each.
pub type Qkv<'a> = [(&'a CudaStorage, &'a Layout); 3];

/// The masking of one call: causal or not, and the real keys of each `(batch, head)` (key
/// padding), `None` when every key is real.
pub type Masking<'a> = (bool, Option<&'a [usize]>);

/// The per-`(batch, head)` key lengths on the device (`int`), or `None`.
fn device_lengths(
    dev: &CudaDevice,
    lengths: Option<&[usize]>,
    bh: usize,
) -> Result<Option<CudaSlice<i32>>> {
    let Some(lengths) = lengths else {
        return Ok(None);
    };
    if lengths.len() != bh {
        bail!(
            "flash attention (cuda): {} key lengths for {bh} (batch, head) pairs",
            lengths.len()
        );
    }
    let host: Vec<i32> = lengths
        .iter()
        .map(|&n| n.min(i32::MAX as usize) as i32)
        .collect();
    Ok(Some(dev.cuda_stream().clone_htod(&host).w()?))
}

/// Pushes the kernels' last argument, `const int* kv_len`: the lengths, or a null pointer.
fn push_lengths<'a>(
    b: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>,
    lengths: &'a Option<CudaSlice<i32>>,
    null: &'a u64,
) {
    match lengths {
        Some(l) => b.arg(l),
        None => b.arg(null),
    };
}

/// Forward: returns `(O, L)` storages, `O (bh, n_q, d)` in the input dtype, `L (bh, n_q)` f32.
pub fn forward(
    qkv: Qkv<'_>,
    dims: Dims,
    scale: f32,
    masking: Masking<'_>,
    kernels: FlashKernels,
) -> Result<(CudaStorage, CudaStorage)> {
    check_dims(dims)?;
    match qkv[0].0.dtype() {
        DType::F32 => fwd::<f32>(qkv, dims, scale, masking, kernels, "f32"),
        DType::BF16 => fwd::<bf16>(qkv, dims, scale, masking, kernels, "bf16"),
        DType::F16 => fwd::<f16>(qkv, dims, scale, masking, kernels, "f16"),
        dt => bail!("flash attention (cuda): dtype {dt:?} not supported (f32, f16, bf16)"),
    }
}

fn fwd<T: CudaDType + DeviceRepr>(
    [(s1, l1), (s2, l2), (s3, l3)]: Qkv<'_>,
    dims: Dims,
    scale: f32,
    (causal, lengths): Masking<'_>,
    kernels: FlashKernels,
    suffix: &str,
) -> Result<(CudaStorage, CudaStorage)> {
    let dev = s1.device().clone();
    let kv_len = device_lengths(&dev, lengths, dims.bh)?;
    let null = 0u64;
    let (q, oq) = view::<T>(s1, l1, "q")?;
    let (k, ok) = view::<T>(s2, l2, "k")?;
    let (v, ov) = view::<T>(s3, l3, "v")?;
    let Dims {
        bh, n_q, n_k, d, ..
    } = dims;
    // SAFETY: every element of O and L is written by the kernel (rows < n_q, all columns).
    let mut o = unsafe { dev.alloc::<T>(bh * n_q * d)? };
    let mut lse = unsafe { dev.alloc::<f32>(bh * n_q)? };
    let family = family(&dev, suffix, dims, &[oq, ok, ov], kernels);
    let (name, rows, threads, smem) = match family {
        crate::CudaKernelFamily::WarpgroupMma => {
            let outputs = (&mut o, &mut lse);
            fwd_wgmma(
                &dev,
                [&q, &k, &v],
                dims,
                outputs,
                (scale, causal),
                &kv_len,
                suffix,
            )?;
            return Ok((
                CudaStorage::wrap_cuda_slice(o, dev.clone()),
                CudaStorage::wrap_cuda_slice(lse, dev),
            ));
        }
        crate::CudaKernelFamily::TensorCores => (
            format!("flash_fwd_tc_{suffix}_d{d}"),
            TC_FWD_BR,
            32 * TC_FWD_WARPS,
            tc_fwd_smem(d),
        ),
        crate::CudaKernelFamily::Fp32Tiled => (
            format!("flash_fwd_tiled_f32_d{d}"),
            R_TILE,
            R_THREADS,
            tiled_fwd_smem(d),
        ),
        crate::CudaKernelFamily::Fp32Fma => (
            format!("flash_fwd_simple_{suffix}"),
            S_TILE,
            S_THREADS,
            simple_fwd_smem(),
        ),
    };
    let func = kernel(&dev, &name, smem)?;
    let cfg = LaunchConfig {
        grid_dim: (n_q.div_ceil(rows) as u32, bh as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let (n_q_i, n_k_i, d_i, causal_i) = (n_q as i32, n_k as i32, d as i32, causal as i32);
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&q)
        .arg(&k)
        .arg(&v)
        .arg(&mut o)
        .arg(&mut lse)
        .arg(&n_q_i)
        .arg(&n_k_i)
        .arg(&d_i)
        .arg(&scale_log2)
        .arg(&causal_i);
    push_lengths(&mut b, &kv_len, &null);
    // SAFETY: argument list matches the kernel signature; buffers are sized above; kv_len holds
    // bh entries.
    unsafe { b.launch(cfg) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(o, dev.clone()),
        CudaStorage::wrap_cuda_slice(lse, dev),
    ))
}

/// The tensor maps of `tiles` — (tensor, its rows per head, the rows of one box) — of the 16-bit
/// dtype `suffix` with `bh` heads of width `d`, and the guards that keep the tensors' memory
/// ordered on `stream`; drop them after the launch.
fn tensor_maps<'a, T: CudaDType>(
    stream: &'a CudaStream,
    suffix: &str,
    bh: usize,
    d: usize,
    tiles: &[(&'a CudaView<'_, T>, usize, usize)],
) -> Result<(Vec<TensorMap>, Vec<SyncOnDrop<'a>>)> {
    let dtype = if suffix == "bf16" {
        DType::BF16
    } else {
        DType::F16
    };
    let mut maps = Vec::with_capacity(tiles.len());
    let mut reads = Vec::with_capacity(tiles.len());
    for &(view, n, rows) in tiles {
        let (ptr, read) = view.device_ptr(stream);
        maps.push(tensor_map(ptr, dtype, [bh, n, d], rows)?);
        reads.push(read);
    }
    Ok((maps, reads))
}

/// A kernel of the Hopper module and its launch shape: `grid`, 128 threads per warpgroup (a
/// producer and `consumers`), `smem` bytes of dynamic shared memory.
fn hopper_kernel(
    dev: &CudaDevice,
    name: &str,
    (smem, consumers): (usize, usize),
    grid: (u32, u32, u32),
) -> Result<(CudaFunction, LaunchConfig)> {
    let func = shared::cuda::load_kernel(dev, HOPPER_MODULE, HOPPER_PTX, name, smem)?;
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: (128 * (consumers as u32 + 1), 1, 1),
        shared_mem_bytes: smem as u32,
    };
    Ok((func, cfg))
}

/// The Hopper forward (`FwdTiling::kernel` names the instance): Q, K and V handed over as
/// tensor maps, O and L as pointers.
fn fwd_wgmma<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    [q, k, v]: [&CudaView<'_, T>; 3],
    dims: Dims,
    (o, lse): (&mut CudaSlice<T>, &mut CudaSlice<f32>),
    (scale, causal): (f32, bool),
    kv_len: &Option<CudaSlice<i32>>,
    suffix: &str,
) -> Result<()> {
    let Dims {
        bh, n_q, n_k, d, ..
    } = dims;
    let stream = dev.cuda_stream();
    let tiling = FwdTiling::for_call(d, n_q);
    let tiles = [
        (q, n_q, tiling.rows()),
        (k, n_k, WG_FWD_BC),
        (v, n_k, WG_FWD_BC),
    ];
    let (maps, _reads) = tensor_maps(&stream, suffix, bh, d, &tiles)?;
    let grid = (n_q.div_ceil(tiling.rows()) as u32, bh as u32, 1);
    let (func, cfg) = hopper_kernel(
        dev,
        &tiling.kernel(suffix, d),
        (tiling.smem(d), tiling.consumers),
        grid,
    )?;
    let (n_q_i, n_k_i, d_i, causal_i) = (n_q as i32, n_k as i32, d as i32, causal as i32);
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let null = 0u64;
    let mut b = stream.launch_builder(&func);
    b.arg(&maps[0]).arg(&maps[1]).arg(&maps[2]).arg(o).arg(lse);
    b.arg(&n_q_i)
        .arg(&n_k_i)
        .arg(&d_i)
        .arg(&scale_log2)
        .arg(&causal_i);
    push_lengths(&mut b, kv_len, &null);
    // SAFETY: the arguments match the kernel's signature; the maps describe q, k and v, whose
    // pointers stay valid (and ordered on this stream) until the guards drop after the launch.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// The Hopper backward `flash_bwd_wgmma_{suffix}_d{64,128}`: Q, K, V and dO as tensor maps, L and D
/// (`stats`) as pointers; writes dK and dV and adds into the f32 dQ buffer (`outputs`).
fn bwd_wgmma<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    [q, k, v, d_o]: [&CudaView<'_, T>; 4],
    (lse, dsum): (&CudaView<'_, f32>, &CudaSlice<f32>),
    (dq_acc, dk, dv): BwdOutputs<'_, '_, T>,
    (dims, scale, causal): (Dims, f32, bool),
    kv_len: &Option<CudaSlice<i32>>,
    suffix: &str,
) -> Result<()> {
    let Dims {
        bh, n_q, n_k, d, ..
    } = dims;
    let stream = dev.cuda_stream();
    let tiles = [
        (q, n_q, WG_BWD_BR),
        (k, n_k, WG_BWD_BC),
        (v, n_k, WG_BWD_BC),
        (d_o, n_q, WG_BWD_BR),
    ];
    let (maps, _reads) = tensor_maps(&stream, suffix, bh, d, &tiles)?;
    let grid = (n_k.div_ceil(WG_BWD_BC) as u32, bh as u32, 1);
    let (func, cfg) = hopper_kernel(
        dev,
        &format!("flash_bwd_wgmma_{suffix}_d{d}"),
        (wg_bwd_smem(d), 2),
        grid,
    )?;
    let (n_q_i, n_k_i, d_i, causal_i) = (n_q as i32, n_k as i32, d as i32, causal as i32);
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let null = 0u64;
    let mut b = stream.launch_builder(&func);
    b.arg(&maps[0]).arg(&maps[1]).arg(&maps[2]).arg(&maps[3]);
    b.arg(lse).arg(dsum).arg(dq_acc).arg(dk).arg(dv);
    b.arg(&n_q_i)
        .arg(&n_k_i)
        .arg(&d_i)
        .arg(&scale)
        .arg(&scale_log2)
        .arg(&causal_i);
    push_lengths(&mut b, kv_len, &null);
    // SAFETY: the arguments match the kernel's signature; the maps describe q, k, v and d_o, whose
    // pointers stay valid (and ordered on this stream) until the guards drop after the launch;
    // dK and dV have n_k rows per head, the dQ buffer n_q.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// The backward's outputs: the f32 dQ buffer, dK and dV.
type BwdOutputs<'a, 'b, T> = (
    &'a mut CudaSlice<f32>,
    &'a mut CudaViewMut<'b, T>,
    &'a mut CudaViewMut<'b, T>,
);

/// Storages and layouts the backward reads.
pub struct BwdInputs<'a> {
    pub q: (&'a CudaStorage, &'a Layout),
    pub k: (&'a CudaStorage, &'a Layout),
    pub v: (&'a CudaStorage, &'a Layout),
    pub o: (&'a CudaStorage, &'a Layout),
    pub d_o: (&'a CudaStorage, &'a Layout),
    pub lse: (&'a CudaStorage, &'a Layout),
}

/// Backward: the packed `[dQ | dK | dV]` in the input dtype.
pub fn backward(
    inp: BwdInputs<'_>,
    dims: Dims,
    scale: f32,
    masking: Masking<'_>,
    kernels: FlashKernels,
) -> Result<CudaStorage> {
    check_dims(dims)?;
    match inp.q.0.dtype() {
        DType::F32 => bwd::<f32>(inp, dims, scale, masking, kernels, "f32"),
        DType::BF16 => bwd::<bf16>(inp, dims, scale, masking, kernels, "bf16"),
        DType::F16 => bwd::<f16>(inp, dims, scale, masking, kernels, "f16"),
        dt => bail!("flash attention backward (cuda): dtype {dt:?} not supported (f32, f16, bf16)"),
    }
}

/// `D = rowsum(dO ∘ O)` of `rows` rows of width `d`, 8 lanes per row: `(rows,)` in f32.
fn row_dots<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    d_o: &CudaView<'_, T>,
    o: &CudaView<'_, T>,
    rows: usize,
    d: usize,
    suffix: &str,
) -> Result<CudaSlice<f32>> {
    // SAFETY: the kernel writes every one of the `rows` entries.
    let mut dsum = unsafe { dev.alloc::<f32>(rows)? };
    let func = kernel(dev, &format!("flash_bwd_dot_{suffix}"), 0)?;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(256 / 8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows_i, d_i) = (rows as i32, d as i32);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(d_o).arg(o).arg(&mut dsum).arg(&rows_i).arg(&d_i);
    unsafe { b.launch(cfg) }.w()?;
    Ok(dsum)
}

/// The backward kernel of `family` for head size `d`: its name, key rows per block, threads per
/// block and dynamic shared memory in bytes.
fn bwd_launch_shape(
    family: crate::CudaKernelFamily,
    suffix: &str,
    d: usize,
) -> (String, usize, u32, usize) {
    match family {
        // On Hopper the mma.sync backward where the Hopper one does not run (d 32; d 64 and 128
        // below HOPPER_BACKWARD_MIN_KEYS keys with FlashKernels::Auto).
        crate::CudaKernelFamily::WarpgroupMma | crate::CudaKernelFamily::TensorCores => (
            format!("flash_bwd_tc_{suffix}_d{d}"),
            TC_BWD_BC,
            32 * TC_BWD_WARPS,
            tc_bwd_smem(d),
        ),
        crate::CudaKernelFamily::Fp32Tiled => (
            format!("flash_bwd_tiled_f32_d{d}"),
            R_TILE,
            R_THREADS,
            tiled_bwd_smem(d),
        ),
        crate::CudaKernelFamily::Fp32Fma => (
            format!("flash_bwd_simple_{suffix}"),
            S_TILE,
            S_THREADS,
            simple_bwd_smem(),
        ),
    }
}

fn bwd<T: CudaDType + DeviceRepr>(
    inp: BwdInputs<'_>,
    dims: Dims,
    scale: f32,
    (causal, lengths): Masking<'_>,
    kernels: FlashKernels,
    suffix: &str,
) -> Result<CudaStorage> {
    let dev = inp.q.0.device().clone();
    let kv_len = device_lengths(&dev, lengths, dims.bh)?;
    let null = 0u64;
    let (q, oq) = view::<T>(inp.q.0, inp.q.1, "q")?;
    let (k, ok) = view::<T>(inp.k.0, inp.k.1, "k")?;
    let (v, ov) = view::<T>(inp.v.0, inp.v.1, "v")?;
    let (o, _) = view::<T>(inp.o.0, inp.o.1, "o")?;
    let (d_o, odo) = view::<T>(inp.d_o.0, inp.d_o.1, "d_o")?;
    let (lse, _) = view::<f32>(inp.lse.0, inp.lse.1, "lse")?;
    let Dims {
        bh, n_q, n_k, d, ..
    } = dims;
    let (nq_el, nk_el) = (bh * n_q * d, bh * n_k * d);
    let stream = dev.cuda_stream();

    // 1. D = rowsum(dO ∘ O), 8 lanes per row.
    let dsum = row_dots(&dev, &d_o, &o, bh * n_q, d, suffix)?;

    // 2. The main kernel: dK, dV into the packed output; dQ into an f32 accumulator.
    // SAFETY: dK, dV (every key row) and dQ (step 3) cover the whole packed buffer.
    let mut packed = unsafe { dev.alloc::<T>(nq_el + 2 * nk_el)? };
    let mut dq_acc = dev.alloc_zeros::<f32>(nq_el)?;
    let family = family(&dev, suffix, dims, &[oq, ok, ov, odo], kernels);
    if family == crate::CudaKernelFamily::WarpgroupMma
        && crate::hopper_backward_with(kernels, d, n_k)
    {
        let (_, mut rest) = packed.split_at_mut(nq_el);
        let (mut dk, mut dv) = rest.split_at_mut(nk_el);
        let outputs = (&mut dq_acc, &mut dk, &mut dv);
        let shape = (dims, scale, causal);
        bwd_wgmma(
            &dev,
            [&q, &k, &v, &d_o],
            (&lse, &dsum),
            outputs,
            shape,
            &kv_len,
            suffix,
        )?;
    } else {
        let (name, keys, threads, smem) = bwd_launch_shape(family, suffix, d);
        let func = kernel(&dev, &name, smem)?;
        let cfg = LaunchConfig {
            grid_dim: (n_k.div_ceil(keys) as u32, bh as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (n_q_i, n_k_i, d_i, causal_i) = (n_q as i32, n_k as i32, d as i32, causal as i32);
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        let (_, mut rest) = packed.split_at_mut(nq_el);
        let (mut dk, mut dv) = rest.split_at_mut(nk_el);
        let mut b = stream.launch_builder(&func);
        b.arg(&q)
            .arg(&k)
            .arg(&v)
            .arg(&d_o)
            .arg(&lse)
            .arg(&dsum)
            .arg(&mut dq_acc)
            .arg(&mut dk)
            .arg(&mut dv);
        b.arg(&n_q_i)
            .arg(&n_k_i)
            .arg(&d_i)
            .arg(&scale)
            .arg(&scale_log2)
            .arg(&causal_i);
        push_lengths(&mut b, &kv_len, &null);
        unsafe { b.launch(cfg) }.w()?;
    }

    // 3. dQ = scale · dQacc in the output dtype.
    {
        let func = kernel(&dev, &format!("flash_bwd_dq_{suffix}"), 0)?;
        let blocks = nq_el.div_ceil(4 * 256).clamp(1, 65_535) as u32; // 4 elements per thread
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let n = nq_el as u64;
        let mut dq = packed.slice_mut(..nq_el);
        let mut b = stream.launch_builder(&func);
        b.arg(&dq_acc).arg(&mut dq).arg(&n).arg(&scale);
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(packed, dev))
}

//! Choosing where and in what precision to run: `--device auto|cpu|cuda[:N]`, `--dtype f32|bf16|f16`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::str::FromStr;

/// What the user asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA when this build has the `cuda` feature and a GPU answers, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(this_process_gpu()?)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => Ok(Self::Cuda(n.parse().with_context(|| {
                    format!("device '{other}': expected cuda:N with N a GPU index")
                })?)),
                None => bail!("unknown device '{other}': use auto, cpu, cuda or cuda:N"),
            },
        }
    }
}

/// The GPU `--device cuda` (and `auto`) means: 0 for a process on its own, and its rank in a
/// group started by [`crate::process_group::launch`] (`MODULE08_RANK`), one GPU per rank on one
/// machine (the launcher starts every rank on this machine), as `torchrun` gives each process the
/// GPU of its local rank.
pub fn this_process_gpu() -> Result<usize> {
    gpu_of_rank(std::env::var(crate::process_group::RANK).ok().as_deref())
}

/// [`this_process_gpu`] for the value of `MODULE08_RANK` (`None`: not set).
fn gpu_of_rank(rank: Option<&str>) -> Result<usize> {
    match rank {
        None => Ok(0),
        Some(r) => r
            .parse()
            .with_context(|| format!("{}={r}: expected a rank number", crate::process_group::RANK)),
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The device picked, with a human-readable description for logs and `results.json`.
#[derive(Debug, Clone)]
pub struct PickedDevice {
    pub device: Device,
    pub description: String,
}

/// Resolves a [`DeviceChoice`] to a Candle device and says what was picked.
pub fn pick_device(choice: DeviceChoice) -> Result<PickedDevice> {
    let cuda_built = candle_core::utils::cuda_is_available();
    let picked = match choice {
        DeviceChoice::Cpu => cpu(),
        DeviceChoice::Cuda(n) => {
            if !cuda_built {
                bail!(
                    "--device cuda:{n} asked for, but this binary was built without CUDA: \
                     rebuild with `--features cuda`"
                );
            }
            let device = open_cuda(n).with_context(|| opening_gpu(n))?;
            PickedDevice {
                device,
                description: format!("cuda:{n} ({})", gpu_name(n)),
            }
        }
        DeviceChoice::Auto => {
            if cuda_built {
                let n = this_process_gpu()?;
                let in_group = std::env::var(crate::process_group::RANK).is_ok();
                match open_cuda(n) {
                    Ok(device) => PickedDevice {
                        device,
                        description: format!("cuda:{n} ({})", gpu_name(n)),
                    },
                    // A rank that fell back to the CPU would leave its group waiting for it.
                    Err(e) if in_group => return Err(e).context(opening_gpu(n)),
                    Err(e) => {
                        eprintln!("note: built with CUDA but no GPU answered ({e}); using the CPU");
                        cpu()
                    }
                }
            } else {
                cpu()
            }
        }
    };
    Ok(picked)
}

/// What failing to open CUDA device `n` says; in a launched group, also how ranks map to GPUs.
fn opening_gpu(n: usize) -> String {
    match std::env::var(crate::process_group::RANK) {
        Ok(rank) => format!(
            "opening CUDA device {n} (rank {rank} of a launched group runs on cuda:{rank}: start \
             at most as many ranks as GPUs)"
        ),
        Err(_) => format!("opening CUDA device {n}"),
    }
}

/// Opens CUDA device `n` the way every program here uses it: Candle's device, with freed memory
/// kept in the pool for reuse ([`keep_freed_memory`]) and the backward pass's gradient sums formed
/// by [`crate::add::add`] (16 bytes per thread; [`crate::add::install_gradient_sum`]).
pub fn open_cuda(n: usize) -> Result<Device> {
    let device = Device::new_cuda(n)?;
    keep_freed_memory(&device, true)?;
    crate::add::install_gradient_sum();
    Ok(device)
}

fn cpu() -> PickedDevice {
    one_cpu_thread_pool();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    PickedDevice {
        device: Device::Cpu,
        description: format!("cpu ({threads} threads)"),
    }
}

/// Gives the cores to one thread pool, unless the user chose otherwise with `CANDLE_NUM_THREADS`.
///
/// Candle's CPU backend has two pools: its own for element-wise ops, whose workers spin for a
/// while after each op waiting for the next, and rayon's, which runs matrix products (and this
/// project's CPU kernels, [`crate::cpu`]). Both are as large as the machine, so while a matmul
/// runs on rayon's threads the other pool's workers spin on the same cores (`perf` on the 2-core
/// build machine: 37 % of all samples, `reports/cpu-bench/runs/2026-12-05/perf/`). So candle's
/// element-wise pool is given one thread (the caller); the cores go to the matmuls and the fused
/// kernels, which are where the time is. This must run before candle's first element-wise op and before rayon's pool exists (both read
/// the variables once): [`crate::cpu::in_pool`], which every binary's `main` calls first, runs it;
/// [`pick_device`] runs it again for library users (a no-op the second time).
///
/// The matmul's thread count is set as well (`RAYON_NUM_THREADS`, to the cores this process may
/// use, which is also rayon's own default): without it candle works the count out again for every
/// matmul by parsing `/proc/cpuinfo`, about a quarter of a CPU decode step's `perf` samples (same
/// folder).
pub(crate) fn one_cpu_thread_pool() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
        }
    });
}

/// The GPU's marketing name from `nvidia-smi`, or "NVIDIA GPU" when it cannot be asked.
pub fn gpu_name(index: usize) -> String {
    std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name",
            "--format=csv,noheader",
            &format!("--id={index}"),
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "NVIDIA GPU".to_string())
}

/// Floating-point precisions the binaries accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DTypeChoice {
    /// f32 on the CPU; on CUDA the binary's GPU default ([`crate::cli::CommonArgs::setup_mixed`]:
    /// bf16-mixed where the binary trains in mixed precision, else f32).
    Auto,
    F32,
    /// Everything in bf16: parameters, activations, AdamW moments ("pure" bf16).
    Bf16,
    F16,
    /// Mixed precision: f32 parameters and AdamW moments (the master weights, updated and clipped
    /// in f32), bf16 matmuls and activations. Training builds the model on bf16 copies of the
    /// masters, which AdamW refreshes after every step (`shared::train::copies_for`); a model
    /// that only runs forward casts each weight to bf16 where it is used.
    Bf16Mixed,
}

impl FromStr for DTypeChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" | "half" => Ok(Self::F16),
            "bf16-mixed" | "mixed" => Ok(Self::Bf16Mixed),
            other => bail!("unknown dtype '{other}': use auto, f32, bf16, f16 or bf16-mixed"),
        }
    }
}

impl DTypeChoice {
    /// The dtype of the parameters (and of the optimiser's moments); `Auto` before it is resolved
    /// on a device reads as f32.
    pub fn dtype(self) -> DType {
        match self {
            Self::Auto | Self::F32 | Self::Bf16Mixed => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    /// The dtype of the activations and matmuls.
    pub fn compute_dtype(self) -> DType {
        match self {
            Self::Bf16Mixed => DType::BF16,
            other => other.dtype(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::Bf16Mixed => "bf16-mixed",
        }
    }
}

/// Checks that `dtype` is usable on `device`: Candle computes bf16/f16 on the CPU too, but
/// slowly and only for some ops, so the binaries train in f32 on the CPU and say so.
pub fn check_dtype(device: &Device, choice: DTypeChoice) -> Result<DType> {
    if device.is_cpu() && !matches!(choice, DTypeChoice::F32 | DTypeChoice::Auto) {
        bail!(
            "--dtype {} is for the GPU: Candle's CPU backend has no fast {} kernels; use --dtype f32 on the CPU",
            choice.name(),
            choice.name()
        );
    }
    Ok(choice.dtype())
}

/// The device the integration tests run on: the CPU, unless `MODULE08_TEST_DEVICE=cuda` (which
/// `scripts/gpu-run.sh` sets on the GPU host) asks for GPU 0 of a `--features cuda` build. One
/// device per process, so every tensor a test makes can meet every other. Panics with the reason
/// when the GPU is asked for but cannot be had (a test should fail loudly, not fall back).
pub fn test_device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| match std::env::var("MODULE08_TEST_DEVICE").as_deref() {
            Ok("cuda") => open_cuda(0).unwrap_or_else(|e| {
                panic!("MODULE08_TEST_DEVICE=cuda, but no CUDA device opened (build with --features cuda): {e}")
            }),
            Ok("cpu") | Err(_) => Device::Cpu,
            Ok(other) => panic!("MODULE08_TEST_DEVICE='{other}': use cpu or cuda"),
        })
        .clone()
}

/// Bytes of device memory that live tensors hold right now: the "used" counter of the
/// stream-ordered memory pool Candle allocates from (`CU_MEMPOOL_ATTR_USED_MEM_CURRENT`, the
/// analogue of `torch.cuda.memory_allocated`), read after a synchronisation. Freed blocks the
/// pool keeps for reuse are not counted. `None` on the CPU, where there is no device allocator.
/// Differences between two readings measure what a piece of code really holds on the GPU.
pub fn device_memory_in_use(device: &Device) -> Result<Option<u64>> {
    pool_counter(device, PoolCounter::UsedNow)
}

/// The most bytes live tensors have held since the last [`reset_device_memory_peak`] (or the
/// start): the pool's `CU_MEMPOOL_ATTR_USED_MEM_HIGH`, the analogue of
/// `torch.cuda.max_memory_allocated`. `None` on the CPU.
pub fn device_memory_peak(device: &Device) -> Result<Option<u64>> {
    pool_counter(device, PoolCounter::UsedPeak)
}

/// Starts a new peak for [`device_memory_peak`] (at the current use). A no-op on the CPU.
pub fn reset_device_memory_peak(device: &Device) -> Result<()> {
    pool_counter(device, PoolCounter::ResetPeak).map(|_| ())
}

/// Bytes the CUDA memory pool holds from the driver right now, in use or kept for reuse
/// (`CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`, the analogue of `torch.cuda.memory_reserved`), read
/// after a synchronisation. `None` on the CPU.
pub fn device_memory_reserved(device: &Device) -> Result<Option<u64>> {
    pool_counter(device, PoolCounter::ReservedNow)
}

/// Whether device memory that tensors free stays in the CUDA memory pool for the next
/// allocations (`keep = true`, what [`open_cuda`] sets) or goes back to the driver at every
/// synchronisation (`false`, the driver's default: release threshold 0). A no-op on the CPU.
///
/// Candle allocates every tensor with `cuMemAllocAsync` from the device's default pool. With the
/// driver's default, a training loop that synchronises once per step hands all of a step's
/// activations back to the driver at that point, and the next step's forward pass must have each
/// buffer mapped afresh, on the host, before its kernel can be enqueued. PyTorch's caching
/// allocator keeps freed blocks for the same reason.
pub fn keep_freed_memory(device: &Device, keep: bool) -> Result<()> {
    let op = if keep {
        PoolCounter::KeepFreed
    } else {
        PoolCounter::ReleaseFreed
    };
    pool_counter(device, op).map(|_| ())
}

#[derive(Clone, Copy)]
enum PoolCounter {
    UsedNow,
    ReservedNow,
    UsedPeak,
    ResetPeak,
    KeepFreed,
    ReleaseFreed,
}

fn pool_counter(device: &Device, counter: PoolCounter) -> Result<Option<u64>> {
    match device {
        Device::Cpu => Ok(None),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            use candle_core::cuda_backend::cudarc::driver::sys;
            use sys::CUmemPool_attribute::{
                CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                CU_MEMPOOL_ATTR_USED_MEM_CURRENT, CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            };
            device.synchronize()?;
            let ctx = d.cuda_stream().context().clone();
            ctx.bind_to_thread()
                .map_err(|e| anyhow::anyhow!("binding the CUDA context: {e:?}"))?;
            let mut value: u64 = 0;
            // SAFETY: plain driver calls on the device of a live context; `pool` is written by
            // the first call before the others read it; `value` is the u64 the attributes use.
            unsafe {
                let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
                sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
                    .result()
                    .map_err(|e| anyhow::anyhow!("cuDeviceGetDefaultMemPool: {e:?}"))?;
                // The release threshold to set (kept: the maximum; released: 0, the default),
                // written before the pointer to it is taken.
                if matches!(counter, PoolCounter::KeepFreed) {
                    value = u64::MAX;
                }
                let ptr = &mut value as *mut u64 as *mut std::ffi::c_void;
                let r = match counter {
                    PoolCounter::UsedNow => {
                        sys::cuMemPoolGetAttribute(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, ptr)
                    }
                    PoolCounter::ReservedNow => {
                        sys::cuMemPoolGetAttribute(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, ptr)
                    }
                    PoolCounter::UsedPeak => {
                        sys::cuMemPoolGetAttribute(pool, CU_MEMPOOL_ATTR_USED_MEM_HIGH, ptr)
                    }
                    // Setting the high-water mark to 0 resets it to the current use.
                    PoolCounter::ResetPeak => {
                        sys::cuMemPoolSetAttribute(pool, CU_MEMPOOL_ATTR_USED_MEM_HIGH, ptr)
                    }
                    PoolCounter::KeepFreed | PoolCounter::ReleaseFreed => {
                        sys::cuMemPoolSetAttribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, ptr)
                    }
                };
                r.result()
                    .map_err(|e| anyhow::anyhow!("reading the memory pool's counters: {e:?}"))?;
            }
            Ok(Some(value))
        }
        #[allow(unreachable_patterns)]
        _ => {
            let _ = counter;
            Ok(None)
        }
    }
}

/// Marks the start (`on = true`) or end of the region a profiler started with
/// `ncu --profile-from-start off` records (`cuProfilerStart`/`cuProfilerStop`). A no-op on the
/// CPU and in CPU-only builds.
pub fn profiler_range(device: &Device, on: bool) -> Result<()> {
    if !device.is_cuda() {
        return Ok(());
    }
    device.synchronize()?;
    #[cfg(not(feature = "cuda"))]
    let _ = on;
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::{profiler_start, profiler_stop};
        let r = if on {
            profiler_start()
        } else {
            profiler_stop()
        };
        r.map_err(|e| anyhow::anyhow!("cuProfilerStart/Stop: {e:?}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_choices() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(3)
        );
        let err = "tpu".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(err.contains("unknown device 'tpu'"), "{err}");
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        // `cuda` is the process's own GPU: its rank's in a launched group.
        assert_eq!(gpu_of_rank(None).unwrap(), 0);
        assert_eq!(gpu_of_rank(Some("3")).unwrap(), 3);
        let err = format!("{:#}", gpu_of_rank(Some("x")).unwrap_err());
        assert!(err.contains("MODULE08_RANK=x"), "{err}");
    }

    #[test]
    fn parses_dtypes_and_guards_the_cpu() {
        assert_eq!("bf16".parse::<DTypeChoice>().unwrap(), DTypeChoice::Bf16);
        assert!("f64x".parse::<DTypeChoice>().is_err());
        assert!(check_dtype(&Device::Cpu, DTypeChoice::F32).is_ok());
        assert!(check_dtype(&Device::Cpu, DTypeChoice::Bf16).is_err());
    }

    #[test]
    fn the_cpu_has_no_device_allocator_to_read() {
        assert_eq!(device_memory_in_use(&Device::Cpu).unwrap(), None);
        assert_eq!(device_memory_peak(&Device::Cpu).unwrap(), None);
        reset_device_memory_peak(&Device::Cpu).unwrap();
        profiler_range(&Device::Cpu, true).unwrap();
    }

    #[test]
    fn auto_picks_cuda_exactly_when_built_with_it_and_a_gpu_answers() {
        let picked = pick_device(DeviceChoice::Auto).unwrap();
        if candle_core::utils::cuda_is_available() && Device::new_cuda(0).is_ok() {
            assert!(picked.device.is_cuda(), "{}", picked.description);
            assert!(picked.description.starts_with("cuda:0"));
        } else {
            assert!(picked.device.is_cpu());
            assert!(picked.description.starts_with("cpu"));
            assert!(pick_device(DeviceChoice::Cuda(0)).is_err());
        }
    }
}

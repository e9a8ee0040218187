//! Measuring one configuration: our kernel, then the naive path, into a [`Row`].

use super::row::Row;
use super::BenchArgs;
use crate::experiments::common::{median, with_grads, Attn};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::time::Instant;
use t0809_flash_attention::*;

/// One configuration: inputs `(batch, heads, n, d)`, causal or not.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub batch: usize,
    pub heads: usize,
    pub n: usize,
    pub d: usize,
    pub causal: bool,
}

/// Random `Q, K, V` and output gradient `dO`, all `(batch, heads, n, d)` in the bench dtype.
struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    d_o: Tensor,
}

impl Inputs {
    /// Standard-normal draws from the device's generator, made in f32 and cast to `dt`.
    fn new(dev: &Device, dt: DType, c: &Case) -> candle_core::Result<Self> {
        let mk = || Tensor::randn(0f32, 1.0, (c.batch, c.heads, c.n, c.d), dev)?.to_dtype(dt);
        Ok(Self {
            q: mk()?,
            k: mk()?,
            v: mk()?,
            d_o: mk()?,
        })
    }
}

/// Times and peak memory of our kernel and of the naive path for `case`.
pub fn bench_one(dev: &Device, dt: DType, a: &BenchArgs, case: Case) -> Result<Row> {
    let x = Inputs::new(dev, dt, &case)?;
    let scale = default_softmax_scale(case.d);
    let fwd_flops =
        attention_fwd_flops(case.batch * case.heads, case.n, case.n, case.d, case.causal);
    let mut row = Row::new(&case, fwd_flops);
    let o = measure_flash(dev, a, &x, &case, scale, &mut row)?;
    if !a.no_naive {
        let result = measure_naive(dev, a, &x, &o, case.causal, scale, &mut row);
        row.naive_status = naive_status(result, &case);
    }
    Ok(row)
}

/// Our kernel: peak memory and time of the forward, then (unless `--fwd-only`) of the backward.
/// Returns the forward output `O (batch, heads, n, d)`, which the naive path is compared with.
fn measure_flash(
    dev: &Device,
    a: &BenchArgs,
    x: &Inputs,
    case: &Case,
    scale: f64,
    row: &mut Row,
) -> Result<Tensor> {
    let Case { n, d, causal, .. } = *case;
    let (o, mem) = peak_device_bytes(dev, || flash_attention(&x.q, &x.k, &x.v, scale, causal));
    let o = o?;
    row.flash_fwd_mem_bytes = mem;
    if !o
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?
        .is_finite()
    {
        bail!("flash output is not finite at seq {n}, d {d}, causal {causal}");
    }
    row.flash_fwd_ms = time_ms(dev, a.warmup, a.reps, || {
        flash_attention(&x.q, &x.k, &x.v, scale, causal).map(|_| ())
    })?;
    let auto = cuda_kernel_family(
        x.q.dtype(),
        d,
        &[0],
        FlashKernels::Auto,
        hopper_kernels_on(dev),
    );
    if auto == CudaKernelFamily::WarpgroupMma {
        row.mma_sync_fwd_ms = Some(time_ms(dev, a.warmup, a.reps, || {
            flash_attention_with(&x.q, &x.k, &x.v, scale, causal, FlashKernels::MmaSync).map(|_| ())
        })?);
    }
    if !a.fwd_only {
        measure_flash_backward(dev, a, x, &o, causal, scale, row)?;
    }
    Ok(o)
}

/// Our backward three ways: the backward op alone (given `O` and the log-sum-exp `L`), the
/// forward op then the backward op, and forward+backward through autograd; plus the peak
/// memory of the last.
fn measure_flash_backward(
    dev: &Device,
    a: &BenchArgs,
    x: &Inputs,
    o: &Tensor,
    causal: bool,
    scale: f64,
    row: &mut Row,
) -> Result<()> {
    let (r, mem) = peak_device_bytes(dev, || fwd_bwd(flash_attention, x, scale, causal));
    r?;
    row.flash_fwd_bwd_mem_bytes = mem;
    let (_, lse) = flash_attention_with_lse(&x.q, &x.k, &x.v, scale, causal)?;
    row.flash_bwd_ms = Some(time_ms(dev, a.warmup, a.reps, || {
        op::flash_attention_backward(&x.q, &x.k, &x.v, o, &x.d_o, &lse, scale, causal).map(|_| ())
    })?);
    let hopper = hopper_kernels_on(dev);
    let auto = cuda_kernel_family(x.q.dtype(), x.q.dim(3)?, &[0], FlashKernels::Auto, hopper);
    let (d, n_k) = (x.q.dim(3)?, x.k.dim(2)?);
    if auto == CudaKernelFamily::WarpgroupMma
        && hopper_backward_with(FlashKernels::WarpgroupMma, d, n_k)
    {
        // Both backwards wherever the Hopper one can run, whichever the automatic choice at this
        // length: the evidence for HOPPER_BACKWARD_MIN_KEYS.
        let inputs = [&x.q, &x.k, &x.v, o, &x.d_o, &lse];
        let time_with = |kernels| {
            time_ms(dev, a.warmup, a.reps, || {
                op::flash_attention_backward_with(inputs, scale, causal, kernels).map(|_| ())
            })
        };
        row.mma_sync_bwd_ms = Some(time_with(FlashKernels::MmaSync)?);
        row.hopper_bwd_ms = Some(time_with(FlashKernels::WarpgroupMma)?);
    }
    row.flash_fwd_bwd_ops_ms = Some(time_ms(dev, a.warmup, a.reps, || {
        let (o, lse) = flash_attention_with_lse(&x.q, &x.k, &x.v, scale, causal)?;
        op::flash_attention_backward(&x.q, &x.k, &x.v, &o, &x.d_o, &lse, scale, causal).map(|_| ())
    })?);
    row.flash_fwd_bwd_ms = Some(time_ms(dev, a.warmup, a.reps, || {
        fwd_bwd(flash_attention, x, scale, causal)
    })?);
    Ok(())
}

/// The naive path: peak memory and time of the forward (at most 1 warm-up and 5 runs), its
/// largest absolute difference from our output `o`, then forward+backward through autograd.
/// Stops at the first error, e.g. out of memory: the caller turns it into the row's status.
fn measure_naive(
    dev: &Device,
    a: &BenchArgs,
    x: &Inputs,
    o: &Tensor,
    causal: bool,
    scale: f64,
    row: &mut Row,
) -> candle_core::Result<()> {
    let (warmup, reps) = (a.warmup.min(1), a.reps.min(5));
    let (o_naive, mem) =
        peak_device_bytes(dev, || naive_attention(&x.q, &x.k, &x.v, scale, causal));
    let o_naive = o_naive?;
    row.naive_fwd_mem_bytes = mem;
    let diff = (o_naive.to_dtype(DType::F32)? - o.to_dtype(DType::F32)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    row.max_abs_diff_vs_naive = Some(diff as f64);
    drop(o_naive);
    row.naive_fwd_ms = Some(time_ms(dev, warmup, reps, || {
        naive_attention(&x.q, &x.k, &x.v, scale, causal).map(|_| ())
    })?);
    if !a.fwd_only {
        let (r, mem) = peak_device_bytes(dev, || fwd_bwd(naive_attention, x, scale, causal));
        r?;
        row.naive_fwd_bwd_mem_bytes = mem;
        row.naive_fwd_bwd_ms = Some(time_ms(dev, warmup, reps, || {
            fwd_bwd(naive_attention, x, scale, causal)
        })?);
    }
    Ok(())
}

/// The naive path's status: out-of-memory is a result, not a failure.
fn naive_status(result: candle_core::Result<()>, case: &Case) -> String {
    let e = match result {
        Ok(()) => return "ok".into(),
        Err(e) if is_oom(&e) => return "OOM".into(),
        Err(e) => e,
    };
    // Candle's elementwise kernels index with 32-bit counts: a score matrix of more than
    // 2³² elements fails at launch (CUDA_ERROR_INVALID_VALUE). A limit of the naive path.
    let first = e.to_string().lines().next().unwrap_or_default().to_string();
    let Case { n, d, causal, .. } = *case;
    eprintln!("naive path failed at seq {n}, d {d}, causal {causal}: {first}");
    if first.contains("INVALID_VALUE") {
        "too big".into()
    } else {
        "failed".into()
    }
}

fn is_oom(e: &candle_core::Error) -> bool {
    let s = e.to_string();
    s.contains("OUT_OF_MEMORY") || s.contains("out of memory") || s.contains("ALLOC_FAILED")
}

/// Forward + backward through autograd of `Σ O∘dO`, so the output gradient is `dO`.
fn fwd_bwd(f: Attn, x: &Inputs, scale: f64, causal: bool) -> candle_core::Result<()> {
    with_grads(f, &x.q, &x.k, &x.v, &x.d_o, scale, causal).map(|_| ())
}

/// Median milliseconds of `reps` runs after `warmup` runs, each between synchronisations.
fn time_ms(
    dev: &Device,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        dev.synchronize()?;
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(t))
}

/// Peak device memory of a closure: the CUDA memory pool's high-water mark of bytes in use,
/// minus what was in use before. `None` on the CPU or when the pool cannot be asked.
fn peak_device_bytes<R>(dev: &Device, f: impl FnOnce() -> R) -> (R, Option<u64>) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cd) = dev {
        use super::pool;
        let before = pool::reset_peak(cd);
        let r = f();
        let _ = dev.synchronize();
        let peak = pool::peak(cd);
        return (r, before.zip(peak).map(|(b, p)| p.saturating_sub(b)));
    }
    let _ = dev;
    (f(), None)
}

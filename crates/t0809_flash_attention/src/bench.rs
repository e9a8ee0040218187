//! `bench`: FlashAttention (our kernel) against the naive Candle path on the GPU.
//!
//! For each head size, causal flag and sequence length: forward, backward (the op alone) and
//! forward+backward (autograd, what training pays) times, as medians of `--reps` runs after
//! `--warmup` runs, each timed between device synchronisations; TFLOP/s with
//! FLOPs = 4·b·h·n²·d (halved when causal) for the forward and 2.5× that for the backward; peak
//! device memory of each path from the CUDA memory pool's high-water mark. The naive path is
//! 8-01's matmul–softmax–matmul; when it runs out of memory the row says OOM.
//! With `--pytorch FILE` (the JSON of `scripts/bench_attention_pytorch.py` on the same card),
//! the ratio ours / PyTorch SDPA is printed next to our numbers.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use clap::Args;
use shared::cli::CommonArgs;
use shared::report::{line_chart, print_table, Axes, RunReport, Series};
use std::time::Instant;
use t0809_flash_attention::*;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Sequence lengths (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![512, 1024, 2048, 4096, 8192, 16384, 32768])]
    pub seqs: Vec<usize>,
    /// Head sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![64, 128])]
    pub d_heads: Vec<usize>,
    /// Causal settings to run: both, causal, full.
    #[arg(long, default_value = "both")]
    pub causal: String,
    /// Tokens per call, batch·heads·seq (batch·heads = tokens / seq, at least 1; heads ≤ 16).
    #[arg(long, default_value_t = 16 * 16384)]
    pub tokens: usize,
    /// Precision of the benchmark (the GPU default is bf16; the CPU always uses f32).
    #[arg(long, default_value = "bf16")]
    pub bench_dtype: String,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Skip the naive path.
    #[arg(long)]
    pub no_naive: bool,
    /// Forward only (no backward timings).
    #[arg(long)]
    pub fwd_only: bool,
    /// JSON written by scripts/bench_attention_pytorch.py, for the ratio columns.
    #[arg(long)]
    pub pytorch: Option<std::path::PathBuf>,
}

/// One measured configuration.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    seq: usize,
    d_head: usize,
    causal: bool,
    batch: usize,
    heads: usize,
    fwd_flops: f64,
    flash_fwd_ms: f64,
    flash_bwd_ms: Option<f64>,
    flash_fwd_bwd_ms: Option<f64>,
    flash_fwd_mem_bytes: Option<u64>,
    flash_fwd_bwd_mem_bytes: Option<u64>,
    naive_fwd_ms: Option<f64>,
    naive_fwd_bwd_ms: Option<f64>,
    naive_fwd_mem_bytes: Option<u64>,
    naive_fwd_bwd_mem_bytes: Option<u64>,
    naive_status: String,
    max_abs_diff_vs_naive: Option<f64>,
}

fn tflops(flops: f64, ms: f64) -> f64 {
    flops / (ms * 1e-3) / 1e12
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
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

fn is_oom(e: &candle_core::Error) -> bool {
    let s = e.to_string();
    s.contains("OUT_OF_MEMORY") || s.contains("out of memory") || s.contains("ALLOC_FAILED")
}

/// Peak device memory of a closure: the CUDA memory pool's high-water mark of bytes in use,
/// minus what was in use before. `None` on the CPU or when the pool cannot be asked.
fn peak_device_bytes<R>(dev: &Device, f: impl FnOnce() -> R) -> (R, Option<u64>) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cd) = dev {
        let before = pool::reset_peak(cd);
        let r = f();
        let _ = dev.synchronize();
        let peak = pool::peak(cd);
        return (r, before.zip(peak).map(|(b, p)| p.saturating_sub(b)));
    }
    let _ = dev;
    (f(), None)
}

#[cfg(feature = "cuda")]
mod pool {
    //! The device's current memory pool (Candle allocates with `cuMemAllocAsync`, from it).
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

    pub fn peak(dev: &CudaDevice) -> Option<u64> {
        attr(
            handle(dev)?,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        )
    }
}

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    d_o: Tensor,
}

fn inputs(
    dev: &Device,
    dt: DType,
    b: usize,
    h: usize,
    n: usize,
    d: usize,
) -> candle_core::Result<Inputs> {
    let mk = || Tensor::randn(0f32, 1.0, (b, h, n, d), dev)?.to_dtype(dt);
    Ok(Inputs {
        q: mk()?,
        k: mk()?,
        v: mk()?,
        d_o: mk()?,
    })
}

type Attn = fn(&Tensor, &Tensor, &Tensor, f64, bool) -> candle_core::Result<Tensor>;

/// Forward + backward through autograd: `Σ O∘dO`, so the output gradient is `dO`.
fn fwd_bwd(f: Attn, x: &Inputs, scale: f64, causal: bool) -> candle_core::Result<()> {
    let (q, k, v) = (
        Var::from_tensor(&x.q)?,
        Var::from_tensor(&x.k)?,
        Var::from_tensor(&x.v)?,
    );
    let o = f(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, causal)?;
    let grads = (&o * &x.d_o)?.sum_all()?.backward()?;
    if grads.get(q.as_tensor()).is_none() {
        candle_core::bail!("no gradient for q");
    }
    Ok(())
}

pub fn run(common: &CommonArgs, a: &BenchArgs) -> Result<()> {
    let mut common = common.clone();
    let ctx_dev = shared::device::pick_device(common.device)?;
    let dt = if ctx_dev.device.is_cpu() {
        println!(
            "note: no GPU in this run: the benchmark runs in f32 on the CPU (use small --seqs)"
        );
        DType::F32
    } else {
        match a.bench_dtype.as_str() {
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            "f32" => DType::F32,
            other => bail!("--bench-dtype {other}: use bf16, f16 or f32"),
        }
    };
    common.dtype = shared::device::DTypeChoice::F32; // the common flag is not used by the bench
    let ctx = common.setup(
        super::TOPIC,
        "bench: FlashAttention kernel vs naive attention",
    )?;
    let dev = ctx.picked.device.clone();
    let causal_set: Vec<bool> = match a.causal.as_str() {
        "both" => vec![false, true],
        "causal" | "yes" => vec![true],
        "full" | "no" => vec![false],
        other => bail!("--causal {other}: use both, causal or full"),
    };
    let pytorch = match &a.pytorch {
        Some(p) => Some(serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(p)?,
        )?),
        None => None,
    };
    println!(
        "   dtype {dt:?} · tokens per call {} · reps {} (median) after {} warm-up",
        a.tokens, a.reps, a.warmup
    );
    let total = a.d_heads.len() * causal_set.len() * a.seqs.len();
    let mut progress = shared::train::Progress::new(total as u64, "bench");
    let mut rows: Vec<Row> = Vec::new();
    for &d in &a.d_heads {
        for &causal in &causal_set {
            for &n in &a.seqs {
                let bh = (a.tokens / n).max(1);
                let heads = bh.min(16);
                let batch = (bh / heads).max(1);
                let row = bench_one(&dev, dt, a, batch, heads, n, d, causal)?;
                progress.update(
                    rows.len() as u64 + 1,
                    format!(
                        "d {d} causal {causal} seq {n}: flash fwd {:.2} ms",
                        row.flash_fwd_ms
                    ),
                );
                rows.push(row);
            }
        }
    }
    progress.finish();

    // Table.
    let ratio = |row: &Row, key: &str, ours_ms: Option<f64>| -> String {
        let Some(pt) = &pytorch else {
            return String::new();
        };
        let found = pt["results"].as_array().and_then(|rs| {
            rs.iter().find(|r| {
                r["seq"].as_u64() == Some(row.seq as u64)
                    && r["d_head"].as_u64() == Some(row.d_head as u64)
                    && r["causal"].as_bool() == Some(row.causal)
            })
        });
        match (found.and_then(|r| r[key].as_f64()), ours_ms) {
            (Some(theirs), Some(ours)) => format!("{:.2}", theirs / ours),
            _ => "-".into(),
        }
    };
    let fmt = |ms: Option<f64>, flops: f64| {
        ms.map_or("-".to_string(), |ms| {
            format!("{ms:.3} ({:.0})", tflops(flops, ms))
        })
    };
    let mb = |b: Option<u64>| {
        b.map_or("-".to_string(), |b| {
            format!("{:.0}", b as f64 / (1u64 << 20) as f64)
        })
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let naive = |ms: Option<f64>, f: f64| {
                if ms.is_some() {
                    fmt(ms, f)
                } else {
                    r.naive_status.clone()
                }
            };
            vec![
                format!("{}", r.seq),
                format!("{}", r.d_head),
                if r.causal { "yes".into() } else { "no".into() },
                format!("{}x{}", r.batch, r.heads),
                fmt(Some(r.flash_fwd_ms), r.fwd_flops),
                naive(r.naive_fwd_ms, r.fwd_flops),
                fmt(r.flash_fwd_bwd_ms, 3.5 * r.fwd_flops),
                naive(r.naive_fwd_bwd_ms, 3.5 * r.fwd_flops),
                mb(r.flash_fwd_bwd_mem_bytes.or(r.flash_fwd_mem_bytes)),
                if r.naive_status == "ok" {
                    mb(r.naive_fwd_bwd_mem_bytes.or(r.naive_fwd_mem_bytes))
                } else {
                    format!("{} ({})", r.naive_status, mb(r.naive_fwd_mem_bytes))
                },
                ratio(r, "fwd_ms", Some(r.flash_fwd_ms)),
                ratio(r, "fwd_bwd_ms", r.flash_fwd_bwd_ms),
                r.max_abs_diff_vs_naive
                    .map_or("-".into(), |e| format!("{e:.1e}")),
            ]
        })
        .collect();
    println!("\n-- FlashAttention (ours) vs naive, {dt:?} on {}: ms (TFLOP/s); memory = peak MiB of fwd+bwd", ctx.picked.description);
    print_table(
        &[
            "seq",
            "d",
            "causal",
            "b x h",
            "flash fwd",
            "naive fwd",
            "flash fwd+bwd",
            "naive fwd+bwd",
            "flash MiB",
            "naive MiB",
            "pt/ours fwd",
            "pt/ours f+b",
            "|flash-naive|",
        ],
        &table,
    );
    if pytorch.is_some() {
        println!("   pt/ours = PyTorch SDPA time / our time (> 1: we are faster; the throughput ratio ours/PyTorch)");
    }

    // Plots and results.json.
    type Pick = fn(&Row) -> Option<f64>;
    let plots: [(&str, &str, f64, (Pick, Pick)); 2] = [
        (
            "forward",
            "bench_fwd_tflops.png",
            1.0,
            (|r| Some(r.flash_fwd_ms), |r| r.naive_fwd_ms),
        ),
        (
            "forward+backward",
            "bench_fwd_bwd_tflops.png",
            3.5,
            (|r| r.flash_fwd_bwd_ms, |r| r.naive_fwd_bwd_ms),
        ),
    ];
    for (what, file, mult, pick) in plots {
        let mut series = Vec::new();
        for &d in &a.d_heads {
            for &causal in &causal_set {
                let sel: Vec<&Row> = rows
                    .iter()
                    .filter(|r| r.d_head == d && r.causal == causal)
                    .collect();
                let tag = format!("d{d}{}", if causal { " causal" } else { "" });
                let flash: Vec<(f64, f64)> = sel
                    .iter()
                    .filter_map(|r| {
                        pick.0(r).map(|ms| (r.seq as f64, tflops(mult * r.fwd_flops, ms)))
                    })
                    .collect();
                let naive: Vec<(f64, f64)> = sel
                    .iter()
                    .filter_map(|r| {
                        pick.1(r).map(|ms| (r.seq as f64, tflops(mult * r.fwd_flops, ms)))
                    })
                    .collect();
                if !flash.is_empty() {
                    series.push(Series::new(format!("flash {tag}"), flash));
                }
                if !naive.is_empty() {
                    series.push(Series::new(format!("naive {tag}"), naive));
                }
            }
        }
        if series.iter().any(|s| !s.points.is_empty()) {
            line_chart(
                &ctx.out_dir.join(file),
                &format!(
                    "Attention {what} throughput, {dt:?} ({})",
                    ctx.picked.description
                ),
                "sequence length",
                "TFLOP/s",
                &series,
                Axes {
                    log_x: true,
                    log_y: false,
                },
            )?;
        }
    }
    let mut mem_series = Vec::new();
    for &d in &a.d_heads {
        let sel: Vec<&Row> = rows
            .iter()
            .filter(|r| r.d_head == d && r.causal == *causal_set.last().unwrap())
            .collect();
        let f: Vec<(f64, f64)> = sel
            .iter()
            .filter_map(|r| {
                r.flash_fwd_bwd_mem_bytes
                    .or(r.flash_fwd_mem_bytes)
                    .map(|b| (r.seq as f64, b as f64 / (1u64 << 20) as f64))
            })
            .collect();
        let nv: Vec<(f64, f64)> = sel
            .iter()
            .filter_map(|r| {
                r.naive_fwd_bwd_mem_bytes
                    .or(r.naive_fwd_mem_bytes)
                    .map(|b| (r.seq as f64, b as f64 / (1u64 << 20) as f64))
            })
            .collect();
        if !f.is_empty() {
            mem_series.push(Series::new(format!("flash d{d}"), f));
        }
        if !nv.is_empty() {
            mem_series.push(Series::new(format!("naive d{d}"), nv));
        }
    }
    if !mem_series.is_empty() {
        line_chart(
            &ctx.out_dir.join("bench_memory.png"),
            &format!(
                "Peak device memory, fwd+bwd ({dt:?}, {} tokens per call)",
                a.tokens
            ),
            "sequence length",
            "MiB",
            &mem_series,
            Axes {
                log_x: true,
                log_y: true,
            },
        )?;
    }
    let mut report = RunReport::start(
        super::TOPIC,
        serde_json::json!({"bench": format!("{a:?}")}),
        &ctx.picked.description,
        &format!("{dt:?}"),
    );
    report.metric("bench", &rows);
    let path = ctx.out_dir.join("bench");
    let written = report.write(&path)?;
    println!(
        "wrote {} and plots in {}",
        written.display(),
        ctx.out_dir.display()
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench_one(
    dev: &Device,
    dt: DType,
    a: &BenchArgs,
    batch: usize,
    heads: usize,
    n: usize,
    d: usize,
    causal: bool,
) -> Result<Row> {
    let x = inputs(dev, dt, batch, heads, n, d)?;
    let scale = default_softmax_scale(d);
    let fwd_flops = attention_fwd_flops(batch * heads, n, n, d, causal);
    let mut row = Row {
        seq: n,
        d_head: d,
        causal,
        batch,
        heads,
        fwd_flops,
        flash_fwd_ms: 0.0,
        flash_bwd_ms: None,
        flash_fwd_bwd_ms: None,
        flash_fwd_mem_bytes: None,
        flash_fwd_bwd_mem_bytes: None,
        naive_fwd_ms: None,
        naive_fwd_bwd_ms: None,
        naive_fwd_mem_bytes: None,
        naive_fwd_bwd_mem_bytes: None,
        naive_status: "skipped".into(),
        max_abs_diff_vs_naive: None,
    };

    // Ours.
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
    if !a.fwd_only {
        let (r, mem) = peak_device_bytes(dev, || fwd_bwd(flash_attention, &x, scale, causal));
        r?;
        row.flash_fwd_bwd_mem_bytes = mem;
        let (_, lse) = flash_attention_with_lse(&x.q, &x.k, &x.v, scale, causal)?;
        row.flash_bwd_ms = Some(time_ms(dev, a.warmup, a.reps, || {
            op::flash_attention_backward(&x.q, &x.k, &x.v, &o, &x.d_o, &lse, scale, causal)
                .map(|_| ())
        })?);
        row.flash_fwd_bwd_ms = Some(time_ms(dev, a.warmup, a.reps, || {
            fwd_bwd(flash_attention, &x, scale, causal)
        })?);
    }

    // The naive path; out-of-memory is a result, not a failure.
    if a.no_naive {
        return Ok(row);
    }
    let mut naive = || -> candle_core::Result<()> {
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
        row.naive_fwd_ms = Some(time_ms(dev, a.warmup.min(1), a.reps.min(5), || {
            naive_attention(&x.q, &x.k, &x.v, scale, causal).map(|_| ())
        })?);
        if !a.fwd_only {
            let (r, mem) = peak_device_bytes(dev, || fwd_bwd(naive_attention, &x, scale, causal));
            r?;
            row.naive_fwd_bwd_mem_bytes = mem;
            row.naive_fwd_bwd_ms = Some(time_ms(dev, a.warmup.min(1), a.reps.min(5), || {
                fwd_bwd(naive_attention, &x, scale, causal)
            })?);
        }
        Ok(())
    };
    row.naive_status = match naive() {
        Ok(()) => "ok".into(),
        Err(e) if is_oom(&e) => "OOM".into(),
        Err(e) => return Err(e.into()),
    };
    Ok(row)
}

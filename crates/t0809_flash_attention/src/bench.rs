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
    /// Let the CUDA memory pool return freed memory to the driver at each synchronisation
    /// (the driver's default); by default the bench keeps it cached, like PyTorch.
    #[arg(long)]
    pub pool_release: bool,
    /// JSON written by scripts/bench_attention_pytorch.py, for the ratio columns.
    #[arg(long)]
    pub pytorch: Option<std::path::PathBuf>,
}

/// One measured configuration.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Row {
    seq: usize,
    d_head: usize,
    causal: bool,
    batch: usize,
    heads: usize,
    fwd_flops: f64,
    flash_fwd_ms: f64,
    flash_bwd_ms: Option<f64>,
    flash_fwd_bwd_ms: Option<f64>,
    /// Forward op then backward op, called directly (no autograd bookkeeping).
    #[serde(default)]
    flash_fwd_bwd_ops_ms: Option<f64>,
    flash_fwd_mem_bytes: Option<u64>,
    flash_fwd_bwd_mem_bytes: Option<u64>,
    naive_fwd_ms: Option<f64>,
    naive_fwd_bwd_ms: Option<f64>,
    naive_fwd_mem_bytes: Option<u64>,
    naive_fwd_bwd_mem_bytes: Option<u64>,
    naive_status: String,
    max_abs_diff_vs_naive: Option<f64>,
    #[serde(default)]
    pytorch_fwd_ms: Option<f64>,
    #[serde(default)]
    pytorch_fwd_bwd_ms: Option<f64>,
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

    /// Freed memory stays in the pool instead of going back to the driver at every
    /// synchronisation (release threshold = max), as PyTorch's caching allocator keeps it:
    /// otherwise each timed run pays for mapping its buffers afresh.
    pub fn keep_cached(dev: &CudaDevice) -> Option<()> {
        let pool = handle(dev)?;
        let mut max: u64 = u64::MAX;
        unsafe {
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut max as *mut u64 as *mut _,
            )
        }
        .ok()
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
    common.dtype = match dt {
        DType::BF16 => shared::device::DTypeChoice::Bf16,
        DType::F16 => shared::device::DTypeChoice::F16,
        _ => shared::device::DTypeChoice::F32,
    };
    let ctx = common.setup(
        super::TOPIC,
        "bench: FlashAttention kernel vs naive attention",
    )?;
    let dev = ctx.picked.device.clone();
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cd) = &dev {
        if !a.pool_release {
            match pool::keep_cached(cd) {
                Some(()) => {
                    println!("   memory pool: freed memory stays cached (release threshold = max)")
                }
                None => println!("   memory pool: could not set the release threshold"),
            }
        }
    }
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

    // Our numbers next to PyTorch's (same shapes, same card, from its JSON).
    if let Some(pt) = &pytorch {
        for r in rows.iter_mut() {
            let found = pt["results"].as_array().and_then(|rs| {
                rs.iter().find(|x| {
                    x["seq"].as_u64() == Some(r.seq as u64)
                        && x["d_head"].as_u64() == Some(r.d_head as u64)
                        && x["causal"].as_bool() == Some(r.causal)
                })
            });
            if let Some(x) = found {
                r.pytorch_fwd_ms = x["fwd_ms"].as_f64();
                r.pytorch_fwd_bwd_ms = x["fwd_bwd_ms"].as_f64();
            }
        }
    }
    print_rows(&rows, &format!("{dt:?} on {}", ctx.picked.description));

    // results.json first (the plots need a font the GPU host may lack), then the plots.
    let mut report = RunReport::start(
        super::TOPIC,
        serde_json::json!({"bench": format!("{a:?}"), "pytorch": pytorch.as_ref().map(|p| serde_json::json!({"device": p["device"], "torch": p["torch"], "backend": p["backend"]}))}),
        &ctx.picked.description,
        &format!("{dt:?}"),
    );
    report.metric("bench", &rows);
    let written = report.write(&ctx.out_dir.join("bench"))?;
    // A copy one level up: the device tool brings back only shallow paths.
    std::fs::copy(&written, ctx.out_dir.join("bench_results.json"))?;
    println!(
        "wrote {} (and bench_results.json beside the plots)",
        written.display()
    );
    let tag = format!("{dt:?}, {}", ctx.picked.description);
    match plot(&rows, &ctx.out_dir, &tag) {
        Ok(()) => println!("plots in {}", ctx.out_dir.display()),
        Err(e) => eprintln!(
            "plots skipped ({e}); make them on a machine with a font: {} bench-plot --from {}",
            super::TOPIC,
            written.display()
        ),
    }
    Ok(())
}

/// The summary table: ms (TFLOP/s) per path, peak memory, PyTorch ratios.
fn print_rows(rows: &[Row], what: &str) {
    let fmt = |ms: Option<f64>, flops: f64| {
        ms.map_or("-".to_string(), |ms| {
            format!("{ms:.3} ({:.1})", tflops(flops, ms))
        })
    };
    let mb = |b: Option<u64>| {
        b.map_or("-".to_string(), |b| {
            format!("{:.0}", b as f64 / (1u64 << 20) as f64)
        })
    };
    let ratio = |theirs: Option<f64>, ours: Option<f64>| match (theirs, ours) {
        (Some(t), Some(o)) => format!("{:.2}", t / o),
        _ => "-".into(),
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
                fmt(r.flash_bwd_ms, 2.5 * r.fwd_flops),
                fmt(r.flash_fwd_bwd_ops_ms, 3.5 * r.fwd_flops),
                fmt(r.flash_fwd_bwd_ms, 3.5 * r.fwd_flops),
                naive(r.naive_fwd_ms, r.fwd_flops),
                naive(r.naive_fwd_bwd_ms, 3.5 * r.fwd_flops),
                mb(r.flash_fwd_bwd_mem_bytes.or(r.flash_fwd_mem_bytes)),
                if r.naive_status == "ok" {
                    mb(r.naive_fwd_bwd_mem_bytes.or(r.naive_fwd_mem_bytes))
                } else {
                    format!("{} ({})", r.naive_status, mb(r.naive_fwd_mem_bytes))
                },
                ratio(r.pytorch_fwd_ms, Some(r.flash_fwd_ms)),
                ratio(
                    r.pytorch_fwd_bwd_ms,
                    r.flash_fwd_bwd_ops_ms.or(r.flash_fwd_bwd_ms),
                ),
                r.max_abs_diff_vs_naive
                    .map_or("-".into(), |e| format!("{e:.1e}")),
            ]
        })
        .collect();
    println!(
        "\n-- FlashAttention (ours) vs naive, {what}: ms (TFLOP/s); memory = peak MiB of fwd+bwd"
    );
    println!("   flash fwd / bwd / fwd+bwd: our ops called directly; 'autograd': Σ O∘dO through Candle's backward (adds its bookkeeping)");
    print_table(
        &[
            "seq",
            "d",
            "causal",
            "b x h",
            "flash fwd",
            "flash bwd",
            "flash fwd+bwd",
            "flash f+b autograd",
            "naive fwd",
            "naive f+b autograd",
            "flash MiB",
            "naive MiB",
            "ours/pt fwd",
            "ours/pt f+b",
            "|flash-naive|",
        ],
        &table,
    );
    if rows.iter().any(|r| r.pytorch_fwd_ms.is_some()) {
        println!("   ours/pt = our throughput / PyTorch SDPA's on the same card (= PyTorch time / our time)");
    }
}

/// `bench-plot`: the plots of a bench results.json (e.g. from the GPU host) on this machine.
pub fn plot_from(common: &CommonArgs, from: &std::path::Path) -> Result<()> {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(from)?)?;
    let rows: Vec<Row> = serde_json::from_value(json["metrics"]["bench"].clone())?;
    let out_dir = common.out.join(super::TOPIC);
    std::fs::create_dir_all(&out_dir)?;
    let tag = format!(
        "{}, {}",
        json["dtype"].as_str().unwrap_or("?"),
        json["device"].as_str().unwrap_or("?")
    );
    print_rows(&rows, &tag);
    plot(&rows, &out_dir, &tag)?;
    println!("plots in {}", out_dir.display());
    Ok(())
}

/// TFLOP/s vs sequence length (forward; forward+backward) and peak memory vs sequence length.
fn plot(rows: &[Row], out_dir: &std::path::Path, tag: &str) -> Result<()> {
    let mut d_heads: Vec<usize> = rows.iter().map(|r| r.d_head).collect();
    d_heads.sort_unstable();
    d_heads.dedup();
    type Pick = fn(&Row) -> Option<f64>;
    /// (what, file, FLOP multiple of the forward, the three lines)
    type Plot<'a> = (&'a str, &'a str, f64, [(&'a str, Pick); 3]);
    let plots: [Plot; 2] = [
        (
            "forward",
            "bench_fwd_tflops.png",
            1.0,
            [
                ("flash", |r| Some(r.flash_fwd_ms)),
                ("naive", |r| r.naive_fwd_ms),
                ("PyTorch SDPA", |r| r.pytorch_fwd_ms),
            ],
        ),
        (
            "forward+backward",
            "bench_fwd_bwd_tflops.png",
            3.5,
            [
                ("flash", |r| r.flash_fwd_bwd_ops_ms),
                ("naive (autograd)", |r| r.naive_fwd_bwd_ms),
                ("PyTorch SDPA", |r| r.pytorch_fwd_bwd_ms),
            ],
        ),
    ];
    for (what, file, mult, picks) in plots {
        for &d in &d_heads {
            let mut series = Vec::new();
            for causal in [false, true] {
                let sel: Vec<&Row> = rows
                    .iter()
                    .filter(|r| r.d_head == d && r.causal == causal)
                    .collect();
                for (name, pick) in picks {
                    let pts: Vec<(f64, f64)> = sel
                        .iter()
                        .filter_map(|r| {
                            pick(r).map(|ms| (r.seq as f64, tflops(mult * r.fwd_flops, ms)))
                        })
                        .collect();
                    if !pts.is_empty() {
                        series.push(Series::new(
                            format!("{name}{}", if causal { ", causal" } else { "" }),
                            pts,
                        ));
                    }
                }
            }
            if !series.is_empty() {
                let path = out_dir.join(file.replace(".png", &format!("_d{d}.png")));
                line_chart(
                    &path,
                    &format!("Attention {what}, d_head {d} ({tag})"),
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
    }
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let mut mem_series = Vec::new();
    for &d in &d_heads {
        let sel: Vec<&Row> = rows.iter().filter(|r| r.d_head == d && r.causal).collect();
        let f: Vec<(f64, f64)> = sel
            .iter()
            .filter_map(|r| {
                r.flash_fwd_bwd_mem_bytes
                    .or(r.flash_fwd_mem_bytes)
                    .map(|b| (r.seq as f64, mib(b)))
            })
            .collect();
        let nv: Vec<(f64, f64)> = sel
            .iter()
            .filter_map(|r| {
                r.naive_fwd_bwd_mem_bytes
                    .or(r.naive_fwd_mem_bytes)
                    .map(|b| (r.seq as f64, mib(b)))
            })
            .collect();
        if !f.is_empty() {
            mem_series.push(Series::new(format!("flash d{d} causal"), f));
        }
        if !nv.is_empty() {
            mem_series.push(Series::new(format!("naive d{d} causal"), nv));
        }
    }
    if !mem_series.is_empty() {
        line_chart(
            &out_dir.join("bench_memory.png"),
            &format!("Peak device memory of fwd+bwd ({tag})"),
            "sequence length",
            "MiB",
            &mem_series,
            Axes {
                log_x: true,
                log_y: true,
            },
        )?;
    }
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
        flash_fwd_bwd_ops_ms: None,
        flash_fwd_mem_bytes: None,
        flash_fwd_bwd_mem_bytes: None,
        naive_fwd_ms: None,
        naive_fwd_bwd_ms: None,
        naive_fwd_mem_bytes: None,
        naive_fwd_bwd_mem_bytes: None,
        naive_status: "skipped".into(),
        max_abs_diff_vs_naive: None,
        pytorch_fwd_ms: None,
        pytorch_fwd_bwd_ms: None,
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
        row.flash_fwd_bwd_ops_ms = Some(time_ms(dev, a.warmup, a.reps, || {
            let (o, lse) = flash_attention_with_lse(&x.q, &x.k, &x.v, scale, causal)?;
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
        Err(e) => {
            // Candle's elementwise kernels index with 32-bit counts: a score matrix of more than
            // 2³² elements fails at launch (CUDA_ERROR_INVALID_VALUE). A limit of the naive path.
            let first = e.to_string().lines().next().unwrap_or_default().to_string();
            eprintln!("naive path failed at seq {n}, d {d}, causal {causal}: {first}");
            if first.contains("INVALID_VALUE") {
                "too big".into()
            } else {
                "failed".into()
            }
        }
    };
    Ok(row)
}

//! `bench`: FlashAttention (our kernel) against the naive Candle path on the GPU.
//!
//! For each head size, causal flag and sequence length: forward, backward (the op alone) and
//! forward+backward (autograd, what training pays) times, as medians of `--reps` runs after
//! `--warmup` runs, each timed between device synchronisations; TFLOP/s with
//! FLOPs = 4·b·h·n²·d (halved when causal) for the forward and 2.5× that for the backward; peak
//! device memory of each path from the CUDA memory pool's high-water mark. The naive path is
//! 8-01's matmul–softmax–matmul; when it runs out of memory the row says OOM.
//! With `--pytorch FILE` (the JSON of `scripts/bench_attention_pytorch.py` on the same card, its
//! FlashAttention-2 backend) and `--pytorch-cudnn FILE` (the same script with `--backend cudnn`),
//! the ratios ours / PyTorch SDPA are printed next to our numbers and drawn in the plots.
//! `scripts/attention_bench.sh` runs all three on the GPU host in one step.
//!
//! The steps: [`measure`] times one configuration into a [`row::Row`], [`table`] prints the
//! rows, [`plot`] draws them (also from a saved `results.json`, for `bench-plot`), and [`pool`]
//! talks to the CUDA memory pool.

mod measure;
mod plot;
#[cfg(feature = "cuda")]
mod pool;
mod row;
mod table;

pub use plot::plot_from;

use super::TOPIC;
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::Args;
use measure::Case;
use row::Row;
use shared::cli::CommonArgs;
use shared::report::RunReport;
use std::path::{Path, PathBuf};

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
    /// JSON written by scripts/bench_attention_pytorch.py (FlashAttention-2 backend), for the
    /// ratio columns.
    #[arg(long)]
    pub pytorch: Option<std::path::PathBuf>,
    /// The same script's JSON with `--backend cudnn` (PyTorch SDPA on cuDNN), for two more.
    #[arg(long)]
    pub pytorch_cudnn: Option<std::path::PathBuf>,
}

/// The benchmark: every (head size, causal flag, sequence length), then the table,
/// `bench/results.json` (and a copy `bench_results.json`) and the plots.
pub fn run(common: &CommonArgs, a: &BenchArgs) -> Result<()> {
    let dt = bench_dtype(common, a)?;
    let mut common = common.clone();
    common.dtype = match dt {
        DType::BF16 => shared::device::DTypeChoice::Bf16,
        DType::F16 => shared::device::DTypeChoice::F16,
        _ => shared::device::DTypeChoice::F32,
    };
    let ctx = common.setup(TOPIC, "bench: FlashAttention kernel vs naive attention")?;
    let dev = ctx.picked.device.clone();
    keep_pool_cached(&dev, a)?;
    let causal_set = causal_set(&a.causal)?;
    let read = |p: &std::path::PathBuf| -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(p)?)?)
    };
    let pytorch = a.pytorch.as_ref().map(read).transpose()?;
    let cudnn = a.pytorch_cudnn.as_ref().map(read).transpose()?;
    println!(
        "   dtype {dt:?} · tokens per call {} · reps {} (median) after {} warm-up",
        a.tokens, a.reps, a.warmup
    );
    let mut rows = sweep(&dev, dt, a, &causal_set)?;
    if let Some(pt) = &pytorch {
        rows.iter_mut().for_each(|r| r.attach_pytorch(pt));
    }
    if let Some(pt) = &cudnn {
        rows.iter_mut().for_each(|r| r.attach_cudnn(pt));
    }
    let device = &ctx.picked.description;
    table::print_rows(&rows, &format!("{dt:?} on {device}"));
    let pytorch_runs = [pytorch.as_ref(), cudnn.as_ref()];
    let written = write_results(&rows, a, pytorch_runs, device, dt, &ctx.out_dir)?;
    plot_or_say_how(&rows, &ctx.out_dir, &format!("{dt:?}, {device}"), &written);
    Ok(())
}

/// The benchmark's precision: `--bench-dtype` on the GPU, f32 on the CPU (with a note).
fn bench_dtype(common: &CommonArgs, a: &BenchArgs) -> Result<DType> {
    if shared::device::pick_device(common.device)?.device.is_cpu() {
        println!(
            "note: no GPU in this run: the benchmark runs in f32 on the CPU (use small --seqs)"
        );
        return Ok(DType::F32);
    }
    Ok(match a.bench_dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        other => bail!("--bench-dtype {other}: use bf16, f16 or f32"),
    })
}

/// Freed device memory stays in the CUDA pool between timed runs (`shared::device::open_cuda`
/// sets that), unless `--pool-release` hands it back at every synchronisation.
fn keep_pool_cached(dev: &Device, a: &BenchArgs) -> Result<()> {
    if dev.is_cuda() {
        shared::device::keep_freed_memory(dev, !a.pool_release)?;
        if !a.pool_release {
            println!("   memory pool: freed memory stays cached (release threshold = max)");
        }
    }
    Ok(())
}

/// `--causal`: both → `[false, true]`, causal → `[true]`, full → `[false]`.
fn causal_set(causal: &str) -> Result<Vec<bool>> {
    Ok(match causal {
        "both" => vec![false, true],
        "causal" | "yes" => vec![true],
        "full" | "no" => vec![false],
        other => bail!("--causal {other}: use both, causal or full"),
    })
}

/// Measures every configuration, head size outermost and sequence length innermost. Each call
/// holds `--tokens` tokens: `batch·heads = tokens / n` (at least 1), with at most 16 heads.
fn sweep(dev: &Device, dt: DType, a: &BenchArgs, causal_set: &[bool]) -> Result<Vec<Row>> {
    let total = a.d_heads.len() * causal_set.len() * a.seqs.len();
    let mut progress = shared::train::Progress::new(total as u64, "bench");
    let mut rows: Vec<Row> = Vec::new();
    for &d in &a.d_heads {
        for &causal in causal_set {
            for &n in &a.seqs {
                let bh = (a.tokens / n).max(1);
                let heads = bh.min(16);
                let batch = (bh / heads).max(1);
                let case = Case {
                    batch,
                    heads,
                    n,
                    d,
                    causal,
                };
                let row = measure::bench_one(dev, dt, a, case)?;
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
    Ok(rows)
}

/// Writes `<out>/bench/results.json` (config: the arguments and PyTorch's versions) and a copy
/// `<out>/bench_results.json`; returns the path of the first.
fn write_results(
    rows: &[Row],
    a: &BenchArgs,
    pytorch: [Option<&serde_json::Value>; 2],
    device: &str,
    dt: DType,
    out_dir: &Path,
) -> Result<PathBuf> {
    let pytorch: Vec<serde_json::Value> = pytorch
        .iter()
        .flatten()
        .map(|p| serde_json::json!({"device": p["device"], "torch": p["torch"], "backend": p["backend"]}))
        .collect();
    let mut report = RunReport::start(
        TOPIC,
        serde_json::json!({"bench": format!("{a:?}"), "pytorch": pytorch}),
        device,
        &format!("{dt:?}"),
    );
    report.metric("bench", rows);
    let written = report.write(&out_dir.join("bench"))?;
    // A copy one level up: the device tool brings back only shallow paths.
    std::fs::copy(&written, out_dir.join("bench_results.json"))?;
    println!(
        "wrote {} (and bench_results.json beside the plots)",
        written.display()
    );
    Ok(written)
}

/// Draws the plots after results.json is safe (the GPU host may lack a font): on failure says
/// how to draw them elsewhere with `bench-plot`.
fn plot_or_say_how(rows: &[Row], out_dir: &Path, tag: &str, written: &Path) {
    match plot::plot(rows, out_dir, tag) {
        Ok(()) => println!("plots in {}", out_dir.display()),
        Err(e) => eprintln!(
            "plots skipped ({e}); make them on a machine with a font: {} bench-plot --from {}",
            TOPIC,
            written.display()
        ),
    }
}

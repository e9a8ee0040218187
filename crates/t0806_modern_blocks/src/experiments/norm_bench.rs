//! The norm micro-benchmark: `rows × width` activations; RMSNorm composed and fused, LayerNorm
//! (composed); forward, and forward + backward (dx, dg, and LayerNorm's db). Median of `reps`
//! timed calls after one warm-up, each ending in a device synchronisation.
//!
//! Figures `norm_speedup.png` (LayerNorm time / RMSNorm time) and `fused_speedup.png` (composed
//! RMSNorm time / fused RMSNorm time); metrics `norm_bench.<rows>x<width>`.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use shared::cli::CommonArgs;
use shared::kernels::OpImpl;
use shared::report::{bar_chart, print_table, RunReport};
use std::path::Path;
use std::time::Instant;
use t0804_transformer_block::{Layer, LayerNorm};
use t0806_modern_blocks::RmsNorm;

/// `norm-bench` arguments.
#[derive(clap::Args, Debug)]
pub struct NormBenchArgs {
    /// Rows (default: 50 000 on the GPU, 4096 on the CPU).
    #[arg(long)]
    pub rows: Option<usize>,
    /// Widths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096")]
    pub widths: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
}

/// The `norm-bench` subcommand: the benchmark alone, into `<out>/t0806_modern_blocks/norm_bench/`.
pub fn run(common: &CommonArgs, a: &NormBenchArgs) -> Result<()> {
    let ctx = common.setup(
        crate::TOPIC,
        "norm micro-benchmark: RMSNorm composed vs fused vs LayerNorm",
    )?;
    ctx.require_one_dtype()?;
    let dev = ctx.picked.device.clone();
    let rows = a.rows.unwrap_or(if dev.is_cuda() { 50_000 } else { 4096 });
    let config =
        serde_json::json!({"norm_bench": {"rows": rows, "widths": a.widths, "reps": a.reps}});
    let mut report = RunReport::start(
        crate::TOPIC,
        config,
        &ctx.picked.description,
        ctx.dtype_name(),
    );
    let dir = ctx.out_dir.join("norm_bench");
    std::fs::create_dir_all(&dir)?;
    measure(&dev, ctx.dtype, rows, &a.widths, a.reps, &mut report, &dir)?;
    report.write(&dir)?;
    println!("   wrote {}", dir.join("results.json").display());
    Ok(())
}

/// Median wall time of `reps` calls of `f` (each ends in a device synchronisation), after one
/// warm-up call.
fn median_time(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// `(forward, forward + backward)` seconds of `norm` on `x`; the backward of `Σ norm(x)` computes
/// the gradients of `x` and of the norm's parameters.
fn time_norm(norm: &dyn Layer, x: &Var, reps: usize) -> Result<(f64, f64)> {
    let fwd = median_time(reps, || {
        norm.forward(x)?.device().synchronize()?;
        Ok(())
    })?;
    let fwd_bwd = median_time(reps, || {
        let grads = norm.forward(x.as_tensor())?.sum_all()?.backward()?;
        grads
            .get(x.as_tensor())
            .expect("x has a gradient")
            .device()
            .synchronize()?;
        Ok(())
    })?;
    Ok((fwd, fwd_bwd))
}

/// The timings of one width, seconds: `(forward, forward + backward)` of each norm.
struct WidthTimes {
    width: usize,
    rms: (f64, f64),
    fused: (f64, f64),
    layer_norm: (f64, f64),
}

/// Times the three norms on `x (rows, width)` in `dtype` (gains ones, LayerNorm bias zeros).
fn time_width(
    dev: &Device,
    dtype: DType,
    rows: usize,
    width: usize,
    reps: usize,
) -> Result<WidthTimes> {
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, width), dev)?.to_dtype(dtype)?)?;
    let g = Tensor::ones(width, dtype, dev)?;
    let b = Tensor::zeros(width, dtype, dev)?;
    let rms = RmsNorm::from_weights(g.clone(), 1e-5)?;
    let fused = rms.clone().with_impl(OpImpl::Fused);
    let ln = LayerNorm::from_weights(g, b, 1e-5)?;
    Ok(WidthTimes {
        width,
        rms: time_norm(&rms, &x, reps)?,
        fused: time_norm(&fused, &x, reps)?,
        layer_norm: time_norm(&ln, &x, reps)?,
    })
}

/// Runs the benchmark for every width, prints the table, records the metrics, draws the charts.
pub fn measure(
    dev: &Device,
    dtype: DType,
    rows: usize,
    widths: &[usize],
    reps: usize,
    report: &mut RunReport,
    out_dir: &Path,
) -> Result<()> {
    println!("   norm micro-benchmark: {rows} rows × {widths:?}, {dtype:?}, median of {reps}");
    let mut times = vec![];
    for &w in widths {
        times.push(time_width(dev, dtype, rows, w, reps)?);
    }
    let bytes = dtype.size_in_bytes();
    // The fused forward's minimum traffic: read x, write y.
    let gbs = |t: &WidthTimes| 2.0 * (rows * t.width * bytes) as f64 / t.fused.0 / 1e9;
    for t in &times {
        report.metric(
            &format!("norm_bench.{rows}x{}", t.width),
            serde_json::json!({"rms_fwd_ms": t.rms.0 * 1e3, "fused_rms_fwd_ms": t.fused.0 * 1e3, "ln_fwd_ms": t.layer_norm.0 * 1e3,
                "rms_fwd_bwd_ms": t.rms.1 * 1e3, "fused_rms_fwd_bwd_ms": t.fused.1 * 1e3, "ln_fwd_bwd_ms": t.layer_norm.1 * 1e3,
                "fused_fwd_gb_per_s": gbs(t), "dtype": format!("{dtype:?}")}),
        );
    }
    print_times(rows, &times, gbs);
    plot_speedups(rows, &times, out_dir)
}

fn print_times(rows: usize, times: &[WidthTimes], gbs: impl Fn(&WidthTimes) -> f64) {
    let ms = |t: f64| format!("{:.3}", t * 1e3);
    let table: Vec<Vec<String>> = times
        .iter()
        .map(|t| {
            vec![
                format!("{rows} × {}", t.width),
                ms(t.rms.0),
                ms(t.fused.0),
                ms(t.layer_norm.0),
                ms(t.rms.1),
                ms(t.fused.1),
                ms(t.layer_norm.1),
                format!("{:.1}", gbs(t)),
            ]
        })
        .collect();
    print_table(
        &[
            "rows × width",
            "RMSNorm fwd ms",
            "fused fwd ms",
            "LayerNorm fwd ms",
            "RMSNorm fwd+bwd ms",
            "fused fwd+bwd ms",
            "LayerNorm fwd+bwd ms",
            "fused fwd GB/s",
        ],
        &table,
    );
}

/// `norm_speedup.png` and `fused_speedup.png`: one bar per width and pass.
fn plot_speedups(rows: usize, times: &[WidthTimes], out_dir: &Path) -> Result<()> {
    let (mut labels, mut ln_vs_rms, mut composed_vs_fused) = (vec![], vec![], vec![]);
    for t in times {
        let passes = [
            ("fwd", t.layer_norm.0, t.rms.0, t.fused.0),
            ("fwd+bwd", t.layer_norm.1, t.rms.1, t.fused.1),
        ];
        for (what, ln, rms, fused) in passes {
            labels.push(format!("{} {what}", t.width));
            ln_vs_rms.push(ln / rms);
            composed_vs_fused.push(rms / fused);
        }
    }
    bar_chart(
        &out_dir.join("norm_speedup.png"),
        &format!("LayerNorm time / RMSNorm time (composed, {rows} rows)"),
        "speed-up of RMSNorm (×)",
        &labels,
        &ln_vs_rms,
    )?;
    bar_chart(
        &out_dir.join("fused_speedup.png"),
        &format!("Composed RMSNorm time / fused RMSNorm time ({rows} rows)"),
        "speed-up of the fused op (×)",
        &labels,
        &composed_vs_fused,
    )?;
    Ok(())
}

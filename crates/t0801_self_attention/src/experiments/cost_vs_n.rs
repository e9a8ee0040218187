//! # 3. Cost vs the sequence length n
//!
//! Time of `scaled_dot_product_attention` on `(1, 1, n, d)` queries, keys and values, and bytes
//! of the `(n, n)` weight matrix it materialises, for n = 64, 128, … up to `max_n`. The fitted
//! log-log exponents are ≈ 2 for the memory and approach 2 for the time once the `n²` work
//! dominates the fixed overheads.

use super::common::loglog_slope;
use super::timing::{time_attention, Timing};
use super::Summary;
use anyhow::Result;
use candle_core::{DType, Device};
use serde_json::{json, Value};
use shared::report::{line_chart, print_table, Axes, RunReport, Series};
use std::path::Path;
use t0801_self_attention::attention_flops;

/// The two fitted exponents.
pub struct CostVsN {
    pub time_exponent: f64,
    pub memory_exponent: f64,
}

impl CostVsN {
    /// Adds the two exponent rows to the closing summary.
    pub fn summarise(&self, summary: &mut Summary) {
        let time = format!("{:.2}", self.time_exponent);
        summary.row("fitted time exponent in n", time);
        let memory = format!("{:.2}", self.memory_exponent);
        summary.row("fitted score-memory exponent in n", memory);
    }
}

/// One measured size: `n`, median milliseconds, bytes of the weight matrix.
struct Point {
    n: f64,
    ms: f64,
    bytes: f64,
}

/// Times every doubling of n up to `max_n` at head width `d`, prints the table and the fits,
/// and draws the time and memory charts.
pub fn run(
    dev: &Device,
    dtype: DType,
    out_dir: &Path,
    max_n: usize,
    d: usize,
    reps: usize,
    report: &mut RunReport,
) -> Result<CostVsN> {
    let sizes: Vec<usize> = std::iter::successors(Some(64usize), |n| Some(n * 2))
        .take_while(|n| *n <= max_n)
        .collect();
    let shapes: Vec<(usize, usize)> = sizes.iter().map(|&n| (n, d)).collect();
    let timings = time_attention(dev, dtype, &shapes, reps, "cost vs n")?;
    let (table, points) = tabulate(&sizes, &timings, d);
    // Fit on the larger sizes (the top half, at least 3), where fixed overheads no longer dominate.
    let fit_from = sizes.len().saturating_sub((sizes.len() / 2).max(3));
    let time_exp = loglog_slope(&xy(&points[fit_from..], |p| p.ms));
    let mem_exp = loglog_slope(&xy(&points, |p| p.bytes));
    println!(
        "   fitted on n ≥ {}: time ∝ n^{time_exp:.2}; score memory ∝ n^{mem_exp:.2} (= 4·n² bytes in f32 per head)",
        sizes[fit_from]
    );
    plot_time(dev, out_dir, d, &points, time_exp)?;
    plot_memory(dtype, out_dir, &points, mem_exp)?;
    report.metric(
        "cost_vs_n",
        json!({"d": d, "reps": reps, "dtype": format!("{dtype:?}"), "table": table, "fit_from_n": sizes[fit_from],
            "time_exponent": time_exp, "memory_exponent": mem_exp}),
    );
    Ok(CostVsN {
        time_exponent: time_exp,
        memory_exponent: mem_exp,
    })
}

/// `(n, y)` pairs of `points`.
fn xy(points: &[Point], y: impl Fn(&Point) -> f64) -> Vec<(f64, f64)> {
    points.iter().map(|p| (p.n, y(p))).collect()
}

/// Prints the timing table; returns its JSON rows and the measured points.
fn tabulate(sizes: &[usize], timings: &[Timing], d: usize) -> (Vec<Value>, Vec<Point>) {
    let mut rows = Vec::new();
    let mut table = Vec::new();
    let mut points = Vec::new();
    for (&n, t) in sizes.iter().zip(timings) {
        let (ms, bytes) = (t.median_ms, t.score_bytes);
        let gflops = attention_flops(n, n, d, d) / (ms * 1e-3) / 1e9;
        rows.push(vec![
            n.to_string(),
            format!("{ms:.3}"),
            format!("{:.3}", t.min_ms),
            format!("{bytes}"),
            format!("{:.1}", bytes as f64 / (1 << 20) as f64),
            format!("{gflops:.1}"),
        ]);
        table.push(
            json!({"n": n, "ms": ms, "min_ms": t.min_ms, "score_bytes": bytes, "gflops": gflops}),
        );
        points.push(Point {
            n: n as f64,
            ms,
            bytes: bytes as f64,
        });
    }
    print_table(
        &[
            "n",
            "ms (median)",
            "ms (min)",
            "score bytes",
            "MiB",
            "GFLOP/s",
        ],
        &rows,
    );
    (table, points)
}

/// Log-log chart of the median time against n, with an `n²` reference through the last point.
fn plot_time(dev: &Device, out_dir: &Path, d: usize, points: &[Point], exp: f64) -> Result<()> {
    let last = points.last().expect("at least one size");
    let (n_last, ms_last) = (last.n, last.ms);
    let reference: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.n, ms_last * (p.n / n_last).powi(2)))
        .collect();
    let device_name = if dev.is_cuda() { "CUDA" } else { "CPU" };
    line_chart(
        &out_dir.join("t0801_cost_time.png"),
        &format!("Attention forward time vs n ({device_name}, d = {d}; fitted exponent {exp:.2})"),
        "sequence length n",
        "time (ms, median)",
        &[
            Series::new("measured", xy(points, |p| p.ms)),
            Series::new("reference ∝ n²", reference),
        ],
        Axes {
            log_x: true,
            log_y: true,
        },
    )
}

/// Log-log chart of the MiB of one head's weight matrix against n.
fn plot_memory(dtype: DType, out_dir: &Path, points: &[Point], exp: f64) -> Result<()> {
    line_chart(
        &out_dir.join("t0801_cost_memory.png"),
        &format!("Score-matrix memory per head vs n (fitted exponent {exp:.2})"),
        "sequence length n",
        "MiB of the n×n weight matrix",
        &[Series::new(
            format!("{dtype:?} weights (n×n), one head"),
            xy(points, |p| p.bytes / (1u64 << 20) as f64),
        )],
        Axes {
            log_x: true,
            log_y: true,
        },
    )
}

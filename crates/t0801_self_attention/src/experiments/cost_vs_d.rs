//! # 4. Cost vs the head width d
//!
//! Time of `scaled_dot_product_attention` on `(1, 1, n, d)` inputs at a fixed n for
//! d = 16 … 256. The two matmuls grow linearly in d, the `n²` scale/max/exp/sum/divide passes do
//! not: a linear fit `time ≈ a + b·d` separates the two, and the log-log exponent on d ≥ 64
//! approaches 1 once the matmuls dominate. Together with section 3: `O(n²·d)`.

use super::common::{linear_fit, loglog_slope};
use super::timing::{time_attention, Timing};
use super::Summary;
use anyhow::Result;
use candle_core::{DType, Device};
use serde_json::{json, Value};
use shared::report::{line_chart, print_table, Axes, RunReport, Series};
use std::path::Path;
use t0801_self_attention::attention_flops;

/// The head widths d.
const WIDTHS: [usize; 5] = [16, 32, 64, 128, 256];

/// The fitted exponent in d (on d ≥ 64).
pub struct CostVsD {
    pub d_exponent: f64,
}

impl CostVsD {
    /// Adds the exponent row to the closing summary.
    pub fn summarise(&self, summary: &mut Summary) {
        let exponent = format!("{:.2}", self.d_exponent);
        summary.row("fitted time exponent in d (d ≥ 64)", exponent);
    }
}

/// Times every width at sequence length `n`, prints the table and the fits, draws the chart.
pub fn run(
    dev: &Device,
    dtype: DType,
    out_dir: &Path,
    n: usize,
    reps: usize,
    report: &mut RunReport,
) -> Result<CostVsD> {
    let shapes: Vec<(usize, usize)> = WIDTHS.iter().map(|&d| (n, d)).collect();
    let timings = time_attention(dev, dtype, &shapes, reps, "cost vs d")?;
    let (table, points) = tabulate(n, &timings);
    let d_exp = loglog_slope(&points[2..]);
    // time ≈ a + b·d: `a` is the d-independent part (the n² scale/max/exp/sum/divide passes),
    // `b·d` the two matmuls.
    let (a, b) = linear_fit(&points);
    let floor_share_64 = a / (a + b * 64.0);
    println!(
        "   fitted on d ≥ 64: time ∝ d^{d_exp:.2}; linear fit time ≈ {a:.2} ms + {b:.4} ms·d: \
         at d = 64 the d-independent n² passes are {:.0}% of the time",
        100.0 * floor_share_64
    );
    plot(out_dir, n, &points, d_exp, (a, b))?;
    report.metric(
        "cost_vs_d",
        json!({"n": n, "table": table, "d_exponent_from_64": d_exp, "linear_fit_intercept_ms": a,
            "linear_fit_ms_per_d": b, "d_independent_share_at_d64": floor_share_64}),
    );
    Ok(CostVsD { d_exponent: d_exp })
}

/// Prints the timing table; returns its JSON rows and the `(d, median ms)` points.
fn tabulate(n: usize, timings: &[Timing]) -> (Vec<Value>, Vec<(f64, f64)>) {
    let mut rows = Vec::new();
    let mut table = Vec::new();
    let mut points = Vec::new();
    for (&d, t) in WIDTHS.iter().zip(timings) {
        let ms = t.median_ms;
        rows.push(vec![
            d.to_string(),
            format!("{ms:.3}"),
            format!("{:.3}", t.min_ms),
            format!("{:.1}", attention_flops(n, n, d, d) / (ms * 1e-3) / 1e9),
        ]);
        table.push(json!({"d": d, "ms": ms, "min_ms": t.min_ms}));
        points.push((d as f64, ms));
    }
    print_table(&["d", "ms (median)", "ms (min)", "GFLOP/s"], &rows);
    (table, points)
}

/// Log-log chart of the median time against d, with a `∝ d` reference through the last point
/// and the linear fit `a + b·d`.
fn plot(out_dir: &Path, n: usize, points: &[(f64, f64)], exp: f64, fit: (f64, f64)) -> Result<()> {
    let (a, b) = fit;
    let (d_last, ms_last) = *points.last().expect("widths");
    line_chart(
        &out_dir.join("t0801_cost_width.png"),
        &format!("Attention forward time vs head width d (n = {n}; exponent on d ≥ 64: {exp:.2})"),
        "head width d",
        "time (ms, median)",
        &[
            Series::new("measured", points.to_vec()),
            Series::new(
                "reference ∝ d",
                points
                    .iter()
                    .map(|p| (p.0, ms_last * p.0 / d_last))
                    .collect(),
            ),
            Series::new(
                format!("fit {a:.2} ms + {b:.4} ms·d"),
                points.iter().map(|p| (p.0, a + b * p.0)).collect(),
            ),
        ],
        Axes {
            log_x: true,
            log_y: true,
        },
    )
}

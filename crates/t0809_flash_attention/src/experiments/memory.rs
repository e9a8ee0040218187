//! Experiment 2, the memory bottleneck measured: the peak extra host bytes allocated during one
//! causal forward, for growing sequence lengths. Naive attention materialises the
//! `(b·h, n, n)` score and weight matrices; FlashAttention keeps only `(b·h, n, d)` tensors and
//! one tile at a time.

use super::common::{max_rel, mb, mib, peak_extra_bytes, randn};
use super::lesson::Lesson;
use anyhow::Result;
use candle_core::Device;
use shared::report::{line_chart, print_table, Axes, Series};
use std::path::{Path, PathBuf};
use std::time::Instant;
use t0809_flash_attention::*;

/// `b·h` (batch 1) of every input.
const BH: usize = 2;
/// Head size of every input.
const D: usize = 64;

/// One sequence length, measured.
struct Point {
    n: usize,
    /// Bytes of one f32 `(b·h, n, n)` score matrix: what naive attention cannot avoid.
    score_matrix: usize,
    /// Peak extra bytes of naive attention, of the tiled tensor ops and of the custom op.
    naive: usize,
    tiled: usize,
    flash: usize,
    /// Bytes of the output `O (b·h, n, d)` in f32: the floor of any implementation.
    output: usize,
    naive_s: f64,
    flash_s: f64,
    /// Largest [`max_rel`] of the tiled and the custom-op outputs against naive's.
    max_rel_diff: f64,
}

/// Prints the table, records the `memory` metric and draws `memory_vs_seq.png`, whose path it
/// returns.
pub fn run(lesson: &mut Lesson) -> Result<PathBuf> {
    println!("\n-- 2. memory of one causal forward (b·h = 2, d = 64): peak extra bytes allocated, measured");
    let seqs: Vec<usize> = if lesson.quick {
        vec![128, 256, 512]
    } else {
        vec![256, 512, 1024, 2048, 4096]
    };
    let mut progress = shared::train::Progress::new(seqs.len() as u64, "memory");
    let mut points = Vec::new();
    for (i, &n) in seqs.iter().enumerate() {
        points.push(measure(&lesson.dev, n)?);
        progress.update(i as u64 + 1, format!("seq {n}"));
    }
    progress.finish();
    print_table(
        &[
            "seq",
            "one n×n f32 matrix",
            "naive peak",
            "tiled (tensor ops) peak",
            "flash (custom op) peak",
            "output O",
            "naive s",
            "flash s",
            "max diff",
        ],
        &points.iter().map(Point::table_row).collect::<Vec<_>>(),
    );
    let json: Vec<_> = points.iter().map(Point::json).collect();
    lesson.report.metric("memory", &json);
    let png = lesson.out_dir.join("memory_vs_seq.png");
    plot(&png, &points)?;
    Ok(png)
}

/// Draws causal `Q, K, V (1, b·h, n, d)` and measures the peak extra bytes of each
/// implementation's forward (and the time of naive and custom op), each around its own call.
fn measure(dev: &Device, n: usize) -> Result<Point> {
    let (q, k, v) = (
        randn(&[1, BH, n, D], dev)?,
        randn(&[1, BH, n, D], dev)?,
        randn(&[1, BH, n, D], dev)?,
    );
    let scale = default_softmax_scale(D);
    let t0 = Instant::now();
    let (o_naive, naive) = peak_extra_bytes(|| naive_attention(&q, &k, &v, scale, true));
    let naive_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let (o_flash, flash) = peak_extra_bytes(|| flash_attention(&q, &k, &v, scale, true));
    let flash_s = t0.elapsed().as_secs_f64();
    let (o_tiled, tiled) =
        peak_extra_bytes(|| flash_attention_tensor_ops(&q, &k, &v, true, scale, 64, 64));
    let (o_naive, o_flash, o_tiled) = (o_naive?, o_flash?, o_tiled?.0);
    let max_rel_diff = max_rel(&o_flash, &o_naive)?.max(max_rel(&o_tiled, &o_naive)?);
    Ok(Point {
        n,
        score_matrix: BH * n * n * 4,
        naive,
        tiled,
        flash,
        output: BH * n * D * 4,
        naive_s,
        flash_s,
        max_rel_diff,
    })
}

impl Point {
    fn table_row(&self) -> Vec<String> {
        vec![
            self.n.to_string(),
            mb(self.score_matrix),
            mb(self.naive),
            mb(self.tiled),
            mb(self.flash),
            mb(self.output),
            format!("{:.2}", self.naive_s),
            format!("{:.2}", self.flash_s),
            format!("{:.0e}", self.max_rel_diff),
        ]
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "seq": self.n,
            "score_matrix_bytes": self.score_matrix,
            "naive_peak_bytes": self.naive,
            "tiled_tensor_ops_peak_bytes": self.tiled,
            "flash_custom_op_peak_bytes": self.flash,
            "output_bytes": self.output,
            "naive_s": self.naive_s,
            "flash_s": self.flash_s,
            "max_rel_diff": self.max_rel_diff,
        })
    }
}

/// Peak MiB against `n`, log–log: naive grows as n², the flash paths as n.
fn plot(png: &Path, points: &[Point]) -> Result<()> {
    let series = |bytes: fn(&Point) -> usize| {
        points
            .iter()
            .map(|p| (p.n as f64, mib(bytes(p) as u64)))
            .collect::<Vec<_>>()
    };
    line_chart(
        png,
        "Peak extra memory of one causal forward (CPU, measured; b·h = 2, d = 64)",
        "sequence length n",
        "MiB",
        &[
            Series::new("naive (t0801): materialises n×n", series(|p| p.naive)),
            Series::new("tiled tensor ops (64×64 tiles)", series(|p| p.tiled)),
            Series::new("FlashAttention custom op", series(|p| p.flash)),
            Series::new("one f32 n×n score matrix", series(|p| p.score_matrix)),
        ],
        Axes {
            log_x: true,
            log_y: true,
        },
    )
}

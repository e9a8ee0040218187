//! Experiment 2: the relative-position property. For a similar pair `q ≈ k` (`d_head` 64) the
//! score `⟨RoPE(q, m), RoPE(k, n)⟩` over a 48 × 48 grid of positions is constant along every
//! diagonal (it depends on `m − n` only), and decays, with ripples, as the distance grows.

use anyhow::Result;
use rand::{rngs::StdRng, Rng, SeedableRng};
use shared::report::{heatmap, line_chart, Axes, RunReport, Series};
use std::path::Path;
use t0808_rope::{rope_score, DEFAULT_BASE};

/// Figures `relative_scores.png`, `score_vs_offset.png`; metric
/// `relative.max_diagonal_deviation`.
pub fn run(seed: u64, out_dir: &Path, report: &mut RunReport) -> Result<()> {
    let d_head = 64;
    let mut rng = StdRng::seed_from_u64(seed);
    let q: Vec<f64> = (0..d_head).map(|_| rng.random::<f64>() - 0.5).collect();
    let k: Vec<f64> = q
        .iter()
        .map(|v| v + 0.3 * (rng.random::<f64>() - 0.5))
        .collect(); // similar to q
    let grid = 48;
    let scores: Vec<Vec<f64>> = (0..grid)
        .map(|m| {
            (0..grid)
                .map(|n| rope_score(&q, m as f64, &k, n as f64, DEFAULT_BASE))
                .collect()
        })
        .collect();
    let mut diag_dev = 0f64;
    for m in 1..grid {
        for n in 1..grid {
            diag_dev = diag_dev.max((scores[m][n] - scores[m - 1][n - 1]).abs());
        }
    }
    heatmap(
        &out_dir.join("relative_scores.png"),
        "⟨RoPE(q, m), RoPE(k, n)⟩ — constant along diagonals",
        "key position n",
        "query position m",
        &scores,
        None,
    )?;
    let by_offset: Vec<(f64, f64)> = (0..512)
        .map(|o| (o as f64, rope_score(&q, o as f64, &k, 0.0, DEFAULT_BASE)))
        .collect();
    line_chart(
        &out_dir.join("score_vs_offset.png"),
        "RoPE score of a similar pair (q ≈ k) vs distance",
        "m − n",
        "⟨RoPE(q, m), RoPE(k, n)⟩",
        &[Series::new("d_head 64, base 10 000", by_offset)],
        Axes::default(),
    )?;
    println!("   relative property: largest change along a diagonal of the {grid}×{grid} grid = {diag_dev:.2e}");
    report.metric("relative.max_diagonal_deviation", diag_dev);
    Ok(())
}

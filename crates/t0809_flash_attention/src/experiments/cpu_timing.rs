//! Experiment 3, small CPU timings: forward and forward+backward (autograd) of naive attention,
//! the tiled tensor ops and the custom op, causal, `b·h = 4`, `d = 64`, median of 3 runs.

use super::common::{median_secs, randn, tensor_ops, with_grads, Attn};
use super::lesson::Lesson;
use anyhow::Result;
use candle_core::{Device, Tensor};
use shared::report::print_table;
use t0809_flash_attention::*;

/// `b·h` (batch 1) and head size of every input.
const BH: usize = 4;
const D: usize = 64;
/// Timed runs per measurement (the median is kept).
const REPS: usize = 3;

/// The implementations timed, by their key in the report.
const IMPLEMENTATIONS: [(&str, Attn); 3] = [
    ("naive", naive_attention),
    ("tiled", tensor_ops),
    ("flash", flash_attention),
];

/// Prints the table and records the `cpu_timings` metric.
pub fn run(lesson: &mut Lesson) -> Result<()> {
    println!("\n-- 3. CPU time (b·h = 4, d = 64, causal; median of 3)");
    let seqs: Vec<usize> = if lesson.quick {
        vec![128]
    } else {
        vec![256, 512, 1024]
    };
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for &n in &seqs {
        let (row, entry) = time_seq(&lesson.dev, n)?;
        rows.push(row);
        json.push(entry);
    }
    print_table(
        &[
            "seq",
            "naive fwd / fwd+bwd ms",
            "tiled tensor ops ms",
            "flash custom op ms",
        ],
        &rows,
    );
    lesson.report.metric("cpu_timings", &json);
    Ok(())
}

/// Draws `Q, K, V` and the output weights `W`, all `(1, b·h, n, d)`, and times every
/// implementation on them: the table row (ms) and the report entry (s and GFLOP/s).
fn time_seq(dev: &Device, n: usize) -> Result<(Vec<String>, serde_json::Value)> {
    let (q, k, v, w) = (
        randn(&[1, BH, n, D], dev)?,
        randn(&[1, BH, n, D], dev)?,
        randn(&[1, BH, n, D], dev)?,
        randn(&[1, BH, n, D], dev)?,
    );
    let scale = default_softmax_scale(D);
    let flops = attention_fwd_flops(BH, n, n, D, true);
    let mut row = vec![n.to_string()];
    let mut entry = serde_json::json!({"seq": n});
    for (name, f) in IMPLEMENTATIONS {
        let (fwd, fb) = time_fwd_and_fwd_bwd(f, [&q, &k, &v, &w], scale)?;
        row.push(format!("{:.1} / {:.1}", fwd * 1e3, fb * 1e3));
        entry[name] = serde_json::json!({"fwd_s": fwd, "fwd_bwd_s": fb, "fwd_gflops": flops / fwd / 1e9, "fwd_bwd_gflops": 3.5 * flops / fb / 1e9});
    }
    Ok((row, entry))
}

/// Median seconds of the causal forward of `f`, and of forward+backward of `Σ O∘W`.
fn time_fwd_and_fwd_bwd(f: Attn, [q, k, v, w]: [&Tensor; 4], scale: f64) -> Result<(f64, f64)> {
    let fwd = median_secs(REPS, || Ok(f(q, k, v, scale, true).map(|_| ())?))?;
    let fwd_bwd = median_secs(REPS, || {
        Ok(with_grads(f, q, k, v, w, scale, true).map(|_| ())?)
    })?;
    Ok((fwd, fwd_bwd))
}

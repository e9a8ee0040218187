//! Experiment 4: decode speed without a KV cache. One new token costs a full forward over the
//! context `(1, ctx)` → logits `(1, ctx, vocab)`; fewer K/V heads shrink the K and V
//! projections, so the gain here is small — the cache (8-10) is where GQA pays.

use super::{kv_variants, variant_name, Lab};
use anyhow::Result;
use candle_core::{DType, Tensor};
use shared::report::{line_chart, print_table, Axes, RunReport, Series};
use std::time::Instant;
use t0804_transformer_block::DecoderOnlyLm;

/// Tokens per second for every variant and context (metrics `decode_tokens_per_s.<v>.ctx<c>`,
/// figure `decode_throughput.png`); `tokens` supplies the contexts.
pub fn run(lab: &Lab, tokens: &[u32], report: &mut RunReport) -> Result<()> {
    let contexts: Vec<usize> = if lab.quick {
        vec![32, 128]
    } else {
        vec![32, 64, 128, 256, 512]
    };
    let reps = if lab.quick { 2 } else { 5 };
    let h = lab.shape.n_heads;
    let (mut series, mut rows) = (vec![], vec![]);
    for k in kv_variants(h, &[4, 2, 1]) {
        let name = variant_name(k, h);
        let (_varmap, lm) = lab.init(k)?;
        let mut points = vec![];
        for &c in &contexts {
            let x = Tensor::from_vec(tokens[..c].to_vec(), (1, c), &lab.device)?;
            let tps = tokens_per_s(&lm, &x, reps)?;
            points.push((c as f64, tps));
            report.metric(&format!("decode_tokens_per_s.{name}.ctx{c}"), tps);
        }
        rows.push(
            std::iter::once(name.clone())
                .chain(points.iter().map(|p| format!("{:.1}", p.1)))
                .collect(),
        );
        series.push(Series::new(&name, points));
    }
    let header: Vec<String> = std::iter::once("tokens/s at ctx".to_string())
        .chain(contexts.iter().map(|c| c.to_string()))
        .collect();
    print_table(
        &header.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        &rows,
    );
    line_chart(
        &lab.out_dir.join("decode_throughput.png"),
        "Decode speed without a KV cache (full forward per token)",
        "context length",
        "new tokens / s",
        &series,
        Axes {
            log_x: true,
            log_y: true,
        },
    )?;
    Ok(())
}

/// New tokens per second when each costs a full forward of `x (1, ctx)`: one warm-up, then
/// the mean of `reps` timed forwards (each read back, so the device has finished).
fn tokens_per_s(lm: &DecoderOnlyLm, x: &Tensor, reps: usize) -> Result<f64> {
    let forward = || -> Result<f32> {
        Ok(lm
            .forward(x, 0)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?)
    };
    forward()?;
    let t = Instant::now();
    for _ in 0..reps {
        forward()?;
    }
    Ok(reps as f64 / t.elapsed().as_secs_f64())
}

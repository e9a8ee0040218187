//! Experiment 5: the four position schemes as language models on WikiText-2 (BPE), same data,
//! same budget. Learned positions are rung 2 (8-07's `grouped(modern(gpt2(shape)), n_kv)`),
//! RoPE is rung 3 (`llama(shape, n_kv)`); none and sinusoidal are rung 2 with those positions.
//! Each model accepts `2·ctx` positions but trains on `ctx`: the loss per position over windows
//! of `2·ctx` shows what happens beyond the trained context.

use super::{bucket_means, per_position, Models, SCHEMES};
use anyhow::Result;
use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use shared::batching::{eval_batches, LmBatch};
use shared::params::count_params;
use shared::report::{line_chart, print_table, Axes, RunReport, Series};
use shared::tokenizer::TokenizedWikiText;
use shared::train::{train_lm, AdamWConfig, LmCurve, LmTrainSpec, ScheduleConfig, Trainer};
use std::path::Path;
use t0804_transformer_block::DecoderOnlyLm;

/// Budget of the comparison (the same for every scheme).
pub struct LmBudget {
    /// BPE vocabulary.
    pub vocab: usize,
    /// Training context (evaluation up to 2×).
    pub ctx: usize,
    /// Training steps per scheme.
    pub steps: usize,
    /// Sequences per batch.
    pub batch: usize,
}

/// Trains every scheme: the table, metrics `wikitext.<scheme>`, figures `wikitext_val_loss.png`
/// and `wikitext_loss_by_position.png`.
pub fn run(
    models: &Models,
    budget: &LmBudget,
    data: &TokenizedWikiText,
    quick: bool,
    out_dir: &Path,
    report: &mut RunReport,
) -> Result<()> {
    let LmBudget {
        ctx, steps, batch, ..
    } = *budget;
    println!(
        "   WikiText-2{}: BPE vocab {}, train {} / valid {} tokens; {steps} steps of {batch} × {ctx} tokens per scheme",
        if quick { " (tiny stand-in)" } else { "" },
        budget.vocab,
        data.train.len(),
        data.valid.len()
    );
    let long = eval_batches(
        &data.valid,
        batch,
        2 * ctx,
        if quick { 2 } else { 24 },
        &models.device,
    )?;
    let (mut curves, mut per_pos_series, mut rows) = (vec![], vec![], vec![]);
    for (scheme, kind) in SCHEMES {
        let (varmap, lm) = models.init(budget.vocab, 2 * ctx, kind)?;
        let curve = train(models, budget, data, &varmap, &lm, scheme, quick)?;
        let val = curve.final_valid_loss().unwrap_or(f64::NAN);
        let points: Vec<(f64, f64)> = curve.valid.iter().map(|v| (v.0 as f64, v.1)).collect();
        let per_pos = loss_by_position(&lm, &long, ctx)?;
        let within = per_pos[..ctx].iter().sum::<f64>() / ctx as f64;
        let beyond = per_pos[ctx..].iter().sum::<f64>() / ctx as f64;
        let params = count_params(&varmap);
        rows.push(vec![
            scheme.to_string(),
            params.to_string(),
            format!("{val:.3}"),
            format!("{:.1}", val.exp()),
            format!("{within:.3}"),
            format!("{beyond:.3}"),
            format!("{:.1}", curve.wall_s),
        ]);
        report.metric(
            &format!("wikitext.{scheme}"),
            serde_json::json!({"params": params, "val_loss": val, "val_ppl": val.exp(),
                "loss_within_ctx": within, "loss_ctx_to_2ctx": beyond, "train_s": curve.wall_s,
                "curve": points}),
        );
        curves.push(Series::new(scheme, points));
        per_pos_series.push(Series::new(scheme, bucket_means(&per_pos, 8)));
    }
    print_table(
        &[
            "positions",
            "params",
            "val loss",
            "val ppl",
            &format!("loss pos < {ctx}"),
            &format!("loss pos {ctx}..{}", 2 * ctx),
            "train s",
        ],
        &rows,
    );
    plot(out_dir, budget, &curves, &per_pos_series)
}

/// `budget.steps` steps of `shared::train::train_lm` (AdamW, cosine schedule, warm-up 10 %,
/// clip 1), evaluated 6 times on the validation split.
fn train(
    models: &Models,
    budget: &LmBudget,
    data: &TokenizedWikiText,
    varmap: &VarMap,
    lm: &DecoderOnlyLm,
    scheme: &str,
    quick: bool,
) -> Result<LmCurve> {
    let LmBudget {
        ctx, steps, batch, ..
    } = *budget;
    let schedule = ScheduleConfig {
        max_lr: models.lr,
        min_lr: models.lr / 10.0,
        warmup_steps: steps / 10,
        total_steps: steps,
        clip_norm: Some(1.0),
    };
    let mut trainer = Trainer::new(varmap, AdamWConfig::default(), schedule)?;
    let spec = LmTrainSpec {
        label: format!("WikiText-2 {scheme}"),
        steps,
        batch_size: batch,
        seq_len: ctx,
        eval_every: (steps / 6).max(1),
        eval_batches: if quick { 2 } else { 8 },
        seed: models.seed,
        patience: None,
    };
    let loss_fn = |x: &Tensor, y: &Tensor| lm.loss(x, y);
    train_lm(
        &mut trainer,
        &data.train,
        &data.valid,
        &spec,
        &models.device,
        &loss_fn,
    )
}

/// Mean loss at each of the `2·ctx` positions of the windows `long` (positions ≥ ctx were
/// never trained).
fn loss_by_position(lm: &DecoderOnlyLm, long: &[LmBatch], ctx: usize) -> Result<Vec<f64>> {
    let mut per_pos = vec![0f64; 2 * ctx];
    for b in long {
        let mask = Tensor::ones(b.y.dims2()?, DType::U8, b.y.device())?;
        let (p, _, _) = per_position(lm, &b.x, &b.y, &mask, ctx)?;
        for (acc, v) in per_pos.iter_mut().zip(p) {
            *acc += v / long.len() as f64;
        }
    }
    Ok(per_pos)
}

fn plot(out_dir: &Path, budget: &LmBudget, curves: &[Series], per_pos: &[Series]) -> Result<()> {
    let LmBudget {
        ctx, steps, batch, ..
    } = *budget;
    line_chart(
        &out_dir.join("wikitext_val_loss.png"),
        &format!("WikiText-2 validation loss, {steps} steps × {batch} × {ctx} tokens"),
        "step",
        "validation loss (nats/token)",
        curves,
        Axes::default(),
    )?;
    line_chart(
        &out_dir.join("wikitext_loss_by_position.png"),
        &format!("WikiText-2 loss per position, trained at context {ctx}"),
        "position",
        "cross-entropy (nats, mean over 8 positions)",
        per_pos,
        Axes::default(),
    )?;
    Ok(())
}

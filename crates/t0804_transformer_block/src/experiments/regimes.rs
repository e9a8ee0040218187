//! **Pre- vs post-norm under two learning-rate regimes.** The same model, data and budget, trained
//! four times through the one training loop ([`shared::train::train_lm`], random windows
//! `(batch, seq_len)` of the training tokens):
//!
//! * **standard**: peak `--lr` after a warm-up over the first 10 % of the steps, cosine decay to a
//!   tenth, gradient clipping at 1.0;
//! * **aggressive**: peak `--aggressive-lr` from the first step, no warm-up, no clipping.
//!
//! Each run records its training loss and (pre-clipping) gradient norm at every step, its
//! validation loss every tenth of the run, and the step at which it diverged, if it did.
//!
//! Figures: `loss_vs_step.png`, `valid_loss_vs_wall.png`, `grad_norm_vs_step.png`,
//! `final_valid_loss.png`; metric `runs`.

use super::model::{fresh_lm, model_config, smooth, Shape};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use shared::report::{bar_chart, line_chart, print_table, Axes, Series};
use shared::tokenizer::TokenizedWikiText;
use shared::train::{train_lm, AdamWConfig, LmCurve, LmTrainSpec, ScheduleConfig, Trainer};
use std::path::Path;
use t0804_transformer_block::NormPlacement;

/// A learning-rate regime: peak rate, warm-up steps and gradient clipping.
pub struct Regime {
    pub name: &'static str,
    pub lr: f64,
    pub warmup: usize,
    pub clip: Option<f64>,
}

/// The standard regime (warm-up over 10 % of `steps`, clipping at 1.0) and the aggressive one.
pub fn regimes(steps: usize, lr: f64, aggressive_lr: f64) -> [Regime; 2] {
    [
        Regime {
            name: "standard",
            lr,
            warmup: (steps / 10).max(1),
            clip: Some(1.0),
        },
        Regime {
            name: "aggressive",
            lr: aggressive_lr,
            warmup: 0,
            clip: None,
        },
    ]
}

/// One training run: its label (`"Pre-norm standard"`, …) and its curve.
pub struct Run {
    pub label: String,
    pub curve: LmCurve,
}

/// Everything a run shares with the others.
pub struct Setup<'a> {
    pub shape: Shape,
    pub data: &'a TokenizedWikiText,
    pub seed: u64,
    pub eval_batches: usize,
    pub dtype: DType,
    pub dev: &'a Device,
}

/// Trains pre- and post-norm under every regime, in the order standard pre, standard post,
/// aggressive pre, aggressive post.
pub fn run(setup: &Setup, regimes: &[Regime]) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for regime in regimes {
        for placement in [NormPlacement::Pre, NormPlacement::Post] {
            runs.push(train_one(setup, regime, placement)?);
        }
    }
    Ok(runs)
}

/// A fresh model at `placement` (same seed for all), trained for `shape.steps` under `regime`;
/// a divergence ends the run early and is recorded in the curve.
fn train_one(setup: &Setup, regime: &Regime, placement: NormPlacement) -> Result<Run> {
    let s = &setup.shape;
    let cfg = model_config(s, placement);
    let (varmap, lm) = fresh_lm(&cfg, setup.seed, setup.dtype, setup.dev)?;
    let schedule = ScheduleConfig {
        max_lr: regime.lr,
        min_lr: regime.lr / 10.0,
        warmup_steps: regime.warmup,
        total_steps: s.steps,
        clip_norm: regime.clip,
    };
    let mut trainer = Trainer::new(&varmap, AdamWConfig::default(), schedule)?;
    let label = format!("{placement:?}-norm {}", regime.name);
    let spec = LmTrainSpec {
        label: label.clone(),
        steps: s.steps,
        batch_size: s.batch,
        seq_len: s.seq_len,
        eval_every: (s.steps / 10).max(1),
        eval_batches: setup.eval_batches,
        seed: setup.seed,
        patience: None,
    };
    let loss_fn = |x: &Tensor, y: &Tensor| lm.loss(x, y);
    let (train, valid) = (&setup.data.train, &setup.data.valid);
    let curve = train_lm(&mut trainer, train, valid, &spec, setup.dev, &loss_fn)?;
    Ok(Run { label, curve })
}

/// The four figures of the comparison, in `out_dir`.
pub fn plot(runs: &[Run], out_dir: &Path) -> Result<()> {
    // `column` picks a per-step quantity of `curve.train = (step, loss, grad norm, wall s)`.
    let per_step = |column: fn(&(usize, f64, f64, f64)) -> f64| -> Vec<Series> {
        runs.iter()
            .map(|r| {
                let pts: Vec<_> = r
                    .curve
                    .train
                    .iter()
                    .map(|t| (t.0 as f64, column(t)))
                    .collect();
                Series::new(r.label.clone(), smooth(&pts, 10))
            })
            .collect()
    };
    line_chart(
        &out_dir.join("loss_vs_step.png"),
        "Training loss (10-step mean)",
        "step",
        "cross-entropy (nats)",
        &per_step(|t| t.1),
        Axes::default(),
    )?;
    let valid: Vec<Series> = runs
        .iter()
        .map(|r| {
            Series::new(
                r.label.clone(),
                r.curve.valid.iter().map(|v| (v.2, v.1)).collect(),
            )
        })
        .collect();
    line_chart(
        &out_dir.join("valid_loss_vs_wall.png"),
        "Validation loss vs wall-clock",
        "seconds",
        "cross-entropy (nats)",
        &valid,
        Axes::default(),
    )?;
    line_chart(
        &out_dir.join("grad_norm_vs_step.png"),
        "Global gradient norm (before clipping, 10-step mean)",
        "step",
        "‖g‖",
        &per_step(|t| t.2),
        Axes {
            log_x: false,
            log_y: true,
        },
    )?;
    plot_final_losses(runs, out_dir)
}

/// `final_valid_loss.png`: one bar per run; a diverged run (no final loss) has an empty bar.
fn plot_final_losses(runs: &[Run], out_dir: &Path) -> Result<()> {
    let finals: Vec<f64> = runs
        .iter()
        .map(|r| {
            r.curve
                .final_valid_loss()
                .filter(|v| v.is_finite())
                .unwrap_or(0.0)
        })
        .collect();
    bar_chart(
        &out_dir.join("final_valid_loss.png"),
        "Final validation loss (NaN bar = diverged)",
        "cross-entropy (nats)",
        &runs.iter().map(|r| r.label.clone()).collect::<Vec<_>>(),
        &finals,
    )
}

/// Prints the summary table (final validation loss and perplexity, divergence, largest gradient
/// norm, tokens/s) and returns the `results.json` record of each run.
pub fn summarise(runs: &[Run]) -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    let mut metrics = Vec::new();
    for Run { label, curve: c } in runs {
        let max_gn = c.train.iter().map(|t| t.2).fold(0.0, f64::max);
        let v = c.final_valid_loss();
        rows.push(vec![
            label.clone(),
            v.map_or("-".into(), |v| format!("{v:.3}")),
            v.map_or("-".into(), |v| format!("{:.1}", v.exp())),
            c.diverged_at
                .map_or("no".into(), |s| format!("at step {s}")),
            format!("{max_gn:.2}"),
            format!("{:.0}", c.tokens_per_s),
        ]);
        metrics.push(serde_json::json!({
            "run": label, "final_valid_loss": v, "final_valid_ppl": v.map(f64::exp), "diverged_at": c.diverged_at,
            "max_grad_norm": max_gn, "tokens_per_s": c.tokens_per_s, "wall_s": c.wall_s,
            "valid_curve": c.valid, "train_loss": c.train.iter().map(|t| t.1).collect::<Vec<_>>(),
            "grad_norm": c.train.iter().map(|t| t.2).collect::<Vec<_>>(),
        }));
    }
    println!();
    let header = [
        "run",
        "valid loss",
        "valid ppl",
        "diverged",
        "max ‖g‖",
        "tok/s",
    ];
    print_table(&header, &rows);
    metrics
}

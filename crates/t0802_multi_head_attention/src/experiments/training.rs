//! The same model with 1, 2, 4 … heads at the same width `d_model`, trained through the one loop
//! (`shared::fit`) with the same budget: AdamW (weight decay 0.01), warm-up over 5 % of the
//! steps, cosine decay from `lr` to `lr/20`, gradients clipped at norm 1.

use super::model::{evaluate, Eval, Model};
use super::task::{Batch, SplitMix};
use super::{fmt_loss, Lab};
use anyhow::Result;
use candle_core::Tensor;
use candle_nn::{VarBuilder, VarMap};
use shared::fit::{fit, Curve, FitSpec, Task};
use shared::params::count_params;
use shared::report::{line_chart, print_table, Axes, Series};
use shared::train::{AdamWConfig, ScheduleConfig, Trainer};

/// One trained model and what the later experiments quote about it.
pub struct Trained {
    pub n_heads: usize,
    pub model: Model,
    pub n_params: usize,
    /// `(step, training loss smoothed by an EMA of 0.95)` every 10 steps and at the last.
    pub curve: Vec<(f64, f64)>,
    /// On the evaluation set, after training.
    pub final_eval: Eval,
    /// Seconds in training steps (evaluation excluded).
    pub seconds: f64,
}

/// Trains one model per head count, prints each result, draws the training curves.
pub fn run(lab: &Lab, heads: &[usize], eval: &[Batch]) -> Result<Vec<Trained>> {
    println!(
        "\n-- training ({} steps of {} sequences each)",
        lab.steps, lab.batch
    );
    let trained = heads
        .iter()
        .map(|&h| train(lab, h, eval))
        .collect::<Result<Vec<_>>>()?;
    training_figure(lab, &trained)?;
    Ok(trained)
}

/// Training of one model as a [`Task`] of the one loop: step `s` trains on the `s`-th batch of
/// the run's token stream, and validation is the full [`evaluate`] on the fixed set.
struct HeadsTraining<'a> {
    lab: &'a Lab,
    model: &'a Model,
    eval: &'a [Batch],
    /// Seed of this model's token stream.
    seed: u64,
    /// The latest validation, with its accuracies.
    last_eval: Option<Eval>,
}

impl Task for HeadsTraining<'_> {
    /// Step `s` reads the stream from draw `s·b·T` on: the batches of one uninterrupted stream.
    fn train_loss(&mut self, step: usize) -> Result<(Tensor, usize)> {
        let (b, task) = (self.lab.batch, self.lab.task);
        let mut rng = SplitMix::skipped(self.seed, (step * b * task.seq_len) as u64);
        let batch = task.batch(b, &mut rng, &self.lab.device)?;
        Ok((self.model.loss(&batch)?, b * task.len()))
    }

    fn valid_loss(&mut self) -> Result<f64> {
        let e = evaluate(self.model, self.eval, None, self.lab.task.vocab)?;
        self.last_eval = Some(e);
        Ok(e.loss)
    }
}

/// Builds the `n_heads` model, trains it with [`fit`] and evaluates it.
fn train(lab: &Lab, n_heads: usize, eval: &[Batch]) -> Result<Trained> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, lab.dtype, &lab.device);
    let model = Model::new(vb, lab.task, lab.d_model, n_heads)?;
    let n_params = count_params(&varmap);
    let mut trainer = Trainer::new(
        &varmap,
        AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        },
        ScheduleConfig {
            max_lr: lab.lr,
            min_lr: lab.lr / 20.0,
            warmup_steps: lab.steps / 20,
            total_steps: lab.steps,
            clip_norm: Some(1.0),
        },
    )?;
    let mut task = HeadsTraining {
        lab,
        model: &model,
        eval,
        seed: lab.seed.wrapping_mul(1000 + n_heads as u64),
        last_eval: None,
    };
    let spec = FitSpec {
        label: format!("{n_heads} head(s)"),
        eval_every: lab.steps, // at the start and the end
        patience: None,
    };
    let curve = fit(&mut trainer, &mut task, &spec, None)?;
    let final_eval = match (task.last_eval, curve.diverged_at) {
        (Some(e), None) => e,
        _ => evaluate(&model, eval, None, lab.task.vocab)?,
    };
    let seconds = curve.train_seconds;
    println!(
        "   {n_heads} head(s): eval loss {}, accuracy {:.3} (previous token {:.3}, seen-before {:.3}) in {seconds:.1} s",
        fmt_loss(final_eval.loss),
        final_eval.accuracy,
        final_eval.prev_accuracy,
        final_eval.seen_accuracy
    );
    Ok(Trained {
        n_heads,
        model,
        n_params,
        curve: smoothed(&curve),
        final_eval,
        seconds,
    })
}

/// The training loss as an exponential moving average (`s ← 0.95·s + 0.05·loss`), sampled every
/// 10 steps and at the last; points are `(step + 1, s)`.
fn smoothed(curve: &Curve) -> Vec<(f64, f64)> {
    let last = curve.train.last().map_or(0, |t| t.0);
    let mut s = f64::NAN;
    let mut points = Vec::new();
    for &(step, loss, _, _) in &curve.train {
        s = if s.is_nan() {
            loss
        } else {
            0.95 * s + 0.05 * loss
        };
        if step.is_multiple_of(10) || step == last {
            points.push((step as f64 + 1.0, s));
        }
    }
    points
}

fn training_figure(lab: &Lab, trained: &[Trained]) -> Result<()> {
    let series: Vec<Series> = trained
        .iter()
        .map(|t| {
            let label = format!(
                "{} head(s) (d_head = {})",
                t.n_heads,
                lab.d_model / t.n_heads
            );
            Series::new(label, t.curve.clone())
        })
        .collect();
    line_chart(
        &lab.out_dir.join("t0802_training.png"),
        "Training loss (smoothed) by number of heads, same d_model",
        "step",
        "cross-entropy (nats, EMA 0.95)",
        &series,
        Axes::default(),
    )
}

/// The closing table: one row per model.
pub fn print_summary(trained: &[Trained], device: &str) {
    let rows: Vec<Vec<String>> = trained
        .iter()
        .map(|t| {
            vec![
                t.n_heads.to_string(),
                t.n_params.to_string(),
                fmt_loss(t.final_eval.loss),
                format!("{:.3}", t.final_eval.accuracy),
                format!("{:.3}", t.final_eval.prev_accuracy),
                format!("{:.3}", t.final_eval.seen_accuracy),
                format!("{:.1}", t.seconds),
            ]
        })
        .collect();
    println!("\n== summary ({device})");
    print_table(
        &[
            "heads",
            "model params",
            "eval loss",
            "accuracy",
            "prev-token acc",
            "seen-before acc",
            "train s",
        ],
        &rows,
    );
}

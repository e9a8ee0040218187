//! The copy-back task learned by the same model with each position scheme, through the one loop
//! (`shared::fit`) with the same budget and the same initial weights for the shared parts:
//! AdamW (weight decay 0.01), warm-up over 10 % of the steps, cosine decay from `lr` to `lr/10`,
//! gradients clipped at norm 1.

use super::model::{evaluate, Model};
use super::task::BatchStream;
use super::Lab;
use anyhow::Result;
use candle_core::Tensor;
use candle_nn::{VarBuilder, VarMap};
use shared::fit::{fit, FitSpec, Task};
use shared::params::{count_params, named_vars};
use shared::report::{line_chart, Axes, Series};
use shared::train::{cross_entropy, AdamWConfig, ScheduleConfig, Trainer};
use t0803_positional_encoding::PositionScheme;

/// One trained model and what the later experiments quote about it.
pub struct Trained {
    pub scheme: PositionScheme,
    pub model: Model,
    /// `(step, training loss)` at every step.
    pub losses: Vec<(f64, f64)>,
    /// Parameters of the position scheme alone.
    pub position_params: usize,
    /// Seconds in training steps (evaluation excluded).
    pub train_s: f64,
}

impl Trained {
    pub fn final_loss(&self) -> Option<f64> {
        self.losses.last().map(|x| x.1)
    }
}

/// Trains one model per scheme of [`PositionScheme::ALL`] and draws the training curves.
pub fn run(lab: &Lab) -> Result<Vec<Trained>> {
    println!(
        "-- 2. Task: output the token {} position(s) back; vocab {}, trained at length {}, {} steps × {} sequences per scheme",
        lab.task.shift, lab.task.vocab, lab.train_len, lab.steps, lab.batch
    );
    let trained = PositionScheme::ALL
        .into_iter()
        .map(|scheme| train(lab, scheme))
        .collect::<Result<Vec<_>>>()?;
    loss_figure(lab, &trained)?;
    Ok(trained)
}

/// Training of one model as a [`Task`] of the one loop: step `s` trains on batch `s` of the
/// run's stream (the same for every scheme); validation is the loss at the training length on
/// the evaluation sequences of that length.
struct CopyBackTraining<'a> {
    lab: &'a Lab,
    model: &'a Model,
    batches: BatchStream,
}

impl Task for CopyBackTraining<'_> {
    fn train_loss(&mut self, step: usize) -> Result<(Tensor, usize)> {
        let (x, y, m) = self.batches.at(step, &self.lab.device)?;
        let (logits, _) = self.model.forward(&x)?;
        Ok((cross_entropy(&logits, &y, Some(&m))?, x.elem_count()))
    }

    fn valid_loss(&mut self) -> Result<f64> {
        let lab = self.lab;
        let len = lab.train_len;
        let eval = evaluate(
            self.model,
            lab.task,
            len,
            lab.eval_batches,
            lab.eval_seed(len),
            &lab.device,
        )?;
        Ok(eval.loss)
    }
}

/// Builds the model for `scheme` from the run's seed, trains it with [`fit`].
fn train(lab: &Lab, scheme: PositionScheme) -> Result<Trained> {
    shared::params::set_seed(lab.seed); // same initial weights for the shared parts
    let varmap = VarMap::new();
    let model = Model::new(
        VarBuilder::from_varmap(&varmap, lab.dtype, &lab.device),
        lab,
        scheme,
    )?;
    let position_params = named_vars(&varmap)
        .iter()
        .filter(|(n, _)| n.starts_with("positions."))
        .map(|(_, v)| v.elem_count())
        .sum();
    let mut trainer = Trainer::new(
        &varmap,
        AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        },
        ScheduleConfig {
            max_lr: lab.lr,
            min_lr: lab.lr / 10.0,
            warmup_steps: lab.steps / 10,
            total_steps: lab.steps,
            clip_norm: Some(1.0),
        },
    )?;
    let mut task = CopyBackTraining {
        lab,
        model: &model,
        batches: BatchStream::new(lab.task, lab.seed ^ 0x5eed, lab.batch, lab.train_len),
    };
    let spec = FitSpec {
        label: scheme.name().to_string(),
        eval_every: lab.steps, // at the start and the end
        patience: None,
    };
    let curve = fit(&mut trainer, &mut task, &spec, None)?;
    let losses: Vec<(f64, f64)> = curve.train.iter().map(|t| (t.0 as f64, t.1)).collect();
    println!(
        "   {:<14} {} parameters ({} for positions), final loss {:.4}",
        scheme.name(),
        count_params(&varmap),
        position_params,
        losses.last().map_or(f64::NAN, |l| l.1)
    );
    Ok(Trained {
        scheme,
        model,
        losses,
        position_params,
        train_s: curve.train_seconds,
    })
}

fn loss_figure(lab: &Lab, trained: &[Trained]) -> Result<()> {
    let series: Vec<Series> = trained
        .iter()
        .map(|t| Series::new(t.scheme.name(), t.losses.clone()))
        .collect();
    line_chart(
        &lab.out_dir.join("training_loss.png"),
        &format!(
            "Training loss at length {} (copy the token {} back)",
            lab.train_len, lab.task.shift
        ),
        "step",
        "cross-entropy",
        &series,
        Axes::default(),
    )
}

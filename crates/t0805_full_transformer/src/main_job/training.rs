//! Training either contender through the one loop ([`shared::fit::fit`]), with the same batches,
//! schedule and checkpoints for both:
//!
//! * step `s` trains on `batch_for_step(train, batch, s, seed)`, a deterministic shuffle per
//!   epoch, so a resumed run sees exactly the batches of an uninterrupted one;
//! * AdamW (β = (0.9, 0.95), weight decay 0.1 on matrices), warm-up over the first 5 % of the
//!   steps, cosine decay to a tenth of the peak, clipping at 1.0;
//! * validation every twelfth of the run on a fixed slice of the validation pairs;
//! * tokens/s counts source and target tokens of the training steps only;
//! * a checkpoint every `--checkpoint-every` steps and at the end in `checkpoints/<model>/`,
//!   restored by `--resume` (parameters, AdamW moments, step, curve so far). A divergence saves
//!   the last good parameters and then stops the experiment with an error.

use super::data::Data;
use super::model::{evaluate, Model};
use crate::task::batch_for_step;
use crate::Preset;
use anyhow::{anyhow, Result};
use candle_core::Tensor;
use candle_nn::VarMap;
use shared::fit::{fit, Checkpointing, Curve, FitSpec, Task};
use shared::kernels::OpImpl;
use shared::train::{AdamWConfig, ScheduleConfig, Trainer};
use std::path::PathBuf;
use t0804_transformer_block::Parts;

/// How both contenders are run, beside the preset.
pub struct RunSettings<'a> {
    /// How the Transformer's norms and attention run (a rung's parts: 8-04's composed ones, or
    /// the fused LayerNorm and FlashAttention of 8-06 and 8-09).
    pub parts: &'a dyn Parts,
    /// Checkpoints go to `checkpoints/<model>/`.
    pub checkpoints: PathBuf,
    pub checkpoint_every: usize,
    pub resume: bool,
    pub seed: u64,
    /// Validation batches during training.
    pub eval_batches: usize,
    /// How the LSTM runs (the same values either way).
    pub lstm: OpImpl,
    /// Mixed precision by casting every f32 weight where it is used, not with master weights.
    pub cast_weights: bool,
}

/// A sequence-to-sequence model on the continuation pairs, as the one loop sees it.
struct Seq2SeqTask<'a> {
    model: &'a Model,
    data: &'a Data,
    batch: usize,
    seed: u64,
    eval_batches: usize,
}

impl Task for Seq2SeqTask<'_> {
    /// The loss of step `step`'s batch, and its tokens: target plus source.
    fn train_loss(&mut self, step: usize) -> Result<(Tensor, usize)> {
        let examples = batch_for_step(&self.data.train, self.batch, step, self.seed);
        let b = self.data.batch(&examples)?;
        Ok((self.model.loss(&b)?, b.n_target_tokens + b.src.elem_count()))
    }

    fn valid_loss(&mut self) -> Result<f64> {
        evaluate(
            self.model,
            &self.data.valid,
            self.data,
            self.batch,
            self.eval_batches,
        )
    }
}

/// Trains `model` for `p.steps` steps and returns its curve; a divergence is an error that names
/// the folder of the last good checkpoint. The model's parameters are `varmap`, or, under mixed
/// precision, `copies` of them, with `varmap` as the f32 master weights ([`copies_for`]).
///
/// [`copies_for`]: shared::train::copies_for
pub fn train_model(
    name: &str,
    model: &Model,
    (varmap, copies): (&mut VarMap, Option<&VarMap>),
    data: &Data,
    p: &Preset,
    run: &RunSettings<'_>,
) -> Result<Curve> {
    let schedule = ScheduleConfig {
        max_lr: p.lr,
        min_lr: p.lr / 10.0,
        warmup_steps: (p.steps / 20).max(1),
        total_steps: p.steps,
        clip_norm: Some(1.0),
    };
    let mut trainer = Trainer::for_params(varmap, copies, AdamWConfig::default(), schedule)?;
    let mut task = Seq2SeqTask {
        model,
        data,
        batch: p.batch,
        seed: run.seed,
        eval_batches: run.eval_batches,
    };
    let spec = FitSpec {
        label: name.to_string(),
        eval_every: (p.steps / 12).max(1),
        patience: None,
    };
    let checkpoints = Checkpointing {
        dir: run.checkpoints.join(name),
        every: run.checkpoint_every,
        resume: run.resume,
        meta: serde_json::json!({ "preset": p, "model": name }),
    };
    let curve = fit(&mut trainer, &mut task, &spec, Some((varmap, &checkpoints)))?;
    match curve.diverged_at {
        None => Ok(curve),
        Some(step) => Err(anyhow!("training diverged at step {step}").context(format!(
            "{name}: the last good checkpoint is in {}",
            checkpoints.dir.display()
        ))),
    }
}

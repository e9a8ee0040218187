//! # The one training loop
//!
//! Every topic that trains goes through [`fit`]: steps, evaluation, the schedule and clipping (the
//! [`Trainer`]), checkpoints and resume, progress, and the loss curve that the topic then plots
//! and writes to `results.json`. A topic supplies its model, its batches and its metric as a
//! [`Task`]:
//!
//! ```text
//! for step in trainer.step .. total_steps:
//!     every eval_every steps:  valid ← task.valid_loss()
//!     loss, tokens ← task.train_loss(step)          the batch is a function of the step
//!     trainer.step(loss)                             backward, clip, NaN guard, AdamW
//!     every checkpoint.every steps: save (parameters, moments, step, curve)
//! valid ← task.valid_loss();  save
//! ```
//!
//! Because a step's batch depends only on the step number (and the run's seed), a run stopped and
//! resumed from its checkpoint sees exactly the batches an uninterrupted run sees.
//!
//! With [`FitSpec::patience`], the run stops once the validation loss has not improved for that
//! many evaluations and ends with the parameters of its best evaluation (early stopping: on a
//! corpus as small as WikiText-2 a model starts to memorise long before a fixed budget ends).
//!
//! A divergence (NaN/Inf loss or gradient) ends the run early; it is recorded in the curve
//! ([`Curve::diverged_at`]) rather than raised, so experiments can compare it, and with
//! checkpoints the last good parameters are saved first.

use crate::device::{device_memory_peak, reset_device_memory_peak};
use crate::train::{human_rate, Diverged, Progress, Trainer};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use std::path::PathBuf;
use std::time::Instant;

/// What a topic trains: the loss of a step's batch, and the validation loss.
pub trait Task {
    /// The loss of training step `step` (a single value) and the number of tokens it trained on.
    /// The batch must be a function of `step` and the run's seed, so that resuming is exact.
    fn train_loss(&mut self, step: usize) -> Result<(Tensor, usize)>;
    /// The validation loss of the current parameters (keeping no gradient).
    fn valid_loss(&mut self) -> Result<f64>;
}

/// How [`fit`] runs: `trainer.schedule.total_steps` steps, evaluating every `eval_every`.
#[derive(Debug, Clone)]
pub struct FitSpec {
    /// Shown on the progress bar and in messages.
    pub label: String,
    /// Evaluate every this many steps (and always at the start and the end).
    pub eval_every: usize,
    /// Early stopping: stop after this many evaluations without a new best validation loss, and
    /// end with the best evaluation's parameters (`None`: train every step, keep the last).
    pub patience: Option<usize>,
}

/// Where and how often [`fit`] writes checkpoints, and whether it resumes from one.
#[derive(Debug, Clone)]
pub struct Checkpointing {
    pub dir: PathBuf,
    /// Save every this many steps (and always at the end).
    pub every: usize,
    /// Continue from the checkpoint in `dir` when there is one.
    pub resume: bool,
    /// Stored with the checkpoint (the model's config, the run's preset…).
    pub meta: serde_json::Value,
}

/// The record of one training run.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Curve {
    /// `(step, training loss, gradient norm, wall seconds)` for every step.
    pub train: Vec<(usize, f64, f64, f64)>,
    /// `(step, validation loss, wall seconds)` at each evaluation.
    pub valid: Vec<(usize, f64, f64)>,
    /// Step at which the loss or gradient stopped being finite, if it did.
    pub diverged_at: Option<usize>,
    /// Seconds spent in training steps (forward + backward + update; evaluation excluded).
    pub train_seconds: f64,
    /// Tokens the training steps consumed.
    pub tokens: usize,
    /// Training tokens per second.
    pub tokens_per_s: f64,
    pub wall_s: f64,
    /// `(step, bytes)` at each evaluation: the most device memory live tensors held since the
    /// previous evaluation (the CUDA pool's high-water mark, [`device_memory_peak`]), the first
    /// entry since [`fit`] started (the first evaluation's own memory); empty on the CPU. A flat
    /// series is a run that does not leak. The pool is one per device: runs on one device at the
    /// same time see each other's memory.
    #[serde(default)]
    pub memory_peak: Vec<(usize, u64)>,
    /// With early stopping: `(step, validation loss)` of the best evaluation, whose parameters
    /// the run ended with.
    #[serde(default)]
    pub best: Option<(usize, f64)>,
    /// With early stopping: the step at which the run stopped for lack of improvement, if it did.
    #[serde(default)]
    pub stopped_early_at: Option<usize>,
}

impl Curve {
    /// The validation loss of the parameters the run ended with: the best evaluation's under
    /// early stopping, else the last evaluation's.
    pub fn final_valid_loss(&self) -> Option<f64> {
        self.best.map(|b| b.1).or(self.valid.last().map(|v| v.1))
    }

    /// The first and the last entries of [`Curve::memory_peak`] after the start (the peaks of
    /// the first and the last evaluation intervals), `None` on the CPU or before two evaluations.
    pub fn memory_peak_first_last(&self) -> Option<(u64, u64)> {
        let trained: Vec<u64> = self
            .memory_peak
            .iter()
            .filter(|m| m.0 > 0)
            .map(|m| m.1)
            .collect();
        Some((*trained.first()?, *trained.last()?))
    }

    /// Wall time of the last recorded event (where a resumed run's clock continues).
    fn last_wall(&self) -> f64 {
        let t = self.train.last().map_or(0.0, |t| t.3);
        self.valid.last().map_or(t, |v| v.2.max(t))
    }
}

/// Trains `task` with `trainer` from `trainer.step` to the schedule's `total_steps` (see the
/// module documentation). With `checkpoints`, parameters, optimiser state, step and curve are
/// saved in `checkpoints.1.dir` and, when asked, restored from there first.
pub fn fit(
    trainer: &mut Trainer,
    task: &mut dyn Task,
    spec: &FitSpec,
    checkpoints: Option<(&mut VarMap, &Checkpointing)>,
) -> Result<Curve> {
    fit_in_group(trainer, task, spec, checkpoints, None)
}

/// [`fit`] for one rank of a data-parallel group ([`crate::data_parallel`]): each step averages
/// the gradients and the loss over the ranks ([`Trainer::step_data_parallel`]); the task gives
/// this rank its share of each batch. Every rank evaluates and keeps the same curve; only rank 0
/// writes checkpoints, and every rank resumes from them. With `group` `None`, [`fit`].
pub fn fit_in_group(
    trainer: &mut Trainer,
    task: &mut dyn Task,
    spec: &FitSpec,
    mut checkpoints: Option<(&mut VarMap, &Checkpointing)>,
    group: Option<&dyn crate::data_parallel::Collective>,
) -> Result<Curve> {
    let writes_checkpoints = group.is_none_or(|g| g.rank() == 0);
    if spec.patience.is_some() && checkpoints.is_some() {
        // The best parameters live in memory only: a resumed run would not know them.
        anyhow::bail!(
            "{}: early stopping (patience) and checkpoints cannot be combined: train with one or the other",
            spec.label
        );
    }
    let mut curve = match checkpoints.as_mut() {
        Some((varmap, ck)) if ck.resume => resume(trainer, varmap, ck, &spec.label)?,
        _ => Curve::default(),
    };
    let total = trainer.schedule.total_steps;
    let device = trainer.opt.vars().first().map(|(_, v)| v.device().clone());
    if let Some(device) = &device {
        reset_device_memory_peak(device)?; // the first interval starts here, not at the process start
    }
    let mut clock = Clock::new(curve.last_wall());
    let mut progress = Progress::new(total as u64, &spec.label);
    let mut best = spec.patience.map(BestSoFar::new);
    while trainer.step < total {
        let step = trainer.step;
        if step.is_multiple_of(spec.eval_every.max(1))
            && curve.valid.last().is_none_or(|v| v.0 != step)
        {
            let loss = task.valid_loss()?;
            curve.valid.push((step, loss, clock.wall()));
            record_memory_peak(device.as_ref(), step, &mut curve)?;
            if let Some(best) = best.as_mut() {
                if best.observe(step, loss, trainer)? {
                    println!(
                        "   {}: no better validation loss in {} evaluations: stopping at step {step}",
                        spec.label, best.patience
                    );
                    curve.stopped_early_at = Some(step);
                    break;
                }
            }
        }
        if !train_one_step(
            trainer,
            task,
            group,
            &mut curve,
            &mut clock,
            &mut progress,
            &spec.label,
        )? {
            break; // diverged: recorded in the curve
        }
        if let Some((varmap, ck)) = checkpoints.as_ref().filter(|_| writes_checkpoints) {
            if trainer.step.is_multiple_of(ck.every.max(1)) && trainer.step < total {
                save(trainer, varmap, ck, &curve)?;
            }
        }
    }
    progress.finish();
    if curve.diverged_at.is_none()
        && curve.stopped_early_at.is_none()
        && curve.valid.last().is_none_or(|v| v.0 != total)
    {
        let loss = task.valid_loss()?;
        curve.valid.push((total, loss, clock.wall()));
        record_memory_peak(device.as_ref(), total, &mut curve)?;
        if let Some(best) = best.as_mut() {
            best.observe(total, loss, trainer)?;
        }
    }
    if let Some(best) = best {
        curve.best = best.restore(trainer)?;
    }
    if let Some((varmap, ck)) = checkpoints.as_ref().filter(|_| writes_checkpoints) {
        save(trainer, varmap, ck, &curve)?; // after a divergence: the last good step's parameters
    }
    curve.tokens_per_s = curve.tokens as f64 / curve.train_seconds.max(1e-9);
    curve.wall_s = clock.wall();
    Ok(curve)
}

/// Early stopping's memory: the best validation loss so far, a copy of its parameters, and how
/// many evaluations have passed without improving on it.
struct BestSoFar {
    patience: usize,
    best: Option<(usize, f64)>,
    parameters: Vec<Tensor>,
    since: usize,
}

impl BestSoFar {
    fn new(patience: usize) -> Self {
        Self {
            patience,
            best: None,
            parameters: Vec::new(),
            since: 0,
        }
    }

    /// Records an evaluation (copying the parameters when it is the best so far); `true` when
    /// `patience` evaluations in a row have not improved on the best.
    fn observe(&mut self, step: usize, loss: f64, trainer: &Trainer) -> Result<bool> {
        if loss.is_finite() && self.best.is_none_or(|b| loss < b.1) {
            self.best = Some((step, loss));
            self.parameters = trainer
                .opt
                .parameters()
                .iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?;
            self.since = 0;
        } else {
            self.since += 1;
        }
        Ok(self.since >= self.patience.max(1))
    }

    /// Puts the best evaluation's parameters back; returns its `(step, loss)`.
    fn restore(self, trainer: &Trainer) -> Result<Option<(usize, f64)>> {
        for ((_, var), saved) in trainer.opt.parameters().iter().zip(&self.parameters) {
            var.set(saved)?;
        }
        trainer.opt.refresh_copies()?;
        Ok(self.best)
    }
}

/// Appends the device's memory high-water mark since the last call to `curve.memory_peak` and
/// starts a new one (nothing on the CPU).
fn record_memory_peak(device: Option<&Device>, step: usize, curve: &mut Curve) -> Result<()> {
    let Some(device) = device else { return Ok(()) };
    if let Some(peak) = device_memory_peak(device)? {
        curve.memory_peak.push((step, peak));
        reset_device_memory_peak(device)?;
    }
    Ok(())
}

/// One step: the task's loss, the trainer's update, the curve and the progress bar. Returns
/// `false` when the step diverged (nothing was updated).
fn train_one_step(
    trainer: &mut Trainer,
    task: &mut dyn Task,
    group: Option<&dyn crate::data_parallel::Collective>,
    curve: &mut Curve,
    clock: &mut Clock,
    progress: &mut Progress,
    label: &str,
) -> Result<bool> {
    let step = trainer.step;
    let t0 = Instant::now();
    let (loss, tokens) = task.train_loss(step)?;
    let stepped = match group {
        Some(group) => trainer.step_data_parallel(&loss, group),
        None => trainer.step(&loss),
    };
    let stats = match stepped {
        Ok(stats) => stats,
        Err(e) if e.downcast_ref::<Diverged>().is_some() => {
            eprintln!("{label}: {e}");
            curve.diverged_at = Some(step);
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    curve.train_seconds += t0.elapsed().as_secs_f64(); // `step` read the loss: the device is done
    curve.tokens += tokens;
    curve
        .train
        .push((step, stats.loss, stats.grad_norm, clock.wall()));
    let rate = curve.tokens as f64 / curve.train_seconds.max(1e-9);
    progress.update(
        trainer.step as u64,
        format!(
            "loss {:.3} · lr {:.1e} · {} tok/s",
            stats.loss,
            stats.lr,
            human_rate(rate)
        ),
    );
    Ok(true)
}

/// Wall seconds since the run started, continuing a resumed run's clock.
struct Clock {
    offset: f64,
    started: Instant,
}

impl Clock {
    fn new(offset: f64) -> Self {
        Self {
            offset,
            started: Instant::now(),
        }
    }

    fn wall(&self) -> f64 {
        self.offset + self.started.elapsed().as_secs_f64()
    }
}

fn save(trainer: &Trainer, varmap: &VarMap, ck: &Checkpointing, curve: &Curve) -> Result<()> {
    let meta = serde_json::json!({ "meta": ck.meta, "curve": curve });
    trainer.save_checkpoint(varmap, &ck.dir, &meta)
}

/// Restores the checkpoint in `ck.dir` if there is one, returning its curve.
fn resume(
    trainer: &mut Trainer,
    varmap: &mut VarMap,
    ck: &Checkpointing,
    label: &str,
) -> Result<Curve> {
    let Some(folder) = crate::checkpoint::latest(&ck.dir)? else {
        return Ok(Curve::default());
    };
    check_same_run(trainer, ck, &folder, label)?; // before anything is overwritten
    let saved = trainer
        .load_checkpoint(varmap, &ck.dir)
        .with_context(|| format!("resuming {label} from {}", ck.dir.display()))?;
    let mut curve: Curve = serde_json::from_value(saved["curve"].clone())
        .with_context(|| format!("{}: the checkpoint's curve is unreadable", ck.dir.display()))?;
    curve.diverged_at = None; // the resumed run trains on from the last good step
    println!(
        "   resumed {label} at step {} from {}",
        trainer.step,
        ck.dir.display()
    );
    Ok(curve)
}

/// Refuses a checkpoint written by another configuration or with another schedule, reading only
/// its `state.json`, so that nothing is overwritten first.
fn check_same_run(
    trainer: &Trainer,
    ck: &Checkpointing,
    folder: &std::path::Path,
    label: &str,
) -> Result<()> {
    let path = folder.join("state.json");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    if state["config"]["meta"] != ck.meta {
        anyhow::bail!(
            "{label}: the checkpoint in {} was written by another configuration ({}), not this one ({})",
            folder.display(),
            state["config"]["meta"],
            ck.meta
        );
    }
    let schedule = serde_json::to_value(&trainer.schedule)?;
    if state["schedule"] != schedule {
        anyhow::bail!(
            "{label}: the checkpoint in {} was trained with the schedule {}, this run has {}",
            folder.display(),
            state["schedule"],
            schedule
        );
    }
    Ok(())
}

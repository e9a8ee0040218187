//! Training mechanics: AdamW, the cosine schedule with warm-up, global gradient-norm clipping,
//! a NaN/Inf guard, evaluation, checkpoints and a progress bar.
//!
//! The optimiser is written here (a dozen tensor ops) rather than taken from candle-nn so that its
//! moments can be checkpointed by parameter name and a resumed run continues *exactly*.

use crate::params::named_vars;
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;

/// Hyper-parameters of AdamW (Loshchilov & Hutter, 2019).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// AdamW over named variables:
/// `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
/// `θ ← θ − lr·(m̂ / (√v̂ + ε) + λθ)` with bias-corrected `m̂ = m/(1−β₁ᵗ)`, `v̂ = v/(1−β₂ᵗ)`.
/// Weight decay applies to matrices only (rank ≥ 2), not to gains and biases.
pub struct AdamW {
    pub config: AdamWConfig,
    /// One launch for every tensor ([`crate::adamw::update_all`] and
    /// [`crate::adamw::sum_of_squares_all`], the default) or three launches per tensor and one for
    /// each tensor's `Σ g²` (`false`; on the CPU both are the same loops).
    pub multi_tensor: bool,
    vars: Vec<(String, Var)>,
    /// With master weights ([`AdamW::with_master_weights`]): the f32 parameter of each variable
    /// in `vars`, which are then the model's bf16/f16 copies.
    masters: Option<Vec<Var>>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Number of updates taken so far.
    pub t: u64,
}

impl AdamW {
    pub fn new(varmap: &VarMap, config: AdamWConfig) -> Result<Self> {
        let vars = named_vars(varmap);
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config,
            multi_tensor: true,
            vars,
            masters: None,
            m,
            v,
            t: 0,
        })
    }

    /// Mixed precision with master weights. `compute` holds the model's parameters in the compute
    /// dtype (bf16 or f16, made by [`compute_copies`]); `masters` holds the same names in f32.
    /// Gradients arrive for the compute copies, in their dtype; each step updates the f32 masters
    /// and moments and writes the masters, rounded, back into the copies (one kernel on CUDA).
    /// The model never casts a weight, and no gradient is cast.
    pub fn with_master_weights(
        compute: &VarMap,
        masters: &VarMap,
        config: AdamWConfig,
    ) -> Result<Self> {
        let vars = named_vars(compute);
        let by_name: HashMap<String, Var> = named_vars(masters).into_iter().collect();
        let mut master_vars = Vec::with_capacity(vars.len());
        for (name, var) in &vars {
            let master = by_name
                .get(name)
                .with_context(|| format!("no master weight for the parameter '{name}'"))?;
            if master.dims() != var.dims() || master.dtype() != candle_core::DType::F32 {
                anyhow::bail!(
                    "master weight '{name}' is {:?} {:?}; expected f32 of the copy's shape {:?}",
                    master.dims(),
                    master.dtype(),
                    var.dims()
                );
            }
            master_vars.push(master.clone());
        }
        if by_name.len() != vars.len() {
            anyhow::bail!(
                "{} master weights for {} parameters",
                by_name.len(),
                vars.len()
            );
        }
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = master_vars
            .iter()
            .map(zeros)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = master_vars
            .iter()
            .map(zeros)
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config,
            multi_tensor: true,
            vars,
            masters: Some(master_vars),
            m,
            v,
            t: 0,
        })
    }

    /// The parameters as the optimizer keeps them: the f32 masters with master weights, else the
    /// variables themselves (what to save, restore and broadcast).
    pub fn parameters(&self) -> Vec<(String, Var)> {
        match &self.masters {
            Some(masters) => self
                .vars
                .iter()
                .zip(masters)
                .map(|((name, _), m)| (name.clone(), m.clone()))
                .collect(),
            None => self.vars.clone(),
        }
    }

    /// With master weights, writes each master, rounded, into its compute copy (after the
    /// masters were set from outside: a checkpoint, a restored best, a broadcast). A no-op
    /// without.
    pub fn refresh_copies(&self) -> Result<()> {
        if let Some(masters) = &self.masters {
            for ((_, copy), master) in self.vars.iter().zip(masters) {
                copy.set(&master.as_tensor().to_dtype(copy.dtype())?)?;
            }
        }
        Ok(())
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update with learning rate `lr`. Variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// One update with every gradient multiplied by `grad_scale` first (the clipping factor of
    /// [`clip_factor`]), done in place by [`crate::adamw`]: three passes per tensor, no allocation.
    pub fn step_scaled(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        let Some((_, first)) = self.vars.first() else {
            return Ok(());
        };
        let gate = crate::adamw::host_gate(grad_scale, first.device())?;
        self.step_gated(grads, lr, &gate)
    }

    /// One update whose gradient scale and go-ahead come from `gate`, a device tensor `[s, ok]`
    /// ([`crate::adamw::step_gate`]): nothing here waits for the device, and with `ok = 0` the
    /// kernels leave parameters and moments as they are.
    pub fn step_gated(&mut self, grads: &GradStore, lr: f64, gate: &Tensor) -> Result<()> {
        let c = self.config;
        self.t += 1;
        let step = crate::adamw::StepScalars {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            bias_correction1: 1.0 - c.beta1.powi(self.t as i32),
            bias_correction2: 1.0 - c.beta2.powi(self.t as i32),
        };
        let slots: Vec<crate::adamw::Slot> = self
            .vars
            .iter()
            .enumerate()
            .filter_map(|(i, (_, var))| {
                let master = self.masters.as_ref().map(|m| m[i].as_tensor());
                Some(crate::adamw::Slot {
                    theta: master.unwrap_or(var.as_tensor()),
                    grad: grads.get(var.as_tensor())?,
                    m: &self.m[i],
                    v: &self.v[i],
                    weight_decay: if var.rank() >= 2 { c.weight_decay } else { 0.0 },
                    copy: master.map(|_| var.as_tensor()),
                })
            })
            .collect();
        if self.multi_tensor {
            return Ok(crate::adamw::update_all(&slots, &step, gate)?);
        }
        for s in &slots {
            crate::adamw::update_one(s, &step, gate)?;
        }
        Ok(())
    }

    /// `Σ g²` over every variable's gradient (the clipping norm's square), on the device: one
    /// launch for all of them, or one per tensor without [`AdamW::multi_tensor`].
    pub fn grad_sum_of_squares(&self, grads: &GradStore) -> Result<Option<Tensor>> {
        if self.multi_tensor {
            return grad_sum_of_squares(grads, &self.vars);
        }
        let present: Vec<&Tensor> = self
            .vars
            .iter()
            .filter_map(|(_, v)| grads.get(v.as_tensor()))
            .collect();
        Ok(crate::adamw::sum_of_squares_each(&present)?)
    }

    /// The moments as named tensors (`m.<name>`, `v.<name>`) for checkpoints.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        for (i, (name, var)) in self.parameters().iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}.{name}");
                let saved = state
                    .get(&key)
                    .with_context(|| format!("optimizer state has no '{key}'"))?;
                // A fresh copy: the moments are updated in place and must own their storage.
                *slot = saved
                    .to_device(var.device())?
                    .to_dtype(var.dtype())?
                    .copy()?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// A `VarMap` of fresh variables holding `masters`' parameters in `dtype`, under the same names:
/// the compute copies of [`AdamW::with_master_weights`]. Build the model on it (a `VarBuilder`
/// returns the variables already present).
pub fn compute_copies(masters: &VarMap, dtype: candle_core::DType) -> Result<VarMap> {
    let copies = VarMap::new();
    {
        let mut data = copies.data().lock().expect("VarMap lock poisoned");
        for (name, var) in named_vars(masters) {
            // A copy in every case (`to_dtype` to the same dtype would return the variable).
            let value = var.as_tensor().to_dtype(dtype)?.copy()?;
            data.insert(name, Var::from_tensor(&value)?);
        }
    }
    Ok(copies)
}

/// Mixed precision with master weights: compute copies of `params` ([`compute_copies`]) when the
/// model is to compute in `compute` and the parameters are in another dtype; `None` when they are
/// already in `compute` (the model is built on `params` itself). Build the model on the copies
/// and train with [`Trainer::for_params`].
pub fn copies_for(params: &VarMap, compute: candle_core::DType) -> Result<Option<VarMap>> {
    let vars = named_vars(params);
    let Some((_, first)) = vars.first() else {
        return Ok(None);
    };
    if let Some((name, v)) = vars.iter().find(|(_, v)| v.dtype() != first.dtype()) {
        bail!(
            "copies_for: the parameters mix dtypes ('{name}' is {:?}, '{}' {:?}); mixed precision \
             needs them all in one (f32)",
            v.dtype(),
            vars[0].0,
            first.dtype()
        );
    }
    match first.dtype() == compute {
        true => Ok(None),
        false => Ok(Some(compute_copies(params, compute)?)),
    }
}

/// Learning rate at `step` (0-based): linear warm-up from 0 to `max_lr` over `warmup` steps,
/// then a cosine decay to `min_lr` at `total`, and `min_lr` after.
///
/// `lr(s) = max_lr · s / warmup` for `s < warmup`;
/// `lr(s) = min_lr + ½(1 + cos(π·(s − warmup)/(total − warmup)))·(max_lr − min_lr)` for `warmup ≤ s ≤ total`.
pub fn cosine_lr(step: usize, max_lr: f64, min_lr: f64, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return max_lr * step as f64 / warmup as f64;
    }
    if step >= total {
        return min_lr;
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (max_lr - min_lr)
}

/// `Σᵢ Σ gᵢ²` over all gradients, as a one-element f32 tensor on their device (no host
/// synchronisation); `None` when no variable has a gradient.
pub fn grad_sum_of_squares(grads: &GradStore, vars: &[(String, Var)]) -> Result<Option<Tensor>> {
    let present: Vec<&Tensor> = vars
        .iter()
        .filter_map(|(_, v)| grads.get(v.as_tensor()))
        .collect();
    Ok(crate::adamw::sum_of_squares_all(&present)?)
}

/// The global L2 norm of all gradients, `‖g‖ = √(Σᵢ Σ gᵢ²)`, computed on the device with a single
/// host synchronisation.
pub fn grad_norm(grads: &GradStore, vars: &[(String, Var)]) -> Result<f64> {
    Ok(match grad_sum_of_squares(grads, vars)? {
        Some(sum) => sum.to_scalar::<f32>()?.sqrt() as f64,
        None => 0.0,
    })
}

/// The factor clipping multiplies the gradients by: `max_norm / (‖g‖ + 10⁻⁶)` when the norm is
/// finite and above `max_norm`, else 1.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if norm.is_finite() && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Scales all gradients by [`clip_factor`] and returns the norm *before* clipping. (The
/// [`Trainer`] instead hands the factor to [`AdamW::step_scaled`], which saves a pass.)
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads, vars)?;
    let scale = clip_factor(norm, max_norm);
    if scale != 1.0 {
        for (_, v) in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g * scale)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// Raised when the loss or the gradient norm stops being finite. Parameters are not updated by the
/// step that raises it, so the model (and the last checkpoint) are the last good ones.
#[derive(Debug, Clone)]
pub struct Diverged {
    pub step: usize,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "training diverged at step {}: loss {} and gradient norm {} (lr {:.2e}); the step was not \
             applied, so the parameters and the last checkpoint are the last good ones. Try a lower \
             learning rate, a longer warm-up or gradient clipping.",
            self.step, self.loss, self.grad_norm, self.lr
        )
    }
}
impl std::error::Error for Diverged {}

/// Schedule and clipping settings of a run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScheduleConfig {
    pub max_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    /// Clip the global gradient norm to this (None: no clipping).
    pub clip_norm: Option<f64>,
}

/// What one optimisation step measured.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct StepStats {
    pub step: usize,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

/// A step enqueued by [`Trainer::step_deferred`] whose loss and gradient norm have not been read
/// yet (device tensors). Hand it to [`Trainer::finish`].
#[derive(Debug)]
#[must_use = "a deferred step is only checked for divergence by Trainer::finish"]
pub struct PendingStep {
    pub step: usize,
    pub lr: f64,
    /// AdamW's step count after this step (to recognise the latest step on rollback).
    adam_t: u64,
    loss: Tensor,
    sum_sq: Tensor,
}

/// AdamW + schedule + clipping + NaN guard, stepping one `VarMap`.
pub struct Trainer {
    pub opt: AdamW,
    pub schedule: ScheduleConfig,
    /// Steps completed.
    pub step: usize,
}

impl Trainer {
    pub fn new(varmap: &VarMap, adamw: AdamWConfig, schedule: ScheduleConfig) -> Result<Self> {
        Ok(Self {
            opt: AdamW::new(varmap, adamw)?,
            schedule,
            step: 0,
        })
    }

    /// A trainer whose optimizer keeps f32 master weights for a model built on their compute
    /// copies ([`AdamW::with_master_weights`]).
    pub fn with_master_weights(
        compute: &VarMap,
        masters: &VarMap,
        adamw: AdamWConfig,
        schedule: ScheduleConfig,
    ) -> Result<Self> {
        Ok(Self {
            opt: AdamW::with_master_weights(compute, masters, adamw)?,
            schedule,
            step: 0,
        })
    }

    /// [`Trainer::new`] for `params`, or, with `copies` ([`copies_for`]), a trainer keeping
    /// `params` as the f32 master weights of a model built on the copies.
    pub fn for_params(
        params: &VarMap,
        copies: Option<&VarMap>,
        adamw: AdamWConfig,
        schedule: ScheduleConfig,
    ) -> Result<Self> {
        match copies {
            Some(copies) => Self::with_master_weights(copies, params, adamw, schedule),
            None => Self::new(params, adamw, schedule),
        }
    }

    /// Sets this rank's parameters to rank `root`'s (the same start on every rank of a
    /// data-parallel group): the f32 masters with master weights, whose copies are then
    /// refreshed, else the variables.
    pub fn broadcast_parameters(
        &self,
        group: &dyn crate::data_parallel::Collective,
        root: usize,
    ) -> Result<()> {
        crate::data_parallel::broadcast_parameters(&self.opt.parameters(), group, root)?;
        self.opt.refresh_copies()
    }

    /// A checkpoint is written from, and read into, the optimizer's own parameters: with master
    /// weights the f32 masters, not the model's bf16 copies (which would lose the masters'
    /// precision on saving, and be overwritten by the old masters after loading).
    fn check_is_parameters(&self, varmap: &VarMap, what: &str) -> Result<()> {
        let given = named_vars(varmap);
        let own = self.opt.parameters();
        let same = given.len() == own.len()
            && given
                .iter()
                .zip(&own)
                .all(|((a, x), (b, y))| a == b && x.as_tensor().id() == y.as_tensor().id());
        if !same {
            anyhow::bail!(
                "{what}: the VarMap given is not the one this trainer updates (with master \
                 weights, pass the f32 masters' VarMap, not the model's compute copies)"
            );
        }
        Ok(())
    }

    /// The learning rate the next step will use.
    pub fn lr(&self) -> f64 {
        let s = &self.schedule;
        cosine_lr(self.step, s.max_lr, s.min_lr, s.warmup_steps, s.total_steps)
    }

    /// Back-propagates `loss`, clips, checks for NaN/Inf, and updates the parameters.
    /// Returns [`Diverged`] (as an `anyhow::Error`) without touching the parameters when the loss
    /// or the gradient is not finite.
    pub fn step(&mut self, loss: &Tensor) -> Result<StepStats> {
        let pending = self.step_deferred(loss)?;
        self.finish(pending)
    }

    /// [`Trainer::step`] without waiting for the device: backward, gradient norm, clipping and
    /// AdamW are all enqueued, the clipping factor and the finite-loss check are computed on the
    /// device ([`crate::adamw::step_gate`]) and read by the AdamW kernels there. A divergent step
    /// changes nothing on the device; [`Trainer::finish`] reads the loss and the norm (one
    /// synchronisation) and reports it.
    pub fn step_deferred(&mut self, loss: &Tensor) -> Result<PendingStep> {
        self.step_deferred_in(loss, None)
    }

    /// [`Trainer::step`] for one rank of a data-parallel group ([`crate::data_parallel`]): the
    /// gradients and the loss are averaged over the ranks before clipping and AdamW, so every
    /// rank makes the same update (and the same decision on a non-finite loss or gradient).
    pub fn step_data_parallel(
        &mut self,
        loss: &Tensor,
        group: &dyn crate::data_parallel::Collective,
    ) -> Result<StepStats> {
        let pending = self.step_deferred_in(loss, Some(group))?;
        self.finish(pending)
    }

    fn step_deferred_in(
        &mut self,
        loss: &Tensor,
        group: Option<&dyn crate::data_parallel::Collective>,
    ) -> Result<PendingStep> {
        if loss.elem_count() != 1 {
            bail!(
                "Trainer::step: the loss must be a single value, got shape {:?}",
                loss.dims()
            );
        }
        if let Some(max) = self.schedule.clip_norm {
            if !(max.is_finite() && max > 0.0) {
                bail!("Trainer::step: clip_norm must be a positive number, got {max}");
            }
        }
        let lr = self.lr();
        let loss = loss.to_dtype(DType::F32)?.reshape(())?;
        // In a group the gradients are averaged over the ranks in buckets that leave while the
        // backward still runs.
        let (grads, loss) = match group {
            Some(group) => {
                let vars = self.opt.vars();
                let bucket = crate::data_parallel::BUCKET_ELEMS;
                let (grads, loss, _) =
                    crate::data_parallel::backward_averaged(&loss, vars, group, bucket)?;
                (grads, loss)
            }
            None => (loss.backward()?, loss),
        };
        let sum_sq = match self.opt.grad_sum_of_squares(&grads)? {
            Some(s) => s,
            None => Tensor::zeros((), DType::F32, loss.device())?,
        };
        let gate = crate::adamw::step_gate(&sum_sq, &loss, self.schedule.clip_norm)?;
        self.opt.step_gated(&grads, lr, &gate)?;
        let pending = PendingStep {
            step: self.step,
            lr,
            adam_t: self.opt.t,
            loss: loss.detach(),
            sum_sq,
        };
        self.step += 1;
        Ok(pending)
    }

    /// Reads a [`PendingStep`]'s loss and gradient norm (a host synchronisation) and returns its
    /// statistics, or [`Diverged`] if they were not finite: the device skipped that update, and
    /// when it is the latest step the step counters are taken back too, so nothing was lost.
    /// (Steps enqueued after a divergent one were applied; finish each step before the next
    /// where that matters.)
    pub fn finish(&mut self, pending: PendingStep) -> Result<StepStats> {
        let loss = pending.loss.to_scalar::<f32>()? as f64;
        let grad_norm = pending.sum_sq.to_scalar::<f32>()?.sqrt() as f64;
        if !loss.is_finite() || !grad_norm.is_finite() {
            if pending.step + 1 == self.step && pending.adam_t == self.opt.t {
                self.step -= 1;
                self.opt.t -= 1;
            }
            bail!(Diverged {
                step: pending.step,
                loss,
                grad_norm: if loss.is_finite() {
                    grad_norm
                } else {
                    f64::NAN
                },
                lr: pending.lr
            });
        }
        Ok(StepStats {
            step: pending.step,
            loss,
            grad_norm,
            lr: pending.lr,
        })
    }

    /// Writes a crash-consistent checkpoint under the root `dir` ([`crate::checkpoint`]):
    /// parameters, AdamW moments and `state.json` (step, AdamW's count, schedule, `config`) in a
    /// new `step-NNNNNNNN` folder, then the `latest` pointer; the previous checkpoint survives any
    /// failure during the save.
    pub fn save_checkpoint(
        &self,
        varmap: &VarMap,
        dir: &Path,
        config: &serde_json::Value,
    ) -> Result<()> {
        self.save_checkpoint_failing_at(varmap, dir, config, None)
    }

    /// [`Trainer::save_checkpoint`] with an I/O error injected at `fault` (fault-injection tests).
    pub fn save_checkpoint_failing_at(
        &self,
        varmap: &VarMap,
        dir: &Path,
        config: &serde_json::Value,
        fault: Option<crate::checkpoint::Stage>,
    ) -> Result<()> {
        self.check_is_parameters(varmap, "save_checkpoint")?;
        let model: HashMap<String, Tensor> = crate::params::named_vars(varmap)
            .into_iter()
            .map(|(name, var)| (name, var.as_tensor().clone()))
            .collect();
        let state = serde_json::json!({ "step": self.step, "adam_t": self.opt.t, "schedule": self.schedule, "config": config });
        let contents = crate::checkpoint::Contents {
            step: self.step,
            model: &model,
            optimizer: &self.opt.state_tensors(),
            state: &state,
        };
        crate::checkpoint::save_failing_at(dir, &contents, fault)?;
        Ok(())
    }

    /// Restores parameters, optimiser moments and step from the latest checkpoint under `dir`
    /// (refusing one whose files disagree on the step); returns the stored config for the caller
    /// to compare with its own.
    pub fn load_checkpoint(
        &mut self,
        varmap: &mut VarMap,
        dir: &Path,
    ) -> Result<serde_json::Value> {
        self.check_is_parameters(varmap, "load_checkpoint")?;
        let folder = crate::checkpoint::latest(dir)?
            .with_context(|| format!("no checkpoint under {}", dir.display()))?;
        let device = self
            .opt
            .vars()
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let loaded = crate::checkpoint::load(&folder, &device)?;
        crate::params::set_params(varmap, &loaded.model, &folder.join("model.safetensors"))?;
        self.opt.refresh_copies()?;
        let adam_t = loaded.state["adam_t"]
            .as_u64()
            .context("state.json has no adam_t")?;
        self.opt.load_state(&loaded.optimizer, adam_t)?;
        self.step = loaded.step;
        Ok(loaded.state["config"].clone())
    }
}

/// Mean of per-batch losses weighted by batch token counts, and its perplexity `exp(loss)`.
pub fn mean_loss_and_ppl(losses_and_counts: &[(f64, usize)]) -> (f64, f64) {
    let total: usize = losses_and_counts.iter().map(|(_, n)| n).sum();
    let loss = losses_and_counts
        .iter()
        .map(|(l, n)| l * *n as f64)
        .sum::<f64>()
        / total.max(1) as f64;
    (loss, loss.exp())
}

/// A progress bar that shows loss, learning rate and throughput. Off a terminal (CI logs, the GPU
/// host), it prints a plain line every tenth of the run instead.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    label: String,
    started: std::time::Instant,
    last_plain: u64,
}

impl Progress {
    pub fn new(total: u64, label: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            bar
        });
        Self {
            bar,
            total,
            label: label.to_string(),
            started: std::time::Instant::now(),
            last_plain: 0,
        }
    }

    /// Reports position `pos` with a message such as `loss 3.21 · lr 3e-4 · 12.3k tok/s`.
    pub fn update(&mut self, pos: u64, msg: String) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(pos);
                bar.set_message(msg);
            }
            None => {
                let tenth = (self.total / 10).max(1);
                if pos >= self.last_plain + tenth || pos == self.total {
                    self.last_plain = pos;
                    eprintln!(
                        "{:>12} {pos}/{} {msg} [{:.0}s]",
                        self.label,
                        self.total,
                        self.started.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Formats a rate such as 12345.6 as `12.3k`.
pub fn human_rate(x: f64) -> String {
    match x {
        x if x >= 1e6 => format!("{:.2}M", x / 1e6),
        x if x >= 1e3 => format!("{:.1}k", x / 1e3),
        x => format!("{x:.1}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_nll_predicts_every_token_but_the_first_once() -> Result<()> {
        // A uniform model over V tokens pays exactly ln V per prediction.
        let vocab = 7usize;
        let uniform = |x: &Tensor, y: &Tensor| -> candle_core::Result<Tensor> {
            let (b, n) = x.dims2()?;
            let logits = Tensor::zeros((b, n, vocab), DType::F32, x.device())?;
            cross_entropy(&logits, y, None)
        };
        let dev = candle_core::Device::Cpu;
        for (n, ctx, batch) in [(2, 4, 3), (17, 4, 2), (40, 8, 3), (41, 8, 5), (9, 1, 4)] {
            let tokens: Vec<u32> = (0..n).map(|i| (i * 3 % vocab) as u32).collect();
            let (total, count) = corpus_nll(&tokens, ctx, batch, &dev, &uniform)?;
            assert_eq!(count, n - 1, "n {n}, ctx {ctx}");
            let want = (vocab as f64).ln() * (n - 1) as f64;
            assert!(
                (total - want).abs() < 1e-5 * want,
                "n {n}, ctx {ctx}: {total} vs {want}"
            );
        }
        assert!((word_level_perplexity(2.0 * 10.0, 10) - 2f64.exp()).abs() < 1e-12);
        assert!(corpus_nll(&[1], 4, 2, &dev, &uniform).is_err());
        Ok(())
    }
    use candle_core::Device;
    use candle_nn::VarBuilder;

    #[test]
    fn cosine_schedule_matches_closed_form() {
        let (max, min, w, t) = (1e-3, 1e-4, 10, 110);
        assert_eq!(cosine_lr(0, max, min, w, t), 0.0);
        assert!((cosine_lr(5, max, min, w, t) - 5e-4).abs() < 1e-15);
        assert!((cosine_lr(10, max, min, w, t) - max).abs() < 1e-15);
        // Halfway through the decay the cosine term is ½(1 + cos(π/2)) = ½.
        assert!((cosine_lr(60, max, min, w, t) - (min + 0.5 * (max - min))).abs() < 1e-15);
        assert!((cosine_lr(110, max, min, w, t) - min).abs() < 1e-15);
        assert_eq!(cosine_lr(500, max, min, w, t), min);
    }

    fn two_var_problem() -> Result<(VarMap, Tensor)> {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
        let a = vb.get_with_hints((2, 3), "a", candle_nn::Init::Const(0.0))?;
        let b = vb.get_with_hints(4, "b", candle_nn::Init::Const(0.0))?;
        let va = Var::from_tensor(&a)?;
        va.set(&Tensor::new(
            &[[1.0f64, -2.0, 3.0], [0.5, 0.25, -4.0]],
            &dev,
        )?)?;
        let vbv = Var::from_tensor(&b)?;
        vbv.set(&Tensor::new(&[2.0f64, -1.0, 0.0, 7.0], &dev)?)?;
        // loss = Σ a³/3 + Σ b²: gradients a², 2b.
        let loss = ((a.powf(3.0)? / 3.0)?.sum_all()? + b.sqr()?.sum_all()?)?;
        Ok((varmap, loss))
    }

    #[test]
    fn gradient_clipping_matches_f64_computation() -> Result<()> {
        let (varmap, loss) = two_var_problem()?;
        let vars = named_vars(&varmap);
        let mut grads = loss.backward()?;
        let ga = [1.0f64, 4.0, 9.0, 0.25, 0.0625, 16.0];
        let gb = [4.0f64, -2.0, 0.0, 14.0];
        let want = ga.iter().chain(&gb).map(|g| g * g).sum::<f64>().sqrt();
        let norm = clip_grad_norm(&mut grads, &vars, 1.0)?;
        assert!((norm - want).abs() < 1e-4 * want, "{norm} vs {want}");
        let after = grad_norm(&grads, &vars)?;
        assert!((after - 1.0).abs() < 1e-4, "clipped norm {after}");
        let b = grads.get(vars[1].1.as_tensor()).unwrap().to_vec1::<f64>()?;
        assert!((b[3] - 14.0 / want).abs() < 1e-6);
        Ok(())
    }

    /// The in-place update against AdamW written as tensor ops (what `step` used to be), over
    /// three steps with a clipping factor, weight decay on the matrix only, in f64 and f32.
    #[test]
    fn in_place_adamw_equals_the_composed_update() -> Result<()> {
        let dev = crate::device::test_device();
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, dtype, &dev);
            let w = vb.get_with_hints(
                (3, 5),
                "w",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?;
            let b = vb.get_with_hints(
                5,
                "b",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?;
            let c = AdamWConfig::default();
            let mut opt = AdamW::new(&varmap, c)?;
            // The reference keeps its own copies of θ, m, v.
            let mut theta: Vec<Tensor> = [&w, &b]
                .iter()
                .map(|t| t.copy())
                .collect::<candle_core::Result<_>>()?;
            let mut m: Vec<Tensor> = theta
                .iter()
                .map(|t| t.zeros_like())
                .collect::<candle_core::Result<_>>()?;
            let mut v = m.clone();
            let (lr, scale) = (0.05, 0.7);
            for t in 1..=3 {
                let loss = ((w.sqr()?.sum_all()? * 0.5)? + (&w.sum(0)? * &b)?.sum_all()?)?;
                let grads = loss.backward()?;
                opt.step_scaled(&grads, lr, scale)?;
                let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
                for (i, p) in [&w, &b].iter().enumerate() {
                    let g = (grads.get(p).unwrap() * scale)?;
                    m[i] = ((&m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                    v[i] = ((&v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    let step = ((&m[i] / bc1)? / ((&v[i] / bc2)?.sqrt()? + c.eps)?)?;
                    let decay = if i == 0 { c.weight_decay } else { 0.0 };
                    theta[i] = ((&theta[i] * (1.0 - lr * decay))? - (step * lr)?)?;
                    let diff = (p.to_dtype(DType::F64)? - theta[i].to_dtype(DType::F64)?)?
                        .abs()?
                        .max_all()?
                        .to_scalar::<f64>()?;
                    assert!(
                        diff < tol,
                        "{dtype:?} step {t}, tensor {i}: differs by {diff}"
                    );
                }
            }
        }
        Ok(())
    }

    /// The trainer folds clipping into the optimiser (`step_scaled`): one step must move the
    /// parameters exactly as clipping the gradients first and then stepping does.
    #[test]
    fn trainer_clipping_equals_clip_then_step() -> Result<()> {
        let schedule = ScheduleConfig {
            max_lr: 0.1,
            min_lr: 0.1,
            warmup_steps: 0,
            total_steps: 10,
            clip_norm: Some(1.0),
        };
        let (varmap_a, loss_a) = two_var_problem()?;
        let mut trainer = Trainer::new(&varmap_a, AdamWConfig::default(), schedule)?;
        let stats = trainer.step(&loss_a)?;
        assert!(stats.grad_norm > 1.0, "the test needs clipping to engage");
        let (varmap_b, loss_b) = two_var_problem()?;
        let vars = named_vars(&varmap_b);
        let mut opt = AdamW::new(&varmap_b, AdamWConfig::default())?;
        let mut grads = loss_b.backward()?;
        clip_grad_norm(&mut grads, &vars, 1.0)?;
        opt.step(&grads, 0.1)?;
        for ((name, a), (_, b)) in named_vars(&varmap_a).iter().zip(&vars) {
            let diff = (a.as_tensor() - b.as_tensor())?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            assert!(diff < 1e-12, "{name}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn adamw_first_step_is_sign_of_gradient_times_lr() -> Result<()> {
        let (varmap, loss) = two_var_problem()?;
        let mut opt = AdamW::new(
            &varmap,
            AdamWConfig {
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        let before = named_vars(&varmap)[1].1.as_tensor().to_vec1::<f64>()?;
        opt.step(&loss.backward()?, 0.1)?;
        let after = named_vars(&varmap)[1].1.as_tensor().to_vec1::<f64>()?;
        // With bias correction, the first Adam step is lr · g/|g| (ε aside); zero gradient → no move.
        let want = [before[0] - 0.1, before[1] + 0.1, before[2], before[3] - 0.1];
        for (a, w) in after.iter().zip(want) {
            assert!((a - w).abs() < 1e-6, "{after:?} vs {want:?}");
        }
        Ok(())
    }

    #[test]
    fn nan_loss_is_reported_and_parameters_kept() -> Result<()> {
        let (varmap, _) = two_var_problem()?;
        let schedule = ScheduleConfig {
            max_lr: 0.1,
            min_lr: 0.0,
            warmup_steps: 0,
            total_steps: 10,
            clip_norm: Some(1.0),
        };
        let mut trainer = Trainer::new(&varmap, AdamWConfig::default(), schedule)?;
        let a = named_vars(&varmap)[0].1.as_tensor().clone();
        let before = a.to_vec2::<f64>()?;
        let nan_loss = (a.sum_all()? * f64::NAN)?;
        let err = trainer.step(&nan_loss).unwrap_err();
        assert!(err.downcast_ref::<Diverged>().is_some(), "{err}");
        assert!(err.to_string().contains("diverged at step 0"));
        assert_eq!(
            named_vars(&varmap)[0].1.as_tensor().to_vec2::<f64>()?,
            before
        );
        assert_eq!(trainer.step, 0);
        Ok(())
    }

    #[test]
    fn checkpoint_round_trip_restores_parameters_moments_and_step() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("ckpt-test-{}", std::process::id()));
        let (varmap, loss) = two_var_problem()?;
        let schedule = ScheduleConfig {
            max_lr: 0.1,
            min_lr: 0.0,
            warmup_steps: 1,
            total_steps: 10,
            clip_norm: None,
        };
        let mut trainer = Trainer::new(&varmap, AdamWConfig::default(), schedule.clone())?;
        trainer.step(&loss)?;
        trainer.step(&loss)?;
        trainer.save_checkpoint(&varmap, &dir, &serde_json::json!({"d": 1}))?;
        let (mut fresh, _) = two_var_problem()?;
        let mut resumed = Trainer::new(&fresh, AdamWConfig::default(), schedule)?;
        let cfg = resumed.load_checkpoint(&mut fresh, &dir)?;
        assert_eq!(cfg["d"], 1);
        assert_eq!(resumed.step, 2);
        assert_eq!(resumed.opt.t, 2);
        for ((_, a), (_, b)) in named_vars(&varmap).iter().zip(named_vars(&fresh).iter()) {
            assert_eq!(
                a.as_tensor().flatten_all()?.to_vec1::<f64>()?,
                b.as_tensor().flatten_all()?.to_vec1::<f64>()?
            );
        }
        let sa = trainer.opt.state_tensors();
        let sb = resumed.opt.state_tensors();
        for (k, v) in sa {
            assert_eq!(
                v.flatten_all()?.to_vec1::<f64>()?,
                sb[&k].flatten_all()?.to_vec1::<f64>()?,
                "{k}"
            );
        }
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}

/// Mean cross-entropy of `logits (…, vocab)` against `targets (…)` (`u32`):
/// `ℓ = logsumexp(z) − z_target`, with `logsumexp(z) = max z + log Σ exp(z − max z)`, computed in
/// f32 whatever the logits' dtype (f64 stays f64) by the fused op
/// [`crate::cross_entropy::cross_entropy_rows`] (one pass forward, one backward).
/// `mask (…)` (`u8`, 1 = counts) averages over real tokens only (padding gets no loss).
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let vocab = logits.dim(candle_core::D::Minus1)?;
    let logits = logits.reshape(((), vocab))?; // (n, vocab)
    let nll = crate::cross_entropy::cross_entropy_rows(&logits, &targets.flatten_all()?)?; // (n,)
    mean_over_mask(&nll, mask)
}

/// The same loss composed from differentiable tensor ops (a cast, max, subtract, exp, sum, log
/// and gather, each a pass over `n × vocab` values), in f32 (f64 stays f64): the reference
/// [`cross_entropy`] is tested against, and what it replaced.
pub fn cross_entropy_composed(
    logits: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let vocab = logits.dim(candle_core::D::Minus1)?;
    let acc = if logits.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let logits = logits.to_dtype(acc)?.reshape(((), vocab))?; // (n, vocab)
    let targets = targets.flatten_all()?.to_dtype(DType::U32)?; // (n,)
    let max = logits.max_keepdim(1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + max)?; // (n, 1)
    let picked = logits.gather(&targets.unsqueeze(1)?, 1)?; // (n, 1)
    let nll = (lse - picked)?.squeeze(1)?; // (n,)
    mean_over_mask(&nll, mask)
}

/// `mean(nll)`, or `Σ nll·m / Σ m` with a mask.
fn mean_over_mask(nll: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match mask {
        None => nll.mean_all(),
        Some(m) => {
            let m = m.flatten_all()?.to_dtype(nll.dtype())?;
            (nll * &m)?.sum_all()?.broadcast_div(&m.sum_all()?)
        }
    }
}

#[cfg(test)]
mod cross_entropy_tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cross_entropy_matches_candle_nn_and_respects_mask() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::randn(0f32, 3.0, (2, 5, 11), &dev)?;
        let targets = Tensor::new(&[[1u32, 2, 3, 4, 10], [0, 0, 5, 6, 7]], &dev)?;
        let ours = cross_entropy(&logits, &targets, None)?.to_scalar::<f32>()?;
        let reference =
            candle_nn::loss::cross_entropy(&logits.reshape((10, 11))?, &targets.flatten_all()?)?
                .to_scalar::<f32>()?;
        assert!(
            (ours - reference).abs() < 1e-5 * reference.abs().max(1.0),
            "{ours} vs {reference}"
        );
        // Masking out the second row equals the loss over the first row alone.
        let mask = Tensor::new(&[[1u8, 1, 1, 1, 1], [0, 0, 0, 0, 0]], &dev)?;
        let masked = cross_entropy(&logits, &targets, Some(&mask))?.to_scalar::<f32>()?;
        let first = cross_entropy(&logits.narrow(0, 0, 1)?, &targets.narrow(0, 0, 1)?, None)?
            .to_scalar::<f32>()?;
        assert!((masked - first).abs() < 1e-5, "{masked} vs {first}");
        Ok(())
    }

    /// The fused op against the composed ops, values and gradients, in f64 (exact to rounding)
    /// and f32, with and without a mask; and a bad target is an error.
    #[test]
    fn fused_cross_entropy_equals_the_composed_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let targets = Tensor::new(&[[1u32, 2, 3, 4, 10, 10], [0, 0, 5, 6, 7, 9]], &dev)?;
        let mask = Tensor::new(&[[1u8, 1, 0, 1, 1, 0], [1, 0, 1, 1, 1, 1]], &dev)?;
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let z = candle_core::Var::from_tensor(
                &(Tensor::randn(0f32, 3.0, (2, 6, 11), &dev)?.to_dtype(dtype)?),
            )?;
            for m in [None, Some(&mask)] {
                let fused = cross_entropy(z.as_tensor(), &targets, m)?;
                let composed =
                    cross_entropy_composed(&z.as_tensor().to_dtype(DType::F64)?, &targets, m)?;
                let (a, b) = (
                    fused.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                    composed.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                );
                assert!(
                    (a - b).abs() < tol * b.abs().max(1.0),
                    "{dtype:?}: {a} vs {b}"
                );
                let ga = fused
                    .backward()?
                    .get(z.as_tensor())
                    .unwrap()
                    .to_dtype(DType::F64)?;
                let gb = composed
                    .backward()?
                    .get(z.as_tensor())
                    .unwrap()
                    .to_dtype(DType::F64)?;
                let diff = (ga - gb)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(diff < tol, "{dtype:?}: gradients differ by {diff}");
            }
        }
        let err = cross_entropy(
            &Tensor::zeros((2, 11), DType::F32, &dev)?,
            &Tensor::new(&[1u32, 11], &dev)?,
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("outside the vocabulary of 11"),
            "{err}"
        );
        Ok(())
    }
}

/// What [`train_lm`] runs: steps, batch shape, evaluation cadence.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LmTrainSpec {
    pub label: String,
    pub steps: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub eval_every: usize,
    pub eval_batches: usize,
    pub seed: u64,
    /// Early stopping ([`crate::fit::FitSpec::patience`]), in evaluations.
    pub patience: Option<usize>,
}

/// The record of one language-model training run ([`crate::fit::Curve`]).
pub type LmCurve = crate::fit::Curve;

/// Mean loss of `loss_fn` over evaluation windows of `tokens` (no gradient is kept).
pub fn evaluate_lm(
    tokens: &[u32],
    batch_size: usize,
    seq_len: usize,
    max_batches: usize,
    device: &candle_core::Device,
    loss_fn: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<f64> {
    let batches = crate::batching::eval_batches(tokens, batch_size, seq_len, max_batches, device)?;
    let mut parts = Vec::new();
    for b in &batches {
        let loss = loss_fn(&b.x, &b.y)?
            .detach()
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()? as f64;
        parts.push((loss, b.x.elem_count()));
    }
    Ok(mean_loss_and_ppl(&parts).0)
}

/// The total negative log-likelihood (nats) of every token of `tokens` but the first, under a
/// model evaluated on consecutive non-overlapping windows of `ctx` predictions (each window sees
/// only its own `ctx` previous tokens), and the number of tokens predicted. `loss_fn(x, y)` is the
/// mean next-token cross-entropy of a batch `(batch, len)`.
pub fn corpus_nll(
    tokens: &[u32],
    ctx: usize,
    batch: usize,
    device: &candle_core::Device,
    loss_fn: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<(f64, usize)> {
    if ctx == 0 || batch == 0 || tokens.len() < 2 {
        bail!("corpus_nll: need ctx > 0, batch > 0 and at least two tokens (got ctx {ctx}, batch {batch}, {} tokens)", tokens.len());
    }
    let starts: Vec<usize> = (0..tokens.len() - 1).step_by(ctx).collect();
    let (mut total, mut count) = (0f64, 0usize);
    let full: Vec<usize> = starts
        .iter()
        .copied()
        .filter(|&s| s + ctx < tokens.len())
        .collect();
    for group in full.chunks(batch) {
        let (x, y) = window_batch(tokens, group, ctx, device)?;
        let mean = loss_fn(&x, &y)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        total += mean * (group.len() * ctx) as f64;
        count += group.len() * ctx;
    }
    if let Some(&last) = starts.iter().find(|&&s| s + ctx >= tokens.len()) {
        let len = tokens.len() - 1 - last; // the shorter last window
        let (x, y) = window_batch(tokens, &[last], len, device)?;
        let mean = loss_fn(&x, &y)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        total += mean * len as f64;
        count += len;
    }
    Ok((total, count))
}

/// Inputs and targets `(starts.len(), len)` of the windows `tokens[s .. s + len + 1]`.
fn window_batch(
    tokens: &[u32],
    starts: &[usize],
    len: usize,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let x: Vec<u32> = starts
        .iter()
        .flat_map(|&s| tokens[s..s + len].to_vec())
        .collect();
    let y: Vec<u32> = starts
        .iter()
        .flat_map(|&s| tokens[s + 1..s + len + 1].to_vec())
        .collect();
    let shape = (starts.len(), len);
    Ok((
        Tensor::from_vec(x, shape, device)?,
        Tensor::from_vec(y, shape, device)?,
    ))
}

/// Word-level perplexity: `exp(total NLL of the split / its word count)` (the normalisation that
/// makes sub-word models comparable with published word-level results). The word count of a
/// WikiText split is [`crate::wikitext::stats`]`(text).words_plus_eos` (245,569 for test).
pub fn word_level_perplexity(total_nll: f64, n_words: usize) -> f64 {
    (total_nll / n_words.max(1) as f64).exp()
}

/// Trains a language model for `spec.steps` steps on random windows of `train_tokens`, evaluating
/// on `valid_tokens` every `eval_every` steps, through the one loop ([`crate::fit::fit`]). A
/// divergence (NaN/Inf) ends the run early and is recorded in the curve rather than raised:
/// experiments compare it.
pub fn train_lm(
    trainer: &mut Trainer,
    train_tokens: &[u32],
    valid_tokens: &[u32],
    spec: &LmTrainSpec,
    device: &candle_core::Device,
    loss_fn: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<LmCurve> {
    let data = LmData {
        train_tokens,
        valid_tokens,
        device,
        loss_fn,
    };
    train_lm_with(trainer, &data, spec, None)
}

/// [`train_lm`] for one rank of a data-parallel group ([`crate::data_parallel`]): every rank
/// draws the same global batch of `spec.batch_size` windows (a function of the step and the
/// seed) and builds only its rows ([`crate::data_parallel::shard_rows`]); the gradients and the
/// loss are averaged over the ranks, so a world of `N` trains as one worker on the whole batch.
/// Start the ranks equal first ([`Trainer::broadcast_parameters`]).
pub fn train_lm_in_group(
    trainer: &mut Trainer,
    data: &LmData,
    spec: &LmTrainSpec,
    group: &dyn crate::data_parallel::Collective,
) -> Result<LmCurve> {
    train_lm_with(trainer, data, spec, Some(group))
}

/// What a language model trains and evaluates on, and how its loss is computed.
pub struct LmData<'a> {
    pub train_tokens: &'a [u32],
    pub valid_tokens: &'a [u32],
    pub device: &'a candle_core::Device,
    pub loss_fn: &'a dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
}

fn train_lm_with(
    trainer: &mut Trainer,
    data: &LmData,
    spec: &LmTrainSpec,
    group: Option<&dyn crate::data_parallel::Collective>,
) -> Result<LmCurve> {
    let rows = match group {
        Some(g) => crate::data_parallel::shard_rows(spec.batch_size, g.world(), g.rank())?,
        None => 0..spec.batch_size,
    };
    if trainer.schedule.total_steps != spec.steps {
        bail!(
            "train_lm: the schedule runs {} steps, the spec {}",
            trainer.schedule.total_steps,
            spec.steps
        );
    }
    let mut task = LmTask {
        batcher: crate::batching::LmBatcher::new(spec.batch_size, spec.seq_len, spec.seed),
        rows,
        data,
        spec,
    };
    let fit_spec = crate::fit::FitSpec {
        label: spec.label.clone(),
        eval_every: spec.eval_every,
        patience: spec.patience,
    };
    crate::fit::fit_in_group(trainer, &mut task, &fit_spec, None, group)
}

/// A language model as a [`crate::fit::Task`]: `rows` of each step's random windows of the
/// training tokens (a function of the step and the seed; all of them without a group), mean loss
/// over fixed validation windows.
struct LmTask<'a> {
    batcher: crate::batching::LmBatcher,
    rows: std::ops::Range<usize>,
    data: &'a LmData<'a>,
    spec: &'a LmTrainSpec,
}

impl crate::fit::Task for LmTask<'_> {
    fn train_loss(&mut self, step: usize) -> Result<(Tensor, usize)> {
        let d = self.data;
        let offsets = self.batcher.offsets(d.train_tokens.len(), step as u64)?;
        let batch = crate::batching::windows_to_batch(
            d.train_tokens,
            &offsets[self.rows.clone()],
            self.spec.seq_len,
            d.device,
        )?;
        Ok(((d.loss_fn)(&batch.x, &batch.y)?, batch.x.elem_count()))
    }

    fn valid_loss(&mut self) -> Result<f64> {
        let (s, d) = (self.spec, self.data);
        evaluate_lm(
            d.valid_tokens,
            s.batch_size,
            s.seq_len,
            s.eval_batches,
            d.device,
            d.loss_fn,
        )
    }
}

/// The unigram entropy (nats/token) of a token stream: the loss of the best model that ignores
/// context. A language model must go well below it to have learned anything from context.
pub fn unigram_entropy(tokens: &[u32]) -> f64 {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for &t in tokens {
        *counts.entry(t).or_default() += 1;
    }
    let n = tokens.len() as f64;
    counts
        .values()
        .map(|&c| c as f64 / n)
        .map(|p| -p * p.ln())
        .sum()
}

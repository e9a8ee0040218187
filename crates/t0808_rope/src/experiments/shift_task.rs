//! Experiments 3 and 4: a task that needs relative order. Random tokens `x (batch, L)`; the
//! target at position `t` is `x[t − shift]` (positions `< shift` masked). Without positions a
//! causal decoder cannot tell which earlier token sits `shift` back; with absolute positions it
//! must learn the offset separately for every position; RoPE sees the offset directly.
//!
//! Trained at length `L`, every model is evaluated up to `4L` (extrapolation); the RoPE model
//! also with position interpolation and NTK-aware scaling plugged in at evaluation (no
//! fine-tune).

use super::{per_position, plug_rope, Models, SCHEMES};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::{rngs::StdRng, Rng, SeedableRng};
use shared::fit::{fit, FitSpec, Task};
use shared::report::{line_chart, print_table, Axes, RunReport, Series};
use shared::train::{cross_entropy, AdamWConfig, ScheduleConfig, Trainer};
use std::path::Path;
use t0804_transformer_block::{DecoderOnlyLm, PositionKind};
use t0808_rope::{RopeScaling, RopeTables};

/// The task and its training budget.
pub struct ShiftTask {
    /// Training length `L` (evaluation up to `4L`).
    pub train_len: usize,
    /// Predict the token this many positions back.
    pub shift: usize,
    pub vocab: usize,
    /// Sequences per training batch.
    pub batch: usize,
    /// Training steps per scheme.
    pub steps: usize,
}

impl ShiftTask {
    /// `(x, y, mask)`, each `(b, len)`: random tokens, the token `shift` back, 1 where defined.
    fn sample(&self, rng: &mut StdRng, b: usize, len: usize, dev: &Device) -> Result<[Tensor; 3]> {
        let xs: Vec<u32> = (0..b * len)
            .map(|_| rng.random_range(0..self.vocab as u32))
            .collect();
        let (mut ys, mut ms) = (vec![0u32; b * len], vec![0u8; b * len]);
        for r in 0..b {
            for t in self.shift..len {
                ys[r * len + t] = xs[r * len + t - self.shift];
                ms[r * len + t] = 1;
            }
        }
        Ok([
            Tensor::from_vec(xs, (b, len), dev)?,
            Tensor::from_vec(ys, (b, len), dev)?,
            Tensor::from_vec(ms, (b, len), dev)?,
        ])
    }
}

/// The task as `shared::fit` trains it: step `s` draws its batch from `(seed, s)`; the
/// validation loss is that of the first `L` positions of the evaluation batch.
struct Training<'a> {
    lm: &'a DecoderOnlyLm,
    task: &'a ShiftTask,
    seed: u64,
    valid: &'a [Tensor; 3],
}

impl Task for Training<'_> {
    fn train_loss(&mut self, step: usize) -> Result<(Tensor, usize)> {
        let mut rng = StdRng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9) ^ step as u64);
        let dev = self.lm.token_embedding.device();
        let [x, y, mask] = self
            .task
            .sample(&mut rng, self.task.batch, self.task.train_len, dev)?;
        let loss = cross_entropy(&self.lm.forward(&x, 0)?, &y, Some(&mask))?;
        Ok((loss, x.elem_count()))
    }

    fn valid_loss(&mut self) -> Result<f64> {
        let l = self.task.train_len;
        let [x, y, mask] = self.valid.clone().map(|t| t.narrow(1, 0, l));
        let logits = self.lm.forward(&x?, 0)?;
        let loss = cross_entropy(&logits, &y?, Some(&mask?))?;
        Ok(loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64)
    }
}

/// Trains every scheme, evaluates it (and RoPE's scalings) up to `4L`: the table, the metrics
/// `task.<variant>` and the figure `extrapolation.png`.
pub fn run(
    models: &Models,
    task: &ShiftTask,
    out_dir: &Path,
    report: &mut RunReport,
) -> Result<()> {
    let (l, shift) = (task.train_len, task.shift);
    let eval_len = 4 * l;
    let eval = task.sample(
        &mut StdRng::seed_from_u64(999),
        64,
        eval_len,
        &models.device,
    )?;
    let (mut rows, mut extrap) = (vec![], vec![]);
    for (scheme, kind) in SCHEMES {
        let (varmap, mut lm) = models.init(task.vocab, eval_len, kind)?;
        train(models, task, &varmap, &lm, scheme, &eval)?;
        for (name, scaling) in variants(scheme, kind) {
            if let Some(s) = scaling {
                let base = models.config(task.vocab, eval_len, kind).rope_theta;
                let d_head = models.d_model / models.n_heads;
                let tables = RopeTables::new(d_head, eval_len, base, s, &models.device)?;
                plug_rope(&mut lm, tables.with_impl(models.kernels.rope));
            }
            let [x, y, mask] = &eval;
            let (per_pos, acc_in, acc_out) = per_position(&lm, x, y, mask, l)?;
            let mean_in = per_pos[shift..l].iter().sum::<f64>() / (l - shift) as f64;
            let mean_out = per_pos[l..].iter().sum::<f64>() / (eval_len - l) as f64;
            rows.push(vec![
                name.clone(),
                format!("{mean_in:.3}"),
                format!("{:.1}%", 100.0 * acc_in),
                format!("{mean_out:.3}"),
                format!("{:.1}%", 100.0 * acc_out),
            ]);
            report.metric(
                &format!("task.{name}"),
                serde_json::json!({"loss_within_L": mean_in, "acc_within_L": acc_in,
                    "loss_beyond_L": mean_out, "acc_beyond_L": acc_out}),
            );
            let points = per_pos.iter().enumerate().skip(shift);
            extrap.push(Series::new(
                &name,
                points.map(|(i, v)| (i as f64, *v)).collect(),
            ));
        }
    }
    print_table(
        &[
            "positions",
            &format!("loss ≤ L={l}"),
            "accuracy ≤ L",
            &format!("loss L..{eval_len}"),
            "accuracy beyond L",
        ],
        &rows,
    );
    line_chart(
        &out_dir.join("extrapolation.png"),
        &format!("Loss per position, trained at L = {l}"),
        "position",
        "cross-entropy (nats)",
        &extrap,
        Axes::default(),
    )?;
    Ok(())
}

/// `task.steps` steps of AdamW (no weight decay; cosine schedule, warm-up 10 %, clip 1).
fn train(
    models: &Models,
    task: &ShiftTask,
    varmap: &VarMap,
    lm: &DecoderOnlyLm,
    label: &str,
    valid: &[Tensor; 3],
) -> Result<()> {
    let schedule = ScheduleConfig {
        max_lr: models.lr,
        min_lr: models.lr / 10.0,
        warmup_steps: task.steps / 10,
        total_steps: task.steps,
        clip_norm: Some(1.0),
    };
    let adamw = AdamWConfig {
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut trainer = Trainer::new(varmap, adamw, schedule)?;
    let mut training = Training {
        lm,
        task,
        seed: models.seed,
        valid,
    };
    let spec = FitSpec {
        label: label.to_string(),
        eval_every: task.steps,
        patience: None,
    };
    fit(&mut trainer, &mut training, &spec, None)?;
    Ok(())
}

/// What is evaluated of a trained scheme: the model as trained, and for RoPE also position
/// interpolation and NTK-aware scaling by 4 (the evaluation reaches 4L).
fn variants(scheme: &str, kind: PositionKind) -> Vec<(String, Option<RopeScaling>)> {
    if kind != PositionKind::Rope {
        return vec![(scheme.to_string(), None)];
    }
    vec![
        (scheme.to_string(), Some(RopeScaling::None)),
        (
            format!("{scheme} + PI ×4"),
            Some(RopeScaling::PositionInterpolation { factor: 4.0 }),
        ),
        (
            format!("{scheme} + NTK ×4"),
            Some(RopeScaling::NtkAware { factor: 4.0 }),
        ),
    ]
}

//! Crash-consistent checkpoints and exact resume:
//! - a run stopped and resumed from its checkpoint equals an uninterrupted run, bit for bit
//!   (parameters and every loss), through the one training loop;
//! - a save that fails at any point leaves the previous checkpoint loadable and unchanged;
//! - a truncated file, or a file from another step, is refused with a message naming it.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use shared::checkpoint::Stage;
use shared::fit::{fit, Checkpointing, Curve, FitSpec, Task};
use shared::train::{AdamWConfig, ScheduleConfig, Trainer};
use std::path::{Path, PathBuf};

/// The tests of this file initialise models from the process-wide seeded generator
/// (`shared::params::set_seed`): they take turns, so that no test draws from another's sequence.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    shared::params::init_turn()
}

fn temp_root(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("module08-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A two-layer MLP regression whose batch is a function of the step (so resume is exact).
struct Regression {
    w1: Tensor,
    w2: Tensor,
    /// Fail (like a killed process) when asked for this step's batch.
    crash_at: Option<usize>,
}

impl Regression {
    fn new(varmap: &VarMap) -> Result<Self> {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        Ok(Self {
            w1: shared::params::weight(&vb, 16, 8, "w1")?,
            w2: shared::params::weight(&vb, 1, 16, "w2")?,
            crash_at: None,
        })
    }

    /// The batch of `step`: 32 inputs from a seeded generator, targets `sin(Σx)`.
    fn batch(step: usize) -> Result<(Tensor, Tensor)> {
        let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ step as u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        };
        let x: Vec<f32> = (0..32 * 8).map(|_| next()).collect();
        let y: Vec<f32> = x.chunks(8).map(|r| r.iter().sum::<f32>().sin()).collect();
        Ok((
            Tensor::from_vec(x, (32, 8), &Device::Cpu)?,
            Tensor::from_vec(y, (32, 1), &Device::Cpu)?,
        ))
    }

    fn loss(&self, step: usize) -> Result<Tensor> {
        let (x, y) = Self::batch(step)?;
        let h = shared::linear(&x, &self.w1)?.tanh()?;
        Ok((shared::linear(&h, &self.w2)? - y)?.sqr()?.mean_all()?)
    }
}

impl Task for Regression {
    fn train_loss(&mut self, step: usize) -> Result<(Tensor, usize)> {
        if self.crash_at == Some(step) {
            anyhow::bail!("killed at step {step}");
        }
        Ok((self.loss(step)?, 32))
    }

    fn valid_loss(&mut self) -> Result<f64> {
        Ok(self.loss(1_000_000)?.to_scalar::<f32>()? as f64)
    }
}

fn schedule(total: usize) -> ScheduleConfig {
    ScheduleConfig {
        max_lr: 1e-2,
        min_lr: 1e-3,
        warmup_steps: 3,
        total_steps: total,
        clip_norm: Some(1.0),
    }
}

/// A fresh model (same seed, same initial values), its trainer and the checkpoint settings.
fn fresh(
    total: usize,
    dir: &Path,
    resume: bool,
) -> Result<(VarMap, Regression, Trainer, Checkpointing)> {
    shared::params::set_seed(5);
    let varmap = VarMap::new();
    let model = Regression::new(&varmap)?;
    let trainer = Trainer::new(&varmap, AdamWConfig::default(), schedule(total))?;
    let ck = Checkpointing {
        dir: dir.to_path_buf(),
        every: 4,
        resume,
        meta: serde_json::json!({ "model": "regression" }),
    };
    Ok((varmap, model, trainer, ck))
}

/// Every parameter by name, as plain numbers.
type Params = Vec<(String, Vec<f32>)>;

fn params(varmap: &VarMap) -> Result<Params> {
    shared::params::named_vars(varmap)
        .into_iter()
        .map(|(n, v)| Ok((n, v.as_tensor().flatten_all()?.to_vec1::<f32>()?)))
        .collect()
}

fn spec() -> FitSpec {
    FitSpec {
        label: "regression".into(),
        eval_every: 5,
        patience: None,
    }
}

#[test]
fn resume_equals_an_uninterrupted_run_bit_for_bit() -> Result<()> {
    let _turn = one_at_a_time();
    let total = 20;
    // Straight through.
    let root_a = temp_root("straight");
    let (mut varmap_a, mut model_a, mut trainer_a, ck_a) = fresh(total, &root_a, false)?;
    let straight: Curve = fit(
        &mut trainer_a,
        &mut model_a,
        &spec(),
        Some((&mut varmap_a, &ck_a)),
    )?;
    // Killed while fetching step 14's batch (the last checkpoint is step 12's), then resumed by a
    // fresh model and trainer, as a new process would.
    let root_b = temp_root("stopped");
    let (mut varmap_b, mut model_b, mut trainer_b, ck_b) = fresh(total, &root_b, false)?;
    model_b.crash_at = Some(14);
    let killed = fit(
        &mut trainer_b,
        &mut model_b,
        &spec(),
        Some((&mut varmap_b, &ck_b)),
    );
    assert!(killed
        .unwrap_err()
        .to_string()
        .contains("killed at step 14"));
    let (mut varmap_c, mut model_c, mut trainer_c, mut ck_c) = fresh(total, &root_b, true)?;
    ck_c.dir = root_b.clone();
    let resumed = fit(
        &mut trainer_c,
        &mut model_c,
        &spec(),
        Some((&mut varmap_c, &ck_c)),
    )?;
    assert_eq!(trainer_c.step, total);
    let losses = |c: &Curve| {
        c.train
            .iter()
            .map(|t| (t.0, t.1.to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        losses(&resumed),
        losses(&straight),
        "every step's loss, bit for bit"
    );
    assert_eq!(
        params(&varmap_c)?,
        params(&varmap_a)?,
        "parameters, bit for bit"
    );
    std::fs::remove_dir_all(&root_a)?;
    std::fs::remove_dir_all(&root_b)?;
    Ok(())
}

/// Saves at step 3, then tries to save at step 5 with a failure at `stage`.
fn save_then_fail(root: &Path, stage: Stage) -> Result<(VarMap, Params)> {
    let (varmap, mut model, mut trainer, _) = fresh(10, root, false)?;
    for s in 0..3 {
        trainer.step(&model.train_loss(s)?.0)?;
    }
    let config = serde_json::json!({ "model": "regression" });
    trainer.save_checkpoint(&varmap, root, &config)?;
    let saved = params(&varmap)?;
    for s in 3..5 {
        trainer.step(&model.train_loss(s)?.0)?;
    }
    let err = trainer
        .save_checkpoint_failing_at(&varmap, root, &config, Some(stage))
        .unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    Ok((varmap, saved))
}

#[test]
fn a_failure_at_any_point_of_a_save_keeps_the_previous_checkpoint() -> Result<()> {
    let _turn = one_at_a_time();
    for stage in Stage::ALL {
        let root = temp_root(&format!("fault-{stage:?}"));
        let (_, saved) = save_then_fail(&root, stage)?;
        let (mut varmap, _, mut trainer, _) = fresh(10, &root, false)?;
        trainer.load_checkpoint(&mut varmap, &root)?;
        assert_eq!(trainer.step, 3, "{stage:?}: the pointer still names step 3");
        assert_eq!(params(&varmap)?, saved, "{stage:?}: step 3's parameters");
        // The next save succeeds and cleans up what the failed one left.
        trainer.save_checkpoint(&varmap, &root, &serde_json::json!({}))?;
        let leftovers: Vec<_> = std::fs::read_dir(&root)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "{stage:?}: temporary folders left behind"
        );
        std::fs::remove_dir_all(&root)?;
    }
    Ok(())
}

#[test]
fn torn_and_mixed_checkpoints_are_refused_by_name() -> Result<()> {
    let _turn = one_at_a_time();
    let root = temp_root("torn");
    let (varmap, mut model, mut trainer, _) = fresh(10, &root, false)?;
    let config = serde_json::json!({});
    trainer.step(&model.train_loss(0)?.0)?;
    trainer.save_checkpoint(&varmap, &root, &config)?; // step 1
    trainer.step(&model.train_loss(1)?.0)?;
    trainer.save_checkpoint(&varmap, &root, &config)?; // step 2 (latest)
    let step1 = root.join(shared::checkpoint::folder_name(1));
    let step2 = root.join(shared::checkpoint::folder_name(2));
    // A file from another step: step 1's moments in step 2's folder.
    std::fs::copy(
        step1.join("optimizer.safetensors"),
        step2.join("optimizer.safetensors"),
    )?;
    let (mut varmap_b, _, mut trainer_b, _) = fresh(10, &root, false)?;
    let err = trainer_b
        .load_checkpoint(&mut varmap_b, &root)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("optimizer.safetensors is from step 1, state.json from step 2"),
        "{err}"
    );
    // A truncated file.
    let model_file = step2.join("model.safetensors");
    let bytes = std::fs::read(&model_file)?;
    std::fs::write(&model_file, &bytes[..bytes.len() / 2])?;
    let err = format!(
        "{:#}",
        trainer_b.load_checkpoint(&mut varmap_b, &root).unwrap_err()
    );
    assert!(err.contains("model.safetensors"), "{err}");
    // Only the last two checkpoints are kept.
    trainer.step(&model.train_loss(2)?.0)?;
    trainer.save_checkpoint(&varmap, &root, &config)?; // step 3
    assert!(!step1.exists() && step2.exists(), "keep the newest two");
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

#[test]
fn a_fresh_run_in_a_used_folder_keeps_its_own_checkpoint() -> Result<()> {
    let _turn = one_at_a_time();
    let root = temp_root("reused");
    let (varmap, mut model, mut trainer, _) = fresh(10, &root, false)?;
    let config = serde_json::json!({});
    // An older, longer run left steps 600 and 700 in the folder.
    trainer.step = 600;
    trainer.save_checkpoint(&varmap, &root, &config)?;
    trainer.step = 700;
    trainer.save_checkpoint(&varmap, &root, &config)?;
    // A fresh run saves step 1, then step 1 again (the loop's save and the final one).
    trainer.step = 0;
    trainer.step(&model.train_loss(0)?.0)?;
    trainer.save_checkpoint(&varmap, &root, &config)?;
    trainer.save_checkpoint(&varmap, &root, &config)?;
    let (mut varmap_b, _, mut trainer_b, _) = fresh(10, &root, false)?;
    trainer_b.load_checkpoint(&mut varmap_b, &root)?;
    assert_eq!(trainer_b.step, 1, "latest is the fresh run's step");
    assert!(!root.join(shared::checkpoint::folder_name(700)).exists());
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

#[test]
fn resume_refuses_another_schedule_before_touching_anything() -> Result<()> {
    let _turn = one_at_a_time();
    let root = temp_root("schedule");
    let (mut varmap, mut model, mut trainer, ck) = fresh(8, &root, false)?;
    fit(&mut trainer, &mut model, &spec(), Some((&mut varmap, &ck)))?;
    let (mut varmap_b, mut model_b, mut trainer_b, ck_b) = fresh(12, &root, true)?;
    let before = params(&varmap_b)?;
    let err = fit(
        &mut trainer_b,
        &mut model_b,
        &spec(),
        Some((&mut varmap_b, &ck_b)),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("schedule"), "{err}");
    assert_eq!(params(&varmap_b)?, before, "nothing was loaded");
    assert_eq!(trainer_b.step, 0);
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

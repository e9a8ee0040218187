//! Early stopping in the one training loop: the run stops after `patience` evaluations without a
//! better validation loss and ends with the parameters of its best evaluation.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use shared::fit::{fit, FitSpec, Task};
use shared::train::{AdamWConfig, ScheduleConfig, Trainer};

/// One weight pulled towards 1 by the training loss; the validation losses are scripted, and the
/// weight is recorded at every evaluation.
struct Scripted {
    w: Tensor,
    valid: Vec<f64>,
    seen: Vec<f32>,
}

impl Task for Scripted {
    fn train_loss(&mut self, _step: usize) -> Result<(Tensor, usize)> {
        Ok(((&self.w - 1.0)?.sqr()?.sum_all()?, 1))
    }

    fn valid_loss(&mut self) -> Result<f64> {
        self.seen.push(self.w.flatten_all()?.to_vec1::<f32>()?[0]);
        Ok(self.valid[self.seen.len() - 1])
    }
}

/// The weight (from −2), its scripted task, a trainer for 40 steps at a constant learning rate, and
/// the loop's spec (an evaluation every 5 steps).
fn setup(valid: Vec<f64>, patience: Option<usize>) -> Result<(VarMap, Scripted, Trainer, FitSpec)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let w = vb.get_with_hints((1, 1), "w", candle_nn::Init::Const(-2.0))?;
    let task = Scripted {
        w,
        valid,
        seen: Vec::new(),
    };
    let schedule = ScheduleConfig {
        max_lr: 0.05,
        min_lr: 0.05,
        warmup_steps: 0,
        total_steps: 40,
        clip_norm: None,
    };
    let trainer = Trainer::new(&varmap, AdamWConfig::default(), schedule)?;
    let spec = FitSpec {
        label: "scripted".into(),
        eval_every: 5,
        patience,
    };
    Ok((varmap, task, trainer, spec))
}

fn run(valid: Vec<f64>, patience: Option<usize>) -> Result<(shared::fit::Curve, Scripted, f32)> {
    let (_varmap, mut task, mut trainer, spec) = setup(valid, patience)?;
    let curve = fit(&mut trainer, &mut task, &spec, None)?;
    let end = task.w.flatten_all()?.to_vec1::<f32>()?[0];
    assert_eq!(
        trainer.step,
        curve.train.len(),
        "one step per recorded step"
    );
    Ok((curve, task, end))
}

#[test]
fn stops_after_patience_evaluations_and_keeps_the_best_parameters() -> Result<()> {
    // Evaluations at steps 0, 5, 10, 15, 20, 25: the best is step 10's, then three worse.
    let (curve, task, end) = run(vec![3.0, 2.0, 1.0, 1.5, 1.2, 1.1, 0.5, 0.4, 0.3], Some(3))?;
    assert_eq!(curve.best, Some((10, 1.0)));
    assert_eq!(curve.stopped_early_at, Some(25));
    assert_eq!(curve.train.len(), 25, "no step after the stop");
    assert_eq!(curve.final_valid_loss(), Some(1.0));
    assert_eq!(task.seen.len(), 6, "no evaluation after the stop");
    assert_ne!(
        task.seen[2], task.seen[5],
        "the weight moved after the best evaluation"
    );
    assert_eq!(
        end, task.seen[2],
        "the run ends with the best evaluation's weight"
    );
    Ok(())
}

#[test]
fn a_best_final_evaluation_keeps_the_last_parameters_and_without_patience_nothing_changes(
) -> Result<()> {
    // Nine evaluations (steps 0, 5, …, 40), improving to the end: no stop, the last is the best.
    let improving: Vec<f64> = (0..9).map(|i| 10.0 - i as f64).collect();
    let (curve, task, end) = run(improving.clone(), Some(2))?;
    assert_eq!(curve.best, Some((40, 2.0)));
    assert_eq!(curve.stopped_early_at, None);
    assert_eq!(end, task.seen[8]);
    // Without patience: every step, the last parameters, no best recorded.
    let (plain, task, end) = run(vec![3.0, 2.0, 1.0, 1.5, 1.2, 1.1, 1.3, 1.4, 1.6], None)?;
    assert_eq!((plain.best, plain.stopped_early_at), (None, None));
    assert_eq!(plain.train.len(), 40);
    assert_eq!(plain.final_valid_loss(), Some(1.6));
    assert_eq!(end, task.seen[8]);
    Ok(())
}

#[test]
fn without_a_stop_the_run_still_ends_with_its_best_evaluation() -> Result<()> {
    // Patience 10 never runs out in nine evaluations; the best is step 10's, the last is worse.
    let (curve, task, end) = run(vec![3.0, 2.0, 1.0, 1.5, 1.2, 1.3, 1.4, 1.6, 1.7], Some(10))?;
    assert_eq!(curve.stopped_early_at, None);
    assert_eq!(curve.train.len(), 40);
    assert_eq!(curve.best, Some((10, 1.0)));
    assert_eq!(curve.final_valid_loss(), Some(1.0));
    assert_eq!(
        end, task.seen[2],
        "the run ends with step 10's weight, not the last"
    );
    Ok(())
}

#[test]
fn early_stopping_with_checkpoints_is_refused_before_training() -> Result<()> {
    let (mut varmap, mut task, mut trainer, spec) = setup(vec![1.0; 9], Some(2))?;
    let ck = shared::fit::Checkpointing {
        dir: std::env::temp_dir().join(format!("module08-early-{}", std::process::id())),
        every: 5,
        resume: false,
        meta: serde_json::json!({}),
    };
    let err = fit(&mut trainer, &mut task, &spec, Some((&mut varmap, &ck)))
        .expect_err("patience with checkpoints is refused");
    assert!(err.to_string().contains("cannot be combined"), "{err}");
    assert_eq!((trainer.step, task.seen.len()), (0, 0), "nothing ran");
    Ok(())
}

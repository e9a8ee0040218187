//! Mixed precision two ways, the same training: the ladder's LLaMA rung in bf16 over f32
//! parameters, (a) casting every f32 weight where it is used (`with_compute_dtype`), and (b)
//! built on bf16 copies that AdamW refreshes from its f32 master weights
//! (`Trainer::with_master_weights`), from the same initial weights, on the same batches. The
//! masters of (b) end where the parameters of (a) end (bit for bit on the CPU, where both update
//! with the same per-tensor loops; within f32 rounding on the GPU, where (b) is one kernel), and
//! each copy is its master rounded to bf16.

use anyhow::Result;
use candle_core::{DType, Tensor};
use shared::params::named_vars;
use shared::train::{compute_copies, AdamWConfig, ScheduleConfig, Trainer};
use t0804_transformer_block::{build_lm, init_lm, LmShape};

const SHAPE: LmShape = LmShape {
    vocab_size: 61,
    max_seq_len: 16,
    d_model: 32,
    n_layers: 2,
    n_heads: 4,
};

fn schedule() -> ScheduleConfig {
    ScheduleConfig {
        max_lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 1,
        total_steps: 4,
        clip_norm: Some(0.5),
    }
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

#[test]
fn master_weights_train_as_casting_every_weight() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = shared::device::test_device();
    let cfg = t0808_rope::llama(SHAPE, 2);
    let kernels = shared::kernels::Kernels::for_device(&dev);
    let parts = t0809_flash_attention::parts(kernels);
    shared::params::set_seed(11);
    let (cast_params, lm) = init_lm(&cfg, &parts, DType::F32, &dev)?;
    let cast_lm = lm.with_compute_dtype(DType::BF16);
    // (b) starts from the same values: f32 masters copied from (a), bf16 copies of those.
    let masters = compute_copies(&cast_params, DType::F32)?;
    let copies = compute_copies(&masters, DType::BF16)?;
    let copy_lm = build_lm(
        candle_nn::VarBuilder::from_varmap(&copies, DType::BF16, &dev),
        &cfg,
        &parts,
    )?;
    let mut cast = Trainer::new(&cast_params, AdamWConfig::default(), schedule())?;
    let mut master =
        Trainer::with_master_weights(&copies, &masters, AdamWConfig::default(), schedule())?;
    for step in 0..4u32 {
        let ids: Vec<u32> = (0..4 * 9).map(|i| (i * 7 + step * 13) % 61).collect();
        let batch = Tensor::from_vec(ids, (4, 9), &dev)?;
        let (x, y) = (batch.narrow(1, 0, 8)?, batch.narrow(1, 1, 8)?);
        let a = cast.step(&cast_lm.loss(&x, &y)?)?;
        let b = master.step(&copy_lm.loss(&x, &y)?)?;
        assert!(
            (a.loss - b.loss).abs() <= 1e-6 * a.loss.abs(),
            "step {step}: loss {} with casts, {} with master weights",
            a.loss,
            b.loss
        );
    }
    let exact = dev.is_cpu();
    for ((name, a), (_, b)) in named_vars(&cast_params).iter().zip(named_vars(&masters)) {
        let (a, b) = (flat(a.as_tensor())?, flat(b.as_tensor())?);
        if exact {
            assert_eq!(
                a, b,
                "{name}: master weights differ from the cast path's parameters"
            );
        } else {
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-5 * (x.abs() + 1e-2),
                    "{name}: {x} vs {y}"
                );
            }
        }
    }
    for ((name, copy), (_, m)) in named_vars(&copies).iter().zip(named_vars(&masters)) {
        assert_eq!(copy.dtype(), DType::BF16);
        assert_eq!(
            flat(copy.as_tensor())?,
            flat(&m.as_tensor().to_dtype(DType::BF16)?)?,
            "{name}: the copy is not its master rounded to bf16"
        );
    }
    Ok(())
}

#[test]
fn master_weights_need_every_parameter_in_f32() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = candle_core::Device::Cpu;
    let cfg = t0808_rope::llama(SHAPE, 2);
    let parts = t0809_flash_attention::parts(shared::kernels::Kernels::fused());
    let (params, _) = init_lm(&cfg, &parts, DType::F32, &dev)?;
    let copies = compute_copies(&params, DType::BF16)?;
    // Masters in bf16: refused.
    let err = Trainer::with_master_weights(&copies, &copies, AdamWConfig::default(), schedule())
        .err()
        .expect("bf16 masters refused");
    assert!(err.to_string().contains("expected f32"), "{err}");
    // A missing master: refused with its name.
    let fewer = compute_copies(&params, DType::F32)?;
    let first = named_vars(&fewer)[0].0.clone();
    fewer.data().lock().unwrap().remove(&first);
    let err = Trainer::with_master_weights(&copies, &fewer, AdamWConfig::default(), schedule())
        .err()
        .expect("a missing master refused");
    assert!(err.to_string().contains(&first), "{err}");
    Ok(())
}

/// With master weights a checkpoint holds the f32 masters: a run stopped after two steps and
/// resumed into a differently initialised model takes its third step exactly as the run that
/// never stopped (masters and copies, bit for bit), and the model's copies are refused as the
/// checkpoint's parameters.
#[test]
fn master_weights_resume_from_a_checkpoint_as_if_never_stopped() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = candle_core::Device::Cpu;
    let cfg = t0808_rope::llama(SHAPE, 2);
    let parts = t0809_flash_attention::parts(shared::kernels::Kernels::for_device(&dev));
    let build = |seed: u64| -> Result<(candle_nn::VarMap, candle_nn::VarMap, _)> {
        shared::params::set_seed(seed);
        let (masters, _) = init_lm(&cfg, &parts, DType::F32, &dev)?;
        let copies = compute_copies(&masters, DType::BF16)?;
        let vb = candle_nn::VarBuilder::from_varmap(&copies, DType::BF16, &dev);
        let lm = build_lm(vb, &cfg, &parts)?;
        Ok((masters, copies, lm))
    };
    let batch = |step: u32| -> Result<(Tensor, Tensor)> {
        let ids: Vec<u32> = (0..4 * 9).map(|i| (i * 5 + step * 11) % 61).collect();
        let b = Tensor::from_vec(ids, (4, 9), &dev)?;
        Ok((b.narrow(1, 0, 8)?, b.narrow(1, 1, 8)?))
    };
    let dir = std::env::temp_dir().join(format!("module08-master-resume-{}", std::process::id()));
    let config = serde_json::json!({"test": "master weights"});
    let (masters, copies, lm) = build(11)?;
    let mut a =
        Trainer::with_master_weights(&copies, &masters, AdamWConfig::default(), schedule())?;
    for step in 0..2 {
        let (x, y) = batch(step)?;
        a.step(&lm.loss(&x, &y)?)?;
    }
    let err = a
        .save_checkpoint(&copies, &dir, &config)
        .expect_err("the copies are not the trainer's parameters");
    assert!(err.to_string().contains("masters"), "{err}");
    a.save_checkpoint(&masters, &dir, &config)?;
    let (x, y) = batch(2)?;
    a.step(&lm.loss(&x, &y)?)?;

    let (mut masters_b, copies_b, lm_b) = build(99)?;
    let mut b =
        Trainer::with_master_weights(&copies_b, &masters_b, AdamWConfig::default(), schedule())?;
    b.load_checkpoint(&mut masters_b, &dir)?;
    std::fs::remove_dir_all(&dir)?;
    assert_eq!(b.step, 2);
    b.step(&lm_b.loss(&x, &y)?)?;
    for (theirs, ours) in [(&masters, &masters_b), (&copies, &copies_b)] {
        for ((name, v), (_, w)) in named_vars(theirs).iter().zip(named_vars(ours)) {
            assert_eq!(
                flat(v.as_tensor())?,
                flat(w.as_tensor())?,
                "{name} after the resumed step"
            );
        }
    }
    Ok(())
}

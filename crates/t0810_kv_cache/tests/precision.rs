//! Mixed precision: f32 master weights and AdamW moments, bf16 matmuls and activations
//! (`DecoderOnlyLm::with_compute_dtype(BF16)` over an f32 `VarMap`), against f32 and pure bf16.
//!
//! - The mixed-precision loss curve of the LLaMA rung tracks the f32 one: every step's loss
//!   within 3 % (bf16 keeps 8 bits of mantissa: 0.4 % per rounding), over 120 steps.
//! - The parameters, gradients and moments stay f32: a tiny update that pure bf16 rounds away
//!   (an AdamW step of 1e-5 on weights of size ~0.1, below bf16's spacing) is kept.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use shared::kernels::Kernels;
use shared::train::{AdamWConfig, ScheduleConfig, Trainer};
use t0804_transformer_block::{init_lm, DecoderOnlyLm, LmConfig, LmShape};

/// Both tests initialise models from the process-wide seeded generator: they take turns, so that
/// two models built with one seed get the same values.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    shared::params::init_turn()
}

fn llama() -> LmConfig {
    let shape = LmShape {
        vocab_size: 64,
        max_seq_len: 16,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
    };
    t0808_rope::llama(shape, 2)
}

/// A fresh LLaMA-rung model with f32 parameters (seed 7) computing in `compute`.
fn model(params: DType, compute: DType) -> Result<(VarMap, DecoderOnlyLm)> {
    shared::params::set_seed(7);
    let parts = t0809_flash_attention::parts(Kernels::composed());
    let (varmap, lm) = init_lm(&llama(), &parts, params, &Device::Cpu)?;
    Ok((varmap, lm.with_compute_dtype(compute)))
}

/// Step `s`'s batch: 4 sequences of 16 tokens following a noisy modular pattern (learnable).
fn batch(s: usize) -> Result<(Tensor, Tensor)> {
    let seq: Vec<u32> = (0..4 * 17)
        .map(|i| {
            let (row, t) = (i / 17, i % 17);
            ((3 * t + 5 * row + s + (i * 7919 % 5 == 0) as usize) % 64) as u32
        })
        .collect();
    let all = Tensor::from_vec(seq, (4, 17), &Device::Cpu)?;
    Ok((all.narrow(1, 0, 16)?, all.narrow(1, 1, 16)?))
}

fn trainer(varmap: &VarMap, lr: f64, weight_decay: f64) -> Result<Trainer> {
    let adamw = AdamWConfig {
        weight_decay,
        ..Default::default()
    };
    let schedule = ScheduleConfig {
        max_lr: lr,
        min_lr: lr,
        warmup_steps: 0,
        total_steps: 1_000,
        clip_norm: Some(1.0),
    };
    Trainer::new(varmap, adamw, schedule)
}

#[test]
fn mixed_precision_tracks_f32_over_120_steps() -> Result<()> {
    let _turn = one_at_a_time();
    let (vm_f32, lm_f32) = model(DType::F32, DType::F32)?;
    let (vm_mix, lm_mix) = model(DType::F32, DType::BF16)?;
    let (mut t_f32, mut t_mix) = (trainer(&vm_f32, 3e-3, 0.1)?, trainer(&vm_mix, 3e-3, 0.1)?);
    let mut worst = 0f64;
    let (mut first, mut last) = (0.0, (0.0, 0.0));
    for s in 0..120 {
        let (x, y) = batch(s)?;
        let a = t_f32.step(&lm_f32.loss(&x, &y)?)?.loss;
        let b = t_mix.step(&lm_mix.loss(&x, &y)?)?.loss;
        worst = worst.max((a - b).abs() / a);
        if s == 0 {
            first = a;
        }
        last = (a, b);
    }
    // The parameters really are f32 and the activations bf16.
    let (_, w) = &shared::params::named_vars(&vm_mix)[0];
    assert_eq!(w.dtype(), DType::F32);
    assert_eq!(lm_mix.hidden(&batch(0)?.0, 0)?.dtype(), DType::BF16);
    assert!(
        last.0 < 0.8 * first,
        "f32 did not learn: {first} → {}",
        last.0
    );
    assert!(
        worst < 0.03,
        "a mixed-precision loss strayed {:.2}% from f32",
        100.0 * worst
    );
    assert!(
        (last.0 - last.1).abs() / last.0 < 0.02,
        "final losses f32 {} vs mixed {}",
        last.0,
        last.1
    );
    Ok(())
}

/// Fraction of parameter entries that one AdamW step of learning rate `lr` changed.
fn changed_fraction(params: DType, compute: DType, lr: f64) -> Result<f64> {
    let (varmap, lm) = model(params, compute)?;
    let before: Vec<Vec<f32>> = shared::params::named_vars(&varmap)
        .iter()
        .map(|(_, v)| {
            Ok(v.as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?)
        })
        .collect::<Result<_>>()?;
    let mut t = trainer(&varmap, lr, 0.0)?;
    let (x, y) = batch(0)?;
    t.step(&lm.loss(&x, &y)?)?;
    let (mut changed, mut total) = (0usize, 0usize);
    for ((_, v), old) in shared::params::named_vars(&varmap).iter().zip(&before) {
        let new: Vec<f32> = v
            .as_tensor()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        changed += new.iter().zip(old).filter(|(a, b)| a != b).count();
        total += new.len();
    }
    Ok(changed as f64 / total as f64)
}

#[test]
fn a_tiny_update_that_pure_bf16_drops_is_kept() -> Result<()> {
    let _turn = one_at_a_time();
    let lr = 1e-5; // AdamW's first step moves every entry by ≈ lr
    let pure = changed_fraction(DType::BF16, DType::BF16, lr)?;
    let mixed = changed_fraction(DType::F32, DType::BF16, lr)?;
    assert!(
        pure < 0.1,
        "pure bf16 kept {:.1}% of a 1e-5 update",
        100.0 * pure
    );
    assert!(
        mixed > 0.9,
        "mixed precision kept only {:.1}%",
        100.0 * mixed
    );
    Ok(())
}

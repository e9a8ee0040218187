//! RMSNorm and SwiGLU against float64 references and candle-nn; RMSNorm gradients against finite
//! differences; rungs 0 and 1 train; checkpoints round-trip, and a checkpoint whose config.json
//! is the recipe-style one (with `fused_*` keys) still loads.

use candle_core::{DType, Result, Tensor, Var, D};
use shared::device::test_device;
use shared::kernels::Kernels;
use t0804_transformer_block::{init_lm, load_lm, save_lm, FfnKind, Layer, LmConfig, LmShape};
use t0806_modern_blocks::*;

fn shape(
    vocab_size: usize,
    max_seq_len: usize,
    d_model: usize,
    n_layers: usize,
    n_heads: usize,
) -> LmShape {
    LmShape {
        vocab_size,
        max_seq_len,
        d_model,
        n_layers,
        n_heads,
    }
}

fn rows64(t: &Tensor) -> Vec<Vec<f64>> {
    let d = t.dim(D::Minus1).unwrap();
    t.to_dtype(DType::F64)
        .unwrap()
        .reshape(((), d))
        .unwrap()
        .to_vec2::<f64>()
        .unwrap()
}

#[test]
fn rms_norm_matches_f64_reference_and_candle_nn() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = test_device();
    let (d, eps) = (48, 1e-5);
    let x = (Tensor::randn(0f32, 2.0, (3, 5, d), &dev)? + 0.7)?;
    let g = Tensor::randn(1f32, 0.3, d, &dev)?;
    let norm = RmsNorm::from_weights(g.clone(), eps)?;
    let got = norm.forward(&x)?;
    let g64 = g.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    for (row, want) in rows64(&x).iter().zip(rows64(&got)) {
        let r = reference_rms_norm(row, &g64, eps);
        for (a, b) in r.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
        }
    }
    let candle = candle_nn::ops::rms_norm(&x, &g, eps as f32)?;
    let diff = (candle - &got)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-5, "vs candle-nn: {diff}");
    Ok(())
}

#[test]
fn rms_norm_gradients_match_finite_differences() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = test_device();
    let d = 6;
    let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, d), &dev)?)?;
    let g = Var::from_tensor(&Tensor::randn(1f64, 0.5, d, &dev)?)?;
    let c = Tensor::randn(0f64, 1.0, (2, d), &dev)?; // loss = Σ c ⊙ RMSNorm(x)
    let loss_of = |x: &Tensor, g: &Tensor| -> Result<f64> {
        (RmsNorm::from_weights(g.clone(), 1e-5)?.forward(x)? * &c)?
            .sum_all()?
            .to_scalar::<f64>()
    };
    let loss = (RmsNorm::from_weights(g.as_tensor().clone(), 1e-5)?.forward(x.as_tensor())? * &c)?
        .sum_all()?;
    let grads = loss.backward()?;
    let h = 1e-6;
    for (var, name) in [(&x, "x"), (&g, "g")] {
        let analytic = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f64>()?;
        let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        for i in 0..base.len() {
            let bump = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[i] += delta;
                let t = Tensor::from_vec(v, var.as_tensor().shape(), &dev)?;
                if name == "x" {
                    loss_of(&t, g.as_tensor())
                } else {
                    loss_of(x.as_tensor(), &t)
                }
            };
            let numeric = (bump(h)? - bump(-h)?) / (2.0 * h);
            assert!(
                (numeric - analytic[i]).abs() <= 1e-6 * numeric.abs().max(1.0),
                "d/d{name}[{i}]: {numeric} vs {}",
                analytic[i]
            );
        }
    }
    Ok(())
}

#[test]
fn swiglu_matches_f64_reference() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = test_device();
    let (d, ff) = (16, 40);
    let w1 = Tensor::randn(0f32, 0.3, (ff, d), &dev)?;
    let w2 = Tensor::randn(0f32, 0.3, (d, ff), &dev)?;
    let w3 = Tensor::randn(0f32, 0.3, (ff, d), &dev)?;
    let x = Tensor::randn(0f32, 1.0, (2, 3, d), &dev)?;
    let got = rows64(&SwiGlu::from_weights(w1.clone(), w2.clone(), w3.clone())?.forward(&x)?);
    let (w1, w2, w3) = (rows64(&w1), rows64(&w2), rows64(&w3));
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for (row, out) in rows64(&x).iter().zip(&got) {
        let h: Vec<f64> = (0..ff)
            .map(|j| {
                let a = dot(&w1[j], row);
                a / (1.0 + (-a).exp()) * dot(&w3[j], row)
            })
            .collect();
        for (i, o) in out.iter().enumerate() {
            let want = dot(&w2[i], &h);
            assert!(
                (want - o).abs() <= 1e-5 * want.abs().max(1.0),
                "{want} vs {o}"
            );
        }
    }
    // and SiLU agrees with candle-nn's
    let z = Tensor::randn(0f32, 4.0, 100, &dev)?;
    let diff = (silu(&z)? - candle_nn::ops::silu(&z)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(diff < 1e-5);
    Ok(())
}

fn byte_tokens() -> Vec<u32> {
    shared::corpus::tiny_split(shared::wikitext::Split::Train, 20)
        .bytes()
        .map(u32::from)
        .collect()
}

#[test]
fn rung1_and_rung0_train_on_tiny_corpus() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    let dev = test_device();
    let tokens = byte_tokens();
    for cfg in [
        modern(LmConfig::gpt2(shape(256, 32, 64, 2, 4))),
        LmConfig::gpt2(shape(256, 32, 64, 2, 4)),
    ] {
        shared::params::set_seed(1);
        let (varmap, lm) = init_lm(&cfg, &parts(Kernels::composed()), DType::F32, &dev)?;
        let sched = shared::train::ScheduleConfig {
            max_lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 5,
            total_steps: 60,
            clip_norm: Some(1.0),
        };
        let mut trainer = shared::train::Trainer::new(&varmap, Default::default(), sched)?;
        let batcher = shared::batching::LmBatcher::new(8, 32, 0);
        let mut losses = vec![];
        for step in 0..60 {
            let b = batcher.batch(&tokens, step, &dev)?;
            losses.push(trainer.step(&lm.loss(&b.x, &b.y)?)?.loss);
        }
        let first = losses[..5].iter().sum::<f64>() / 5.0;
        let last = losses[55..].iter().sum::<f64>() / 5.0;
        assert!(
            last < first - 1.5,
            "{:?}: loss {first:.3} → {last:.3}",
            cfg.ffn
        );
        assert!(last < 3.2, "{:?}: final loss {last:.3}", cfg.ffn);
    }
    Ok(())
}

#[test]
fn checkpoint_round_trip_gives_identical_logits() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    let dev = test_device();
    let dir = std::env::temp_dir().join(format!("t0806_ckpt_{}", std::process::id()));
    let parts = parts(Kernels::composed());
    for cfg in [
        modern(LmConfig::gpt2(shape(50, 16, 32, 2, 4))),
        LmConfig::gpt2(shape(50, 16, 32, 1, 2)),
    ] {
        let (varmap, lm) = init_lm(&cfg, &parts, DType::F32, &dev)?;
        save_lm(&dir, &cfg, &varmap)?;
        let (cfg2, lm2) = load_lm(&dir, &parts, DType::F32, &dev)?;
        assert_eq!(cfg, cfg2);
        let tokens = Tensor::new(&[[1u32, 5, 7, 9, 2], [3, 3, 3, 4, 49]], &dev)?;
        let a = lm.forward(&tokens, 0)?.flatten_all()?.to_vec1::<f32>()?;
        let b = lm2.forward(&tokens, 0)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(a, b);
        let names: Vec<String> = shared::params::named_vars(&varmap)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        match cfg.ffn {
            FfnKind::SwiGlu => assert!(
                names.contains(&"blocks.1.ffn.w3".to_string())
                    && names.contains(&"blocks.0.attn.k_proj".to_string())
                    && !names.contains(&"blocks.0.attn.k_proj_bias".to_string())
            ),
            _ => assert!(
                names.contains(&"positions.position_embeddings".to_string())
                    && names.contains(&"blocks.0.ffn.b1".to_string())
            ),
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn recipe_style_gpt2_checkpoint_loads_with_the_same_logits() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    // A checkpoint whose config.json has `recipe` and `fused_*` keys: the GPT-2 recipe is rung 0,
    // and the fused flags are execution choices that the config no longer holds.
    let dev = test_device();
    let dir = std::env::temp_dir().join(format!("t0806_legacy_{}", std::process::id()));
    let cfg = LmConfig::gpt2(shape(50, 16, 32, 2, 4));
    let parts = parts(Kernels::composed());
    let (varmap, lm) = init_lm(&cfg, &parts, DType::F32, &dev)?;
    save_lm(&dir, &cfg, &varmap)?;
    let legacy = r#"{"vocab_size":50,"max_seq_len":16,"d_model":32,"n_layers":2,"n_heads":4,
        "n_kv_heads":4,"d_ff":128,"rope_theta":10000.0,"norm_eps":1e-5,"recipe":"Gpt2",
        "rope_scaling":"None","fused_norm":true,"fused_rope":false,"fused_swiglu":true,"fused_softmax":true}"#;
    std::fs::write(dir.join("config.json"), legacy)?;
    let (cfg2, lm2) = load_lm(&dir, &parts, DType::F32, &dev)?;
    assert_eq!(cfg2, cfg);
    let tokens = Tensor::new(&[[1u32, 5, 7, 9, 2], [3, 3, 3, 4, 49]], &dev)?;
    let a = lm.forward(&tokens, 0)?.flatten_all()?.to_vec1::<f32>()?;
    let b = lm2.forward(&tokens, 0)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a, b);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

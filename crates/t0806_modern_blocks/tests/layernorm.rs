//! The fused LayerNorm against 8-04's composed LayerNorm (autograd through its tensor ops):
//! values and the gradients of `x`, the gain and the bias, f64 to 1e-12 (a float64 reference),
//! f32 to 1e-5, bf16 and f16 within one rounding; a GPT-2-style rung built with 8-06's parts and
//! `norm: fused` computes the same logits and gradients as the composed one; bad inputs give
//! clear errors. Runs on the GPU with `MODULE08_TEST_DEVICE=cuda` (the CUDA kernels).

use candle_core::{DType, Device, Result, Tensor, Var};
use shared::kernels::{Kernels, OpImpl};
use t0804_transformer_block::{build_lm, init_lm, Layer, LayerNorm, LmConfig, LmShape};
use t0806_modern_blocks::*;

fn vec64(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// `[y, dx, dg, db]` of `loss = Σ c ⊙ LayerNorm(x)·g + b`, fused or composed.
fn run(x: &Tensor, g: &Tensor, b: &Tensor, c: &Tensor, fused: bool) -> Result<[Tensor; 4]> {
    let (vx, vg, vb) = (
        Var::from_tensor(x)?,
        Var::from_tensor(g)?,
        Var::from_tensor(b)?,
    );
    let norm = LayerNorm::from_weights(vg.as_tensor().clone(), vb.as_tensor().clone(), 1e-5)?;
    let y = if fused {
        FusedLayerNormLayer { norm }.forward(vx.as_tensor())?
    } else {
        norm.forward(vx.as_tensor())?
    };
    let grads = (y.to_dtype(DType::F64)? * c.to_dtype(DType::F64)?)?
        .sum_all()?
        .backward()?;
    let grad = |v: &Var| grads.get(v.as_tensor()).expect("gradient").clone();
    Ok([y.clone(), grad(&vx), grad(&vg), grad(&vb)])
}

/// `(rows, d)` shapes: vectorisable widths, an odd width, a single column, many rows.
const SHAPES: [(usize, usize); 5] = [(21, 64), (10, 37), (4, 1), (3, 768), (700, 32)];

#[test]
fn fused_layer_norm_equals_composed_in_f64_and_f32() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = shared::device::test_device();
    for (rows, d) in SHAPES {
        // an offset (mean ≠ 0) and a spread (variance ≠ 1): centring and scaling both matter
        let x64 = (Tensor::randn(0f64, 2.0, (rows, d), &dev)? + 3.0)?;
        let g64 = Tensor::randn(1f64, 0.5, d, &dev)?;
        let b64 = Tensor::randn(0f64, 0.5, d, &dev)?;
        let c = Tensor::randn(0f64, 1.0, (rows, d), &dev)?;
        for dt in [DType::F64, DType::F32] {
            if dt == DType::F64 && dev.is_cuda() {
                continue; // the CUDA kernels compute f32, bf16 and f16
            }
            if dt == DType::F32 && d == 1 {
                // One column: x − μ is 0 and r = 1/√ε ≈ 316, so dx is f32 rounding noise times
                // 316 on both sides (~3e-5); f64 checks this shape.
                continue;
            }
            let cast = |t: &Tensor| t.to_dtype(dt);
            let (x, g, b) = (cast(&x64)?, cast(&g64)?, cast(&b64)?);
            let fused = run(&x, &g, &b, &c, true)?;
            let composed = run(&x, &g, &b, &c, false)?;
            let tol = if dt == DType::F32 { 2e-5 } else { 1e-12 };
            for (k, name) in ["y", "dx", "dg", "db"].iter().enumerate() {
                assert_eq!(fused[k].dtype(), dt, "{name}");
                assert_eq!(fused[k].dims(), composed[k].dims(), "{name}");
                let (a, e) = (vec64(&fused[k]), vec64(&composed[k]));
                let scale = e.iter().fold(1f64, |m, v| m.max(v.abs()));
                let diff = a
                    .iter()
                    .zip(&e)
                    .fold(0f64, |m, (p, q)| m.max((p - q).abs()));
                assert!(
                    diff <= tol * scale,
                    "{dt:?} rows {rows} d {d}: {name} fused vs composed {diff:.2e} (scale {scale:.2e})"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn fused_layer_norm_bf16_and_f16_round_like_the_composed_norm() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = shared::device::test_device();
    let (rows, d) = (48, 96);
    let x64 = (Tensor::randn(0f64, 1.5, (rows, d), &dev)? - 1.0)?;
    let g64 = Tensor::randn(1f64, 0.3, d, &dev)?;
    let b64 = Tensor::randn(0f64, 0.3, d, &dev)?;
    let c = Tensor::randn(0f64, 1.0, (rows, d), &dev)?;
    for (dt, ulp) in [(DType::BF16, 2f64.powi(-7)), (DType::F16, 2f64.powi(-10))] {
        let cast = |t: &Tensor| t.to_dtype(dt);
        let (x, g, b) = (cast(&x64)?, cast(&g64)?, cast(&b64)?);
        let fused = run(&x, &g, &b, &c, true)?;
        let composed = run(&x, &g, &b, &c, false)?;
        for (k, name) in ["y", "dx", "dg", "db"].iter().enumerate() {
            assert_eq!(fused[k].dtype(), dt, "{name}");
            let (a, e) = (vec64(&fused[k]), vec64(&composed[k]));
            let scale = e.iter().fold(0f64, |m, v| m.max(v.abs()));
            // the parameters' gradients sum many rounded rows: allow a few units at their scale
            let per_scale = if k >= 2 { 8.0 * ulp } else { 1e-5 };
            for (i, (p, q)) in a.iter().zip(&e).enumerate() {
                let allowed = ulp * q.abs().max(p.abs()) + per_scale * scale;
                assert!(
                    (p - q).abs() <= allowed,
                    "{dt:?} {name}[{i}]: fused {p} vs composed {q}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn gpt2_rung_with_fused_norm_and_gelu_gives_same_logits_and_gradients() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    let dev = shared::device::test_device();
    let cfg = LmConfig::gpt2(LmShape {
        vocab_size: 64,
        max_seq_len: 16,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
    });
    let tokens = Tensor::new(&[[1u32, 5, 7, 9, 2, 8], [3, 3, 3, 4, 63, 0]], &dev)?;
    let targets = Tensor::new(&[[5u32, 7, 9, 2, 8, 1], [3, 3, 4, 63, 0, 2]], &dev)?;
    shared::params::set_seed(5);
    let (varmap, composed) = init_lm(&cfg, &parts(Kernels::composed()), DType::F32, &dev)?;
    let fused_ops = Kernels {
        norm: OpImpl::Fused,
        gelu: OpImpl::Fused,
        ..Kernels::composed()
    };
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let fused = build_lm(vb, &cfg, &parts(fused_ops))?; // same parameters
    let (la, lb) = (composed.forward(&tokens, 0)?, fused.forward(&tokens, 0)?);
    let diff = vec64(&(&lb - &la)?)
        .iter()
        .fold(0f64, |m, v| m.max(v.abs()));
    assert!(diff < 1e-5, "logits differ by {diff:.2e}");
    let ga = composed.loss(&tokens, &targets)?.backward()?;
    let gb = fused.loss(&tokens, &targets)?.backward()?;
    for (name, var) in shared::params::named_vars(&varmap) {
        let (a, b) = (
            ga.get(var.as_tensor()).expect("grad"),
            gb.get(var.as_tensor()).expect("grad"),
        );
        let scale = vec64(a).iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        let diff = vec64(&(b - a)?).iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(
            diff <= 1e-4 * scale,
            "{name}: gradient differs by {diff:.2e} (scale {scale:.2e})"
        );
    }
    Ok(())
}

#[test]
fn fused_layer_norm_rejects_bad_inputs_with_clear_messages() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 8), DType::F32, &dev)?;
    let (g, b) = (
        Tensor::ones(8, DType::F32, &dev)?,
        Tensor::zeros(8, DType::F32, &dev)?,
    );
    let err = |r: Result<Tensor>| r.unwrap_err().to_string();
    let e = err(layer_norm_fused(
        &x,
        &Tensor::ones(6, DType::F32, &dev)?,
        &b,
        1e-5,
    ));
    assert!(e.contains("width 6"), "{e}");
    let e = err(layer_norm_fused(
        &x,
        &g,
        &Tensor::zeros(7, DType::F32, &dev)?,
        1e-5,
    ));
    assert!(e.contains("bias"), "{e}");
    let e = err(layer_norm_fused(&x, &g, &b, 0.0));
    assert!(e.contains("eps"), "{e}");
    // a constant row has zero variance: ε keeps it finite and it maps to the bias
    let y = layer_norm_fused(&(x + 4.0)?, &g, &(b + 0.5)?, 1e-5)?;
    assert!(vec64(&y).iter().all(|v| (v - 0.5).abs() < 1e-6));
    Ok(())
}

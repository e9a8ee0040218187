//! The fused RMSNorm CUDA kernels (forward and backward) against the composed RMSNorm on the
//! same GPU and a float64 CPU reference, in f32, bf16 and f16. Each test returns early, with a
//! printed note, when this build has no CUDA or no GPU answers (on the GPU host
//! `MODULE08_EXPECT_GPU=1` turns that into a failure).
//!
//! Tolerances: f32 ≤ 1e-5 relative to the row's scale (both are exact algorithms in f32);
//! bf16/f16: FlashAttention's rule, max |fused − ref| ≤ 2·max |composed − ref| + the dtype's
//! own rounding at the reference's scale (both compute in f32 and round once).

use candle_core::{DType, Device, Result, Tensor, Var};
use shared::kernels::{Kernels, OpImpl};
use t0804_transformer_block::{build_lm, init_lm, Layer, LmConfig, LmShape};
use t0806_modern_blocks::*;

/// The CUDA device when this build has CUDA and a GPU answers; otherwise prints why the test is
/// skipped and returns `None` (a failure when `MODULE08_EXPECT_GPU` is set).
fn gpu(test: &str) -> Option<Device> {
    let expect = std::env::var_os("MODULE08_EXPECT_GPU").is_some();
    if !candle_core::utils::cuda_is_available() {
        assert!(
            !expect,
            "{test}: MODULE08_EXPECT_GPU is set but this build has no CUDA"
        );
        println!("note: {test} skipped: built without the `cuda` feature");
        return None;
    }
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(
                !expect,
                "{test}: MODULE08_EXPECT_GPU is set but no GPU opened: {e}"
            );
            println!("note: {test} skipped: no CUDA device ({e})");
            None
        }
    }
}

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

fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_finite() {
                (x - y).abs()
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
}

fn max_mag(a: &[f64]) -> f64 {
    a.iter().fold(0f64, |m, v| m.max(v.abs()))
}

/// `[y, dx, dg]` of `loss = Σ dy ⊙ norm(x, g)` (as f64 vectors), fused or composed.
fn run(x: &Tensor, g: &Tensor, dy: &Tensor, fused: bool) -> Result<[Vec<f64>; 3]> {
    let (vx, vg) = (Var::from_tensor(x)?, Var::from_tensor(g)?);
    let y = RmsNorm::from_weights(vg.as_tensor().clone(), 1e-5)?
        .with_impl(if fused {
            OpImpl::Fused
        } else {
            OpImpl::Composed
        })
        .forward(vx.as_tensor())?;
    let grads = (&y * dy)?.sum_all()?.backward()?;
    assert_eq!(y.dtype(), x.dtype());
    let dx = grads.get(vx.as_tensor()).expect("dx");
    let dg = grads.get(vg.as_tensor()).expect("dg");
    assert_eq!((dx.dtype(), dg.dtype()), (x.dtype(), g.dtype()));
    Ok([vec64(&y), vec64(dx), vec64(dg)])
}

/// `(rows, d, offset)`: vectorised widths (multiples of 8), widths that force the scalar kernels
/// (odd, not a multiple of 4), one row, many rows (many blocks' partial dg), a large width, and
/// inputs starting at an odd element offset (scalar kernels even for d % 8 == 0).
fn shapes() -> Vec<(usize, usize, usize)> {
    vec![
        (37, 64, 0),
        (5, 100, 0),
        (9, 37, 0),
        (1, 8, 0),
        (3000, 256, 0),
        (64, 4096, 0),
        (17, 128, 3),
        (33, 64, 5),
        (300, 1024, 0),
    ]
}

fn check(test: &str, dev: &Device, dt: DType) -> Result<()> {
    let cpu = Device::Cpu;
    for (rows, d, offset) in shapes() {
        // Inputs drawn in f64 on the CPU, rounded to dt; the reference sees the rounded values.
        // x is a view starting `offset` elements into a flat buffer (offset 3: no 16-byte alignment).
        let flat64 = ((Tensor::randn(0f64, 1.5, rows * d + offset, &cpu)? + 0.3)?
            .to_dtype(dt)?
            .to_dtype(DType::F64))?;
        let g64 = Tensor::randn(1f64, 0.3, d, &cpu)?
            .to_dtype(dt)?
            .to_dtype(DType::F64)?;
        let dy64 = Tensor::randn(0f64, 1.0, (rows, d), &cpu)?
            .to_dtype(dt)?
            .to_dtype(DType::F64)?;
        let x64 = flat64.narrow(0, offset, rows * d)?.reshape((rows, d))?;
        let reference = run(&x64, &g64, &dy64, false)?; // float64, CPU
        let on_gpu = |t: &Tensor| t.to_dtype(dt)?.to_device(dev);
        let x = on_gpu(&flat64)?
            .narrow(0, offset, rows * d)?
            .reshape((rows, d))?;
        assert_eq!(x.layout().start_offset(), offset);
        let (g, dy) = (on_gpu(&g64)?, on_gpu(&dy64)?);
        let fused = run(&x, &g, &dy, true)?;
        let composed = run(&x, &g, &dy, false)?;
        for (k, name) in ["y", "dx", "dg"].iter().enumerate() {
            let scale = max_mag(&reference[k]).max(1e-6);
            let err_f = max_abs(&fused[k], &reference[k]);
            let err_c = max_abs(&composed[k], &reference[k]);
            let diff = max_abs(&fused[k], &composed[k]);
            println!("{test} {dt:?} rows {rows} d {d} offset {offset}: {name} |fused − ref| {:.2e}, |composed − ref| {:.2e}, |fused − composed| {:.2e} (scale {scale:.2e})", err_f, err_c, diff);
            let ok = if dt == DType::F32 {
                err_f <= 1e-5 * scale && diff <= 1e-5 * scale
            } else {
                let rounding = match dt {
                    DType::BF16 => 2f64.powi(-8),
                    _ => 2f64.powi(-11),
                } * scale;
                err_f <= 2.0 * err_c + 2.0 * rounding
            };
            assert!(ok, "{test} {dt:?} rows {rows} d {d} offset {offset}: {name}: fused error {err_f:.3e}, composed error {err_c:.3e}, scale {scale:.3e}");
        }
    }
    Ok(())
}

#[test]
fn gpu_fused_rms_norm_f32_matches_composed_and_f64() -> Result<()> {
    let _init = shared::params::init_turn();
    let Some(dev) = gpu("gpu_fused_rms_norm_f32_matches_composed_and_f64") else {
        return Ok(());
    };
    check("f32", &dev, DType::F32)
}

#[test]
fn gpu_fused_rms_norm_bf16_matches_composed_and_f64() -> Result<()> {
    let _init = shared::params::init_turn();
    let Some(dev) = gpu("gpu_fused_rms_norm_bf16_matches_composed_and_f64") else {
        return Ok(());
    };
    check("bf16", &dev, DType::BF16)
}

#[test]
fn gpu_fused_rms_norm_f16_matches_composed_and_f64() -> Result<()> {
    let _init = shared::params::init_turn();
    let Some(dev) = gpu("gpu_fused_rms_norm_f16_matches_composed_and_f64") else {
        return Ok(());
    };
    check("f16", &dev, DType::F16)
}

#[test]
fn gpu_fused_rms_norm_equals_cpu_fused() -> Result<()> {
    let _init = shared::params::init_turn();
    // The CUDA kernels and the CPU loop implement the same formulas: f32 results agree to
    // rounding, and x · r · g is computed in the same order, so y is bitwise equal almost always.
    let Some(dev) = gpu("gpu_fused_rms_norm_equals_cpu_fused") else {
        return Ok(());
    };
    let cpu = Device::Cpu;
    let (rows, d) = (513, 2048);
    let x = Tensor::randn(0f32, 1.0, (rows, d), &cpu)?;
    let g = Tensor::randn(1f32, 0.2, d, &cpu)?;
    let dy = Tensor::randn(0f32, 1.0, (rows, d), &cpu)?;
    let y_cpu = vec64(&rms_norm_fused(&x, &g, 1e-5)?);
    let (dx_cpu, dg_cpu) = rms_norm_fused_backward(&x, &g, &dy, 1e-5)?;
    let (xg, gg, dyg) = (x.to_device(&dev)?, g.to_device(&dev)?, dy.to_device(&dev)?);
    let y_gpu = vec64(&rms_norm_fused(&xg, &gg, 1e-5)?);
    let (dx_gpu, dg_gpu) = rms_norm_fused_backward(&xg, &gg, &dyg, 1e-5)?;
    for (name, a, b) in [
        ("y", y_gpu, y_cpu),
        ("dx", vec64(&dx_gpu), vec64(&dx_cpu)),
        ("dg", vec64(&dg_gpu), vec64(&dg_cpu)),
    ] {
        let e = max_abs(&a, &b) / max_mag(&b);
        println!("gpu vs cpu fused: {name} max |Δ| / scale = {e:.2e}");
        assert!(
            e < 1e-5,
            "{name}: GPU and CPU fused RMSNorm differ by {e:.2e}"
        );
    }
    Ok(())
}

#[test]
fn gpu_rung1_with_fused_norm_trains_like_composed() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    // One rung-1 model (RMSNorm + SwiGLU) on the GPU, f32 and bf16: the loss and every
    // parameter's gradient are the same (to bf16 noise) with the fused norm and with the composed one.
    let Some(dev) = gpu("gpu_rung1_with_fused_norm_trains_like_composed") else {
        return Ok(());
    };
    let shape = LmShape {
        vocab_size: 256,
        max_seq_len: 64,
        d_model: 128,
        n_layers: 2,
        n_heads: 4,
    };
    let cfg = modern(LmConfig::gpt2(shape));
    let fused_norm = Kernels {
        norm: OpImpl::Fused,
        ..Kernels::composed()
    };
    for dt in [DType::F32, DType::BF16] {
        shared::params::set_seed(5);
        let (varmap, composed) = init_lm(&cfg, &parts(Kernels::composed()), dt, &dev)?;
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, dt, &dev);
        let fused = build_lm(vb, &cfg, &parts(fused_norm))?;
        let ids: Vec<u32> = (0..4 * 65).map(|i| ((i * 37 + 11) % 256) as u32).collect();
        let all = Tensor::from_vec(ids, (4, 65), &dev)?;
        let (x, y) = (all.narrow(1, 0, 64)?, all.narrow(1, 1, 64)?);
        let (la, lb) = (composed.loss(&x, &y)?, fused.loss(&x, &y)?);
        let (va, vb) = (
            la.to_dtype(DType::F32)?.to_scalar::<f32>()?,
            lb.to_dtype(DType::F32)?.to_scalar::<f32>()?,
        );
        let tol = if dt == DType::F32 { 1e-5 } else { 2e-2 };
        assert!(
            (va - vb).abs() <= tol * va.abs(),
            "{dt:?}: loss composed {va} vs fused {vb}"
        );
        let (ga, gb) = (la.backward()?, lb.backward()?);
        for (name, var) in shared::params::named_vars(&varmap) {
            let (a, b) = (
                vec64(ga.get(var.as_tensor()).expect("grad")),
                vec64(gb.get(var.as_tensor()).expect("grad")),
            );
            let rel = (a.iter().zip(&b).map(|(p, q)| (p - q).powi(2)).sum::<f64>()
                / a.iter().map(|p| p * p).sum::<f64>().max(1e-30))
            .sqrt();
            let tol = if dt == DType::F32 { 1e-4 } else { 5e-2 };
            assert!(
                rel <= tol,
                "{dt:?} {name}: gradients differ, relative norm {rel:.2e}"
            );
        }
    }
    Ok(())
}

#[test]
fn gpu_fused_add_and_norm_equal_the_two_ops_bit_for_bit() -> Result<()> {
    // kernels/rmsnorm.cu's add_rmsnorm_fwd_* against shared::add::residual_add followed by the
    // fused RMSNorm on the same GPU: h and y, and the gradients of x, a and g for
    // loss = Σ h⊙u + Σ y⊙w (h used twice, as in a block), bit for bit. Widths 42 (one element per
    // lane in every dtype) and 64 (16-byte vectors), 37 rows (a partial last block of 8 warps).
    let Some(dev) = gpu("gpu_fused_add_and_norm_equal_the_two_ops_bit_for_bit") else {
        return Ok(());
    };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for d in [42usize, 64] {
            let draw = |seed: u64, shape: &[usize]| -> Result<Tensor> {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
                    .collect();
                Tensor::from_vec(v, shape, &dev)?.to_dtype(dtype)
            };
            let run = |fused: bool| -> Result<Vec<Vec<f64>>> {
                let x = Var::from_tensor(&draw(1, &[37, d])?)?;
                let a = Var::from_tensor(&draw(2, &[37, d])?)?;
                let g = Var::from_tensor(&(draw(3, &[d])? + 1.0)?)?;
                let (h, y) = if fused {
                    add_rms_norm_fused(&x, &a, &g, 1e-5)?
                } else {
                    let h = shared::add::residual_add(&x, &a)?;
                    let y = rms_norm_fused(&h, &g, 1e-5)?;
                    (h, y)
                };
                let loss = ((&h * &draw(4, &[37, d])?)?.sum_all()?
                    + (&y * &draw(5, &[37, d])?)?.sum_all()?)?;
                let grads = loss.backward()?;
                let mut out = vec![vec64(&h), vec64(&y)];
                for v in [&x, &a, &g] {
                    out.push(vec64(grads.get(v.as_tensor()).expect("gradient")));
                }
                Ok(out)
            };
            let (fused, separate) = (run(true)?, run(false)?);
            for (i, name) in ["h", "y", "dx", "da"].iter().enumerate() {
                assert_eq!(fused[i], separate[i], "{dtype:?} d {d}: {name}");
            }
            // dg sums rows with shared-memory atomics whose order varies: equal to the rounding of
            // its storage dtype (f32: a few ulps of the largest partial sum).
            let e = max_abs(&fused[4], &separate[4]);
            let scale = separate[4].iter().fold(0f64, |m, v| m.max(v.abs()));
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            assert!(
                e <= tol * scale,
                "{dtype:?} d {d}: dg differs by {e:e} (scale {scale:e})"
            );
        }
    }
    Ok(())
}

//! The fused ops of 8-06 against the composed ops they replace. RMSNorm: values and gradients
//! equal the composed RMSNorm (f32, f64, bf16), the backward equals central finite differences in
//! f64. The SwiGLU gate: SiLU(a)·b and its gradients. The causal softmax: t0801's scale, mask and
//! softmax (f64 on the CPU to 1e-12; f32 and bf16 everywhere) for grouped rows, queries that are
//! the last of more keys, rows longer than a warp and no mask, and the attention kernel built on it
//! equals 8-02's naive kernel, grouped K/V heads included. A rung-1 model built with every fused op
//! of this topic computes the same logits and gradients; bad inputs give clear errors. The tests that use `test_device()` run on the GPU with
//! `MODULE08_TEST_DEVICE=cuda`.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use shared::kernels::{Kernels, OpImpl};
use t0801_self_attention::{mask_scores, softmax_last_dim};
use t0802_multi_head_attention::{grouped_causal_mask, AttentionKernel, AttnMask, NaiveAttention};
use t0804_transformer_block::{build_lm, init_lm, Layer, LmConfig, LmShape};
use t0806_modern_blocks::*;

fn op_impl(fused: bool) -> OpImpl {
    if fused {
        OpImpl::Fused
    } else {
        OpImpl::Composed
    }
}

fn vec64(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// max |a − b| / max(|b|, 1)
fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (vec64(a), vec64(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f64::max)
}

/// `y`, `dx`, `dg` of `loss = Σ c ⊙ norm(x, g)`, fused or composed.
fn run(x: &Tensor, g: &Tensor, c: &Tensor, fused: bool) -> Result<(Tensor, Tensor, Tensor)> {
    let (vx, vg) = (Var::from_tensor(x)?, Var::from_tensor(g)?);
    let norm = RmsNorm::from_weights(vg.as_tensor().clone(), 1e-5)?.with_impl(op_impl(fused));
    let y = norm.forward(vx.as_tensor())?;
    let grads = (y.to_dtype(DType::F64)? * c)?.sum_all()?.backward()?;
    let dx = grads.get(vx.as_tensor()).expect("dx").clone();
    let dg = grads.get(vg.as_tensor()).expect("dg").clone();
    Ok((y, dx, dg))
}

#[test]
fn fused_equals_composed_values_and_gradients_f32_f64() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = Device::Cpu;
    // widths: a multiple of 8, an odd one, a single column; x with a large offset (mean ≠ 0)
    for (shape, d) in [((3usize, 7usize), 64usize), ((2, 5), 37), ((4, 1), 1)] {
        let x64 = (Tensor::randn(0f64, 2.0, (shape.0, shape.1, d), &dev)? + 0.5)?;
        let g64 = Tensor::randn(1f64, 0.5, d, &dev)?;
        let c = Tensor::randn(0f64, 1.0, (shape.0, shape.1, d), &dev)?;
        for dt in [DType::F32, DType::F64] {
            let (x, g) = (x64.to_dtype(dt)?, g64.to_dtype(dt)?);
            let (y_f, dx_f, dg_f) = run(&x, &g, &c, true)?;
            let (y_c, dx_c, dg_c) = run(&x, &g, &c, false)?;
            assert_eq!(y_f.dtype(), dt);
            assert_eq!((dx_f.dims(), dg_f.dims()), (x.dims(), g.dims()));
            let tol = if dt == DType::F32 { 1e-5 } else { 1e-12 };
            for (name, a, b) in [
                ("y", &y_f, &y_c),
                ("dx", &dx_f, &dx_c),
                ("dg", &dg_f, &dg_c),
            ] {
                let e = max_rel(a, b);
                assert!(
                    e <= tol,
                    "{dt:?} d {d}: {name} fused vs composed {e:.2e} > {tol:.0e}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn fused_bf16_and_f16_round_like_the_composed_norm() -> Result<()> {
    let _init = shared::params::init_turn();
    // Both compute in f32 and round once: the outputs may differ by at most one unit in the
    // last place of the 16-bit type (ties broken differently after f32 rounding noise).
    let dev = Device::Cpu;
    let (rows, d) = (40, 96);
    let x64 = Tensor::randn(0f64, 1.5, (rows, d), &dev)?;
    let g64 = Tensor::randn(1f64, 0.3, d, &dev)?;
    let c = Tensor::randn(0f64, 1.0, (rows, d), &dev)?;
    for (dt, ulp) in [(DType::BF16, 2f64.powi(-7)), (DType::F16, 2f64.powi(-10))] {
        let (x, g) = (x64.to_dtype(dt)?, g64.to_dtype(dt)?);
        let (y_f, dx_f, dg_f) = run(&x, &g, &c, true)?;
        let (y_c, dx_c, dg_c) = run(&x, &g, &c, false)?;
        assert_eq!((y_f.dtype(), dx_f.dtype(), dg_f.dtype()), (dt, dt, dt));
        for (name, a, b) in [
            ("y", &y_f, &y_c),
            ("dx", &dx_f, &dx_c),
            ("dg", &dg_f, &dg_c),
        ] {
            let (a, b) = (vec64(a), vec64(b));
            let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                // one ulp at the element's magnitude, plus f32 cancellation noise at the row's scale
                let allowed = ulp * q.abs().max(p.abs()) + 1e-5 * scale;
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
fn fused_backward_matches_finite_differences_f64() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = Device::Cpu;
    let (rows, d, eps) = (3, 5, 1e-5);
    let x = Tensor::randn(0f64, 1.0, (rows, d), &dev)?;
    let g = Tensor::randn(1f64, 0.5, d, &dev)?;
    let dy = Tensor::randn(0f64, 1.0, (rows, d), &dev)?;
    let (dx, dg) = rms_norm_fused_backward(&x, &g, &dy, eps)?;
    let loss = |x: &Tensor, g: &Tensor| -> Result<f64> {
        (rms_norm_fused(x, g, eps)? * &dy)?
            .sum_all()?
            .to_scalar::<f64>()
    };
    let h = 1e-6;
    for (which, base, analytic) in [("x", &x, &dx), ("g", &g, &dg)] {
        let v = vec64(base);
        let a = vec64(analytic);
        for i in 0..v.len() {
            let bump = |delta: f64| -> Result<f64> {
                let mut w = v.clone();
                w[i] += delta;
                let t = Tensor::from_vec(w, base.shape(), &dev)?;
                if which == "x" {
                    loss(&t, &g)
                } else {
                    loss(&x, &t)
                }
            };
            let numeric = (bump(h)? - bump(-h)?) / (2.0 * h);
            assert!(
                (numeric - a[i]).abs() <= 1e-6 * numeric.abs().max(1.0),
                "d/d{which}[{i}]: numeric {numeric} vs fused {}",
                a[i]
            );
        }
    }
    Ok(())
}

#[test]
fn fused_forward_matches_f64_reference_rows() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = Device::Cpu;
    let (rows, d, eps) = (6, 33, 1e-5);
    let x = Tensor::randn(0f32, 3.0, (rows, d), &dev)?;
    let g = Tensor::randn(1f32, 0.5, d, &dev)?;
    let y = rms_norm_fused(&x, &g, eps)?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    let g64 = vec64(&g);
    for (r, row) in x.to_dtype(DType::F64)?.to_vec2::<f64>()?.iter().enumerate() {
        let want = reference_rms_norm(row, &g64, eps);
        for (a, b) in y[r].iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "row {r}: {a} vs {b}"
            );
        }
    }
    Ok(())
}

#[test]
fn rung1_with_fused_norm_swiglu_and_softmax_gives_same_logits_and_gradients() -> anyhow::Result<()>
{
    let _init = shared::params::init_turn();
    let dev = shared::device::test_device();
    let shape = LmShape {
        vocab_size: 64,
        max_seq_len: 16,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
    };
    let cfg = modern(LmConfig::gpt2(shape));
    let tokens = Tensor::new(&[[1u32, 5, 7, 9, 2, 8], [3, 3, 3, 4, 63, 0]], &dev)?;
    let targets = Tensor::new(&[[5u32, 7, 9, 2, 8, 1], [3, 3, 4, 63, 0, 2]], &dev)?;
    shared::params::set_seed(3);
    let (varmap, composed) = init_lm(&cfg, &parts(Kernels::composed()), DType::F32, &dev)?;
    let fused_ops = Kernels {
        norm: OpImpl::Fused,
        swiglu: OpImpl::Fused,
        softmax: OpImpl::Fused,
        ..Kernels::composed()
    };
    let fused = build_lm(
        candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        &cfg,
        &parts(fused_ops),
    )?; // same parameters
    let la = composed.forward(&tokens, 0)?;
    let lb = fused.forward(&tokens, 0)?;
    assert!(
        max_rel(&lb, &la) < 1e-5,
        "logits differ: {:.2e}",
        max_rel(&lb, &la)
    );
    let ga = composed.loss(&tokens, &targets)?.backward()?;
    let gb = fused.loss(&tokens, &targets)?.backward()?;
    for (name, var) in shared::params::named_vars(&varmap) {
        let (a, b) = (
            ga.get(var.as_tensor()).expect("grad"),
            gb.get(var.as_tensor()).expect("grad"),
        );
        let scale = vec64(a).iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-3);
        let diff = vec64(&(b - a)?).iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(
            diff <= 1e-4 * scale,
            "{name}: gradient differs by {diff:.2e} (scale {scale:.2e})"
        );
    }
    Ok(())
}

/// A norm that counts the residual adds handed to it (`Layer::add_then_forward`), then does what
/// the norm it wraps does.
struct CountingNorm {
    inner: Box<dyn Layer>,
    adds: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Layer for CountingNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.forward(x)
    }
    fn add_then_forward(&self, x: &Tensor, a: &Tensor) -> Result<(Tensor, Tensor)> {
        self.adds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.add_then_forward(x, a)
    }
}

/// A placeholder while a norm is moved into a [`CountingNorm`].
struct Placeholder;

impl Layer for Placeholder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
}

#[test]
fn residual_adds_inside_the_norms_change_no_bit() -> anyhow::Result<()> {
    // With the fused norm, DecoderOnlyLm::hidden runs every pre-norm residual add inside the norm
    // that follows it (add_rms_norm_fused through Layer::add_then_forward): the attention branch
    // inside N₂, the feed-forward branch inside the next block's N₁ or the final norm, 2 adds per
    // block, all handed to a norm. Written out op by op, with every add on its own, the hidden
    // states and every parameter's gradient are the same bit for bit, in f32 and in bf16 (where
    // the sum's rounding matters), on the test device (on the GPU the gradients that a kernel sums
    // with atomics to their rounding: their order of additions varies from run to run).
    let _init = shared::params::init_turn();
    let dev = shared::device::test_device();
    let shape = LmShape {
        vocab_size: 64,
        max_seq_len: 16,
        d_model: 32,
        n_layers: 3,
        n_heads: 4,
    };
    let cfg = modern(LmConfig::gpt2(shape));
    let tokens = Tensor::new(&[[1u32, 5, 7, 9, 2, 8], [3, 3, 3, 4, 63, 0]], &dev)?;
    let fused_ops = Kernels {
        norm: OpImpl::Fused,
        ..Kernels::composed()
    };
    for dtype in [DType::F32, DType::BF16] {
        shared::params::set_seed(5);
        let (varmap, mut lm) = init_lm(&cfg, &parts(fused_ops), dtype, &dev)?;
        let adds = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = |norm: &mut Box<dyn Layer>| {
            let inner = std::mem::replace(norm, Box::new(Placeholder));
            *norm = Box::new(CountingNorm {
                inner,
                adds: adds.clone(),
            });
        };
        for block in &mut lm.blocks {
            count(&mut block.attn_norm);
            count(&mut block.ffn_norm);
        }
        count(lm.final_norm.as_mut().expect("pre-norm"));
        let probe = (Tensor::ones((2, 6, 32), DType::F32, &dev)? * 0.01)?.to_dtype(dtype)?;
        let fused = lm.hidden(&tokens, 0)?;
        let fused_grads = (&fused * &probe)?.sum_all()?.backward()?;
        assert_eq!(
            adds.load(std::sync::atomic::Ordering::Relaxed),
            2 * shape.n_layers,
            "{dtype:?}: residual adds handed to a norm"
        );
        let mut x = lm.embed(&tokens, 0)?;
        for block in &lm.blocks {
            let attn_in = block.attn_norm.forward(&x)?;
            let attended = block
                .attn
                .self_attention(&attn_in, AttnMask::Causal, 0, None)?;
            let h = shared::add::residual_add(&x, &attended)?;
            let branch = block.ffn.forward(&block.ffn_norm.forward(&h)?)?;
            x = shared::add::residual_add(&h, &branch)?;
        }
        let separate = lm.final_norm.as_ref().expect("pre-norm").forward(&x)?;
        let separate_grads = (&separate * &probe)?.sum_all()?.backward()?;
        assert_eq!(vec64(&fused), vec64(&separate), "{dtype:?}: hidden states");
        let mut compared = 0;
        for (name, var) in shared::params::named_vars(&varmap) {
            // The head is not on the way to the hidden states: no gradient on either side.
            match (
                fused_grads.get(var.as_tensor()),
                separate_grads.get(var.as_tensor()),
            ) {
                // On the GPU two kernels sum a gradient with atomics, whose order of additions
                // varies from run to run: a norm gain's over the rows (shared-memory atomics,
                // kernels/rmsnorm.cu) and the token embedding's over the tokens with the same id
                // (shared/kernels/embedding.cu; token 3 occurs three times here). Those are equal
                // to the rounding of their storage dtype, as in tests/gpu.rs; everything else bit
                // for bit.
                (Some(a), Some(b))
                    if dev.is_cuda()
                        && (name.ends_with("norm.weight") || name == "token_embedding") =>
                {
                    let (a, b) = (vec64(a), vec64(b));
                    let e = a
                        .iter()
                        .zip(&b)
                        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
                    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                    assert!(
                        e <= tol * scale,
                        "{dtype:?}: gradient of {name} differs by {e:e} (scale {scale:e})"
                    );
                    compared += 1;
                }
                (Some(a), Some(b)) => {
                    assert_eq!(vec64(a), vec64(b), "{dtype:?}: gradient of {name}");
                    compared += 1;
                }
                (None, None) => {}
                _ => panic!("{dtype:?}: {name} has a gradient on one side only"),
            }
        }
        assert!(
            compared >= 6 * shape.n_layers,
            "{dtype:?}: {compared} gradients compared"
        );
    }
    Ok(())
}

#[test]
fn fused_rejects_bad_inputs_with_clear_messages() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 8), DType::F32, &dev)?;
    let e = rms_norm_fused(&x, &Tensor::ones(6, DType::F32, &dev)?, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("width 6"), "{e}");
    let e = rms_norm_fused(&x, &Tensor::ones((2, 4), DType::F32, &dev)?, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1-D"), "{e}");
    let e = rms_norm_fused(&x, &Tensor::ones(8, DType::F32, &dev)?, -1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("eps"), "{e}");
    // an all-zero row is finite (ε keeps the scale bounded) and maps to zero
    let y = rms_norm_fused(&x, &Tensor::ones(8, DType::F32, &dev)?, 1e-5)?;
    assert_eq!(y.sum_all()?.to_scalar::<f32>()?, 0.0);
    Ok(())
}

#[test]
fn fused_swiglu_gate_equals_silu_times_up() -> Result<()> {
    let _init = shared::params::init_turn();
    // f64 on the CPU; f32 on the GPU (the kernel's widest type).
    let dev = shared::device::test_device();
    let (dtype, tol) = if dev.is_cuda() {
        (DType::F32, 1e-5)
    } else {
        (DType::F64, 1e-12)
    };
    let a = candle_core::Var::from_tensor(
        &(Tensor::randn(0f32, 3.0, (3, 5, 67), &dev)?.to_dtype(dtype)?),
    )?;
    let b = candle_core::Var::from_tensor(
        &(Tensor::randn(0f32, 1.0, (3, 5, 67), &dev)?.to_dtype(dtype)?),
    )?;
    let g = Tensor::randn(0f32, 1.0, (3, 5, 67), &dev)?.to_dtype(dtype)?;
    let fused = t0806_modern_blocks::swiglu_fused::swiglu_gate_fused(a.as_tensor(), b.as_tensor())?;
    let composed = (t0806_modern_blocks::silu(a.as_tensor())? * b.as_tensor())?;
    assert!(
        max_rel(&fused, &composed) < tol,
        "values: {:.2e}",
        max_rel(&fused, &composed)
    );
    let gf = (&fused * &g)?.sum_all()?.backward()?;
    let gc = (&composed * &g)?.sum_all()?.backward()?;
    for (name, v) in [("a", &a), ("b", &b)] {
        let (x, y) = (
            gf.get(v.as_tensor()).unwrap(),
            gc.get(v.as_tensor()).unwrap(),
        );
        assert!(max_rel(x, y) < tol, "d{name}: {:.2e}", max_rel(x, y));
    }
    assert!(t0806_modern_blocks::swiglu_fused::swiglu_gate_fused(
        a.as_tensor(),
        &g.narrow(2, 0, 3)?
    )
    .is_err());
    Ok(())
}

// ---- the fused causal softmax (naive attention) ----

/// The composed reference: t0801's mask and softmax of `scale · scores`.
fn composed(scores: &Tensor, scale: f64, g: usize, n_q: usize, causal: bool) -> Result<Tensor> {
    let n_k = scores.dim(D::Minus1)?;
    let s = (scores * scale)?;
    let s = if causal {
        mask_scores(&s, &grouped_causal_mask(g, n_q, n_k, scores.device())?)?
    } else {
        s
    };
    softmax_last_dim(&s)
}

/// `(y, dx)` of `loss = Σ c ⊙ softmax(x)`, fused or composed.
fn run_softmax(
    x: &Tensor,
    c: &Tensor,
    scale: f64,
    g: usize,
    n_q: usize,
    causal: bool,
    fused: bool,
) -> Result<(Tensor, Tensor)> {
    let v = Var::from_tensor(x)?;
    let y = if fused {
        causal_softmax_fused(v.as_tensor(), scale, n_q, causal)?
    } else {
        composed(v.as_tensor(), scale, g, n_q, causal)?
    };
    let grads = (y.to_dtype(DType::F64)? * c)?.sum_all()?.backward()?;
    let dx = grads.get(v.as_tensor()).expect("dx").clone();
    Ok((y, dx))
}

#[test]
fn fused_causal_softmax_equals_composed_mask_and_softmax() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = shared::device::test_device();
    let dtypes: &[(DType, f64)] = if dev.is_cuda() {
        &[(DType::F32, 1e-5), (DType::BF16, 2e-2), (DType::F16, 3e-3)]
    } else {
        &[
            (DType::F64, 1e-12),
            (DType::F32, 1e-5),
            (DType::BF16, 2e-2),
            (DType::F16, 3e-3),
        ]
    };
    // (heads per group, queries, keys, causal): square; queries the last 5 of 9 keys, grouped;
    // no mask; one query (decoding); rows of more than 32 keys (several per lane); more queries
    // than keys without the mask.
    for (g, n_q, n_k, causal) in [
        (1, 7, 7, true),
        (2, 5, 9, true),
        (3, 4, 4, false),
        (1, 1, 40, true),
        (2, 33, 70, true),
        (1, 6, 3, false),
    ] {
        let x64 =
            (Tensor::randn(0f64, 4.0, (2, 3, g * n_q, n_k), &Device::Cpu)?).to_device(&dev)?;
        let c = Tensor::randn(0f64, 1.0, (2, 3, g * n_q, n_k), &Device::Cpu)?.to_device(&dev)?;
        let scale = 0.3;
        // The reference in f64 with the composed ops.
        let (y_ref, dx_ref) = run_softmax(
            &x64.to_device(&Device::Cpu)?,
            &c.to_device(&Device::Cpu)?,
            scale,
            g,
            n_q,
            causal,
            false,
        )?;
        for &(dt, tol) in dtypes {
            let x = x64.to_dtype(dt)?;
            let (y, dx) = run_softmax(&x, &c, scale, g, n_q, causal, true)?;
            assert_eq!((y.dtype(), y.dims()), (dt, x.dims()));
            let (ey, edx) = (max_rel(&y, &y_ref), max_rel(&dx, &dx_ref));
            assert!(
                ey < tol && edx < tol,
                "g {g} n_q {n_q} n_k {n_k} causal {causal} {dt:?}: y {ey:.2e}, dx {edx:.2e}"
            );
            // masked keys are exactly zero, every row sums to one
            let rows = y.to_dtype(DType::F64)?.sum(D::Minus1)?;
            assert!(vec64(&rows)
                .iter()
                .all(|s| (s - 1.0).abs() < tol.max(1e-6) * 4.0));
        }
    }
    Ok(())
}

#[test]
fn fused_softmax_attention_equals_naive_attention_with_grouped_heads() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = shared::device::test_device();
    let (b, h, kv, n, d) = (2, 4, 2, 9, 8);
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, kv, n, d), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, kv, n, d), &dev)?)?;
    let c = Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?;
    for causal in [true, false] {
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let mask = if causal {
            AttnMask::Causal
        } else {
            AttnMask::None
        };
        let fused = FusedSoftmaxAttention.attend(qt, kt, vt, mask, None)?;
        let naive = NaiveAttention.attend(qt, kt, vt, mask, None)?;
        assert!(max_rel(&fused, &naive) < 1e-5, "causal {causal}: output");
        let gf = (&fused * &c)?.sum_all()?.backward()?;
        let gn = (&naive * &c)?.sum_all()?.backward()?;
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, bb) = (
                gf.get(var.as_tensor()).unwrap(),
                gn.get(var.as_tensor()).unwrap(),
            );
            assert!(
                max_rel(a, bb) < 1e-5,
                "causal {causal}: d{name} {:.2e}",
                max_rel(a, bb)
            );
        }
    }
    Ok(())
}

#[test]
fn a_nan_score_makes_its_row_nan_and_only_its_row() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = shared::device::test_device();
    let mut x = vec![0.5f32; 2 * 4];
    x[1] = f32::NAN; // row 0, key 1
    let y = causal_softmax_fused(&Tensor::from_vec(x, (2, 4), &dev)?, 1.0, 2, false)?;
    let y = y.to_vec2::<f32>()?;
    assert!(y[0].iter().all(|v| v.is_nan()), "{y:?}");
    assert!(y[1].iter().all(|v| (v - 0.25).abs() < 1e-6), "{y:?}");
    Ok(())
}

#[test]
fn minus_infinity_scores_get_zero_weight() -> Result<()> {
    let _init = shared::params::init_turn();
    // A score that is already −∞ (a padding mask applied before the op) is weight 0, on every
    // lane of a row longer than a warp, as in the composed softmax.
    let dev = shared::device::test_device();
    let mut x: Vec<f32> = (0..2 * 40).map(|i| (i % 7) as f32 * 0.25).collect();
    for j in [0, 1, 33, 39] {
        x[j] = f32::NEG_INFINITY; // row 0: the first keys of lanes 0 and 1, later keys of lanes 1 and 7
    }
    let x = Tensor::from_vec(x, (2, 40), &dev)?;
    let y = causal_softmax_fused(&x, 0.5, 2, false)?;
    let want = softmax_last_dim(&(x.to_device(&Device::Cpu)? * 0.5)?)?;
    assert!(max_rel(&y, &want) < 1e-6, "{:.2e}", max_rel(&y, &want));
    let y = y.to_vec2::<f32>()?;
    assert!([0, 1, 33, 39].iter().all(|&j| y[0][j] == 0.0), "{:?}", y[0]);
    Ok(())
}

#[test]
fn bad_arguments_are_errors() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 6, 8), DType::F32, &dev)?;
    let msg = |r: Result<Tensor>| r.unwrap_err().to_string();
    assert!(msg(causal_softmax_fused(&x, 1.0, 4, true)).contains("divide"));
    assert!(msg(causal_softmax_fused(&x, 1.0, 0, true)).contains("divide"));
    assert!(msg(causal_softmax_fused(
        &Tensor::zeros((2, 12, 8), DType::F32, &dev)?,
        1.0,
        12,
        true
    ))
    .contains("at most"));
    assert!(msg(causal_softmax_fused(
        &Tensor::zeros(8, DType::F32, &dev)?,
        1.0,
        1,
        true
    ))
    .contains("(…, rows, n_k)"));
    assert!(msg(causal_softmax_fused(&x, f64::NAN, 3, true)).contains("finite"));
    let ints = Tensor::zeros((2, 6, 8), DType::U32, &dev)?;
    assert!(causal_softmax_fused(&ints, 1.0, 3, true).is_err());
    Ok(())
}

/// Keys up to a device index (8-10's static cache: slots `0 ..= pos` written, the rest stale):
/// the fused softmax reads the index on the device and gives naive attention's output over the
/// explicit mask, one query per sequence and several, grouped K/V heads, values and gradients;
/// the stale slots weigh exactly zero.
#[test]
fn fused_softmax_attention_reads_the_last_key_from_the_device() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = shared::device::test_device();
    let (b, h, kv, n_k, d) = (2, 4, 2, 11, 8);
    for (n_q, last) in [(1, 5u32), (3, 10), (1, 0)] {
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, n_q, d), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, kv, n_k, d), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, kv, n_k, d), &dev)?)?;
        let c = Tensor::randn(0f32, 1.0, (b, h, n_q, d), &dev)?;
        let last_t = Tensor::new(&[last], &dev)?;
        let mask = AttnMask::KeysUpTo(&last_t);
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let fused = FusedSoftmaxAttention.attend(qt, kt, vt, mask, None)?;
        let naive = NaiveAttention.attend(qt, kt, vt, mask, None)?;
        let what = format!("{n_q} queries, keys up to {last}");
        assert!(max_rel(&fused, &naive) < 1e-5, "{what}: output");
        // Only the first last+1 keys count: changing the others changes nothing.
        let stale = Tensor::cat(
            &[
                &kt.narrow(2, 0, last as usize + 1)?,
                &(kt.narrow(2, last as usize + 1, n_k - last as usize - 1)? * 7.0)?,
            ],
            2,
        )?;
        let again = FusedSoftmaxAttention.attend(qt, &stale, vt, mask, None)?;
        assert_eq!(max_rel(&again, &fused), 0.0, "{what}: stale keys");
        let gf = (&fused * &c)?.sum_all()?.backward()?;
        let gn = (&naive * &c)?.sum_all()?.backward()?;
        for (g, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let (x, y) = (
                gf.get(var.as_tensor()).unwrap(),
                gn.get(var.as_tensor()).unwrap(),
            );
            assert!(max_rel(x, y) < 1e-5, "{what}: d{g} {:.2e}", max_rel(x, y));
        }
    }
    let bad = Tensor::new(&[3i64], &dev)?;
    let scores = Tensor::zeros((1, 1, 1, 4), DType::F32, &dev)?;
    let e = softmax_fused_up_to(&scores, 1.0, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("(1,) u32"), "{e}");
    Ok(())
}

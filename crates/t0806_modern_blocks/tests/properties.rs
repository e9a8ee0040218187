//! Randomized equivalence tests (seeded, bounded): every fused op of 8-06 against the composed
//! ops it replaces, over random shapes, input layouts (contiguous, a view at an offset, a
//! transposed view) and dtypes, forward and gradients:
//! - `rms_norm_fused` (through `RmsNorm::with_impl(Fused)`) vs the composed `RmsNorm`;
//! - the SwiGLU gate `swiglu_gate_fused(a, b)` vs `silu(a) * b`;
//! - bias + GELU `bias_gelu_fused(h, b)` and shared's `add_bias` vs `broadcast_add` and 8-04's GELU;
//! - `causal_softmax_fused` vs t0801's scale, (grouped, end-aligned) causal mask and softmax, for
//!   random `n_q ≤ n_k` and head groups, and the `FusedSoftmaxAttention` kernel vs the naive one.
//!
//! Each fused result is compared with the composed form in the same dtype and with the composed
//! form in float64 on the CPU. Runs on `shared::device::test_device()` (the GPU with
//! `MODULE08_TEST_DEVICE=cuda`, where f64 is skipped: the kernels are f32/bf16/f16). Every failure
//! message starts with the case that failed.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use shared::device::test_device;
use shared::kernels::OpImpl;
use t0801_self_attention::{mask_scores, softmax_last_dim};
use t0802_multi_head_attention::{grouped_causal_mask, AttentionKernel, AttnMask, NaiveAttention};
use t0804_transformer_block::Layer;
use t0806_modern_blocks::swiglu_fused::swiglu_gate_fused;
use t0806_modern_blocks::*;

/// Cases per property (dev profile, 2 cores: the file runs well under 30 s); a fifth of them
/// under compute-sanitizer (`MODULE08_SANITIZER`, set by `scripts/sanitize.sh`).
fn cases() -> usize {
    if std::env::var_os("MODULE08_SANITIZER").is_some() {
        30
    } else {
        150
    }
}

use shared::rng::Rng;

/// How an input tensor is laid out in memory (the values are the same).
#[derive(Debug, Clone, Copy)]
enum Layout {
    Contiguous,
    /// A contiguous view starting this many elements into a larger buffer.
    Offset(usize),
    /// The transpose of a contiguous tensor, transposed back: a strided view.
    Strided,
}

impl Layout {
    fn draw(rng: &mut Rng) -> Self {
        match rng.below(3) {
            0 => Self::Contiguous,
            1 => Self::Offset(1 + rng.below(13)),
            _ => Self::Strided,
        }
    }

    /// `x` (f64, CPU) in `dtype` on `dev` as a differentiable input laid out as `self`.
    fn input(self, x: &Tensor, dtype: DType, dev: &Device) -> Result<Input> {
        let x = x.to_dtype(dtype)?.to_device(dev)?;
        let r = x.rank();
        let base = match self {
            Self::Contiguous => x.clone(),
            Self::Offset(o) => {
                let pad = Tensor::zeros(o, dtype, dev)?;
                Tensor::cat(&[&pad, &x.flatten_all()?, &pad], 0)?
            }
            Self::Strided if r >= 2 => x.transpose(r - 2, r - 1)?.contiguous()?,
            Self::Strided => x.clone(),
        };
        let input = Input {
            var: Var::from_tensor(&base)?,
            layout: self,
            shape: x.dims().to_vec(),
        };
        let view = input.view()?;
        match self {
            Self::Offset(o) => assert_eq!(view.layout().start_offset(), o),
            Self::Strided if r >= 2 && x.dims()[r - 2] > 1 && x.dims()[r - 1] > 1 => {
                assert!(!view.is_contiguous())
            }
            _ => {}
        }
        assert_eq!(vec64(&view), vec64(&x), "the view holds the values");
        Ok(input)
    }
}

/// A differentiable input seen through a [`Layout`]: the variable is the underlying buffer, so
/// the op receives the view itself (`Var::from_tensor` of a view would copy it contiguous).
struct Input {
    var: Var,
    layout: Layout,
    shape: Vec<usize>,
}

impl Input {
    /// `var` as the input tensor (an offset or strided view of it).
    fn view(&self) -> Result<Tensor> {
        self.to_view(self.var.as_tensor())
    }

    fn to_view(&self, base: &Tensor) -> Result<Tensor> {
        let r = self.shape.len();
        match self.layout {
            Layout::Contiguous => Ok(base.clone()),
            Layout::Offset(o) => base
                .narrow(0, o, self.shape.iter().product())?
                .reshape(self.shape.as_slice()),
            Layout::Strided if r >= 2 => base.transpose(r - 2, r - 1),
            Layout::Strided => Ok(base.clone()),
        }
    }

    /// The gradient of the input, read from the buffer's.
    fn grad(&self, g: &candle_core::backprop::GradStore) -> Result<Tensor> {
        let gb = g
            .get(self.var.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("missing gradient".into()))?;
        self.to_view(gb)
    }
}

fn vec64(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor to f64 vector")
}

/// max |a − b| / max(|b|, 1); NaN counts as infinitely wrong.
fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let e = (x - y).abs() / y.abs().max(1.0);
            if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        })
        .fold(0.0, f64::max)
}

/// The dtypes a property runs in on `dev` (f64 kernels exist on the CPU only).
fn dtypes(dev: &Device, low_precision: bool) -> Vec<DType> {
    let mut v = if dev.is_cuda() {
        vec![DType::F32]
    } else {
        vec![DType::F64, DType::F32]
    };
    if low_precision {
        v.extend([DType::BF16, DType::F16]);
    }
    v
}

/// Tolerance of fused vs composed (same dtype, or vs f64) for f64 and f32.
fn tol(dt: DType) -> f64 {
    if dt == DType::F64 {
        1e-12
    } else {
        1e-5
    }
}

/// A random shape of rank 1–4 whose last dimension is `last`.
fn leading_dims(rng: &mut Rng, last: usize) -> Vec<usize> {
    let rank = 1 + rng.below(4);
    let mut s: Vec<usize> = (1..rank).map(|_| 1 + rng.below(5)).collect();
    s.push(last);
    s
}

// ---- RMSNorm ----

/// `y`, `dx`, `dg` of `loss = Σ c ⊙ RmsNorm(x; g)`.
fn rms_run(x: &Input, g: &Tensor, c: &Tensor, eps: f64, imp: OpImpl) -> Result<[Tensor; 3]> {
    let vg = Var::from_tensor(g)?;
    let norm = RmsNorm::from_weights(vg.as_tensor().clone(), eps)?.with_impl(imp);
    let y = norm.forward(&x.view()?)?;
    let grads = (y.to_dtype(DType::F64)? * c)?.sum_all()?.backward()?;
    let dx = x.grad(&grads)?;
    let dg = grads.get(vg.as_tensor()).expect("dg").clone();
    Ok([y, dx, dg])
}

/// max over rows of `r · max_j |c_j·g_j|`, `r = 1/√(mean(x²) + ε)`: the size of the terms whose
/// difference is `dx`.
fn dx_term_scale(x: &[f64], g: &[f64], c: &[f64], eps: f64) -> f64 {
    let d = g.len();
    x.chunks(d)
        .zip(c.chunks(d))
        .map(|(xr, cr)| {
            let r = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
            r * cr
                .iter()
                .zip(g)
                .fold(0f64, |m, (c, g)| m.max((c * g).abs()))
        })
        .fold(0.0, f64::max)
}

#[test]
fn fused_rms_norm_equals_composed_over_random_shapes_layouts_and_dtypes() -> Result<()> {
    let dev = test_device();
    let mut rng = Rng::new(0x0806_0001);
    for case in 0..cases() {
        let d = rng.pick(&[1, 2, 7, 8, 33, 64, 96, 130, 257]);
        let shape = leading_dims(&mut rng, d);
        let eps = rng.pick(&[1e-5, 1e-6, 1e-2]);
        let (mean, std) = (rng.normal(), 0.1 + 3.0 * rng.uniform());
        let layout = Layout::draw(&mut rng);
        let x64 = rng.shifted_tensor(&shape, mean, std)?;
        let g64 = rng.shifted_tensor(&[d], 1.0, 0.5)?;
        let c = rng.shifted_tensor(&shape, 0.0, 1.0)?.to_device(&dev)?;
        for dt in dtypes(&dev, true) {
            let who = format!(
                "case {case}: x {shape:?} {layout:?} mean {mean:.2} std {std:.2} eps {eps:e} {dt:?}"
            );
            let x = layout.input(&x64, dt, &dev)?;
            let g = g64.to_dtype(dt)?.to_device(&dev)?;
            let fused = rms_run(&x, &g, &c, eps, OpImpl::Fused)?;
            let composed = rms_run(&x, &g, &c, eps, OpImpl::Composed)?;
            assert_eq!(fused[0].dtype(), dt, "{who}");
            assert_eq!(fused[0].dims(), shape.as_slice(), "{who}");
            assert_eq!(fused[1].dims(), shape.as_slice(), "{who}: dx");
            assert_eq!(fused[2].dims(), &[d], "{who}: dg");
            // The float64 reference: the composed norm on the same (rounded) inputs, and a loop.
            let c_cpu = c.to_device(&Device::Cpu)?;
            let x_vals = vec64(&x.view()?);
            let (x_up, g_up) = (
                Layout::Contiguous.input(
                    &Tensor::from_vec(x_vals.clone(), shape.as_slice(), &Device::Cpu)?,
                    DType::F64,
                    &Device::Cpu,
                )?,
                Tensor::from_vec(vec64(&g), d, &Device::Cpu)?,
            );
            let want = rms_run(&x_up, &g_up, &c_cpu, eps, OpImpl::Composed)?;
            let g_rows = vec64(&g);
            let looped: Vec<f64> = x_vals
                .chunks(d)
                .flat_map(|row| reference_rms_norm(row, &g_rows, eps))
                .collect();
            assert!(
                max_rel(&vec64(&want[0]), &looped) <= 1e-12,
                "{who}: the float64 references disagree"
            );
            for (i, name) in ["y", "dx", "dg"].iter().enumerate() {
                let (a, b) = (vec64(&fused[i]), vec64(&composed[i]));
                // dx cancels terms of size r·|c ⊙ g| (all of it when d = 1): the f32 noise is
                // relative to those, not to dx.
                let cancelled = if i == 1 {
                    dx_term_scale(&x_vals, &g_rows, &vec64(&c), eps)
                } else {
                    0.0
                };
                if matches!(dt, DType::BF16 | DType::F16) && dev.is_cuda() {
                    // The CUDA kernels reduce in another order: judged against float64 as
                    // tests/gpu.rs does, within twice the composed error + the dtype's rounding.
                    let w = vec64(&want[i]);
                    let abs = |p: &[f64]| {
                        p.iter()
                            .zip(&w)
                            .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
                    };
                    let scale = w.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-6);
                    let rounding = if dt == DType::BF16 {
                        2f64.powi(-8)
                    } else {
                        2f64.powi(-11)
                    };
                    let (err_f, err_c) = (abs(&a), abs(&b));
                    assert!(
                        err_f <= 2.0 * err_c + 2.0 * rounding * scale + 1e-5 * cancelled,
                        "{who}: {name} fused error {err_f:.3e}, composed error {err_c:.3e}, scale {scale:.3e}"
                    );
                } else if matches!(dt, DType::BF16 | DType::F16) {
                    // Both compute in f32 and round once: one unit in the last place of the
                    // 16-bit type apart, plus f32 cancellation noise at the tensor's scale
                    // (tests/fused.rs).
                    let ulp = if dt == DType::BF16 {
                        2f64.powi(-7)
                    } else {
                        2f64.powi(-10)
                    };
                    let scale = b.iter().fold(cancelled, |m, v| m.max(v.abs()));
                    for (j, (p, q)) in a.iter().zip(&b).enumerate() {
                        let allowed = ulp * q.abs().max(p.abs()) + 1e-5 * scale;
                        assert!(
                            (p - q).abs() <= allowed,
                            "{who}: {name}[{j}] fused {p} vs composed {q}"
                        );
                    }
                } else {
                    let e = max_rel(&a, &b);
                    assert!(e <= tol(dt), "{who}: {name} fused vs composed {e:.2e}");
                    let e = max_rel(&a, &vec64(&want[i]));
                    assert!(e <= tol(dt), "{who}: {name} fused vs float64 {e:.2e}");
                }
            }
        }
    }
    Ok(())
}

// ---- the SwiGLU gate ----

#[test]
fn fused_swiglu_gate_equals_silu_times_b_over_random_shapes() -> Result<()> {
    let dev = test_device();
    let mut rng = Rng::new(0x0806_0002);
    for case in 0..cases() {
        let last = rng.pick(&[1, 3, 16, 67, 128, 300]);
        let shape = leading_dims(&mut rng, last);
        let std_a = 0.1 + 6.0 * rng.uniform(); // saturating sigmoids too
        let (la, lb) = (Layout::draw(&mut rng), Layout::draw(&mut rng));
        let a64 = rng.shifted_tensor(&shape, 0.0, std_a)?;
        let b64 = rng.shifted_tensor(&shape, 0.0, 1.0)?;
        let c64 = rng.shifted_tensor(&shape, 0.0, 1.0)?;
        for dt in dtypes(&dev, false) {
            let who = format!("case {case}: {shape:?} std(a) {std_a:.2} a {la:?} b {lb:?} {dt:?}");
            let (a, b) = (la.input(&a64, dt, &dev)?, lb.input(&b64, dt, &dev)?);
            let c = c64.to_dtype(dt)?.to_device(&dev)?;
            // The float64 reference on the same (rounded) inputs, written out:
            // h = a·σ(a)·b, da = c·b·σ(a)·(1 + a(1 − σ(a))), db = c·a·σ(a).
            let (av, bv, cv) = (vec64(&a.view()?), vec64(&b.view()?), vec64(&c));
            let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
            let want_h: Vec<f64> = av.iter().zip(&bv).map(|(a, b)| a * sig(*a) * b).collect();
            let want_da: Vec<f64> = (0..av.len())
                .map(|i| {
                    let s = sig(av[i]);
                    cv[i] * bv[i] * s * (1.0 + av[i] * (1.0 - s))
                })
                .collect();
            let want_db: Vec<f64> = (0..av.len()).map(|i| cv[i] * av[i] * sig(av[i])).collect();
            let run = |fused: bool| -> Result<[Vec<f64>; 3]> {
                let (av, bv) = (a.view()?, b.view()?);
                let h = if fused {
                    swiglu_gate_fused(&av, &bv)?
                } else {
                    (silu(&av)? * &bv)?
                };
                assert_eq!((h.dims(), h.dtype()), (shape.as_slice(), dt), "{who}");
                let g = (&h * &c)?.sum_all()?.backward()?;
                Ok([vec64(&h), vec64(&a.grad(&g)?), vec64(&b.grad(&g)?)])
            };
            let (fused, composed) = (run(true)?, run(false)?);
            let wants = [&want_h, &want_da, &want_db];
            for (i, name) in ["h", "da", "db"].iter().enumerate() {
                let e = max_rel(&fused[i], &composed[i]);
                assert!(e <= tol(dt), "{who}: {name} fused vs composed {e:.2e}");
                let e = max_rel(&fused[i], wants[i]);
                assert!(e <= tol(dt), "{who}: {name} fused vs float64 {e:.2e}");
            }
        }
    }
    Ok(())
}

// ---- bias + GELU, and the bias add ----

#[test]
fn fused_bias_gelu_and_add_bias_equal_broadcast_add_and_gelu_over_random_shapes() -> Result<()> {
    let dev = test_device();
    let mut rng = Rng::new(0x0806_0005);
    for case in 0..cases() {
        let last = rng.pick(&[1, 3, 16, 67, 128, 300]);
        let shape = leading_dims(&mut rng, last);
        let std_h = 0.1 + 4.0 * rng.uniform(); // the flat tails of GELU too
        let lh = Layout::draw(&mut rng);
        let h64 = rng.shifted_tensor(&shape, 0.0, std_h)?;
        let b64 = rng.shifted_tensor(&[last], 0.0, 1.0)?;
        let b2_64 = rng.shifted_tensor(&[last], 0.0, 1.0)?;
        let c64 = rng.shifted_tensor(&shape, 0.0, 1.0)?;
        for dt in dtypes(&dev, false) {
            let who = format!("case {case}: {shape:?} std(h) {std_h:.2} h {lh:?} {dt:?}");
            let h = lh.input(&h64, dt, &dev)?;
            let b = Var::from_tensor(&b64.to_dtype(dt)?.to_device(&dev)?)?;
            let b2 = Var::from_tensor(&b2_64.to_dtype(dt)?.to_device(&dev)?)?;
            let c = c64.to_dtype(dt)?.to_device(&dev)?;
            // The float64 reference, written out: y = GELU(h + b) + b₂,
            // dh = c·GELU′(h + b), db = Σ_rows dh, db₂ = Σ_rows c.
            let (hv, bv, cv) = (vec64(&h.view()?), vec64(&b), vec64(&c));
            let b2v = vec64(&b2);
            let k = (2.0 / std::f64::consts::PI).sqrt();
            let tanh_u = |x: f64| (k * (x + 0.044715 * x * x * x)).tanh();
            let gelu = |x: f64| 0.5 * x * (1.0 + tanh_u(x));
            let slope = |x: f64| {
                let t = tanh_u(x);
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x)
            };
            let want_y: Vec<f64> = (0..hv.len())
                .map(|i| gelu(hv[i] + bv[i % last]) + b2v[i % last])
                .collect();
            let want_dh: Vec<f64> = (0..hv.len())
                .map(|i| cv[i] * slope(hv[i] + bv[i % last]))
                .collect();
            let column_sums = |v: &[f64]| -> Vec<f64> {
                (0..last)
                    .map(|j| v.iter().skip(j).step_by(last).sum())
                    .collect()
            };
            let (want_db, want_db2) = (column_sums(&want_dh), column_sums(&cv));
            let run = |fused: bool| -> Result<[Vec<f64>; 4]> {
                let hv = h.view()?;
                let y = if fused {
                    shared::bias::add_bias(&bias_gelu_fused(&hv, &b)?, &b2)?
                } else {
                    t0804_transformer_block::gelu::gelu(&hv.broadcast_add(&b)?)?
                        .broadcast_add(&b2)?
                };
                assert_eq!((y.dims(), y.dtype()), (shape.as_slice(), dt), "{who}");
                let g = (&y * &c)?.sum_all()?.backward()?;
                let grad = |v: &Var| vec64(g.get(v).expect("a bias gradient"));
                Ok([vec64(&y), vec64(&h.grad(&g)?), grad(&b), grad(&b2)])
            };
            let (fused, composed) = (run(true)?, run(false)?);
            let wants = [&want_y, &want_dh, &want_db, &want_db2];
            for (i, name) in ["y", "dh", "db", "db2"].iter().enumerate() {
                // Column sums of up to 125 rows: relative to the sum's scale, not one element's.
                let t = if i >= 2 { 50.0 * tol(dt) } else { tol(dt) };
                let e = max_rel(&fused[i], &composed[i]);
                assert!(e <= t, "{who}: {name} fused vs composed {e:.2e}");
                let e = max_rel(&fused[i], wants[i]);
                assert!(e <= t, "{who}: {name} fused vs float64 {e:.2e}");
            }
        }
    }
    Ok(())
}

/// bf16 and f16 (the kernels' other two dtypes on the GPU): `y` and `dh` are the float64 values
/// of the same rounded inputs, rounded once (f32 arithmetic, one rounding per stored value).
#[test]
fn fused_bias_gelu_in_low_precision_is_one_rounding_of_float64() -> Result<()> {
    let dev = test_device();
    let mut rng = Rng::new(0x0806_0006);
    for case in 0..cases() / 5 {
        let last = rng.pick(&[1, 7, 64, 300]);
        let shape = leading_dims(&mut rng, last);
        let std_h = 0.1 + 4.0 * rng.uniform();
        let h64 = rng.shifted_tensor(&shape, 0.0, std_h)?;
        let b64 = rng.shifted_tensor(&[last], 0.0, 1.0)?;
        let c64 = rng.shifted_tensor(&shape, 0.0, 1.0)?;
        // Half an ulp is 2⁻⁹ (bf16) and 2⁻¹² (f16) of the value; allow a whole ulp, plus the f32
        // arithmetic's own error where GELU′ cancels in the tails (~1e-6 of the gradient).
        for (dt, rel) in [(DType::BF16, 1.0 / 128.0), (DType::F16, 1.0 / 1024.0)] {
            let who = format!("case {case}: {shape:?} {dt:?}");
            let on = |t: &Tensor| t.to_dtype(dt)?.to_device(&dev);
            let h = Var::from_tensor(&on(&h64)?)?;
            let (b, c) = (on(&b64)?, on(&c64)?);
            let y = bias_gelu_fused(&h, &b)?;
            let dh = (&y * &c)?.sum_all()?.backward()?;
            let dh = vec64(dh.get(&h).expect("dh"));
            let (hv, bv, cv) = (vec64(&h), vec64(&b), vec64(&c));
            let k = (2.0 / std::f64::consts::PI).sqrt();
            let tanh_u = |x: f64| (k * (x + 0.044715 * x * x * x)).tanh();
            let slope = |x: f64| {
                let t = tanh_u(x);
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x)
            };
            for (i, (&yi, &di)) in vec64(&y).iter().zip(&dh).enumerate() {
                let x = hv[i] + bv[i % last];
                let (want_y, want_d) = (0.5 * x * (1.0 + tanh_u(x)), cv[i] * slope(x));
                let tol_d = rel * want_d.abs() + 1e-5 * cv[i].abs().max(1.0);
                assert!(
                    (yi - want_y).abs() <= rel * want_y.abs() + 1e-5,
                    "{who}: y[{i}] {yi} vs {want_y}"
                );
                assert!(
                    (di - want_d).abs() <= tol_d,
                    "{who}: dh[{i}] {di} vs {want_d}"
                );
            }
        }
    }
    Ok(())
}

// ---- the causal softmax ----

/// The composed form: t0801's scale, grouped end-aligned causal mask, and softmax.
fn composed_softmax(
    scores: &Tensor,
    scale: f64,
    g: usize,
    n_q: usize,
    causal: bool,
) -> Result<Tensor> {
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
fn softmax_run(
    x: &Input,
    c: &Tensor,
    scale: f64,
    g: usize,
    n_q: usize,
    causal: bool,
    fused: bool,
) -> Result<(Tensor, Tensor)> {
    let v = x.view()?;
    let y = if fused {
        causal_softmax_fused(&v, scale, n_q, causal)?
    } else {
        composed_softmax(&v, scale, g, n_q, causal)?
    };
    let grads = (y.to_dtype(DType::F64)? * c)?.sum_all()?.backward()?;
    Ok((y, x.grad(&grads)?))
}

#[test]
fn fused_causal_softmax_equals_composed_masked_softmax_for_random_groups_and_lengths() -> Result<()>
{
    let dev = test_device();
    let mut rng = Rng::new(0x0806_0003);
    let (mut causal_cases, mut shorter) = (0, 0);
    for case in 0..cases() {
        let g = 1 + rng.below(3);
        let causal = rng.below(3) != 0;
        let n_k = 1 + rng.below(90);
        let n_q = if causal {
            1 + rng.below(n_k) // the queries are the last n_q of the n_k positions
        } else {
            1 + rng.below(90)
        };
        causal_cases += causal as usize;
        shorter += (n_q < n_k) as usize;
        let (b, h) = (1 + rng.below(2), 1 + rng.below(3));
        let scale = 0.05 + rng.uniform();
        let layout = Layout::draw(&mut rng);
        let shape = [b, h, g * n_q, n_k];
        let x64 = rng.shifted_tensor(&shape, 0.0, 4.0)?;
        let c = rng.shifted_tensor(&shape, 0.0, 1.0)?;
        let x_ref = Layout::Contiguous.input(&x64, DType::F64, &Device::Cpu)?;
        let (y_ref, dx_ref) = softmax_run(&x_ref, &c, scale, g, n_q, causal, false)?;
        let (y_ref, dx_ref) = (vec64(&y_ref), vec64(&dx_ref));
        let c_dev = c.to_device(&dev)?;
        for dt in dtypes(&dev, true) {
            let who = format!(
                "case {case}: g {g} n_q {n_q} n_k {n_k} causal {causal} batch ({b}, {h}) scale {scale:.3} {layout:?} {dt:?}"
            );
            let x = layout.input(&x64, dt, &dev)?;
            let (y, dx) = softmax_run(&x, &c_dev, scale, g, n_q, causal, true)?;
            assert_eq!((y.dtype(), y.dims()), (dt, &shape[..]), "{who}");
            assert_eq!(dx.dims(), &shape[..], "{who}: dx");
            let (yv, dxv) = (vec64(&y), vec64(&dx));
            // Against float64 composed (tolerances of tests/fused.rs).
            let t = match dt {
                DType::F64 => 1e-12,
                DType::F32 => 1e-5,
                DType::BF16 => 2e-2,
                _ => 3e-3,
            };
            let (ey, edx) = (max_rel(&yv, &y_ref), max_rel(&dxv, &dx_ref));
            assert!(
                ey <= t && edx <= t,
                "{who}: vs float64 y {ey:.2e}, dx {edx:.2e}"
            );
            if matches!(dt, DType::F32 | DType::F64) {
                // Against the composed form in the same dtype.
                let (yc, dxc) = softmax_run(&x, &c_dev, scale, g, n_q, causal, false)?;
                let (ey, edx) = (max_rel(&yv, &vec64(&yc)), max_rel(&dxv, &vec64(&dxc)));
                assert!(
                    ey <= t && edx <= t,
                    "{who}: vs composed y {ey:.2e}, dx {edx:.2e}"
                );
            }
            // Structure: every row sums to one; masked keys are exactly zero.
            for (r, row) in yv.chunks(n_k).enumerate() {
                let s: f64 = row.iter().sum();
                assert!(
                    (s - 1.0).abs() <= 4.0 * t.max(1e-6),
                    "{who}: row {r} sums to {s}"
                );
                if causal {
                    let last = (r % (g * n_q)) % n_q + n_k - n_q;
                    assert!(
                        row[last + 1..].iter().all(|&p| p == 0.0),
                        "{who}: row {r} attends past key {last}"
                    );
                }
            }
        }
    }
    assert!(causal_cases > 0 && causal_cases < cases() && shorter > 0);
    Ok(())
}

#[test]
fn fused_softmax_attention_kernel_equals_naive_kernel_with_random_groups() -> Result<()> {
    let dev = test_device();
    let mut rng = Rng::new(0x0806_0004);
    for case in 0..cases() / 2 {
        let n_kv = 1 + rng.below(3);
        let n_heads = n_kv * (1 + rng.below(3));
        let causal = rng.below(2) == 1;
        let n_k = 1 + rng.below(40);
        let n_q = if causal {
            1 + rng.below(n_k)
        } else {
            1 + rng.below(40)
        };
        let (b, d) = (1 + rng.below(2), rng.pick(&[4, 8, 16, 32]));
        let dt = rng.pick(&dtypes(&dev, false));
        let who = format!(
            "case {case}: b {b} heads {n_heads} kv {n_kv} n_q {n_q} n_k {n_k} d {d} causal {causal} {dt:?}"
        );
        let on = |t: Tensor| t.to_dtype(dt)?.to_device(&dev);
        let q = Var::from_tensor(&on(rng.shifted_tensor(&[b, n_heads, n_q, d], 0.0, 1.0)?)?)?;
        let k = Var::from_tensor(&on(rng.shifted_tensor(&[b, n_kv, n_k, d], 0.0, 1.0)?)?)?;
        let v = Var::from_tensor(&on(rng.shifted_tensor(&[b, n_kv, n_k, d], 0.0, 1.0)?)?)?;
        let c = on(rng.shifted_tensor(&[b, n_heads, n_q, d], 0.0, 1.0)?)?;
        let mask = if causal {
            AttnMask::Causal
        } else {
            AttnMask::None
        };
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let fused = FusedSoftmaxAttention.attend(qt, kt, vt, mask, None)?;
        let naive = NaiveAttention.attend(qt, kt, vt, mask, None)?;
        let e = max_rel(&vec64(&fused), &vec64(&naive));
        assert!(e <= tol(dt), "{who}: output {e:.2e}");
        let gf = (&fused * &c)?.sum_all()?.backward()?;
        let gn = (&naive * &c)?.sum_all()?.backward()?;
        for (name, var) in [("dq", &q), ("dk", &k), ("dv", &v)] {
            let (a, bb) = (
                vec64(gf.get(var.as_tensor()).expect("grad")),
                vec64(gn.get(var.as_tensor()).expect("grad")),
            );
            let e = max_rel(&a, &bb);
            assert!(e <= tol(dt), "{who}: {name} {e:.2e}");
        }
    }
    Ok(())
}

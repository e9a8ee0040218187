//! Candle's backward pass, as this project builds it (see `third_party/README.md`: candle-core
//! is patched so that the first gradient reaching a node is stored instead of being added into
//! fresh zeros). These tests check the gradients themselves, independently of Candle, against
//! float64 central finite differences and closed forms, through every accumulation path the
//! patch touches: single consumer, fan-in, the minus rules (first and later contributions),
//! broadcasts, reductions and views, and the matmul rule for transposed operands (`x · Wᵀ`'s
//! `dW` written in `W`'s layout).

use candle_core::{DType, Device, Result, Tensor, Var, D};

/// Set (to 1) by `upstream_accumulation_mode_passes_the_same_checks` when it reruns this test
/// binary: every test then runs with upstream's accumulation switched on.
const UPSTREAM_MODE: &str = "GRADIENT_TESTS_UPSTREAM_ACCUMULATION";

/// Whether this run checks upstream's accumulation; switches the patched backward accordingly.
fn upstream_mode() -> bool {
    let on = std::env::var(UPSTREAM_MODE).is_ok_and(|v| v == "1");
    candle_core::backprop::set_upstream_grad_accumulation(on);
    candle_core::backprop::set_upstream_matmul_grads(on);
    on
}

/// A scalar function of two inputs that uses each of them several times, through the rules
/// whose gradients carry a minus sign (`-`, `/`, `neg`, `cos`, `tanh`, `recip`), broadcasts,
/// a transpose + matmul, reductions, a narrow and a concatenation.
///
/// x: (3, 4), w: (4, 4).
fn tangle(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let h = x.matmul(&w.t()?)?; // (3, 4), x·Wᵀ
    let row_mean = h.mean_keepdim(D::Minus1)?; // (3, 1), broadcast back below
    let centred = h.broadcast_sub(&row_mean)?; // h used twice: fan-in through a minus rule
    let a = centred.tanh()?.neg()?; // minus rules, first contribution
    let b = (x.cos()? - &a)?; // x reused; `a` reaches a Sub's right-hand side
    let c = (b.sqr()? + 2.0)?.recip()?; // recip: another minus rule
    let d = (x / (w.narrow(0, 0, 3)?.sum_keepdim(1)?.abs()? + 1.0)?.broadcast_as((3, 4))?)?;
    let e = Tensor::cat(&[&c, &d], 1)?; // (3, 8)
    let rows = e.max_keepdim(1)?; // (3, 1), a max reduction
    (e.sum_all()? - rows.sum_all()?)? + (x.sub(&x.exp()?)?.sum_all()? - a.sum_all()?)?
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// Central finite difference of `f` with respect to every element of `at`, in float64.
fn finite_difference(
    f: &dyn Fn(&Tensor) -> Result<f64>,
    at: &Tensor,
    step: f64,
) -> Result<Vec<f64>> {
    let base: Vec<f64> = at.flatten_all()?.to_vec1()?;
    let mut gradient = Vec::with_capacity(base.len());
    for i in 0..base.len() {
        let mut plus = base.clone();
        let mut minus = base.clone();
        plus[i] += step;
        minus[i] -= step;
        let f_plus = f(&Tensor::from_vec(plus, at.shape(), at.device())?)?;
        let f_minus = f(&Tensor::from_vec(minus, at.shape(), at.device())?)?;
        gradient.push((f_plus - f_minus) / (2.0 * step));
    }
    Ok(gradient)
}

fn assert_close(name: &str, autograd: &[f64], numeric: &[f64]) {
    assert_eq!(autograd.len(), numeric.len(), "{name}: length");
    for (i, (a, n)) in autograd.iter().zip(numeric).enumerate() {
        let tolerance = 1e-6 * (1.0 + n.abs());
        assert!(
            (a - n).abs() <= tolerance,
            "{name}[{i}]: autograd {a} vs finite difference {n}"
        );
    }
}

#[test]
fn gradients_match_float64_finite_differences() -> Result<()> {
    upstream_mode();
    let device = Device::Cpu;
    // Fixed, irregular inputs (no ties for the max, no zeros for the abs).
    let values = |n: usize, seed: u64, scale: f64| -> Vec<f64> {
        (0..n as u64)
            .map(|i| scale * (((i * 7919 + seed * 104_729) % 1000) as f64 / 500.0 - 1.0 + 0.013))
            .collect()
    };
    let x0 = Tensor::from_vec(values(12, 1, 1.0), (3, 4), &device)?;
    let w0 = Tensor::from_vec(values(16, 2, 0.5), (4, 4), &device)?;
    let x = Var::from_tensor(&x0)?;
    let w = Var::from_tensor(&w0)?;
    let grads = tangle(x.as_tensor(), w.as_tensor())?.backward()?;
    let gx: Vec<f64> = grads
        .get(&x)
        .expect("x has a gradient")
        .flatten_all()?
        .to_vec1()?;
    let gw: Vec<f64> = grads
        .get(&w)
        .expect("w has a gradient")
        .flatten_all()?
        .to_vec1()?;

    let step = 1e-6;
    let fx = finite_difference(&|x| scalar(&tangle(x, &w0)?), &x0, step)?;
    let fw = finite_difference(&|w| scalar(&tangle(&x0, w)?), &w0, step)?;
    assert_close("dL/dx", &gx, &fx);
    assert_close("dL/dw", &gw, &fw);
    Ok(())
}

/// y = (a − b) + (c − b) + (b − a): b's gradient is −1 − 1 + 1 = −1 (a minus rule reaches b
/// first, then a second one, then a plus), a's is 1 − 1 = 0, c's is 1.
#[test]
fn fan_in_through_minus_rules_sums_every_contribution() -> Result<()> {
    upstream_mode();
    let device = Device::Cpu;
    let a = Var::new(&[1.5f64, -2.0], &device)?;
    let b = Var::new(&[0.25f64, 4.0], &device)?;
    let c = Var::new(&[3.0f64, 1.0], &device)?;
    let (a_, b_, c_) = (a.as_tensor(), b.as_tensor(), c.as_tensor());
    let y = ((a_ - b_)? + (c_ - b_)?)?.add(&(b_ - a_)?)?.sum_all()?;
    let grads = y.backward()?;
    let get = |v: &Var| -> Result<Vec<f64>> { grads.get(v).expect("gradient").to_vec1() };
    assert_eq!(get(&a)?, vec![0.0, 0.0]);
    assert_eq!(get(&b)?, vec![-1.0, -1.0]);
    assert_eq!(get(&c)?, vec![1.0, 1.0]);
    Ok(())
}

/// A variable read through a transpose and a broadcast gets a contiguous gradient of its own
/// shape, as upstream's zeros-plus-gradient always produced.
#[test]
fn gradients_of_views_are_contiguous_and_correct() -> Result<()> {
    upstream_mode();
    let device = Device::Cpu;
    let w = Var::new(&[[1f64, 2., 3.], [4., 5., 6.]], &device)?; // (2, 3)
    let bias = Var::new(&[10f64, 20.], &device)?; // (2,)
                                                  // y = Σ (Wᵀ + bias broadcast over rows)², Wᵀ is (3, 2)
    let y = w
        .as_tensor()
        .t()?
        .broadcast_add(bias.as_tensor())?
        .sqr()?
        .sum_all()?;
    let grads = y.backward()?;
    let gw = grads.get(&w).expect("w gradient");
    let gb = grads.get(&bias).expect("bias gradient");
    assert!(gw.is_contiguous() && gb.is_contiguous());
    assert_eq!(gw.dims(), &[2, 3]);
    // dy/dW[i][j] = 2 (W[i][j] + bias[i]); dy/dbias[i] = Σ_j 2 (W[i][j] + bias[i])
    assert_eq!(
        gw.to_vec2::<f64>()?,
        vec![vec![22., 24., 26.], vec![48., 50., 52.]]
    );
    assert_eq!(gb.to_vec1::<f64>()?, vec![72., 150.]);
    Ok(())
}

/// The patch is in force: the two operands of `a + b` receive the very same gradient tensor,
/// stored once, where upstream built two sums `0 + g`. Under
/// `MODULE08_UPSTREAM_GRAD_ACCUMULATION=1` they must be two tensors again.
#[test]
fn first_gradient_is_stored_without_a_zero_fill() -> Result<()> {
    let device = Device::Cpu;
    let a = Var::new(&[1f32, 2., 3.], &device)?;
    let b = Var::new(&[4f32, 5., 6.], &device)?;
    let grads = (a.as_tensor() + b.as_tensor())?.sum_all()?.backward()?;
    let ga = grads.get(&a).expect("a gradient");
    let gb = grads.get(&b).expect("b gradient");
    assert_eq!(ga.to_vec1::<f32>()?, vec![1., 1., 1.]);
    assert_eq!(gb.to_vec1::<f32>()?, vec![1., 1., 1.]);
    if upstream_mode() {
        assert_ne!(
            ga.id(),
            gb.id(),
            "upstream mode adds each gradient into zeros"
        );
    } else {
        assert_eq!(
            ga.id(),
            gb.id(),
            "patched candle-core stores the first gradient"
        );
    }
    Ok(())
}

/// A variable's gradient is stored detached: in `L = Σ tanh(x·Wᵀ)` with `x` tracked, `dW = dYᵀ·x`
/// would otherwise record its op and hold `dY` and `x` for as long as the gradient lives. Its
/// value is unchanged (`dW = (1 − tanh²(x·Wᵀ))ᵀ·x`, checked against a float64 closed form).
#[test]
fn variable_gradients_are_stored_without_their_graph() -> Result<()> {
    upstream_mode(); // in upstream's accumulation mode too: detaching is not how gradients add up
    let device = Device::Cpu;
    let values = |n: usize, seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 + seed * 11) % 17) as f32 / 10.0 - 0.8)
            .collect()
    };
    let x = Var::from_vec(values(3 * 4, 1), (3, 4), &device)?;
    let w = Var::from_vec(values(5 * 4, 2), (5, 4), &device)?;
    let h = x.matmul(&w.t()?)?; // (3, 5)
    let grads = h.tanh()?.sum_all()?.backward()?;
    let (gx, gw) = (grads.get(&x).expect("dx"), grads.get(&w).expect("dW"));
    let want: Vec<f64> = {
        let (x, w) = (x.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        let dy = |i: usize, j: usize| {
            let s: f64 = (0..4).map(|k| x[i][k] as f64 * w[j][k] as f64).sum();
            1.0 - s.tanh().powi(2)
        };
        let dw = |j: usize, k: usize| (0..3).map(|i| dy(i, j) * x[i][k] as f64).sum::<f64>();
        (0..5)
            .flat_map(|j| (0..4).map(move |k| (j, k)))
            .map(|(j, k)| dw(j, k))
            .collect()
    };
    let got: Vec<f64> = gw.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
    assert_close("dW", &got, &want);
    assert!(!gw.track_op(), "dW keeps the graph that computed it");
    assert!(!gx.track_op(), "dx keeps the graph that computed it");
    Ok(())
}

/// Products against transposed views, every case of the matmul rule: `x · Wᵀ` (the
/// projection), `aᵀ · x` (a transposed left operand), a batched `q · kᵀ`, and a `Wᵀ` that is
/// also read by another op (its gradient then reaches `W` through both paths).
///
/// x: (3, 4), w: (5, 4), a: (3, 2), q: (2, 3, 4), k: (2, 5, 4).
fn transposed_products(vars: &[Tensor]) -> Result<Tensor> {
    let [x, w, a, q, k] = vars else {
        candle_core::bail!("five inputs")
    };
    let wt = w.t()?; // (4, 5), read twice
    let projection = x.matmul(&wt)?.tanh()?.sum_all()?; // (3, 5)
    let other_reader = wt.exp()?.sum_all()?;
    let left = a.t()?.matmul(x)?.sqr()?.sum_all()?; // (2, 4)
    let scores = q.matmul(&k.t()?)?.sin()?.sum_all()?; // (2, 3, 5)
    let gram = x.matmul(&x.t()?)?.cos()?.sum_all()?; // (3, 3): x on both sides, one transposed
    (((projection + other_reader)? + left)? + scores)? + gram
}

#[test]
fn matmul_against_transposed_views_matches_finite_differences() -> Result<()> {
    upstream_mode();
    let device = Device::Cpu;
    let shapes: [&[usize]; 5] = [&[3, 4], &[5, 4], &[3, 2], &[2, 3, 4], &[2, 5, 4]];
    let inputs: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, shape)| {
            let n: usize = shape.iter().product();
            let v: Vec<f64> = (0..n)
                .map(|j| (((j * 37 + i * 11) % 17) as f64 / 17.0 - 0.45) * 0.8)
                .collect();
            Tensor::from_vec(v, *shape, &device)
        })
        .collect::<Result<_>>()?;
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = transposed_products(&tensors)?.backward()?;
    for (i, name) in ["x", "w", "a", "q", "k"].iter().enumerate() {
        let g = grads.get(&vars[i]).expect("every input has a gradient");
        assert!(g.is_contiguous(), "d{name} is contiguous");
        let at = |t: &Tensor| -> Result<f64> {
            let mut vs = inputs.clone();
            vs[i] = t.clone();
            scalar(&transposed_products(&vs)?)
        };
        let numeric = finite_difference(&at, &inputs[i], 1e-6)?;
        assert_close(
            &format!("d/d{name}"),
            &g.flatten_all()?.to_vec1()?,
            &numeric,
        );
    }
    // The projection alone, whose dW has a closed form.
    let x = vars[0].as_tensor();
    let grads = x.matmul(&vars[1].as_tensor().t()?)?.sum_all()?.backward()?;
    let gw = grads.get(&vars[1]).expect("dW");
    // d(Σ x·Wᵀ)/dW[o][i] = Σ_rows x[row][i]: every row of dW is x's column sums.
    let column_sums: Vec<f64> = x.sum(0)?.to_vec1()?;
    for row in gw.to_vec2::<f64>()? {
        assert_close("dW row", &row, &column_sums);
    }
    Ok(())
}

/// Both modes pass the same checks: rerun this file's other tests in a child process with
/// upstream's zeros-then-add accumulation and upstream's matmul rule switched on.
#[test]
fn upstream_accumulation_mode_passes_the_same_checks() {
    if upstream_mode() {
        println!("upstream mode: this is the child process (or the variable was set by hand)");
        return;
    }
    let exe = std::env::current_exe().expect("test executable");
    let output = std::process::Command::new(exe)
        .env(UPSTREAM_MODE, "1")
        .args(["--test-threads", "1"])
        .output()
        .expect("rerun the gradient tests");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the gradient tests fail with {UPSTREAM_MODE}=1:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for name in [
        "gradients_match_float64_finite_differences",
        "fan_in_through_minus_rules_sums_every_contribution",
        "gradients_of_views_are_contiguous_and_correct",
        "first_gradient_is_stored_without_a_zero_fill",
        "a_first_gradient_of_the_wrong_shape_is_an_error",
        "matmul_against_transposed_views_matches_finite_differences",
    ] {
        assert!(
            stdout.contains(&format!("test {name} ... ok")),
            "{name} did not pass in upstream mode:\n{stdout}"
        );
    }
}

/// An op whose backward returns a gradient of the wrong shape: an error, as upstream's
/// `zeros + grad` made it, not a silently stored gradient.
struct WrongShapeBackward;

impl candle_core::CustomOp1 for WrongShapeBackward {
    fn name(&self) -> &'static str {
        "wrong-shape-backward"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((storage.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let wrong = grad_res.flatten_all()?.narrow(0, 0, arg.elem_count() - 1)?;
        Ok(Some(wrong))
    }
}

#[test]
fn a_first_gradient_of_the_wrong_shape_is_an_error() -> Result<()> {
    upstream_mode();
    let x = Var::new(&[1f32, 2., 3., 4.], &Device::Cpu)?;
    let y = x.as_tensor().apply_op1(WrongShapeBackward)?.sum_all()?;
    let err = y
        .backward()
        .expect_err("a wrong-shape gradient must not be stored");
    assert!(err.to_string().contains("shape mismatch"), "{err}");
    Ok(())
}

//! The fused causal softmax: values and gradients equal t0801's composed scale, mask and softmax
//! (f64 on the CPU to 1e-12; f32 and bf16 everywhere; on the GPU with `MODULE08_TEST_DEVICE=cuda`),
//! for grouped rows, queries that are the last of more keys, rows longer than a warp, and no mask;
//! naive attention with it equals t0807's naive grouped attention; bad arguments are errors.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use t0801_self_attention::{mask_scores, softmax_last_dim};
use t0806_modern_blocks::{causal_softmax_fused, fused_softmax_kernel};
use t0807_grouped_query_attention::{grouped_causal_mask, naive_grouped_attention};

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
fn run(
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
    let dev = shared::device::test_device();
    let dtypes: &[(DType, f64)] = if dev.is_cuda() {
        &[(DType::F32, 1e-5), (DType::BF16, 2e-2)]
    } else {
        &[(DType::F64, 1e-12), (DType::F32, 1e-5), (DType::BF16, 2e-2)]
    };
    // (heads per group, queries, keys, causal): square; queries the last 5 of 9 keys, grouped;
    // no mask; one query (decoding); rows of more than 32 keys (several per lane).
    for (g, n_q, n_k, causal) in [
        (1, 7, 7, true),
        (2, 5, 9, true),
        (3, 4, 4, false),
        (1, 1, 40, true),
        (2, 33, 70, true),
    ] {
        let x64 =
            (Tensor::randn(0f64, 4.0, (2, 3, g * n_q, n_k), &Device::Cpu)?).to_device(&dev)?;
        let c = Tensor::randn(0f64, 1.0, (2, 3, g * n_q, n_k), &Device::Cpu)?.to_device(&dev)?;
        let scale = 0.3;
        // The reference in f64 with the composed ops.
        let (y_ref, dx_ref) = run(
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
            let (y, dx) = run(&x, &c, scale, g, n_q, causal, true)?;
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
fn naive_attention_with_fused_softmax_equals_naive_grouped_attention() -> Result<()> {
    let dev = shared::device::test_device();
    let (b, h, kv, n, d) = (2, 4, 2, 9, 8);
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, kv, n, d), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, kv, n, d), &dev)?)?;
    let c = Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?;
    for causal in [true, false] {
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let fused = fused_softmax_kernel(qt, kt, vt, causal)?;
        let naive = naive_grouped_attention(qt, kt, vt, causal)?;
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
fn bad_arguments_are_errors() -> Result<()> {
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

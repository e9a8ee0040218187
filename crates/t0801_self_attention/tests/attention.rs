//! Scaled dot-product attention against a float64 triple loop, and the properties that define it.

use candle_core::{DType, Result, Tensor, Var, D};
use shared::device::test_device;
use t0801_self_attention::*;

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
    let den = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
    Ok(num / den.max(1e-30))
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    t.to_dtype(DType::F64)?.to_vec2::<f64>()
}

/// Compares a 4-D (batch, heads, n_q, n_k) attention with the reference for every (batch, head).
fn check_against_reference(
    b: usize,
    h: usize,
    n_q: usize,
    n_k: usize,
    d: usize,
    mask: Option<&Tensor>,
) -> Result<()> {
    let dev = test_device();
    let q = Tensor::randn(0f32, 1.0, (b, h, n_q, d), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (b, h, n_k, d), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (b, h, n_k, d + 3), &dev)?;
    let att = scaled_dot_product_attention(&q, &k, &v, mask)?;
    assert_eq!(att.output.dims(), &[b, h, n_q, d + 3]);
    assert_eq!(att.weights.dims(), &[b, h, n_q, n_k]);
    let full_mask = match mask {
        Some(m) => Some(m.broadcast_as((b, h, n_q, n_k))?.contiguous()?),
        None => None,
    };
    for bi in 0..b {
        for hi in 0..h {
            let pick = |t: &Tensor| t.get(bi)?.get(hi);
            let m: Option<Vec<Vec<bool>>> = match &full_mask {
                Some(m) => Some(
                    pick(m)?
                        .to_vec2::<u8>()?
                        .into_iter()
                        .map(|r| r.into_iter().map(|x| x == 1).collect())
                        .collect(),
                ),
                None => None,
            };
            let (want_out, want_w) = reference_attention(
                &rows(&pick(&q)?)?,
                &rows(&pick(&k)?)?,
                &rows(&pick(&v)?)?,
                m.as_deref(),
            );
            let got_out = rows(&pick(&att.output)?)?;
            let got_w = rows(&pick(&att.weights)?)?;
            for (g, w) in got_out.iter().flatten().zip(want_out.iter().flatten()) {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "output {g} vs {w}");
            }
            for (g, w) in got_w.iter().flatten().zip(want_w.iter().flatten()) {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "weight {g} vs {w}");
            }
        }
    }
    Ok(())
}

#[test]
fn matches_float64_reference_without_mask() -> Result<()> {
    check_against_reference(2, 3, 5, 5, 8, None)
}

#[test]
fn matches_reference_with_fewer_queries_than_keys() -> Result<()> {
    check_against_reference(1, 2, 3, 7, 16, None)
}

#[test]
fn matches_reference_with_causal_mask() -> Result<()> {
    let mask = causal_mask(6, 6, &test_device())?;
    check_against_reference(2, 2, 6, 6, 4, Some(&mask))
}

#[test]
fn matches_reference_with_padding_and_a_row_allowed_only_one_key() -> Result<()> {
    // Batch 0: keys 0..3 real; batch 1: only key 0 real, so every row attends one key.
    let key_mask = Tensor::new(&[[1u8, 1, 1, 0, 0], [1, 0, 0, 0, 0]], &test_device())?;
    let mask = key_padding_mask(&key_mask)?;
    check_against_reference(2, 2, 4, 5, 8, Some(&mask))?;
    // The lone allowed key gets weight exactly 1 and the output is its value.
    let dev = test_device();
    let q = Tensor::randn(0f32, 1.0, (2, 1, 4, 8), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (2, 1, 5, 8), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (2, 1, 5, 8), &dev)?;
    let att = scaled_dot_product_attention(&q, &k, &v, Some(&mask))?;
    let w = att.weights.get(1)?.get(0)?.to_vec2::<f32>()?;
    assert!(w
        .iter()
        .all(|r| r[0] == 1.0 && r[1..].iter().all(|x| *x == 0.0)));
    let v0 = v.get(1)?.get(0)?.get(0)?.to_vec1::<f32>()?;
    for row in att.output.get(1)?.get(0)?.to_vec2::<f32>()? {
        assert_eq!(row, v0);
    }
    Ok(())
}

#[test]
fn works_on_3d_inputs() -> Result<()> {
    let dev = test_device();
    let q = Tensor::randn(0f32, 1.0, (2, 4, 8), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (2, 6, 8), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (2, 6, 5), &dev)?;
    let a3 = scaled_dot_product_attention(&q, &k, &v, None)?;
    let a4 =
        scaled_dot_product_attention(&q.unsqueeze(1)?, &k.unsqueeze(1)?, &v.unsqueeze(1)?, None)?;
    assert!(rel_err(&a3.output, &a4.output.squeeze(1)?)? < 1e-6);
    Ok(())
}

#[test]
fn weights_rows_sum_to_one() -> Result<()> {
    let dev = test_device();
    let q = Tensor::randn(0f32, 3.0, (3, 2, 9, 16), &dev)?;
    let k = Tensor::randn(0f32, 3.0, (3, 2, 9, 16), &dev)?;
    let mask = causal_mask(9, 9, &dev)?;
    let att = scaled_dot_product_attention(&q, &k, &k, Some(&mask))?;
    let sums = att
        .weights
        .sum(D::Minus1)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
    Ok(())
}

#[test]
fn self_attention_is_permutation_equivariant() -> Result<()> {
    // Without positions, permuting the tokens permutes the outputs the same way: attention alone
    // cannot see order (the motivation of 8-03).
    let dev = test_device();
    let vb_map = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vb_map, DType::F32, &dev);
    let layer = SelfAttention::new(vb, 16, 8, 8)?;
    let x = Tensor::randn(0f32, 1.0, (1, 7, 16), &dev)?;
    let perm: Vec<u32> = vec![3, 0, 6, 1, 5, 2, 4];
    let idx = Tensor::new(perm.as_slice(), &dev)?;
    let out = layer.forward(&x, None)?.output;
    let out_of_permuted = layer.forward(&x.index_select(&idx, 1)?, None)?.output;
    let permuted_out = out.index_select(&idx, 1)?;
    assert!(rel_err(&out_of_permuted, &permuted_out)? < 1e-6);
    Ok(())
}

#[test]
fn gradient_of_the_layer_matches_finite_differences_in_f64() -> Result<()> {
    let dev = test_device();
    let (d_model, d_k, n) = (6, 4, 5);
    let w_q = Var::randn(0f64, 0.5, (d_k, d_model), &dev)?;
    let w_k = Var::randn(0f64, 0.5, (d_k, d_model), &dev)?;
    let w_v = Var::randn(0f64, 0.5, (d_k, d_model), &dev)?;
    let x = Var::randn(0f64, 1.0, (2, n, d_model), &dev)?;
    let probe = Tensor::randn(0f64, 1.0, (2, n, d_k), &dev)?;
    let mask = causal_mask(n, n, &dev)?;
    let loss = |wq: &Tensor, wk: &Tensor, wv: &Tensor, x: &Tensor| -> Result<Tensor> {
        let layer = SelfAttention::from_weights(wq.clone(), wk.clone(), wv.clone())?;
        (layer.forward(x, Some(&mask))?.output * &probe)?.sum_all()
    };
    let l = loss(&w_q, &w_k, &w_v, &x)?;
    let grads = l.backward()?;
    let eps = 1e-6;
    let vars = [&w_q, &w_k, &w_v, &x];
    for (vi, var) in vars.iter().enumerate() {
        let analytic = grads
            .get(var.as_tensor())
            .expect("gradient")
            .flatten_all()?
            .to_vec1::<f64>()?;
        let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        for i in (0..base.len()).step_by(3) {
            let eval = |delta: f64| -> Result<f64> {
                let mut p = base.clone();
                p[i] += delta;
                let t = Tensor::from_vec(p, var.shape(), &dev)?;
                let mut args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                args[vi] = t;
                loss(&args[0], &args[1], &args[2], &args[3])?.to_scalar::<f64>()
            };
            let numeric = (eval(eps)? - eval(-eps)?) / (2.0 * eps);
            let err = (numeric - analytic[i]).abs() / (1.0 + analytic[i].abs());
            assert!(
                err < 1e-6,
                "var {vi} elem {i}: numeric {numeric} analytic {}",
                analytic[i]
            );
        }
    }
    Ok(())
}

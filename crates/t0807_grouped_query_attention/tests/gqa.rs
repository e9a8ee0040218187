//! Grouped-query attention against t0802's MHA, a repeated-K/V MHA, and a float64 reference.

use candle_core::{DType, Result, Tensor};
use shared::device::test_device;
use std::sync::Arc;
use t0801_self_attention::{causal_mask, reference_attention, scaled_dot_product_attention};
use t0802_multi_head_attention::MultiHeadAttention;
use t0807_grouped_query_attention::*;
use t0808_rope::{RopeScaling, RopeTables};

fn randn(shape: (usize, usize)) -> Result<Tensor> {
    Tensor::randn(0f32, 0.3, shape, &test_device())
}

fn max_rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let b = b.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    assert_eq!(a.len(), b.len());
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f64::max))
}

/// Repeats each K/V head block of rows `g` times: `(n_kv·d_head, d)` → `(n_kv·g·d_head, d)`.
fn repeat_rows(w: &Tensor, n_kv: usize, g: usize) -> Result<Tensor> {
    let (rows, d) = w.dims2()?;
    let dh = rows / n_kv;
    w.reshape((n_kv, 1, dh, d))?
        .broadcast_as((n_kv, g, dh, d))?
        .contiguous()?
        .reshape((n_kv * g * dh, d))
}

#[test]
fn gqa_with_all_kv_heads_equals_t0802_mha() -> Result<()> {
    let (d, h, b, n) = (32, 4, 2, 7);
    let (wq, wk, wv, wo) = (
        randn((d, d))?,
        randn((d, d))?,
        randn((d, d))?,
        randn((d, d))?,
    );
    let gqa = GroupedQueryAttention::from_weights(
        h,
        h,
        wq.clone(),
        wk.clone(),
        wv.clone(),
        wo.clone(),
        None,
    )?;
    let mha = MultiHeadAttention::from_weights(h, wq, wk, wv, wo)?;
    let x = Tensor::randn(0f32, 1.0, (b, n, d), &test_device())?;
    let mask = causal_mask(n, n, &test_device())?;
    let want = mha.forward(&x, Some(&mask))?.output;
    let got = gqa.forward(&x, 0)?;
    assert!(max_rel(&got, &want)? < 1e-5);
    Ok(())
}

#[test]
fn gqa_equals_mha_with_repeated_kv_weights() -> Result<()> {
    let (d, h, b, n) = (48, 6, 2, 9);
    for n_kv in [1, 2, 3] {
        let g = h / n_kv;
        let dh = d / h;
        let (wq, wo) = (randn((d, d))?, randn((d, d))?);
        let (wk, wv) = (randn((n_kv * dh, d))?, randn((n_kv * dh, d))?);
        let gqa = GroupedQueryAttention::from_weights(
            h,
            n_kv,
            wq.clone(),
            wk.clone(),
            wv.clone(),
            wo.clone(),
            None,
        )?;
        let mha = MultiHeadAttention::from_weights(
            h,
            wq,
            repeat_rows(&wk, n_kv, g)?,
            repeat_rows(&wv, n_kv, g)?,
            wo,
        )?;
        let x = Tensor::randn(0f32, 1.0, (b, n, d), &test_device())?;
        let mask = causal_mask(n, n, &test_device())?;
        let want = mha.forward(&x, Some(&mask))?.output;
        let got = gqa.forward(&x, 0)?;
        assert!(max_rel(&got, &want)? < 1e-5, "n_kv {n_kv}");
        // and mean-pooling the repeated weights recovers the grouped ones exactly
        let pooled = mean_pool_kv_heads(&repeat_rows(&wk, n_kv, g)?, h, n_kv)?;
        assert!(max_rel(&pooled, &wk)? < 1e-6);
    }
    Ok(())
}

#[test]
fn grouped_kernel_equals_repeat_kv_kernel_including_decode_offsets() -> Result<()> {
    let (b, h, n_kv, n_q, n_k, dh) = (2, 8, 2, 3, 10, 16);
    let dev = test_device();
    let q = Tensor::randn(0f32, 1.0, (b, h, n_q, dh), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (b, n_kv, n_k, dh), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (b, n_kv, n_k, dh), &dev)?;
    let got = naive_grouped_attention(&q, &k, &v, true)?;
    let mask = causal_mask(n_q, n_k, &dev)?;
    let want =
        scaled_dot_product_attention(&q, &repeat_kv(&k, 4)?, &repeat_kv(&v, 4)?, Some(&mask))?
            .output;
    assert!(max_rel(&got, &want)? < 1e-5);
    Ok(())
}

#[test]
fn mqa_and_gqa_match_f64_reference_with_rope() -> Result<()> {
    let (d, h, b, n) = (32, 4, 1, 6);
    let dh = d / h;
    for n_kv in [1, 2] {
        let g = h / n_kv;
        let (wq, wo) = (randn((d, d))?, randn((d, d))?);
        let (wk, wv) = (randn((n_kv * dh, d))?, randn((n_kv * dh, d))?);
        let rope = Arc::new(RopeTables::new(
            dh,
            64,
            10_000.0,
            RopeScaling::None,
            &test_device(),
        )?);
        let gqa = GroupedQueryAttention::from_weights(
            h,
            n_kv,
            wq.clone(),
            wk.clone(),
            wv.clone(),
            wo.clone(),
            Some(rope),
        )?;
        let x = Tensor::randn(0f32, 1.0, (b, n, d), &test_device())?;
        let start = 5;
        let got = gqa.forward(&x, start)?.squeeze(0)?; // (n, d)

        // f64 reference: project, rotate each head vector, attend per head, concatenate, W_o.
        let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
        let (xs, wq, wk, wv, wo) = (
            to64(&x.squeeze(0)?),
            to64(&wq),
            to64(&wk),
            to64(&wv),
            to64(&wo),
        );
        let proj = |w: &Vec<Vec<f64>>, t: usize| -> Vec<f64> {
            w.iter()
                .map(|row| row.iter().zip(&xs[t]).map(|(a, b)| a * b).sum())
                .collect()
        };
        let mask: Vec<Vec<bool>> = (0..n).map(|i| (0..n).map(|j| j <= i).collect()).collect();
        let mut concat = vec![vec![0.0; d]; n];
        for head in 0..h {
            let kvh = head / g;
            let rot =
                |v: &[f64], t: usize| t0808_rope::reference_rope(v, (start + t) as f64, 10_000.0);
            let q: Vec<Vec<f64>> = (0..n)
                .map(|t| rot(&proj(&wq, t)[head * dh..(head + 1) * dh], t))
                .collect();
            let k: Vec<Vec<f64>> = (0..n)
                .map(|t| rot(&proj(&wk, t)[kvh * dh..(kvh + 1) * dh], t))
                .collect();
            let v: Vec<Vec<f64>> = (0..n)
                .map(|t| proj(&wv, t)[kvh * dh..(kvh + 1) * dh].to_vec())
                .collect();
            let (out, _) = reference_attention(&q, &k, &v, Some(&mask));
            for t in 0..n {
                concat[t][head * dh..(head + 1) * dh].copy_from_slice(&out[t]);
            }
        }
        let want: Vec<f64> = concat
            .iter()
            .flat_map(|c| {
                wo.iter()
                    .map(|row| row.iter().zip(c).map(|(a, b)| a * b).sum::<f64>())
                    .collect::<Vec<_>>()
            })
            .collect();
        let want = Tensor::from_vec(want, (n, d), &test_device())?;
        assert!(max_rel(&got, &want)? < 1e-5, "n_kv {n_kv}");
    }
    Ok(())
}

#[test]
fn shape_errors_are_clear() -> Result<()> {
    let d = 32;
    let e = GroupedQueryAttention::from_weights(
        4,
        3,
        randn((d, d))?,
        randn((24, d))?,
        randn((24, d))?,
        randn((d, d))?,
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("n_kv_heads (3) must divide n_heads (4)"), "{e}");
    let e = GroupedQueryAttention::from_weights(
        4,
        2,
        randn((d, d))?,
        randn((8, d))?,
        randn((16, d))?,
        randn((d, d))?,
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("W_k has shape [8, 32], expected (16, 32)"),
        "{e}"
    );
    Ok(())
}

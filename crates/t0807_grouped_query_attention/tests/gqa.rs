//! Grouped-query attention as 8-02's attention component with `n_kv_heads < n_heads`: against
//! MHA with repeated K/V heads, the repeat-K/V kernel, and a float64 reference.
//! (RoPE with grouped K/V heads is tested in 8-08, the topic that brings RoPE.)

use candle_core::{DType, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use shared::device::test_device;
use t0802_multi_head_attention::{causal_mask, AttentionKernel, AttnMask};
use t0807_grouped_query_attention::*;

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

/// The component's self-attention (through its kernel, causal, no cache) at position 0.
fn causal_self_attention(attn: &MultiHeadAttention, x: &Tensor) -> Result<Tensor> {
    attn.self_attention(x, AttnMask::Causal, 0, None)
}

#[test]
fn config_with_kv_heads_sizes_the_k_v_projections() -> Result<()> {
    let (d, h) = (32, 8);
    for kv in [8, 4, 2, 1] {
        let cfg = MhaConfig::new(d, h).with_kv_heads(kv);
        assert_eq!(cfg, gqa_config(d, h, kv));
        let varmap = VarMap::new();
        let attn = MultiHeadAttention::new(
            VarBuilder::from_varmap(&varmap, DType::F32, &test_device()),
            cfg,
        )?;
        assert_eq!(attn.w_q.dims(), &[d, d]);
        assert_eq!(attn.w_k.dims(), &[kv * d / h, d]);
        assert_eq!(attn.w_v.dims(), &[kv * d / h, d]);
        assert_eq!(shared::params::count_params(&varmap), cfg.n_params());
    }
    Ok(())
}

#[test]
fn gqa_with_all_kv_heads_equals_the_inspection_path_of_mha() -> Result<()> {
    let (d, h, b, n) = (32, 4, 2, 7);
    let mha = MultiHeadAttention::from_weights(
        h,
        randn((d, d))?,
        randn((d, d))?,
        randn((d, d))?,
        randn((d, d))?,
    )?;
    assert_eq!(mha.cfg.n_kv_heads, h);
    let x = Tensor::randn(0f32, 1.0, (b, n, d), &test_device())?;
    let mask = causal_mask(n, n, &test_device())?;
    let want = mha.forward(&x, Some(&mask))?.output;
    let got = causal_self_attention(&mha, &x)?;
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
        let gqa =
            MultiHeadAttention::from_weights(h, wq.clone(), wk.clone(), wv.clone(), wo.clone())?;
        assert_eq!(gqa.cfg.n_kv_heads, n_kv, "n_kv read from W_k's rows");
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
        // the grouped kernel path and the inspection path (which repeats K/V heads) agree
        let got = causal_self_attention(&gqa, &x)?;
        assert!(max_rel(&got, &want)? < 1e-5, "n_kv {n_kv}");
        let inspected = gqa.forward(&x, Some(&mask))?;
        assert!(max_rel(&inspected.output, &want)? < 1e-5, "n_kv {n_kv}");
        assert_eq!(inspected.weights.dims(), &[b, h, n, n]);
        // and mean-pooling the repeated weights recovers the grouped ones exactly
        let pooled = mean_pool_kv_heads(&repeat_rows(&wk, n_kv, g)?, h, n_kv)?;
        assert!(max_rel(&pooled, &wk)? < 1e-6);
    }
    Ok(())
}

#[test]
fn mean_pooled_mha_is_the_gqa_layer_of_the_pooled_weights() -> Result<()> {
    // Uptraining's starting point: pool a trained MHA's K/V heads; the result is an ordinary
    // grouped layer whose K/V head j is the mean of the group's heads.
    let (d, h, n_kv) = (32, 8, 2);
    let (wq, wk, wv, wo) = (
        randn((d, d))?,
        randn((d, d))?,
        randn((d, d))?,
        randn((d, d))?,
    );
    let pooled_k = mean_pool_kv_heads(&wk, h, n_kv)?;
    let pooled_v = mean_pool_kv_heads(&wv, h, n_kv)?;
    assert_eq!(pooled_k.dims(), &[n_kv * d / h, d]);
    let dh = d / h;
    let g = h / n_kv;
    for j in 0..n_kv {
        let want = wk
            .narrow(0, j * g * dh, g * dh)?
            .reshape((g, dh, d))?
            .mean(0)?;
        let got = pooled_k.narrow(0, j * dh, dh)?;
        assert!(max_rel(&got, &want)? < 1e-6, "K/V head {j}");
    }
    let gqa = MultiHeadAttention::from_weights(h, wq, pooled_k, pooled_v, wo)?;
    assert_eq!(gqa.cfg, gqa_config(d, h, n_kv));
    let e = mean_pool_kv_heads(&wk, h, 3).unwrap_err().to_string();
    assert!(e.contains("into 3 K/V heads"), "{e}");
    Ok(())
}

#[test]
fn grouped_kernel_equals_repeat_kv_kernel_including_decode_offsets() -> Result<()> {
    let (b, h, n_kv, n_q, n_k, dh) = (2, 8, 2, 3, 10, 16);
    let dev = test_device();
    let q = Tensor::randn(0f32, 1.0, (b, h, n_q, dh), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (b, n_kv, n_k, dh), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (b, n_kv, n_k, dh), &dev)?;
    let got = NaiveAttention.attend(&q, &k, &v, AttnMask::Causal, None)?;
    let mask = causal_mask(n_q, n_k, &dev)?;
    let want = NaiveAttention
        .attend_with_weights(
            &q,
            &repeat_kv(&k, 4)?,
            &repeat_kv(&v, 4)?,
            AttnMask::Explicit(&mask),
            None,
        )?
        .output;
    assert!(max_rel(&got, &want)? < 1e-5);
    Ok(())
}

/// `softmax(q·kᵀ/√d, causal)·v` for one head, in f64.
fn reference_head(q: &[Vec<f64>], k: &[Vec<f64>], v: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let scale = 1.0 / (q[0].len() as f64).sqrt();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    q.iter()
        .enumerate()
        .map(|(i, qi)| {
            let s: Vec<f64> = (0..=i).map(|j| dot(qi, &k[j]) * scale).collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            (0..v[0].len())
                .map(|c| (0..=i).map(|j| e[j] / z * v[j][c]).sum())
                .collect()
        })
        .collect()
}

#[test]
fn mqa_and_gqa_match_f64_reference() -> Result<()> {
    let (d, h, b, n) = (32, 4, 1, 6);
    let dh = d / h;
    for n_kv in [1, 2] {
        let g = h / n_kv;
        let (wq, wo) = (randn((d, d))?, randn((d, d))?);
        let (wk, wv) = (randn((n_kv * dh, d))?, randn((n_kv * dh, d))?);
        let gqa =
            MultiHeadAttention::from_weights(h, wq.clone(), wk.clone(), wv.clone(), wo.clone())?;
        let x = Tensor::randn(0f32, 1.0, (b, n, d), &test_device())?;
        let got = causal_self_attention(&gqa, &x)?.squeeze(0)?; // (n, d)

        // f64 reference: project, attend per head with K/V head ⌊head/g⌋, concatenate, W_o.
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
        let mut concat = vec![vec![0.0; d]; n];
        for head in 0..h {
            let kvh = head / g;
            let slice = |w: &Vec<Vec<f64>>, j: usize| -> Vec<Vec<f64>> {
                (0..n)
                    .map(|t| proj(w, t)[j * dh..(j + 1) * dh].to_vec())
                    .collect()
            };
            let out = reference_head(&slice(&wq, head), &slice(&wk, kvh), &slice(&wv, kvh));
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
    // W_k of 24 rows = 3 K/V heads of 8, which cannot serve 4 query heads
    let e = MultiHeadAttention::from_weights(
        4,
        randn((d, d))?,
        randn((24, d))?,
        randn((24, d))?,
        randn((d, d))?,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("n_kv_heads (3) must divide n_heads (4)"), "{e}");
    // W_k says 2 K/V heads, W_v has the rows of 1
    let e = MultiHeadAttention::from_weights(
        4,
        randn((d, d))?,
        randn((16, d))?,
        randn((8, d))?,
        randn((d, d))?,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("W_v has shape [8, 32], expected (16, 32)"),
        "{e}"
    );
    let e = MultiHeadAttention::from_weights(
        4,
        randn((d, d))?,
        randn((12, d))?,
        randn((12, d))?,
        randn((d, d))?,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("W_k has 12 rows, not a multiple of d_head 8"),
        "{e}"
    );
    Ok(())
}

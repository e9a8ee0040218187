//! Multi-head attention against single-head attention (t0801), a float64 per-head reference, and
//! the properties that define it: the divisibility error, causality, head gates, biases.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use shared::compare::max_abs_diff;
use shared::device::test_device;
use t0801_self_attention::{reference_attention, SelfAttention};
use t0802_multi_head_attention::*;

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
    let den = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
    Ok(num / den.max(1e-30))
}

/// Random `(d, d)` matrices scaled like the CS336 init (std ≈ 1/√d).
fn random_weights(d: usize, dev: &Device) -> Result<[Tensor; 4]> {
    let std = 1.0 / (d as f32).sqrt();
    Ok([
        Tensor::randn(0f32, std, (d, d), dev)?,
        Tensor::randn(0f32, std, (d, d), dev)?,
        Tensor::randn(0f32, std, (d, d), dev)?,
        Tensor::randn(0f32, std, (d, d), dev)?,
    ])
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    t.to_dtype(DType::F64)?.to_vec2::<f64>()
}

/// `x (n, d_in) · Wᵀ (+ b)` in float64.
fn matmul_t(x: &[Vec<f64>], w: &[Vec<f64>], b: Option<&[f64]>) -> Vec<Vec<f64>> {
    x.iter()
        .map(|xr| {
            w.iter()
                .enumerate()
                .map(|(o, wr)| {
                    xr.iter().zip(wr).map(|(a, c)| a * c).sum::<f64>() + b.map_or(0.0, |b| b[o])
                })
                .collect()
        })
        .collect()
}

/// Float64 multi-head attention built head by head from `reference_attention`:
/// headᵢ = Attention(x·W_qᵢᵀ, x·W_kᵢᵀ, x·W_vᵢᵀ) on rows `i·d_head..(i+1)·d_head`, then
/// Concat(heads)·W_oᵀ. Returns the output `(n, d)` and the weights `[head][n][n]` of one batch item.
fn reference_mha(
    x: &[Vec<f64>],
    w: &[Vec<Vec<f64>>; 4],
    biases: Option<&[Vec<f64>; 4]>,
    n_heads: usize,
    mask: Option<&[Vec<bool>]>,
) -> (Vec<Vec<f64>>, Vec<Vec<Vec<f64>>>) {
    let d = w[0].len();
    let dh = d / n_heads;
    let b = |i: usize| biases.map(|b| b[i].as_slice());
    let (q, k, v) = (
        matmul_t(x, &w[0], b(0)),
        matmul_t(x, &w[1], b(1)),
        matmul_t(x, &w[2], b(2)),
    );
    let cols = |m: &[Vec<f64>], h: usize| -> Vec<Vec<f64>> {
        m.iter().map(|r| r[h * dh..(h + 1) * dh].to_vec()).collect()
    };
    let mut concat = vec![vec![0.0; d]; x.len()];
    let mut weights = Vec::new();
    for h in 0..n_heads {
        let (out, wts) = reference_attention(&cols(&q, h), &cols(&k, h), &cols(&v, h), mask);
        for (c, o) in concat.iter_mut().zip(&out) {
            c[h * dh..(h + 1) * dh].copy_from_slice(o);
        }
        weights.push(wts);
    }
    (matmul_t(&concat, &w[3], b(3)), weights)
}

fn check_against_reference(
    mha: &MultiHeadAttention,
    batch: usize,
    n: usize,
    causal: bool,
) -> Result<()> {
    let dev = test_device();
    let d = mha.cfg.d_model;
    let x = Tensor::randn(0f32, 1.0, (batch, n, d), &dev)?;
    let mask = if causal {
        Some(causal_mask(n, n, &dev)?)
    } else {
        None
    };
    let got = mha.forward(&x, mask.as_ref())?;
    assert_eq!(got.output.dims(), &[batch, n, d]);
    assert_eq!(got.weights.dims(), &[batch, mha.cfg.n_heads, n, n]);
    let w = [
        rows(&mha.w_q)?,
        rows(&mha.w_k)?,
        rows(&mha.w_v)?,
        rows(&mha.w_o)?,
    ];
    let biases = match &mha.biases {
        Some(b) => Some([
            b[0].to_dtype(DType::F64)?.to_vec1::<f64>()?,
            b[1].to_dtype(DType::F64)?.to_vec1::<f64>()?,
            b[2].to_dtype(DType::F64)?.to_vec1::<f64>()?,
            b[3].to_dtype(DType::F64)?.to_vec1::<f64>()?,
        ]),
        None => None,
    };
    let bool_mask: Option<Vec<Vec<bool>>> = if causal {
        Some((0..n).map(|i| (0..n).map(|j| j <= i).collect()).collect())
    } else {
        None
    };
    for b in 0..batch {
        let (want_out, want_w) = reference_mha(
            &rows(&x.get(b)?)?,
            &w,
            biases.as_ref(),
            mha.cfg.n_heads,
            bool_mask.as_deref(),
        );
        let got_out = rows(&got.output.get(b)?)?;
        for (g, r) in got_out.iter().flatten().zip(want_out.iter().flatten()) {
            assert!(
                (g - r).abs() <= 1e-5 * (1.0 + r.abs()),
                "batch {b}: output {g} vs reference {r}"
            );
        }
        for (h, want_h) in want_w.iter().enumerate() {
            let got_h = rows(&got.weights.get(b)?.get(h)?)?;
            for (g, r) in got_h.iter().flatten().zip(want_h.iter().flatten()) {
                assert!(
                    (g - r).abs() <= 1e-5 * (1.0 + r.abs()),
                    "batch {b} head {h}: weight {g} vs reference {r}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn one_head_equals_single_head_self_attention_plus_output_projection() -> Result<()> {
    let dev = test_device();
    let d = 12;
    let [w_q, w_k, w_v, w_o] = random_weights(d, &dev)?;
    let mha =
        MultiHeadAttention::from_weights(1, w_q.clone(), w_k.clone(), w_v.clone(), w_o.clone())?;
    let single = SelfAttention::from_weights(w_q, w_k, w_v)?;
    let x = Tensor::randn(0f32, 1.0, (3, 7, d), &dev)?;
    for mask in [None, Some(causal_mask(7, 7, &dev)?)] {
        let multi = mha.forward(&x, mask.as_ref())?;
        let one = single.forward(&x, mask.as_ref())?;
        let want = shared::linear(&one.output, &w_o)?;
        let err = rel_err(&multi.output, &want)?;
        assert!(err < 1e-5, "output relative error {err}");
        let werr = max_abs_diff(&multi.weights.squeeze(1)?, &one.weights)?;
        assert!(werr < 1e-6, "weights differ by {werr}");
    }
    Ok(())
}

#[test]
fn matches_float64_per_head_reference() -> Result<()> {
    let dev = test_device();
    let d = 16;
    for n_heads in [2, 4] {
        let [w_q, w_k, w_v, w_o] = random_weights(d, &dev)?;
        let mha = MultiHeadAttention::from_weights(n_heads, w_q, w_k, w_v, w_o)?;
        check_against_reference(&mha, 2, 6, false)?;
        check_against_reference(&mha, 2, 6, true)?;
    }
    Ok(())
}

#[test]
fn heads_are_contiguous_row_blocks_of_the_projections() -> Result<()> {
    // Zeroing rows h·d_head..(h+1)·d_head of W_v zeroes exactly head h's slice of the concat:
    // with W_o = I the output's columns of that head are 0 and the others are untouched.
    let dev = test_device();
    let (d, h, dh) = (12, 3, 4);
    let [w_q, w_k, w_v, _] = random_weights(d, &dev)?;
    let eye = Tensor::eye(d, DType::F32, &dev)?;
    let keep = Tensor::from_vec(
        (0..d)
            .map(|r| if (dh..2 * dh).contains(&r) { 0f32 } else { 1.0 })
            .collect::<Vec<_>>(),
        (d, 1),
        &dev,
    )?;
    let full =
        MultiHeadAttention::from_weights(h, w_q.clone(), w_k.clone(), w_v.clone(), eye.clone())?;
    let cut = MultiHeadAttention::from_weights(h, w_q, w_k, w_v.broadcast_mul(&keep)?, eye)?;
    let x = Tensor::randn(0f32, 1.0, (2, 5, d), &dev)?;
    let (a, b) = (
        full.forward(&x, None)?.output,
        cut.forward(&x, None)?.output,
    );
    assert_eq!(
        b.narrow(2, dh, dh)?.abs()?.max_all()?.to_scalar::<f32>()?,
        0.0
    );
    for (start, len) in [(0, dh), (2 * dh, dh)] {
        assert_eq!(
            max_abs_diff(&a.narrow(2, start, len)?, &b.narrow(2, start, len)?)?,
            0.0
        );
    }
    Ok(())
}

#[test]
fn n_heads_that_does_not_divide_d_model_is_a_clear_error() -> Result<()> {
    let dev = test_device();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let err = MultiHeadAttention::new(vb, MhaConfig::new(10, 3))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("n_heads (3) must divide d_model (10)"),
        "{err}"
    );
    let [w_q, w_k, w_v, w_o] = random_weights(10, &dev)?;
    let err =
        MultiHeadAttention::from_weights(4, w_q.clone(), w_k.clone(), w_v.clone(), w_o.clone())
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("n_heads (4) must divide d_model (10)"),
        "{err}"
    );
    let err = MultiHeadAttention::from_weights(0, w_q, w_k, w_v, w_o)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("n_heads (0) must divide d_model (10)"),
        "{err}"
    );
    Ok(())
}

#[test]
fn causal_mask_blocks_any_dependence_on_future_tokens() -> Result<()> {
    let dev = test_device();
    let (d, n, t0) = (16, 9, 5);
    let [w_q, w_k, w_v, w_o] = random_weights(d, &dev)?;
    let mha = MultiHeadAttention::from_weights(4, w_q, w_k, w_v, w_o)?;
    let mask = causal_mask(n, n, &dev)?;
    let x = Tensor::randn(0f32, 1.0, (2, n, d), &dev)?;
    // Perturb token t0 of every sequence (a large change).
    let bump = Tensor::randn(0f32, 3.0, (2, 1, d), &dev)?;
    let x2 = Tensor::cat(
        &[
            x.narrow(1, 0, t0)?,
            (x.narrow(1, t0, 1)? + bump)?,
            x.narrow(1, t0 + 1, n - t0 - 1)?,
        ],
        1,
    )?;
    let (a, b) = (
        mha.forward(&x, Some(&mask))?,
        mha.forward(&x2, Some(&mask))?,
    );
    let before = max_abs_diff(&a.output.narrow(1, 0, t0)?, &b.output.narrow(1, 0, t0)?)?;
    assert!(before <= 1e-6, "positions < {t0} moved by {before}");
    // Every later position (t0 included) does change: the mask did not block too much.
    for t in t0..n {
        let after = max_abs_diff(&a.output.narrow(1, t, 1)?, &b.output.narrow(1, t, 1)?)?;
        assert!(
            after > 1e-3,
            "position {t} did not react to token {t0} ({after})"
        );
    }
    // And without the mask, earlier positions see the future token.
    let (a, b) = (mha.forward(&x, None)?, mha.forward(&x2, None)?);
    assert!(max_abs_diff(&a.output.narrow(1, 0, t0)?, &b.output.narrow(1, 0, t0)?)? > 1e-3);
    Ok(())
}

#[test]
fn head_gate_of_ones_is_no_gate_and_a_zero_gate_removes_the_head() -> Result<()> {
    let dev = test_device();
    let (d, h) = (12, 3);
    let dh = d / h;
    let [w_q, w_k, w_v, w_o] = random_weights(d, &dev)?;
    let mha =
        MultiHeadAttention::from_weights(h, w_q.clone(), w_k.clone(), w_v.clone(), w_o.clone())?;
    let x = Tensor::randn(0f32, 1.0, (2, 6, d), &dev)?;
    let mask = causal_mask(6, 6, &dev)?;
    let plain = mha.forward(&x, Some(&mask))?.output;
    let ones = Tensor::ones(h, DType::F32, &dev)?;
    let gated = mha.forward_cross(&x, &x, Some(&mask), Some(&ones))?.output;
    assert_eq!(max_abs_diff(&plain, &gated)?, 0.0);
    // Gate (1, 0, 1) = the same layer with head 1's columns of W_o zeroed.
    let gate = Tensor::new(&[1f32, 0.0, 1.0], &dev)?;
    let pruned = mha.forward_cross(&x, &x, Some(&mask), Some(&gate))?.output;
    let keep = Tensor::from_vec(
        (0..d)
            .map(|c| if (dh..2 * dh).contains(&c) { 0f32 } else { 1.0 })
            .collect::<Vec<_>>(),
        (1, d),
        &dev,
    )?;
    let cut = MultiHeadAttention::from_weights(h, w_q, w_k, w_v, w_o.broadcast_mul(&keep)?)?;
    let want = cut.forward(&x, Some(&mask))?.output;
    assert!(rel_err(&pruned, &want)? < 1e-6);
    assert!(
        max_abs_diff(&pruned, &plain)? > 1e-3,
        "pruning a head changed nothing"
    );
    // A gate of the wrong length is named.
    let short = Tensor::ones(2, DType::F32, &dev)?;
    let err = mha
        .forward_cross(&x, &x, None, Some(&short))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("head_gate has shape [2], expected [3]"),
        "{err}"
    );
    Ok(())
}

#[test]
fn biases_are_created_named_and_applied() -> Result<()> {
    let dev = test_device();
    let cfg = MhaConfig::new(8, 2).with_bias(true);
    let varmap = VarMap::new();
    let mut mha = MultiHeadAttention::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), cfg)?;
    let names: Vec<String> = shared::params::named_vars(&varmap)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        [
            "k_proj",
            "k_proj_bias",
            "output_proj",
            "output_proj_bias",
            "q_proj",
            "q_proj_bias",
            "v_proj",
            "v_proj_bias"
        ]
    );
    assert_eq!(shared::params::count_params(&varmap), cfg.n_params());
    assert_eq!(cfg.n_params(), 4 * 8 * 8 + 4 * 8);
    // Biases start at zero: the layer equals the bias-free one with the same matrices.
    let no_bias = MultiHeadAttention::from_weights(
        2,
        mha.w_q.clone(),
        mha.w_k.clone(),
        mha.w_v.clone(),
        mha.w_o.clone(),
    )?;
    let x = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev)?;
    assert!(
        rel_err(
            &mha.forward(&x, None)?.output,
            &no_bias.forward(&x, None)?.output
        )? < 1e-6
    );
    // Non-zero biases: compare with the float64 reference that adds them.
    mha.biases = Some([
        Tensor::randn(0f32, 0.5, 8, &dev)?,
        Tensor::randn(0f32, 0.5, 8, &dev)?,
        Tensor::randn(0f32, 0.5, 8, &dev)?,
        Tensor::randn(0f32, 0.5, 8, &dev)?,
    ]);
    check_against_reference(&mha, 2, 5, true)?;
    assert!(
        rel_err(
            &mha.forward(&x, None)?.output,
            &no_bias.forward(&x, None)?.output
        )? > 1e-3
    );
    Ok(())
}

#[test]
fn cross_attention_takes_keys_and_values_from_the_other_sequence() -> Result<()> {
    // n_q ≠ n_k: queries from x_q, keys/values from x_kv; per-head float64 reference.
    let dev = test_device();
    let (d, h, n_q, n_k) = (8, 2, 3, 6);
    let [w_q, w_k, w_v, w_o] = random_weights(d, &dev)?;
    let mha = MultiHeadAttention::from_weights(h, w_q, w_k, w_v, w_o)?;
    let x_q = Tensor::randn(0f32, 1.0, (1, n_q, d), &dev)?;
    let x_kv = Tensor::randn(0f32, 1.0, (1, n_k, d), &dev)?;
    let got = mha.forward_cross(&x_q, &x_kv, None, None)?;
    assert_eq!(got.weights.dims(), &[1, h, n_q, n_k]);
    let w = [
        rows(&mha.w_q)?,
        rows(&mha.w_k)?,
        rows(&mha.w_v)?,
        rows(&mha.w_o)?,
    ];
    let (xq, xkv) = (rows(&x_q.get(0)?)?, rows(&x_kv.get(0)?)?);
    let (q, k, v) = (
        matmul_t(&xq, &w[0], None),
        matmul_t(&xkv, &w[1], None),
        matmul_t(&xkv, &w[2], None),
    );
    let dh = d / h;
    let cols = |m: &[Vec<f64>], i: usize| -> Vec<Vec<f64>> {
        m.iter().map(|r| r[i * dh..(i + 1) * dh].to_vec()).collect()
    };
    let mut concat = vec![vec![0.0; d]; n_q];
    for i in 0..h {
        let (out, _) = reference_attention(&cols(&q, i), &cols(&k, i), &cols(&v, i), None);
        for (c, o) in concat.iter_mut().zip(&out) {
            c[i * dh..(i + 1) * dh].copy_from_slice(o);
        }
    }
    let want = matmul_t(&concat, &w[3], None);
    for (g, r) in rows(&got.output.get(0)?)?
        .iter()
        .flatten()
        .zip(want.iter().flatten())
    {
        assert!((g - r).abs() <= 1e-5 * (1.0 + r.abs()), "{g} vs {r}");
    }
    Ok(())
}

/// The training path (`self_attention`, through the kernel) equals the inspection path
/// (`forward`, which keeps the weights) for MHA, GQA and MQA, causal and not; with fewer K/V
/// heads it equals MHA whose K/V projections repeat each K/V head over its group.
#[test]
fn kernel_path_equals_inspection_path_and_grouped_heads_equal_repeated_heads() -> Result<()> {
    let dev = test_device();
    let (d, h, n) = (16, 4, 5);
    let d_head = d / h;
    let x = Tensor::randn(0f32, 1.0, (2, n, d), &dev)?;
    let causal = causal_mask(n, n, &dev)?;
    for kv in [4, 2, 1] {
        let std = 1.0 / (d as f32).sqrt();
        let w_q = Tensor::randn(0f32, std, (d, d), &dev)?;
        let w_k = Tensor::randn(0f32, std, (kv * d_head, d), &dev)?;
        let w_v = Tensor::randn(0f32, std, (kv * d_head, d), &dev)?;
        let w_o = Tensor::randn(0f32, std, (d, d), &dev)?;
        let gqa = MultiHeadAttention::from_weights(
            h,
            w_q.clone(),
            w_k.clone(),
            w_v.clone(),
            w_o.clone(),
        )?;
        assert_eq!(gqa.cfg.n_kv_heads, kv);
        // K/V head j serves query heads j·g … (j+1)·g − 1: repeat its rows g times.
        let g = h / kv;
        let repeat = |w: &Tensor| -> Result<Tensor> {
            w.reshape((kv, 1, d_head, d))?
                .broadcast_as((kv, g, d_head, d))?
                .contiguous()?
                .reshape((h * d_head, d))
        };
        let mha = MultiHeadAttention::from_weights(h, w_q, repeat(&w_k)?, repeat(&w_v)?, w_o)?;
        for (mask, tensor_mask) in [(AttnMask::None, None), (AttnMask::Causal, Some(&causal))] {
            let fast = gqa.self_attention(&x, mask, 0, None)?;
            let inspected = gqa.forward(&x, tensor_mask)?.output;
            let reference = mha.forward(&x, tensor_mask)?.output;
            assert!(
                max_abs_diff(&fast, &inspected)? < 1e-5,
                "kv {kv}: kernel vs inspection"
            );
            assert!(
                max_abs_diff(&fast, &reference)? < 1e-5,
                "kv {kv}: grouped vs repeated"
            );
        }
    }
    let err = MultiHeadAttention::new(
        VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev),
        MhaConfig::new(16, 4).with_kv_heads(3),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("n_kv_heads (3) must divide n_heads (4)"),
        "{err}"
    );
    Ok(())
}

#[test]
fn key_padding_reads_lengths_and_lowers_to_the_explicit_mask() -> Result<()> {
    let dev = test_device();
    let mask = Tensor::new(&[[1u8, 1, 1, 0], [1, 1, 1, 1]], &dev)?;
    let keys = KeyPadding::from_mask(&mask)?;
    assert_eq!(keys.lengths(), &[3, 4]);
    assert!(!keys.is_full());
    // Causal ∧ padding for 2 queries that are the last of 4 keys: query i sees keys ≤ i + 2.
    let lowered = AttnMask::Padding {
        keys: &keys,
        causal: true,
    }
    .lowered(2, 4)?;
    let AttnMask::Explicit(m) = lowered.get() else {
        panic!("padding should lower to an explicit mask");
    };
    let want = [[[1u8, 1, 1, 0], [1, 1, 1, 0]], [[1, 1, 1, 0], [1, 1, 1, 1]]];
    assert_eq!(m.squeeze(1)?.to_vec3::<u8>()?, want);
    // Nothing padded: no mask tensor, and the mask lowers to none or causal.
    let full = KeyPadding::new(&[4, 4], 4, &dev)?;
    assert!(full.is_full() && full.mask().is_none());
    let none = AttnMask::Padding {
        keys: &full,
        causal: false,
    }
    .lowered(4, 4)?;
    assert!(matches!(none.get(), AttnMask::None));
    let causal = AttnMask::Padding {
        keys: &full,
        causal: true,
    }
    .lowered(4, 4)?;
    assert!(matches!(causal.get(), AttnMask::Causal));
    // Keys up to a device index lower to the explicit mask of slots 0..=last.
    let last = Tensor::new(&[2u32], &dev)?;
    let up_to = AttnMask::KeysUpTo(&last).lowered(1, 5)?;
    let AttnMask::Explicit(m) = up_to.get() else {
        panic!("keys up to a device index should lower to an explicit mask");
    };
    assert_eq!(m.flatten_all()?.to_vec1::<u8>()?, [1, 1, 1, 0, 0]);
    // Bad input: padding before a real token, a sequence without keys.
    let hole = Tensor::new(&[[1u8, 0, 1]], &dev)?;
    let e = KeyPadding::from_mask(&hole).unwrap_err().to_string();
    assert!(e.contains("padding must come last"), "{e}");
    let e = KeyPadding::new(&[0], 3, &dev).unwrap_err().to_string();
    assert!(e.contains("0 real keys"), "{e}");
    Ok(())
}

/// `[W_q; W_k; W_v]` packed into one GEMM gives the three projections' queries, keys, values and
/// attention output, with and without biases, grouped K/V heads, one token and several (the
/// views of the packed output are copied where they are not contiguous).
#[test]
fn packed_qkv_projection_equals_the_three_projections() -> Result<()> {
    let dev = test_device();
    for (bias, n_kv, n) in [(false, 4, 5), (true, 2, 1), (true, 4, 3), (false, 1, 1)] {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let cfg = MhaConfig::new(16, 4).with_kv_heads(n_kv).with_bias(bias);
        let mha = MultiHeadAttention::new(vb, cfg)?;
        if let Some(bs) = &mha.biases {
            for b in bs {
                b.slice_set(&Tensor::randn(0f32, 0.5, b.dims(), &dev)?, 0, 0)?;
            }
        }
        let packed = mha.clone().with_packed_qkv(DType::F32)?;
        let x = Tensor::randn(0f32, 1.0, (2, n, 16), &dev)?;
        let (q, k, v) = packed.project_qkv(&x)?;
        let (k0, v0) = mha.project_kv(&x)?;
        for (name, a, b) in [
            ("q", &q, &mha.project_q(&x)?),
            ("k", &k, &k0),
            ("v", &v, &v0),
        ] {
            assert_eq!(a.dims(), b.dims(), "{name}");
            assert!(
                rel_err(a, b)? < 1e-6,
                "bias {bias}, {n_kv} kv heads, {n} tokens: {name}"
            );
        }
        let out = packed.self_attention(&x, AttnMask::Causal, 0, None)?;
        let want = mha.self_attention(&x, AttnMask::Causal, 0, None)?;
        assert!(rel_err(&out, &want)? < 1e-6, "bias {bias}: output");
    }
    Ok(())
}

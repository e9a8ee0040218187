//! The forward pass on the CPU: the tiled tensor-op version and the custom op against 8-01's
//! naive attention and a float64 triple loop, over random shapes (seq 1, lengths that are not
//! multiples of the tiles, n_q ≠ n_k, causal or not).

mod common;
use candle_core::{DType, Result, Tensor};
use common::*;
use t0809_flash_attention::*;

/// Shapes `(b, h, n_q, n_k, d, d_v, causal)` covering the edges of the tiling (the CPU op uses
/// 32-query × 64-key blocks).
fn shapes() -> Vec<(usize, usize, usize, usize, usize, usize, bool)> {
    vec![
        (1, 1, 1, 1, 8, 8, false),
        (1, 1, 1, 1, 8, 8, true),
        (2, 3, 5, 5, 16, 16, true),
        (1, 2, 1, 70, 16, 8, true), // one query (decoding): sees every key
        (2, 1, 33, 65, 8, 12, false), // one past a tile on both axes
        (1, 2, 33, 97, 16, 16, true), // n_q < n_k, end-aligned diagonal
        (1, 1, 100, 100, 32, 32, true),
        (1, 1, 64, 128, 64, 64, false), // exact tile multiples
        (2, 2, 17, 3, 4, 4, false),     // more queries than keys
    ]
}

#[test]
fn custom_op_matches_float64_reference_and_t0801() -> Result<()> {
    let mut rng = Rng::new(1);
    for (b, h, n_q, n_k, d, d_v, causal) in shapes() {
        let (q, k, v) = qkv(&mut rng, b, h, n_q, n_k, d, d_v)?;
        let scale = default_softmax_scale(d);
        let (want_o, want_l) = reference(&q, &k, &v, scale, causal)?;
        let (q32, k32, v32) = (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
        );
        let (o, l) = flash_attention_with_lse(&q32, &k32, &v32, scale, causal)?;
        assert_eq!(o.dims(), &[b, h, n_q, d_v]);
        assert_eq!(l.dims(), &[b, h, n_q]);
        assert_eq!(o.dtype(), DType::F32);
        let shape = format!("{:?}", (b, h, n_q, n_k, d, d_v, causal));
        let e = max_rel(&to_vec(&o)?, &want_o);
        assert!(e <= 1e-5, "{shape}: output error {e:e} vs float64");
        let e = max_rel(&to_vec(&l)?, &want_l);
        assert!(e <= 1e-5, "{shape}: log-sum-exp error {e:e} vs float64");
        if !causal || n_q <= n_k {
            // 8-01's naive path (materialises the n_q × n_k weights) gives the same output.
            let naive = naive_attention(&q32, &k32, &v32, scale, causal)?;
            let e = max_rel(&to_vec(&o)?, &to_vec(&naive)?);
            assert!(e <= 1e-5, "{shape}: custom op vs t0801 {e:e}");
        }
        // f64 inputs run the same loops in f64.
        let o64 = flash_attention(&q, &k, &v, scale, causal)?;
        assert_eq!(o64.dtype(), DType::F64);
        let e = max_rel(&to_vec(&o64)?, &want_o);
        assert!(e <= 1e-12, "{shape}: f64 output error {e:e}");
    }
    Ok(())
}

#[test]
fn tensor_op_version_matches_reference_for_many_tilings() -> Result<()> {
    let mut rng = Rng::new(2);
    for (b, h, n_q, n_k, d, d_v, causal) in shapes() {
        let (q, k, v) = qkv(&mut rng, b, h, n_q, n_k, d, d_v)?;
        let scale = 0.3; // not 1/√d: the scale is an argument
        let (want_o, want_l) = reference(&q, &k, &v, scale, causal)?;
        let (q32, k32, v32) = (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
        );
        for (bq, bk) in [(1, 1), (3, 5), (16, 16), (64, 7), (1000, 1000)] {
            let (o, l) = flash_attention_tensor_ops(&q32, &k32, &v32, causal, scale, bq, bk)?;
            let shape = format!("{:?} blocks {bq}×{bk}", (b, h, n_q, n_k, d, d_v, causal));
            assert_eq!(o.dims(), &[b, h, n_q, d_v], "{shape}");
            assert_eq!(l.dims(), &[b, h, n_q], "{shape}");
            let e = max_rel(&to_vec(&o)?, &want_o);
            assert!(e <= 1e-5, "{shape}: output error {e:e}");
            let e = max_rel(&to_vec(&l)?, &want_l);
            assert!(e <= 1e-5, "{shape}: lse error {e:e}");
        }
    }
    Ok(())
}

#[test]
fn random_shapes_agree_between_the_three_implementations() -> Result<()> {
    let mut rng = Rng::new(3);
    for _ in 0..12 {
        let (b, h) = (1 + rng.below(2), 1 + rng.below(3));
        let n_k = 1 + rng.below(150);
        let causal = rng.below(2) == 1;
        let n_q = if causal {
            1 + rng.below(n_k)
        } else {
            1 + rng.below(150)
        };
        let d = [1, 3, 8, 16, 24][rng.below(5)];
        let (q, k, v) = qkv(&mut rng, b, h, n_q, n_k, d, d)?;
        let scale = 0.1 + rng.uniform();
        let (want_o, _) = reference(&q, &k, &v, scale, causal)?;
        let (q32, k32, v32) = (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
        );
        let o = flash_attention(&q32, &k32, &v32, scale, causal)?;
        let (o_t, _) = flash_attention_tensor_ops(
            &q32,
            &k32,
            &v32,
            causal,
            scale,
            1 + rng.below(40),
            1 + rng.below(40),
        )?;
        let shape = format!("{:?}", (b, h, n_q, n_k, d, causal, scale));
        assert!(max_rel(&to_vec(&o)?, &want_o) <= 1e-5, "{shape}: custom op");
        assert!(
            max_rel(&to_vec(&o_t)?, &want_o) <= 1e-5,
            "{shape}: tensor ops"
        );
    }
    Ok(())
}

#[test]
fn large_scores_do_not_overflow() -> Result<()> {
    // Scores of several hundred: exp would overflow f32 without the running max.
    let mut rng = Rng::new(4);
    let (q, k, v) = qkv(&mut rng, 1, 2, 40, 90, 16, 16)?;
    let q = (q * 30.0)?;
    for causal in [false, true] {
        let (want_o, want_l) = reference(&q, &k, &v, 1.0, causal)?;
        let (o, l) = flash_attention_with_lse(
            &q.to_dtype(DType::F32)?,
            &k.to_dtype(DType::F32)?,
            &v.to_dtype(DType::F32)?,
            1.0,
            causal,
        )?;
        assert!(
            want_l.iter().any(|&x| x > 200.0),
            "the test should have huge scores"
        );
        assert!(max_rel(&to_vec(&o)?, &want_o) <= 1e-5);
        assert!(max_rel(&to_vec(&l)?, &want_l) <= 1e-5);
    }
    Ok(())
}

#[test]
fn low_precision_inputs_are_computed_in_f32() -> Result<()> {
    // bf16/f16 in, f32 accumulation inside: the error is the rounding of the inputs and of the
    // output, and no worse than twice the naive path in the same dtype (FlashAttention's rule).
    let mut rng = Rng::new(5);
    let (q, k, v) = qkv(&mut rng, 2, 2, 45, 70, 32, 32)?;
    for dt in [DType::BF16, DType::F16] {
        for causal in [false, true] {
            let (ql, kl, vl) = (q.to_dtype(dt)?, k.to_dtype(dt)?, v.to_dtype(dt)?);
            // Reference on the rounded inputs, in f64.
            let (want, _) = reference(&ql, &kl, &vl, 0.2, causal)?;
            let o = flash_attention(&ql, &kl, &vl, 0.2, causal)?;
            assert_eq!(o.dtype(), dt);
            let naive = naive_attention(&ql, &kl, &vl, 0.2, causal)?;
            let (e_flash, e_naive) = (
                max_abs(&to_vec(&o)?, &want),
                max_abs(&to_vec(&naive)?, &want),
            );
            let unit = if dt == DType::BF16 {
                1.0 / 128.0
            } else {
                1.0 / 1024.0
            };
            assert!(
                e_flash <= unit,
                "{dt:?} causal {causal}: flash error {e_flash} above one output rounding"
            );
            assert!(
                e_flash <= 2.0 * e_naive,
                "{dt:?} causal {causal}: flash {e_flash} vs naive {e_naive}"
            );
        }
    }
    Ok(())
}

#[test]
fn multi_head_layer_with_flash_matches_the_naive_layer() -> Result<()> {
    use candle_nn::{VarBuilder, VarMap};
    use std::sync::Arc;
    use t0802_multi_head_attention::{AttnMask, MhaConfig, MultiHeadAttention};
    let dev = candle_core::Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    // Grouped K/V heads too: the kernel repeats them to one per query head.
    for kv in [4, 2, 1] {
        let mha = MultiHeadAttention::new(vb.pp(kv), MhaConfig::new(32, 4).with_kv_heads(kv))?;
        let flash = mha.clone().with_kernel(Arc::new(FlashAttentionKernel {
            kernels: FlashKernels::Auto,
        }));
        let x = Rng::new(6)
            .tensor(&[2, 11, 32], 1.0)?
            .to_dtype(DType::F32)?;
        for causal in [false, true] {
            let mask = if causal {
                Some(t0801_self_attention::causal_mask(11, 11, &dev)?)
            } else {
                None
            };
            let want = mha.forward(&x, mask.as_ref())?.output;
            let how = if causal {
                AttnMask::Causal
            } else {
                AttnMask::None
            };
            let got = flash.self_attention(&x, how, 0, None)?;
            let e = max_rel(&to_vec(&got)?, &to_vec(&want)?);
            assert!(e <= 1e-5, "kv {kv}, causal {causal}: {e:e}");
        }
    }
    Ok(())
}

#[test]
fn output_rows_are_convex_combinations_of_values() -> Result<()> {
    // A property independent of any reference: with all values equal to c, the output is c.
    let mut rng = Rng::new(7);
    let (q, k, _) = qkv(&mut rng, 1, 2, 37, 81, 8, 8)?;
    let v = Tensor::full(2.5f64, (1, 2, 81, 8), &candle_core::Device::Cpu)?;
    for causal in [false, true] {
        let o = flash_attention(&q, &k, &v, 0.7, causal)?;
        assert!(to_vec(&o)?.iter().all(|&x| (x - 2.5).abs() < 1e-12));
    }
    Ok(())
}

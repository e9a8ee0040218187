//! The LLaMA recipe with 8-09's FlashAttention as its attention kernel computes the same function
//! (logits and gradients) as with the naive kernel, for MHA and GQA; and with every fused op of
//! 8-06 and 8-08 (RMSNorm, SwiGLU gate, causal softmax, RoPE) the same as with composed ops.

use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use shared::device::test_device;
use shared::kernels::{AttentionImpl, Kernels};
use t0804_transformer_block::{build_lm, DecoderOnlyLm, LmConfig, LmShape};

/// Two models of `cfg` over the same variables, built with `a` and `b`.
fn twins(
    cfg: &LmConfig,
    a: Kernels,
    b: Kernels,
    dtype: DType,
) -> anyhow::Result<(VarMap, DecoderOnlyLm, DecoderOnlyLm)> {
    let dev = test_device();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &dev);
    let first = build_lm(vb.clone(), cfg, &t0809_flash_attention::parts(a))?;
    let second = build_lm(vb, cfg, &t0809_flash_attention::parts(b))?; // same variables
    Ok((varmap, first, second))
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (
        a.to_dtype(DType::F64).unwrap(),
        b.to_dtype(DType::F64).unwrap(),
    );
    let num = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    num / b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn flash_attention_model_matches_naive_model() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    // f64 on the CPU; the CUDA kernel is f32/bf16/f16, so f32 there (and f32-sized tolerances).
    let dev = test_device();
    let (dtype, tol_logits, tol_grad) = if dev.is_cuda() {
        (DType::F32, 1e-5, 1e-4)
    } else {
        (DType::F64, 1e-10, 1e-9)
    };
    for kv_heads in [4, 2] {
        let shape = LmShape {
            vocab_size: 97,
            max_seq_len: 24,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
        };
        let cfg = t0808_rope::llama(shape, kv_heads);
        let flash_kernels = Kernels::composed().with_attention(AttentionImpl::Flash);
        let (varmap, naive, flash) = twins(&cfg, Kernels::composed(), flash_kernels, dtype)?;
        let x = Tensor::from_vec(
            (0..2 * 19)
                .map(|i| (i * 37 % 97) as u32)
                .collect::<Vec<_>>(),
            (2, 19),
            &dev,
        )?;
        let y = Tensor::from_vec(
            (0..2 * 19)
                .map(|i| (i * 53 % 97) as u32)
                .collect::<Vec<_>>(),
            (2, 19),
            &dev,
        )?;
        let (ln, lf) = (naive.forward(&x, 0)?, flash.forward(&x, 0)?);
        assert!(
            rel(&lf, &ln) < tol_logits,
            "kv_heads {kv_heads}: logits differ by {}",
            rel(&lf, &ln)
        );
        let gn = naive.loss(&x, &y)?.backward()?;
        let gf = flash.loss(&x, &y)?.backward()?;
        for (name, var) in shared::params::named_vars(&varmap) {
            let (a, b) = (
                gf.get(var.as_tensor()).unwrap(),
                gn.get(var.as_tensor()).unwrap(),
            );
            assert!(
                rel(a, b) < tol_grad,
                "kv_heads {kv_heads}: gradient of {name} differs by {}",
                rel(a, b)
            );
        }
    }
    Ok(())
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

#[test]
fn llama_with_fused_norm_rope_swiglu_and_softmax_gives_same_logits_and_gradients(
) -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    let dev = test_device();
    let shape = LmShape {
        vocab_size: 64,
        max_seq_len: 16,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
    };
    let cfg = t0808_rope::llama(shape, 2);
    let tokens = Tensor::new(&[[1u32, 5, 7, 9, 2, 8], [3, 3, 3, 4, 63, 0]], &dev)?;
    let targets = Tensor::new(&[[5u32, 7, 9, 2, 8, 1], [3, 3, 4, 63, 0, 2]], &dev)?;
    shared::params::set_seed(3);
    let fused_ops = Kernels::fused().with_attention(AttentionImpl::Naive);
    let (varmap, composed, fused) = twins(&cfg, Kernels::composed(), fused_ops, DType::F32)?;
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

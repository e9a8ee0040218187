//! The LLaMA recipe with t0809's FlashAttention as its attention kernel computes the same function
//! (logits and gradients) as with the naive kernel, for MHA and GQA.

use candle_core::{DType, Tensor};
use shared::device::test_device;
use t0806_modern_blocks::{build_modern_lm, with_flash_attention, ModernLmConfig};

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
    // f64 on the CPU; the CUDA kernel is f32/bf16/f16, so f32 there (and f32-sized tolerances).
    let dev = test_device();
    let (dtype, tol_logits, tol_grad) = if dev.is_cuda() {
        (DType::F32, 1e-5, 1e-4)
    } else {
        (DType::F64, 1e-10, 1e-9)
    };
    for kv_heads in [4, 2] {
        let cfg = ModernLmConfig::llama(97, 24, 32, 2, 4, kv_heads);
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, dtype, &dev);
        let naive = build_modern_lm(vb.clone(), &cfg)?;
        let flash = with_flash_attention(build_modern_lm(vb, &cfg)?)?; // same variables
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

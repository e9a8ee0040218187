//! The LLaMA recipe with t0809's FlashAttention as its attention kernel computes the same function
//! (logits and gradients) as with the naive kernel, for MHA and GQA.

use candle_core::{DType, Tensor};
use shared::device::test_device;
use t0806_modern_blocks::{build_modern_lm, with_flash_attention, ModernLmConfig};

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let num = (a - b)
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
    for kv_heads in [4, 2] {
        let cfg = ModernLmConfig::llama(97, 24, 32, 2, 4, kv_heads);
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F64, &test_device());
        let naive = build_modern_lm(vb.clone(), &cfg)?;
        let flash = with_flash_attention(build_modern_lm(vb, &cfg)?)?; // same variables
        let x = Tensor::from_vec(
            (0..2 * 19)
                .map(|i| (i * 37 % 97) as u32)
                .collect::<Vec<_>>(),
            (2, 19),
            &test_device(),
        )?;
        let y = Tensor::from_vec(
            (0..2 * 19)
                .map(|i| (i * 53 % 97) as u32)
                .collect::<Vec<_>>(),
            (2, 19),
            &test_device(),
        )?;
        let (ln, lf) = (naive.forward(&x, 0)?, flash.forward(&x, 0)?);
        assert!(
            rel(&lf, &ln) < 1e-10,
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
                rel(a, b) < 1e-9,
                "kv_heads {kv_heads}: gradient of {name} differs by {}",
                rel(a, b)
            );
        }
    }
    Ok(())
}

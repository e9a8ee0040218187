//! Bad inputs fail at the public boundary with messages that name the offending values.

mod common;
use candle_core::{DType, Device, Result, Tensor};
use t0809_flash_attention::*;

fn z(shape: &[usize], dt: DType) -> Tensor {
    Tensor::zeros(shape, dt, &Device::Cpu).unwrap()
}

fn err(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> String {
    // First line only: with RUST_BACKTRACE set, Candle appends a backtrace.
    let first =
        |e: candle_core::Error| e.to_string().lines().next().unwrap_or_default().to_string();
    let e1 = first(flash_attention(q, k, v, scale, causal).unwrap_err());
    // The tensor-op version checks the same things the same way.
    let e2 = first(flash_attention_tensor_ops(q, k, v, causal, scale, 16, 16).unwrap_err());
    assert_eq!(e1, e2);
    e1
}

#[test]
fn shape_errors_name_the_shapes() {
    let f = DType::F32;
    let e = err(
        &z(&[2, 5, 8], f),
        &z(&[2, 5, 8], f),
        &z(&[2, 5, 8], f),
        1.0,
        false,
    );
    assert!(
        e.contains("must all be 4-D") && e.contains("[2, 5, 8]"),
        "{e}"
    );
    let e = err(
        &z(&[1, 2, 5, 8], f),
        &z(&[1, 2, 6, 4], f),
        &z(&[1, 2, 6, 8], f),
        1.0,
        false,
    );
    assert!(e.contains("query width 8 ≠ key width 4"), "{e}");
    let e = err(
        &z(&[1, 2, 5, 8], f),
        &z(&[1, 2, 6, 8], f),
        &z(&[1, 2, 7, 8], f),
        1.0,
        false,
    );
    assert!(e.contains("6 keys but 7 values"), "{e}");
    let e = err(
        &z(&[1, 2, 5, 8], f),
        &z(&[1, 3, 6, 8], f),
        &z(&[1, 3, 6, 8], f),
        1.0,
        false,
    );
    assert!(e.contains("(batch, heads) differ"), "{e}");
    let e = err(
        &z(&[1, 2, 9, 8], f),
        &z(&[1, 2, 6, 8], f),
        &z(&[1, 2, 6, 8], f),
        1.0,
        true,
    );
    assert!(
        e.contains("n_q ≤ n_k") && e.contains("n_q = 9 > n_k = 6"),
        "{e}"
    );
    let e = err(
        &z(&[1, 2, 0, 8], f),
        &z(&[1, 2, 6, 8], f),
        &z(&[1, 2, 6, 8], f),
        1.0,
        false,
    );
    assert!(e.contains("empty dimension"), "{e}");
}

#[test]
fn dtype_and_scale_errors_name_the_values() {
    let e = err(
        &z(&[1, 1, 4, 8], DType::F32),
        &z(&[1, 1, 4, 8], DType::BF16),
        &z(&[1, 1, 4, 8], DType::F32),
        1.0,
        false,
    );
    assert!(e.contains("dtypes differ") && e.contains("BF16"), "{e}");
    let u = DType::U32;
    let e = err(
        &z(&[1, 1, 4, 8], u),
        &z(&[1, 1, 4, 8], u),
        &z(&[1, 1, 4, 8], u),
        1.0,
        false,
    );
    assert!(e.contains("dtype U32 not supported"), "{e}");
    let f = DType::F32;
    let e = err(
        &z(&[1, 1, 4, 8], f),
        &z(&[1, 1, 4, 8], f),
        &z(&[1, 1, 4, 8], f),
        -0.5,
        false,
    );
    assert!(
        e.contains("softmax_scale must be finite and > 0, got -0.5"),
        "{e}"
    );
    let e = err(
        &z(&[1, 1, 4, 8], f),
        &z(&[1, 1, 4, 8], f),
        &z(&[1, 1, 4, 8], f),
        f64::NAN,
        false,
    );
    assert!(e.contains("got NaN"), "{e}");
}

#[test]
fn block_sizes_of_zero_are_rejected() {
    let f = DType::F32;
    let e = flash_attention_tensor_ops(
        &z(&[1, 1, 4, 8], f),
        &z(&[1, 1, 4, 8], f),
        &z(&[1, 1, 4, 8], f),
        false,
        1.0,
        0,
        4,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("block_q 0"), "{e}");
}

#[test]
fn non_contiguous_inputs_are_accepted() -> Result<()> {
    // A transposed view (batch, seq, heads, d) → (batch, heads, seq, d) is made contiguous.
    let x = common::Rng::new(20).tensor(&[1, 6, 2, 4], 1.0)?;
    let q = x.transpose(1, 2)?;
    assert!(!q.is_contiguous());
    let o = flash_attention(&q, &q, &q, 0.5, true)?;
    let want = flash_attention(
        &q.contiguous()?,
        &q.contiguous()?,
        &q.contiguous()?,
        0.5,
        true,
    )?;
    assert_eq!(common::to_vec(&o)?, common::to_vec(&want)?);
    Ok(())
}

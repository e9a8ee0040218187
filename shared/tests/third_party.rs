//! The patched candle-core's CPU matmul (third_party/README.md, second change: the product's buffer
//! is not zero-filled before the GEMM writes it) against a float64 product: batched, with a
//! broadcast operand, with transposed (strided) operands, and with an empty inner dimension.

use anyhow::Result;
use candle_core::{Device, Tensor};

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// `a (b, m, k) · c (b, k, n)` in f64 from the tensors' f32 values.
fn reference(a: &Tensor, c: &Tensor) -> Result<Vec<f64>> {
    let n = c.dim(2)?;
    let (a, c) = (a.to_vec3::<f32>()?, c.to_vec3::<f32>()?);
    let mut out = Vec::new();
    for (a_b, c_b) in a.iter().zip(&c) {
        for row in a_b {
            for j in 0..n {
                let dot = row
                    .iter()
                    .zip(c_b)
                    .map(|(x, c_row)| *x as f64 * c_row[j] as f64);
                out.push(dot.sum());
            }
        }
    }
    Ok(out)
}

fn check(a: &Tensor, c: &Tensor, what: &str) -> Result<()> {
    let got: Vec<f32> = a.matmul(c)?.flatten_all()?.to_vec1()?;
    let want = reference(a, c)?;
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w}"
        );
    }
    Ok(())
}

#[test]
fn cpu_matmul_equals_a_float64_product() -> Result<()> {
    let dev = Device::Cpu;
    for (b, m, k, n) in [
        (1, 1, 1, 1),
        (3, 17, 33, 9),
        (2, 64, 128, 96),
        (1, 5, 300, 7),
    ] {
        let a = Tensor::from_vec(values(b * m * k, 1), (b, m, k), &dev)?;
        let c = Tensor::from_vec(values(b * k * n, 2), (b, k, n), &dev)?;
        check(&a, &c, &format!("({b},{m},{k})·({b},{k},{n})"))?;
        // Transposed operands: the same products through strided layouts.
        let at = Tensor::from_vec(values(b * m * k, 1), (b, k, m), &dev)?.transpose(1, 2)?;
        let ct = Tensor::from_vec(values(b * k * n, 2), (b, n, k), &dev)?.transpose(1, 2)?;
        check(&at, &ct, &format!("transposed ({b},{m},{k})·({b},{k},{n})"))?;
        // A batch-invariant right operand (the batches fold into the rows of one GEMM).
        let shared =
            Tensor::from_vec(values(k * n, 3), (1, k, n), &dev)?.broadcast_as((b, k, n))?;
        check(&a, &shared, &format!("broadcast ({b},{m},{k})·(1,{k},{n})"))?;
    }
    // An empty inner dimension: the product is all zeros (the filled buffer).
    let a = Tensor::zeros((2, 3, 0), candle_core::DType::F32, &dev)?;
    let c = Tensor::zeros((2, 0, 4), candle_core::DType::F32, &dev)?;
    let p = a.matmul(&c)?;
    assert_eq!(p.dims(), &[2, 3, 4]);
    assert!(p.flatten_all()?.to_vec1::<f32>()?.iter().all(|&v| v == 0.0));
    Ok(())
}

//! RoPE against a float64 reference, candle-nn's `rope_i`, and its mathematical properties.

use candle_core::{DType, Result, Tensor, Var};
use shared::device::test_device;
use t0808_rope::*;

fn rand_x(b: usize, h: usize, t: usize, d: usize) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, (b, h, t, d), &test_device())
}

fn max_rel_err(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs() / y.abs().max(1.0))
        .fold(0.0, f64::max)
}

#[test]
fn both_forms_match_f64_reference_with_offset() -> Result<()> {
    let (b, h, t, d, start) = (2, 3, 5, 16, 7);
    let tables = RopeTables::new(d, 32, DEFAULT_BASE, RopeScaling::None, &test_device())?;
    let x = rand_x(b, h, t, d)?;
    let complex = apply_rope(&x, &tables, start)?;
    let matrix = apply_rope_matrix(&x, &tables, start)?;
    let xs = x
        .to_dtype(DType::F64)?
        .reshape((b * h * t, d))?
        .to_vec2::<f64>()?;
    let cs = complex.reshape((b * h * t, d))?.to_vec2::<f32>()?;
    let ms = matrix.reshape((b * h * t, d))?.to_vec2::<f32>()?;
    for (row, xr) in xs.iter().enumerate() {
        let pos = (start + row % t) as f64;
        let want = reference_rope(xr, pos, DEFAULT_BASE);
        assert!(
            max_rel_err(&cs[row], &want) < 1e-5,
            "complex form, row {row}"
        );
        assert!(
            max_rel_err(&ms[row], &want) < 1e-5,
            "matrix form, row {row}"
        );
    }
    Ok(())
}

#[test]
fn matches_candle_nn_rope_i() -> Result<()> {
    let (b, h, t, d) = (2, 4, 9, 32);
    let tables = RopeTables::new(d, 64, 500_000.0, RopeScaling::None, &test_device())?;
    let x = rand_x(b, h, t, d)?;
    let start = 11;
    let (cos, sin) = tables.rows(start, t, DType::F32)?;
    let want = candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let got = apply_rope(&x, &tables, start)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
    }
    Ok(())
}

#[test]
fn rotation_preserves_norm() -> Result<()> {
    let tables = RopeTables::new(64, 1024, DEFAULT_BASE, RopeScaling::None, &test_device())?;
    let x = rand_x(1, 2, 1000, 64)?;
    let y = apply_rope(&x, &tables, 0)?;
    let nx = x.sqr()?.sum(3)?.flatten_all()?.to_vec1::<f32>()?;
    let ny = y.sqr()?.sum(3)?.flatten_all()?.to_vec1::<f32>()?;
    for (a, b) in nx.iter().zip(&ny) {
        assert!((a - b).abs() <= 1e-5 * a, "|x|² {a} vs |RoPE(x)|² {b}");
    }
    Ok(())
}

#[test]
fn score_depends_only_on_relative_position() -> Result<()> {
    // ⟨RoPE(q,m), RoPE(k,n)⟩ = ⟨RoPE(q,m+s), RoPE(k,n+s)⟩ for random q, k, m, n, s — computed
    // with the tensor implementation (f32) and checked against the f64 score.
    let d = 32;
    let tables = RopeTables::new(d, 512, DEFAULT_BASE, RopeScaling::None, &test_device())?;
    let q = rand_x(1, 1, 1, d)?;
    let k = rand_x(1, 1, 1, d)?;
    let score = |m: usize, n: usize| -> Result<f64> {
        let a = apply_rope(&q, &tables, m)?;
        let b = apply_rope(&k, &tables, n)?;
        Ok((a * b)?.sum_all()?.to_scalar::<f32>()? as f64)
    };
    let qv = q.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let kv = k.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let mut seed = 12345u64;
    let mut rnd = |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) % n) as usize
    };
    for _ in 0..20 {
        let (m, n, s) = (rnd(200), rnd(200), rnd(300));
        let base = score(m, n)?;
        let shifted = score(m + s, n + s)?;
        let f64_score = rope_score(&qv, m as f64, &kv, n as f64, DEFAULT_BASE);
        assert!(
            (base - shifted).abs() < 1e-4 * f64_score.abs().max(1.0),
            "m {m} n {n} s {s}: {base} vs {shifted}"
        );
        assert!((base - f64_score).abs() < 1e-4 * f64_score.abs().max(1.0));
        // and the f64 score is shift-invariant to rounding
        let f64_shifted = rope_score(&qv, (m + s) as f64, &kv, (n + s) as f64, DEFAULT_BASE);
        assert!((f64_score - f64_shifted).abs() < 1e-9 * f64_score.abs().max(1.0));
    }
    Ok(())
}

#[test]
fn beyond_table_is_a_clear_error() -> Result<()> {
    let tables = RopeTables::new(8, 16, DEFAULT_BASE, RopeScaling::None, &test_device())?;
    let x = rand_x(1, 1, 4, 8)?;
    assert!(apply_rope(&x, &tables, 12).is_ok());
    let e = apply_rope(&x, &tables, 13).unwrap_err().to_string();
    assert!(
        e.contains("positions 13..17 exceed the precomputed table of 16"),
        "{e}"
    );
    let e = apply_rope(&rand_x(1, 1, 4, 6)?, &tables, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("d_head (6)"), "{e}");
    Ok(())
}

#[test]
fn position_interpolation_equals_fractional_positions() -> Result<()> {
    let d = 16;
    let tables = RopeTables::new(
        d,
        64,
        DEFAULT_BASE,
        RopeScaling::PositionInterpolation { factor: 4.0 },
        &test_device(),
    )?;
    let x = rand_x(1, 1, 10, d)?;
    let y = apply_rope(&x, &tables, 30)?
        .reshape((10, d))?
        .to_vec2::<f32>()?;
    let xs = x.reshape((10, d))?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    for (t, xr) in xs.iter().enumerate() {
        let want = reference_rope(xr, (30 + t) as f64 / 4.0, DEFAULT_BASE);
        assert!(max_rel_err(&y[t], &want) < 1e-5);
    }
    Ok(())
}

#[test]
fn gradient_flows_through_rope_as_inverse_rotation() -> Result<()> {
    // d/dx Σ c ⊙ RoPE(x) = R_mᵀ c = RoPE⁻¹(c): rotating the gradient back.
    let d = 8;
    let tables = RopeTables::new(d, 16, DEFAULT_BASE, RopeScaling::None, &test_device())?;
    let x = Var::from_tensor(&rand_x(1, 1, 3, d)?)?;
    let c = rand_x(1, 1, 3, d)?;
    let loss = (apply_rope(x.as_tensor(), &tables, 5)? * &c)?.sum_all()?;
    let g = loss.backward()?.get(x.as_tensor()).unwrap().clone();
    // rotating the gradient forward again must give c back
    let back = apply_rope(&g, &tables, 5)?;
    let diff = (back - c)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-5, "{diff}");
    Ok(())
}

#[test]
fn fused_op_equals_the_composed_rotation_values_and_gradients() -> Result<()> {
    // f64 on the CPU (exact to rounding); on the GPU the kernel is f32/bf16/f16, so f32 there.
    let dev = test_device();
    let (dtype, tol) = if dev.is_cuda() {
        (DType::F32, 1e-5)
    } else {
        (DType::F64, 1e-12)
    };
    let (b, h, t, d, start) = (2, 3, 7, 16, 5);
    let tables = RopeTables::new(d, 32, DEFAULT_BASE, RopeScaling::None, &dev)?;
    let x = Var::from_tensor(&rand_x(b, h, t, d)?.to_dtype(dtype)?)?;
    let dy = rand_x(b, h, t, d)?.to_dtype(dtype)?;
    let fused = apply_rope_fused(x.as_tensor(), &tables, start)?;
    let composed = apply_rope(x.as_tensor(), &tables, start)?;
    let diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
        (a - b)?
            .abs()?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()
    };
    assert!(diff(&fused, &composed)? < tol, "values differ");
    let gf = (&fused * &dy)?.sum_all()?.backward()?;
    let gc = (&composed * &dy)?.sum_all()?.backward()?;
    let (gf, gc) = (
        gf.get(x.as_tensor()).unwrap(),
        gc.get(x.as_tensor()).unwrap(),
    );
    assert!(diff(gf, gc)? < tol, "gradients differ by {}", diff(gf, gc)?);
    // The gradient of a rotation is the inverse rotation: rotating it forward gives dy back
    // (to the f32 precision of the tables, where cos² + sin² = 1 ± 1e-7).
    let back = apply_rope_fused(gf, &tables, start)?;
    assert!(diff(&back, &dy)? < 1e-5, "R·(Rᵀ·dy) ≠ dy");
    // Through the tables' switch, the same.
    let via = tables.with_fused(true);
    assert!(diff(&via.apply(x.as_tensor(), start)?, &composed)? < tol);
    Ok(())
}

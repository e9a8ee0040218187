//! RoPE against a float64 reference, candle-nn's `rope_i`, and its mathematical properties.

use candle_core::{DType, Result, Tensor, Var};
use shared::device::test_device;
use shared::kernels::OpImpl;
use std::sync::Arc;
use t0801_self_attention::reference_attention;
use t0802_multi_head_attention::{AttentionKernel, AttnMask, MultiHeadAttention, NaiveAttention};
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
    let via = tables.with_impl(OpImpl::Fused);
    assert!(diff(&via.apply(x.as_tensor(), start)?, &composed)? < tol);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// RoPE as the position plug of 8-02's attention component.

fn max_rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let b = b.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    assert_eq!(a.len(), b.len());
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f64::max))
}

/// An attention layer of `n_heads` query and `n_kv` K/V heads with random weights and RoPE
/// tables of 64 positions plugged in.
fn rope_attention(d: usize, h: usize, n_kv: usize) -> Result<MultiHeadAttention> {
    let dev = test_device();
    let w = |rows: usize| Tensor::randn(0f32, 0.3, (rows, d), &dev);
    let kv_rows = n_kv * d / h;
    let tables = RopeTables::new(d / h, 64, DEFAULT_BASE, RopeScaling::None, &dev)?;
    Ok(
        MultiHeadAttention::from_weights(h, w(d)?, w(kv_rows)?, w(kv_rows)?, w(d)?)?
            .with_positions(Some(Arc::new(tables))),
    )
}

/// The f64 definition: project, rotate each head vector of `q` and `k` at its absolute position
/// `start + t`, causal attention per head (query head `h` reads K/V head `h / g`), concatenate,
/// `W_o`. `x (n, d)` → `(n, d)`.
fn reference_rope_attention(attn: &MultiHeadAttention, x: &Tensor, start: usize) -> Result<Tensor> {
    let to64 = |t: &Tensor| t.to_dtype(DType::F64)?.to_vec2::<f64>();
    let (xs, wq, wk, wv, wo) = (
        to64(x)?,
        to64(&attn.w_q)?,
        to64(&attn.w_k)?,
        to64(&attn.w_v)?,
        to64(&attn.w_o)?,
    );
    let (n, d) = (xs.len(), attn.cfg.d_model);
    let (h, dh) = (attn.cfg.n_heads, attn.d_head());
    let g = h / attn.cfg.n_kv_heads;
    let proj = |w: &Vec<Vec<f64>>, t: usize, head: usize| -> Vec<f64> {
        w[head * dh..(head + 1) * dh]
            .iter()
            .map(|row| row.iter().zip(&xs[t]).map(|(a, b)| a * b).sum())
            .collect()
    };
    let rot = |v: Vec<f64>, t: usize| reference_rope(&v, (start + t) as f64, DEFAULT_BASE);
    let mask: Vec<Vec<bool>> = (0..n).map(|i| (0..n).map(|j| j <= i).collect()).collect();
    let mut concat = vec![vec![0.0; d]; n];
    for head in 0..h {
        let q: Vec<Vec<f64>> = (0..n).map(|t| rot(proj(&wq, t, head), t)).collect();
        let k: Vec<Vec<f64>> = (0..n).map(|t| rot(proj(&wk, t, head / g), t)).collect();
        let v: Vec<Vec<f64>> = (0..n).map(|t| proj(&wv, t, head / g)).collect();
        let (out, _) = reference_attention(&q, &k, &v, Some(&mask));
        for t in 0..n {
            concat[t][head * dh..(head + 1) * dh].copy_from_slice(&out[t]);
        }
    }
    let y: Vec<f64> = concat
        .iter()
        .flat_map(|c| {
            wo.iter()
                .map(move |row| row.iter().zip(c).map(|(a, b)| a * b).sum::<f64>())
        })
        .collect();
    Tensor::from_vec(y, (n, d), x.device())
}

#[test]
fn component_with_rope_plug_equals_f64_rotate_then_attend() -> Result<()> {
    let (d, h, n) = (32, 4, 6);
    let attn = rope_attention(d, h, h)?;
    let x = Tensor::randn(0f32, 1.0, (1, n, d), &test_device())?;
    for start in [0, 5, 40] {
        let got = attn
            .self_attention(&x, AttnMask::Causal, start, None)?
            .squeeze(0)?;
        let want = reference_rope_attention(&attn, &x.squeeze(0)?, start)?;
        assert!(max_rel(&got, &want)? < 1e-5, "start_pos {start}");
    }
    Ok(())
}

#[test]
fn gqa_and_mqa_with_rope_match_f64_reference() -> Result<()> {
    let (d, h, n) = (32, 4, 6);
    for n_kv in [1, 2] {
        let attn = rope_attention(d, h, n_kv)?;
        assert_eq!(attn.cfg.n_kv_heads, n_kv);
        let x = Tensor::randn(0f32, 1.0, (1, n, d), &test_device())?;
        let start = 5;
        let got = attn
            .self_attention(&x, AttnMask::Causal, start, None)?
            .squeeze(0)?;
        let want = reference_rope_attention(&attn, &x.squeeze(0)?, start)?;
        assert!(max_rel(&got, &want)? < 1e-5, "n_kv {n_kv}");
    }
    Ok(())
}

#[test]
fn rope_plug_at_start_pos_equals_rotating_by_hand() -> Result<()> {
    // The component's path (project → plug rotates q, k at start_pos → kernel → W_o) against
    // the same steps written out with apply_rope, for grouped K/V heads.
    let (d, h, n_kv, b, n, start) = (48, 6, 2, 2, 7, 11);
    let attn = rope_attention(d, h, n_kv)?;
    let tables = RopeTables::new(d / h, 64, DEFAULT_BASE, RopeScaling::None, &test_device())?;
    let x = Tensor::randn(0f32, 1.0, (b, n, d), &test_device())?;
    let q = apply_rope(&attn.project_q(&x)?, &tables, start)?; // (b, h, n, d_head)
    let (k, v) = attn.project_kv(&x)?; // (b, n_kv, n, d_head)
    let k = apply_rope(&k, &tables, start)?;
    let want = attn.output(&NaiveAttention.attend(&q, &k, &v, AttnMask::Causal, None)?)?;
    let got = attn.self_attention(&x, AttnMask::Causal, start, None)?;
    assert!(max_rel(&got, &want)? < 1e-6);
    Ok(())
}

#[test]
fn rope_attention_is_invariant_to_shifting_every_position() -> Result<()> {
    // Only offsets m − n enter the scores, so the whole layer gives the same output whether the
    // window starts at position 0 or 37 — what absolute position embeddings cannot do.
    let attn = rope_attention(32, 4, 2)?;
    let x = Tensor::randn(0f32, 1.0, (2, 9, 32), &test_device())?;
    let at0 = attn.self_attention(&x, AttnMask::Causal, 0, None)?;
    let at37 = attn.self_attention(&x, AttnMask::Causal, 37, None)?;
    assert!(max_rel(&at0, &at37)? < 1e-4);
    // while the rotated queries themselves do change
    let tables = RopeTables::new(8, 64, DEFAULT_BASE, RopeScaling::None, &test_device())?;
    let q = attn.project_q(&x)?;
    assert!(max_rel(&apply_rope(&q, &tables, 0)?, &apply_rope(&q, &tables, 37)?)? > 1e-2);
    Ok(())
}

#[test]
fn llama_rung_plugs_rope_into_every_layer() -> Result<()> {
    use t0804_transformer_block::{init_lm, LmShape, PositionKind};
    let shape = LmShape {
        vocab_size: 50,
        max_seq_len: 16,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
    };
    let cfg = llama(shape, 2);
    assert_eq!(
        (cfg.positions, cfg.n_kv_heads, cfg.bias),
        (PositionKind::Rope, 2, false)
    );
    let kernels = shared::Kernels::composed();
    let (_vm, lm) = init_lm(&cfg, &parts(kernels), DType::F32, &test_device())?;
    assert!(
        lm.positions.is_none(),
        "no absolute positions on the embeddings"
    );
    assert!(lm.blocks.iter().all(|b| b.attn.positions.is_some()));
    assert_eq!(lm.kv_heads(), (2, 8));
    let x = Tensor::new(&[[1u32, 2, 3, 4, 5]], &test_device())?;
    assert_eq!(lm.forward(&x, 0)?.dims(), &[1, 5, 50]);
    Ok(())
}

/// The device-position form (a gathered table row, 8-10's static cache) rotates exactly like the
/// host offset, composed and fused; positions outside one token per sequence are refused.
#[test]
fn rotate_at_a_device_position_equals_the_host_offset() -> Result<()> {
    use t0802_multi_head_attention::PositionPlug;
    let dev = test_device();
    for imp in [OpImpl::Composed, OpImpl::Fused] {
        let tables = RopeTables::new(16, 40, DEFAULT_BASE, RopeScaling::None, &dev)?.with_impl(imp);
        let (q, k) = (rand_x(2, 4, 1, 16)?, rand_x(2, 2, 1, 16)?);
        for pos in [0u32, 1, 17, 39] {
            let (qh, kh) = tables.rotate(&q, &k, pos as usize)?;
            let (qd, kd) = tables.rotate_at(&q, &k, &Tensor::new(&[pos], &dev)?)?;
            for (a, b) in [(qh, qd), (kh, kd)] {
                let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert_eq!(diff, 0.0, "{imp:?} position {pos}");
            }
        }
        let e = tables
            .rotate_at(
                &rand_x(1, 4, 2, 16)?,
                &rand_x(1, 4, 2, 16)?,
                &Tensor::new(&[3u32], &dev)?,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("one token per sequence"), "{e}");
        let e = tables
            .rotate_at(&q, &k, &Tensor::new(&[3i64], &dev)?)
            .unwrap_err()
            .to_string();
        assert!(e.contains("(1,) u32"), "{e}");
    }
    Ok(())
}

/// The fused op at a device position (the whole tables, the row chosen inside the kernel) has the
/// host offset's values and gradient, for several tokens from the position on; positions past the
/// tables are refused on the CPU, where they can be read.
#[test]
fn fused_rope_at_a_device_position_has_the_host_offsets_gradient() -> Result<()> {
    let dev = test_device();
    let tables = RopeTables::new(8, 20, DEFAULT_BASE, RopeScaling::None, &dev)?;
    let x = Var::from_tensor(&rand_x(2, 3, 4, 8)?)?;
    let c = rand_x(2, 3, 4, 8)?;
    let at = apply_rope_fused_at(x.as_tensor(), &tables, &Tensor::new(&[11u32], &dev)?)?;
    let host = apply_rope_fused(x.as_tensor(), &tables, 11)?;
    let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    };
    assert_eq!(diff(&at, &host)?, 0.0);
    let g_at = (&at * &c)?.sum_all()?.backward()?;
    let g_host = (&host * &c)?.sum_all()?.backward()?;
    assert_eq!(
        diff(
            g_at.get(x.as_tensor()).unwrap(),
            g_host.get(x.as_tensor()).unwrap()
        )?,
        0.0
    );
    if dev.is_cpu() {
        let e = apply_rope_fused_at(x.as_tensor(), &tables, &Tensor::new(&[17u32], &dev)?)
            .unwrap_err()
            .to_string();
        assert!(e.contains("exceed"), "{e}");
    }
    Ok(())
}

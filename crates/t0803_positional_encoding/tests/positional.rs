//! Position encodings against their closed forms and the properties that make them useful.

// Index loops mirror the formulas (b[h][i][j], table[h][bucket]) in these reference checks.
#![allow(clippy::needless_range_loop)]

use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use shared::device::test_device;
use std::sync::Arc;
use t0801_self_attention::{reference_attention, scaled_dot_product_attention};
use t0802_multi_head_attention::{AttnMask, MhaConfig, MultiHeadAttention, PositionPlug};
use t0803_positional_encoding::*;

/// `PE(pos, 2i) = sin(pos / base^(2i/d))`, `PE(pos, 2i+1) = cos(…)`, straight from the paper, in f64.
fn closed_form(pos: f64, d: usize, base: f64) -> Vec<f64> {
    (0..d)
        .map(|j| {
            let angle = pos / base.powf((2 * (j / 2)) as f64 / d as f64);
            if j % 2 == 0 {
                angle.sin()
            } else {
                angle.cos()
            }
        })
        .collect()
}

#[test]
fn sinusoidal_matches_the_closed_form_at_chosen_positions() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = test_device();
    for (d, base) in [(16, DEFAULT_BASE), (64, DEFAULT_BASE), (10, 100.0)] {
        let positions = [0.0, 1.0, 2.0, 7.0, 50.0, 299.0, 1000.0, 4095.0, 2.5];
        let pe = sinusoidal_at(&positions, d, base, &dev)?;
        assert_eq!(pe.dims(), &[positions.len(), d]);
        assert_eq!(pe.dtype(), DType::F32);
        for (row, &p) in pe.to_vec2::<f32>()?.iter().zip(&positions) {
            for (j, (got, want)) in row.iter().zip(closed_form(p, d, base)).enumerate() {
                // One f32 rounding of a value in [−1, 1]: ≤ 6e-8 away.
                assert!(
                    (*got as f64 - want).abs() <= 1e-7,
                    "d {d} base {base} pos {p} dim {j}: {got} vs {want}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn offsets_select_the_right_rows() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = test_device();
    let full = sinusoidal(40, 32, 0, &dev)?;
    let tail = sinusoidal(9, 32, 31, &dev)?;
    assert_eq!(
        tail.to_vec2::<f32>()?,
        full.narrow(0, 31, 9)?.to_vec2::<f32>()?
    );
    let one = sinusoidal(1, 32, 123, &dev)?.to_vec2::<f32>()?;
    for (got, want) in one[0].iter().zip(closed_form(123.0, 32, DEFAULT_BASE)) {
        assert!((*got as f64 - want).abs() <= 1e-7);
    }
    Ok(())
}

/// For every frequency pair, `[sin, cos]((p+k)ω) = R(kω)·[sin, cos](pω)` with the *same* 2×2
/// rotation for every position `p`: a relative shift is a fixed linear map of the encoding.
#[test]
fn shifting_by_k_is_a_fixed_rotation_of_each_pair() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = test_device();
    let (d, n) = (32, 600);
    let pe = sinusoidal(n, d, 0, &dev)?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    let omega = frequencies(d, DEFAULT_BASE)?;
    for k in [1usize, 5, 37, 250] {
        for (i, w) in omega.iter().enumerate() {
            let (s, c) = (k as f64 * w).sin_cos();
            let r = [[c, s], [-s, c]]; // depends on k and ω only
            for p in [0usize, 3, 100, 333, n - 1 - k] {
                let (a, b) = (pe[p][2 * i], pe[p][2 * i + 1]);
                let want = [r[0][0] * a + r[0][1] * b, r[1][0] * a + r[1][1] * b];
                let got = [pe[p + k][2 * i], pe[p + k][2 * i + 1]];
                for (g, w) in got.iter().zip(want) {
                    assert!((g - w).abs() < 1e-6, "k {k} pair {i} pos {p}: {g} vs {w}");
                }
            }
        }
        // The library's block-diagonal M_k does the same for whole rows: PE[k..] = PE[..n−k]·M_kᵀ.
        let m = shift_matrix(k as f64, d, DEFAULT_BASE, &dev)?;
        let pe_t = Tensor::new(pe.clone(), &dev)?;
        let shifted = pe_t.narrow(0, 0, n - k)?.matmul(&m.t()?)?;
        let err = (shifted - pe_t.narrow(0, k, n - k)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(err < 1e-6, "shift matrix for k = {k}: max error {err}");
        // M_k is orthogonal (a rotation): it preserves ‖PE(p)‖² = d/2.
        let norms = m.matmul(&m.t()?)?;
        let eye = Tensor::eye(d, DType::F64, &dev)?;
        assert!((norms - eye)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-12);
    }
    Ok(())
}

#[test]
fn dot_product_between_positions_depends_on_the_offset_only() -> Result<()> {
    let _init = shared::params::init_turn();
    let pe = sinusoidal(300, 64, 0, &test_device())?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    let dot = |a: usize, b: usize| pe[a].iter().zip(&pe[b]).map(|(x, y)| x * y).sum::<f64>();
    let omega = frequencies(64, DEFAULT_BASE)?;
    for k in [0usize, 1, 10, 100] {
        let want: f64 = omega.iter().map(|w| (k as f64 * w).cos()).sum(); // Σᵢ cos(kωᵢ)
        for p in [0usize, 17, 150, 199] {
            assert!(
                (dot(p, p + k) - want).abs() < 1e-5,
                "k {k} p {p}: {} vs {want}",
                dot(p, p + k)
            );
        }
    }
    Ok(())
}

#[test]
fn learned_table_has_its_shape_name_and_refuses_positions_beyond_it() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = test_device();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let learned = LearnedPositions::new(vb.pp("pos"), 256, 24)?;
    assert_eq!(learned.table.dims(), &[256, 24]);
    assert_eq!((learned.max_len(), learned.d_model()), (256, 24));
    let names: Vec<String> = shared::params::named_vars(&varmap)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, vec!["pos.position_embeddings".to_string()]);
    // Initialised N(0, 0.02²) truncated at ±3σ.
    let max = learned.table.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    assert!(
        max <= 3.0 * LEARNED_INIT_STD + 1e-7 && max > LEARNED_INIT_STD,
        "max |w| {max}"
    );

    // forward(seq, offset) is rows offset..offset+seq of the table, and carries gradients to them.
    let rows = learned.forward(5, 250)?;
    assert_eq!(
        rows.to_vec2::<f32>()?,
        learned.table.narrow(0, 250, 5)?.to_vec2::<f32>()?
    );
    let full = learned.forward(256, 0)?;
    assert_eq!(full.dims(), &[256, 24]);
    let grads = rows.sum_all()?.backward()?;
    let g = grads
        .get(&learned.table)
        .expect("gradient reaches the table")
        .sum_keepdim(1)?
        .squeeze(1)?
        .to_vec1::<f32>()?;
    assert_eq!(g[249], 0.0);
    assert_eq!(g[250], 24.0);

    // Positions 0..=300 need row 300: an error naming it, not an out-of-bounds read.
    for (seq, offset) in [(301, 0), (10, 291), (1, 300)] {
        let err = learned.forward(seq, offset).unwrap_err().to_string();
        assert!(
            err.starts_with("position 300 is beyond the learned table of 256 positions"),
            "{err}"
        );
    }
    let err = learned.forward(1, 256).unwrap_err().to_string();
    assert!(err.contains("position 256 is beyond"), "{err}");
    assert!(LearnedPositions::from_weights(Tensor::zeros(7, DType::F32, &dev)?).is_err());
    Ok(())
}

#[test]
fn t5_buckets_at_chosen_offsets() {
    let _init = shared::params::init_turn();
    // Bidirectional, 32 buckets, max distance 128: 16 buckets per direction, 8 exact.
    // Past keys (j < i) in 0..16, future keys in 16..32; n ≥ 8 → 8 + ⌊ln(n/8)/ln(16)·8⌋.
    let bi = |r| relative_position_bucket(r, 32, 128, true);
    let cases = [
        (0, 0),
        (-1, 1),
        (-3, 3),
        (-7, 7),
        (-8, 8),
        (-16, 10),
        (-20, 10),
        (-32, 12),
        (-127, 15),
        (-128, 15),
        (-100_000, 15),
    ];
    for (offset, bucket) in cases {
        assert_eq!(bi(offset), bucket, "past offset {offset}");
        if offset != 0 {
            assert_eq!(bi(-offset), 16 + bucket, "future offset {}", -offset);
        }
    }
    // Causal, 32 buckets, max distance 128: 16 exact; n ≥ 16 → 16 + ⌊ln(n/16)/ln(8)·16⌋; future → 0.
    let uni = |r| relative_position_bucket(r, 32, 128, false);
    for (offset, bucket) in [
        (0, 0),
        (-3, 3),
        (-15, 15),
        (-16, 16),
        (-32, 21),
        (-40, 23),
        (-64, 26),
        (-127, 31),
        (-500, 31),
        (5, 0),
        (1000, 0),
    ] {
        assert_eq!(uni(offset), bucket, "causal offset {offset}");
    }
}

fn rel_bias(cfg: RelativeBiasConfig) -> Result<RelativePositionBias> {
    let table = Tensor::randn(0f32, 1.0, (cfg.n_heads, cfg.n_buckets), &test_device())?;
    RelativePositionBias::from_weights(table, cfg)
}

#[test]
fn relative_bias_depends_only_on_the_offset() -> Result<()> {
    let _init = shared::params::init_turn();
    for cfg in [
        RelativeBiasConfig::t5(3),
        RelativeBiasConfig {
            n_heads: 2,
            n_buckets: 8,
            max_distance: 12,
            bidirectional: false,
        },
    ] {
        let rel = rel_bias(cfg)?;
        let n = 40;
        let b = rel.forward(n, n)?;
        assert_eq!(b.dims(), &[cfg.n_heads, n, n]);
        let b = b.to_vec3::<f32>()?;
        let table = rel.table.to_vec2::<f32>()?;
        for h in 0..cfg.n_heads {
            for i in 0..n {
                for j in 0..n {
                    let bucket = relative_position_bucket(
                        j as i64 - i as i64,
                        cfg.n_buckets,
                        cfg.max_distance,
                        cfg.bidirectional,
                    );
                    assert_eq!(b[h][i][j], table[h][bucket]);
                    if i + 1 < n && j + 1 < n {
                        assert_eq!(
                            b[h][i][j],
                            b[h][i + 1][j + 1],
                            "not constant along a diagonal at ({i}, {j})"
                        );
                    }
                }
            }
        }
        // Queries are the last n_q positions: a (3, 40) bias is the last 3 rows of the (40, 40) one.
        let last = rel.forward(3, n)?.to_vec3::<f32>()?;
        for h in 0..cfg.n_heads {
            assert_eq!(last[h], b[h][n - 3..].to_vec());
        }
    }
    Ok(())
}

/// `attention_with_bias` against a float64 loop of `softmax(q·k/√d + bias)·v`, and its two
/// special cases: no bias = t0801's attention; masked entries stay at weight 0 whatever the bias.
#[test]
fn attention_with_bias_matches_a_float64_reference() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = test_device();
    let (h, n_q, n_k, d) = (3, 5, 7, 4);
    let q = Tensor::randn(0f32, 1.0, (2, h, n_q, d), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (2, h, n_k, d), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (2, h, n_k, d + 1), &dev)?;
    let bias = Tensor::randn(0f32, 2.0, (h, n_q, n_k), &dev)?;
    let att = attention_with_bias(&q, &k, &v, Some(&bias), None)?;
    let f64s = |t: &Tensor| t.to_dtype(DType::F64);
    let (q4, k4, v4, b3) = (
        f64s(&q)?,
        f64s(&k)?,
        f64s(&v)?,
        f64s(&bias)?.to_vec3::<f64>()?,
    );
    for bi in 0..2 {
        for hi in 0..h {
            let qm = q4.get(bi)?.get(hi)?.to_vec2::<f64>()?;
            let km = k4.get(bi)?.get(hi)?.to_vec2::<f64>()?;
            let vm = v4.get(bi)?.get(hi)?.to_vec2::<f64>()?;
            let out = att
                .output
                .get(bi)?
                .get(hi)?
                .to_dtype(DType::F64)?
                .to_vec2::<f64>()?;
            for i in 0..n_q {
                let s: Vec<f64> = (0..n_k)
                    .map(|j| {
                        qm[i].iter().zip(&km[j]).map(|(a, b)| a * b).sum::<f64>()
                            / (d as f64).sqrt()
                            + b3[hi][i][j]
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d + 1 {
                    let want: f64 = (0..n_k).map(|j| e[j] / z * vm[j][c]).sum();
                    assert!(
                        (out[i][c] - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{} vs {want}",
                        out[i][c]
                    );
                }
            }
        }
    }
    // No bias: exactly t0801's attention (also checked against its f64 reference on one head).
    let plain = attention_with_bias(&q, &k, &v, None, None)?;
    let t0801 = scaled_dot_product_attention(&q, &k, &v, None)?;
    assert_eq!(
        plain.output.flatten_all()?.to_vec1::<f32>()?,
        t0801.output.flatten_all()?.to_vec1::<f32>()?
    );
    let (want, _) = reference_attention(
        &q4.get(0)?.get(0)?.to_vec2()?,
        &k4.get(0)?.get(0)?.to_vec2()?,
        &v4.get(0)?.get(0)?.to_vec2()?,
        None,
    );
    let got = plain
        .output
        .get(0)?
        .get(0)?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()));
    }
    // A huge bias on a masked key does not resurrect it.
    let mask = t0801_self_attention::causal_mask(n_q, n_k, &dev)?;
    let big = (Tensor::ones((h, n_q, n_k), DType::F32, &dev)? * 1e4)?;
    let w = attention_with_bias(&q, &k, &v, Some(&big), Some(&mask))?
        .weights
        .get(0)?
        .get(0)?
        .to_vec2::<f32>()?;
    assert_eq!(w[0][n_k - n_q + 1..], vec![0.0; n_q - 1][..]);
    // A wrong bias shape is named.
    let err = attention_with_bias(
        &q,
        &k,
        &v,
        Some(&Tensor::zeros((4, 4), DType::F32, &dev)?),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("[4, 4]") && err.contains("does not broadcast"),
        "{err}"
    );
    Ok(())
}

/// A position plug that adds a fixed score bias (or none).
struct FixedBias(Option<Tensor>);

impl PositionPlug for FixedBias {
    fn score_bias(&self, _n_q: usize, _n_k: usize) -> Result<Option<Tensor>> {
        Ok(self.0.clone())
    }
}

#[test]
fn relative_bias_receives_gradients_through_multi_head_attention() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = test_device();
    let (d, heads, n) = (8, 2, 6);
    let mha = MultiHeadAttention::from_weights(
        heads,
        Tensor::randn(0f32, 0.5, (d, d), &dev)?,
        Tensor::randn(0f32, 0.5, (d, d), &dev)?,
        Tensor::randn(0f32, 0.5, (d, d), &dev)?,
        Tensor::randn(0f32, 0.5, (d, d), &dev)?,
    )?;
    let x = Tensor::randn(0f32, 1.0, (2, n, d), &dev)?;
    // A plug that adds no bias: identical to t0802's forward without a plug.
    let a = mha
        .clone()
        .with_positions(Some(Arc::new(FixedBias(None))))
        .forward(&x, None)?
        .output
        .flatten_all()?
        .to_vec1::<f32>()?;
    let b = mha
        .forward(&x, None)?
        .output
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(a, b);
    // With a learnable table: the loss depends on it, and only the buckets in use get a gradient.
    let cfg = RelativeBiasConfig {
        n_heads: heads,
        n_buckets: 16,
        max_distance: 32,
        bidirectional: true,
    };
    let table = Var::from_tensor(&Tensor::zeros((heads, 16), DType::F32, &dev)?)?;
    let rel = RelativePositionBias::from_weights(table.as_tensor().clone(), cfg)?;
    let with_rel = mha.clone().with_positions(Some(Arc::new(rel.clone())));
    let out = with_rel.forward(&x, None)?.output;
    // The training path (through the kernel) computes the same as the inspection path.
    let fast = with_rel.self_attention(&x, AttnMask::None, 0, None)?;
    assert!((&fast - &out)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
    let grads = (out.sqr()?.sum_all()?).backward()?;
    let g = grads
        .get(table.as_tensor())
        .expect("the table gets a gradient")
        .to_vec2::<f32>()?;
    let used: Vec<usize> = (-(n as i64) + 1..n as i64)
        .map(|r| relative_position_bucket(r, 16, 32, true))
        .collect();
    for h in 0..heads {
        for (bucket, gv) in g[h].iter().enumerate() {
            if used.contains(&bucket) {
                assert!(
                    gv.abs() > 0.0,
                    "head {h} bucket {bucket} in use but zero gradient"
                );
            } else {
                assert_eq!(
                    *gv, 0.0,
                    "head {h} bucket {bucket} unused but gradient {gv}"
                );
            }
        }
    }
    let three_heads = Tensor::zeros((3, n, n), DType::F32, &dev)?;
    let err = mha
        .clone()
        .with_positions(Some(Arc::new(FixedBias(Some(three_heads)))))
        .forward(&x, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[3, 6, 6]") && err.contains("does not broadcast"),
        "{err}"
    );
    Ok(())
}

/// Self-attention commutes with permutations of the sequence (`f(P·x) = P·f(x)`); adding
/// positions breaks that. Both directions are checked so that the test fails if the encoding were
/// silently ignored (or if the permutation machinery were wrong).
#[test]
fn positions_break_permutation_equivariance() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = test_device();
    let (d, heads, n) = (16, 4, 9);
    shared::params::set_seed(3);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let mha = MultiHeadAttention::new(vb.pp("attn"), MhaConfig::new(d, heads))?;
    let x = Tensor::randn(0f32, 1.0, (2, n, d), &dev)?;
    let perm = Tensor::new(&[3u32, 0, 8, 1, 7, 2, 6, 4, 5], &dev)?;
    let gap = |positions: &Positions| -> Result<f64> {
        let f = |x: &Tensor| -> Result<Tensor> {
            let h = positions.add_to_input(x, 0)?;
            let plug: Arc<dyn PositionPlug> = Arc::new(positions.clone());
            Ok(mha
                .clone()
                .with_positions(Some(plug))
                .forward(&h, None)?
                .output)
        };
        let lhs = f(&x.index_select(&perm, 1)?)?; // f(P·x)
        let rhs = f(&x)?.index_select(&perm, 1)?; // P·f(x)
        (lhs - rhs)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()
            .map(|v| v as f64)
    };
    let none = Positions::new(
        vb.pp("none"),
        &PositionConfig::new(PositionScheme::None, d, heads, 16),
    )?;
    assert!(
        gap(&none)? < 1e-5,
        "attention without positions must be permutation-equivariant: gap {}",
        gap(&none)?
    );
    for scheme in [
        PositionScheme::Sinusoidal,
        PositionScheme::Learned,
        PositionScheme::RelativeBias,
    ] {
        let mut cfg = PositionConfig::new(scheme, d, heads, 16);
        cfg.max_distance = 16;
        let mut positions = Positions::new(vb.pp(scheme.name()), &cfg)?;
        if let Positions::Learned(l) = &positions {
            // Fresh tables are tiny (σ = 0.02): use unit-scale rows so the effect is not marginal.
            positions =
                Positions::Learned(LearnedPositions::from_weights((l.table.clone() * 50.0)?)?);
        }
        let g = gap(&positions)?;
        assert!(
            g > 1e-2,
            "{scheme}: positions should break permutation equivariance, gap {g}"
        );
    }
    Ok(())
}

#[test]
fn schemes_parse_print_and_build() -> Result<()> {
    let _init = shared::params::init_turn();
    for s in PositionScheme::ALL {
        assert_eq!(s.name().parse::<PositionScheme>()?, s);
        assert_eq!(s.to_string(), s.name());
    }
    assert_eq!(
        "relative-bias".parse::<PositionScheme>()?,
        PositionScheme::RelativeBias
    );
    assert!("rope"
        .parse::<PositionScheme>()
        .unwrap_err()
        .to_string()
        .contains("'rope'"));
    let dev = test_device();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let (d, heads) = (8, 2);
    for s in PositionScheme::ALL {
        let p = Positions::new(vb.pp(s.name()), &PositionConfig::new(s, d, heads, 10))?;
        assert_eq!(p.scheme(), s);
        let enc = p.input_encoding(4, 3, &dev)?;
        assert_eq!(enc.is_some(), s.is_absolute(), "{s}");
        let bias = p.attention_bias(4, 6)?;
        assert_eq!(
            bias.map(|b| b.dims().to_vec()),
            (s == PositionScheme::RelativeBias).then(|| vec![heads, 4, 6])
        );
        // Beyond the table only the learned scheme fails.
        assert_eq!(
            p.input_encoding(4, 7, &dev).is_err(),
            !s.any_length(),
            "{s}"
        );
    }
    let mut names: Vec<String> = shared::params::named_vars(&varmap)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "learned.position_embeddings",
            "relative_bias.relative_attention_bias"
        ]
    );
    assert!(Positions::new(
        vb.pp("odd"),
        &PositionConfig::new(PositionScheme::Sinusoidal, 7, 1, 10)
    )
    .is_err());
    Ok(())
}

//! LayerNorm and the blocks against float64 references, masking properties, and a gradient check.

use candle_core::{DType, Result, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use shared::device::test_device;
use t0801_self_attention::{causal_mask, key_padding_mask, reference_attention};
use t0804_transformer_block::*;

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
    Ok(num / b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?.max(1e-30))
}

fn cfg(placement: NormPlacement) -> BlockConfig {
    BlockConfig {
        d_model: 12,
        n_heads: 3,
        d_ff: 20,
        activation: Activation::Relu,
        placement,
        bias: true,
        eps: 1e-5,
    }
}

/// Random parameters everywhere (gains and biases too), so the references check every term.
fn randomise(varmap: &VarMap) -> Result<()> {
    for (_, v) in shared::params::named_vars(varmap) {
        v.set(&Tensor::randn(0f64, 0.3, v.shape(), v.device())?.to_dtype(v.dtype())?)?;
    }
    Ok(())
}

fn ln_ref(x: &[f64], g: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    x.iter()
        .enumerate()
        .map(|(i, v)| (v - mean) / (var + eps).sqrt() * g[i] + b[i])
        .collect()
}

fn matvec(w: &[Vec<f64>], x: &[f64], b: Option<&[f64]>) -> Vec<f64> {
    w.iter()
        .enumerate()
        .map(|(o, row)| {
            row.iter().zip(x).map(|(a, c)| a * c).sum::<f64>() + b.map_or(0.0, |b| b[o])
        })
        .collect()
}

fn vec1(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}
fn vec2(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
}

#[test]
fn layer_norm_matches_float64_and_candle_nn() -> Result<()> {
    let dev = test_device();
    let x = Tensor::randn(0f32, 2.0, (3, 5, 16), &dev)?;
    let g = Tensor::randn(1f32, 0.5, 16, &dev)?;
    let b = Tensor::randn(0f32, 0.5, 16, &dev)?;
    let ln = LayerNorm::from_weights(g.clone(), b.clone(), 1e-5)?;
    let ours = ln.forward(&x)?;
    let reference = candle_nn::ops::layer_norm(&x, &g, &b, 1e-5)?;
    assert!(rel_err(&ours, &reference)? < 1e-5);
    let rows = vec2(&x.reshape((15, 16))?);
    let got = vec2(&ours.reshape((15, 16))?);
    for (r, gr) in rows.iter().zip(&got) {
        for (a, w) in gr.iter().zip(ln_ref(r, &vec1(&g), &vec1(&b), 1e-5)) {
            assert!((a - w).abs() < 1e-5 * (1.0 + w.abs()));
        }
    }
    Ok(())
}

/// Float64 reference of multi-head attention (heads = row groups of the projections).
fn mha_ref(
    x_q: &[Vec<f64>],
    x_kv: &[Vec<f64>],
    p: &[Vec<Vec<f64>>; 4],
    bias: &[Vec<f64>; 4],
    heads: usize,
    mask: Option<&[Vec<bool>]>,
) -> Vec<Vec<f64>> {
    let proj = |xs: &[Vec<f64>], i: usize| -> Vec<Vec<f64>> {
        xs.iter()
            .map(|x| matvec(&p[i], x, Some(&bias[i])))
            .collect()
    };
    let (q, k, v) = (proj(x_q, 0), proj(x_kv, 1), proj(x_kv, 2));
    let d = q[0].len();
    let dh = d / heads;
    let mut concat = vec![vec![0.0; d]; q.len()];
    for h in 0..heads {
        let cut = |m: &Vec<Vec<f64>>| -> Vec<Vec<f64>> {
            m.iter().map(|r| r[h * dh..(h + 1) * dh].to_vec()).collect()
        };
        let (out, _) = reference_attention(&cut(&q), &cut(&k), &cut(&v), mask);
        for (i, row) in out.iter().enumerate() {
            concat[i][h * dh..(h + 1) * dh].copy_from_slice(row);
        }
    }
    concat
        .iter()
        .map(|c| matvec(&p[3], c, Some(&bias[3])))
        .collect()
}

#[test]
fn encoder_block_matches_float64_reference_pre_and_post() -> Result<()> {
    for placement in [NormPlacement::Pre, NormPlacement::Post] {
        let dev = test_device();
        let varmap = VarMap::new();
        let block = EncoderBlock::new(
            VarBuilder::from_varmap(&varmap, DType::F64, &dev),
            &cfg(placement),
        )?;
        randomise(&varmap)?;
        let x = Tensor::randn(0f64, 1.0, (1, 6, 12), &dev)?;
        let got = vec2(&block.forward(&x, None)?.squeeze(0)?);
        let a = &block.self_attn;
        let bs = a.biases.as_ref().unwrap();
        let p = [vec2(&a.w_q), vec2(&a.w_k), vec2(&a.w_v), vec2(&a.w_o)];
        let pb = [vec1(&bs[0]), vec1(&bs[1]), vec1(&bs[2]), vec1(&bs[3])];
        let vars = shared::params::named_vars(&varmap);
        let param = |name: &str| -> Vec<f64> {
            let (_, v) = vars.iter().find(|(n, _)| n == name).expect(name);
            vec1(v.as_tensor())
        };
        let ln = |prefix: &str, r: &[f64]| {
            let (g, b) = (
                param(&format!("{prefix}.weight")),
                param(&format!("{prefix}.bias")),
            );
            ln_ref(r, &g, &b, 1e-5)
        };
        let matrix = |name: &str| -> Vec<Vec<f64>> {
            let (_, v) = vars.iter().find(|(n, _)| n == name).expect(name);
            vec2(v.as_tensor())
        };
        let (w1, w2) = (matrix("ffn.w1"), matrix("ffn.w2"));
        let (b1, b2) = (param("ffn.b1"), param("ffn.b2"));
        let ffn = |r: &[f64]| -> Vec<f64> {
            let h: Vec<f64> = matvec(&w1, r, Some(&b1))
                .into_iter()
                .map(|v| v.max(0.0))
                .collect();
            matvec(&w2, &h, Some(&b2))
        };
        let xs = vec2(&x.squeeze(0)?);
        let add = |a: &[Vec<f64>], b: &[Vec<f64>]| -> Vec<Vec<f64>> {
            a.iter()
                .zip(b)
                .map(|(r, s)| r.iter().zip(s).map(|(u, v)| u + v).collect())
                .collect()
        };
        let want = match placement {
            NormPlacement::Pre => {
                let n1: Vec<Vec<f64>> = xs.iter().map(|r| ln("ln1", r)).collect();
                let h = add(&xs, &mha_ref(&n1, &n1, &p, &pb, 3, None));
                let f: Vec<Vec<f64>> = h.iter().map(|r| ffn(&ln("ln2", r))).collect();
                add(&h, &f)
            }
            NormPlacement::Post => {
                let h: Vec<Vec<f64>> = add(&xs, &mha_ref(&xs, &xs, &p, &pb, 3, None))
                    .iter()
                    .map(|r| ln("ln1", r))
                    .collect();
                let f: Vec<Vec<f64>> = h.iter().map(|r| ffn(r)).collect();
                add(&h, &f).iter().map(|r| ln("ln2", r)).collect()
            }
        };
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!(
                (g - w).abs() < 1e-9 * (1.0 + w.abs()),
                "{placement:?}: {g} vs {w}"
            );
        }
    }
    Ok(())
}

#[test]
fn causal_decoder_block_ignores_future_tokens() -> Result<()> {
    let dev = test_device();
    let varmap = VarMap::new();
    let block = DecoderBlock::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        &cfg(NormPlacement::Pre),
    )?;
    randomise(&varmap)?;
    let memory = Tensor::randn(0f32, 1.0, (2, 5, 12), &dev)?;
    let x = Tensor::randn(0f32, 1.0, (2, 7, 12), &dev)?;
    let mask = causal_mask(7, 7, &dev)?;
    let before = block.forward(&x, &memory, Some(&mask), None)?;
    // Change token 4 onwards: positions 0..4 must not move, later ones must.
    let changed = Tensor::cat(
        &[
            x.narrow(1, 0, 4)?,
            Tensor::randn(0f32, 1.0, (2, 3, 12), &dev)?,
        ],
        1,
    )?;
    let after = block.forward(&changed, &memory, Some(&mask), None)?;
    assert_eq!(
        before.narrow(1, 0, 4)?.flatten_all()?.to_vec1::<f32>()?,
        after.narrow(1, 0, 4)?.flatten_all()?.to_vec1::<f32>()?
    );
    assert!(rel_err(&after.narrow(1, 4, 3)?, &before.narrow(1, 4, 3)?)? > 1e-3);
    Ok(())
}

#[test]
fn cross_attention_sees_only_real_encoder_positions() -> Result<()> {
    let dev = test_device();
    let varmap = VarMap::new();
    let block = DecoderBlock::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        &cfg(NormPlacement::Post),
    )?;
    randomise(&varmap)?;
    let key_mask = Tensor::new(&[[1u8, 1, 1, 0, 0], [1, 1, 1, 1, 1]], &dev)?;
    let memory_mask = key_padding_mask(&key_mask)?;
    let memory = Tensor::randn(0f32, 1.0, (2, 5, 12), &dev)?;
    let x = Tensor::randn(0f32, 1.0, (2, 4, 12), &dev)?;
    let self_mask = causal_mask(4, 4, &dev)?;
    let out = block.forward(&x, &memory, Some(&self_mask), Some(&memory_mask))?;
    // Scramble the padded memory positions of sequence 0: its output must not change.
    let scrambled0 = Tensor::cat(
        &[
            memory.get(0)?.narrow(0, 0, 3)?,
            Tensor::randn(0f32, 5.0, (2, 12), &dev)?,
        ],
        0,
    )?;
    let memory2 = Tensor::stack(&[scrambled0, memory.get(1)?], 0)?;
    let out2 = block.forward(&x, &memory2, Some(&self_mask), Some(&memory_mask))?;
    assert!(rel_err(&out2, &out)? < 1e-6);
    // The cross-attention weights on padding are exactly zero.
    let h = block
        .ln1
        .forward(&(&x + block.self_attn.forward(&x, Some(&self_mask))?.output)?)?;
    let w = block
        .cross_attn
        .forward_cross(&h, &memory, Some(&memory_mask), None)?
        .weights;
    let padded = w
        .get(0)?
        .narrow(D::Minus1, 3, 2)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert_eq!(padded, 0.0);
    Ok(())
}

#[test]
fn block_gradients_match_finite_differences_in_f64() -> Result<()> {
    let dev = test_device();
    let varmap = VarMap::new();
    let c = BlockConfig {
        activation: Activation::Gelu,
        ..cfg(NormPlacement::Pre)
    };
    let block = EncoderBlock::new(VarBuilder::from_varmap(&varmap, DType::F64, &dev), &c)?;
    randomise(&varmap)?;
    let x = Var::randn(0f64, 1.0, (1, 4, 12), &dev)?;
    let probe = Tensor::randn(0f64, 1.0, (1, 4, 12), &dev)?;
    let loss = |x: &Tensor| -> Result<f64> {
        (block.forward(x, None)? * &probe)?
            .sum_all()?
            .to_scalar::<f64>()
    };
    let grads = (block.forward(&x, None)? * &probe)?.sum_all()?.backward()?;
    // Check d loss / d x and d loss / d (a few parameters) by central differences.
    let mut checked = 0;
    for (name, var) in shared::params::named_vars(&varmap)
        .into_iter()
        .chain([("x".to_string(), x.clone())])
    {
        let analytic = grads
            .get(var.as_tensor())
            .expect("grad")
            .flatten_all()?
            .to_vec1::<f64>()?;
        let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        for i in (0..base.len()).step_by(base.len() / 3 + 1) {
            let eval = |delta: f64| -> Result<f64> {
                let mut p = base.clone();
                p[i] += delta;
                var.set(&Tensor::from_vec(p, var.shape(), &dev)?)?;
                let l = loss(x.as_tensor());
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &dev)?)?;
                l
            };
            let numeric = (eval(1e-6)? - eval(-1e-6)?) / 2e-6;
            let err = (numeric - analytic[i]).abs() / (1.0 + analytic[i].abs());
            assert!(
                err < 1e-6,
                "{name}[{i}]: numeric {numeric} vs analytic {}",
                analytic[i]
            );
            checked += 1;
        }
    }
    assert!(checked > 20);
    Ok(())
}

#[test]
fn gpt2_rung_rejects_bad_configs_and_overlong_inputs() -> Result<()> {
    let dev = test_device();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let shape = LmShape {
        vocab_size: 50,
        max_seq_len: 8,
        d_model: 12,
        n_layers: 2,
        n_heads: 5,
    };
    let rung0 = parts(shared::Kernels::composed());
    let mut c = LmConfig::gpt2(shape);
    assert!(build_lm(vb.clone(), &c, &rung0)
        .err()
        .unwrap()
        .to_string()
        .contains("n_heads (5) must divide d_model (12)"));
    c.n_heads = 3;
    c.n_kv_heads = 3;
    let lm = build_lm(vb.clone(), &c, &rung0)?;
    assert_eq!(
        shared::params::named_vars(&varmap)
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum::<usize>(),
        c.n_params(),
        "LmConfig::n_params counts every parameter"
    );
    for (what, later) in [
        (
            "RMSNorm arrives in 8-06",
            LmConfig {
                norm: NormKind::RmsNorm,
                ..c
            },
        ),
        (
            "SwiGLU arrives in 8-06",
            LmConfig {
                ffn: FfnKind::SwiGlu,
                ..c
            },
        ),
        (
            "RoPE arrives in 8-08",
            LmConfig {
                positions: PositionKind::Rope,
                ..c
            },
        ),
    ] {
        let e = build_lm(vb.clone(), &later, &rung0)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(what), "{e}");
    }
    let e = build_lm(vb.clone(), &c, &parts(shared::Kernels::fused()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("FlashAttention arrives in 8-09"), "{e}");
    let ok = Tensor::zeros((2, 8), DType::U32, &dev)?;
    assert_eq!(lm.forward(&ok, 0)?.dims(), &[2, 8, 50]);
    let long = Tensor::zeros((1, 9), DType::U32, &dev)?;
    assert!(lm
        .forward(&long, 0)
        .err()
        .unwrap()
        .to_string()
        .contains("exceeds the model's maximum context of 8"));
    let empty = Tensor::zeros((1, 0), DType::U32, &dev)?;
    assert!(lm.forward(&empty, 0).is_err());
    Ok(())
}

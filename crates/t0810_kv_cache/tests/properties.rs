//! Randomized equivalence tests (seeded, bounded):
//! - cached decoding against the full forward pass for random small models of every rung below
//!   (`LmConfig::gpt2`, `modern`, `grouped`, `llama`, random `n_kv_heads`), random prompt/step
//!   splits, random run kernels for the cached model (fused ops, FlashAttention) against a
//!   composed full forward, with the contiguous `KvCache` (preallocated and concatenating) and the
//!   `PagedKvCache` (random block sizes) — and the three stores against each other (same logits,
//!   the same cached keys and values);
//! - fused RoPE (`apply_rope_fused`) against the composed `apply_rope` and a float64 loop at random
//!   start positions, shapes, layouts and scalings, values and gradients.
//!
//! Runs on `shared::device::test_device()` (the GPU with `MODULE08_TEST_DEVICE=cuda`). Every
//! failure message starts with the case that failed.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarBuilder;
use shared::device::test_device;
use shared::kernels::{AttentionImpl, FlashKernels, HeadCopy, Kernels, Lookup, OpImpl};
use t0804_transformer_block::{build_lm, init_lm, DecoderOnlyLm, LmConfig, LmShape};
use t0808_rope::{
    apply_rope, apply_rope_fused, reference_rope, scaled_base, RopeScaling, RopeTables,
};
use t0810_kv_cache::*;

/// Random models decoded (each with three stores).
const LM_CASES: usize = 60;
/// Random RoPE cases.
const ROPE_CASES: usize = 200;

use shared::rng::Rng;

fn vec64(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor to f64 vector")
}

/// max |a − b| / max |b| (NaN counts as infinitely wrong).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (vec64(a), vec64(b));
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    let e = a
        .iter()
        .zip(&b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f64::max);
    e / scale.max(1e-30)
}

/// max |a − b| / max(|b|, 1) elementwise.
fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let e = (x - y).abs() / y.abs().max(1.0);
            if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        })
        .fold(0.0, f64::max)
}

// ---- cached decoding ----

/// A random small model of a random rung.
fn draw_config(rng: &mut Rng) -> (String, LmConfig) {
    let n_heads = rng.pick(&[1, 2, 4]);
    let d_head = rng.pick(&[4, 8, 16]);
    let shape = LmShape {
        vocab_size: 17 + rng.below(48),
        max_seq_len: 12 + rng.below(29),
        d_model: n_heads * d_head,
        n_layers: 1 + rng.below(2),
        n_heads,
    };
    let divisors: Vec<usize> = (1..=n_heads)
        .filter(|&k| n_heads.is_multiple_of(k))
        .collect();
    let kv = rng.pick(&divisors);
    let rung0 = LmConfig::gpt2(shape);
    match rng.below(4) {
        0 => ("gpt2".into(), rung0),
        1 => ("modern".into(), t0806_modern_blocks::modern(rung0)),
        2 => (
            format!("grouped(kv {kv})"),
            t0807_grouped_query_attention::grouped(t0806_modern_blocks::modern(rung0), kv),
        ),
        _ => (format!("llama(kv {kv})"), t0808_rope::llama(shape, kv)),
    }
}

/// Random run kernels for the cached model (values are the same for every choice).
fn draw_kernels(rng: &mut Rng) -> Kernels {
    let op = |rng: &mut Rng| {
        if rng.coin() {
            OpImpl::Fused
        } else {
            OpImpl::Composed
        }
    };
    Kernels {
        norm: op(rng),
        swiglu: op(rng),
        gelu: op(rng),
        softmax: op(rng),
        rope: op(rng),
        attention: if rng.coin() {
            AttentionImpl::Flash
        } else {
            AttentionImpl::Naive
        },
        flash: if rng.coin() {
            FlashKernels::Auto
        } else {
            FlashKernels::Simple
        },
        heads: if rng.coin() {
            HeadCopy::RowSwap
        } else {
            HeadCopy::Transpose
        },
        embedding: if rng.coin() {
            Lookup::Gather
        } else {
            Lookup::IndexSelect
        },
    }
}

/// Prompt length, then step sizes (mostly 1, sometimes a chunk of 2–4): they sum to `total`.
fn draw_splits(rng: &mut Rng, total: usize) -> Vec<usize> {
    let mut splits = vec![1 + rng.below(total)];
    let mut done = splits[0];
    while done < total {
        let step = if rng.below(3) == 0 {
            2 + rng.below(3)
        } else {
            1
        };
        let step = step.min(total - done);
        splits.push(step);
        done += step;
    }
    splits
}

/// Logits of every chunk of `splits`, decoded through `store`, concatenated: `(batch, total, vocab)`.
fn decode(
    lm: &DecoderOnlyLm,
    toks: &Tensor,
    splits: &[usize],
    store: &mut dyn KvStore,
) -> Result<Tensor> {
    let mut at = 0;
    let mut out = Vec::new();
    for &n in splits {
        assert_eq!(store.seq_len(), at, "the store counts the cached tokens");
        out.push(lm.forward_cached(&toks.narrow(1, at, n)?, store)?);
        at += n;
    }
    assert_eq!(store.seq_len(), at);
    Tensor::cat(&out, 1)
}

#[test]
fn cached_decoding_equals_full_forward_for_random_rungs_splits_and_stores() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = test_device();
    let mut rng = Rng::new(0x0810_0001);
    let mut rungs = std::collections::BTreeSet::new();
    for case in 0..LM_CASES {
        let (rung, cfg) = draw_config(&mut rng);
        let kernels = draw_kernels(&mut rng);
        let batch = 1 + rng.below(2);
        let total = 1 + rng.below(cfg.max_seq_len);
        let splits = draw_splits(&mut rng, total);
        let block_size = rng.pick(&[1, 2, 3, 4, 8, 16]);
        let who = format!(
            "case {case}: {rung} d_model {} heads {} kv {} layers {} max_seq {} | batch {batch} splits {splits:?} paged block {block_size} | {}",
            cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.max_seq_len, kernels.describe()
        );
        rungs.insert(rung.split('(').next().unwrap_or_default().to_string());
        let toks: Vec<u32> = (0..batch * total)
            .map(|_| rng.below(cfg.vocab_size) as u32)
            .collect();
        let toks = Tensor::from_vec(toks, (batch, total), &dev)?;
        // The reference: the full forward with every op composed. The cached model shares its
        // parameters and runs the drawn kernels.
        shared::params::set_seed(1000 + case as u64);
        let (varmap, full) = init_lm(
            &cfg,
            &t0809_flash_attention::parts(Kernels::composed()),
            DType::F32,
            &dev,
        )?;
        let lm = build_lm(
            VarBuilder::from_varmap(&varmap, DType::F32, &dev),
            &cfg,
            &t0809_flash_attention::parts(kernels),
        )?;
        let want = full.forward(&toks, 0)?; // (batch, total, vocab)

        let mut pre = lm_cache(
            &lm,
            batch,
            cfg.max_seq_len,
            CacheKind::Preallocated,
            DType::F32,
        )?;
        let mut cat = lm_cache(&lm, batch, cfg.max_seq_len, CacheKind::Concat, DType::F32)?;
        let got_pre = decode(&lm, &toks, &splits, &mut pre)?;
        let got_cat = decode(&lm, &toks, &splits, &mut cat)?;
        for (name, got) in [("preallocated", &got_pre), ("concat", &got_cat)] {
            assert_eq!(got.dims(), want.dims(), "{who}: {name}");
            let e = rel_err(got, &want);
            assert!(e <= 1e-5, "{who}: {name} cache vs full forward {e:.2e}");
        }
        let e = rel_err(&got_cat, &got_pre);
        assert!(e <= 1e-6, "{who}: concat vs preallocated logits {e:.2e}");

        // The paged cache serves one sequence (batch 1): decode every row on its own sequence,
        // sharing one pool of blocks.
        let (n_kv, d_head) = lm.kv_heads();
        let per_seq = total.div_ceil(block_size);
        let mut paged = PagedKvCache::new(
            PagedConfig {
                n_layers: cfg.n_layers,
                n_kv_heads: n_kv,
                d_head,
                block_size,
                num_blocks: batch * per_seq + rng.below(3),
                max_seq_len: cfg.max_seq_len,
            },
            DType::F32,
            &dev,
        )?;
        let seqs: Vec<SeqId> = (0..batch).map(|_| paged.add_sequence()).collect();
        for (row, &seq) in seqs.iter().enumerate() {
            let mut view = paged.seq(seq)?;
            let got = decode(&lm, &toks.narrow(0, row, 1)?, &splits, &mut view)?;
            let e = rel_err(&got, &want.narrow(0, row, 1)?);
            assert!(e <= 1e-5, "{who}: paged row {row} vs full forward {e:.2e}");
            let e = rel_err(&got, &got_pre.narrow(0, row, 1)?);
            assert!(e <= 1e-6, "{who}: paged row {row} vs preallocated {e:.2e}");
        }
        // The stores hold the same keys and values.
        for layer in 0..cfg.n_layers {
            let (kp, vp) = pre.layer(layer)?.expect("preallocated cache has tokens");
            let (kc, vc) = cat.layer(layer)?.expect("concat cache has tokens");
            assert_eq!(
                kp.dims(),
                &[batch, n_kv, total, d_head],
                "{who}: layer {layer}"
            );
            assert_eq!(
                vec64(&kp),
                vec64(&kc),
                "{who}: layer {layer} K pre vs concat"
            );
            assert_eq!(
                vec64(&vp),
                vec64(&vc),
                "{who}: layer {layer} V pre vs concat"
            );
            for (row, &seq) in seqs.iter().enumerate() {
                let (kg, vg) = paged.gather(seq, layer, total)?;
                let e = rel_err(&kg, &kp.narrow(0, row, 1)?);
                assert!(e <= 1e-6, "{who}: layer {layer} row {row} paged K {e:.2e}");
                let e = rel_err(&vg, &vp.narrow(0, row, 1)?);
                assert!(e <= 1e-6, "{who}: layer {layer} row {row} paged V {e:.2e}");
            }
        }
    }
    for r in ["gpt2", "modern", "grouped", "llama"] {
        assert!(rungs.contains(r), "rung {r} never drawn: {rungs:?}");
    }
    Ok(())
}

// ---- fused RoPE ----

#[test]
fn fused_rope_equals_composed_and_float64_at_random_start_positions() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = test_device();
    let mut rng = Rng::new(0x0810_0002);
    let dtypes: &[DType] = if dev.is_cuda() {
        &[DType::F32]
    } else {
        &[DType::F32, DType::F64]
    };
    for case in 0..ROPE_CASES {
        let d = 2 * (1 + rng.below(40)); // any even width, 2 … 80
        let (b, h, t) = (1 + rng.below(2), 1 + rng.below(4), 1 + rng.below(24));
        let max_seq = t + rng.below(200);
        let start = rng.below(max_seq - t + 1);
        let base = rng.pick(&[100.0, 10_000.0, 500_000.0]);
        let scaling = match rng.below(3) {
            0 => RopeScaling::None,
            1 => RopeScaling::PositionInterpolation {
                factor: 1.0 + 7.0 * rng.uniform(),
            },
            _ => RopeScaling::NtkAware {
                factor: 1.0 + 7.0 * rng.uniform(),
            },
        };
        // As attention sees it: (b, t, h, d) projected, heads moved to dim 1 (a strided view).
        let strided = rng.coin();
        let dt = rng.pick(dtypes);
        let who = format!(
            "case {case}: x ({b}, {h}, {t}, {d}) strided {strided} start {start} max_seq {max_seq} base {base} {scaling:?} {dt:?}"
        );
        let tables = RopeTables::new(d, max_seq, base, scaling, &dev)?;
        // The variable is the (b, t, h, d) buffer, so the op receives the strided view itself
        // (`Var::from_tensor` of a view would copy it contiguous).
        let buf = rng
            .tensor(&[b, t, h, d], 1.0)?
            .to_dtype(dt)?
            .to_device(&dev)?;
        let buf = Var::from_tensor(&if strided {
            buf
        } else {
            buf.transpose(1, 2)?.contiguous()?
        })?;
        let view = |t: &Tensor| {
            if strided {
                t.transpose(1, 2)
            } else {
                Ok(t.clone())
            }
        };
        let x = view(buf.as_tensor())?; // (b, h, t, d)
        assert_eq!(x.is_contiguous(), !strided || h == 1 || t == 1, "{who}");
        let c = rng
            .tensor(&[b, h, t, d], 1.0)?
            .to_dtype(dt)?
            .to_device(&dev)?;
        let run = |fused: bool| -> Result<(Vec<f64>, Vec<f64>)> {
            let y = if fused {
                apply_rope_fused(&x, &tables, start)?
            } else {
                apply_rope(&x, &tables, start)?
            };
            assert_eq!((y.dims(), y.dtype()), (&[b, h, t, d][..], dt), "{who}");
            let g = (&y * &c)?.sum_all()?.backward()?;
            let dx = view(g.get(buf.as_tensor()).expect("dx"))?;
            Ok((vec64(&y), vec64(&dx)))
        };
        let (y_f, dx_f) = run(true)?;
        let (y_c, dx_c) = run(false)?;
        let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
        let e = max_rel(&y_f, &y_c);
        assert!(e <= tol, "{who}: fused vs composed values {e:.2e}");
        let e = max_rel(&dx_f, &dx_c);
        assert!(e <= tol, "{who}: fused vs composed gradient {e:.2e}");

        // Float64 from the definition: pair k of the token at position p turns by
        // pos_scale·p·θ_k(base'); the gradient is the inverse rotation of c.
        let (eff_base, pos_scale) = scaled_base(d, base, scaling);
        let xs = vec64(&x);
        let cs = vec64(&c);
        let (mut y_ref, mut dx_ref) = (Vec::new(), Vec::new());
        for (i, (xv, cv)) in xs.chunks(d).zip(cs.chunks(d)).enumerate() {
            let pos = pos_scale * (start + i % t) as f64;
            y_ref.extend(reference_rope(xv, pos, eff_base));
            dx_ref.extend(reference_rope(cv, -pos, eff_base));
        }
        // The tables are f32: angles up to ~max_seq carry f32 rounding of cos and sin.
        let e = max_rel(&y_f, &y_ref);
        assert!(e <= 1e-5, "{who}: fused vs float64 values {e:.2e}");
        let e = max_rel(&dx_f, &dx_ref);
        assert!(e <= 1e-5, "{who}: fused vs float64 gradient {e:.2e}");
    }
    Ok(())
}

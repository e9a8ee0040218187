//! Cached decoding against the full forward pass: at every step the logits of the new token must
//! equal those of a full forward over the whole prefix.

use candle_core::{DType, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use shared::device::test_device;
use shared::kernels::{AttentionImpl, Kernels};
use t0804_transformer_block::{build_lm, init_lm, load_lm, save_lm, LmConfig, LmShape};
use t0804_transformer_block::{DecoderOnlyLm, NormPlacement};
use t0805_full_transformer::{Transformer, TransformerConfig};
use t0810_kv_cache::*;

const VOCAB: usize = 61;

fn tokens(n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + salt * 11 + 5) % VOCAB) as u32)
        .collect()
}

/// max |a − b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
        / scale.max(1e-30)
}

const SHAPE: LmShape = LmShape {
    vocab_size: VOCAB,
    max_seq_len: 40,
    d_model: 32,
    n_layers: 2,
    n_heads: 4,
};

/// The top rung's parts with every op composed (naive attention).
fn composed() -> t0809_flash_attention::FlashParts {
    t0809_flash_attention::parts(Kernels::composed())
}

fn llama(n_kv_heads: usize, seed: u64) -> DecoderOnlyLm {
    shared::params::set_seed(seed);
    let cfg = t0808_rope::llama(SHAPE, n_kv_heads);
    init_lm(&cfg, &composed(), DType::F32, &test_device())
        .unwrap()
        .1
}

fn gpt2(seed: u64) -> DecoderOnlyLm {
    shared::params::set_seed(seed);
    init_lm(
        &LmConfig::gpt2(SHAPE),
        &composed(),
        DType::F32,
        &test_device(),
    )
    .unwrap()
    .1
}

fn full_logits(lm: &DecoderOnlyLm, toks: &[u32]) -> Tensor {
    lm.forward(
        &Tensor::new(toks, &test_device())
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        0,
    )
    .unwrap()
    .squeeze(0)
    .unwrap() // (t, vocab)
}

fn row(t: &[u32]) -> Tensor {
    Tensor::new(t, &test_device())
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// Prefill `prefill` tokens, then one token at a time; compare every logit row with the full pass.
fn check_incremental(
    lm: &DecoderOnlyLm,
    cache: &mut dyn KvStore,
    toks: &[u32],
    prefill: usize,
) -> f64 {
    let full = full_logits(lm, toks);
    let got = lm_forward_cached(lm, &row(&toks[..prefill]), cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let mut worst = rel_err(&got, &full.narrow(0, 0, prefill).unwrap());
    for t in prefill..toks.len() {
        let got = lm_forward_cached(lm, &row(&toks[t..t + 1]), cache)
            .unwrap()
            .squeeze(0)
            .unwrap();
        assert_eq!(cache.seq_len(), t + 1);
        worst = worst.max(rel_err(&got, &full.narrow(0, t, 1).unwrap()));
    }
    worst
}

#[test]
fn cached_logits_equal_full_forward_for_mha_gqa_mqa_and_gpt2() {
    let _init = shared::params::init_turn();
    let toks = tokens(21, 1);
    for (name, lm) in [
        ("MHA", llama(4, 1)),
        ("GQA", llama(2, 2)),
        ("MQA", llama(1, 3)),
        ("GPT-2 recipe", gpt2(4)),
    ] {
        for kind in [CacheKind::Preallocated, CacheKind::Concat] {
            let mut cache = lm_cache(&lm, 1, 40, kind, DType::F32).unwrap();
            let err = check_incremental(&lm, &mut cache, &toks, 6);
            assert!(err < 1e-5, "{name} {kind:?}: relative error {err}");
        }
    }
}

#[test]
fn gqa_caches_only_the_kv_heads() {
    let _init = shared::params::init_turn();
    let lm = llama(1, 5); // MQA: 1 K/V head of d_head 8, 2 layers
    let cache = lm_cache(&lm, 3, 40, CacheKind::Preallocated, DType::F32).unwrap();
    assert_eq!(
        cache.shape,
        CacheShape {
            n_layers: 2,
            batch: 3,
            n_kv_heads: 1,
            max_seq: 40,
            d_head: 8
        }
    );
    assert_eq!(cache.allocated_bytes(), kv_cache_bytes(3, 2, 1, 40, 8, 4));
    assert_eq!(cache.allocated_bytes(), 2 * 3 * 2 * 40 * 8 * 4);
}

#[test]
fn preallocated_equals_concatenating_cache_in_a_batch() {
    let _init = shared::params::init_turn();
    let lm = llama(2, 6);
    let batch: Vec<u32> = tokens(12, 2).into_iter().chain(tokens(12, 3)).collect();
    let x = Tensor::from_vec(batch, (2, 12), &test_device()).unwrap();
    let mut a = lm_cache(&lm, 2, 16, CacheKind::Preallocated, DType::F32).unwrap();
    let mut b = lm_cache(&lm, 2, 16, CacheKind::Concat, DType::F32).unwrap();
    let la = lm_forward_cached(&lm, &x.narrow(1, 0, 4).unwrap(), &mut a).unwrap();
    let lb = lm_forward_cached(&lm, &x.narrow(1, 0, 4).unwrap(), &mut b).unwrap();
    assert!(rel_err(&la, &lb) < 1e-6);
    let full = lm.forward(&x, 0).unwrap(); // (2, 12, vocab)
    for t in 4..12 {
        let la = lm_forward_cached(&lm, &x.narrow(1, t, 1).unwrap(), &mut a).unwrap();
        let lb = lm_forward_cached(&lm, &x.narrow(1, t, 1).unwrap(), &mut b).unwrap();
        assert!(rel_err(&la, &lb) < 1e-6, "step {t}");
        assert!(
            rel_err(&la, &full.narrow(1, t, 1).unwrap()) < 1e-5,
            "step {t} vs full"
        );
    }
    for l in 0..2 {
        let (ka, va) = a.layer(l).unwrap().unwrap();
        let (kb, vb) = b.layer(l).unwrap().unwrap();
        assert_eq!(ka.dims(), &[2, 2, 12, 8]);
        assert!(
            rel_err(&ka, &kb) == 0.0 && rel_err(&va, &vb) == 0.0,
            "layer {l}: caches differ"
        );
    }
}

#[test]
fn paged_cache_decoding_equals_full_forward() {
    let _init = shared::params::init_turn();
    let toks = tokens(23, 4);
    for (name, lm) in [("GQA", llama(2, 7)), ("GPT-2 recipe", gpt2(8))] {
        let (h, d) = lm.kv_heads();
        let cfg = PagedConfig {
            n_layers: 2,
            n_kv_heads: h,
            d_head: d,
            block_size: 4,
            num_blocks: 16,
            max_seq_len: 40,
        };
        let mut paged = PagedKvCache::new(cfg, DType::F32, &test_device()).unwrap();
        let _other = paged.add_sequence(); // another tenant, so block ids are not the identity
        let s0 = paged.add_sequence();
        let mut o = paged.seq(_other).unwrap();
        lm_forward_cached(&lm, &row(&tokens(3, 9)), &mut o).unwrap();
        let mut view = paged.seq(s0).unwrap();
        let err = check_incremental(&lm, &mut view, &toks, 7);
        assert!(err < 1e-5, "{name}: paged relative error {err}");
        assert_eq!(
            paged.alloc.seq(s0).unwrap().table.len(),
            23usize.div_ceil(4)
        );
    }
}

#[test]
fn paged_gather_equals_contiguous_cache() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = test_device();
    let cfg = PagedConfig {
        n_layers: 1,
        n_kv_heads: 2,
        d_head: 3,
        block_size: 4,
        num_blocks: 12,
        max_seq_len: 32,
    };
    let mut paged = PagedKvCache::new(cfg, DType::F32, &dev)?;
    let shape = CacheShape {
        n_layers: 1,
        batch: 1,
        n_kv_heads: 2,
        max_seq: 32,
        d_head: 3,
    };
    let mut contiguous = KvCache::new(shape, CacheKind::Preallocated, DType::F32, &dev)?;
    let a = paged.add_sequence();
    let b = paged.add_sequence();
    // Interleave two sequences so that a's blocks are not consecutive in the pool.
    for (i, n) in [5usize, 1, 3, 7, 1].into_iter().enumerate() {
        let k = Tensor::randn(0f32, 1.0, (1, 2, n, 3), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, n, 3), &dev)?;
        let mut sa = paged.seq(a)?;
        sa.begin(n)?;
        let (pk, pv) = sa.append(0, &k, &v)?;
        sa.commit(n)?;
        contiguous.begin(n)?;
        let (ck, cv) = contiguous.append(0, &k, &v)?;
        contiguous.commit(n)?;
        assert_eq!(rel_err(&pk, &ck.contiguous()?), 0.0);
        assert_eq!(rel_err(&pv, &cv.contiguous()?), 0.0);
        let mut sb = paged.seq(b)?;
        sb.begin(i + 1)?;
        let noise = Tensor::randn(0f32, 1.0, (1, 2, i + 1, 3), &dev)?;
        sb.append(0, &noise, &noise)?;
        sb.commit(i + 1)?;
    }
    let table = &paged.alloc.seq(a)?.table;
    assert!(
        table.windows(2).any(|w| w[1] != w[0] + 1),
        "test needs a fragmented table: {table:?}"
    );
    Ok(())
}

#[test]
fn encoder_decoder_cached_decoder_equals_full_decode() {
    let _init = shared::params::init_turn();
    for placement in [NormPlacement::Pre, NormPlacement::Post] {
        shared::params::set_seed(11);
        let cfg = TransformerConfig {
            vocab_size: VOCAB,
            max_len: 24,
            d_model: 32,
            n_heads: 4,
            d_ff: 64,
            n_encoder_layers: 2,
            n_decoder_layers: 2,
            placement,
        };
        let vm = VarMap::new();
        let model = Transformer::new(
            VarBuilder::from_varmap(&vm, DType::F32, &test_device()),
            cfg,
        )
        .unwrap();
        // A batch of two sources, the second padded.
        let src = Tensor::from_vec(
            [tokens(9, 5), tokens(9, 6)].concat(),
            (2, 9),
            &test_device(),
        )
        .unwrap();
        let src_mask = Tensor::from_vec(
            [vec![1u8; 9], [vec![1u8; 6], vec![0u8; 3]].concat()].concat(),
            (2, 9),
            &test_device(),
        )
        .unwrap();
        let tgt = Tensor::from_vec(
            [tokens(10, 7), tokens(10, 8)].concat(),
            (2, 10),
            &test_device(),
        )
        .unwrap();
        let memory = model.encode(&src, &src_mask).unwrap();
        let full = model
            .decode(
                &tgt,
                &Tensor::ones((2, 10), DType::U8, &test_device()).unwrap(),
                &memory,
                &src_mask,
            )
            .unwrap();
        for kind in [CacheKind::Preallocated, CacheKind::Concat] {
            let mut st = seq2seq_start(&model, &src, &src_mask, 10, kind, DType::F32).unwrap();
            let first = seq2seq_step(&model, &tgt.narrow(1, 0, 3).unwrap(), &mut st).unwrap();
            let mut worst = rel_err(&first, &full.narrow(1, 0, 3).unwrap());
            for t in 3..10 {
                let got = seq2seq_step(&model, &tgt.narrow(1, t, 1).unwrap(), &mut st).unwrap();
                worst = worst.max(rel_err(&got, &full.narrow(1, t, 1).unwrap()));
            }
            assert!(
                worst < 1e-5,
                "{placement:?} {kind:?}: relative error {worst}"
            );
            let e = seq2seq_step(&model, &tgt.narrow(1, 0, 1).unwrap(), &mut st)
                .unwrap_err()
                .to_string();
            assert!(e.contains("KV cache full"), "{e}");
        }
    }
}

#[test]
fn seq2seq_generation_matches_full_recompute_generate() {
    let _init = shared::params::init_turn();
    shared::params::set_seed(12);
    let cfg = TransformerConfig {
        vocab_size: VOCAB,
        max_len: 24,
        d_model: 32,
        n_heads: 4,
        d_ff: 64,
        n_encoder_layers: 1,
        n_decoder_layers: 2,
        placement: NormPlacement::Pre,
    };
    let vm = VarMap::new();
    let model = Transformer::new(
        VarBuilder::from_varmap(&vm, DType::F32, &test_device()),
        cfg,
    )
    .unwrap();
    let src = tokens(8, 3);
    let reference = model.generate(&src, 1, 12, 0.0, 0).unwrap(); // t0805: full recompute, greedy
    let mut sampler = Sampler::new(SamplingConfig::greedy(), 0).unwrap();
    let mut streamed = Vec::new();
    let got = generate_seq2seq(
        &model,
        &src,
        1,
        12,
        &mut sampler,
        CacheKind::Preallocated,
        &mut |t| streamed.push(t),
    )
    .unwrap();
    assert_eq!(got.tokens, reference);
    assert_eq!(streamed, reference);
}

#[test]
fn lm_generation_with_and_without_cache_agree_and_are_seeded() {
    let _init = shared::params::init_turn();
    let lm = llama(2, 13);
    let prompt = tokens(5, 1);
    let cfg = SamplingConfig {
        temperature: 0.9,
        top_k: Some(20),
        top_p: Some(0.95),
    };
    let run_cached = |seed| {
        let mut cache = lm_cache(&lm, 1, 40, CacheKind::Preallocated, DType::F32).unwrap();
        generate_lm(
            &lm,
            &prompt,
            15,
            &mut Sampler::new(cfg, seed).unwrap(),
            &mut cache,
            &mut |_| {},
        )
        .unwrap()
        .tokens
    };
    let a = run_cached(3);
    assert_eq!(a.len(), 15);
    assert_eq!(a, run_cached(3), "same seed, same tokens");
    let b = generate_lm_no_cache(
        &lm,
        &prompt,
        15,
        &mut Sampler::new(cfg, 3).unwrap(),
        &mut |_| {},
    )
    .unwrap()
    .tokens;
    assert_eq!(a, b, "cache must not change what is generated");
    // Generation stops at the model's maximum context (40) instead of failing.
    let mut cache = lm_cache(&lm, 1, 40, CacheKind::Preallocated, DType::F32).unwrap();
    let long = generate_lm(
        &lm,
        &prompt,
        100,
        &mut Sampler::new(SamplingConfig::greedy(), 0).unwrap(),
        &mut cache,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(long.tokens.len(), 40 - 5 + 1);
}

#[test]
fn exceeding_the_cache_or_the_context_is_a_clear_error_and_keeps_the_cache() {
    let _init = shared::params::init_turn();
    let lm = llama(2, 14);
    let toks = tokens(12, 2);
    let mut cache = lm_cache(&lm, 1, 10, CacheKind::Preallocated, DType::F32).unwrap();
    lm_forward_cached(&lm, &row(&toks[..8]), &mut cache).unwrap();
    let e = lm_forward_cached(&lm, &row(&toks[8..11]), &mut cache)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("KV cache full: 8 cached + 3 new tokens exceed its max_seq of 10"),
        "{e}"
    );
    assert_eq!(cache.seq_len(), 8);
    // The cache still decodes correctly after the refusal.
    let got = lm_forward_cached(&lm, &row(&toks[8..9]), &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert!(rel_err(&got, &full_logits(&lm, &toks[..9]).narrow(0, 8, 1).unwrap()) < 1e-5);
    // Beyond the model's maximum context (40).
    let mut big = lm_cache(&lm, 1, 40, CacheKind::Preallocated, DType::F32).unwrap();
    let e = lm_forward_cached(&lm, &row(&tokens(41, 1)), &mut big)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("exceeds the model's maximum context of 40"),
        "{e}"
    );
    assert_eq!(big.seq_len(), 0);
}

#[test]
fn cached_tensors_do_not_keep_the_autograd_graph() {
    let _init = shared::params::init_turn();
    // A model built from trainable variables: every tensor it computes carries its graph. A
    // cache that stored such a tensor would keep every activation of the prefill alive.
    let lm = llama(2, 3);
    for kind in [CacheKind::Preallocated, CacheKind::Concat] {
        let mut cache = lm_cache(&lm, 1, 40, kind, DType::F32).unwrap();
        lm_forward_cached(&lm, &row(&tokens(12, 1)), &mut cache).unwrap();
        for layer in 0..2 {
            let (k, v) = cache.layer(layer).unwrap().expect("filled");
            assert_eq!(k.dims()[2], 12);
            assert!(
                !k.track_op() && !v.track_op(),
                "{kind:?} cache, layer {layer}: the cached K/V still carry the autograd graph"
            );
        }
    }
}

/// With every fused op (the causal softmax reading the preallocated cache in place, without a
/// copy) and with FlashAttention, batched cached decoding equals the full forward pass of the
/// composed model with the same weights, for MHA, GQA and MQA.
#[test]
fn fused_ops_cached_decoding_equals_composed_full_forward() {
    let _init = shared::params::init_turn();
    let dev = test_device();
    let batch: Vec<u32> = tokens(14, 4).into_iter().chain(tokens(14, 5)).collect();
    let x = Tensor::from_vec(batch, (2, 14), &dev).unwrap();
    let fused_naive = Kernels::fused().with_attention(AttentionImpl::Naive);
    for (kernels, kv) in [fused_naive, Kernels::fused()]
        .into_iter()
        .flat_map(|k| [4, 2, 1].map(|kv| (k, kv)))
    {
        shared::params::set_seed(7);
        let cfg = t0808_rope::llama(SHAPE, kv);
        let (varmap, composed) = init_lm(&cfg, &composed(), DType::F32, &dev).unwrap();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let fused = build_lm(vb, &cfg, &t0809_flash_attention::parts(kernels)).unwrap();
        let what = kernels.describe();
        let full = composed.forward(&x, 0).unwrap(); // (2, 14, vocab)
        let mut cache = lm_cache(&fused, 2, 20, CacheKind::Preallocated, DType::F32).unwrap();
        let pre = lm_forward_cached(&fused, &x.narrow(1, 0, 5).unwrap(), &mut cache).unwrap();
        assert!(
            rel_err(&pre, &full.narrow(1, 0, 5).unwrap()) < 1e-5,
            "{what}, kv {kv}: prefill"
        );
        for t in 5..14 {
            let got = lm_forward_cached(&fused, &x.narrow(1, t, 1).unwrap(), &mut cache).unwrap();
            let err = rel_err(&got, &full.narrow(1, t, 1).unwrap());
            assert!(
                err < 1e-5,
                "{what}, kv {kv}, step {t}: relative error {err}"
            );
        }
    }
}

/// A checkpoint whose config.json is the recipe-style one (`recipe: "Llama"`, `fused_*` keys)
/// loads as the LLaMA recipe, with the same logits, and decodes with the cache as the full
/// forward pass predicts.
#[test]
fn recipe_style_llama_checkpoint_loads_and_decodes() {
    let _init = shared::params::init_turn();
    let dev = test_device();
    let dir = std::env::temp_dir().join(format!("t0810_legacy_{}", std::process::id()));
    shared::params::set_seed(11);
    let cfg = t0808_rope::llama(SHAPE, 2);
    let (varmap, lm) = init_lm(&cfg, &composed(), DType::F32, &dev).unwrap();
    save_lm(&dir, &cfg, &varmap).unwrap();
    let legacy = format!(
        r#"{{"vocab_size":{VOCAB},"max_seq_len":40,"d_model":32,"n_layers":2,"n_heads":4,
        "n_kv_heads":2,"d_ff":{},"rope_theta":10000.0,"norm_eps":1e-5,"recipe":"Llama",
        "rope_scaling":"None","fused_norm":true,"fused_rope":true,"fused_swiglu":false,"fused_softmax":true}}"#,
        cfg.d_ff
    );
    std::fs::write(dir.join("config.json"), legacy).unwrap();
    let (cfg2, lm2) = load_lm(&dir, &composed(), DType::F32, &dev).unwrap();
    assert_eq!(cfg2, cfg);
    let toks = tokens(17, 2);
    let (a, b) = (full_logits(&lm, &toks), full_logits(&lm2, &toks));
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let mut cache = lm_cache(&lm2, 1, 40, CacheKind::Preallocated, DType::F32).unwrap();
    let err = check_incremental(&lm2, &mut cache, &toks, 6);
    assert!(err < 1e-5, "loaded checkpoint: cached relative error {err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

//! The paged cache's bookkeeping (no leaks, copy-on-write, clear errors), the serving
//! simulation, and the samplers.

use candle_core::{DType, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use shared::device::test_device;
use shared::kernels::Kernels;
use t0804_transformer_block::DecoderOnlyLm;
use t0804_transformer_block::{init_lm, LmShape};
use t0810_kv_cache::sim::{prefix_sharing_blocks, simulate, workload, Policy};
use t0810_kv_cache::*;

const VOCAB: usize = 53;

fn lm() -> DecoderOnlyLm {
    shared::params::set_seed(21);
    let shape = LmShape {
        vocab_size: VOCAB,
        max_seq_len: 48,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
    };
    let parts = t0809_flash_attention::parts(Kernels::composed());
    init_lm(
        &t0808_rope::llama(shape, 2),
        &parts,
        DType::F32,
        &test_device(),
    )
    .unwrap()
    .1
}

fn row(t: &[u32]) -> Tensor {
    Tensor::new(t, &test_device())
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let s = b.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
        / s.max(1e-30)
}

fn paged(lm: &DecoderOnlyLm, block_size: usize, num_blocks: usize) -> PagedKvCache {
    let (h, d) = lm.kv_heads();
    PagedKvCache::new(
        PagedConfig {
            n_layers: lm.blocks.len(),
            n_kv_heads: h,
            d_head: d,
            block_size,
            num_blocks,
            max_seq_len: lm.max_seq_len,
        },
        DType::F32,
        &test_device(),
    )
    .unwrap()
}

#[test]
fn random_allocation_never_leaks() {
    let _init = shared::params::init_turn();
    let mut rng = StdRng::seed_from_u64(1);
    let mut a = BlockAllocator::new(4, 40, 64).unwrap();
    let mut live: Vec<SeqId> = Vec::new();
    for _ in 0..3000 {
        match rng.random_range(0..10) {
            0..=1 => live.push(a.add_sequence()),
            2 if !live.is_empty() => {
                let p = live[rng.random_range(0..live.len())];
                live.push(a.fork(p).unwrap());
            }
            3 if !live.is_empty() => {
                let s = live.swap_remove(rng.random_range(0..live.len()));
                a.free_sequence(s).unwrap();
            }
            _ if !live.is_empty() => {
                let s = live[rng.random_range(0..live.len())];
                let n = rng.random_range(1..6);
                let (free, before) = (a.free_blocks(), a.seq(s).unwrap().clone());
                match a.reserve(s, n) {
                    Ok(_) => a.advance(s, n).unwrap(),
                    Err(_) => {
                        assert_eq!(a.free_blocks(), free, "a refused reserve must not allocate");
                        assert_eq!(
                            a.seq(s).unwrap(),
                            &before,
                            "a refused reserve must not change the sequence"
                        );
                    }
                }
            }
            _ => {}
        }
        // Invariant: refcount of each block = number of tables holding it; free = refcount 0.
        let mut count = vec![0u32; a.num_blocks];
        for &s in &live {
            for &b in &a.seq(s).unwrap().table {
                count[b] += 1;
            }
        }
        for (b, &c) in count.iter().enumerate() {
            assert_eq!(a.refcount(b), c, "block {b}");
        }
        assert_eq!(a.free_blocks(), count.iter().filter(|&&c| c == 0).count());
    }
    for s in live {
        a.free_sequence(s).unwrap();
    }
    assert_eq!(a.free_blocks(), 40, "every block returns to the pool");
    assert_eq!(a.num_seqs(), 0);
}

#[test]
fn copy_on_write_keeps_the_shared_prefix_and_forks_decode_correctly() {
    let _init = shared::params::init_turn();
    let lm = lm();
    let mut cache = paged(&lm, 4, 32);
    let prefix: Vec<u32> = (0..6).map(|i| (i * 7 % VOCAB) as u32).collect(); // 1 full + 1 partial block
    let root = cache.add_sequence();
    lm_forward_cached(&lm, &row(&prefix), &mut cache.seq(root).unwrap()).unwrap();
    let before: Vec<(Tensor, Tensor)> = (0..2).map(|l| cache.gather(root, l, 6).unwrap()).collect();
    let used_before = cache.alloc.used_blocks();
    let a = cache.fork(root).unwrap();
    let b = cache.fork(root).unwrap();
    assert_eq!(
        cache.alloc.used_blocks(),
        used_before,
        "forking copies nothing"
    );
    let shared_full = cache.alloc.seq(root).unwrap().table[0];
    assert_eq!(cache.alloc.refcount(shared_full), 3);
    let (ta, tb): (Vec<u32>, Vec<u32>) = (
        (1..9).map(|i| (i * 3) as u32).collect(),
        (1..9).map(|i| (i * 5 + 1) as u32).collect(),
    );
    for (s, cont) in [(a, &ta), (b, &tb)] {
        for &t in cont.iter() {
            lm_forward_cached(&lm, &row(&[t]), &mut cache.seq(s).unwrap()).unwrap();
        }
    }
    // The full prefix block is still shared, the partial one was copied by each writer.
    assert_eq!(cache.alloc.seq(a).unwrap().table[0], shared_full);
    assert_eq!(cache.alloc.seq(b).unwrap().table[0], shared_full);
    assert_ne!(
        cache.alloc.seq(a).unwrap().table[1],
        cache.alloc.seq(root).unwrap().table[1]
    );
    assert_ne!(
        cache.alloc.seq(b).unwrap().table[1],
        cache.alloc.seq(a).unwrap().table[1]
    );
    // The root's K/V are unchanged bit for bit.
    for (l, (k0, v0)) in before.iter().enumerate() {
        let (k1, v1) = cache.gather(root, l, 6).unwrap();
        assert_eq!(
            max_rel(&k1, k0),
            0.0,
            "layer {l}: shared prefix keys changed"
        );
        assert_eq!(
            max_rel(&v1, v0),
            0.0,
            "layer {l}: shared prefix values changed"
        );
    }
    for s in [a, b, root] {
        cache.free_sequence(s).unwrap();
    }
    assert_eq!(
        cache.alloc.free_blocks(),
        32,
        "all blocks back after the sequences finish"
    );
}

#[test]
fn forks_generate_what_a_full_forward_predicts() {
    let _init = shared::params::init_turn();
    let lm = lm();
    let mut cache = paged(&lm, 4, 32);
    let prefix: Vec<u32> = (0..7).map(|i| (i * 11 % VOCAB) as u32).collect();
    let root = cache.add_sequence();
    let prefill = lm_forward_cached(&lm, &row(&prefix), &mut cache.seq(root).unwrap()).unwrap();
    let full_prefix = lm.forward(&row(&prefix), 0).unwrap();
    assert!(max_rel(&prefill, &full_prefix) < 1e-5);
    for salt in 0..3u32 {
        let f = cache.fork(root).unwrap();
        let mut whole = prefix.clone();
        for i in 0..6u32 {
            let t = (i * 13 + salt * 7 + 2) % VOCAB as u32;
            whole.push(t);
            let got = lm_forward_cached(&lm, &row(&[t]), &mut cache.seq(f).unwrap()).unwrap();
            let full = lm
                .forward(&row(&whole), 0)
                .unwrap()
                .narrow(1, whole.len() - 1, 1)
                .unwrap();
            assert!(max_rel(&got, &full) < 1e-5, "fork {salt} step {i}");
        }
    }
}

#[test]
fn exhausting_the_pool_or_the_context_is_a_clear_error_and_keeps_other_sequences() {
    let _init = shared::params::init_turn();
    let lm = lm();
    let mut cache = paged(&lm, 4, 5); // 20 token slots
    let toks: Vec<u32> = (0..12).map(|i| (i * 5 % VOCAB) as u32).collect();
    let a = cache.add_sequence();
    lm_forward_cached(&lm, &row(&toks[..10]), &mut cache.seq(a).unwrap()).unwrap(); // 3 blocks
    let k_before = cache.gather(a, 1, 10).unwrap().0;
    let b = cache.add_sequence();
    let e = lm_forward_cached(&lm, &row(&toks[..9]), &mut cache.seq(b).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "KV block pool exhausted: sequence 1 needs 3 more blocks of 4 tokens, 2 of 5 free"
        ),
        "{e}"
    );
    assert_eq!(cache.alloc.seq(b).unwrap().len, 0);
    assert_eq!(cache.alloc.free_blocks(), 2);
    assert_eq!(max_rel(&cache.gather(a, 1, 10).unwrap().0, &k_before), 0.0);
    // a continues correctly.
    let got = lm_forward_cached(&lm, &row(&toks[10..11]), &mut cache.seq(a).unwrap()).unwrap();
    let full = lm
        .forward(&row(&toks[..11]), 0)
        .unwrap()
        .narrow(1, 10, 1)
        .unwrap();
    assert!(max_rel(&got, &full) < 1e-5);
    // The maximum context of the allocator.
    let mut al = BlockAllocator::new(4, 100, 48).unwrap();
    let s = al.add_sequence();
    al.reserve(s, 40).unwrap();
    al.advance(s, 40).unwrap();
    let e = al.reserve(s, 9).unwrap_err().to_string();
    assert!(
        e.contains("sequence 0 would hold 49 tokens, beyond the maximum context of 48"),
        "{e}"
    );
    assert_eq!(al.seq(s).unwrap().len, 40);
    cache.free_sequence(a).unwrap();
    cache.free_sequence(b).unwrap();
    assert_eq!(cache.alloc.free_blocks(), 5);
}

#[test]
fn serving_simulation_paged_wastes_less_and_fits_more() {
    let _init = shared::params::init_turn();
    let reqs = workload(120, 4, (8, 200), (8, 200), 3);
    let budget = 16 * 512;
    let c = simulate(&reqs, Policy::Contiguous, budget, 512).unwrap();
    let p = simulate(&reqs, Policy::Paged { block_size: 16 }, budget, 512).unwrap();
    assert_eq!((c.finished, p.finished), (120, 120));
    assert_eq!(
        c.generated_tokens,
        reqs.iter().map(|r| r.output).sum::<usize>()
    );
    assert!(
        c.max_batch <= 16,
        "contiguous fits budget / max_seq = 16 sequences"
    );
    assert!(p.waste_pct < 15.0, "paged waste {}", p.waste_pct);
    assert!(c.waste_pct > 50.0, "contiguous waste {}", c.waste_pct);
    assert!(
        p.mean_batch > 1.5 * c.mean_batch,
        "paged batch {} vs contiguous {}",
        p.mean_batch,
        c.mean_batch
    );
    assert!(p.steps < c.steps);
    // Block size 1 has no internal fragmentation at all.
    let one = simulate(&reqs, Policy::Paged { block_size: 1 }, budget, 512).unwrap();
    assert!(one.waste_pct.abs() < 1e-9, "{}", one.waste_pct);
}

#[test]
fn prefix_sharing_counts_blocks_exactly() {
    let _init = shared::params::init_turn();
    // 4 sequences of a 40-token prefix (2 full blocks of 16 + 8) and 10 own tokens each.
    let (without, with) = prefix_sharing_blocks(40, &[10, 10, 10, 10], 16, 128).unwrap();
    assert_eq!(without, 4 * 50usize.div_ceil(16)); // 16
                                                   // The 2 full prefix blocks once; each fork copies the partial 3rd block (8 prefix + 8 own
                                                   // tokens) and takes a 4th for its last 2 tokens; the root's own partial block is freed.
    assert_eq!(with, 2 + 4 * 2);
}

// ---- sampling ----

fn random_logits(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-3.0..3.0f32)).collect()
}

fn argmax(l: &[f32]) -> u32 {
    l.iter()
        .enumerate()
        .fold(0, |b, (i, &x)| if x > l[b] { i } else { b }) as u32
}

#[test]
fn temperature_to_zero_is_greedy() {
    let _init = shared::params::init_turn();
    let mut rng = StdRng::seed_from_u64(2);
    for trial in 0..50 {
        let l = random_logits(&mut rng, 30);
        let mut sorted = l.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let gap = (sorted[0] - sorted[1]) as f64;
        let mut greedy = Sampler::new(SamplingConfig::greedy(), trial).unwrap();
        let mut cold = Sampler::new(
            SamplingConfig {
                temperature: gap / 50.0,
                top_k: None,
                top_p: None,
            },
            trial,
        )
        .unwrap();
        for _ in 0..20 {
            assert_eq!(greedy.sample_slice(&l).unwrap(), argmax(&l));
            assert_eq!(
                cold.sample_slice(&l).unwrap(),
                argmax(&l),
                "trial {trial}: gap {gap}"
            );
        }
    }
    let t = Tensor::new(&[0.1f32, 2.0, -1.0], &test_device()).unwrap();
    assert_eq!(
        Sampler::new(SamplingConfig::greedy(), 0)
            .unwrap()
            .sample(&t)
            .unwrap(),
        1
    );
}

/// softmax(l/T) in f64, the reference for the statistical tests.
fn probs(l: &[f32], t: f64) -> Vec<f64> {
    let m = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = l.iter().map(|&x| ((x as f64 - m) / t).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|x| x / z).collect()
}

#[test]
fn top_k_and_top_p_never_pick_outside_the_allowed_set_and_match_the_distribution() {
    let _init = shared::params::init_turn();
    let mut rng = StdRng::seed_from_u64(3);
    let l = random_logits(&mut rng, 40);
    let p = probs(&l, 0.8);
    let mut order: Vec<usize> = (0..40).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    for (top_k, top_p) in [
        (Some(5), None),
        (None, Some(0.6)),
        (Some(8), Some(0.5)),
        (Some(1), None),
    ] {
        // The allowed set, computed independently.
        let mut allowed: Vec<usize> = order[..top_k.unwrap_or(40)].to_vec();
        if let Some(tp) = top_p {
            let mass: f64 = allowed.iter().map(|&i| p[i]).sum();
            let mut acc = 0.0;
            let mut keep = 0;
            for &i in &allowed {
                acc += p[i] / mass;
                keep += 1;
                if acc >= tp {
                    break;
                }
            }
            allowed.truncate(keep);
        }
        let z: f64 = allowed.iter().map(|&i| p[i]).sum();
        let cfg = SamplingConfig {
            temperature: 0.8,
            top_k,
            top_p,
        };
        let mut s = Sampler::new(cfg, 99).unwrap();
        let n = 20_000;
        let mut counts = vec![0usize; 40];
        for _ in 0..n {
            counts[s.sample_slice(&l).unwrap() as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            if !allowed.contains(&i) {
                assert_eq!(
                    c, 0,
                    "{cfg:?}: token {i} is outside the allowed set {allowed:?}"
                );
            } else {
                // Frequency within 5 standard deviations of the renormalised probability.
                let q = p[i] / z;
                let sd = (q * (1.0 - q) / n as f64).sqrt();
                let f = c as f64 / n as f64;
                assert!(
                    (f - q).abs() <= 5.0 * sd + 1e-9,
                    "{cfg:?}: token {i} frequency {f} vs {q}"
                );
            }
        }
        let listed: Vec<usize> = allowed_tokens(&l, &cfg)
            .unwrap()
            .iter()
            .map(|x| x.0 as usize)
            .collect();
        assert_eq!(listed, allowed);
    }
}

#[test]
fn bad_sampling_settings_are_refused() {
    let _init = shared::params::init_turn();
    for (cfg, msg) in [
        (
            SamplingConfig {
                temperature: -1.0,
                top_k: None,
                top_p: None,
            },
            "temperature must be ≥ 0",
        ),
        (
            SamplingConfig {
                temperature: 1.0,
                top_k: Some(0),
                top_p: None,
            },
            "top_k must be ≥ 1",
        ),
        (
            SamplingConfig {
                temperature: 1.0,
                top_k: None,
                top_p: Some(1.5),
            },
            "top_p must be in (0, 1]",
        ),
    ] {
        let e = Sampler::new(cfg, 0).err().unwrap().to_string();
        assert!(e.contains(msg), "{e}");
    }
}

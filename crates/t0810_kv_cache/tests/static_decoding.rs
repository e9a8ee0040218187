//! The static cache (position on the device, attention over its slots up to that position) and
//! the greedy decoder built on it, against the host-position cache and the full forward pass;
//! on CUDA (`MODULE08_TEST_DEVICE=cuda`), the decoder replayed from a CUDA graph against the
//! same decoder run eagerly.

use candle_core::{DType, Device, Result, Tensor};
use shared::device::test_device;
use shared::kernels::{AttentionImpl, Kernels};
use t0804_transformer_block::{init_lm, DecoderOnlyLm, LmConfig, LmShape};
use t0810_kv_cache::*;

const VOCAB: usize = 61;

const SHAPE: LmShape = LmShape {
    vocab_size: VOCAB,
    max_seq_len: 48,
    d_model: 32,
    n_layers: 2,
    n_heads: 4,
};

fn prompt(batch: usize, n: usize, dev: &Device) -> Tensor {
    let ids: Vec<u32> = (0..batch * n)
        .map(|i| ((i * 37 + 5) % VOCAB) as u32)
        .collect();
    Tensor::from_vec(ids, (batch, n), dev).unwrap()
}

/// A LLaMA rung (RoPE, RMSNorm, SwiGLU, `n_kv_heads` K/V heads) with `kernels`.
fn llama(kernels: Kernels, n_kv_heads: usize, dtype: DType, dev: &Device) -> DecoderOnlyLm {
    shared::params::set_seed(7);
    let cfg = t0808_rope::llama(SHAPE, n_kv_heads);
    init_lm(&cfg, &t0809_flash_attention::parts(kernels), dtype, dev)
        .unwrap()
        .1
}

/// The kernels a static cache can decode with: every op composed, and every op fused with the
/// fused-softmax attention (FlashAttention takes no device key index).
fn kernel_choices() -> [Kernels; 2] {
    [
        Kernels::composed(),
        Kernels::fused().with_attention(AttentionImpl::Naive),
    ]
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Step by step, the static cache's logits equal the host-position cache's: the empty slots it
/// attends over weigh exactly zero (float64, both kernel choices, MHA and GQA, batch 2).
#[test]
fn static_cache_steps_equal_the_host_position_cache() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = Device::Cpu;
    for kernels in kernel_choices() {
        for n_kv_heads in [4, 2] {
            let lm = llama(kernels, n_kv_heads, DType::F64, &dev);
            let mut host = lm_cache(&lm, 2, 20, CacheKind::Preallocated, DType::F64)?;
            let (n_kv, d_head) = lm.kv_heads();
            let shape = CacheShape {
                n_layers: SHAPE.n_layers,
                batch: 2,
                n_kv_heads: n_kv,
                max_seq: 20,
                d_head,
            };
            let mut stat = StaticKvCache::new(shape, DType::F64, &dev)?;
            let p = prompt(2, 6, &dev);
            let a = lm.forward_cached(&p, &mut host)?;
            let b = lm.forward_cached(&p, &mut stat)?;
            assert!(max_abs_diff(&a, &b) < 1e-12, "prefill");
            let mut next = greedy_next(&a)?;
            for step in 0..10 {
                let a = lm.forward_cached(&next, &mut host)?;
                let b = lm.forward_cached(&next, &mut stat)?;
                let err = max_abs_diff(&a, &b);
                assert!(
                    err < 1e-12,
                    "{} kv heads {n_kv_heads}, step {step}: {err:e}",
                    kernels.describe()
                );
                assert_eq!(stat.seq_len(), host.seq_len());
                let pos: Vec<u32> = stat.position().to_vec1()?;
                assert_eq!(pos, [stat.seq_len() as u32], "device position follows");
                next = greedy_next(&a)?;
            }
        }
    }
    Ok(())
}

/// The greedy decoder produces the tokens of the full forward pass re-run on each prefix (no
/// cache at all), for every sequence of a batch, with both kernel choices.
#[test]
fn greedy_decoder_matches_the_full_forward() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = Device::Cpu;
    for kernels in kernel_choices() {
        let lm = llama(kernels, 2, DType::F64, &dev).with_packed_qkv()?;
        let p = prompt(2, 5, &dev);
        let mut dec = GreedyDecoder::new(&lm, 2, 16, DType::F64)?;
        dec.prefill(&p)?;
        while dec.steps_left() > 0 {
            dec.step()?;
        }
        let got = dec.sequences()?;
        assert_eq!(
            got[0].len(),
            17,
            "16 positions cached + the last token produced"
        );
        let mut seq = p.clone();
        for _ in 0..12 {
            let next = greedy_next(&lm.forward(&seq, 0)?)?;
            seq = Tensor::cat(&[&seq, &next], 1)?;
        }
        let want: Vec<Vec<u32>> = seq.to_vec2()?;
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(&g[..w.len()], &w[..], "{}", kernels.describe());
        }
        assert_eq!(dec.generated()?[0].len(), 12, "17 tokens − a prompt of 5");
        // A second prompt reuses the buffers: the old entries are hidden, not cleared.
        dec.prefill(&p.narrow(1, 0, 3)?)?;
        dec.step()?;
        let again = dec.sequences()?;
        let mut seq = p.narrow(1, 0, 3)?;
        for _ in 0..2 {
            let next = greedy_next(&lm.forward(&seq, 0)?)?;
            seq = Tensor::cat(&[&seq, &next], 1)?;
        }
        assert_eq!(again, seq.to_vec2::<u32>()?);
    }
    Ok(())
}

/// Misuse gets a clear error and changes nothing.
#[test]
fn static_decoding_errors_are_clear() -> Result<()> {
    let _init = shared::params::init_turn();
    let dev = Device::Cpu;
    let lm = llama(Kernels::composed(), 4, DType::F32, &dev);
    let mut dec = GreedyDecoder::new(&lm, 1, 8, DType::F32)?;
    let e = dec.step().unwrap_err().to_string();
    assert!(e.contains("prefill"), "{e}");
    let e = dec.prefill(&prompt(2, 3, &dev)).unwrap_err().to_string();
    assert!(e.contains("batch 1"), "{e}");
    dec.prefill(&prompt(1, 7, &dev))?;
    dec.step()?;
    let e = dec.step().unwrap_err().to_string();
    assert!(e.contains("KV cache full"), "{e}");
    assert_eq!(dec.seq_len(), 8, "the failed step changed nothing");
    if !cfg!(feature = "cuda") {
        let e = dec.capture().unwrap_err().to_string();
        assert!(e.contains("cuda"), "{e}");
    }
    // Learned absolute positions are looked up on the host: no device-position form.
    shared::params::set_seed(3);
    let gpt2 = init_lm(
        &LmConfig::gpt2(SHAPE),
        &t0809_flash_attention::parts(Kernels::composed()),
        DType::F32,
        &dev,
    )?
    .1;
    let mut dec = GreedyDecoder::new(&gpt2, 1, 8, DType::F32)?;
    dec.prefill(&prompt(1, 3, &dev))?;
    let e = dec.step().unwrap_err().to_string();
    assert!(e.contains("positions inside attention"), "{e}");
    // FlashAttention takes its key lengths on the host.
    let lm = llama(Kernels::fused(), 4, DType::F32, &dev);
    let mut dec = GreedyDecoder::new(&lm, 1, 8, DType::F32)?;
    dec.prefill(&prompt(1, 3, &dev))?;
    let e = dec.step().unwrap_err().to_string();
    assert!(e.contains("naive attention"), "{e}");
    Ok(())
}

/// On CUDA: the decoder replayed from a CUDA graph writes the same tokens as the same decoder
/// run eagerly, in f32 and bf16, batch 1 and 3, composed ops and fused ops with `W_q, W_k, W_v`
/// packed (decode-bench's configuration).
#[test]
fn captured_decoding_equals_eager_decoding() -> Result<()> {
    let _init = shared::params::init_turn();
    let _turn = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let dev = test_device();
    if dev.is_cpu() {
        return Ok(()); // capture needs CUDA; the eager path is tested above
    }
    prepare_for_graphs(&dev)?;
    for kernels in kernel_choices() {
        for dtype in [DType::F32, DType::BF16] {
            for batch in [1, 3] {
                let mut lm = llama(kernels, 2, dtype, &dev);
                if kernels.norm == shared::kernels::OpImpl::Fused {
                    lm = lm.with_packed_qkv()?;
                }
                let p = prompt(batch, 9, &dev);
                let run = |captured: bool| -> Result<Vec<Vec<u32>>> {
                    let mut dec = GreedyDecoder::new(&lm, batch, 40, dtype)?;
                    dec.prefill(&p)?;
                    if captured {
                        dec.capture()?;
                        assert!(dec.is_captured());
                    }
                    while dec.steps_left() > 0 {
                        dec.step()?;
                    }
                    // Replays survive a new prompt: same buffers, position reset on the device.
                    dec.prefill(&p.narrow(1, 0, 4)?)?;
                    for _ in 0..5 {
                        dec.step()?;
                    }
                    let mut out = dec.sequences()?;
                    out.extend(dec.generated()?);
                    Ok(out)
                };
                let (eager, captured) = (run(false)?, run(true)?);
                assert_eq!(
                    eager,
                    captured,
                    "{} {dtype:?} batch {batch}",
                    kernels.describe()
                );
            }
        }
    }
    Ok(())
}

/// Tests that use the CUDA device take turns: a capture records everything the stream runs,
/// another test's kernels included.
static GPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The argmax op of greedy decoding picks what Candle's `argmax` picks on rows without ties
/// (f32, bf16; batch rows of a 10,000-token vocabulary and odd sizes), the first of equal maxima,
/// and refuses an empty row.
#[test]
fn argmax_op_matches_candles_argmax() -> Result<()> {
    let _init = shared::params::init_turn();
    let _turn = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let dev = test_device();
    for dtype in [DType::F32, DType::BF16] {
        for (rows, n) in [(1, 10_000), (3, 10_000), (5, 1), (2, 1_031)] {
            // Distinct values (a permutation), so that no rounding makes a tie.
            let ids: Vec<f32> = (0..rows * n)
                .map(|i| ((i * 7_919) % (rows * n)) as f32 / 64.0)
                .collect();
            let x = Tensor::from_vec(ids, (rows, n), &dev)?.to_dtype(dtype)?;
            let ours: Vec<u32> = argmax_last(&x)?.to_vec1()?;
            // bf16 keeps 8 bits and makes ties: the first index of the rounded maximum.
            let host: Vec<Vec<f32>> = x.to_dtype(DType::F32)?.to_vec2()?;
            let want: Vec<u32> = host
                .iter()
                .map(|r| {
                    let m = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    r.iter().position(|&v| v == m).unwrap() as u32
                })
                .collect();
            assert_eq!(ours, want, "{dtype:?} {rows}×{n}");
            if dtype == DType::F32 {
                let candle: Vec<u32> = x.argmax(1)?.to_vec1()?;
                assert_eq!(ours, candle, "{rows}×{n}: Candle's argmax");
            }
        }
    }
    // The rules, on every device: the first of equal maxima (also when one thread of the kernel
    // holds both, 1024 apart, and when they are in different threads), NaN skipped, a row of
    // NaN or of −∞ gives 0.
    let (nan, inf) = (f32::NAN, f32::NEG_INFINITY);
    let mut far = vec![0f32; 3000];
    far[5] = 9.0;
    far[5 + 1024] = 9.0;
    far[2000] = 9.0;
    let rows: [(Vec<f32>, u32); 6] = [
        (vec![1.0, 5.0, 5.0, 0.0], 1),
        (vec![nan, -1.0, nan, -2.0], 1),
        (vec![nan; 4], 0),
        (vec![inf; 4], 0),
        (far.clone(), 5),
        ([vec![0f32; 40], vec![3.0; 2]].concat(), 40),
    ];
    for (row, want) in rows {
        let n = row.len();
        let x = Tensor::from_vec(row, (1, n), &dev)?;
        assert_eq!(argmax_last(&x)?.to_vec1::<u32>()?, [want], "{n} scores");
    }
    let e = argmax_last(&Tensor::zeros((2, 0), DType::F32, &dev)?)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least one score"), "{e}");
    Ok(())
}

/// `generate_lm_greedy_static` (the `generate --graphs` loop: captured on CUDA, eager elsewhere)
/// streams the tokens of `generate_lm` with a greedy sampler, and stops at `max_new` or at the
/// model's context.
#[test]
fn greedy_static_generation_streams_generate_lms_greedy_tokens() -> Result<()> {
    let _init = shared::params::init_turn();
    let _turn = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let dev = test_device();
    prepare_for_graphs(&dev)?;
    let lm = llama(
        Kernels::fused().with_attention(AttentionImpl::Naive),
        2,
        DType::F32,
        &dev,
    )
    .with_packed_qkv()?;
    let prompt: Vec<u32> = (0..7).map(|i| (i * 13 + 2) % VOCAB as u32).collect();
    for max_new in [1, 2, 20, 100] {
        let mut streamed = Vec::new();
        let ours = generate_lm_greedy_static(&lm, &prompt, max_new, &mut |t| streamed.push(t))?;
        let mut cache = lm_cache(
            &lm,
            1,
            SHAPE.max_seq_len,
            CacheKind::Preallocated,
            DType::F32,
        )?;
        let mut greedy = Sampler::new(SamplingConfig::greedy(), 0)?;
        let want = generate_lm(&lm, &prompt, max_new, &mut greedy, &mut cache, &mut |_| {})?;
        assert_eq!(ours.tokens, want.tokens, "max_new {max_new}");
        assert_eq!(streamed, ours.tokens);
        let room = SHAPE.max_seq_len - prompt.len() + 1;
        assert_eq!(ours.tokens.len(), max_new.min(room), "max_new {max_new}");
    }
    Ok(())
}

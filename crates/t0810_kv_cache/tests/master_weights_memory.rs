//! Master weights hold no more memory than casting every weight where it is used: the ladder's
//! LLaMA rung in bf16 over f32 parameters, trained a few steps each way on the CPU, where every
//! tensor lives in the process heap, under a global allocator that counts bytes, from before the
//! model is built: the bf16 copies one keeps are the casts the other makes in every step, and the
//! peak is no higher; and once a step's loss is dropped, its gradients hold no more than their
//! own bytes either way (a gradient that kept the graph which computed it would hold the upstream
//! gradients too: `third_party/README.md`, gradients stored detached).
//! Its own test binary with one test: the counting allocator sees that test only.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use shared::train::{AdamWConfig, ScheduleConfig, Trainer};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use t0804_transformer_block::{init_lm, init_lm_mixed, DecoderOnlyLm, LmShape};

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; the counters are plain atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Relaxed) + layout.size();
        PEAK.fetch_max(now, Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A small LLaMA in bf16-mixed, its parameters f32: `(parameters, compute copies (with master
/// weights), model)`; with casts the model casts every f32 weight where it is used.
type Mixed = (VarMap, Option<VarMap>, DecoderOnlyLm);

fn small_llama(master: bool) -> anyhow::Result<Mixed> {
    let dev = Device::Cpu;
    let shape = LmShape {
        vocab_size: 2000,
        max_seq_len: 64,
        d_model: 128,
        n_layers: 2,
        n_heads: 4,
    };
    let cfg = t0808_rope::llama(shape, 2);
    let parts = t0809_flash_attention::parts(shared::kernels::Kernels::for_device(&dev));
    if master {
        return init_lm_mixed(&cfg, &parts, (DType::F32, DType::BF16), &dev);
    }
    let (params, lm) = init_lm(&cfg, &parts, DType::F32, &dev)?;
    Ok((params, None, lm.with_compute_dtype(DType::BF16)))
}

/// One batch of 16 windows of 64 tokens: `(inputs, targets)`.
fn batch() -> anyhow::Result<(Tensor, Tensor)> {
    let ids: Vec<u32> = (0..16 * 65).map(|i| (i * 7 % 2000) as u32).collect();
    let batch = Tensor::from_vec(ids, (16, 65), &Device::Cpu)?;
    Ok((batch.narrow(1, 0, 64)?, batch.narrow(1, 1, 64)?))
}

/// Peak heap bytes above what the process held before the model was built, over building it
/// and four training steps; and the bf16 copies' bytes.
fn peak_of_four_steps(master: bool) -> anyhow::Result<(usize, usize)> {
    let start = CURRENT.load(Relaxed);
    PEAK.store(start, Relaxed);
    let (params, copies, lm) = small_llama(master)?;
    let schedule = ScheduleConfig {
        max_lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 0,
        total_steps: 10,
        clip_norm: Some(1.0),
    };
    let copy_bytes = shared::params::count_params(&params) * 2;
    let mut trainer =
        Trainer::for_params(&params, copies.as_ref(), AdamWConfig::default(), schedule)?;
    let (x, y) = batch()?;
    for _ in 0..4 {
        trainer.step(&lm.loss(&x, &y)?)?;
    }
    Ok((PEAK.load(Relaxed) - start, copy_bytes))
}

/// Heap bytes one backward pass leaves held once its loss is dropped (the gradient store), and
/// the bytes of the gradients in it.
fn held_by_the_gradients(master: bool) -> anyhow::Result<(usize, usize)> {
    let (params, copies, lm) = small_llama(master)?;
    let vars = copies.as_ref().unwrap_or(&params).all_vars(); // what the model reads
    let (x, y) = batch()?;
    let before = CURRENT.load(Relaxed);
    let loss = lm.loss(&x, &y)?;
    let grads = loss.backward()?;
    drop(loss);
    let held = CURRENT.load(Relaxed).saturating_sub(before);
    let grad_bytes = vars
        .iter()
        .filter_map(|v| grads.get(v))
        .map(|g| g.elem_count() * g.dtype().size_in_bytes())
        .sum();
    Ok((held, grad_bytes))
}

#[test]
fn master_weights_hold_no_more_memory_than_casting() -> anyhow::Result<()> {
    let (cast, _) = peak_of_four_steps(false)?;
    let (master, copies) = peak_of_four_steps(true)?;
    println!("peak above the start: casts {cast} B, master weights {master} B (copies {copies} B)");
    assert!(
        cast > copies && master > copies,
        "the counter saw the model and the steps"
    );
    // The casts exist during every step as the copies exist throughout: the same peak.
    assert!(
        master <= cast,
        "master weights peak at {master} B, above the casts' {cast} B"
    );
    // The logits' gradient alone (16 × 64 × 2000 bf16) is 4.1 MB, 2.3 times the bf16 gradients.
    for master in [false, true] {
        let (held, grads) = held_by_the_gradients(master)?;
        println!("master weights {master}: {held} B held after the backward, gradients {grads} B");
        assert!(grads > 0, "the store has the parameters' gradients");
        assert!(
            held <= grads + grads / 4,
            "master weights {master}: {held} B held after the backward for {grads} B of gradients"
        );
    }
    Ok(())
}

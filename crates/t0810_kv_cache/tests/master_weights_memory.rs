//! Master weights hold no more memory than casting every weight where it is used: the ladder's
//! LLaMA rung in bf16 over f32 parameters, trained a few steps each way on the CPU, where every
//! tensor lives in the process heap, under a global allocator that counts bytes, from before the
//! model is built: the bf16 copies one keeps are the casts the other makes in every step, and the
//! peak is no higher.
//! Its own test binary: the counting allocator sees this test only.

use candle_core::{DType, Device, Tensor};
use shared::train::{compute_copies, AdamWConfig, ScheduleConfig, Trainer};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use t0804_transformer_block::{build_lm, init_lm, LmShape};

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

/// Peak heap bytes above what the process held before the model was built, over building it
/// and four training steps; and the bf16 copies' bytes.
fn peak_of_four_steps(master: bool) -> anyhow::Result<(usize, usize)> {
    let start = CURRENT.load(Relaxed);
    PEAK.store(start, Relaxed);
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
    let (params, lm) = init_lm(&cfg, &parts, DType::F32, &dev)?;
    let schedule = ScheduleConfig {
        max_lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 0,
        total_steps: 10,
        clip_norm: Some(1.0),
    };
    let copy_bytes = shared::params::count_params(&params) * 2;
    let (mut trainer, lm) = if master {
        let copies = compute_copies(&params, DType::BF16)?;
        let vb = candle_nn::VarBuilder::from_varmap(&copies, DType::BF16, &dev);
        let lm = build_lm(vb, &cfg, &parts)?;
        let t = Trainer::with_master_weights(&copies, &params, AdamWConfig::default(), schedule)?;
        (t, lm)
    } else {
        let t = Trainer::new(&params, AdamWConfig::default(), schedule)?;
        (t, lm.with_compute_dtype(DType::BF16))
    };
    let ids: Vec<u32> = (0..16 * 65).map(|i| (i * 7 % 2000) as u32).collect();
    let batch = Tensor::from_vec(ids, (16, 65), &dev)?;
    let (x, y) = (batch.narrow(1, 0, 64)?, batch.narrow(1, 1, 64)?);
    for _ in 0..4 {
        trainer.step(&lm.loss(&x, &y)?)?;
    }
    Ok((PEAK.load(Relaxed) - start, copy_bytes))
}

#[test]
fn master_weights_peak_no_higher_than_casting() -> anyhow::Result<()> {
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
    Ok(())
}

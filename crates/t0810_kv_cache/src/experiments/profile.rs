//! `train-bench --profile`: the phases of a training step timed one by one. For each phase the
//! host's time to enqueue it (Candle's per-op overhead: building the graph, choosing and
//! launching kernels) and the time until the device has finished it; where the two are close the
//! phase is bound by the host, not by the GPU. The last profiled step is bracketed by
//! `cuProfilerStart/Stop` (the region `ncu --profile-from-start off` records).

use anyhow::{Context, Result};
use candle_core::Device;
use shared::batching::LmBatcher;
use shared::report::print_table;
use shared::train::AdamW;
use std::time::Instant;
use t0804_transformer_block::DecoderOnlyLm;

/// Median milliseconds of one phase.
pub struct Phase {
    pub name: &'static str,
    /// Until the host has enqueued the phase.
    pub host_ms: f64,
    /// Until the device has finished it.
    pub total_ms: f64,
}

/// The phases of a step and the peak device memory held by tensors (GPU only).
pub struct Phases {
    pub phases: Vec<Phase>,
    pub peak_memory_gib: Option<f64>,
}

const NAMES: [&str; 4] = ["forward", "backward", "clip", "adamw"];

/// Runs `f`, returns its value and `(host seconds, seconds until the device is done)`.
fn timed<T>(dev: &Device, f: impl FnOnce() -> Result<T>) -> Result<(T, (f64, f64))> {
    let t = Instant::now();
    let out = f()?;
    let host = t.elapsed().as_secs_f64();
    dev.synchronize()?;
    Ok((out, (host, t.elapsed().as_secs_f64())))
}

/// One profiled step: the four phases' `(host, total)` seconds.
fn profile_step(
    lm: &DecoderOnlyLm,
    opt: &mut AdamW,
    x: &candle_core::Tensor,
    y: &candle_core::Tensor,
    dev: &Device,
) -> Result<[(f64, f64); 4]> {
    let (loss, forward) = timed(dev, || Ok(lm.loss(x, y)?))?;
    let (grads, backward) = timed(dev, || Ok(loss.backward()?))?;
    // As the trainer's step: Σ g² and the clipping gate on the device, read by AdamW there.
    let (gate, clip) = timed(dev, || {
        let sum_sq = opt
            .grad_sum_of_squares(&grads)?
            .context("no parameter has a gradient")?;
        Ok(shared::adamw::step_gate(&sum_sq, &loss, Some(1.0))?)
    })?;
    let ((), adamw) = timed(dev, || opt.step_gated(&grads, 1e-4, &gate))?;
    Ok([forward, backward, clip, adamw])
}

fn median_ms(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2] * 1e3
}

/// Profiles `steps` steps of `lm` (updated by `opt`, clipping at 1) and prints the medians.
pub fn profile_phases(
    mut opt: AdamW,
    lm: &DecoderOnlyLm,
    batcher: &LmBatcher,
    tokens: &[u32],
    steps: usize,
    dev: &Device,
) -> Result<Phases> {
    let mut samples: Vec<[(f64, f64); 4]> = Vec::new();
    shared::device::reset_device_memory_peak(dev)?;
    println!(
        "   profiling {steps} steps phase by phase (a device synchronisation after each phase)"
    );
    for step in 0..steps {
        let b = batcher.batch(tokens, 1000 + step as u64, dev)?;
        dev.synchronize()?;
        let last = step + 1 == steps;
        if last {
            shared::device::profiler_range(dev, true)?;
        }
        samples.push(profile_step(lm, &mut opt, &b.x, &b.y, dev)?);
        if last {
            shared::device::profiler_range(dev, false)?;
        }
    }
    let phases: Vec<Phase> = NAMES
        .iter()
        .enumerate()
        .map(|(i, &name)| Phase {
            name,
            host_ms: median_ms(samples.iter().map(|r| r[i].0).collect()),
            total_ms: median_ms(samples.iter().map(|r| r[i].1).collect()),
        })
        .collect();
    let rows: Vec<Vec<String>> = phases
        .iter()
        .map(|p| {
            vec![
                p.name.to_string(),
                format!("{:.2}", p.host_ms),
                format!("{:.2}", p.total_ms),
            ]
        })
        .collect();
    print_table(&["phase", "host enqueue ms", "until done ms"], &rows);
    let peak_memory_gib =
        shared::device::device_memory_peak(dev)?.map(|peak| peak as f64 / (1u64 << 30) as f64);
    if let Some(gib) = peak_memory_gib {
        println!("   peak device memory held by tensors over the profiled steps: {gib:.2} GiB");
    }
    Ok(Phases {
        phases,
        peak_memory_gib,
    })
}

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

/// Median milliseconds of one phase, and the device memory around it (GPU only).
pub struct Phase {
    pub name: &'static str,
    /// Until the host has enqueued the phase.
    pub host_ms: f64,
    /// Until the device has finished it.
    pub total_ms: f64,
    /// GiB held by tensors when the phase starts, and the most they hold during it.
    pub memory_gib: Option<(f64, f64)>,
}

/// One phase of one step: `(host s, total s)` and, on the GPU, `(bytes at start, peak bytes)`.
type Sample = ((f64, f64), Option<(u64, u64)>);

/// The phases of a step and the peak device memory held by tensors (GPU only).
pub struct Phases {
    pub phases: Vec<Phase>,
    pub peak_memory_gib: Option<f64>,
}

const NAMES: [&str; 4] = ["forward", "backward", "clip", "adamw"];

/// Runs `f`, returns its value, `(host seconds, seconds until the device is done)` and, on the
/// GPU, the bytes tensors held when it started and at most while it ran.
fn timed<T>(dev: &Device, f: impl FnOnce() -> Result<T>) -> Result<(T, Sample)> {
    use shared::device::{device_memory_in_use, device_memory_peak, reset_device_memory_peak};
    reset_device_memory_peak(dev)?;
    let before = device_memory_in_use(dev)?;
    let t = Instant::now();
    let out = f()?;
    let host = t.elapsed().as_secs_f64();
    dev.synchronize()?;
    let seconds = (host, t.elapsed().as_secs_f64());
    let memory = before.zip(device_memory_peak(dev)?);
    Ok((out, (seconds, memory)))
}

/// One profiled step: the four phases' timings and memory.
fn profile_step(
    lm: &DecoderOnlyLm,
    opt: &mut AdamW,
    x: &candle_core::Tensor,
    y: &candle_core::Tensor,
    dev: &Device,
) -> Result<[Sample; 4]> {
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

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
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
    anyhow::ensure!(
        steps > 0,
        "train-bench --profile: --steps must be at least 1"
    );
    let mut samples: Vec<[Sample; 4]> = Vec::new();
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
            host_ms: median_ms(samples.iter().map(|r| r[i].0 .0).collect()),
            total_ms: median_ms(samples.iter().map(|r| r[i].0 .1).collect()),
            // The last step's (every step allocates alike).
            memory_gib: samples
                .last()
                .and_then(|r| r[i].1)
                .map(|(at_start, peak)| (gib(at_start), gib(peak))),
        })
        .collect();
    let shown = |v: Option<f64>| v.map_or("-".into(), |g| format!("{g:.2}"));
    let rows: Vec<Vec<String>> = phases
        .iter()
        .map(|p| {
            vec![
                p.name.to_string(),
                format!("{:.2}", p.host_ms),
                format!("{:.2}", p.total_ms),
                shown(p.memory_gib.map(|m| m.0)),
                shown(p.memory_gib.map(|m| m.1)),
            ]
        })
        .collect();
    let header = [
        "phase",
        "host enqueue ms",
        "until done ms",
        "GiB at start",
        "peak GiB",
    ];
    print_table(&header, &rows);
    let peaks = samples.iter().flatten().filter_map(|s| s.1.map(|m| m.1));
    let peak_memory_gib = peaks.max().map(gib);
    if let Some(gib) = peak_memory_gib {
        println!("   peak device memory held by tensors over the profiled steps: {gib:.2} GiB");
    }
    Ok(Phases {
        phases,
        peak_memory_gib,
    })
}

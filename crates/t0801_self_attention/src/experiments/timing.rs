//! Timing of the attention forward, shared by the two cost experiments, and the sizes they use.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use shared::train::Progress;
use std::time::Instant;
use t0801_self_attention::scaled_dot_product_attention;

/// Sizes and repetitions of the cost benchmarks, from the command line and the device.
pub struct CostPlan {
    /// Largest `n` of the cost-vs-n sweep: as given, else 512 with `--quick`, 16384 on CUDA,
    /// 4096 on the CPU.
    pub max_n: usize,
    /// The fixed `n` of the cost-vs-d sweep: 256 with `--quick`, 4096 on CUDA, 1024 on the CPU.
    pub n_for_d: usize,
    /// Timed rounds per size (at most 3 with `--quick`).
    pub reps: usize,
}

impl CostPlan {
    pub fn new(quick: bool, cuda: bool, max_n: Option<usize>, reps: usize) -> Self {
        let pick = |quick_size, cuda_size, cpu_size| match (quick, cuda) {
            (true, _) => quick_size,
            (false, true) => cuda_size,
            (false, false) => cpu_size,
        };
        Self {
            max_n: max_n.unwrap_or(pick(512, 16384, 4096)),
            n_for_d: pick(256, 4096, 1024),
            reps: if quick { reps.min(3) } else { reps },
        }
    }
}

/// Timing of one attention shape.
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    /// Bytes of the `n×n` weight matrix the call materialised.
    pub score_bytes: usize,
}

/// Wall time of one attention forward on `(1, 1, n, d)` inputs for each `(n, d)` of `shapes`.
///
/// Each shape is warmed up twice; then the `reps` timed rounds are *interleaved* (round r times
/// every shape once), so a burst of load from other processes hits all sizes alike instead of
/// ruining one. The device is synchronised before every clock reading (CUDA is asynchronous).
pub fn time_attention(
    dev: &Device,
    dtype: DType,
    shapes: &[(usize, usize)],
    reps: usize,
    label: &str,
) -> Result<Vec<Timing>> {
    let make = |n: usize, d: usize| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, (1, 1, n, d), dev)?.to_dtype(dtype)?)
    };
    let inputs: Vec<[Tensor; 3]> = shapes
        .iter()
        .map(|&(n, d)| Ok([make(n, d)?, make(n, d)?, make(n, d)?]))
        .collect::<Result<_>>()?;
    let bytes = warm_up(&inputs)?;
    dev.synchronize()?;
    let mut times = vec![Vec::with_capacity(reps); shapes.len()];
    let mut progress = Progress::new(reps as u64, label);
    for r in 0..reps {
        for (i, [q, k, v]) in inputs.iter().enumerate() {
            dev.synchronize()?;
            let t0 = Instant::now();
            let att = scaled_dot_product_attention(q, k, v, None)?;
            dev.synchronize()?;
            times[i].push(t0.elapsed().as_secs_f64() * 1e3);
            drop(att);
        }
        progress.update(r as u64 + 1, format!("round {}/{reps}", r + 1));
    }
    progress.finish();
    Ok(times
        .into_iter()
        .zip(bytes)
        .map(|(mut t, score_bytes)| {
            t.sort_by(f64::total_cmp);
            Timing {
                median_ms: t[t.len() / 2],
                min_ms: t[0],
                score_bytes,
            }
        })
        .collect())
}

/// Two untimed calls per shape (allocator, kernels); returns the bytes of each weight matrix.
fn warm_up(inputs: &[[Tensor; 3]]) -> Result<Vec<usize>> {
    let mut bytes = vec![0; inputs.len()];
    for (i, [q, k, v]) in inputs.iter().enumerate() {
        for _ in 0..2 {
            let att = scaled_dot_product_attention(q, k, v, None)?;
            bytes[i] = att.weights.elem_count() * att.weights.dtype().size_in_bytes();
        }
    }
    Ok(bytes)
}

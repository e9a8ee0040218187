//! Helpers shared by the experiments: random inputs, the relative error, autograd gradients,
//! median timings, byte formatting, and the counting allocator that measures host memory.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use t0809_flash_attention::flash_attention_tensor_ops;

/// An attention implementation: `(Q (b, h, n_q, d), K (b, h, n_k, d), V (b, h, n_k, d),
/// softmax scale, causal)` → `O (b, h, n_q, d)`.
pub type Attn = fn(&Tensor, &Tensor, &Tensor, f64, bool) -> candle_core::Result<Tensor>;

/// Random standard-normal f32 tensor of `shape` (e.g. `(b, h, n, d)`) on `dev`, drawn from the
/// seeded host generator so that every run sees the same inputs.
pub fn randn(shape: &[usize], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        shared::params::sample_normal(shape.iter().product(), 1.0, f64::INFINITY),
        shape,
        dev,
    )?)
}

/// FlashAttention as tensor ops (64×64 tiles), as an [`Attn`].
pub fn tensor_ops(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
) -> candle_core::Result<Tensor> {
    Ok(flash_attention_tensor_ops(q, k, v, causal, scale, 64, 64)?.0)
}

/// `max |a − b| / (1 + |b|)` over all elements (`b` is the reference; same shapes).
pub fn max_rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f64::max))
}

/// Output `O (b, h, n_q, d)` and `[dQ, dK, dV]` (shapes of `q`, `k`, `v`) of the loss `Σ O∘W`
/// through Candle's autograd; the gradient reaching `O` is therefore `W (b, h, n_q, d)`.
pub fn with_grads(
    f: Attn,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    w: &Tensor,
    scale: f64,
    causal: bool,
) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
    let vars = [
        Var::from_tensor(q)?,
        Var::from_tensor(k)?,
        Var::from_tensor(v)?,
    ];
    let o = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        scale,
        causal,
    )?;
    let g = (&o * w)?.sum_all()?.backward()?;
    let grads = vars
        .iter()
        .map(|x| match g.get(x.as_tensor()) {
            Some(t) => Ok(t.clone()),
            None => candle_core::bail!("missing gradient"),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok((o, grads))
}

/// The median of `samples` (the upper one of the middle two for an even count).
pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

/// Median wall time in seconds of `reps` runs of `f` (CPU: no synchronisation needed).
pub fn median_secs(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        t.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

/// Bytes in MiB (2²⁰ bytes).
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Bytes for a table cell: `"3.0 MiB"` from 1 MiB up, else `"512.0 KiB"`.
pub fn mb(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", mib(bytes as u64))
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

// ---------------------------------------------------------------------------------------------
// A counting allocator: current and peak bytes of host memory, so the memory of the naive and
// the flash paths on the CPU is measured, not computed.
// ---------------------------------------------------------------------------------------------

/// The process's global allocator: the system allocator, counting the bytes it hands out.
struct Counting;

/// Bytes allocated and not yet freed.
static CURRENT: AtomicUsize = AtomicUsize::new(0);
/// High-water mark of [`CURRENT`] since the last [`peak_extra_bytes`] began.
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new_size) };
        if !q.is_null() {
            CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
            grew(new_size);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns its result with the peak of *extra* host bytes allocated meanwhile.
pub fn peak_extra_bytes<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (r, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

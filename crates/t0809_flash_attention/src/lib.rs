//! # 8-09 · FlashAttention: exact attention without the `n × n` matrix
//!
//! Standard attention (8-01) computes, per batch element and head,
//!
//! ```text
//! S = Q·Kᵀ·s   (n_q, n_k)      P = softmax(S) (n_q, n_k)      O = P·V   (n_q, d)
//! ```
//!
//! with `s = 1/√d` the softmax scale. `S` and `P` have `n²` entries: at `n = 16384` they are
//! 1 GiB *per head* in f32, written to and read back from device memory (HBM) several times.
//! The arithmetic is cheap next to that traffic; attention is **memory-bound** because of a
//! matrix nobody needs to keep.
//!
//! ## Tiling and the online softmax
//! Split the keys into blocks `K₁, K₂, …` (and values `V₁, V₂, …`). For one query row keep three
//! running quantities: the maximum score seen so far `m`, the sum of exponentials relative to it
//! `ℓ`, and an unnormalised output `õ`. After block `j` with scores `sⱼ`:
//!
//! ```text
//! m'  = max(m, max sⱼ)
//! ℓ'  = e^{m − m'}·ℓ + Σ e^{sⱼ − m'}
//! õ'  = e^{m − m'}·õ + Σ e^{sⱼ − m'}·vⱼ
//! ```
//!
//! At the end `o = õ/ℓ` and the log-sum-exp of the row is `L = m + ln ℓ`. The factor
//! `e^{m − m'}` *rescales* what was accumulated against the old maximum, so the result is exact
//! (not an approximation) while only one block of scores exists at any time. The same holds for
//! a block of query rows at once: every quantity becomes a column vector.
//!
//! This crate has the algorithm three times:
//! - [`flash_attention_tensor_ops`]: the tiled loop written with Candle tensor ops, to read;
//! - [`FlashAttention`]: a Candle `CustomOp3` whose CPU forward is the tiled loop in plain Rust
//!   ([`cpu`]) and whose CUDA forward launches our kernels (`kernels/flash_attn.cu`, and on a
//!   Hopper card `kernels/flash_attn_hopper.cu`), with a backward ([`FlashAttentionBackward`]) on
//!   both;
//! - [`flash_attention`]: the public, differentiable entry point with its checks.
//!
//! ## The backward pass (FlashAttention-2)
//! With `L` saved, `P = exp(S − L)` is recomputed tile by tile instead of stored. With
//! `dO = ∂ℓ/∂O` and `D = rowsum(dO ∘ O)`:
//!
//! ```text
//! dV = Pᵀ·dO      dP = dO·Vᵀ      dS = P ∘ (dP − D)      dQ = dS·K·s      dK = dSᵀ·Q·s
//! ```
//!
//! (`D` replaces `rowsum(P ∘ dP)`: they are equal because `O = P·V`.)
//!
//! ## Causal masking
//! Query `i` may attend key `j` iff `j ≤ i + (n_k − n_q)`: the mask is aligned to the *end* of the
//! key sequence, like [`t0801_self_attention::causal_mask`], so the last query sees every key.
//! Causal attention needs `n_q ≤ n_k`. Whole tiles above the diagonal are skipped.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod ladder;
pub mod op;
pub mod tiled;

use candle_core::{bail, DType, Result, Tensor};
pub use shared::kernels::FlashKernels;

pub use ladder::{fastest_kernels, parts, FlashAttentionKernel, FlashParts};
pub use op::{FlashAttention, FlashAttentionBackward};
pub use tiled::flash_attention_tensor_ops;

/// Which CUDA kernel family runs for a given input (see `cuda.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaKernelFamily {
    /// Hopper (sm_90): the forward on warpgroup MMA (`wgmma`, operands read from shared memory,
    /// `kernels/flash_attn_hopper.cu`); the backward too where [`hopper_backward`] says so (d_head
    /// 64 or 128 from `HOPPER_BACKWARD_MIN_KEYS` keys; any length with
    /// `FlashKernels::WarpgroupMma`), else on the `mma.sync` kernels. bf16/f16, d_head 64 or 128,
    /// 16-byte-aligned starts.
    WarpgroupMma,
    /// `mma.sync` m16n8k16 with fp32 accumulators: bf16/f16, d_head 32, 64 or 128, 16-byte
    /// aligned starts.
    TensorCores,
    /// fp32 FMA, register-tiled (each thread a 4 × 4 block of scores, `float4` operands): f32,
    /// d_head 32 or 64, 16-byte-aligned starts.
    Fp32Tiled,
    /// fp32 FMA, one score per thread at a time, any d_head ≤ 128: everything else.
    Fp32Fma,
}

/// The CUDA kernel family [`flash_attention`] uses for `dtype` and `d_head`, with every input
/// starting at an element offset of `offsets`, on a card that runs the Hopper kernels or not
/// (`hopper`: [`hopper_kernels_on`]). [`FlashKernels::MmaSync`] keeps Hopper on the `mma.sync`
/// kernels and [`FlashKernels::Simple`] forces the simple fp32-FMA ones, to measure the
/// difference; [`FlashKernels::WarpgroupMma`] chooses as `Auto` does (its backward ignores the
/// length threshold: [`hopper_backward_with`]).
pub fn cuda_kernel_family(
    dtype: DType,
    d_head: usize,
    offsets: &[usize],
    kernels: FlashKernels,
    hopper: bool,
) -> CudaKernelFamily {
    let force_simple = kernels == FlashKernels::Simple;
    let half = matches!(dtype, DType::BF16 | DType::F16);
    let aligned_16 = offsets.iter().all(|o| o % 8 == 0);
    let hopper_allowed = matches!(kernels, FlashKernels::Auto | FlashKernels::WarpgroupMma);
    if hopper && hopper_allowed && half && matches!(d_head, 64 | 128) && aligned_16 {
        CudaKernelFamily::WarpgroupMma
    } else if !force_simple && half && matches!(d_head, 32 | 64 | 128) && aligned_16 {
        CudaKernelFamily::TensorCores
    } else if !force_simple
        && dtype == DType::F32
        && matches!(d_head, 32 | 64)
        && offsets.iter().all(|o| o % 4 == 0)
    {
        CudaKernelFamily::Fp32Tiled
    } else {
        CudaKernelFamily::Fp32Fma
    }
}

/// The fewest keys for which the backward of a [`CudaKernelFamily::WarpgroupMma`] call runs on
/// warpgroup MMA as well (at d_head 64 and 128). Measured through Candle in one call each
/// (`bench`'s "hopper bwd" against "mma.sync bwd", `hopper_bwd_vs_mma_sync` in
/// reports/gpu-runs/h100-2026-12-06-i/ratios.json and reports/gpu-runs/h200-2026-12-06/ratios.json):
/// at d 64 1.17–1.27× on an H100 at every length timed, 1,024 to 16,384 keys, causal and not; at
/// d 128 1.21–1.45× on an H200 at 1,024, 4,096 and 16,384 keys. Shorter calls keep the `mma.sync`
/// backward until measured.
pub const HOPPER_BACKWARD_MIN_KEYS: usize = 1024;

/// Whether the backward of a [`CudaKernelFamily::WarpgroupMma`] call with head size `d_head` over
/// `n_k` keys runs on the Hopper backward kernel.
pub fn hopper_backward(d_head: usize, n_k: usize) -> bool {
    hopper_backward_with(FlashKernels::Auto, d_head, n_k)
}

/// [`hopper_backward`] for a call made with `kernels` on a Hopper card: `Auto` at d_head 64 and
/// 128 from [`HOPPER_BACKWARD_MIN_KEYS`] keys, [`FlashKernels::WarpgroupMma`] at d_head 64 and
/// 128 whatever the number of keys, `MmaSync` and `Simple` never.
pub fn hopper_backward_with(kernels: FlashKernels, d_head: usize, n_k: usize) -> bool {
    match kernels {
        FlashKernels::Auto => matches!(d_head, 64 | 128) && n_k >= HOPPER_BACKWARD_MIN_KEYS,
        FlashKernels::WarpgroupMma => matches!(d_head, 64 | 128),
        FlashKernels::MmaSync | FlashKernels::Simple => false,
    }
}

/// From this many queries on, a [`CudaKernelFamily::WarpgroupMma`] forward at d_head 64 runs
/// with three consumer warpgroups (192 queries per block) instead of two (128). Measured in
/// `scripts/flash_hopper_probe.cu` on an H100 (reports/gpu-runs/h100-2026-12-06-g/call1/probe.txt,
/// "nc3 s3" against "shipped"): 1.25–1.28× from 4,096 queries without the mask and 1.12–1.17×
/// causal; at 1,024 queries 1.08× without the mask but 0.93× causal, where a block of 192 rows
/// wastes more of the diagonal, and a call with few queries (decoding) would leave most of a
/// larger block idle. At d_head 128 three consumers (with key tiles of 64, to fit the registers)
/// were 0.89–0.97× two.
pub const HOPPER_THREE_CONSUMERS_MIN_QUERIES: usize = 2048;

/// How many consumer warpgroups (64 queries each) the Hopper forward runs with for head size
/// `d_head` and `n_q` queries: 3 at d_head 64 from [`HOPPER_THREE_CONSUMERS_MIN_QUERIES`]
/// queries on, else 2.
pub fn hopper_forward_consumers(d_head: usize, n_q: usize) -> usize {
    if d_head == 64 && n_q >= HOPPER_THREE_CONSUMERS_MIN_QUERIES {
        3
    } else {
        2
    }
}

/// Whether `device` runs the Hopper kernels: a CUDA card of compute capability 9.0 (H100, H200),
/// with this build's `sm_90a` kernels (built unless `MODULE08_CUDA_ARCH` asked for another card).
pub fn hopper_kernels_on(device: &candle_core::Device) -> bool {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = device {
        return cuda::hopper_kernels_on(dev);
    }
    let _ = device;
    false
}

/// The usual softmax scale `1/√d_head`.
pub fn default_softmax_scale(d_head: usize) -> f64 {
    1.0 / (d_head as f64).sqrt()
}

/// FlashAttention forward, differentiable: `softmax(Q·Kᵀ·softmax_scale [causal])·V`.
///
/// Shapes: `q (batch, heads, n_q, d)`, `k (batch, heads, n_k, d)`, `v (batch, heads, n_k, d_v)`
/// → `(batch, heads, n_q, d_v)`. All three on one device, of one dtype: f32, f16, bf16 (f64 on
/// the CPU). On CUDA: `d = d_v ≤ 128`; tensor-core kernels run for bf16/f16 with `d` 32, 64 or
/// 128 (on a Hopper card the forward at `d` 64 and 128 on warpgroup MMA, and the backward too
/// from [`HOPPER_BACKWARD_MIN_KEYS`] keys), register-tiled
/// fp32-FMA kernels for f32 with `d` 32 or 64, a simpler fp32-FMA kernel in every other case
/// ([`cuda_kernel_family`] says which). Inputs are made contiguous here.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f64,
    causal: bool,
) -> Result<Tensor> {
    flash_attention_with(q, k, v, softmax_scale, causal, FlashKernels::Auto)
}

/// [`flash_attention`] with the CUDA kernel families chosen by `kernels`.
pub fn flash_attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f64,
    causal: bool,
    kernels: FlashKernels,
) -> Result<Tensor> {
    Ok(run_flash(q, k, v, FlashAttention::new(softmax_scale, causal, kernels))?.0)
}

/// [`flash_attention_with`] over padded keys: sequence `b` has `key_lengths[b]` real keys (each
/// in `1..=n_k`), then padding that no query sees and whose `dK`, `dV` are zero. The causal
/// diagonal stays end-aligned to all `n_k` keys (for a decoder's self-attention over a padded
/// target, `n_q = n_k`: query `i` sees keys `0..=min(i, len − 1)`).
pub fn flash_attention_padded(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f64,
    causal: bool,
    kernels: FlashKernels,
    key_lengths: &[usize],
) -> Result<Tensor> {
    let (b, n_k) = (q.dim(0)?, k.dim(2)?);
    if key_lengths.len() != b {
        bail!(
            "flash_attention_padded: {} key lengths for a batch of {b}",
            key_lengths.len()
        );
    }
    if let Some((i, &n)) = key_lengths
        .iter()
        .enumerate()
        .find(|(_, &n)| n == 0 || n > n_k)
    {
        bail!("flash_attention_padded: sequence {i} has {n} real keys, not in 1..={n_k}");
    }
    let op = FlashAttention::new(softmax_scale, causal, kernels)
        .with_key_lengths(Some(key_lengths.into()));
    Ok(run_flash(q, k, v, op)?.0)
}

/// [`flash_attention`] that also returns the row log-sum-exp `L (batch, heads, n_q)`
/// (`L = ln Σⱼ exp(sᵢⱼ)` over the keys query `i` may attend, in f32, f64 for f64 inputs).
/// `L` is detached: gradients flow through the output only.
pub fn flash_attention_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f64,
    causal: bool,
) -> Result<(Tensor, Tensor)> {
    run_flash(
        q,
        k,
        v,
        FlashAttention::new(softmax_scale, causal, FlashKernels::Auto),
    )
}

fn run_flash(q: &Tensor, k: &Tensor, v: &Tensor, op: FlashAttention) -> Result<(Tensor, Tensor)> {
    check_inputs(q, k, v, op.softmax_scale, op.causal)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let lse_slot = op.lse_slot();
    let out = q.apply_op3(&k, &v, op)?;
    let lse = lse_slot.lock().expect("lse slot").clone();
    match lse {
        Some(lse) => Ok((out, lse)),
        None => bail!("flash_attention: the forward did not record its log-sum-exp"),
    }
}

/// Checks shapes, dtypes and devices at the public boundary, with messages naming the values.
pub fn check_inputs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f64,
    causal: bool,
) -> Result<()> {
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    if qd.len() != 4 || kd.len() != 4 || vd.len() != 4 {
        bail!("flash_attention: q {qd:?}, k {kd:?}, v {vd:?} must all be 4-D (batch, heads, seq, d_head)");
    }
    if qd[..2] != kd[..2] || kd[..2] != vd[..2] {
        bail!("flash_attention: (batch, heads) differ: q {qd:?}, k {kd:?}, v {vd:?}");
    }
    if qd[3] != kd[3] {
        bail!(
            "flash_attention: query width {} ≠ key width {} (q {qd:?}, k {kd:?})",
            qd[3],
            kd[3]
        );
    }
    if kd[2] != vd[2] {
        bail!(
            "flash_attention: {} keys but {} values (k {kd:?}, v {vd:?})",
            kd[2],
            vd[2]
        );
    }
    if qd.iter().chain(kd).chain(vd).any(|&n| n == 0) {
        bail!("flash_attention: empty dimension in q {qd:?}, k {kd:?}, v {vd:?}");
    }
    if causal && qd[2] > kd[2] {
        bail!(
            "flash_attention: causal attention needs n_q ≤ n_k, got n_q = {} > n_k = {}",
            qd[2],
            kd[2]
        );
    }
    if !softmax_scale.is_finite() || softmax_scale <= 0.0 {
        bail!("flash_attention: softmax_scale must be finite and > 0, got {softmax_scale}");
    }
    check_dtypes_and_devices(q, k, v)
}

/// The dtype and device rules of [`check_inputs`]: one float dtype, one device, CUDA limits.
fn check_dtypes_and_devices(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    let (qd, vd) = (q.dims(), v.dims());
    let dt = q.dtype();
    if k.dtype() != dt || v.dtype() != dt {
        bail!(
            "flash_attention: dtypes differ: q {:?}, k {:?}, v {:?}",
            dt,
            k.dtype(),
            v.dtype()
        );
    }
    if !matches!(dt, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
        bail!(
            "flash_attention: dtype {dt:?} not supported (use f32, f16, bf16, or f64 on the CPU)"
        );
    }
    let dev = q.device();
    if !k.device().same_device(dev) || !v.device().same_device(dev) {
        bail!(
            "flash_attention: q, k, v are on different devices ({:?}, {:?}, {:?})",
            dev.location(),
            k.device().location(),
            v.device().location()
        );
    }
    if dev.is_cuda() {
        if dt == DType::F64 {
            bail!("flash_attention: f64 is CPU-only; on CUDA use f32, f16 or bf16");
        }
        if qd[3] != vd[3] || qd[3] > 128 {
            bail!(
                "flash_attention on CUDA needs d_head = d_v ≤ 128, got d_head {} and d_v {}",
                qd[3],
                vd[3]
            );
        }
    } else if !dev.is_cpu() {
        bail!(
            "flash_attention: device {:?} not supported (CPU or CUDA)",
            dev.location()
        );
    }
    Ok(())
}

/// The naive path of 8-01 with an arbitrary scale and an optional end-aligned causal mask:
/// `softmax(Q·Kᵀ·scale)·V`, materialising the `(…, n_q, n_k)` matrices. `q` is pre-multiplied by
/// `scale·√d` because t0801 divides by `√d` itself.
pub fn naive_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let d = q.dim(candle_core::D::Minus1)?;
    let q = (q * (softmax_scale * (d as f64).sqrt()))?;
    let mask = if causal {
        let (n_q, n_k) = (
            q.dim(candle_core::D::Minus2)?,
            k.dim(candle_core::D::Minus2)?,
        );
        Some(t0801_self_attention::causal_mask(n_q, n_k, q.device())?)
    } else {
        None
    };
    Ok(t0801_self_attention::scaled_dot_product_attention(&q, k, v, mask.as_ref())?.output)
}

/// Forward FLOPs of attention as benchmarks count them: `4·batch·heads·n_q·n_k·d` (two matmuls),
/// halved when causal. The backward is counted as 2.5× the forward (five matmuls instead of
/// two).
pub fn attention_fwd_flops(
    batch_heads: usize,
    n_q: usize,
    n_k: usize,
    d: usize,
    causal: bool,
) -> f64 {
    let f = 4.0 * batch_heads as f64 * n_q as f64 * n_k as f64 * d as f64;
    if causal {
        f / 2.0
    } else {
        f
    }
}

#[cfg(test)]
mod kernel_family_tests {
    use super::*;

    #[test]
    fn hopper_backward_runs_past_the_threshold_or_when_forced_at_d64_and_d128() {
        let min = HOPPER_BACKWARD_MIN_KEYS;
        for d in [64, 128] {
            assert!(!hopper_backward(d, min - 1), "d {d}");
            assert!(hopper_backward(d, min), "d {d}");
        }
        assert!(!hopper_backward(32, 4 * min));
        let forced = FlashKernels::WarpgroupMma;
        assert!(hopper_backward_with(forced, 64, 1));
        assert!(hopper_backward_with(forced, 128, 1), "d 128 when asked for");
        assert!(!hopper_backward_with(forced, 32, 4 * min));
        for other in [FlashKernels::MmaSync, FlashKernels::Simple] {
            assert!(!hopper_backward_with(other, 64, 4 * min), "{other:?}");
        }
    }

    #[test]
    fn hopper_forward_runs_three_consumers_at_d64_on_long_calls() {
        let long = HOPPER_THREE_CONSUMERS_MIN_QUERIES;
        for n_q in [1, 1024, long - 1, long, 16384] {
            let want = if n_q >= long { 3 } else { 2 };
            assert_eq!(
                hopper_forward_consumers(64, n_q),
                want,
                "d 64, {n_q} queries"
            );
            assert_eq!(
                hopper_forward_consumers(128, n_q),
                2,
                "d 128, {n_q} queries"
            );
        }
    }

    #[test]
    fn kernel_family_follows_dtype_head_size_and_alignment() {
        use CudaKernelFamily::*;
        let family = |dt, d, offsets: &[usize]| {
            cuda_kernel_family(dt, d, offsets, FlashKernels::Auto, false)
        };
        let hopper = |dt, d, kernels| cuda_kernel_family(dt, d, &[0, 8, 0], kernels, true);
        assert_eq!(
            cuda_kernel_family(DType::BF16, 64, &[0, 0, 0], FlashKernels::Simple, false),
            Fp32Fma
        );
        for d in [64, 128] {
            assert_eq!(hopper(DType::BF16, d, FlashKernels::Auto), WarpgroupMma);
            assert_eq!(hopper(DType::F16, d, FlashKernels::Auto), WarpgroupMma);
            assert_eq!(
                hopper(DType::BF16, d, FlashKernels::WarpgroupMma),
                WarpgroupMma
            );
            assert_eq!(
                cuda_kernel_family(DType::BF16, d, &[0], FlashKernels::WarpgroupMma, false),
                TensorCores
            );
            assert_eq!(hopper(DType::BF16, d, FlashKernels::MmaSync), TensorCores);
            assert_eq!(hopper(DType::BF16, d, FlashKernels::Simple), Fp32Fma);
            assert_eq!(
                hopper(DType::F32, d, FlashKernels::Auto),
                family(DType::F32, d, &[0])
            );
        }
        assert_eq!(hopper(DType::BF16, 32, FlashKernels::Auto), TensorCores);
        assert_eq!(
            cuda_kernel_family(DType::BF16, 64, &[0, 4], FlashKernels::Auto, true),
            Fp32Fma
        );
        for d in [32, 64, 128] {
            assert_eq!(family(DType::BF16, d, &[0, 8, 16]), TensorCores);
            assert_eq!(family(DType::F16, d, &[0, 0, 0]), TensorCores);
            assert_eq!(family(DType::BF16, d, &[0, 4, 0]), Fp32Fma);
        }
        for d in [32, 64] {
            assert_eq!(family(DType::F32, d, &[0, 4, 64]), Fp32Tiled);
            assert_eq!(family(DType::F32, d, &[0, 2, 0]), Fp32Fma);
        }
        assert_eq!(family(DType::F32, 128, &[0, 0, 0]), Fp32Fma);
        for d in [16, 48, 80, 96] {
            assert_eq!(family(DType::BF16, d, &[0, 0, 0]), Fp32Fma);
            assert_eq!(family(DType::F32, d, &[0, 0, 0]), Fp32Fma);
        }
    }
}

//! # Naive attention with a fused causal softmax
//!
//! Naive attention materialises the `(n_q, n_k)` scores of every head. What it costs beyond its
//! two matmuls is the softmax: written from tensor ops (8-01's [`mask_scores`] and
//! [`softmax_last_dim`]) it is a scale, a mask, a max, a subtraction, an `exp`, a sum and a
//! division, each a full pass over a `(batch, heads, n_q, n_k)` tensor, and as many again in the
//! backward. As one op:
//!
//! ```text
//! forward   y  = softmax(s·x + mask)           s = 1/√d_head, mask = −∞ above the diagonal
//! backward  dx = s · y ⊙ (g − Σ_k g_k y_k)     per row (the softmax Jacobian, times s)
//! ```
//!
//! one pass forward (two reads of the scores a row may see), one backward, and the masked half of
//! every row is written as zeros without being read. [`FusedSoftmaxAttention`] plugs it into
//! 8-02's attention component as a kernel: still naive attention (the score matrix exists), now
//! at the cost PyTorch's `softmax` kernel pays. On the CPU, loops; on CUDA, `kernels/softmax.cu`
//! (`cuda` feature only).
//!
//! [`mask_scores`]: t0801_self_attention::mask_scores
//! [`softmax_last_dim`]: t0801_self_attention::softmax_last_dim

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use shared::cpu::{for_each_row, max_of, sum_zip, Element, Real};
use shared::custom_op::contiguous_slice;
use t0802_multi_head_attention::{
    fold_query_groups, gemm_operand, AttentionKernel, AttnMask, NaiveAttention,
};

/// `softmax(scale · scores)` over the last dimension, keys after a row's query masked out when
/// `causal`. `scores (…, rows, n_k)`: row `r` of the second-to-last dimension is query
/// `r mod n_q`, the queries being the last `n_q` of the `n_k` positions (grouped-query attention
/// stacks the `g` heads of a group as `g·n_q` rows). Differentiable.
pub fn causal_softmax_fused(
    scores: &Tensor,
    scale: f64,
    n_q: usize,
    causal: bool,
) -> Result<Tensor> {
    let dims = scores.dims();
    if dims.len() < 2 {
        bail!("causal_softmax_fused: scores must be (…, rows, n_k), got {dims:?}");
    }
    let (rows, n_k) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    if n_k == 0 {
        bail!("causal_softmax_fused: rows of no score, {dims:?}");
    }
    if n_q == 0 || !rows.is_multiple_of(n_q) {
        bail!("causal_softmax_fused: {n_q} queries must divide the {rows} rows");
    }
    if causal && n_q > n_k {
        bail!("causal_softmax_fused: with the causal mask the {n_q} queries are the last of the keys, so at most {n_k}");
    }
    if !scale.is_finite() {
        bail!("causal_softmax_fused: the scale must be finite, got {scale}");
    }
    let op = CausalSoftmax {
        n_q,
        n_k,
        scale,
        causal,
    };
    scores.contiguous()?.apply_op1(op)
}

/// `softmax(scale · scores)` over keys `0 ..= last` of each row (the rest weigh 0), `last` being
/// a `(1,)` `u32` tensor on the device that the kernel reads (8-10's static cache: its write
/// position). Differentiable in `scores`.
pub fn softmax_fused_up_to(scores: &Tensor, scale: f64, last: &Tensor) -> Result<Tensor> {
    let dims = scores.dims();
    if dims.len() < 2 || dims[dims.len() - 1] == 0 {
        bail!("softmax_fused_up_to: scores must be (…, rows, n_k ≥ 1), got {dims:?}");
    }
    if last.dims() != [1] || last.dtype() != candle_core::DType::U32 {
        bail!(
            "softmax_fused_up_to: the last key is a (1,) u32 tensor, got {:?} {:?}",
            last.dims(),
            last.dtype()
        );
    }
    if !scale.is_finite() {
        bail!("softmax_fused_up_to: the scale must be finite, got {scale}");
    }
    let op = CausalSoftmax {
        n_q: 1,
        n_k: dims[dims.len() - 1],
        scale,
        causal: false,
    };
    scores.contiguous()?.apply_op2(&last.contiguous()?, op)
}

/// Naive attention with [`causal_softmax_fused`] in place of the composed scale, mask and
/// softmax; grouped K/V heads are served by folding each group into the query rows (8-02's
/// [`fold_query_groups`]). Keys up to a device index ([`AttnMask::KeysUpTo`], 8-10's static
/// cache) go to [`softmax_fused_up_to`]. Explicit masks and score biases (padding masks, relative
/// positions) have no fused form here: those calls run [`NaiveAttention`], same values.
#[derive(Debug, Clone, Copy, Default)]
pub struct FusedSoftmaxAttention;

impl AttentionKernel for FusedSoftmaxAttention {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: AttnMask<'_>,
        score_bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let up_to = match (mask, score_bias) {
            (AttnMask::KeysUpTo(last), None) => Some(last),
            _ => None,
        };
        let causal = match up_to {
            Some(_) => false,
            None => {
                // key padding: an explicit mask, or none
                let lowered = mask.lowered(q.dim(2)?, k.dim(2)?)?;
                match (lowered.get(), score_bias) {
                    (AttnMask::None, None) => false,
                    (AttnMask::Causal, None) => true,
                    (mask, bias) => return NaiveAttention.attend(q, k, v, mask, bias),
                }
            }
        };
        let (b, n_heads, n_q, d) = q.dims4()?;
        let scale = 1.0 / (d as f64).sqrt();
        let (q, _) = fold_query_groups(q, k.dim(1)?)?; // (b, n_kv, g·n_q, d)
        let (k, v) = (gemm_operand(k)?, gemm_operand(v)?);
        let scores = q.matmul(&k.t()?)?; // (b, n_kv, g·n_q, n_k)
        let weights = match up_to {
            Some(last) => softmax_fused_up_to(&scores, scale, last)?,
            None => causal_softmax_fused(&scores, scale, n_q, causal)?,
        };
        weights
            .matmul(&v)? // (b, n_kv, g·n_q, d)
            .reshape((b, n_heads, n_q, d))
    }
}

#[derive(Debug, Clone, Copy)]
struct CausalSoftmax {
    n_q: usize,
    n_k: usize,
    scale: f64,
    causal: bool,
}

impl CausalSoftmax {
    /// The last key row `r` may attend to.
    fn last_key(&self, r: usize) -> usize {
        if self.causal {
            r % self.n_q + self.n_k - self.n_q
        } else {
            self.n_k - 1
        }
    }

    /// The rows over the cores, in the loop's arithmetic `A` (f32 for f32, bf16 and f16, as the
    /// kernel computes; f64 for f64), no row seeing past key `limit`. The keys a row may not see
    /// are written as zeros unread.
    fn cpu_forward<T: Element, A: Real>(&self, x: &[T], limit: usize) -> Vec<T> {
        let mut y = shared::cpu::zeros::<T>(x.len());
        let (n_k, scale) = (self.n_k, A::from_f64(self.scale));
        for_each_row(&mut y, n_k, |r, out| {
            let seen = &x[r * n_k..r * n_k + self.last_key(r).min(limit) + 1];
            let max = max_of::<T, A>(seen) * scale;
            let out = &mut out[..seen.len()];
            let mut sum = A::zero();
            for (o, &v) in out.iter_mut().zip(seen) {
                let e = (A::of(v) * scale - max).exp();
                sum += e;
                *o = e.to();
            }
            let inv = A::one() / sum;
            for o in out.iter_mut() {
                *o = (A::of(*o) * inv).to();
            }
        });
        y
    }

    /// [`Self::cpu_forward`] of a storage, in its dtype.
    fn cpu_forward_storage(
        &self,
        s: &CpuStorage,
        l: &Layout,
        limit: usize,
    ) -> Result<(CpuStorage, Shape)> {
        macro_rules! run {
            ($t:ty, $a:ty) => {
                <$t as candle_core::WithDType>::to_cpu_storage_owned(self.cpu_forward::<$t, $a>(
                    contiguous_slice(s.as_slice::<$t>()?, l, "softmax: scores")?,
                    limit,
                ))
            };
        }
        let y = shared::for_float_dtype!(s.dtype(), "fused softmax", run);
        Ok((y, l.shape().clone()))
    }

    /// `dx = s · y ⊙ (g − Σ_k g_k y_k)` per row, over the cores.
    fn cpu_backward<T: Element, A: Real>(&self, y: &[T], g: &[T]) -> Vec<T> {
        let mut dx = shared::cpu::zeros::<T>(y.len());
        let (n_k, scale) = (self.n_k, A::from_f64(self.scale));
        for_each_row(&mut dx, n_k, |r, out| {
            let seen = self.last_key(r) + 1;
            let (yr, gr) = (&y[r * n_k..r * n_k + seen], &g[r * n_k..r * n_k + seen]);
            let dot: A = sum_zip(yr, gr, |a, b| A::of(a) * A::of(b));
            for ((o, &a), &b) in out.iter_mut().zip(yr).zip(gr) {
                *o = (scale * A::of(a) * (A::of(b) - dot)).to();
            }
        });
        dx
    }
}

/// `(y, g) → dx`, the backward of [`CausalSoftmax`] (which saves its output `y`).
#[derive(Debug, Clone, Copy)]
struct CausalSoftmaxBackward(CausalSoftmax);

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward_storage(s, l, usize::MAX)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::forward(self, s, l, None)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(
            &g.contiguous()?,
            &CausalSoftmaxBackward(*self),
        )?))
    }
}

/// The same softmax over keys `0 ..= last` only, `last` the op's second input (a `(1,)` `u32`
/// device tensor the kernel reads; [`softmax_fused_up_to`]).
impl CustomOp2 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "softmax-up-to"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        s_last: &CpuStorage,
        l_last: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let last = contiguous_slice(s_last.as_slice::<u32>()?, l_last, "softmax: last key")?[0];
        self.cpu_forward_storage(s, l, last as usize)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        s_last: &candle_core::CudaStorage,
        l_last: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            cuda::forward(self, s, l, Some((s_last, l_last)))?,
            l.shape().clone(),
        ))
    }

    /// The keys past `last` have `y = 0`, so the backward of the unlimited softmax gives them a
    /// zero gradient without knowing `last`.
    fn bwd(
        &self,
        _x: &Tensor,
        _last: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = y.apply_op2_no_bwd(&g.contiguous()?, &CausalSoftmaxBackward(*self))?;
        Ok((Some(dx), None))
    }
}

impl CustomOp2 for CausalSoftmaxBackward {
    fn name(&self) -> &'static str {
        "causal-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        macro_rules! run {
            ($t:ty, $a:ty) => {
                <$t as candle_core::WithDType>::to_cpu_storage_owned(self.0.cpu_backward::<$t, $a>(
                    contiguous_slice(s1.as_slice::<$t>()?, l1, "causal softmax: output")?,
                    contiguous_slice(s2.as_slice::<$t>()?, l2, "causal softmax: gradient")?,
                ))
            };
        }
        let dx = shared::for_float_dtype!(s1.dtype(), "causal softmax backward", run);
        Ok((dx, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::backward(&self.0, s1, l1, s2, l2)?, l1.shape().clone()))
    }
}

/// Launching `kernels/softmax.cu`: one warp per row, 8 rows per block.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType};
    use shared::cuda::{contiguous_views, load_kernel};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx"));
    const MODULE: &str = "t0806_softmax";
    const ROWS_PER_BLOCK: usize = 8;

    /// The forward kernel; `last`: the `(1,)` `u32` key index no row sees past (else none).
    pub fn forward(
        op: &CausalSoftmax,
        s: &CudaStorage,
        l: &Layout,
        last: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage> {
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                launch::<$t>(op, "causal_softmax_fwd", &[(s, l, "scores")], Some(last))
            };
        }
        shared::for_float_dtype!(s.dtype(), "causal softmax (cuda)", run, no_f64)
    }

    pub fn backward(
        op: &CausalSoftmax,
        sy: &CudaStorage,
        ly: &Layout,
        sg: &CudaStorage,
        lg: &Layout,
    ) -> Result<CudaStorage> {
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                launch::<$t>(
                    op,
                    "causal_softmax_bwd",
                    &[(sy, ly, "output"), (sg, lg, "gradient")],
                    None,
                )
            };
        }
        shared::for_float_dtype!(sy.dtype(), "causal softmax backward (cuda)", run, no_f64)
    }

    /// `<kernel>_<dtype>(inputs…, out, rows, n_q, n_k, scale, causal[, last])` over the rows of
    /// the first input, into a new buffer of its size. `last`: `Some` for the forward kernel,
    /// whose last argument points at the key index no row sees past (null for none).
    fn launch<T: CudaDType + DeviceRepr>(
        op: &CausalSoftmax,
        kernel: &str,
        inputs: &[(&CudaStorage, &Layout, &str)],
        last: Option<Option<(&CudaStorage, &Layout)>>,
    ) -> Result<CudaStorage> {
        let (first, first_l, _) = inputs[0];
        let dev = first.device().clone();
        let views = contiguous_views::<T>(inputs, "causal softmax (cuda)")?;
        let last_view = match last.flatten() {
            Some((s, l)) => {
                Some(shared::cuda::contiguous_view::<u32>(s, l, "softmax: last key")?.0)
            }
            None => None,
        };
        let null = 0u64; // a null `const uint32_t *`
        let n = first_l.shape().elem_count();
        // SAFETY: the kernel writes every element of every row.
        let mut out = unsafe { dev.alloc::<T>(n)? };
        let rows = n / op.n_k;
        if rows > 0 {
            use DType::*;
            let suffix = shared::cuda::dtype_suffix(first.dtype(), &[F32, BF16, F16], "softmax")?;
            let func = load_kernel(&dev, MODULE, PTX, &format!("{kernel}_{suffix}"), 0)?;
            let (rows_i, n_q, n_k) = (rows as i64, op.n_q as i64, op.n_k as i64);
            let (scale, causal) = (op.scale as f32, op.causal as i32);
            let stream = dev.cuda_stream();
            let mut builder = stream.launch_builder(&func);
            for view in &views {
                builder.arg(view);
            }
            builder
                .arg(&mut out)
                .arg(&rows_i)
                .arg(&n_q)
                .arg(&n_k)
                .arg(&scale)
                .arg(&causal);
            match (&last, &last_view) {
                (Some(_), Some(view)) => {
                    builder.arg(view);
                }
                (Some(_), None) => {
                    builder.arg(&null);
                }
                (None, _) => {}
            }
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
                block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: argument types and order match the kernel; every buffer holds rows · n_k
            // elements.
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

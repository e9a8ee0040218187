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

/// Naive attention with [`causal_softmax_fused`] in place of the composed scale, mask and
/// softmax; grouped K/V heads are served by folding each group into the query rows (8-02's
/// [`fold_query_groups`]). A bias over the keys alone, `(…, 1, 1, n_k)` (8-10's static cache
/// hiding its empty slots), is added to the scores before the fused softmax, divided by the
/// scale that the softmax multiplies back. Other masks and biases (explicit padding masks,
/// relative positions) have no fused form here: those calls run [`NaiveAttention`], same values.
#[derive(Debug, Clone, Copy, Default)]
pub struct FusedSoftmaxAttention;

/// Whether `bias` is `(batch or 1, 1, 1, n_k)`: one value per key, the same for every head and
/// query (so it broadcasts over the folded query groups too).
fn is_key_bias(bias: &Tensor) -> bool {
    matches!(bias.dims(), [_, 1, 1, _])
}

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
        let lowered = mask.lowered(q.dim(2)?)?; // key padding: an explicit mask, or none
        let mask = lowered.get();
        let (causal, key_bias) = match (mask, score_bias) {
            (AttnMask::None, None) => (false, None),
            (AttnMask::Causal, None) => (true, None),
            (AttnMask::None, Some(bias)) if is_key_bias(bias) => (false, Some(bias)),
            _ => return NaiveAttention.attend(q, k, v, mask, score_bias),
        };
        let (b, n_heads, n_q, d) = q.dims4()?;
        let scale = 1.0 / (d as f64).sqrt();
        let (q, _) = fold_query_groups(q, k.dim(1)?)?; // (b, n_kv, g·n_q, d)
        let (k, v) = (gemm_operand(k)?, gemm_operand(v)?);
        let scores = q.matmul(&k.t()?)?; // (b, n_kv, g·n_q, n_k)
        let scores = match key_bias {
            // softmax(scale·(s + bias/scale)) = softmax(scale·s + bias)
            Some(bias) => scores.broadcast_add(&(bias.to_dtype(scores.dtype())? / scale)?)?,
            None => scores,
        };
        let weights = causal_softmax_fused(&scores, scale, n_q, causal)?;
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
    /// kernel computes; f64 for f64). The keys a row may not see are written as zeros unread.
    fn cpu_forward<T: Element, A: Real>(&self, x: &[T]) -> Vec<T> {
        let mut y = shared::cpu::zeros::<T>(x.len());
        let (n_k, scale) = (self.n_k, A::from_f64(self.scale));
        for_each_row(&mut y, n_k, |r, out| {
            let seen = &x[r * n_k..r * n_k + self.last_key(r) + 1];
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
        macro_rules! run {
            ($t:ty, $a:ty) => {
                <$t as candle_core::WithDType>::to_cpu_storage_owned(self.cpu_forward::<$t, $a>(
                    contiguous_slice(s.as_slice::<$t>()?, l, "causal softmax: scores")?,
                ))
            };
        }
        let y = shared::for_float_dtype!(s.dtype(), "causal softmax", run);
        Ok((y, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::forward(self, s, l)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(
            &g.contiguous()?,
            &CausalSoftmaxBackward(*self),
        )?))
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

    pub fn forward(op: &CausalSoftmax, s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                launch::<$t>(op, "causal_softmax_fwd", &[(s, l, "scores")])
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
                )
            };
        }
        shared::for_float_dtype!(sy.dtype(), "causal softmax backward (cuda)", run, no_f64)
    }

    /// `<kernel>_<dtype>(inputs…, out, rows, n_q, n_k, scale, causal)` over the rows of the first
    /// input, into a new buffer of its size.
    fn launch<T: CudaDType + DeviceRepr>(
        op: &CausalSoftmax,
        kernel: &str,
        inputs: &[(&CudaStorage, &Layout, &str)],
    ) -> Result<CudaStorage> {
        let (first, first_l, _) = inputs[0];
        let dev = first.device().clone();
        let views = contiguous_views::<T>(inputs, "causal softmax (cuda)")?;
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

//! # Cross-entropy as one op: the loss over a vocabulary without a `(rows, vocab)` intermediate
//!
//! For logits `x (rows, vocab)` and targets `t (rows,)`:
//!
//! ```text
//! forward   nll_i   = lse_i − x[i, t_i],          lse_i = m_i + ln Σ_j exp(x[i, j] − m_i),  m_i = max_j x[i, j]
//! backward  ∂/∂x[i, j] = (softmax(x_i)_j − [j = t_i]) · g_i = (exp(x[i, j] − lse_i) − [j = t_i]) · g_i
//! ```
//!
//! Composed from tensor ops (`shared::train::cross_entropy_composed`, kept as the reference),
//! this is a cast of the logits to f32, a max, a subtraction, an exponential, a sum, a log and a
//! gather, each a full pass over `rows × vocab` values, and as many again backward: at the
//! CS336 shape (16,384 rows × 10,000) each pass moves 655 MB. [`cross_entropy_rows`] does the
//! forward in one pass (an online max/sum, as in FlashAttention's softmax) and the backward in
//! one more; the backward recovers `lse_i = nll_i + x[i, t_i]` from the forward's output
//! instead of reducing the row again. On the CPU it is a loop over rows; on CUDA it launches
//! `kernels/cross_entropy.cu`. Every sum is in f32 (f64 for f64 logits).

use crate::cpu::{for_each_row, for_each_row_costing, max_of, sum_by, Element, Real};
use crate::custom_op::contiguous_slice;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

/// Per-row negative log-likelihood `nll (rows,)` (f32; f64 for f64 logits) of `targets (rows,)`
/// under `logits (rows, vocab)`. Differentiable in the logits. A target outside the vocabulary is
/// an error on the CPU and a NaN loss on the GPU (checking there would cost a synchronisation).
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if targets.dims() != [rows] {
        bail!(
            "cross_entropy: targets {:?} must be (rows,) = ({rows},) for logits {:?}",
            targets.dims(),
            logits.dims()
        );
    }
    if vocab == 0 {
        bail!("cross_entropy: the vocabulary is empty");
    }
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    logits
        .contiguous()?
        .apply_op2(&targets, CrossEntropy { vocab })
}

/// `(logits (rows, vocab), targets (rows,) u32) → nll (rows,)`; `bwd` applies
/// [`CrossEntropyBackward`].
#[derive(Debug, Clone, Copy)]
struct CrossEntropy {
    vocab: usize,
}

/// `(logits, targets, [nll | g]) → dlogits (rows, vocab)` in the logits' dtype. No backward.
#[derive(Debug, Clone, Copy)]
struct CrossEntropyBackward {
    vocab: usize,
}

fn cpu_targets(s: &CpuStorage, l: &Layout, vocab: usize) -> Result<Vec<usize>> {
    contiguous_slice(s.as_slice::<u32>()?, l, "cross_entropy: targets")?
        .iter()
        .map(|&t| {
            if (t as usize) < vocab {
                Ok(t as usize)
            } else {
                bail!("cross_entropy: target {t} is outside the vocabulary of {vocab}")
            }
        })
        .collect()
}

/// `nll_r = log Σⱼ e^{x_rj} − x_r,target`, row by row (max-shifted), in the loop's arithmetic `A`
/// (f32, or f64 for f64 logits).
fn cpu_forward<T: Element, A: Real>(x: &[T], t: &[usize], vocab: usize) -> Vec<A> {
    let mut nll = vec![A::zero(); t.len()];
    for_each_row_costing(&mut nll, 1, vocab, |r, out| {
        let row = &x[r * vocab..(r + 1) * vocab];
        let m: A = max_of(row);
        let s = sum_by(row, |v| (A::of(v) - m).exp());
        out[0] = m + s.ln() - A::of(row[t[r]]);
    });
    nll
}

/// `dx_rj = (softmax(x_r)_j − [j = target_r])·g_r`, with `log Σ e^x` recovered from the forward's
/// `nll` (no second reduction).
fn cpu_backward<T: Element, A: Real>(
    x: &[T],
    t: &[usize],
    nll: &[A],
    g: &[A],
    vocab: usize,
) -> Vec<T> {
    let mut dx = crate::cpu::zeros::<T>(x.len());
    for_each_row(&mut dx, vocab, |r, out| {
        let row = &x[r * vocab..(r + 1) * vocab];
        let (target, gr) = (t[r], g[r]);
        let lse = nll[r] + A::of(row[target]);
        for (o, &v) in out.iter_mut().zip(row) {
            *o = ((A::of(v) - lse).exp() * gr).to();
        }
        let p_target = (A::of(row[target]) - lse).exp();
        out[target] = ((p_target - A::one()) * gr).to();
    });
    dx
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let t = cpu_targets(s2, l2, self.vocab)?;
        macro_rules! run {
            ($t:ty, $a:ty) => {
                <$a>::to_cpu_storage_owned(cpu_forward::<$t, $a>(
                    contiguous_slice(s1.as_slice::<$t>()?, l1, "cross_entropy: logits")?,
                    &t,
                    self.vocab,
                ))
            };
        }
        let nll = crate::for_float_dtype!(s1.dtype(), "cross_entropy", run);
        Ok((nll, Shape::from(t.len())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let rows = l2.shape().elem_count();
        Ok((
            cuda::forward(s1, l1, s2, l2, rows, self.vocab)?,
            Shape::from(rows),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        nll: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // A custom op takes at most three inputs: nll and its incoming gradient travel as one.
        let packed = Tensor::cat(&[nll, &grad.to_dtype(nll.dtype())?], 0)?;
        let back = CrossEntropyBackward { vocab: self.vocab };
        Ok((
            Some(logits.apply_op3_no_bwd(targets, &packed, &back)?),
            None,
        ))
    }
}

impl candle_core::CustomOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let t = cpu_targets(s2, l2, self.vocab)?;
        let rows = t.len();
        macro_rules! run {
            ($t:ty, $a:ty) => {{
                let packed =
                    contiguous_slice(s3.as_slice::<$a>()?, l3, "cross_entropy: nll and gradient")?;
                <$t>::to_cpu_storage_owned(cpu_backward::<$t, $a>(
                    contiguous_slice(s1.as_slice::<$t>()?, l1, "cross_entropy: logits")?,
                    &t,
                    &packed[..rows],
                    &packed[rows..],
                    self.vocab,
                ))
            }};
        }
        let dx = crate::for_float_dtype!(s1.dtype(), "cross_entropy backward", run);
        Ok((dx, Shape::from((rows, self.vocab))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let rows = l2.shape().elem_count();
        Ok((
            cuda::backward(s1, l1, s2, l2, s3, l3, rows, self.vocab)?,
            Shape::from((rows, self.vocab)),
        ))
    }
}

/// Launching `kernels/cross_entropy.cu`.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{contiguous_view, load_kernel};
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::CudaStorage;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx"));
    const MODULE: &str = "shared_cross_entropy";
    const THREADS: u32 = 256;

    fn config(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.clamp(1, 65_535) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn suffix(dtype: DType) -> Result<&'static str> {
        use DType::*;
        crate::cuda::dtype_suffix(dtype, &[F32, BF16, F16], "cross_entropy")
    }

    pub fn forward(
        sx: &CudaStorage,
        lx: &Layout,
        st: &CudaStorage,
        lt: &Layout,
        rows: usize,
        vocab: usize,
    ) -> Result<CudaStorage> {
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                fwd::<$t>(sx, lx, st, lt, rows, vocab)
            };
        }
        crate::for_float_dtype!(sx.dtype(), "cross_entropy (cuda): logits", run, no_f64)
    }

    fn fwd<T: CudaDType + DeviceRepr>(
        sx: &CudaStorage,
        lx: &Layout,
        st: &CudaStorage,
        lt: &Layout,
        rows: usize,
        vocab: usize,
    ) -> Result<CudaStorage> {
        let dev = sx.device().clone();
        let (x, _) = contiguous_view::<T>(sx, lx, "cross_entropy (cuda): logits")?;
        let (t, _) = contiguous_view::<u32>(st, lt, "cross_entropy (cuda): targets")?;
        // SAFETY: the kernel writes one value per row.
        let mut nll = unsafe { dev.alloc::<f32>(rows)? };
        if rows > 0 {
            let name = format!("cross_entropy_fwd_{}", suffix(sx.dtype())?);
            let func = load_kernel(&dev, MODULE, PTX, &name, 0)?;
            let (rows_i, vocab_i) = (rows as i64, vocab as i64);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&x).arg(&t).arg(&mut nll).arg(&rows_i).arg(&vocab_i);
            // SAFETY: argument types match the kernel; nll holds `rows` floats.
            unsafe { b.launch(config(rows)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(nll, dev))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        sx: &CudaStorage,
        lx: &Layout,
        st: &CudaStorage,
        lt: &Layout,
        sp: &CudaStorage,
        lp: &Layout,
        rows: usize,
        vocab: usize,
    ) -> Result<CudaStorage> {
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                bwd::<$t>(sx, lx, st, lt, sp, lp, rows, vocab)
            };
        }
        crate::for_float_dtype!(sx.dtype(), "cross_entropy (cuda): logits", run, no_f64)
    }

    #[allow(clippy::too_many_arguments)]
    fn bwd<T: CudaDType + DeviceRepr>(
        sx: &CudaStorage,
        lx: &Layout,
        st: &CudaStorage,
        lt: &Layout,
        sp: &CudaStorage,
        lp: &Layout,
        rows: usize,
        vocab: usize,
    ) -> Result<CudaStorage> {
        let dev = sx.device().clone();
        let (x, _) = contiguous_view::<T>(sx, lx, "cross_entropy (cuda): logits")?;
        let (t, _) = contiguous_view::<u32>(st, lt, "cross_entropy (cuda): targets")?;
        let (packed, _) = contiguous_view::<f32>(sp, lp, "cross_entropy (cuda): nll")?;
        let nll = packed.slice(..rows);
        let g = packed.slice(rows..);
        // SAFETY: the kernel writes every element of every row.
        let mut dx = unsafe { dev.alloc::<T>(rows * vocab)? };
        if rows > 0 {
            let name = format!("cross_entropy_bwd_{}", suffix(sx.dtype())?);
            let func = load_kernel(&dev, MODULE, PTX, &name, 0)?;
            let (rows_i, vocab_i) = (rows as i64, vocab as i64);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&x)
                .arg(&t)
                .arg(&nll)
                .arg(&g)
                .arg(&mut dx)
                .arg(&rows_i)
                .arg(&vocab_i);
            // SAFETY: argument types match the kernel; dx holds rows·vocab elements.
            unsafe { b.launch(config(rows)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(dx, dev))
    }
}

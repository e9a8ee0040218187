//! The Candle custom ops: [`FlashAttention`] (forward) and [`FlashAttentionBackward`].
//!
//! ## Where the log-sum-exp lives between forward and backward
//! The FlashAttention-2 backward needs the row log-sum-exp `L` of the forward to recompute
//! `P = exp(S − L)` tile by tile. Candle's `CustomOp3::bwd` receives only the three inputs, the
//! output and the output's gradient, and a custom op has a single output. Our choice:
//!
//! **the forward op *saves* `L` in itself**, the way PyTorch's `ctx.save_for_backward` does. Each
//! call of [`crate::flash_attention`] builds a fresh `FlashAttention`; its `cpu_fwd`/`cuda_fwd`
//! compute `O` and `L` in the same pass and store `L (batch, heads, n_q)` (f32) in a slot of the
//! op. Candle keeps the op (in an `Arc`) in the graph node of `O`, so `bwd` finds `L` there, on
//! the right device, and nothing is recomputed. The cost is `4·n_q` bytes per head kept alive
//! as long as the graph: linear in the sequence, like `O` itself. When no input needs a
//! gradient, Candle drops the op at once and `L` with it. Should the slot ever be empty, `bwd`
//! recomputes `L` by running the forward again (correct, one extra forward).
//!
//! Alternatives rejected: packing `L` into extra columns of `O` (breaks the `(…, d)` layout and
//! the 16-byte alignment of rows, and `L` would be rounded to bf16); recomputing `L` in every
//! backward (a second `Q·Kᵀ` sweep, about 1/7 of the training cost of attention).
//!
//! ## One output for three gradients
//! [`FlashAttentionBackward`] is itself a `CustomOp3` on `(q, k, v)` that carries `O`, `dO` and
//! `L` in its struct and returns **one flat tensor** `[dQ | dK | dV]` in the inputs' dtype; the
//! three gradients are views into it (`narrow` + `reshape`, no copy). It has no backward itself
//! (no second derivatives).

use crate::cpu::{self, Acc, Dims};
use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{
    bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use half::{bf16, f16};
use shared::kernels::FlashKernels;
use std::sync::{Arc, Mutex};

/// Where a forward op leaves its log-sum-exp `L (batch, heads, n_q)`.
pub type LseSlot = Arc<Mutex<Option<Tensor>>>;

/// FlashAttention forward as a Candle custom op on `(q, k, v)`, each `(batch, heads, seq, d)`
/// and contiguous; output `(batch, heads, n_q, d_v)`. Use it through [`crate::flash_attention`],
/// which checks the inputs and makes them contiguous.
#[derive(Debug, Clone)]
pub struct FlashAttention {
    pub softmax_scale: f64,
    pub causal: bool,
    /// Which CUDA kernels run ([`crate::cuda_kernel_family`]).
    pub kernels: FlashKernels,
    /// Key padding: `key_lengths[b]` real keys in sequence `b` (all `n_k` when `None`).
    pub key_lengths: Option<Arc<[usize]>>,
    lse: LseSlot,
}

impl FlashAttention {
    pub fn new(softmax_scale: f64, causal: bool, kernels: FlashKernels) -> Self {
        Self {
            softmax_scale,
            causal,
            kernels,
            key_lengths: None,
            lse: Arc::new(Mutex::new(None)),
        }
    }

    /// The same op with key padding: `lengths[b]` real keys in sequence `b`.
    pub fn with_key_lengths(self, lengths: Option<Arc<[usize]>>) -> Self {
        Self {
            key_lengths: lengths,
            ..self
        }
    }

    /// The slot where the forward stores `L`; read it after `apply_op3`.
    pub fn lse_slot(&self) -> LseSlot {
        self.lse.clone()
    }

    /// Keeps `L (batch, heads, n_q)` for the backward (and for [`crate::flash_attention_with_lse`]).
    fn save_lse(&self, storage: Storage, b: usize, h: usize, n_q: usize) {
        let t = Tensor::from_storage(storage, (b, h, n_q), BackpropOp::none(), false);
        *self.lse.lock().expect("lse slot") = Some(t);
    }
}

/// The `(batch, heads, n_q, d, n_k, d_v)` of three contiguous 4-D layouts, checked.
pub(crate) fn problem_dims(l1: &Layout, l2: &Layout, l3: &Layout) -> Result<(usize, usize, Dims)> {
    let (b, h, n_q, d) = l1.shape().dims4()?;
    let (b2, h2, n_k, d2) = l2.shape().dims4()?;
    let (b3, h3, n_k3, d_v) = l3.shape().dims4()?;
    if (b, h, d) != (b2, h2, d2) || (b, h, n_k) != (b3, h3, n_k3) {
        bail!(
            "flash attention op: q {:?}, k {:?}, v {:?} do not fit together",
            l1.dims(),
            l2.dims(),
            l3.dims()
        );
    }
    for (name, l) in [("q", l1), ("k", l2), ("v", l3)] {
        if !l.is_contiguous() {
            bail!("flash attention op: {name} must be contiguous (layout {l:?})");
        }
    }
    Ok((
        b,
        h,
        Dims {
            bh: b * h,
            n_q,
            n_k,
            d,
            d_v,
        },
    ))
}

/// Per-`(batch, head)` key lengths from per-batch ones: head `h` of sequence `b` has
/// `lengths[b]` real keys.
pub(crate) fn per_head(
    lengths: Option<&[usize]>,
    b: usize,
    h: usize,
    n_k: usize,
) -> Result<Option<Vec<usize>>> {
    let Some(lengths) = lengths else {
        return Ok(None);
    };
    if lengths.len() != b {
        bail!(
            "flash attention op: {} key lengths for a batch of {b}",
            lengths.len()
        );
    }
    if let Some(n) = lengths.iter().find(|&&n| n == 0 || n > n_k) {
        bail!("flash attention op: a key length of {n} is not in 1..={n_k}");
    }
    Ok(Some(
        lengths
            .iter()
            .flat_map(|&n| std::iter::repeat_n(n, h))
            .collect(),
    ))
}

/// The contiguous elements of `layout` in `data`.
fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!(
            "flash attention op: non-contiguous input {:?}",
            layout.dims()
        ),
    }
}

fn widen<T: WithDType, A: Acc>(x: &[T]) -> Vec<A> {
    x.iter().map(|v| A::from_f64(v.to_f64())).collect()
}

fn narrow_to<T: WithDType, A: Acc>(x: &[A]) -> Vec<T> {
    x.iter().map(|v| T::from_f64(v.to_f64())).collect()
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
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
        let (b, h, dims) = problem_dims(l1, l2, l3)?;
        let lengths = per_head(self.key_lengths.as_deref(), b, h, dims.n_k)?;
        let lengths = lengths.as_deref();
        // f32/f64 run in place; f16/bf16 are widened to f32 and the output narrowed back.
        macro_rules! run {
            ($t:ty) => {{
                let q = contiguous(s1.as_slice::<$t>()?, l1)?;
                let k = contiguous(s2.as_slice::<$t>()?, l2)?;
                let v = contiguous(s3.as_slice::<$t>()?, l3)?;
                let (o, lse) = cpu::forward::<$t>(
                    q,
                    k,
                    v,
                    dims,
                    self.softmax_scale as $t,
                    self.causal,
                    lengths,
                );
                (
                    <$t>::to_cpu_storage_owned(o),
                    <$t>::to_cpu_storage_owned(lse),
                )
            }};
            ($t:ty, $a:ty) => {{
                let q = widen::<$t, $a>(contiguous(s1.as_slice::<$t>()?, l1)?);
                let k = widen::<$t, $a>(contiguous(s2.as_slice::<$t>()?, l2)?);
                let v = widen::<$t, $a>(contiguous(s3.as_slice::<$t>()?, l3)?);
                let (o, lse) = cpu::forward::<$a>(
                    &q,
                    &k,
                    &v,
                    dims,
                    self.softmax_scale as $a,
                    self.causal,
                    lengths,
                );
                (
                    <$t>::to_cpu_storage_owned(narrow_to::<$t, $a>(&o)),
                    <$a>::to_cpu_storage_owned(lse),
                )
            }};
        }
        let (o, lse) = match s1.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            DType::BF16 => run!(bf16, f32),
            DType::F16 => run!(f16, f32),
            dt => bail!("flash attention: dtype {dt:?} not supported on the CPU"),
        };
        self.save_lse(Storage::Cpu(lse), b, h, dims.n_q);
        Ok((o, Shape::from((b, h, dims.n_q, dims.d_v))))
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
        let (b, h, dims) = problem_dims(l1, l2, l3)?;
        let lengths = per_head(self.key_lengths.as_deref(), b, h, dims.n_k)?;
        let (o, lse) = crate::cuda::forward(
            [(s1, l1), (s2, l2), (s3, l3)],
            dims,
            self.softmax_scale as f32,
            (self.causal, lengths.as_deref()),
            self.kernels,
        )?;
        self.save_lse(Storage::Cuda(lse), b, h, dims.n_q);
        Ok((o, Shape::from((b, h, dims.n_q, dims.d_v))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.lse.lock().expect("lse slot").clone();
        let lse = match saved {
            Some(lse) => lse,
            None => {
                // Not expected (the forward always saves L); recompute it with a second forward.
                let op = FlashAttention::new(self.softmax_scale, self.causal, self.kernels)
                    .with_key_lengths(self.key_lengths.clone());
                let slot = op.lse_slot();
                q.apply_op3_no_bwd(k, v, &op)?;
                let lse = slot.lock().expect("lse slot").clone();
                match lse {
                    Some(lse) => lse,
                    None => bail!("flash attention backward: could not recompute the log-sum-exp"),
                }
            }
        };
        let (dq, dk, dv) = backward_with_kernels(
            [q, k, v, res, grad_res, &lse],
            self.softmax_scale,
            self.causal,
            self.kernels,
            self.key_lengths.clone(),
        )?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// FlashAttention-2 backward: `(dQ, dK, dV)` from the inputs, the output `o`, its gradient `d_o`
/// and the saved log-sum-exp `lse (batch, heads, n_q)`. Shapes as in [`crate::flash_attention`];
/// each gradient has the shape and dtype of its input.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_o: &Tensor,
    lse: &Tensor,
    softmax_scale: f64,
    causal: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let inputs = [q, k, v, o, d_o, lse];
    backward_with_kernels(inputs, softmax_scale, causal, FlashKernels::Auto, None)
}

/// [`flash_attention_backward`] of `[q, k, v, o, d_o, lse]` with the CUDA kernels chosen by
/// `kernels` (to measure one family against another).
pub fn flash_attention_backward_with(
    inputs: [&Tensor; 6],
    softmax_scale: f64,
    causal: bool,
    kernels: FlashKernels,
) -> Result<(Tensor, Tensor, Tensor)> {
    backward_with_kernels(inputs, softmax_scale, causal, kernels, None)
}

/// [`flash_attention_backward`] of `[q, k, v, o, d_o, lse]` with the CUDA kernels chosen by
/// `kernels` and the forward's key padding.
fn backward_with_kernels(
    [q, k, v, o, d_o, lse]: [&Tensor; 6],
    softmax_scale: f64,
    causal: bool,
    kernels: FlashKernels,
    key_lengths: Option<Arc<[usize]>>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, h, n_q, d) = q.dims4()?;
    let (n_k, d_v) = (k.dim(2)?, v.dim(3)?);
    let want_o = [b, h, n_q, d_v];
    if o.dims() != want_o || d_o.dims() != want_o {
        bail!(
            "flash attention backward: o {:?} and d_o {:?} must be {want_o:?}",
            o.dims(),
            d_o.dims()
        );
    }
    if lse.dims() != [b, h, n_q] {
        bail!(
            "flash attention backward: lse {:?} must be [{b}, {h}, {n_q}]",
            lse.dims()
        );
    }
    let dt = q.dtype();
    let lse_dt = if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    if o.dtype() != dt || d_o.dtype() != dt || lse.dtype() != lse_dt {
        bail!("flash attention backward: dtypes q {dt:?}, o {:?}, d_o {:?}, lse {:?} (lse must be {lse_dt:?})", o.dtype(), d_o.dtype(), lse.dtype());
    }
    let op = FlashAttentionBackward {
        softmax_scale,
        causal,
        kernels,
        key_lengths,
        o: o.contiguous()?,
        d_o: d_o.contiguous()?,
        lse: lse.contiguous()?,
    };
    let packed = q
        .contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?; // [dQ | dK | dV]
    let (n1, n2, n3) = (b * h * n_q * d, b * h * n_k * d, b * h * n_k * d_v);
    let dq = packed.narrow(0, 0, n1)?.reshape((b, h, n_q, d))?;
    let dk = packed.narrow(0, n1, n2)?.reshape((b, h, n_k, d))?;
    let dv = packed.narrow(0, n1 + n2, n3)?.reshape((b, h, n_k, d_v))?;
    Ok((dq, dk, dv))
}

/// The backward as a custom op on `(q, k, v)`; carries the forward's output `o`, the output
/// gradient `d_o` and the log-sum-exp `lse`. Output: flat `[dQ | dK | dV]`.
#[derive(Debug, Clone)]
pub struct FlashAttentionBackward {
    pub softmax_scale: f64,
    pub causal: bool,
    pub kernels: FlashKernels,
    /// The forward's key padding (see [`FlashAttention::key_lengths`]).
    pub key_lengths: Option<Arc<[usize]>>,
    pub o: Tensor,
    pub d_o: Tensor,
    pub lse: Tensor,
}

impl CustomOp3 for FlashAttentionBackward {
    fn name(&self) -> &'static str {
        "flash-attention-backward"
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
        let (b, h, dims) = problem_dims(l1, l2, l3)?;
        let lengths = per_head(self.key_lengths.as_deref(), b, h, dims.n_k)?;
        let lengths = lengths.as_deref();
        let (o_guard, o_layout) = self.o.storage_and_layout();
        let (do_guard, do_layout) = self.d_o.storage_and_layout();
        let (lse_guard, lse_layout) = self.lse.storage_and_layout();
        let (Storage::Cpu(o_s), Storage::Cpu(do_s), Storage::Cpu(lse_s)) =
            (&*o_guard, &*do_guard, &*lse_guard)
        else {
            bail!("flash attention backward: o, d_o and lse must be on the CPU with q, k, v");
        };
        macro_rules! run {
            ($t:ty) => {{
                let q = contiguous(s1.as_slice::<$t>()?, l1)?;
                let k = contiguous(s2.as_slice::<$t>()?, l2)?;
                let v = contiguous(s3.as_slice::<$t>()?, l3)?;
                let o = contiguous(o_s.as_slice::<$t>()?, o_layout)?;
                let d_o = contiguous(do_s.as_slice::<$t>()?, do_layout)?;
                let lse = contiguous(lse_s.as_slice::<$t>()?, lse_layout)?;
                let (dq, dk, dv) = cpu::backward::<$t>(
                    q,
                    k,
                    v,
                    o,
                    d_o,
                    lse,
                    dims,
                    self.softmax_scale as $t,
                    self.causal,
                    lengths,
                );
                <$t>::to_cpu_storage_owned([dq, dk, dv].concat())
            }};
            ($t:ty, $a:ty) => {{
                let q = widen::<$t, $a>(contiguous(s1.as_slice::<$t>()?, l1)?);
                let k = widen::<$t, $a>(contiguous(s2.as_slice::<$t>()?, l2)?);
                let v = widen::<$t, $a>(contiguous(s3.as_slice::<$t>()?, l3)?);
                let o = widen::<$t, $a>(contiguous(o_s.as_slice::<$t>()?, o_layout)?);
                let d_o = widen::<$t, $a>(contiguous(do_s.as_slice::<$t>()?, do_layout)?);
                let lse = contiguous(lse_s.as_slice::<$a>()?, lse_layout)?;
                let (dq, dk, dv) = cpu::backward::<$a>(
                    &q,
                    &k,
                    &v,
                    &o,
                    &d_o,
                    lse,
                    dims,
                    self.softmax_scale as $a,
                    self.causal,
                    lengths,
                );
                let mut packed: Vec<$t> = Vec::with_capacity(dq.len() + dk.len() + dv.len());
                for g in [&dq, &dk, &dv] {
                    packed.extend(narrow_to::<$t, $a>(g));
                }
                <$t>::to_cpu_storage_owned(packed)
            }};
        }
        let packed = match s1.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            DType::BF16 => run!(bf16, f32),
            DType::F16 => run!(f16, f32),
            dt => bail!("flash attention backward: dtype {dt:?} not supported on the CPU"),
        };
        let n = packed_len(dims);
        Ok((packed, Shape::from(n)))
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
        let (b, h, dims) = problem_dims(l1, l2, l3)?;
        let lengths = per_head(self.key_lengths.as_deref(), b, h, dims.n_k)?;
        let (o_guard, o_layout) = self.o.storage_and_layout();
        let (do_guard, do_layout) = self.d_o.storage_and_layout();
        let (lse_guard, lse_layout) = self.lse.storage_and_layout();
        let (Storage::Cuda(o_s), Storage::Cuda(do_s), Storage::Cuda(lse_s)) =
            (&*o_guard, &*do_guard, &*lse_guard)
        else {
            bail!("flash attention backward: o, d_o and lse must be on the GPU with q, k, v");
        };
        let packed = crate::cuda::backward(
            crate::cuda::BwdInputs {
                q: (s1, l1),
                k: (s2, l2),
                v: (s3, l3),
                o: (o_s, o_layout),
                d_o: (do_s, do_layout),
                lse: (lse_s, lse_layout),
            },
            dims,
            self.softmax_scale as f32,
            (self.causal, lengths.as_deref()),
            self.kernels,
        )?;
        Ok((packed, Shape::from(packed_len(dims))))
    }
}

/// Elements of the packed `[dQ | dK | dV]`.
pub(crate) fn packed_len(dims: Dims) -> usize {
    dims.bh * (dims.n_q * dims.d + dims.n_k * dims.d + dims.n_k * dims.d_v)
}

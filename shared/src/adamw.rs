//! # AdamW's update as in-place ops
//!
//! Written with tensor ops, one AdamW step is a dozen element-wise passes per parameter tensor
//! (scale m, scale g, add, square g, scale, add, divide twice, square root, add ε, divide,
//! scale θ, subtract), each allocating its result. Here the same arithmetic is three in-place
//! passes (Candle `InplaceOp`s: the moments, then the parameter), reading each tensor once and
//! writing it once:
//!
//! ```text
//! m ← β₁·m + (1 − β₁)·(s·g)            v ← β₂·v + (1 − β₂)·(s·g)²
//! θ ← θ·(1 − lr·λ) − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
//! ```
//!
//! where `s` is the gradient-clipping factor `min(1, max_norm/‖g‖)`, folded in here so the
//! gradients need not be rescaled first. On the CPU, loops; on CUDA, `kernels/adamw.cu`, where
//! [`update_all`] does all three for every parameter tensor of a model in one kernel (and
//! [`sum_of_squares_all`] the gradient norm's `Σ g²` in another): a model's dozens of small
//! tensors would otherwise cost a launch each, three times over.
//! Arithmetic in f32 (f64 for f64 parameters), each stored value rounded once.

use crate::cpu::{for_each_row, Element, Real};
use crate::custom_op::contiguous_range;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor, WithDType};
use half::{bf16, f16};

/// `m ← β·m + (1 − β)·(s·g)`, or with `(s·g)²` when `square`: a moment, updated in place.
///
/// `gate` is the step's [`step_gate`] (or [`host_gate`]): `[s, ok]` as two f64 on the moment's
/// device; with `ok = 0` the moment is left untouched.
pub fn update_moment(m: &Tensor, g: &Tensor, beta: f64, gate: &Tensor, square: bool) -> Result<()> {
    check(m, g, "moment")?;
    check_gate(gate, m)?;
    m.inplace_op2(
        &g.contiguous()?,
        &Moment {
            beta,
            square,
            gate: gate.clone(),
        },
    )
}

/// `θ ← θ·(1 − lr·λ) − lr·(m/c₁)/(√(v/c₂) + ε)` in place (`c₁, c₂` the bias corrections), unless
/// the `gate` says the step is skipped.
#[allow(clippy::too_many_arguments)]
pub fn update_parameter(
    theta: &Tensor,
    m: &Tensor,
    v: &Tensor,
    lr: f64,
    weight_decay: f64,
    eps: f64,
    bias_correction1: f64,
    bias_correction2: f64,
    gate: &Tensor,
) -> Result<()> {
    check(theta, m, "parameter")?;
    check(theta, v, "parameter")?;
    check_gate(gate, theta)?;
    let op = Update {
        lr,
        decay: weight_decay,
        eps,
        bc1: bias_correction1,
        bc2: bias_correction2,
        gate: gate.clone(),
    };
    theta.inplace_op3(m, v, &op)
}

/// One parameter tensor's share of [`update_all`]: the tensor, its gradient, its two moments and
/// its weight decay `λ`.
///
/// With master weights (mixed precision), `theta`, `m` and `v` are f32 and the model computes with
/// `copy`, a bf16 (or f16) copy of `theta` whose gradient `grad` is in that dtype too; the step
/// reads the gradient as it is and writes the updated `theta`, rounded, into `copy`.
#[derive(Debug, Clone, Copy)]
pub struct Slot<'a> {
    pub theta: &'a Tensor,
    pub grad: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub weight_decay: f64,
    pub copy: Option<&'a Tensor>,
}

/// The checks of one slot: moments like the parameter, the gradient of its shape in its dtype
/// (or in the copy's), the copy contiguous and of its shape.
fn check_slot(s: &Slot) -> Result<()> {
    check(s.theta, s.m, "parameter")?;
    check(s.theta, s.v, "parameter")?;
    if !s.m.is_contiguous() || !s.v.is_contiguous() {
        bail!("AdamW: the moments must be contiguous (they are updated in place)");
    }
    let grad_dtype = s.copy.map_or(s.theta.dtype(), |c| c.dtype());
    if s.grad.dims() != s.theta.dims() || s.grad.dtype() != grad_dtype {
        bail!(
            "AdamW: gradient {:?} {:?} for a parameter {:?} {:?} (expected {grad_dtype:?})",
            s.grad.dims(),
            s.grad.dtype(),
            s.theta.dims(),
            s.theta.dtype()
        );
    }
    if let Some(c) = s.copy {
        if c.dims() != s.theta.dims() || !c.is_contiguous() {
            bail!(
                "AdamW: the compute copy {:?} of a parameter {:?} must have its shape and be contiguous",
                c.dims(),
                s.theta.dims()
            );
        }
    }
    Ok(())
}

/// The scalars of one AdamW step (`c₁ = 1 − β₁ᵗ`, `c₂ = 1 − β₂ᵗ` the bias corrections).
#[derive(Debug, Clone, Copy)]
pub struct StepScalars {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub bias_correction1: f64,
    pub bias_correction2: f64,
}

/// The AdamW step of every tensor in `slots`: [`update_moment`] for `m` and `v`, then
/// [`update_parameter`], for each. On CUDA all of it is one kernel per dtype over every tensor
/// (`adamw_multi` in `kernels/adamw.cu`: read `θ, g, m, v` once, write `θ, m, v` once, the same
/// arithmetic and roundings), instead of three launches per tensor; elsewhere the three ops run
/// tensor by tensor.
pub fn update_all(slots: &[Slot], step: &StepScalars, gate: &Tensor) -> Result<()> {
    for s in slots {
        check_slot(s)?;
        check_gate(gate, s.theta)?;
    }
    #[cfg(feature = "cuda")]
    if slots.first().is_some_and(|s| s.theta.device().is_cuda()) {
        return cuda::update_all(slots, step, gate);
    }
    slots.iter().try_for_each(|s| update_one(s, step, gate))
}

/// One tensor's AdamW step as three passes: [`update_moment`] for `m` and `v`, then
/// [`update_parameter`].
///
/// With a compute copy, the gradient is cast to the parameter's dtype first and the updated
/// parameter is cast into the copy after (two more passes; [`update_all`] does both in its one).
pub fn update_one(s: &Slot, step: &StepScalars, gate: &Tensor) -> Result<()> {
    check_slot(s)?;
    let grad = s.grad.to_dtype(s.theta.dtype())?;
    update_moment(s.m, &grad, step.beta1, gate, false)?;
    update_moment(s.v, &grad, step.beta2, gate, true)?;
    update_parameter(
        s.theta,
        s.m,
        s.v,
        step.lr,
        s.weight_decay,
        step.eps,
        step.bias_correction1,
        step.bias_correction2,
        gate,
    )?;
    match s.copy {
        // In place: the copy is the model's parameter (a variable); a skipped step (`ok = 0`)
        // left θ as it was, so the copy stays what it was too.
        Some(c) => c.slice_set(&s.theta.to_dtype(c.dtype())?, 0, 0),
        None => Ok(()),
    }
}

/// `Σ x²` over every element of every tensor in `xs`, as an f32 scalar tensor on their device;
/// `None` for no tensors. On CUDA one kernel per dtype reads all of them (`sum_of_squares_multi`,
/// then `sum_partials`: deterministic, the same total in every run); elsewhere
/// [`sum_of_squares`] per tensor, then their sum.
pub fn sum_of_squares_all(xs: &[&Tensor]) -> Result<Option<Tensor>> {
    let Some(first) = xs.first() else {
        return Ok(None);
    };
    #[cfg(feature = "cuda")]
    if first.device().is_cuda() {
        return cuda::sum_of_squares_all(xs).map(Some);
    }
    let _ = first;
    sum_of_squares_each(xs)
}

/// `Σ x²` over every tensor in `xs` as [`sum_of_squares`] per tensor (one launch each on CUDA),
/// then their sum; `None` for no tensors.
pub fn sum_of_squares_each(xs: &[&Tensor]) -> Result<Option<Tensor>> {
    if xs.is_empty() {
        return Ok(None);
    }
    let squares: Vec<Tensor> = xs
        .iter()
        .map(|x| sum_of_squares(x))
        .collect::<Result<_>>()?;
    Ok(Some(Tensor::cat(&squares, 0)?.sum_all()?))
}

/// The gate of one optimiser step, computed on the device without a host synchronisation:
/// from the total `Σ g²` of the gradients (`sum_sq`, one f32) and the `loss` (one f32),
///
/// `‖g‖ = √Σ g²`, `ok = ‖g‖ and loss finite`, `s = max_norm / (‖g‖ + 10⁻⁶)` if `ok` and
/// `‖g‖ > max_norm` (gradient clipping), else 1.
///
/// Returns `[s, ok]` as two f64 on the device of `sum_sq`. The AdamW kernels read it there, so a
/// training step is enqueued from loss to updated parameters without waiting for the GPU, and a
/// step whose loss or gradient is not finite changes nothing (`ok = 0`).
pub fn step_gate(sum_sq: &Tensor, loss: &Tensor, max_norm: Option<f64>) -> Result<Tensor> {
    if sum_sq.elem_count() != 1 || loss.elem_count() != 1 {
        bail!(
            "step gate: Σg² and the loss must be single values, got shapes {:?} and {:?}",
            sum_sq.dims(),
            loss.dims()
        );
    }
    let sum_sq = sum_sq.to_dtype(candle_core::DType::F32)?.reshape(1)?;
    let loss = loss.to_dtype(candle_core::DType::F32)?.reshape(1)?;
    sum_sq.apply_op2_no_bwd(
        &loss,
        &Gate {
            max_norm: max_norm.unwrap_or(0.0),
        },
    )
}

/// A gate `[scale, 1]` from a clipping factor already known on the host.
pub fn host_gate(scale: f64, device: &candle_core::Device) -> Result<Tensor> {
    Tensor::new(&[scale, 1.0], device)
}

/// `[s, ok]` of [`step_gate`] from `Σ g²` and the loss, in the arithmetic the kernel uses: the
/// norm is an f32 square root, as the host's `grad_norm` takes it.
fn gate_values(sum_sq: f32, loss: f32, max_norm: f64) -> [f64; 2] {
    let norm = sum_sq.sqrt() as f64;
    let ok = norm.is_finite() && loss.is_finite();
    let scale = if ok && max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    };
    [scale, if ok { 1.0 } else { 0.0 }]
}

fn check_gate(gate: &Tensor, dst: &Tensor) -> Result<()> {
    if gate.dims() != [2] || gate.dtype() != candle_core::DType::F64 || !gate.is_contiguous() {
        bail!(
            "AdamW: the step gate must be [scale, ok] as two contiguous f64, got {:?} {:?}",
            gate.dims(),
            gate.dtype()
        );
    }
    if !gate.device().same_device(dst.device()) {
        bail!("AdamW: the step gate must live on the parameters' device");
    }
    Ok(())
}

/// The gate read on the host (CPU tensors: no synchronisation involved).
fn gate_on_host(gate: &Tensor) -> Result<(f64, bool)> {
    let v = gate.to_vec1::<f64>()?;
    Ok((v[0], v[1] != 0.0))
}

#[derive(Debug, Clone, Copy)]
struct Gate {
    max_norm: f64,
}

impl candle_core::CustomOp2 for Gate {
    fn name(&self) -> &'static str {
        "adamw-step-gate"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        sl: &Layout,
        l: &CpuStorage,
        ll: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        let (CpuStorage::F32(s), CpuStorage::F32(l)) = (s, l) else {
            bail!("step gate: f32 inputs expected");
        };
        let gate = gate_values(s[sl.start_offset()], l[ll.start_offset()], self.max_norm);
        Ok((CpuStorage::F64(gate.to_vec()), candle_core::Shape::from(2)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        sl: &Layout,
        l: &candle_core::CudaStorage,
        ll: &Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        Ok((
            cuda::gate(s, sl, l, ll, self.max_norm)?,
            candle_core::Shape::from(2),
        ))
    }
}

/// `Σ x²` over every element of `x`, as a one-element f32 tensor (one pass, f32 accumulation; the
/// CPU sums in f64): the per-tensor part of the global gradient norm.
pub fn sum_of_squares(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&SumOfSquares)
}

#[derive(Debug, Clone, Copy)]
struct SumOfSquares;

impl candle_core::CustomOp1 for SumOfSquares {
    fn name(&self) -> &'static str {
        "sum-of-squares"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, candle_core::Shape)> {
        let (a, b) = contiguous_range(l, "sum of squares: input")?;
        fn sum<T: WithDType>(v: &[T]) -> f32 {
            crate::cpu::sum_by(v, |x| x.to_f64() * x.to_f64()) as f32
        }
        let total = match s {
            CpuStorage::F32(v) => sum(&v[a..b]),
            CpuStorage::F64(v) => sum(&v[a..b]),
            CpuStorage::BF16(v) => sum(&v[a..b]),
            CpuStorage::F16(v) => sum(&v[a..b]),
            other => bail!("sum of squares: dtype {:?} not supported", other.dtype()),
        };
        Ok((CpuStorage::F32(vec![total]), candle_core::Shape::from(1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        Ok((cuda::sum_of_squares(s, l)?, candle_core::Shape::from(1)))
    }
}

fn check(dst: &Tensor, src: &Tensor, what: &str) -> Result<()> {
    if dst.dims() != src.dims() || dst.dtype() != src.dtype() {
        bail!(
            "AdamW {what} update: {:?} {:?} vs {:?} {:?} must match",
            dst.dims(),
            dst.dtype(),
            src.dims(),
            src.dtype()
        );
    }
    if !dst.is_contiguous() {
        bail!("AdamW {what} update: the updated tensor must be contiguous");
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct Moment {
    beta: f64,
    square: bool,
    gate: Tensor,
}

#[derive(Debug, Clone)]
struct Update {
    lr: f64,
    decay: f64,
    eps: f64,
    bc1: f64,
    bc2: f64,
    gate: Tensor,
}

/// `m ← β·m + (1 − β)·x` with `x = s·g` (or `(s·g)²`), in `A` arithmetic (f32, or f64 for f64
/// tensors), rounded once to `T`.
fn cpu_moment<T: Element, A: Real>(m: &mut [T], g: &[T], op: &Moment, scale: f64) {
    let (beta, scale) = (A::from_f64(op.beta), A::from_f64(scale));
    let one_minus_beta = A::from_f64(1.0 - op.beta);
    let square = op.square;
    for_each_row(m, CHUNK, |i, m| {
        for (mi, &gi) in m.iter_mut().zip(&g[i * CHUNK..]) {
            let x = scale * A::of(gi);
            let x = if square { x * x } else { x };
            *mi = (beta * A::of(*mi) + one_minus_beta * x).to();
        }
    });
}

/// `θ ← θ·(1 − lr·λ) − lr·(m/bc₁)/(√(v/bc₂) + ε)`, in `A` arithmetic, rounded once to `T`.
fn cpu_update<T: Element, A: Real>(theta: &mut [T], m: &[T], v: &[T], op: &Update) {
    let (bc1, bc2, eps) = (
        A::from_f64(op.bc1),
        A::from_f64(op.bc2),
        A::from_f64(op.eps),
    );
    let (lr, keep) = (A::from_f64(op.lr), A::from_f64(1.0 - op.lr * op.decay));
    for_each_row(theta, CHUNK, |i, theta| {
        let at = i * CHUNK;
        for ((t, &mi), &vi) in theta.iter_mut().zip(&m[at..]).zip(&v[at..]) {
            let step = (A::of(mi) / bc1) / ((A::of(vi) / bc2).sqrt() + eps);
            *t = (A::of(*t) * keep - lr * step).to();
        }
    });
}

/// Elements per task of the element-wise CPU loops.
const CHUNK: usize = 4096;

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let (scale, ok) = gate_on_host(&self.gate)?;
        if !ok {
            return Ok(());
        }
        let (a, b) = contiguous_range(dst_l, "AdamW: moment")?;
        let (c, d) = contiguous_range(gl, "AdamW: gradient")?;
        match (dst, g) {
            (CpuStorage::F32(m), CpuStorage::F32(g)) => {
                cpu_moment::<f32, f32>(&mut m[a..b], &g[c..d], self, scale)
            }
            (CpuStorage::F64(m), CpuStorage::F64(g)) => {
                cpu_moment::<f64, f64>(&mut m[a..b], &g[c..d], self, scale)
            }
            (CpuStorage::BF16(m), CpuStorage::BF16(g)) => {
                cpu_moment::<bf16, f32>(&mut m[a..b], &g[c..d], self, scale)
            }
            (CpuStorage::F16(m), CpuStorage::F16(g)) => {
                cpu_moment::<f16, f32>(&mut m[a..b], &g[c..d], self, scale)
            }
            (m, g) => bail!(
                "AdamW moment: dtypes {:?} and {:?} not supported",
                m.dtype(),
                g.dtype()
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        cuda::moment(dst, dst_l, g, gl, self)
    }
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        if !gate_on_host(&self.gate)?.1 {
            return Ok(());
        }
        let (a, b) = contiguous_range(dst_l, "AdamW: parameter")?;
        let (c, d) = contiguous_range(ml, "AdamW: first moment")?;
        let (e, f) = contiguous_range(vl, "AdamW: second moment")?;
        match (dst, m, v) {
            (CpuStorage::F32(t), CpuStorage::F32(m), CpuStorage::F32(v)) => {
                cpu_update::<f32, f32>(&mut t[a..b], &m[c..d], &v[e..f], self)
            }
            (CpuStorage::F64(t), CpuStorage::F64(m), CpuStorage::F64(v)) => {
                cpu_update::<f64, f64>(&mut t[a..b], &m[c..d], &v[e..f], self)
            }
            (CpuStorage::BF16(t), CpuStorage::BF16(m), CpuStorage::BF16(v)) => {
                cpu_update::<bf16, f32>(&mut t[a..b], &m[c..d], &v[e..f], self)
            }
            (CpuStorage::F16(t), CpuStorage::F16(m), CpuStorage::F16(v)) => {
                cpu_update::<f16, f32>(&mut t[a..b], &m[c..d], &v[e..f], self)
            }
            (t, _, _) => bail!("AdamW update: dtype {:?} not supported", t.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        m: &candle_core::CudaStorage,
        ml: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<()> {
        cuda::update(dst, dst_l, m, ml, v, vl, self)
    }
}

/// Launching `kernels/adamw.cu`.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{contiguous_view, load_kernel};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));
    const MODULE: &str = "shared_adamw";
    use crate::cuda::grid_stride as config;

    /// The kernels' name suffix of a dtype.
    fn suffix(dtype: DType) -> Result<&'static str> {
        use DType::*;
        crate::cuda::dtype_suffix(dtype, &[F32, F64, BF16, F16], "AdamW")
    }

    pub fn moment(
        dst: &mut CudaStorage,
        dst_l: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        op: &Moment,
    ) -> Result<()> {
        let name = suffix(dst.dtype())?;
        macro_rules! run {
            ($t:ty, $a:ty) => {
                moment_t::<$t, $a>(dst, dst_l, g, gl, op, name)
            };
        }
        crate::for_float_dtype!(dst.dtype(), "AdamW moment (cuda)", run)
    }

    /// Scalars travel as the kernel's accumulator type `A`.
    trait Scalar: DeviceRepr + Copy {
        fn of(x: f64) -> Self;
    }
    impl Scalar for f32 {
        fn of(x: f64) -> Self {
            x as f32
        }
    }
    impl Scalar for f64 {
        fn of(x: f64) -> Self {
            x
        }
    }

    fn moment_t<T: CudaDType + DeviceRepr, A: Scalar>(
        dst: &mut CudaStorage,
        dst_l: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        op: &Moment,
        name: &str,
    ) -> Result<()> {
        let dev = dst.device().clone();
        let (gv, _) = contiguous_view::<T>(g, gl, "AdamW (cuda): gradient")?;
        let (gate_storage, gate_l) = op.gate.storage_and_layout();
        let candle_core::Storage::Cuda(gate_storage) = &*gate_storage else {
            bail!("AdamW (cuda): the step gate is not on the GPU");
        };
        let (gate, _) = contiguous_view::<f64>(gate_storage, gate_l, "AdamW (cuda): step gate")?;
        let (a, b) = contiguous_range(dst_l, "AdamW: moment")?;
        let mut m = dst.as_cuda_slice_mut::<T>()?.slice_mut(a..b);
        let n = b - a;
        if n == 0 {
            return Ok(());
        }
        let func = load_kernel(&dev, MODULE, PTX, &format!("adamw_moment_{name}"), 0)?;
        let (n_i, beta, square) = (n as i64, A::of(op.beta), op.square as i32);
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder
            .arg(&mut m)
            .arg(&gv)
            .arg(&n_i)
            .arg(&beta)
            .arg(&gate)
            .arg(&square);
        // SAFETY: argument types match the kernel; both buffers hold n elements.
        unsafe { builder.launch(config(n)) }.w()?;
        Ok(())
    }

    /// One thread computes `[s, ok]` from `Σ g²` and the loss (see `step_gate`).
    pub fn gate(
        s: &CudaStorage,
        sl: &Layout,
        l: &CudaStorage,
        ll: &Layout,
        max_norm: f64,
    ) -> Result<CudaStorage> {
        let dev = s.device().clone();
        let (sum_sq, _) = contiguous_view::<f32>(s, sl, "step gate: Σg²")?;
        let (loss, _) = contiguous_view::<f32>(l, ll, "step gate: loss")?;
        let mut out = dev.alloc_zeros::<f64>(2)?;
        let func = load_kernel(&dev, MODULE, PTX, "adamw_gate", 0)?;
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder.arg(&sum_sq).arg(&loss).arg(&max_norm).arg(&mut out);
        // SAFETY: argument types match the kernel; out holds two doubles.
        unsafe { builder.launch(LaunchConfig::for_num_elems(1)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    pub fn sum_of_squares(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
        let dev = s.device().clone();
        let mut out = dev.alloc_zeros::<f32>(1)?;
        let (a, b) = contiguous_range(l, "sum of squares: input")?;
        let n = b - a;
        if n > 0 {
            use DType::*;
            let name =
                crate::cuda::dtype_suffix(s.dtype(), &[F32, F64, BF16, F16], "sum of squares")?;
            let func = load_kernel(&dev, MODULE, PTX, &format!("sum_of_squares_{name}"), 0)?;
            // A few blocks per multiprocessor: each thread sums many elements before the
            // reductions, and each block ends in one atomic add.
            let mut cfg = config(n);
            cfg.grid_dim.0 = cfg.grid_dim.0.min(132 * 4);
            let n_i = n as i64;
            let stream = dev.cuda_stream();
            let mut builder = stream.launch_builder(&func);
            macro_rules! arg {
                ($t:ty) => {{
                    let (x, _) = contiguous_view::<$t>(s, l, "sum of squares: input")?;
                    builder.arg(&x).arg(&mut out).arg(&n_i);
                    // SAFETY: argument types match the kernel; out holds one float.
                    unsafe { builder.launch(cfg) }.w()?;
                }};
            }
            match s.dtype() {
                F32 => arg!(f32),
                F64 => arg!(f64),
                BF16 => arg!(bf16),
                F16 => arg!(f16),
                _ => unreachable!("dtype_suffix accepted it"),
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    /// The distinct dtypes of `dtypes`, in order of first appearance.
    fn distinct(dtypes: impl Iterator<Item = DType>) -> Vec<DType> {
        let mut out: Vec<DType> = Vec::new();
        for d in dtypes {
            if !out.contains(&d) {
                out.push(d);
            }
        }
        out
    }

    /// The device pointers of `tensors` (each contiguous, on the GPU), as the table words of
    /// `kernels/adamw.cu`, and runs `launch` with them. (They are taken with cudarc's read intent
    /// even where the kernel writes: that matters only to cudarc's event tracking across
    /// streams, and Candle runs a device on one stream.) The storages stay locked and cudarc's
    /// stream guards alive until `launch` has enqueued the kernel. (The parameters and moments
    /// are written through these pointers in place, as Candle's `InplaceOp`s write through
    /// theirs; the optimizer owns them and nothing else runs on them meanwhile.)
    fn with_pointers<T: CudaDType>(
        tensors: &[&Tensor],
        stream: &std::sync::Arc<CudaStream>,
        launch: impl FnOnce(Vec<u64>) -> Result<()>,
    ) -> Result<()> {
        let storages: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let mut views = Vec::with_capacity(storages.len());
        for (storage, layout) in &storages {
            let candle_core::Storage::Cuda(cs) = &**storage else {
                bail!("AdamW (cuda): a tensor is not on the GPU");
            };
            let (a, b) = contiguous_range(layout, "AdamW (cuda): multi-tensor operand")?;
            views.push(cs.as_cuda_slice::<T>()?.slice(a..b));
        }
        let guarded: Vec<_> = views.iter().map(|v| v.device_ptr(stream)).collect();
        launch(guarded.iter().map(|(ptr, _)| *ptr).collect())
    }

    pub fn update_all(slots: &[Slot], step: &StepScalars, gate: &Tensor) -> Result<()> {
        // One launch per (parameter dtype, copy dtype): slots without a copy, then with one.
        for dtype in distinct(slots.iter().map(|s| s.theta.dtype())) {
            let group: Vec<&Slot> = slots
                .iter()
                .filter(|s| s.theta.dtype() == dtype && s.copy.is_none())
                .collect();
            if !group.is_empty() {
                let kernel = format!("adamw_multi_{}", suffix(dtype)?);
                macro_rules! run {
                    ($t:ty, $a:ty) => {
                        launch_multi::<$t, $t, $a>(&kernel, &group, step, gate)?
                    };
                }
                crate::for_float_dtype!(dtype, "AdamW multi-tensor (cuda)", run);
            }
        }
        let with_copy: Vec<&Slot> = slots.iter().filter(|s| s.copy.is_some()).collect();
        for copy_dtype in distinct(with_copy.iter().filter_map(|s| s.copy.map(|c| c.dtype()))) {
            let group: Vec<&Slot> = with_copy
                .iter()
                .copied()
                .filter(|s| s.copy.is_some_and(|c| c.dtype() == copy_dtype))
                .collect();
            if group.iter().any(|s| s.theta.dtype() != DType::F32) {
                bail!("AdamW (cuda): master weights must be f32");
            }
            match copy_dtype {
                DType::BF16 => launch_multi::<f32, half::bf16, f32>(
                    "adamw_multi_master_f32_bf16",
                    &group,
                    step,
                    gate,
                )?,
                DType::F16 => launch_multi::<f32, half::f16, f32>(
                    "adamw_multi_master_f32_f16",
                    &group,
                    step,
                    gate,
                )?,
                dt => bail!("AdamW (cuda): compute copies in {dt:?} (bf16 or f16)"),
            }
        }
        Ok(())
    }

    /// One launch of `kernel` for `group`: `θ, m, v` in `T`, the gradients in `G` (the compute
    /// copies' dtype with master weights, else `T`), the step's scalars in `A`. The table is
    /// `[θ | m | v]`, `[g]`, the starts, the decays, then (with master weights) `[copy]`.
    fn launch_multi<T: CudaDType + DeviceRepr, G: CudaDType + DeviceRepr, A: Scalar>(
        kernel: &str,
        group: &[&Slot],
        step: &StepScalars,
        gate: &Tensor,
    ) -> Result<()> {
        let candle_core::Device::Cuda(dev) = group[0].theta.device() else {
            bail!("AdamW (cuda): the parameters are not on the GPU");
        };
        let total: usize = group.iter().map(|s| s.theta.elem_count()).sum();
        if total == 0 {
            return Ok(());
        }
        let grads: Vec<Tensor> = group
            .iter()
            .map(|s| s.grad.contiguous())
            .collect::<Result<_>>()?;
        let wide: Vec<&Tensor> = [
            group.iter().map(|s| s.theta).collect::<Vec<_>>(),
            group.iter().map(|s| s.m).collect(),
            group.iter().map(|s| s.v).collect(),
        ]
        .concat();
        let narrow: Vec<&Tensor> = [
            grads.iter().collect::<Vec<_>>(),
            group.iter().filter_map(|s| s.copy).collect(),
        ]
        .concat();
        let n_t = group.len();
        let stream = dev.cuda_stream();
        let (gate_storage, gate_l) = gate.storage_and_layout();
        let candle_core::Storage::Cuda(gate_storage) = &*gate_storage else {
            bail!("AdamW (cuda): the step gate is not on the GPU");
        };
        let (gate, _) = contiguous_view::<f64>(gate_storage, gate_l, "AdamW (cuda): step gate")?;
        let func = load_kernel(dev, MODULE, PTX, kernel, 0)?;
        with_pointers::<T>(&wide, &stream, |mut table| {
            with_pointers::<G>(&narrow, &stream, |narrow| {
                table.extend_from_slice(&narrow[..n_t]);
                let mut start = 0u64;
                for s in group {
                    table.push(start);
                    start += s.theta.elem_count() as u64;
                }
                table.push(start);
                table.extend(group.iter().map(|s| s.weight_decay.to_bits()));
                table.extend_from_slice(&narrow[n_t..]); // the copies, if any
                let table = stream.clone_htod(&table).w()?;
                let n_i = n_t as i32;
                let [lr, b1, b2, eps, c1, c2] = [
                    step.lr,
                    step.beta1,
                    step.beta2,
                    step.eps,
                    step.bias_correction1,
                    step.bias_correction2,
                ]
                .map(A::of);
                let mut builder = stream.launch_builder(&func);
                builder
                    .arg(&table)
                    .arg(&n_i)
                    .arg(&lr)
                    .arg(&b1)
                    .arg(&b2)
                    .arg(&eps)
                    .arg(&c1)
                    .arg(&c2)
                    .arg(&gate);
                // SAFETY: argument types match the kernel; the table holds n_t pointers in T
                // to each of θ, m, v, n_t pointers in G to the gradients, the n_t + 1 starts,
                // n_t decays and, for the master kernel, n_t pointers in G to the copies, every
                // tensor contiguous and of its slot's length.
                unsafe { builder.launch(config(total)) }.w()?;
                Ok(())
            })
        })
    }

    pub fn sum_of_squares_all(xs: &[&Tensor]) -> Result<Tensor> {
        let candle_core::Device::Cuda(dev) = xs[0].device() else {
            bail!("sum of squares (cuda): the tensors are not on the GPU");
        };
        let stream = dev.cuda_stream();
        let mut out = dev.alloc_zeros::<f32>(1)?;
        let xs: Vec<Tensor> = xs.iter().map(|x| x.contiguous()).collect::<Result<_>>()?;
        for dtype in distinct(xs.iter().map(|x| x.dtype())) {
            let group: Vec<&Tensor> = xs.iter().filter(|x| x.dtype() == dtype).collect();
            let total: usize = group.iter().map(|x| x.elem_count()).sum();
            if total == 0 {
                continue;
            }
            let func = load_kernel(
                dev,
                MODULE,
                PTX,
                &format!("sum_of_squares_multi_{}", suffix(dtype)?),
                0,
            )?;
            // One partial sum per block, then one block adds them in a fixed order: the same
            // total every run (atomic adds would depend on the order blocks finish in).
            let mut cfg = config(total);
            cfg.grid_dim.0 = cfg.grid_dim.0.min(132 * 4);
            let blocks = cfg.grid_dim.0 as usize;
            // SAFETY: every block writes its partial before sum_partials reads them.
            let mut partials = unsafe { dev.alloc::<f32>(blocks)? };
            macro_rules! run {
                ($t:ty, $a:ty) => {
                    with_pointers::<$t>(&group, &stream, |mut table| {
                        let mut start = 0u64;
                        for x in &group {
                            table.push(start);
                            start += x.elem_count() as u64;
                        }
                        table.push(start);
                        let table = stream.clone_htod(&table).w()?;
                        let n_i = group.len() as i32;
                        let mut builder = stream.launch_builder(&func);
                        builder.arg(&table).arg(&n_i).arg(&mut partials);
                        // SAFETY: argument types match the kernel; the table holds the tensors'
                        // pointers and their n + 1 starts; partials holds one float per block.
                        unsafe { builder.launch(cfg) }.w()?;
                        Ok(())
                    })?
                };
            }
            crate::for_float_dtype!(dtype, "sum of squares (cuda)", run);
            let add = load_kernel(dev, MODULE, PTX, "sum_partials", 0)?;
            let n_blocks = blocks as i32;
            let mut builder = stream.launch_builder(&add);
            builder.arg(&partials).arg(&n_blocks).arg(&mut out);
            let one_block = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: partials holds n_blocks floats, out one.
            unsafe { builder.launch(one_block) }.w()?;
        }
        Ok(Tensor::from_storage(
            candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone())),
            (), // a scalar, as `sum_all` gives on the CPU
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }

    pub fn update(
        dst: &mut CudaStorage,
        dst_l: &Layout,
        m: &CudaStorage,
        ml: &Layout,
        v: &CudaStorage,
        vl: &Layout,
        op: &Update,
    ) -> Result<()> {
        let name = suffix(dst.dtype())?;
        macro_rules! run {
            ($t:ty, $a:ty) => {
                update_t::<$t, $a>(dst, dst_l, m, ml, v, vl, op, name)
            };
        }
        crate::for_float_dtype!(dst.dtype(), "AdamW update (cuda)", run)
    }

    #[allow(clippy::too_many_arguments)]
    fn update_t<T: CudaDType + DeviceRepr, A: Scalar>(
        dst: &mut CudaStorage,
        dst_l: &Layout,
        m: &CudaStorage,
        ml: &Layout,
        v: &CudaStorage,
        vl: &Layout,
        op: &Update,
        name: &str,
    ) -> Result<()> {
        let dev = dst.device().clone();
        let (gate_storage, gate_l) = op.gate.storage_and_layout();
        let candle_core::Storage::Cuda(gate_storage) = &*gate_storage else {
            bail!("AdamW (cuda): the step gate is not on the GPU");
        };
        let (gate, _) = contiguous_view::<f64>(gate_storage, gate_l, "AdamW (cuda): step gate")?;
        let (mv, _) = contiguous_view::<T>(m, ml, "AdamW (cuda): first moment")?;
        let (vv, _) = contiguous_view::<T>(v, vl, "AdamW (cuda): second moment")?;
        let (a, b) = contiguous_range(dst_l, "AdamW: parameter")?;
        let mut theta = dst.as_cuda_slice_mut::<T>()?.slice_mut(a..b);
        let n = b - a;
        if n == 0 {
            return Ok(());
        }
        let func = load_kernel(&dev, MODULE, PTX, &format!("adamw_update_{name}"), 0)?;
        let n_i = n as i64;
        let [lr, decay, eps, bc1, bc2] = [op.lr, op.decay, op.eps, op.bc1, op.bc2].map(A::of);
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder
            .arg(&mut theta)
            .arg(&mv)
            .arg(&vv)
            .arg(&n_i)
            .arg(&lr)
            .arg(&decay)
            .arg(&eps)
            .arg(&bc1)
            .arg(&bc2)
            .arg(&gate);
        // SAFETY: argument types match the kernel; all buffers hold n elements.
        unsafe { builder.launch(config(n)) }.w()?;
        Ok(())
    }
}

//! # The LSTM cell as one op
//!
//! One time step of an LSTM turns the pre-activations of its four gates and the previous cell
//! state into the new hidden and cell states (PyTorch's gate order, `i f g o`):
//!
//! ```text
//! i = σ(aᵢ)   f = σ(a_f)   g = tanh(a_g)   o = σ(a_o)      gates (batch, 4·hidden) = [aᵢ|a_f|a_g|a_o]
//! c = f ⊙ c₋₁ + i ⊙ g                                      (batch, hidden)
//! h = o ⊙ tanh(c)                                          (batch, hidden)
//! ```
//!
//! [`lstm_cell`] writes this with tensor ops: four slices, three sigmoids, two tanhs, three
//! products and a sum, each a graph node with its own backward pass, at every time step of every
//! layer. [`lstm_cell_fused`] computes the same values as one custom op, and its backward as one
//! more, from the chain rule written out (`dh`, `dc` the gradients reaching `h` and `c`):
//!
//! ```text
//! dc̃  = dc + dh ⊙ o ⊙ (1 − tanh²c)                          (all paths into c)
//! daᵢ = dc̃ ⊙ g ⊙ i(1 − i)      da_f = dc̃ ⊙ c₋₁ ⊙ f(1 − f)
//! da_g = dc̃ ⊙ i ⊙ (1 − g²)     da_o = dh ⊙ tanh c ⊙ o(1 − o)
//! dc₋₁ = dc̃ ⊙ f
//! ```
//!
//! The fused op runs on the CPU (loops in f32, or f64 for f64 tensors, with the vectorised `exp`
//! and `tanh` of [`shared::cpu`]); there is no CUDA kernel for it yet, so the GPU uses the
//! composed cell ([`LstmState::cell_on`]).

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use shared::cpu::{Element, Real};
use shared::custom_op::contiguous_slice;
use shared::kernels::OpImpl;

/// The state an LSTM layer carries from one time step to the next.
#[derive(Debug, Clone)]
pub struct LstmState {
    /// Hidden state, the layer's output at this step `(batch, hidden)`.
    pub h: Tensor,
    /// Cell state, the layer's memory `(batch, hidden)`.
    pub c: Tensor,
}

impl LstmState {
    /// `h = c = 0` for `batch` sequences.
    pub fn zeros(batch: usize, hidden: usize, like: &Tensor) -> Result<Self> {
        let z = Tensor::zeros((batch, hidden), like.dtype(), like.device())?;
        Ok(Self { h: z.clone(), c: z })
    }

    /// The next state from the gates' pre-activations `(batch, 4·hidden)`, with the cell `how`.
    pub fn next(&self, gates: &Tensor, how: OpImpl) -> Result<Self> {
        match how {
            OpImpl::Composed => lstm_cell(gates, &self.c),
            OpImpl::Fused => lstm_cell_fused(gates, &self.c),
        }
    }

    /// The cell op for a run that asked for `how` on `device`: the fused op exists on the CPU
    /// only (no CUDA kernel yet), so CUDA computes the cell composed.
    pub fn cell_on(how: OpImpl, device: &candle_core::Device) -> OpImpl {
        match how {
            OpImpl::Fused if device.is_cpu() => OpImpl::Fused,
            _ => OpImpl::Composed,
        }
    }
}

/// Checks `gates (batch, 4·hidden)` against `c (batch, hidden)`; returns `hidden`.
fn check(gates: &Tensor, c: &Tensor) -> Result<usize> {
    let (b, four_h) = gates.dims2()?;
    let (bc, hidden) = c.dims2()?;
    if bc != b || four_h != 4 * hidden || gates.dtype() != c.dtype() {
        bail!(
            "lstm cell: gates {:?} {:?} must be (batch, 4·hidden) for c {:?} {:?}",
            gates.dims(),
            gates.dtype(),
            c.dims(),
            c.dtype()
        );
    }
    Ok(hidden)
}

/// One LSTM step composed from tensor ops (the formulas of the module header).
pub fn lstm_cell(gates: &Tensor, c: &Tensor) -> Result<LstmState> {
    check(gates, c)?;
    let a = gates.chunk(4, 1)?; // 4 × (batch, hidden)
    let i = candle_nn::ops::sigmoid(&a[0])?;
    let f = candle_nn::ops::sigmoid(&a[1])?;
    let g = a[2].tanh()?;
    let o = candle_nn::ops::sigmoid(&a[3])?;
    let c = ((f * c)? + (i * g)?)?;
    let h = (o * c.tanh()?)?;
    Ok(LstmState { h, c })
}

/// One LSTM step as one custom op (CPU), differentiable in `gates` and `c`.
pub fn lstm_cell_fused(gates: &Tensor, c: &Tensor) -> Result<LstmState> {
    check(gates, c)?;
    let hc = gates.contiguous()?.apply_op2(&c.contiguous()?, LstmCell)?; // (2, batch, hidden)
    Ok(LstmState {
        h: hc.get(0)?,
        c: hc.get(1)?,
    })
}

/// The gradients `(dgates, dc₋₁)` of one step from those reaching its outputs, `dh` and `dc`
/// (the module header's formulas): one op on the CPU (`Fused`), tensor ops otherwise.
pub fn lstm_cell_backward(
    gates: &Tensor,
    c_prev: &Tensor,
    dh: &Tensor,
    dc: &Tensor,
    how: OpImpl,
) -> Result<(Tensor, Tensor)> {
    let hidden = check(gates, c_prev)?;
    match how {
        OpImpl::Fused => fused_backward(gates, c_prev, &Tensor::stack(&[dh, dc], 0)?, hidden),
        OpImpl::Composed => {
            let a = gates.chunk(4, 1)?;
            let i = candle_nn::ops::sigmoid(&a[0])?;
            let f = candle_nn::ops::sigmoid(&a[1])?;
            let g = a[2].tanh()?;
            let o = candle_nn::ops::sigmoid(&a[3])?;
            let tc = ((&f * c_prev)? + (&i * &g)?)?.tanh()?;
            let sigmoid_slope = |s: &Tensor| s * (1.0 - s)?; // σ′ = σ(1 − σ)
            let dct = (dc + (dh * &o)? * (1.0 - tc.sqr()?)?)?;
            let da_i = ((&dct * &g)? * sigmoid_slope(&i)?)?;
            let da_f = ((&dct * c_prev)? * sigmoid_slope(&f)?)?;
            let da_g = ((&dct * &i)? * (1.0 - g.sqr()?)?)?;
            let da_o = ((dh * &tc)? * sigmoid_slope(&o)?)?;
            Ok((Tensor::cat(&[da_i, da_f, da_g, da_o], 1)?, (dct * f)?))
        }
    }
}

/// [`lstm_cell_backward`] as one op, from the gradient of `[h; c]` `(2, batch, hidden)`.
fn fused_backward(
    gates: &Tensor,
    c_prev: &Tensor,
    grad_hc: &Tensor,
    hidden: usize,
) -> Result<(Tensor, Tensor)> {
    let packed = gates.contiguous()?.apply_op3_no_bwd(
        &c_prev.contiguous()?,
        &grad_hc.contiguous()?,
        &LstmCellBackward,
    )?; // (batch, 5·hidden)
    Ok((
        packed.narrow(1, 0, 4 * hidden)?.contiguous()?,
        packed.narrow(1, 4 * hidden, hidden)?.contiguous()?,
    ))
}

/// `(gates, c₋₁) → [h; c]`, shape `(2, batch, hidden)`.
#[derive(Debug, Clone, Copy)]
struct LstmCell;

/// `(gates, c₋₁, [dh; dc]) → rows [daᵢ da_f da_g da_o dc₋₁]`, shape `(batch, 5·hidden)`.
#[derive(Debug, Clone, Copy)]
struct LstmCellBackward;

/// The four gates' activations at one position.
#[inline(always)]
fn activations<A: Real>(ai: A, af: A, ag: A, ao: A) -> (A, A, A, A) {
    (ai.sigmoid(), af.sigmoid(), ag.tanh(), ao.sigmoid())
}

/// `[h; c]`: first every `c` row (three gates), then every `h` row from it (the fourth gate).
fn cpu_forward<T: Element, A: Real>(gates: &[T], c_prev: &[T], hidden: usize) -> Vec<T> {
    let n = c_prev.len();
    let mut out = shared::cpu::zeros::<T>(2 * n);
    let (h, c) = out.split_at_mut(n);
    shared::cpu::for_each_row_costing(c, hidden, 4 * hidden, |r, c_row| {
        let a = &gates[r * 4 * hidden..(r + 1) * 4 * hidden];
        let (ai, rest) = a.split_at(hidden);
        let (af, rest) = rest.split_at(hidden);
        let ag = &rest[..hidden];
        let cp = &c_prev[r * hidden..(r + 1) * hidden];
        for ((((c, &ai), &af), &ag), &cp) in c_row.iter_mut().zip(ai).zip(af).zip(ag).zip(cp) {
            let (i, f, g) = (A::of(ai).sigmoid(), A::of(af).sigmoid(), A::of(ag).tanh());
            *c = (f * A::of(cp) + i * g).to();
        }
    });
    let c = &*c;
    shared::cpu::for_each_row_costing(h, hidden, 2 * hidden, |r, h_row| {
        let ao = &gates[r * 4 * hidden + 3 * hidden..(r + 1) * 4 * hidden];
        let c_row = &c[r * hidden..(r + 1) * hidden];
        for ((h, &ao), &c) in h_row.iter_mut().zip(ao).zip(c_row) {
            *h = (A::of(ao).sigmoid() * A::of(c).tanh()).to();
        }
    });
    out
}

/// Rows `[daᵢ da_f da_g da_o dc₋₁]` (the module header's formulas; activations recomputed).
fn cpu_backward<T: Element, A: Real>(
    gates: &[T],
    c_prev: &[T],
    grad: &[T],
    hidden: usize,
) -> Vec<T> {
    let n = c_prev.len();
    let (dh, dc) = grad.split_at(n);
    let mut out = shared::cpu::zeros::<T>(5 * n);
    shared::cpu::for_each_row(&mut out, 5 * hidden, |r, row| {
        let a = &gates[r * 4 * hidden..(r + 1) * 4 * hidden];
        let at = r * hidden..(r + 1) * hidden;
        let (cp, dh, dc) = (&c_prev[at.clone()], &dh[at.clone()], &dc[at]);
        let (dai, rest) = row.split_at_mut(hidden);
        let (daf, rest) = rest.split_at_mut(hidden);
        let (dag, rest) = rest.split_at_mut(hidden);
        let (dao, dcp) = rest.split_at_mut(hidden);
        // Slices of exactly `hidden` elements, so that indexing them by `j` needs no checks.
        let (ai, af) = (&a[..hidden], &a[hidden..2 * hidden]);
        let (ag, ao) = (&a[2 * hidden..3 * hidden], &a[3 * hidden..]);
        for j in 0..hidden {
            let (i, f, g, o) = activations(A::of(ai[j]), A::of(af[j]), A::of(ag[j]), A::of(ao[j]));
            let cp_j = A::of(cp[j]);
            let tc = (f * cp_j + i * g).tanh();
            let dh_j = A::of(dh[j]);
            let one = A::one();
            let dct = A::of(dc[j]) + dh_j * o * (one - tc * tc);
            dai[j] = (dct * g * i * (one - i)).to();
            daf[j] = (dct * cp_j * f * (one - f)).to();
            dag[j] = (dct * i * (one - g * g)).to();
            dao[j] = (dh_j * tc * o * (one - o)).to();
            dcp[j] = (dct * f).to();
        }
    });
    out
}

impl CustomOp2 for LstmCell {
    fn name(&self) -> &'static str {
        "lstm-cell"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, hidden) = l2.shape().dims2()?;
        macro_rules! run {
            ($t:ty, $a:ty) => {
                <$t>::to_cpu_storage_owned(cpu_forward::<$t, $a>(
                    contiguous_slice(s1.as_slice::<$t>()?, l1, "lstm cell: gates")?,
                    contiguous_slice(s2.as_slice::<$t>()?, l2, "lstm cell: c")?,
                    hidden,
                ))
            };
        }
        let hc = shared::for_float_dtype!(s1.dtype(), "lstm cell", run);
        Ok((hc, Shape::from((2, b, hidden))))
    }

    fn bwd(
        &self,
        gates: &Tensor,
        c_prev: &Tensor,
        _hc: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let hidden = check(gates, c_prev)?;
        let (d_gates, d_c_prev) = fused_backward(gates, c_prev, grad, hidden)?;
        Ok((Some(d_gates), Some(d_c_prev)))
    }
}

impl CustomOp3 for LstmCellBackward {
    fn name(&self) -> &'static str {
        "lstm-cell-backward"
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
        let (b, hidden) = l2.shape().dims2()?;
        macro_rules! run {
            ($t:ty, $a:ty) => {
                <$t>::to_cpu_storage_owned(cpu_backward::<$t, $a>(
                    contiguous_slice(s1.as_slice::<$t>()?, l1, "lstm cell: gates")?,
                    contiguous_slice(s2.as_slice::<$t>()?, l2, "lstm cell: c")?,
                    contiguous_slice(s3.as_slice::<$t>()?, l3, "lstm cell: gradient")?,
                    hidden,
                ))
            };
        }
        let out = shared::for_float_dtype!(s1.dtype(), "lstm cell backward", run);
        Ok((out, Shape::from((b, 5 * hidden))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use shared::compare::max_abs_diff;

    /// Gates spread over the sigmoid's and tanh's curved and saturated ranges.
    fn inputs(b: usize, hidden: usize, dtype: DType) -> Result<(Var, Var)> {
        let gates: Vec<f64> = (0..b * 4 * hidden)
            .map(|k| ((k * 37 % 101) as f64 - 50.0) / 9.0)
            .collect();
        let c: Vec<f64> = (0..b * hidden)
            .map(|k| ((k * 13 % 29) as f64 - 14.0) / 5.0)
            .collect();
        let dev = Device::Cpu;
        Ok((
            Var::from_tensor(&Tensor::from_vec(gates, (b, 4 * hidden), &dev)?.to_dtype(dtype)?)?,
            Var::from_tensor(&Tensor::from_vec(c, (b, hidden), &dev)?.to_dtype(dtype)?)?,
        ))
    }

    /// `Σ h·w_h + Σ c·w_c` with uneven weights, so that both outputs get distinct gradients.
    fn objective(s: &LstmState) -> Result<Tensor> {
        let n = s.h.elem_count();
        let w = Tensor::arange(0u32, n as u32, s.h.device())?
            .to_dtype(s.h.dtype())?
            .reshape(s.h.shape())?;
        let w = ((w * 0.37)?.sin()? + 0.2)?;
        (&s.h * &w)?.sum_all()? + (&s.c * (w * 1.3)?)?.sum_all()?
    }

    #[test]
    fn fused_cell_equals_the_composed_cell_values_and_gradients() -> Result<()> {
        for (dtype, tol) in [(DType::F64, 1e-14), (DType::F32, 2e-6)] {
            for (b, hidden) in [(3, 5), (64, 300)] {
                let (gates, c) = inputs(b, hidden, dtype)?;
                let composed = lstm_cell(gates.as_tensor(), c.as_tensor())?;
                let fused = lstm_cell_fused(gates.as_tensor(), c.as_tensor())?;
                assert!(max_abs_diff(&composed.h, &fused.h)? <= tol, "{dtype:?} h");
                assert!(max_abs_diff(&composed.c, &fused.c)? <= tol, "{dtype:?} c");
                let g_composed = objective(&composed)?.backward()?;
                let g_fused = objective(&fused)?.backward()?;
                for (what, v) in [("gates", &gates), ("c", &c)] {
                    let (x, y) = (
                        g_composed.get(v.as_tensor()).expect("grad"),
                        g_fused.get(v.as_tensor()).expect("grad"),
                    );
                    let d = max_abs_diff(x, y)?;
                    assert!(d <= 10.0 * tol, "{dtype:?} d{what}: {d}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn fused_cell_gradient_matches_finite_differences() -> Result<()> {
        let (b, hidden) = (2, 3);
        let (gates, c) = inputs(b, hidden, DType::F64)?;
        let grads = objective(&lstm_cell_fused(gates.as_tensor(), c.as_tensor())?)?.backward()?;
        for v in [&gates, &c] {
            let analytic = grads.get(v.as_tensor()).expect("grad").flatten_all()?;
            let analytic = analytic.to_vec1::<f64>()?;
            let x0 = v.as_tensor().flatten_all()?.to_vec1::<f64>()?;
            for k in 0..x0.len() {
                let at = |delta: f64| -> Result<f64> {
                    let mut x = x0.clone();
                    x[k] += delta;
                    v.set(&Tensor::from_vec(x, v.shape(), &Device::Cpu)?)?;
                    let s = lstm_cell_fused(gates.as_tensor(), c.as_tensor())?;
                    objective(&s)?.to_scalar::<f64>()
                };
                let eps = 1e-6;
                let numeric = (at(eps)? - at(-eps)?) / (2.0 * eps);
                v.set(&Tensor::from_vec(x0.clone(), v.shape(), &Device::Cpu)?)?;
                assert!(
                    (numeric - analytic[k]).abs() <= 1e-7 * (1.0 + numeric.abs()),
                    "element {k}: finite differences {numeric}, backward {}",
                    analytic[k]
                );
            }
        }
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_refused() -> Result<()> {
        let (gates, c) = inputs(2, 3, DType::F32)?;
        let bad_c = c.as_tensor().narrow(1, 0, 2)?;
        let err = lstm_cell_fused(gates.as_tensor(), &bad_c).unwrap_err();
        assert!(err.to_string().contains("(batch, 4·hidden)"), "{err}");
        Ok(())
    }
}

//! # Backpropagation through time, written out
//!
//! An LSTM layer's loop over time, left to autograd, records every step as graph nodes; its
//! backward then adds a `(4·hidden, hidden)` gradient into `W_hh` once per step and walks the
//! graph node by node. [`lstm_recurrence`] runs the same loop and gives the graph one node whose
//! backward is backpropagation through time (Werbos, 1990) written out:
//!
//! ```text
//! forward   for t = 1…T:  gates_t = X_t + h_{t−1}·W_hhᵀ;  (h_t, c_t) = cell(gates_t, c_{t−1})
//! backward  for t = T…1:  dh = dH_t + dh_carry;  dc = dC_t + dc_carry
//!                         (dgates_t, dc_carry) = cell′(gates_t, c_{t−1}, dh, dc)
//!                         dh_carry = dgates_t · W_hh                      (batch, hidden)
//!           dX = dgates                                                  (T, batch, 4·hidden)
//!           dW_hh = Σ_t dgates_tᵀ · h_{t−1} = dgatesᵀ · H_prev             one matrix product
//!           d(h₀, c₀) = (dh_carry, dc_carry)
//! ```
//!
//! Only the carry `dh·W_hh` must be sequential; the weight gradient, a sum over steps, becomes a
//! single large matrix product. The cell and its derivative are [`crate::lstm_cell`]'s (the fused
//! op on the CPU, tensor ops on CUDA).

use crate::lstm_cell::{lstm_cell_backward, LstmState};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use shared::kernels::OpImpl;
use shared::params::linear;

/// Runs the recurrence over `from_input (T, batch, 4·hidden)` (the input's share of the gates,
/// bias included) from `init`; returns `(2, T, batch, hidden)`: every `h_t`, then every `c_t`.
/// Differentiable in `from_input`, `w_hh` and the initial state.
pub fn lstm_recurrence(
    from_input: &Tensor,
    w_hh: &Tensor,
    init: &LstmState,
    cell: OpImpl,
) -> Result<Tensor> {
    let (len, _batch, four_h) = from_input.dims3()?;
    let (w_rows, hidden) = w_hh.dims2()?;
    if len == 0 || four_h != 4 * hidden || w_rows != four_h {
        bail!(
            "lstm recurrence: from_input {:?} must be (T ≥ 1, batch, 4·hidden) for w_hh {:?}",
            from_input.dims(),
            w_hh.dims()
        );
    }
    // The forward pass as plain tensor ops on detached values: nothing is recorded.
    let (x, w) = (from_input.detach(), w_hh.detach());
    let mut state = LstmState {
        h: init.h.detach(),
        c: init.c.detach(),
    };
    let (mut gates, mut hs, mut cs) = (vec![], vec![], vec![]);
    for t in 0..len {
        let g = (x.get(t)? + linear(&state.h, &w)?)?; // (batch, 4·hidden)
        state = state.next(&g, cell)?;
        gates.push(g);
        hs.push(state.h.clone());
        cs.push(state.c.clone());
    }
    let out = Tensor::stack(&[Tensor::stack(&hs, 0)?, Tensor::stack(&cs, 0)?], 0)?;
    let recorded = Recurrence {
        out: out.clone(),
        gates: Tensor::stack(&gates, 0)?,
        cell,
    };
    // One graph node: its value is `out`, its backward the loop of the module header.
    let init = Tensor::stack(&[&init.h, &init.c], 0)?; // (2, batch, hidden)
    from_input
        .contiguous()?
        .apply_op3(&w_hh.contiguous()?, &init, recorded)
}

/// The recorded forward pass: its output `(2, T, batch, hidden)` and pre-activations
/// `(T, batch, 4·hidden)`.
struct Recurrence {
    out: Tensor,
    gates: Tensor,
    cell: OpImpl,
}

impl Recurrence {
    fn backward(
        &self,
        w_hh: &Tensor,
        init: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let len = self.gates.dim(0)?;
        let (h_all, c_all) = (self.out.get(0)?, self.out.get(1)?); // (T, batch, hidden)
        let (h0, c0) = (init.get(0)?, init.get(1)?);
        let (d_h_all, d_c_all) = (grad.get(0)?, grad.get(1)?);
        let (mut dh_carry, mut dc_carry) = (h0.zeros_like()?, c0.zeros_like()?);
        let mut d_gates = Vec::with_capacity(len);
        for t in (0..len).rev() {
            let c_prev = if t == 0 {
                c0.clone()
            } else {
                c_all.get(t - 1)?
            };
            let dh = (d_h_all.get(t)? + &dh_carry)?;
            let dc = (d_c_all.get(t)? + &dc_carry)?;
            let (dg, dc_prev) =
                lstm_cell_backward(&self.gates.get(t)?, &c_prev, &dh, &dc, self.cell)?;
            dh_carry = dg.matmul(w_hh)?; // (batch, 4·hidden)·(4·hidden, hidden)
            dc_carry = dc_prev;
            d_gates.push(dg);
        }
        d_gates.reverse();
        let d_gates = Tensor::stack(&d_gates, 0)?; // (T, batch, 4·hidden)
        let h_prev = Tensor::cat(&[h0.unsqueeze(0)?, h_all.narrow(0, 0, len - 1)?], 0)?;
        let rows = len * self.gates.dim(1)?;
        let d_w = d_gates
            .reshape((rows, ()))?
            .t()?
            .matmul(&h_prev.reshape((rows, ()))?)?; // (4·hidden, hidden)
        let d_init = Tensor::stack(&[dh_carry, dc_carry], 0)?;
        Ok((d_gates, d_w, d_init))
    }
}

impl CustomOp3 for Recurrence {
    fn name(&self) -> &'static str {
        "lstm-recurrence"
    }

    /// The value was computed before the op was applied: hand over a copy of it.
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (storage, layout) = self.out.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => bail!("lstm recurrence: the recorded output is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (storage, layout) = self.out.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => bail!("lstm recurrence: the recorded output is not on the GPU"),
        }
    }

    fn bwd(
        &self,
        _from_input: &Tensor,
        w_hh: &Tensor,
        init: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, dinit) = self.backward(&w_hh.detach(), &init.detach(), &grad.detach())?;
        Ok((Some(dx), Some(dw), Some(dinit)))
    }
}

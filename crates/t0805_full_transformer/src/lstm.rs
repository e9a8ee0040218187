//! The baseline: an LSTM encoder–decoder (Sutskever et al., 2014), the sequence-to-sequence model
//! the Transformer replaced. The encoder reads the source one token at a time and hands its final
//! `(h, c)` state to the decoder, which must squeeze the whole source through that one vector.
//!
//! Everything is raw parameters, as in the rest of the module. One layer computes, at step `t`,
//!
//! ```text
//! gates_t = x_t·W_ihᵀ + b + h_{t−1}·W_hhᵀ          (batch, 4·hidden), gate order i f g o
//! (h_t, c_t) = cell(gates_t, c_{t−1})                (see [`crate::lstm_cell`])
//! ```
//!
//! The input's share `x_t·W_ihᵀ + b` does not depend on the previous step, so it is computed for
//! every step in one matrix product before the loop; only `h_{t−1}·W_hhᵀ` and the cell remain
//! inside it. That loop is the LSTM's nature: step `t` needs step `t−1`, so an LSTM cannot
//! process a sequence in one parallel pass as the Transformer does.
//!
//! Sources are expected without padding (the continuation task has equal-length sources); the
//! target padding mask is honoured by the loss.

use crate::lstm_bptt::lstm_recurrence;
use crate::lstm_cell::LstmState;
use candle_core::{bail, DType, Result, Tensor};
use candle_nn::VarBuilder;
use shared::batching::Seq2SeqBatch;
use shared::kernels::OpImpl;
use shared::params::{linear, normal, uniform, weight, zeros};

/// Sizes of the LSTM baseline.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LstmConfig {
    pub vocab_size: usize,
    pub d_embed: usize,
    pub hidden: usize,
    pub n_layers: usize,
}

/// One LSTM layer. Parameters (PyTorch's layout): `w_ih (4·hidden, d_in)`, `w_hh (4·hidden,
/// hidden)`, drawn from `U(−√(6/fan_in), √(6/fan_in))` (He's uniform initialisation, the
/// one candle-nn's LSTM uses), and the biases `b_ih`, `b_hh (4·hidden)` (zeros;
/// only their sum acts, as in PyTorch).
#[derive(Debug, Clone)]
pub struct LstmLayer {
    pub w_ih: Tensor,
    pub w_hh: Tensor,
    pub b_ih: Tensor,
    pub b_hh: Tensor,
}

impl LstmLayer {
    pub fn new(vb: VarBuilder, d_in: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            w_ih: uniform(&vb, (4 * hidden, d_in), "w_ih", (6.0 / d_in as f64).sqrt())?,
            w_hh: uniform(
                &vb,
                (4 * hidden, hidden),
                "w_hh",
                (6.0 / hidden as f64).sqrt(),
            )?,
            b_ih: zeros(&vb, 4 * hidden, "b_ih")?,
            b_hh: zeros(&vb, 4 * hidden, "b_hh")?,
        })
    }

    pub fn hidden(&self) -> usize {
        self.w_hh.dim(1).expect("w_hh is (4·hidden, hidden)")
    }

    /// Runs the layer over the time-major `x (len, batch, d_in)` from `init` (zeros when `None`);
    /// returns the hidden states of every step `(len, batch, hidden)` and the final state.
    ///
    /// `Composed` runs the loop below, step by step, and leaves the gradients to autograd;
    /// `Fused` runs the same loop with the fused cell and backpropagates through time by hand
    /// ([`crate::lstm_bptt`]). Same values, same gradients.
    pub fn forward(
        &self,
        x: &Tensor,
        init: Option<&LstmState>,
        cell: OpImpl,
    ) -> Result<(Tensor, LstmState)> {
        let (len, batch, _) = x.dims3()?;
        // The input's share of every gate at every step, in one product: (len, batch, 4·hidden).
        let from_input = shared::bias::add_bias(&linear(x, &self.w_ih)?, &self.bias(x.dtype())?)?;
        let w_hh = self.w_hh.to_dtype(x.dtype())?; // mixed precision: the weight in the compute dtype
        let init = match init {
            Some(s) => s.clone(),
            None => LstmState::zeros(batch, self.hidden(), x)?,
        };
        if cell == OpImpl::Fused {
            let hc = lstm_recurrence(
                &from_input,
                &w_hh,
                &init,
                LstmState::cell_on(cell, x.device()),
            )?;
            let (h, c) = (hc.get(0)?, hc.get(1)?); // (len, batch, hidden) each
            let last = LstmState {
                h: h.get(len - 1)?,
                c: c.get(len - 1)?,
            };
            return Ok((h, last));
        }
        let mut state = init;
        let mut outputs = Vec::with_capacity(len);
        for t in 0..len {
            let gates = (from_input.get(t)? + linear(&state.h, &w_hh)?)?; // (batch, 4·hidden)
            state = state.next(&gates, LstmState::cell_on(cell, x.device()))?;
            outputs.push(state.h.clone());
        }
        Ok((Tensor::stack(&outputs, 0)?, state))
    }

    /// One step for `x (batch, d_in)` (generation).
    pub fn step(&self, x: &Tensor, state: &LstmState, cell: OpImpl) -> Result<LstmState> {
        let gates = (shared::bias::add_bias(&linear(x, &self.w_ih)?, &self.bias(x.dtype())?)?
            + linear(&state.h, &self.w_hh)?)?;
        state.next(&gates, LstmState::cell_on(cell, x.device()))
    }

    /// `b_ih + b_hh (4·hidden)` in `dtype` (the compute dtype under mixed precision).
    fn bias(&self, dtype: DType) -> Result<Tensor> {
        (&self.b_ih + &self.b_hh)?.to_dtype(dtype)
    }
}

/// LSTM encoder–decoder. Parameters: `token_embedding`, `encoder.<i>.*`, `decoder.<i>.*`
/// ([`LstmLayer`]), `lm_head (vocab, hidden)`. `cell` says how the layers run (the same values
/// and gradients either way, see [`LstmLayer::forward`]) and `compute_dtype` in which dtype:
/// execution, not part of the model.
pub struct LstmSeq2Seq {
    pub cfg: LstmConfig,
    pub token_embedding: Tensor,
    pub encoder: Vec<LstmLayer>,
    pub decoder: Vec<LstmLayer>,
    pub lm_head: Tensor,
    pub cell: OpImpl,
    /// The activations' dtype: the parameters' own, or bf16 over f32 parameters (mixed
    /// precision: every weight is cast where it is used; gradients and AdamW stay in f32).
    pub compute_dtype: DType,
}

impl LstmSeq2Seq {
    /// The model of `cfg`, run `Fused` (the fused cell and backpropagation through time by hand).
    pub fn new(vb: VarBuilder, cfg: LstmConfig) -> Result<Self> {
        if cfg.n_layers == 0 || cfg.hidden == 0 || cfg.d_embed == 0 || cfg.vocab_size == 0 {
            bail!("LstmConfig: sizes must be positive: {cfg:?}");
        }
        let stack = |prefix: &str| -> Result<Vec<LstmLayer>> {
            (0..cfg.n_layers)
                .map(|i| {
                    let d_in = if i == 0 { cfg.d_embed } else { cfg.hidden };
                    LstmLayer::new(vb.pp(format!("{prefix}.{i}")), d_in, cfg.hidden)
                })
                .collect()
        };
        Ok(Self {
            cfg,
            token_embedding: normal(&vb, (cfg.vocab_size, cfg.d_embed), "token_embedding", 1.0)?,
            encoder: stack("encoder")?,
            decoder: stack("decoder")?,
            lm_head: weight(&vb, cfg.vocab_size, cfg.hidden, "lm_head")?,
            cell: OpImpl::Fused,
            compute_dtype: vb.dtype(),
        })
    }

    /// The same model with the cell computed `cell`.
    pub fn with_cell(self, cell: OpImpl) -> Self {
        Self { cell, ..self }
    }

    /// The same model computing in `dtype` (bf16 over f32 parameters: mixed precision).
    pub fn with_compute_dtype(self, compute_dtype: DType) -> Self {
        Self {
            compute_dtype,
            ..self
        }
    }

    fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (_, n) = tokens.dims2()?;
        if n == 0 {
            bail!("empty sequence");
        }
        shared::embedding(&self.token_embedding, tokens)?.to_dtype(self.compute_dtype)
        // (b, n, d_embed)
    }

    /// Runs a stack of layers over `x (batch, len, d)`, starting layer `i` from `init[i]` (or
    /// zeros); returns the top layer's outputs `(batch, len, hidden)` and each layer's final state.
    /// Inside the stack the sequence is time-major, `(len, batch, ·)`, so that step `t` is one
    /// contiguous block.
    fn run_stack(
        &self,
        stack: &[LstmLayer],
        x: &Tensor,
        init: Option<&[LstmState]>,
    ) -> Result<(Tensor, Vec<LstmState>)> {
        let mut x = x.transpose(0, 1)?.contiguous()?; // (len, batch, d)
        let mut finals = Vec::with_capacity(stack.len());
        for (i, layer) in stack.iter().enumerate() {
            let (out, last) = layer.forward(&x, init.map(|s| &s[i]), self.cell)?;
            x = out;
            finals.push(last);
        }
        Ok((x.transpose(0, 1)?, finals))
    }

    /// Teacher-forced logits `(batch, T, vocab)`.
    pub fn forward(&self, batch: &Seq2SeqBatch) -> Result<Tensor> {
        let (_, source_state) = self.run_stack(&self.encoder, &self.embed(&batch.src)?, None)?;
        let (h, _) = self.run_stack(
            &self.decoder,
            &self.embed(&batch.tgt_in)?,
            Some(&source_state),
        )?;
        shared::linear(&h, &self.lm_head)
    }

    pub fn loss(&self, batch: &Seq2SeqBatch) -> Result<Tensor> {
        shared::train::cross_entropy(&self.forward(batch)?, &batch.tgt_out, Some(&batch.tgt_mask))
    }

    /// Greedy or sampled continuation of one source, one LSTM step per token.
    pub fn generate(
        &self,
        src: &[u32],
        bos: u32,
        max_new: usize,
        temperature: f64,
        seed: u64,
    ) -> Result<Vec<u32>> {
        use rand::SeedableRng;
        let dev = self.token_embedding.device();
        let src_t = Tensor::new(src, dev)?.unsqueeze(0)?;
        let (_, mut state) = self.run_stack(&self.encoder, &self.embed(&src_t)?, None)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut token = bos;
        let mut out = Vec::with_capacity(max_new);
        for _ in 0..max_new {
            let mut x = self
                .embed(&Tensor::new(&[token], dev)?.unsqueeze(0)?)?
                .squeeze(1)?; // (1, d_embed)
            for (i, layer) in self.decoder.iter().enumerate() {
                state[i] = layer.step(&x, &state[i], self.cell)?;
                x = state[i].h.clone();
            }
            let logits = shared::linear(&x, &self.lm_head)?
                .squeeze(0)?
                .to_dtype(DType::F32)?;
            token = crate::sample_token(&logits, temperature, &mut rng)?;
            out.push(token);
        }
        Ok(out)
    }
}

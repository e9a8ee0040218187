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

use crate::lstm_cell::LstmState;
use candle_core::{bail, DType, Result, Tensor};
use candle_nn::VarBuilder;
use shared::batching::Seq2SeqBatch;
use shared::kernels::OpImpl;
use shared::params::{linear, normal, weight, zeros};

/// Sizes of the LSTM baseline.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LstmConfig {
    pub vocab_size: usize,
    pub d_embed: usize,
    pub hidden: usize,
    pub n_layers: usize,
}

/// One LSTM layer. Parameters: `w_ih (4·hidden, d_in)`, `w_hh (4·hidden, hidden)` (Glorot
/// initialisation, as every projection of the module) and `bias (4·hidden)` (zeros).
#[derive(Debug, Clone)]
pub struct LstmLayer {
    pub w_ih: Tensor,
    pub w_hh: Tensor,
    pub bias: Tensor,
}

impl LstmLayer {
    pub fn new(vb: VarBuilder, d_in: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            w_ih: weight(&vb, 4 * hidden, d_in, "w_ih")?,
            w_hh: weight(&vb, 4 * hidden, hidden, "w_hh")?,
            bias: zeros(&vb, 4 * hidden, "bias")?,
        })
    }

    pub fn hidden(&self) -> usize {
        self.w_hh.dim(1).expect("w_hh is (4·hidden, hidden)")
    }

    /// Runs the layer over `x (batch, len, d_in)` from `init` (zeros when `None`); returns the
    /// hidden states of every step `(batch, len, hidden)` and the final state.
    pub fn forward(
        &self,
        x: &Tensor,
        init: Option<&LstmState>,
        cell: OpImpl,
    ) -> Result<(Tensor, LstmState)> {
        let (batch, len, _) = x.dims3()?;
        let from_input = linear(x, &self.w_ih)?.broadcast_add(&self.bias)?; // (batch, len, 4·hidden)
        let from_input = from_input.transpose(0, 1)?.contiguous()?; // (len, batch, 4·hidden)
        let mut state = match init {
            Some(s) => s.clone(),
            None => LstmState::zeros(batch, self.hidden(), x)?,
        };
        let mut outputs = Vec::with_capacity(len);
        for t in 0..len {
            let gates = (from_input.get(t)? + linear(&state.h, &self.w_hh)?)?; // (batch, 4·hidden)
            state = state.next(&gates, cell)?;
            outputs.push(state.h.clone());
        }
        Ok((Tensor::stack(&outputs, 1)?, state))
    }

    /// One step for `x (batch, d_in)` (generation).
    pub fn step(&self, x: &Tensor, state: &LstmState, cell: OpImpl) -> Result<LstmState> {
        let gates =
            (linear(x, &self.w_ih)?.broadcast_add(&self.bias)? + linear(&state.h, &self.w_hh)?)?;
        state.next(&gates, cell)
    }
}

/// LSTM encoder–decoder. Parameters: `token_embedding`, `encoder.<i>.*`, `decoder.<i>.*`
/// ([`LstmLayer`]), `lm_head (vocab, hidden)`. `cell` says how the cell runs (fused or composed,
/// the same values): execution, not part of the model.
pub struct LstmSeq2Seq {
    pub cfg: LstmConfig,
    pub token_embedding: Tensor,
    pub encoder: Vec<LstmLayer>,
    pub decoder: Vec<LstmLayer>,
    pub lm_head: Tensor,
    pub cell: OpImpl,
}

impl LstmSeq2Seq {
    /// The model of `cfg`, with the fastest cell for the builder's device.
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
            cell: LstmState::cell_for(vb.device()),
        })
    }

    /// The same model with the cell computed `cell`.
    pub fn with_cell(self, cell: OpImpl) -> Self {
        Self { cell, ..self }
    }

    fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (_, n) = tokens.dims2()?;
        if n == 0 {
            bail!("empty sequence");
        }
        shared::embedding(&self.token_embedding, tokens) // (b, n, d_embed)
    }

    /// Runs a stack of layers over `x (batch, len, d)`, starting layer `i` from `init[i]` (or
    /// zeros); returns the top layer's outputs `(batch, len, hidden)` and each layer's final state.
    fn run_stack(
        &self,
        stack: &[LstmLayer],
        x: &Tensor,
        init: Option<&[LstmState]>,
    ) -> Result<(Tensor, Vec<LstmState>)> {
        let mut x = x.clone();
        let mut finals = Vec::with_capacity(stack.len());
        for (i, layer) in stack.iter().enumerate() {
            let (out, last) = layer.forward(&x, init.map(|s| &s[i]), self.cell)?;
            x = out;
            finals.push(last);
        }
        Ok((x, finals))
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

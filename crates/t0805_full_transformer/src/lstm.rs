//! The baseline: an LSTM encoder–decoder (Sutskever et al., 2014), the sequence-to-sequence model
//! the Transformer replaced. The encoder reads the source one token at a time and hands its final
//! `(h, c)` state to the decoder, which must squeeze the whole source through that one vector.
//!
//! The LSTM cell itself is candle-nn's (it is Module 7's topic); the embedding and the output head
//! are raw parameters as everywhere else. Note the loop over time steps: step `t` needs step `t−1`,
//! so an LSTM cannot process a sequence in one parallel pass as the Transformer does.
//!
//! Sources are expected without padding (the continuation task has equal-length sources); the
//! target padding mask is honoured by the loss.

use candle_core::{bail, DType, Result, Tensor};
use candle_nn::rnn::{LSTMConfig, LSTMState, LSTM, RNN};
use candle_nn::VarBuilder;
use shared::batching::Seq2SeqBatch;
use shared::params::{normal, weight};

/// Sizes of the LSTM baseline.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LstmConfig {
    pub vocab_size: usize,
    pub d_embed: usize,
    pub hidden: usize,
    pub n_layers: usize,
}

/// LSTM encoder–decoder. Parameters: `token_embedding`, `encoder.<i>.*`, `decoder.<i>.*`
/// (candle-nn's LSTM names), `lm_head (vocab, hidden)`.
pub struct LstmSeq2Seq {
    pub cfg: LstmConfig,
    pub token_embedding: Tensor,
    pub encoder: Vec<LSTM>,
    pub decoder: Vec<LSTM>,
    pub lm_head: Tensor,
}

impl LstmSeq2Seq {
    pub fn new(vb: VarBuilder, cfg: LstmConfig) -> Result<Self> {
        if cfg.n_layers == 0 || cfg.hidden == 0 {
            bail!("LstmConfig: n_layers and hidden must be positive: {cfg:?}");
        }
        let stack = |prefix: &str| -> Result<Vec<LSTM>> {
            (0..cfg.n_layers)
                .map(|i| {
                    let d_in = if i == 0 { cfg.d_embed } else { cfg.hidden };
                    candle_nn::lstm(
                        d_in,
                        cfg.hidden,
                        LSTMConfig::default(),
                        vb.pp(format!("{prefix}.{i}")),
                    )
                })
                .collect()
        };
        Ok(Self {
            cfg,
            token_embedding: normal(&vb, (cfg.vocab_size, cfg.d_embed), "token_embedding", 1.0)?,
            encoder: stack("encoder")?,
            decoder: stack("decoder")?,
            lm_head: weight(&vb, cfg.vocab_size, cfg.hidden, "lm_head")?,
        })
    }

    fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (_, n) = tokens.dims2()?;
        if n == 0 {
            bail!("empty sequence");
        }
        shared::embedding(&self.token_embedding, tokens) // (b, n, d_embed)
    }

    /// Runs a stack of LSTMs over `x (batch, len, d)`, starting layer `i` from `init[i]` (or zeros);
    /// returns the top layer's outputs `(batch, len, hidden)` and each layer's final state.
    fn run_stack(
        stack: &[LSTM],
        x: &Tensor,
        init: Option<&[LSTMState]>,
    ) -> Result<(Tensor, Vec<LSTMState>)> {
        let mut x = x.clone();
        let mut finals = Vec::with_capacity(stack.len());
        for (i, layer) in stack.iter().enumerate() {
            let states = match init {
                Some(s) => layer.seq_init(&x, &s[i])?,
                None => layer.seq(&x)?,
            };
            x = layer.states_to_tensor(&states)?; // (batch, len, hidden)
            finals.push(states.last().expect("non-empty sequence").clone());
        }
        Ok((x, finals))
    }

    /// Teacher-forced logits `(batch, T, vocab)`.
    pub fn forward(&self, batch: &Seq2SeqBatch) -> Result<Tensor> {
        let (_, source_state) = Self::run_stack(&self.encoder, &self.embed(&batch.src)?, None)?;
        let (h, _) = Self::run_stack(
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
        let (_, mut state) = Self::run_stack(&self.encoder, &self.embed(&src_t)?, None)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut token = bos;
        let mut out = Vec::with_capacity(max_new);
        for _ in 0..max_new {
            let mut x = self
                .embed(&Tensor::new(&[token], dev)?.unsqueeze(0)?)?
                .squeeze(1)?; // (1, d_embed)
            for (i, layer) in self.decoder.iter().enumerate() {
                state[i] = layer.step(&x, &state[i])?;
                x = state[i].h().clone();
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

//! # 8-05 · The full Transformer: encoder–decoder
//!
//! Vaswani et al. (2017) in one struct. The **encoder** reads the whole source at once
//! (bidirectional self-attention, padding masked); the **decoder** writes the target one token at a
//! time, attending causally to what it has written and, through **cross-attention**, to every
//! encoder output:
//!
//! ```text
//! memory = Encoderᴺ(Embed(src) + PE)                       (batch, src_len, d_model)
//! h      = Decoderᴺ(Embed(tgt_in) + PE, memory)            (batch, tgt_len, d_model)
//! logits = h · W_headᵀ                                      (batch, tgt_len, vocab)
//! ```
//!
//! Masks (`u8`, 1 = may attend):
//! * encoder self-attention and decoder cross-attention: the source padding mask `(batch,1,1,src)`;
//! * decoder self-attention: causal `(tgt, tgt)` AND the target padding mask `(batch,1,1,tgt)`;
//! * the loss: only real target tokens (padding gets no loss).
//!
//! During training the decoder is **teacher-forced**: its input is `<s>` followed by the target
//! shifted right, and all positions are predicted in one parallel pass. At inference it runs
//! autoregressively ([`Transformer::generate`]). The LSTM baseline is in [`lstm`] (its cell in [`lstm_cell`]), the WikiText-2
//! continuation task in [`task`].

pub mod lstm;
pub mod lstm_bptt;
pub mod lstm_cell;
pub mod main_job;
pub mod task;

use candle_core::{bail, DType, Result, Tensor, D};
use candle_nn::VarBuilder;
use rand::{rngs::StdRng, Rng, SeedableRng};
use shared::batching::Seq2SeqBatch;
use shared::kernels::Kernels;
use shared::params::{normal, weight};
use t0802_multi_head_attention::{AttnMask, KeyPadding};
use t0803_positional_encoding::sinusoidal;
use t0804_transformer_block::{
    Activation, BlockConfig, DecoderBlock, EncoderBlock, Layer, NormPlacement, Parts,
};

/// Shape of the encoder–decoder model.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TransformerConfig {
    /// One BPE vocabulary for source and target (the embedding table is shared).
    pub vocab_size: usize,
    /// Longest source or target the model accepts.
    pub max_len: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub d_ff: usize,
    pub n_encoder_layers: usize,
    pub n_decoder_layers: usize,
    pub placement: NormPlacement,
}

impl TransformerConfig {
    pub fn block(&self) -> BlockConfig {
        BlockConfig {
            d_model: self.d_model,
            n_heads: self.n_heads,
            d_ff: self.d_ff,
            activation: Activation::Gelu,
            placement: self.placement,
            bias: true,
            eps: 1e-5,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.block().mha().d_head()?;
        if self.vocab_size == 0
            || self.max_len == 0
            || self.n_encoder_layers == 0
            || self.n_decoder_layers == 0
        {
            bail!("TransformerConfig: sizes must be positive: {self:?}");
        }
        Ok(())
    }
}

/// The encoder–decoder Transformer. Parameters: `token_embedding (vocab, d_model)`,
/// `encoder.<i>.*`, `decoder.<i>.*` (see t0804's blocks), `encoder_norm.*`, `decoder_norm.*`
/// (pre-norm only), `lm_head (vocab, d_model)`.
///
/// How its norms and attention run is a rung's [`Parts`] ([`Transformer::with_parts`]): this
/// topic's composed LayerNorm and naive attention by default; with 8-06's and 8-09's parts (from
/// `t0810_kv_cache`'s `main_job` example) the fused LayerNorm and FlashAttention over the key
/// padding. Same parameters and values either way.
pub struct Transformer {
    pub cfg: TransformerConfig,
    pub token_embedding: Tensor,
    pub encoder: Vec<EncoderBlock>,
    pub decoder: Vec<DecoderBlock>,
    pub encoder_norm: Option<Box<dyn Layer>>,
    pub decoder_norm: Option<Box<dyn Layer>>,
    pub lm_head: Tensor,
    /// The activations' dtype: the parameters' own, or bf16 over f32 parameters (mixed
    /// precision: every weight is cast where it is used; gradients and AdamW stay in f32).
    pub compute_dtype: DType,
}

impl Transformer {
    /// The model with this topic's parts: composed LayerNorm, naive attention.
    pub fn new(vb: VarBuilder, cfg: TransformerConfig) -> Result<Self> {
        Self::with_parts(
            vb,
            cfg,
            &t0804_transformer_block::parts(Kernels::composed()),
        )
    }

    /// The model with a rung's parts (its norms and attention kernel).
    pub fn with_parts(vb: VarBuilder, cfg: TransformerConfig, parts: &dyn Parts) -> Result<Self> {
        cfg.validate()?;
        let b = cfg.block();
        let encoder = (0..cfg.n_encoder_layers)
            .map(|i| EncoderBlock::with_parts(vb.pp(format!("encoder.{i}")), &b, parts))
            .collect::<Result<_>>()?;
        let decoder = (0..cfg.n_decoder_layers)
            .map(|i| DecoderBlock::with_parts(vb.pp(format!("decoder.{i}")), &b, parts))
            .collect::<Result<_>>()?;
        let final_norm = |name: &str| -> Result<Option<Box<dyn Layer>>> {
            match cfg.placement {
                NormPlacement::Pre => Ok(Some(parts.norm(vb.pp(name), &b.as_lm_block())?)),
                NormPlacement::Post => Ok(None),
            }
        };
        Ok(Self {
            cfg,
            // σ = 1/√d_model: after the √d_model scaling of `embed`, token vectors have unit-size entries.
            token_embedding: normal(
                &vb,
                (cfg.vocab_size, cfg.d_model),
                "token_embedding",
                1.0 / (cfg.d_model as f64).sqrt(),
            )?,
            encoder,
            decoder,
            encoder_norm: final_norm("encoder_norm")?,
            decoder_norm: final_norm("decoder_norm")?,
            lm_head: weight(&vb, cfg.vocab_size, cfg.d_model, "lm_head")?,
            compute_dtype: vb.dtype(),
        })
    }

    /// The same model computing in `dtype` (bf16 over f32 parameters: mixed precision).
    pub fn with_compute_dtype(self, compute_dtype: DType) -> Self {
        Self {
            compute_dtype,
            ..self
        }
    }

    /// `tokens (batch, len)` → `√d_model · E[tokens] + PE (batch, len, d_model)`.
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        self.embed_at(tokens, 0)
    }

    /// [`Self::embed`] of tokens whose first sits at position `start` (cached decoding, 8-10).
    pub fn embed_at(&self, tokens: &Tensor, start: usize) -> Result<Tensor> {
        let (_, n) = tokens.dims2()?;
        if n == 0 {
            bail!("empty sequence: the source and the target need at least one token");
        }
        if start + n > self.cfg.max_len {
            bail!(
                "sequence of {} tokens is longer than the model's maximum length {}",
                start + n,
                self.cfg.max_len
            );
        }
        let d = self.cfg.d_model;
        let x = (shared::embedding(&self.token_embedding, tokens)?
            .to_dtype(self.compute_dtype)?
            * (d as f64).sqrt())?; // (b, n, d)
        x.broadcast_add(&sinusoidal(n, d, start, tokens.device())?.to_dtype(x.dtype())?)
    }

    /// Encoder: `src (batch, S)` with `src_mask (batch, S)` (1 = real token, padding last) →
    /// memory `(batch, S, d_model)`.
    pub fn encode(&self, src: &Tensor, src_mask: &Tensor) -> Result<Tensor> {
        self.encode_padded(src, &KeyPadding::from_mask(src_mask)?)
    }

    /// [`Self::encode`] with the source's key padding: every self-attention hides the padding.
    pub fn encode_padded(&self, src: &Tensor, src_keys: &KeyPadding) -> Result<Tensor> {
        let mask = AttnMask::Padding {
            keys: src_keys,
            causal: false,
        };
        let mut x = self.embed(src)?;
        for block in &self.encoder {
            x = block.forward_masked(&x, mask)?;
        }
        match &self.encoder_norm {
            Some(n) => n.forward(&x),
            None => Ok(x),
        }
    }

    /// Decoder: `tgt_in (batch, T)` attending to `memory` → logits `(batch, T, vocab)`.
    pub fn decode(
        &self,
        tgt_in: &Tensor,
        tgt_mask: &Tensor,
        memory: &Tensor,
        src_mask: &Tensor,
    ) -> Result<Tensor> {
        let tgt_keys = KeyPadding::from_mask(tgt_mask)?;
        self.decode_padded(tgt_in, &tgt_keys, memory, &KeyPadding::from_mask(src_mask)?)
    }

    /// [`Self::decode`] with the target's and the source's key padding: the self-attention is
    /// causal over the real target tokens, the cross-attention sees the real source tokens.
    pub fn decode_padded(
        &self,
        tgt_in: &Tensor,
        tgt_keys: &KeyPadding,
        memory: &Tensor,
        src_keys: &KeyPadding,
    ) -> Result<Tensor> {
        let self_mask = AttnMask::Padding {
            keys: tgt_keys,
            causal: true,
        };
        let memory_mask = AttnMask::Padding {
            keys: src_keys,
            causal: false,
        };
        let mut x = self.embed(tgt_in)?;
        for block in &self.decoder {
            let memory_kv = block.cross_attn.project_kv(memory)?;
            x = block.forward_with(&x, &memory_kv, self_mask, memory_mask, None)?;
        }
        let x = match &self.decoder_norm {
            Some(n) => n.forward(&x)?,
            None => x,
        };
        shared::linear(&x, &self.lm_head)
    }

    /// Teacher-forced logits for a padded batch (its lengths give the key padding; the masks
    /// are not read back from the device).
    pub fn forward(&self, batch: &Seq2SeqBatch) -> Result<Tensor> {
        let dev = batch.src.device();
        let src_keys = KeyPadding::new(&batch.src_lengths, batch.src.dim(1)?, dev)?;
        let tgt_keys = KeyPadding::new(&batch.tgt_lengths, batch.tgt_in.dim(1)?, dev)?;
        let memory = self.encode_padded(&batch.src, &src_keys)?;
        self.decode_padded(&batch.tgt_in, &tgt_keys, &memory, &src_keys)
    }

    /// Mean cross-entropy over the real target tokens.
    pub fn loss(&self, batch: &Seq2SeqBatch) -> Result<Tensor> {
        shared::train::cross_entropy(&self.forward(batch)?, &batch.tgt_out, Some(&batch.tgt_mask))
    }

    /// Autoregressive decoding of one source (no padding): greedy when `temperature` is 0, else
    /// sampling from `softmax(logits / temperature)` with a seeded generator. Each step re-runs the
    /// decoder on the whole prefix (8-10 removes that cost with a KV cache).
    pub fn generate(
        &self,
        src: &[u32],
        bos: u32,
        max_new: usize,
        temperature: f64,
        seed: u64,
    ) -> Result<Vec<u32>> {
        let dev = self.token_embedding.device();
        if src.is_empty() {
            bail!("empty sequence: the source and the target need at least one token");
        }
        let src_t = Tensor::new(src, dev)?.unsqueeze(0)?;
        let src_keys = KeyPadding::new(&[src.len()], src.len(), dev)?; // one source, no padding
        let memory = self.encode_padded(&src_t, &src_keys)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = vec![bos];
        for _ in 0..max_new.min(self.cfg.max_len) {
            let tgt = Tensor::new(out.as_slice(), dev)?.unsqueeze(0)?;
            let tgt_keys = KeyPadding::new(&[out.len()], out.len(), dev)?;
            let logits = self.decode_padded(&tgt, &tgt_keys, &memory, &src_keys)?;
            let last = logits.get(0)?.get(out.len() - 1)?.to_dtype(DType::F32)?;
            out.push(sample_token(&last, temperature, &mut rng)?);
        }
        Ok(out[1..].to_vec())
    }
}

/// Picks a token from `logits (vocab,)`: argmax when `temperature` ≤ 0, else a draw from
/// `softmax(logits / temperature)`.
pub fn sample_token(logits: &Tensor, temperature: f64, rng: &mut StdRng) -> Result<u32> {
    if temperature <= 0.0 {
        return logits.argmax(D::Minus1)?.to_scalar::<u32>();
    }
    let probs =
        t0801_self_attention::softmax_last_dim(&(logits / temperature)?)?.to_vec1::<f32>()?;
    let r: f32 = rng.random();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if r < acc {
            return Ok(i as u32);
        }
    }
    Ok((probs.len() - 1) as u32)
}

/// A named experiment size: the model shapes of both contenders and the training budget.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Preset {
    pub name: &'static str,
    pub vocab: usize,
    pub src_len: usize,
    pub tgt_len: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    pub lstm_hidden: usize,
    pub lstm_layers: usize,
    pub batch: usize,
    pub steps: usize,
    pub lr: f64,
}

impl Preset {
    /// `cpu` (the default: minutes on 2 cores), `full` (a real model for a GPU), `quick` (smoke test).
    pub fn by_name(name: &str) -> anyhow::Result<Self> {
        let p = match name {
            "quick" => Preset {
                name: "quick",
                vocab: 1024,
                src_len: 24,
                tgt_len: 16,
                d_model: 64,
                n_heads: 4,
                n_layers: 1,
                lstm_hidden: 96,
                lstm_layers: 1,
                batch: 8,
                steps: 30,
                lr: 2e-3,
            },
            "cpu" => Preset {
                name: "cpu",
                vocab: 4096,
                src_len: 48,
                tgt_len: 32,
                d_model: 128,
                n_heads: 4,
                n_layers: 2,
                lstm_hidden: 256,
                lstm_layers: 2,
                batch: 16,
                steps: 600,
                lr: 1e-3,
            },
            "full" => Preset {
                name: "full",
                vocab: 8192,
                src_len: 128,
                tgt_len: 64,
                d_model: 512,
                n_heads: 8,
                n_layers: 6,
                lstm_hidden: 1024,
                lstm_layers: 2,
                batch: 64,
                // About 14 minutes on one H200 for both models: the measured 400-step run took
                // 305 s, 53 s of it fixed (data, evaluation, test, samples) and 0.63 s per step.
                steps: 1200,
                lr: 5e-4,
            },
            other => anyhow::bail!("unknown preset '{other}': choose quick, cpu or full"),
        };
        Ok(p)
    }

    pub fn transformer(&self, vocab_size: usize) -> TransformerConfig {
        TransformerConfig {
            vocab_size,
            max_len: self.src_len.max(self.tgt_len),
            d_model: self.d_model,
            n_heads: self.n_heads,
            d_ff: 4 * self.d_model,
            n_encoder_layers: self.n_layers,
            n_decoder_layers: self.n_layers,
            placement: NormPlacement::Pre,
        }
    }

    pub fn lstm(&self, vocab_size: usize) -> lstm::LstmConfig {
        lstm::LstmConfig {
            vocab_size,
            d_embed: self.d_model,
            hidden: self.lstm_hidden,
            n_layers: self.lstm_layers,
        }
    }
}

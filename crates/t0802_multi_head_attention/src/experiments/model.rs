//! The smallest model that can solve the task: embeddings, one multi-head attention layer with a
//! residual, a linear readout; and its evaluation (loss and the accuracy of each relation).

use super::task::{strict_causal_with_sink, Batch, TwoRelations};
use anyhow::Result;
use candle_core::{Device, Tensor, D};
use candle_nn::VarBuilder;
use shared::params::{normal, weight, zeros};
use shared::train::cross_entropy;
use t0802_multi_head_attention::{MhaConfig, MultiHeadAttention};

/// Embeddings (raw tables) → one multi-head attention layer with a residual → linear readout,
/// under the strict causal mask with a BOS sink.
///
/// Parameter names: `tok_emb (V+1, d)`, `pos_emb (T+1, d)`, `attn.{q,k,v,output}_proj`,
/// `readout (2V, d)`, `readout_bias (2V)`.
pub struct Model {
    tok_emb: Tensor,
    pos_emb: Tensor,
    pub attn: MultiHeadAttention,
    readout: Tensor,
    readout_bias: Tensor,
    /// `(T+1, T+1)`, true = may attend.
    mask: Tensor,
}

impl Model {
    pub fn new(vb: VarBuilder, task: TwoRelations, d_model: usize, n_heads: usize) -> Result<Self> {
        let dev = vb.device().clone();
        Ok(Self {
            tok_emb: normal(&vb, (task.vocab + 1, d_model), "tok_emb", 1.0)?,
            pos_emb: normal(&vb, (task.len(), d_model), "pos_emb", 1.0)?,
            attn: MultiHeadAttention::new(vb.pp("attn"), MhaConfig::new(d_model, n_heads))?,
            readout: weight(&vb, 2 * task.vocab, d_model, "readout")?,
            readout_bias: zeros(&vb, 2 * task.vocab, "readout_bias")?,
            mask: strict_causal_with_sink(task.len(), &dev)?,
        })
    }

    /// `tokens (b, l)` → logits `(b, l, 2V)` and attention weights `(b, heads, l, l)`.
    /// `head_gate (heads,)`, if given, scales each head's output (0 = head pruned).
    pub fn forward(&self, tokens: &Tensor, head_gate: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let (_, l) = tokens.dims2()?;
        let tok = shared::embedding(&self.tok_emb, tokens)?; // (b, l, d)
        let x = tok.broadcast_add(&self.pos_emb.narrow(0, 0, l)?)?; // (b, l, d)
        let att = self
            .attn
            .forward_cross(&x, &x, Some(&self.mask), head_gate)?;
        let h = (x + att.output)?; // residual
        let logits = shared::linear_with_bias(&h, &self.readout, &self.readout_bias)?;
        Ok((logits, att.weights))
    }

    /// The masked cross-entropy of `batch` (one value).
    pub fn loss(&self, batch: &Batch) -> Result<Tensor> {
        let (logits, _) = self.forward(&batch.tokens, None)?;
        Ok(cross_entropy(
            &logits,
            &batch.targets,
            Some(&batch.loss_mask),
        )?)
    }

    /// A gate `(heads,)` that switches off head `pruned` and keeps the others.
    pub fn gate_without(&self, pruned: usize, dev: &Device) -> Result<Tensor> {
        let h = self.attn.cfg.n_heads;
        let gate: Vec<f32> = (0..h)
            .map(|i| if i == pruned { 0.0 } else { 1.0 })
            .collect();
        Ok(Tensor::from_vec(gate, h, dev)?)
    }
}

/// Loss and the accuracy of each half of the target on a fixed evaluation set.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Eval {
    pub loss: f64,
    /// Both parts right.
    pub accuracy: f64,
    /// `t_{p−1}` right (the previous-token relation).
    pub prev_accuracy: f64,
    /// The seen-before bit right (the equal-token relation).
    pub seen_accuracy: f64,
}

/// Mean loss over `eval`, and the accuracies over its scored positions `p ≥ 2`; a prediction
/// `a = prev + V·seen` is split into its two parts as `a mod V` and `a div V`.
pub fn evaluate(
    model: &Model,
    eval: &[Batch],
    gate: Option<&Tensor>,
    vocab: usize,
) -> Result<Eval> {
    let (mut loss, mut n, mut both, mut prev, mut seen) = (0.0, 0usize, 0usize, 0usize, 0usize);
    for batch in eval {
        let (logits, _) = model.forward(&batch.tokens, gate)?;
        loss += cross_entropy(&logits, &batch.targets, Some(&batch.loss_mask))?
            .to_scalar::<f32>()? as f64;
        let pred = logits.argmax(D::Minus1)?.to_vec2::<u32>()?;
        let tgt = batch.targets.to_vec2::<u32>()?;
        for (pr, tr) in pred.iter().zip(&tgt) {
            for p in 2..pr.len() {
                let (a, b) = (pr[p] as usize, tr[p] as usize);
                both += usize::from(a == b);
                prev += usize::from(a % vocab == b % vocab);
                seen += usize::from(a / vocab == b / vocab);
                n += 1;
            }
        }
    }
    let n = n as f64;
    Ok(Eval {
        loss: loss / eval.len() as f64,
        accuracy: both as f64 / n,
        prev_accuracy: prev as f64 / n,
        seen_accuracy: seen as f64 / n,
    })
}

//! The small attention model every scheme is trained in, its evaluation at any length, and the
//! permutation test.

use super::task::CopyBack;
use super::Lab;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use shared::params::{truncated_normal, weight};
use shared::train::cross_entropy;
use std::sync::Arc;
use t0802_multi_head_attention::{MhaConfig, MultiHeadAttention, PositionPlug};
use t0803_positional_encoding::{PositionConfig, PositionScheme, Positions};

/// Token embeddings → positions → `layers` × (x + MHA(x)) → readout. No causal mask: the model
/// sees the whole sequence, so only the position scheme can tell it about order.
///
/// Parameter names: `token_embeddings (vocab, d)`, `layers.{l}.attn.*`, `readout (vocab, d)`,
/// `positions.*` (the scheme's table, if any).
pub struct Model {
    embed: Tensor,
    pub positions: Positions,
    layers: Vec<MultiHeadAttention>,
    readout: Tensor,
}

impl Model {
    /// A model for `scheme` with a learned table of `2L` rows and relative buckets up to `L`.
    pub fn new(vb: VarBuilder, lab: &Lab, scheme: PositionScheme) -> Result<Self> {
        let d = lab.d_model;
        let mut pcfg = PositionConfig::new(scheme, d, lab.n_heads, 2 * lab.train_len);
        // T5's rule: offsets ≥ max_distance share the last bucket. Setting it to the training length
        // makes that bucket one that training has seen, so any longer offset reuses a trained bias.
        pcfg.max_distance = lab.train_len;
        // Positions are created last, so that the shared parts (embeddings, attention, readout)
        // get the same initial values whatever the scheme.
        let embed = truncated_normal(&vb, (lab.task.vocab, d), "token_embeddings", 1.0)?;
        let layers: Vec<MultiHeadAttention> = (0..lab.layers)
            .map(|l| {
                MultiHeadAttention::new(
                    vb.pp(format!("layers.{l}.attn")),
                    MhaConfig::new(d, lab.n_heads),
                )
            })
            .collect::<candle_core::Result<_>>()?;
        let readout = weight(&vb, lab.task.vocab, d, "readout")?;
        let positions = Positions::new(vb.pp("positions"), &pcfg)?;
        // A relative bias plugs into every layer's attention; absolute schemes act on the input.
        let plug: Option<Arc<dyn PositionPlug>> = match &positions {
            Positions::RelativeBias(r) => Some(Arc::new(r.clone())),
            _ => None,
        };
        let layers = layers
            .into_iter()
            .map(|l| l.with_positions(plug.clone()))
            .collect();
        Ok(Self {
            embed,
            positions,
            layers,
            readout,
        })
    }

    /// `tokens (batch, n)` → logits `(batch, n, vocab)` and each layer's weights `(batch, heads, n, n)`.
    pub fn forward(&self, tokens: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let x = shared::embedding(&self.embed, tokens)?; // (b, n, d)
        let mut x = self.positions.add_to_input(&x, 0)?; // errors beyond a learned table
        let mut weights = Vec::new();
        for layer in &self.layers {
            let att = layer.forward(&x, None)?; // the relative bias, if any, is the layer's plug
            x = (x + att.output)?;
            weights.push(att.weights);
        }
        Ok((shared::linear(&x, &self.readout)?, weights))
    }
}

/// Sequences per evaluation batch.
pub const EVAL_BATCH: usize = 128;

/// Loss and accuracy at one sequence length.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Eval {
    pub len: usize,
    pub accuracy: f64,
    pub loss: f64,
    /// Accuracy at each position `t ≥ shift`, indexed by `t`.
    pub per_position: Vec<f64>,
}

/// Evaluates `model` on `batches × 128` fresh sequences of `len` tokens drawn from `seed`; an
/// error where the scheme has no encoding for a position (the learned table's end).
pub fn evaluate(
    model: &Model,
    task: CopyBack,
    len: usize,
    batches: usize,
    seed: u64,
    dev: &Device,
) -> Result<Eval> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut correct, mut count, mut loss) = (vec![0usize; len], 0usize, 0f64);
    for _ in 0..batches {
        let (x, y, m) = task.batch(&mut rng, EVAL_BATCH, len, dev)?;
        let (logits, _) = model.forward(&x)?;
        loss += cross_entropy(&logits, &y, Some(&m))?.to_scalar::<f32>()? as f64;
        let hit = logits.argmax(D::Minus1)?.eq(&y)?.to_vec2::<u8>()?;
        for row in hit {
            for (t, h) in row.into_iter().enumerate().skip(task.shift) {
                correct[t] += h as usize;
            }
            count += len - task.shift;
        }
    }
    let per_position: Vec<f64> = correct
        .iter()
        .map(|&c| c as f64 / (batches * EVAL_BATCH) as f64)
        .collect();
    Ok(Eval {
        len,
        accuracy: correct.iter().sum::<usize>() as f64 / count as f64,
        loss: loss / batches as f64,
        per_position,
    })
}

/// `max |f(P·x) − P·f(x)| / max |f(x)|` over a batch of 16: 0 (up to rounding) for an
/// equivariant model.
pub fn permutation_gap(
    model: &Model,
    task: CopyBack,
    len: usize,
    seed: u64,
    dev: &Device,
) -> Result<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (x, _, _) = task.batch(&mut rng, 16, len, dev)?;
    let mut perm: Vec<u32> = (0..len as u32).collect();
    perm.shuffle(&mut rng);
    let perm = Tensor::from_vec(perm, len, dev)?;
    let (fx, _) = model.forward(&x)?;
    let (fpx, _) = model.forward(&x.index_select(&perm, 1)?)?;
    let max_abs = |t: Tensor| -> Result<f64> {
        Ok(t.abs()?
            .max_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()? as f64)
    };
    let diff = max_abs((fpx - fx.index_select(&perm, 1)?)?)?;
    Ok(diff / max_abs(fx)?)
}

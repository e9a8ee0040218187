//! Learned absolute position embeddings (BERT, GPT-2): a trained table, one row per position.

use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;
use shared::params::truncated_normal;

/// Initial standard deviation of the table (GPT-2 and BERT use 0.01–0.02): small, so that at
/// initialisation the token embeddings dominate and positions are learned from the data.
pub const LEARNED_INIT_STD: f64 = 0.02;

/// A learned position table `(max_len, d_model)`; row `pos` is added to the token at `pos`.
///
/// Parameter name (checkpoint key): `position_embeddings`. The table has exactly `max_len` rows:
/// a position `≥ max_len` has **no** embedding, and [`LearnedPositions::forward`] returns an error
/// naming it rather than reading out of bounds or wrapping around.
#[derive(Debug, Clone)]
pub struct LearnedPositions {
    /// `(max_len, d_model)`
    pub table: Tensor,
}

impl LearnedPositions {
    /// A fresh table drawn from `N(0, 0.02²)` truncated at ±3σ, or a checkpoint's, through `vb`.
    pub fn new(vb: VarBuilder, max_len: usize, d_model: usize) -> Result<Self> {
        if max_len == 0 || d_model == 0 {
            bail!("LearnedPositions: max_len ({max_len}) and d_model ({d_model}) must be positive");
        }
        Ok(Self {
            table: truncated_normal(
                &vb,
                (max_len, d_model),
                "position_embeddings",
                LEARNED_INIT_STD,
            )?,
        })
    }

    /// From an explicit `(max_len, d_model)` table.
    pub fn from_weights(table: Tensor) -> Result<Self> {
        if table.rank() != 2 || table.elem_count() == 0 {
            bail!("LearnedPositions: the table must be a non-empty (max_len, d_model) matrix, got {:?}", table.dims());
        }
        Ok(Self { table })
    }

    /// The number of positions the table covers (`0 … max_len − 1`).
    pub fn max_len(&self) -> usize {
        self.table.dims()[0]
    }

    pub fn d_model(&self) -> usize {
        self.table.dims()[1]
    }

    /// Checks that positions `offset … offset + seq_len − 1` all have a row.
    pub fn check_range(&self, seq_len: usize, offset: usize) -> Result<()> {
        let max_len = self.max_len();
        if offset + seq_len > max_len {
            let last = offset + seq_len - 1;
            // A plain message (no backtrace attached): it is meant to be printed to the user.
            return Err(candle_core::Error::Msg(format!(
                "position {last} is beyond the learned table of {max_len} positions (0..={}): learned position \
                 embeddings have no row for positions they were not given; use a longer table (and train it), or \
                 a scheme defined for every position (sinusoidal, relative bias, RoPE)",
                max_len - 1
            )));
        }
        Ok(())
    }

    /// The embeddings of positions `offset … offset + seq_len − 1`: `(seq_len, d_model)`, a
    /// differentiable slice of the table (gradients flow into the rows used).
    pub fn forward(&self, seq_len: usize, offset: usize) -> Result<Tensor> {
        self.check_range(seq_len, offset)?;
        self.table.narrow(0, offset, seq_len)
    }
}

//! The experiments of 8-03, one module each, in the order `main` runs them, and what they share:
//! the run ([`Lab`]), the task ([`task`]) and the model ([`model`]).
//!
//! 1. [`sinusoidal`]: the sinusoidal matrix, its waves, and the similarity between positions.
//! 2. [`training`]: the copy-back task learned with no positions, sinusoidal, learned and
//!    relative-bias positions, through `shared::fit`.
//! 3. [`length_generalisation`]: each model at `L`, `2L`, `4L`, against the bag-of-tokens ceiling.
//! 4. [`attention_maps`]: the learned relative bias, and attention maps at `4L`.

pub mod attention_maps;
pub mod length_generalisation;
pub mod model;
pub mod sinusoidal;
pub mod task;
pub mod training;

use candle_core::{DType, Device};
use std::path::PathBuf;
use task::CopyBack;

/// The run: task, model shape, training budget, device and output folder.
pub struct Lab {
    pub task: CopyBack,
    /// Training sequence length `L` (evaluation at `L`, `2L`, `4L`).
    pub train_len: usize,
    pub d_model: usize,
    pub n_heads: usize,
    /// Attention layers.
    pub layers: usize,
    /// Training steps per scheme.
    pub steps: usize,
    /// Sequences per training batch.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Evaluation batches (of 128 sequences) per length.
    pub eval_batches: usize,
    pub seed: u64,
    pub device: Device,
    pub dtype: DType,
    pub out_dir: PathBuf,
}

impl Lab {
    /// The evaluation lengths `[L, 2L, 4L]`.
    pub fn lengths(&self) -> [usize; 3] {
        let l = self.train_len;
        [l, 2 * l, 4 * l]
    }

    /// The seed of the evaluation sequences of length `len` (the same for every scheme).
    pub fn eval_seed(&self, len: usize) -> u64 {
        self.seed + 1000 + len as u64
    }
}

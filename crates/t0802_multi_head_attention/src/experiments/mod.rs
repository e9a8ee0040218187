//! The experiments of 8-02, one module each, in the order `main` runs them, and what they share:
//! the run ([`Lab`]), the task ([`task`]) and the model ([`model`]).
//!
//! 1. [`task_baselines`]: the evaluation set and the losses a model reaches knowing one relation.
//! 2. [`param_counts`]: heads split the width, they do not add parameters.
//! 3. [`training`]: the same model with 1, 2, 4 … heads, trained through `shared::fit`.
//! 4. [`head_roles`]: what each head attends to, its attention map, and the cost of pruning it.

pub mod head_roles;
pub mod model;
pub mod param_counts;
pub mod task;
pub mod task_baselines;
pub mod training;

use candle_core::{DType, Device};
use std::path::PathBuf;
use task::TwoRelations;

/// The run: the task, the model width, the training budget, device and output folder.
pub struct Lab {
    pub task: TwoRelations,
    pub d_model: usize,
    /// Training steps per model.
    pub steps: usize,
    /// Sequences per training batch.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    pub seed: u64,
    pub quick: bool,
    pub device: Device,
    pub dtype: DType,
    pub out_dir: PathBuf,
}

/// Tokens shown as letters A, B, … (then numbers past Z).
pub fn token_name(t: usize) -> String {
    if t < 26 {
        ((b'A' + t as u8) as char).to_string()
    } else {
        t.to_string()
    }
}

/// A loss with 4 decimals, or in scientific notation once it is that small.
pub fn fmt_loss(x: f64) -> String {
    if x.abs() < 1e-3 {
        format!("{x:.2e}")
    } else {
        format!("{x:.4}")
    }
}

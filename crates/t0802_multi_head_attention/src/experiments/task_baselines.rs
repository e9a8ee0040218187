//! The evaluation set, and the reference losses that place a trained model's loss:
//!
//! ```text
//! chance                          ln(2V)      (nothing known)
//! knowing only the seen bit       ln V        (the previous token is a uniform guess)
//! knowing only the previous token H(seen)     (the seen bit is a coin of the measured rate)
//! ```

use super::task::{Batch, SplitMix};
use super::Lab;
use anyhow::Result;
use serde_json::json;
use shared::report::RunReport;

/// Sequences per evaluation batch.
const EVAL_BATCH: usize = 64;

/// Draws the fixed evaluation set (8 batches of 64 sequences with `--quick`, else 32), prints the
/// task's reference losses and records them as `task`.
pub fn run(lab: &Lab, report: &mut RunReport) -> Result<Vec<Batch>> {
    let task = lab.task;
    let mut rng = SplitMix(lab.seed ^ 0xE7A1);
    let n_batches = if lab.quick { 8 } else { 32 };
    let eval: Vec<Batch> = (0..n_batches)
        .map(|_| task.batch(EVAL_BATCH, &mut rng, &lab.device))
        .collect::<Result<_>>()?;
    let seen_rate = task.seen_rate(&eval);
    let h_seen = -(seen_rate * seen_rate.ln() + (1.0 - seen_rate) * (1.0 - seen_rate).ln());
    let chance = (2.0 * task.vocab as f64).ln();
    let without_prev = (task.vocab as f64).ln();
    let sequences = eval.len() * EVAL_BATCH;
    println!(
        "   task: V = {}, T = {}, {sequences} eval sequences; seen-before rate {seen_rate:.3}; chance loss ln(2V) = {chance:.3}, \
         loss knowing only the seen bit = ln V = {without_prev:.3}, knowing only the previous token = H(seen) = {h_seen:.3}",
        task.vocab, task.seq_len,
    );
    report.metric(
        "task",
        json!({"seen_rate": seen_rate, "chance_loss": chance, "loss_without_prev_token": without_prev,
            "loss_without_seen_bit": h_seen, "eval_sequences": sequences}),
    );
    Ok(eval)
}

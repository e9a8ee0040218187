//! What each trained head does, and what it costs to lose it.
//!
//! For every head, measured on the evaluation set: the mean attention weight on the previous
//! position `p − 1` (the positional relation), the mean mass on earlier equal tokens over queries
//! that have one (the content relation) and on the BOS over queries that do not ("nothing
//! found"). Then the head is pruned — its output gated to 0 before `W_o` — and the evaluation
//! repeated: the loss increase is what the others cannot make up for. Each head's map on one
//! example sequence is drawn as a heatmap.

use super::model::{evaluate, Model};
use super::task::{Batch, SplitMix};
use super::training::Trained;
use super::{token_name, Lab};
use anyhow::Result;
use candle_core::{DType, Tensor};
use serde_json::{json, Value};
use shared::report::{bar_chart, heatmap, print_table, RunReport};

/// One head's role: mean weight on `p − 1`, mean mass on earlier equal tokens (queries that have
/// one), mean mass on the BOS (queries that have none).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct HeadRole {
    pub prev_weight: f64,
    pub equal_token_mass: f64,
    pub bos_mass_when_unseen: f64,
}

/// One example sequence `(1, T+1)` and its position labels `"p:token"`.
struct Example {
    tokens: Tensor,
    names: Vec<String>,
}

/// Scores, maps and prunes the heads of every trained model; records `models`.
pub fn run(lab: &Lab, trained: &[Trained], eval: &[Batch], report: &mut RunReport) -> Result<()> {
    let example = example(lab)?;
    println!("   example sequence: {}", example.names.join(" "));
    let mut records = Vec::new();
    let mut bars: Vec<(String, f64)> = Vec::new();
    for t in trained {
        let (heads, increases) = analyse_model(lab, t, eval, &example)?;
        if t.n_heads > 1 {
            bars.extend(
                increases
                    .into_iter()
                    .enumerate()
                    .map(|(h, inc)| (format!("{}h: head {h}", t.n_heads), inc)),
            );
        }
        records.push(json!({"n_heads": t.n_heads, "d_head": lab.d_model / t.n_heads, "model_params": t.n_params,
            "eval": t.final_eval, "train_seconds": t.seconds, "heads": heads, "train_curve": t.curve}));
    }
    if !bars.is_empty() {
        let (labels, values): (Vec<String>, Vec<f64>) = bars.into_iter().unzip();
        bar_chart(
            &lab.out_dir.join("t0802_pruning.png"),
            "Head pruning: eval-loss increase when one head is gated off",
            "Δ loss (nats)",
            &labels,
            &values,
        )?;
    }
    report.metric("models", records);
    Ok(())
}

fn example(lab: &Lab) -> Result<Example> {
    let batch = lab
        .task
        .batch(1, &mut SplitMix(lab.seed ^ 0xF00D), &lab.device)?;
    let names = batch.raw[0]
        .iter()
        .enumerate()
        .map(|(i, &t)| match i {
            0 => "0:BOS".to_string(),
            _ => format!("{i}:{}", token_name(t)),
        })
        .collect();
    Ok(Example {
        tokens: batch.tokens,
        names,
    })
}

/// One model: each head's role, its map on the example, and the cost of pruning it. Prints the
/// table; returns the per-head records and loss increases.
fn analyse_model(
    lab: &Lab,
    t: &Trained,
    eval: &[Batch],
    example: &Example,
) -> Result<(Vec<Value>, Vec<f64>)> {
    println!(
        "\n-- {} head(s): what each head does, and the cost of pruning it",
        t.n_heads
    );
    let roles = head_roles(&t.model, eval)?;
    let (_, weights) = t.model.forward(&example.tokens, None)?; // (1, heads, l, l)
    let (mut rows, mut records, mut increases) = (Vec::new(), Vec::new(), Vec::new());
    for (hi, role) in roles.iter().enumerate() {
        let gate = t.model.gate_without(hi, &lab.device)?;
        let ablated = evaluate(&t.model, eval, Some(&gate), lab.task.vocab)?;
        let increase = ablated.loss - t.final_eval.loss;
        rows.push(vec![
            hi.to_string(),
            format!("{:.3}", role.prev_weight),
            format!("{:.3}", role.equal_token_mass),
            format!("{:.3}", role.bos_mass_when_unseen),
            format!("{increase:+.3}"),
            format!("{:.3}", ablated.prev_accuracy),
            format!("{:.3}", ablated.seen_accuracy),
        ]);
        records
            .push(json!({"head": hi, "role": role, "ablated": ablated, "loss_increase": increase}));
        increases.push(increase);
        let map = weights
            .get(0)?
            .get(hi)?
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?;
        head_map(lab, t.n_heads, hi, role, &map, &example.names)?;
    }
    print_table(
        &[
            "head",
            "weight on p−1",
            "mass on earlier equal tokens",
            "BOS mass (unseen)",
            "Δloss pruned",
            "prev acc pruned",
            "seen acc pruned",
        ],
        &rows,
    );
    Ok((records, increases))
}

/// The heatmap of head `hi`'s weights `(l, l)` on the example: rows queries, columns keys.
fn head_map(
    lab: &Lab,
    n_heads: usize,
    hi: usize,
    role: &HeadRole,
    map: &[Vec<f64>],
    names: &[String],
) -> Result<()> {
    heatmap(
        &lab.out_dir
            .join(format!("t0802_heads{n_heads}_head{hi}.png")),
        &format!(
            "{n_heads} head(s): head {hi} (prev-token weight {:.2}, equal-token mass {:.2})",
            role.prev_weight, role.equal_token_mass
        ),
        "key position : token",
        "query position : token",
        map,
        Some((names, names)),
    )
}

/// Each head's [`HeadRole`], averaged over the scored positions `p ≥ 2` of the evaluation set.
pub fn head_roles(model: &Model, eval: &[Batch]) -> Result<Vec<HeadRole>> {
    let h = model.attn.cfg.n_heads;
    // Per head: sums of [weight on p−1, mass on earlier equal tokens, BOS mass when unseen];
    // counts of [all queries, queries with an earlier equal token, queries without].
    let mut sums = vec![[0.0f64; 3]; h];
    let mut counts = [0usize; 3];
    for batch in eval {
        let (_, w) = model.forward(&batch.tokens, None)?;
        let (b, hh, l, _) = w.dims4()?;
        let w = w
            .to_dtype(DType::F32)?
            .reshape((b * hh, l, l))?
            .to_vec3::<f32>()?; // row b·h + head
        for (bi, seq) in batch.raw.iter().enumerate() {
            for p in 2..l {
                let earlier: Vec<usize> = (1..p).filter(|&j| seq[j] == seq[p]).collect();
                counts[0] += 1;
                counts[if earlier.is_empty() { 2 } else { 1 }] += 1;
                for (hi, s) in sums.iter_mut().enumerate() {
                    let row = &w[bi * h + hi][p];
                    s[0] += row[p - 1] as f64;
                    if earlier.is_empty() {
                        s[2] += row[0] as f64;
                    } else {
                        s[1] += earlier.iter().map(|&j| row[j] as f64).sum::<f64>();
                    }
                }
            }
        }
    }
    Ok(sums
        .iter()
        .map(|s| HeadRole {
            prev_weight: s[0] / counts[0] as f64,
            equal_token_mass: s[1] / counts[1].max(1) as f64,
            bos_mass_when_unseen: s[2] / counts[2].max(1) as f64,
        })
        .collect())
}

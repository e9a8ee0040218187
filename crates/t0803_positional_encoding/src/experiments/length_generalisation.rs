//! Trained at length `L`, evaluated at `L`, `2L` and `4L` on the same fresh sequences for every
//! scheme. The learned table has `2L` rows: at `2L` it runs on rows training never updated, at
//! `4L` it refuses with a clear error. Also measured per model: the permutation gap (0 up to
//! rounding for the model without positions, which is exactly permutation-equivariant), and,
//! per length, the bag-of-tokens ceiling that no equivariant model can beat.

use super::model::{evaluate, permutation_gap, Eval};
use super::training::Trained;
use super::Lab;
use anyhow::Result;
use serde_json::json;
use shared::report::{line_chart, print_table, Axes, RunReport, Series};

/// Monte Carlo samples of the bag-of-tokens ceiling per length.
const CEILING_SAMPLES: usize = 200_000;

/// What the closing summary prints: one table row per scheme plus the ceiling, and the learned
/// table's error beyond its end.
pub struct Generalisation {
    rows: Vec<Vec<String>>,
    learned_error: String,
}

/// One model at every evaluation length.
struct SchemeEval {
    /// The lengths it runs at (a learned table stops at its end).
    evals: Vec<Eval>,
    permutation_gap: f64,
    /// The first line of the error at a length it cannot run at.
    error: Option<String>,
}

/// Evaluates every model at every length, records each scheme, the chance accuracy and the
/// ceilings, and draws accuracy against length and against position.
pub fn run(lab: &Lab, trained: &[Trained], report: &mut RunReport) -> Result<Generalisation> {
    let lengths = lab.lengths();
    println!(
        "-- 3. Evaluation at lengths {lengths:?} (learned table: {} rows)",
        2 * lab.train_len
    );
    let (mut rows, mut by_length, mut by_position) = (Vec::new(), Vec::new(), Vec::new());
    let mut learned_error = String::new();
    for t in trained {
        let name = t.scheme.name();
        let s = evaluate_scheme(lab, t)?;
        learned_error = s.error.clone().unwrap_or(learned_error);
        rows.push(table_row(lab, t, &s));
        by_length.push(Series::new(
            name,
            s.evals.iter().map(|e| (e.len as f64, e.accuracy)).collect(),
        ));
        if let Some(longest) = s.evals.last() {
            by_position.push(position_series(lab, name, longest));
        }
        report.metric(
            name,
            json!({"position_params": t.position_params, "final_train_loss": t.final_loss(),
                "permutation_gap": s.permutation_gap, "train_seconds": t.train_s, "eval": s.evals}),
        );
    }
    report.metric("chance_accuracy", 1.0 / lab.task.vocab as f64);
    rows.push(ceiling_row(lab, report));
    report.metric("learned_beyond_table_error", &learned_error);
    figures(lab, &by_length, &by_position)?;
    Ok(Generalisation {
        rows,
        learned_error,
    })
}

/// The permutation gap at `L` and the evaluation at each length; an evaluation error is printed
/// and kept.
fn evaluate_scheme(lab: &Lab, t: &Trained) -> Result<SchemeEval> {
    let gap = permutation_gap(&t.model, lab.task, lab.train_len, lab.seed + 7, &lab.device)?;
    let (mut evals, mut error) = (Vec::new(), None);
    for len in lab.lengths() {
        match evaluate(
            &t.model,
            lab.task,
            len,
            lab.eval_batches,
            lab.eval_seed(len),
            &lab.device,
        ) {
            Ok(e) => evals.push(e),
            Err(e) => {
                let msg = e.to_string().lines().next().unwrap_or_default().to_string(); // no backtrace
                println!("   {} at length {len}: ERROR: {msg}", t.scheme.name());
                error = Some(msg);
            }
        }
    }
    Ok(SchemeEval {
        evals,
        permutation_gap: gap,
        error,
    })
}

/// `scheme | pos. params | train loss | acc@L | acc@2L | acc@4L | perm. gap | train s`.
fn table_row(lab: &Lab, t: &Trained, s: &SchemeEval) -> Vec<String> {
    let cell = |len: usize| {
        s.evals
            .iter()
            .find(|e| e.len == len)
            .map_or("error".to_string(), |e| format!("{:.3}", e.accuracy))
    };
    let [l1, l2, l4] = lab.lengths();
    vec![
        t.scheme.name().to_string(),
        t.position_params.to_string(),
        format!("{:.3}", t.final_loss().unwrap_or(f64::NAN)),
        cell(l1),
        cell(l2),
        cell(l4),
        format!("{:.1e}", s.permutation_gap),
        format!("{:.1}", t.train_s),
    ]
}

/// Accuracy at each position `t ≥ shift` of the longest length a scheme runs at.
fn position_series(lab: &Lab, name: &str, longest: &Eval) -> Series {
    let points = longest
        .per_position
        .iter()
        .enumerate()
        .skip(lab.task.shift)
        .map(|(p, a)| (p as f64, *a))
        .collect();
    Series::new(format!("{name} (at length {})", longest.len), points)
}

/// The bag-of-tokens ceiling at each length, recorded as `bag_of_tokens_ceiling` and returned
/// as the table's last row.
fn ceiling_row(lab: &Lab, report: &mut RunReport) -> Vec<String> {
    let lengths = lab.lengths();
    let ceilings: Vec<f64> = lengths
        .iter()
        .map(|&len| {
            lab.task
                .bag_of_tokens_ceiling(len, CEILING_SAMPLES, lab.seed)
        })
        .collect();
    let by_length: serde_json::Map<_, _> = lengths
        .iter()
        .zip(&ceilings)
        .map(|(l, c)| (l.to_string(), json!(c)))
        .collect();
    report.metric("bag_of_tokens_ceiling", by_length);
    let mut row = vec!["(bag-of-tokens ceiling)".into(), "-".into(), "-".into()];
    row.extend(ceilings.iter().map(|c| format!("{c:.3}")));
    row.extend(["-".into(), "-".into()]);
    row
}

fn figures(lab: &Lab, by_length: &[Series], by_position: &[Series]) -> Result<()> {
    let l = lab.train_len;
    line_chart(
        &lab.out_dir.join("length_generalisation.png"),
        &format!("Trained at length {l}: accuracy at longer lengths"),
        "evaluation sequence length",
        "accuracy",
        by_length,
        Axes::default(),
    )?;
    line_chart(
        &lab.out_dir.join("accuracy_by_position.png"),
        &format!(
            "Accuracy by position at the longest length each scheme runs (trained on 0..{})",
            l - 1
        ),
        "position t",
        "accuracy",
        by_position,
        Axes::default(),
    )
}

/// The closing table (accuracy of predicting `x[t − shift]` per scheme and length).
pub fn print_summary(lab: &Lab, g: &Generalisation) {
    let chance = 1.0 / lab.task.vocab as f64;
    println!(
        "-- Summary (accuracy of predicting x[t−{}]; chance {chance:.3})",
        lab.task.shift
    );
    let [l1, l2, l4] = lab.lengths();
    let (a1, a2, a4) = (
        format!("acc@{l1}"),
        format!("acc@{l2}"),
        format!("acc@{l4}"),
    );
    let header = [
        "scheme",
        "pos. params",
        "train loss",
        &a1,
        &a2,
        &a4,
        "perm. gap",
        "train s",
    ];
    print_table(&header, &g.rows);
    if !g.learned_error.is_empty() {
        println!("   learned positions beyond the table: {}", g.learned_error);
    }
}

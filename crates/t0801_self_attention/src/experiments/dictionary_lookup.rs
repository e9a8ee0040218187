//! # 1. Attention as a soft dictionary lookup
//!
//! Eight nearly orthogonal keys `(1, 8, 32)`, eight distinct values `(1, 8, 8)`, and eight
//! queries `(1, 8, 32)` that are noisy copies of the keys in a shuffled order. The right answer
//! is known, so we can check that each query retrieves *its* value, and watch how scaling the
//! queries by β (the sharpness, an inverse temperature) turns the soft average into a hard
//! lookup. The weights are `(1, 8, 8)`: one row per query, one column per key. The lookup is
//! then repeated on 256 random dictionaries ([`super::noise_sweep`]).

use super::common::{to_rows, SplitMix};
use super::dictionaries::{Dictionaries, LookupStats, D_K, D_V, M};
use super::noise_sweep;
use super::Summary;
use anyhow::Result;
use candle_core::Device;
use serde_json::{json, Value};
use shared::report::{heatmap, line_chart, print_table, Axes, RunReport, Series};
use std::path::Path;

/// The query scales β of the sharpness sweep.
const BETAS: [f64; 7] = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0];

/// The plain lookup (β = 1) on the single dictionary, and the accuracy on many.
pub struct LookupSummary {
    pub accuracy: f64,
    pub weight_on_target: f64,
    pub value_error: f64,
    pub accuracy_many: f64,
}

impl LookupSummary {
    /// Adds the four lookup rows to the closing summary.
    pub fn summarise(&self, summary: &mut Summary) {
        summary.row("lookup accuracy (β = 1)", format!("{:.3}", self.accuracy));
        let on_target = format!("{:.3}", self.weight_on_target);
        summary.row("weight on intended key (β = 1)", on_target);
        let error = format!("{:.3}", self.value_error);
        summary.row("retrieved-value rel. error (β = 1)", error);
        let many = format!("{:.3}", self.accuracy_many);
        summary.row("accuracy over 256 random dictionaries", many);
    }
}

/// Runs the lookup: one dictionary under the β sweep, then the noise sweep on 256 dictionaries.
pub fn run(
    dev: &Device,
    out_dir: &Path,
    noise: f64,
    seed: u64,
    report: &mut RunReport,
) -> Result<LookupSummary> {
    let mut rng = SplitMix(seed);
    let dict = Dictionaries::sample(1, noise, &mut rng, dev)?;
    let perm = &dict.perms[0];
    let (max_cos, ci, cj) = max_abs_cosine(&to_rows(&dict.keys.squeeze(0)?)?);
    println!(
        "   keys {M}×{D_K} (max |cos| between keys {max_cos:.3}, k{ci} and k{cj}), values {M}×{D_V}, query noise σ = {noise}"
    );
    println!("   query i copies key {perm:?}");
    let sharp = sharpness_sweep(&dict, out_dir)?;
    let many = noise_sweep::run(&mut rng, noise, dev)?;

    let s = sharp.at_one;
    report.metric(
        "lookup",
        json!({
            "n_keys": M, "d_k": D_K, "d_v": D_V, "noise": noise, "max_abs_cos_between_keys": max_cos, "most_similar_keys": [ci, cj],
            "query_copies_key": perm, "accuracy": s.accuracy, "weight_on_target": s.weight_on_target,
            "rel_value_error": s.value_error, "entropy_nats": s.entropy, "weights": sharp.weights_at_one,
            "accuracy_256_dictionaries": many.accuracy_at_noise,
        }),
    );
    report.metric("lookup_sharpness", sharp.points);
    report.metric("lookup_noise_sweep_256_dictionaries", many.points);
    Ok(LookupSummary {
        accuracy: s.accuracy,
        weight_on_target: s.weight_on_target,
        value_error: s.value_error,
        accuracy_many: many.accuracy_at_noise,
    })
}

/// The largest |cosine| between two rows, and which rows.
fn max_abs_cosine(rows: &[Vec<f64>]) -> (f64, usize, usize) {
    let norm = |v: &Vec<f64>| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut best = (0.0, 0, 0);
    for i in 0..rows.len() {
        for j in 0..i {
            let dot: f64 = rows[i].iter().zip(&rows[j]).map(|(a, b)| a * b).sum();
            let cos = (dot / (norm(&rows[i]) * norm(&rows[j]))).abs();
            if cos > best.0 {
                best = (cos, j, i);
            }
        }
    }
    best
}

/// The β sweep: one JSON point per β, and the statistics and `(8, 8)` weights at β = 1.
struct Sharpness {
    points: Vec<Value>,
    at_one: LookupStats,
    weights_at_one: Vec<Vec<f64>>,
}

/// Scales the queries by each β, draws the weight heatmaps at β = ¼, 1, 4, prints the table and
/// draws the sharpness chart.
fn sharpness_sweep(dict: &Dictionaries, out_dir: &Path) -> Result<Sharpness> {
    let mut rows = Vec::new();
    let mut points = Vec::new();
    let mut at_one = None;
    for &beta in &BETAS {
        let (w, s) = dict.lookup_scaled(beta)?;
        let weights = to_rows(&w.squeeze(0)?)?;
        rows.push(vec![
            format!("{beta}"),
            format!("{:.3}", s.accuracy),
            format!("{:.3}", s.weight_on_target),
            format!("{:.3}", s.entropy),
            format!("{:.3}", s.value_error),
        ]);
        points.push(
            json!({"beta": beta, "accuracy": s.accuracy, "weight_on_target": s.weight_on_target,
            "entropy_nats": s.entropy, "rel_value_error": s.value_error}),
        );
        if let Some(file) = heatmap_file(beta) {
            plot_weights(&out_dir.join(file), beta, &weights, &dict.perms[0])?;
        }
        if beta == 1.0 {
            at_one = Some((s, weights));
        }
    }
    println!("   sharpness: queries scaled by β (= dividing the temperature by β); uniform weights have entropy ln 8 = {:.3}", (M as f64).ln());
    print_table(
        &[
            "β",
            "accuracy",
            "weight on intended key",
            "entropy (nats)",
            "value rel. error",
        ],
        &rows,
    );
    plot_sharpness(&out_dir.join("t0801_sharpness.png"), &points)?;
    let (at_one, weights_at_one) = at_one.expect("β = 1 is in the sweep");
    Ok(Sharpness {
        points,
        at_one,
        weights_at_one,
    })
}

/// The β values that get a heatmap, and its file.
fn heatmap_file(beta: f64) -> Option<&'static str> {
    if beta == 0.25 {
        Some("t0801_lookup_soft.png")
    } else if beta == 1.0 {
        Some("t0801_lookup.png")
    } else if beta == 4.0 {
        Some("t0801_lookup_sharp.png")
    } else {
        None
    }
}

/// Heatmap of the `(8, 8)` weights, rows labelled by the key each query copies.
fn plot_weights(path: &Path, beta: f64, weights: &[Vec<f64>], perm: &[usize]) -> Result<()> {
    let key_names: Vec<String> = (0..M).map(|j| format!("k{j}")).collect();
    let query_names: Vec<String> = perm
        .iter()
        .enumerate()
        .map(|(i, p)| format!("q{i}≈k{p}"))
        .collect();
    heatmap(
        path,
        &format!("Soft lookup: attention weights, queries scaled by β = {beta}"),
        "key",
        "query (≈ the key it copies)",
        weights,
        Some((&key_names, &query_names)),
    )
}

/// Weight on the intended key, value error and normalised entropy against log₂ β (a linear
/// axis with ticks at every doubling).
fn plot_sharpness(path: &Path, points: &[Value]) -> Result<()> {
    let at = |key: &str| -> Vec<(f64, f64)> {
        points
            .iter()
            .map(|s| (s["beta"].as_f64().unwrap().log2(), s[key].as_f64().unwrap()))
            .collect()
    };
    let ln_m = (M as f64).ln();
    let entropy: Vec<(f64, f64)> = at("entropy_nats")
        .into_iter()
        .map(|(b, e)| (b, e / ln_m))
        .collect();
    line_chart(
        path,
        "Sharpness: scaling the queries by β (β = 1: plain attention)",
        "log₂ β   (β = query scale = 1 / temperature)",
        "value",
        &[
            Series::new("weight on intended key", at("weight_on_target")),
            Series::new("retrieved value: relative error", at("rel_value_error")),
            Series::new("row entropy / ln 8", entropy),
        ],
        Axes {
            log_x: false,
            log_y: false,
        },
    )
}

//! # 2. Causal self-attention maps
//!
//! A random sequence of 16 tokens over a 6-letter vocabulary, embedded by a random table into
//! `x` `(1, 16, 32)`, goes through a self-attention layer (`d_k = d_v = 16`) under the causal
//! mask `(16, 16)`; the weights are `(16, 16)`, zero above the diagonal. Two layers: a fresh one,
//! and the same one with `W_k := W_q`, whose score for `(i, j)` is `⟨W_q xᵢ, W_q xⱼ⟩/√d_k`,
//! largest when token `j` equals token `i`, so each position attends to earlier copies of itself.

use super::common::{gaussian, to_rows, SplitMix};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Value};
use shared::report::{heatmap, RunReport};
use std::path::Path;
use t0801_self_attention::{causal_mask, SelfAttention};

/// Sequence length.
const N: usize = 16;
/// Vocabulary size (letters A–F).
const VOCAB: usize = 6;
/// Embedding width.
const D_MODEL: usize = 32;
/// Query/key and value width.
const D_K: usize = 16;

/// Draws the sequence, runs both layers, draws their heatmaps and records their statistics.
pub fn run(dev: &Device, out_dir: &Path, seed: u64, report: &mut RunReport) -> Result<()> {
    let tokens = random_tokens(seed);
    let letters: Vec<String> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{i}:{}", (b'A' + *t as u8) as char))
        .collect();
    println!("   sequence: {}", letters.join(" "));
    let x = embed(&tokens, dev)?;
    let mask = causal_mask(N, N, dev)?;
    let (fresh, matching) = layers(dev)?;

    let mut stats = serde_json::Map::new();
    for (layer, file, title, key) in [
        (
            &fresh,
            "t0801_causal_fresh.png",
            "Causal self-attention, fresh random layer",
            "fresh",
        ),
        (
            &matching,
            "t0801_causal_match.png",
            "Causal self-attention with W_k = W_q (equal tokens match)",
            "w_k_equals_w_q",
        ),
    ] {
        let w = to_rows(&layer.forward(&x, Some(&mask))?.weights.squeeze(0)?)?;
        heatmap(
            &out_dir.join(file),
            title,
            "key position : token",
            "query position : token",
            &w,
            Some((&letters, &letters)),
        )?;
        stats.insert(key.into(), map_stats(key, &w, &tokens));
    }
    stats.insert("tokens".into(), json!(letters));
    report.metric("causal", stats);
    Ok(())
}

/// `N` token ids drawn uniformly from `0..VOCAB`.
fn random_tokens(seed: u64) -> Vec<usize> {
    let mut rng = SplitMix(seed ^ 0x5EED_0801);
    (0..N).map(|_| rng.below(VOCAB)).collect()
}

/// Rows of a random token-embedding table `(VOCAB, D_MODEL)`: `(1, N, D_MODEL)`.
fn embed(tokens: &[usize], dev: &Device) -> Result<Tensor> {
    let table = gaussian(&[VOCAB, D_MODEL], 1.0, dev)?;
    let idx = Tensor::from_vec(tokens.iter().map(|&t| t as u32).collect::<Vec<_>>(), N, dev)?;
    Ok(table.index_select(&idx, 0)?.unsqueeze(0)?)
}

/// A freshly initialised layer (CS336 truncated-normal weights), and the same layer with
/// `W_k := W_q`.
fn layers(dev: &Device) -> Result<(SelfAttention, SelfAttention)> {
    let varmap = VarMap::new();
    let fresh = SelfAttention::new(
        VarBuilder::from_varmap(&varmap, DType::F32, dev),
        D_MODEL,
        D_K,
        D_K,
    )?;
    let matching =
        SelfAttention::from_weights(fresh.w_q.clone(), fresh.w_q.clone(), fresh.w_v.clone())?;
    Ok((fresh, matching))
}

/// Checks of one causal weight map `w` `(N, N)`, printed and returned as JSON: the largest
/// weight above the diagonal (0), the largest |row sum − 1|, the mean mass a query puts on
/// earlier copies of its token, and the largest deviation from uniform causal weights.
fn map_stats(key: &str, w: &[Vec<f64>], tokens: &[usize]) -> Value {
    let above: f64 = (0..N)
        .flat_map(|i| (i + 1..N).map(move |j| (i, j)))
        .map(|(i, j)| w[i][j])
        .fold(0.0, f64::max);
    let row_sum_err = w
        .iter()
        .map(|r| (r.iter().sum::<f64>() - 1.0).abs())
        .fold(0.0, f64::max);
    let same = mass_on_earlier_equal_tokens(w, tokens);
    // A uniform causal row i gives every allowed key weight 1/(i+1).
    let max_dev_from_uniform = (0..N)
        .map(|i| {
            (0..=i)
                .map(|j| (w[i][j] - 1.0 / (i + 1) as f64).abs())
                .fold(0.0, f64::max)
        })
        .fold(0.0, f64::max);
    println!(
        "   {key}: max weight above the diagonal {above:.1e}, max |row sum − 1| {row_sum_err:.1e}, \
         mass on earlier equal tokens {same:.3} (rows that have one), max |w − uniform causal| {max_dev_from_uniform:.3}"
    );
    json!({"max_weight_above_diagonal": above, "max_row_sum_error": row_sum_err,
        "mass_on_earlier_equal_tokens": same, "max_deviation_from_uniform_causal": max_dev_from_uniform})
}

/// Mean weight a query puts on earlier positions holding the same token, over the rows that
/// have such a position.
fn mass_on_earlier_equal_tokens(w: &[Vec<f64>], tokens: &[usize]) -> f64 {
    let (mut same, mut rows_with_copy) = (0.0, 0);
    for i in 0..N {
        if (0..i).any(|j| tokens[j] == tokens[i]) {
            same += (0..i)
                .filter(|&j| tokens[j] == tokens[i])
                .map(|j| w[i][j])
                .sum::<f64>();
            rows_with_copy += 1;
        }
    }
    same / rows_with_copy.max(1) as f64
}

//! The side-by-side comparison: each contender built from the same seed, trained on the same
//! batches with the same budget, then judged by target-token loss and perplexity on the held-out
//! pairs, training tokens/s, and the wall-clock time it took to reach the loss the weaker model
//! ends at.
//!
//! Figures: `loss_vs_step.png` (train and valid against step), `loss_vs_wallclock.png` (valid
//! against seconds); metrics `models`, `time_to_loss_target`.

use super::data::Data;
use super::model::{evaluate, test_word_ppl, Model};
use super::training::{train_model, RunSettings};
use crate::Preset;
use anyhow::Result;
use candle_core::DType;
use candle_nn::{VarBuilder, VarMap};
use shared::fit::Curve;
use shared::report::{line_chart, print_table, Axes, Series};
use shared::train::{copies_for, human_rate};
use std::path::Path;

/// One trained contender and its final numbers.
pub struct Contender {
    pub name: &'static str,
    pub model: Model,
    pub n_params: usize,
    pub curve: Curve,
    pub valid_loss: f64,
    pub test_loss: f64,
    /// WikiText-2 word-level test perplexity ([`test_word_ppl`]).
    pub test_word_ppl: f64,
}

impl Contender {
    /// Builds contender `name` from `seed` (parameters in `dtype`, activations in `compute`),
    /// trains it ([`train_model`]) and evaluates it on the
    /// validation and test pairs (all of them when `final_batches` is `usize::MAX`, else the
    /// last validation loss of the curve and `final_batches` test batches).
    pub fn train_and_test(
        name: &'static str,
        data: &Data,
        p: &Preset,
        vocab: usize,
        run: &RunSettings<'_>,
        (dtype, compute): (DType, DType),
        final_batches: usize,
    ) -> Result<Self> {
        shared::params::set_seed(run.seed);
        let mut varmap = VarMap::new();
        let model = Model::new(
            name,
            VarBuilder::from_varmap(&varmap, dtype, &data.dev),
            p,
            vocab,
            (run.parts, run.lstm, compute),
        )?;
        // Mixed precision keeps f32 master weights in `varmap` (what AdamW updates and the
        // checkpoints hold) and builds the model again on bf16 copies of them.
        let copies = match run.cast_weights {
            true => None,
            false => copies_for(&varmap, compute)?,
        };
        let model = match &copies {
            Some(copies) => Model::new(
                name,
                VarBuilder::from_varmap(copies, compute, &data.dev),
                p,
                vocab,
                (run.parts, run.lstm, compute),
            )?,
            None => model,
        };
        let n_params = shared::params::count_params(&varmap);
        println!("-- {name}: {n_params} parameters");
        let params = (&mut varmap, copies.as_ref());
        let curve = train_model(name, &model, params, data, p, run)?;
        let valid_loss = match final_batches {
            usize::MAX => evaluate(&model, &data.valid, data, p.batch, final_batches)?,
            _ => curve.final_valid_loss().unwrap_or(f64::NAN),
        };
        let test_loss = evaluate(&model, &data.test, data, p.batch, final_batches)?;
        let test_word_ppl = test_word_ppl(&model, data, 4 * p.batch)?;
        Ok(Self {
            name,
            model,
            n_params,
            curve,
            valid_loss,
            test_loss,
            test_word_ppl,
        })
    }

    /// The `results.json` record (`models[i]`).
    pub fn json(&self) -> serde_json::Value {
        let (valid, test) = (self.valid_loss, self.test_loss);
        serde_json::json!({
            "model": self.name, "params": self.n_params, "valid_loss": valid, "valid_ppl": valid.exp(),
            "test_loss": test, "test_ppl": test.exp(), "test_word_ppl": self.test_word_ppl, "train_tokens_per_s": self.curve.tokens_per_s,
            "train_seconds": self.curve.train_seconds, "curve": self.curve,
        })
    }
}

/// First wall-clock time at which a validation loss ≤ `target` was measured.
pub fn time_to_reach(curve: &Curve, target: f64) -> Option<f64> {
    curve.valid.iter().find(|v| v.1 <= target).map(|v| v.2)
}

/// The loss the weaker contender ends at: the target of "time to reach".
pub fn loss_target(contenders: &[Contender]) -> f64 {
    let worst = contenders.iter().map(|c| c.valid_loss);
    worst.fold(f64::NEG_INFINITY, f64::max) + 1e-9
}

/// Prints the summary table against `target` and the unigram-entropy floor.
pub fn print_summary(contenders: &[Contender], target: f64, h_unigram: f64) {
    let rows: Vec<Vec<String>> = contenders
        .iter()
        .map(|c| {
            vec![
                c.name.to_string(),
                format!("{:.2}M", c.n_params as f64 / 1e6),
                format!("{:.3} / {:.1}", c.valid_loss, c.valid_loss.exp()),
                format!("{:.3} / {:.1}", c.test_loss, c.test_loss.exp()),
                format!("{:.1}", c.test_word_ppl),
                human_rate(c.curve.tokens_per_s),
                time_to_reach(&c.curve, target).map_or("-".into(), |s| format!("{s:.0} s")),
            ]
        })
        .collect();
    println!();
    let reach = format!("time to valid loss {target:.3}");
    let header = [
        "model",
        "params",
        "valid loss / ppl",
        "test loss / ppl",
        "test word ppl",
        "train tok/s",
        &reach,
    ];
    print_table(&header, &rows);
    println!(
        "unigram entropy {h_unigram:.3} nats (perplexity {:.0}): the best any model ignoring context can do",
        h_unigram.exp()
    );
}

/// The two figures: loss against step (train smoothed over 20 steps, and valid) and validation
/// loss against wall-clock seconds on `device`.
pub fn plot(contenders: &[Contender], out_dir: &Path, device: &str) -> Result<()> {
    let train = contenders.iter().map(|c| {
        let pts: Vec<_> = c.curve.train.iter().map(|t| (t.0 as f64, t.1)).collect();
        Series::new(format!("{} train", c.name), smooth(&pts, 20))
    });
    let valid_by = |x: fn(&(usize, f64, f64)) -> f64| {
        contenders.iter().map(move |c| {
            let pts = c.curve.valid.iter().map(|v| (x(v), v.1)).collect();
            Series::new(format!("{} valid", c.name), pts)
        })
    };
    line_chart(
        &out_dir.join("loss_vs_step.png"),
        "Target-token loss vs step (same batches for both)",
        "step",
        "cross-entropy (nats)",
        &train.chain(valid_by(|v| v.0 as f64)).collect::<Vec<_>>(),
        Axes::default(),
    )?;
    line_chart(
        &out_dir.join("loss_vs_wallclock.png"),
        &format!("Validation loss vs wall-clock ({device})"),
        "seconds",
        "cross-entropy (nats)",
        &valid_by(|v| v.2).collect::<Vec<_>>(),
        Axes::default(),
    )
}

/// A `w`-point running mean of `(x, y)` points, for readable training curves.
fn smooth(points: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    (0..points.len())
        .map(|i| {
            let lo = i.saturating_sub(w - 1);
            let mean = points[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i + 1 - lo) as f64;
            (points[i].0, mean)
        })
        .collect()
}

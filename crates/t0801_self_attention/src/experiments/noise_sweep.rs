//! # 1b. The lookup on many random dictionaries
//!
//! 256 independent dictionaries at once, keys `(256, 8, 32)`, values `(256, 8, 8)`, queries
//! `(256, 8, 32)`, with plain attention (β = 1), for several levels σ of query noise: accuracy
//! stays perfect while the noise is small next to the gaps between keys, then degrades.

use super::common::SplitMix;
use super::dictionaries::Dictionaries;
use anyhow::Result;
use candle_core::Device;
use serde_json::{json, Value};
use shared::report::print_table;

/// Dictionaries per noise level.
const MANY: usize = 256;
/// The query-noise levels σ.
const SIGMAS: [f64; 5] = [0.25, 0.5, 1.0, 1.5, 2.0];

/// One JSON point per σ, and the accuracy at the run's own noise level (0 if it is not swept).
pub struct NoiseSweep {
    pub points: Vec<Value>,
    pub accuracy_at_noise: f64,
}

/// Draws `MANY` dictionaries per σ from `rng` (and the shared Gaussian generator) and prints the
/// table.
pub fn run(rng: &mut SplitMix, noise: f64, dev: &Device) -> Result<NoiseSweep> {
    let mut rows = Vec::new();
    let mut points = Vec::new();
    let mut accuracy_at_noise = 0.0;
    for sigma in SIGMAS {
        let (_, s) = Dictionaries::sample(MANY, sigma, rng, dev)?.lookup()?;
        if sigma == noise {
            accuracy_at_noise = s.accuracy;
        }
        rows.push(vec![
            format!("{sigma}"),
            format!("{:.3}", s.accuracy),
            format!("{:.3}", s.weight_on_target),
            format!("{:.3}", s.value_error),
        ]);
        points.push(json!({"noise": sigma, "accuracy": s.accuracy, "weight_on_target": s.weight_on_target, "rel_value_error": s.value_error}));
    }
    println!("   {MANY} random dictionaries (β = 1) at several query-noise levels:");
    print_table(
        &[
            "noise σ",
            "accuracy",
            "weight on intended key",
            "value rel. error",
        ],
        &rows,
    );
    Ok(NoiseSweep {
        points,
        accuracy_at_noise,
    })
}

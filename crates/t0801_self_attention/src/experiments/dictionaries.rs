//! Random dictionaries for the lookup experiments, and what one lookup measures.
//!
//! A batch of `b` dictionaries holds keys `(b, m, d_k)` and values `(b, m, d_v)`. Its queries
//! `(b, m, d_k)` are noisy copies of the keys in a shuffled order, so the key each query should
//! find, and the value it should retrieve, are known.

use super::common::{gaussian, SplitMix};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use t0801_self_attention::scaled_dot_product_attention;

/// Keys (and values, and queries) per dictionary.
pub const M: usize = 8;
/// Key and query width: random Gaussian keys in 32 dimensions are nearly orthogonal
/// (|cos| ~ 1/√d).
pub const D_K: usize = 32;
/// Value width.
pub const D_V: usize = 8;

/// A batch of dictionaries with their queries.
pub struct Dictionaries {
    /// `(b, m, d_k)`, i.i.d. `N(0, 1)`.
    pub keys: Tensor,
    /// `(b, m, d_v)`, i.i.d. `N(0, 1)`.
    pub values: Tensor,
    /// `(b, m, d_k)`: query `i` of dictionary `b` is key `perms[b][i]` plus `N(0, σ²)` noise.
    pub queries: Tensor,
    /// `perms[b][i]`: the key that query `i` of dictionary `b` copies.
    pub perms: Vec<Vec<usize>>,
}

impl Dictionaries {
    /// Draws `batch` dictionaries (keys, then values, then the shuffles, then the query noise).
    pub fn sample(batch: usize, noise: f64, rng: &mut SplitMix, dev: &Device) -> Result<Self> {
        let keys = gaussian(&[batch, M, D_K], 1.0, dev)?;
        let values = gaussian(&[batch, M, D_V], 1.0, dev)?;
        let perms: Vec<Vec<usize>> = (0..batch).map(|_| rng.permutation(M)).collect();
        let queries = (copy_rows(&keys, &perms)? + gaussian(&[batch, M, D_K], noise, dev)?)?;
        Ok(Self {
            keys,
            values,
            queries,
            perms,
        })
    }

    /// The lookup with the plain queries (β = 1).
    pub fn lookup(&self) -> Result<(Tensor, LookupStats)> {
        lookup_stats(&self.queries, self)
    }

    /// The lookup with the queries scaled by `beta` (= dividing the temperature by β).
    pub fn lookup_scaled(&self, beta: f64) -> Result<(Tensor, LookupStats)> {
        lookup_stats(&(&self.queries * beta)?, self)
    }
}

/// `(b, m, d)` → `(b, m, d)` whose row `(b, i)` is row `perms[b][i]` of `keys[b]`.
fn copy_rows(keys: &Tensor, perms: &[Vec<usize>]) -> Result<Tensor> {
    let (b, m, d) = keys.dims3()?;
    let flat: Vec<u32> = perms
        .iter()
        .enumerate()
        .flat_map(|(bi, p)| p.iter().map(move |&j| (bi * m + j) as u32))
        .collect();
    Ok(keys
        .reshape((b * m, d))?
        .index_select(&Tensor::from_vec(flat, b * m, keys.device())?, 0)?
        .reshape((b, m, d))?)
}

/// What one lookup measured, averaged over every query of every dictionary.
#[derive(Clone, Copy)]
pub struct LookupStats {
    /// Share of queries whose largest weight sits on the intended key.
    pub accuracy: f64,
    /// Mean weight on the intended key.
    pub weight_on_target: f64,
    /// Mean `‖output − intended value‖ / ‖intended value‖`.
    pub value_error: f64,
    /// Mean entropy of a weight row, in nats (`ln m` when uniform).
    pub entropy: f64,
}

/// Attention of `queries` `(b, m, d_k)` over the dictionaries; returns the weights `(b, m, m)`
/// and the statistics.
fn lookup_stats(queries: &Tensor, dict: &Dictionaries) -> Result<(Tensor, LookupStats)> {
    let att = scaled_dot_product_attention(queries, &dict.keys, &dict.values, None)?;
    let w = att.weights.to_dtype(DType::F64)?.to_vec3::<f64>()?; // (b, m, m)
    let out = att.output.to_dtype(DType::F64)?.to_vec3::<f64>()?; // (b, m, d_v)
    let vals = dict.values.to_dtype(DType::F64)?.to_vec3::<f64>()?;
    let (mut hits, mut on_target, mut err, mut ent, mut count) = (0usize, 0.0, 0.0, 0.0, 0usize);
    for b in 0..w.len() {
        for (i, row) in w[b].iter().enumerate() {
            let t = dict.perms[b][i];
            hits += usize::from(argmax(row) == t);
            on_target += row[t];
            ent -= row
                .iter()
                .filter(|p| **p > 0.0)
                .map(|p| p * p.ln())
                .sum::<f64>();
            err += relative_error(&out[b][i], &vals[b][t]);
            count += 1;
        }
    }
    let c = count as f64;
    Ok((
        att.weights,
        LookupStats {
            accuracy: hits as f64 / c,
            weight_on_target: on_target / c,
            value_error: err / c,
            entropy: ent / c,
        },
    ))
}

/// Index of the first largest entry.
fn argmax(row: &[f64]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |best, (j, x)| if *x > row[best] { j } else { best })
}

/// `‖got − want‖ / ‖want‖`.
fn relative_error(got: &[f64], want: &[f64]) -> f64 {
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(o, w)| (o - w).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = want.iter().map(|w| w * w).sum::<f64>().sqrt();
    diff / norm
}

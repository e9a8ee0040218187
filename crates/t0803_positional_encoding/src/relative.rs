//! Relative position bias (Raffel et al., 2020 — T5): a learned scalar per head and per *bucket* of
//! the offset `j − i`, added to the attention scores.
//!
//! ```text
//! scores[h, i, j] = q_i·k_j / √d_head + B[h, bucket(j − i)]          B: (n_heads, n_buckets)
//! ```
//!
//! Small offsets get a bucket each; larger ones share logarithmically wider buckets up to
//! `max_distance`, beyond which all offsets share the last bucket (far tokens are told apart
//! coarsely, and any length is allowed). With `bidirectional`, half the buckets are for keys
//! *before* the query and half for keys *after* it; a causal decoder uses all buckets for the past.
//! Shaw et al. (2018) used the simpler rule `clip(j − i, −K, K)`: the T5 rule with exact buckets up
//! to `K` is its logarithmic refinement.

use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;
use shared::params::truncated_normal;
use t0802_multi_head_attention::PositionPlug;

/// Shape of a relative position bias. [`RelativeBiasConfig::t5`] gives T5's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RelativeBiasConfig {
    pub n_heads: usize,
    /// Number of buckets (T5: 32).
    pub n_buckets: usize,
    /// Offsets at or beyond this distance share the last bucket (T5: 128).
    pub max_distance: usize,
    /// Separate buckets for keys after the query (encoders) or not (causal decoders).
    pub bidirectional: bool,
}

impl RelativeBiasConfig {
    /// T5's encoder setting: 32 buckets, max distance 128, bidirectional.
    pub fn t5(n_heads: usize) -> Self {
        Self {
            n_heads,
            n_buckets: 32,
            max_distance: 128,
            bidirectional: true,
        }
    }

    fn check(&self) -> Result<()> {
        let half = if self.bidirectional {
            self.n_buckets / 2
        } else {
            self.n_buckets
        };
        if self.n_heads == 0 || half < 2 {
            bail!(
                "relative bias needs n_heads ≥ 1 and at least 2 buckets per direction (n_heads {}, n_buckets {}, bidirectional {})",
                self.n_heads,
                self.n_buckets,
                self.bidirectional
            );
        }
        if self.max_distance <= half / 2 {
            bail!(
                "relative bias: max_distance ({}) must exceed the {} exact buckets",
                self.max_distance,
                half / 2
            );
        }
        Ok(())
    }
}

/// T5's bucket of the offset `relative_position = j − i` (key position minus query position).
///
/// Let `n = i − j` (how far back the key is). Bidirectional: keys after the query (`n < 0`) use the
/// upper half of the buckets and `n ← |n|`; causal: `n ← max(n, 0)`. With `m` buckets per
/// direction and `e = m/2` exact ones:
///
/// ```text
/// bucket(n) = n                                                          if n < e
///           = min(m − 1, e + ⌊ ln(n/e) / ln(max_distance/e) · (m − e) ⌋)   otherwise
/// ```
pub fn relative_position_bucket(
    relative_position: i64,
    n_buckets: usize,
    max_distance: usize,
    bidirectional: bool,
) -> usize {
    let mut m = n_buckets;
    let mut bucket = 0;
    let mut n = -relative_position; // > 0: the key is n positions before the query
    if bidirectional {
        m /= 2;
        if n < 0 {
            bucket += m; // keys after the query: the upper half
        }
        n = n.abs();
    } else {
        n = n.max(0); // future keys share bucket 0 (a causal mask hides them anyway)
    }
    let exact = m / 2;
    let n = n as usize;
    if n < exact {
        return bucket + n;
    }
    // Logarithmic buckets from `exact` to `max_distance` (the 1e-9 keeps exact powers, where the
    // formula gives an integer, from rounding down to the bucket below).
    let log_ratio = (n as f64 / exact as f64).ln() / (max_distance as f64 / exact as f64).ln();
    let large = exact + (log_ratio * (m - exact) as f64 + 1e-9).floor() as usize;
    bucket + large.min(m - 1)
}

/// The buckets of every (query, key) pair: `n_q·n_k` values, row-major `(n_q, n_k)`.
///
/// Keys sit at positions `0 … n_k − 1` and the queries are the *last* `n_q` of them (query `i` at
/// position `i + n_k − n_q`), the same alignment as `t0801`'s `causal_mask`.
pub fn relative_bucket_matrix(n_q: usize, n_k: usize, cfg: &RelativeBiasConfig) -> Vec<u32> {
    let shift = n_k as i64 - n_q as i64;
    (0..n_q as i64)
        .flat_map(|i| (0..n_k as i64).map(move |j| (i, j)))
        .map(|(i, j)| {
            relative_position_bucket(
                j - (i + shift),
                cfg.n_buckets,
                cfg.max_distance,
                cfg.bidirectional,
            ) as u32
        })
        .collect()
}

/// A learned relative position bias: `table (n_heads, n_buckets)`.
///
/// Parameter name (checkpoint key): `relative_attention_bias`. One table is usually shared by all
/// layers (as in T5): build it once and pass its output to every layer.
#[derive(Debug, Clone)]
pub struct RelativePositionBias {
    /// `(n_heads, n_buckets)`
    pub table: Tensor,
    pub cfg: RelativeBiasConfig,
}

impl RelativePositionBias {
    /// A fresh table (`N(0, 0.02²)`, truncated) or a checkpoint's, through `vb`.
    pub fn new(vb: VarBuilder, cfg: RelativeBiasConfig) -> Result<Self> {
        cfg.check()?;
        let table = truncated_normal(
            &vb,
            (cfg.n_heads, cfg.n_buckets),
            "relative_attention_bias",
            0.02,
        )?;
        Ok(Self { table, cfg })
    }

    /// From an explicit `(n_heads, n_buckets)` table.
    pub fn from_weights(table: Tensor, cfg: RelativeBiasConfig) -> Result<Self> {
        cfg.check()?;
        if table.dims() != [cfg.n_heads, cfg.n_buckets] {
            bail!(
                "relative bias table has shape {:?}, expected ({}, {})",
                table.dims(),
                cfg.n_heads,
                cfg.n_buckets
            );
        }
        Ok(Self { table, cfg })
    }

    /// The additive score bias `(n_heads, n_q, n_k)`: entry `[h, i, j] = table[h, bucket(j − i)]`.
    /// It depends on the offset only (constant along every diagonal) and exists for any length.
    pub fn forward(&self, n_q: usize, n_k: usize) -> Result<Tensor> {
        let buckets = relative_bucket_matrix(n_q, n_k, &self.cfg);
        let idx = Tensor::from_vec(buckets, n_q * n_k, self.table.device())?;
        // A differentiable gather: the gradient of each bucket sums over the pairs that use it.
        self.table
            .index_select(&idx, 1)?
            .reshape((self.cfg.n_heads, n_q, n_k))
    }

    /// The bias as a function of the offset `j − i` for `offsets`, per head: `(n_heads, offsets.len())`
    /// (for plots).
    pub fn bias_for_offsets(&self, offsets: &[i64]) -> Result<Tensor> {
        let c = &self.cfg;
        let idx: Vec<u32> = offsets
            .iter()
            .map(|&r| {
                relative_position_bucket(r, c.n_buckets, c.max_distance, c.bidirectional) as u32
            })
            .collect();
        let idx = Tensor::from_vec(idx, offsets.len(), self.table.device())?;
        self.table.index_select(&idx, 1)
    }
}

/// The relative bias as a position plug of 8-02's attention component: every layer that holds it
/// adds `table[h, bucket(j − i)]` to its scores (queries end-aligned with the keys).
impl PositionPlug for RelativePositionBias {
    fn score_bias(&self, n_q: usize, n_k: usize) -> Result<Option<Tensor>> {
        Ok(Some(self.forward(n_q, n_k)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn small_offsets_get_their_own_bucket() {
        for r in 0..8 {
            assert_eq!(relative_position_bucket(-r, 32, 128, true), r as usize);
            assert_eq!(
                relative_position_bucket(r, 32, 128, true),
                if r == 0 { 0 } else { 16 + r as usize }
            );
        }
    }

    #[test]
    fn bad_configs_are_named() {
        let cfg = RelativeBiasConfig {
            n_heads: 2,
            n_buckets: 2,
            max_distance: 8,
            bidirectional: true,
        };
        let err = RelativePositionBias::from_weights(
            Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
            cfg,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("n_buckets 2"), "{err}");
        let cfg = RelativeBiasConfig::t5(4);
        let err = RelativePositionBias::from_weights(
            Tensor::zeros((3, 32), DType::F32, &Device::Cpu).unwrap(),
            cfg,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("[3, 32]") && err.contains("(4, 32)"), "{err}");
    }
}

//! Choosing the next token from the logits: greedy, temperature, top-k, top-p (nucleus), seeded.
//!
//! ```text
//! p = softmax(logits / T)                        T → 0: all mass on the argmax (greedy)
//! top-k:  keep the k most probable tokens
//! top-p:  keep the smallest most-probable set whose mass reaches p (Holtzman et al., 2020)
//! then renormalise the kept probabilities and draw one token.
//! ```

use candle_core::{bail, DType, Result, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// How to pick tokens.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SamplingConfig {
    /// 0 = greedy (argmax).
    pub temperature: f64,
    /// Keep only the `k` most probable tokens (None: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most probable tokens with total probability ≥ `p` (None: all).
    pub top_p: Option<f64>,
}

impl SamplingConfig {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!(
                "temperature must be ≥ 0 and finite, got {}",
                self.temperature
            );
        }
        if self.top_k == Some(0) {
            bail!("top_k must be ≥ 1, got 0");
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                bail!("top_p must be in (0, 1], got {p}");
            }
        }
        Ok(())
    }
}

/// The tokens a draw may return and their renormalised probabilities, most probable first.
/// Greedy (`temperature` 0) allows only the argmax (the first one on ties).
pub fn allowed_tokens(logits: &[f32], cfg: &SamplingConfig) -> Result<Vec<(u32, f64)>> {
    cfg.validate()?;
    if logits.is_empty() {
        bail!("cannot sample from an empty logit vector");
    }
    if logits.iter().any(|l| l.is_nan()) {
        bail!("logits contain NaN");
    }
    if cfg.temperature == 0.0 {
        let best = logits
            .iter()
            .enumerate()
            .fold(0, |b, (i, &l)| if l > logits[b] { i } else { b });
        return Ok(vec![(best as u32, 1.0)]);
    }
    // softmax(logits / T) in f64, sorted by probability (stable: ties keep index order).
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)) as f64;
    let mut p: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / cfg.temperature).exp()))
        .collect();
    let z: f64 = p.iter().map(|x| x.1).sum();
    p.iter_mut().for_each(|x| x.1 /= z);
    p.sort_by(|a, b| b.1.total_cmp(&a.1));
    if let Some(k) = cfg.top_k {
        p.truncate(k);
    }
    if let Some(top_p) = cfg.top_p {
        let mass: f64 = p.iter().map(|x| x.1).sum();
        let mut acc = 0.0;
        let keep = p.iter().position(|x| {
            acc += x.1 / mass;
            acc >= top_p - 1e-12
        });
        p.truncate(keep.map_or(p.len(), |i| i + 1));
    }
    let z: f64 = p.iter().map(|x| x.1).sum();
    p.retain(|x| x.1 > 0.0);
    p.iter_mut().for_each(|x| x.1 /= z);
    Ok(p)
}

/// A seeded sampler: the same seed and logits give the same tokens.
pub struct Sampler {
    pub cfg: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// Picks a token from `logits` as floats.
    pub fn sample_slice(&mut self, logits: &[f32]) -> Result<u32> {
        let allowed = allowed_tokens(logits, &self.cfg)?;
        if allowed.len() == 1 {
            return Ok(allowed[0].0);
        }
        let r: f64 = self.rng.random();
        let mut acc = 0.0;
        for &(tok, p) in &allowed {
            acc += p;
            if r < acc {
                return Ok(tok);
            }
        }
        Ok(allowed.last().expect("non-empty").0)
    }

    /// Picks a token from `logits (vocab,)` (any float dtype, any device).
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        self.sample_slice(&logits.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }
}

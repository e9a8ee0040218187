//! The synthetic task: at every position `p ≥ 2` of `BOS t₁ … t_T`, output
//! `y_p = t_{p−1} + V·[t_p occurred at an earlier position]` — a positional relation (look one
//! step back) and a content relation (look for an equal token) at once.

use anyhow::Result;
use candle_core::{Device, Tensor};

/// The task's sizes: `V` ordinary tokens (ids `0..V`, the BOS is `V`) and `T` tokens per sequence.
#[derive(Debug, Clone, Copy)]
pub struct TwoRelations {
    pub vocab: usize,
    pub seq_len: usize,
}

/// A batch of `b` sequences of `l = T + 1` positions: tokens `(b, l)` u32, targets `(b, l)` u32,
/// loss mask `(b, l)` u8 (1 at positions `≥ 2`), and the tokens as plain rows.
pub struct Batch {
    pub tokens: Tensor,
    pub targets: Tensor,
    pub loss_mask: Tensor,
    pub raw: Vec<Vec<usize>>,
}

impl TwoRelations {
    /// The BOS token id, `V`.
    pub fn bos(&self) -> usize {
        self.vocab
    }

    /// Positions including the BOS, `T + 1`.
    pub fn len(&self) -> usize {
        self.seq_len + 1
    }

    /// Target of position `p ≥ 2` of `tokens` (BOS at 0): `t_{p−1} + V·[t_p ∈ t_{1..p−1}]`.
    pub fn target(&self, tokens: &[usize], p: usize) -> usize {
        let seen = tokens[1..p].contains(&tokens[p]);
        tokens[p - 1] + self.vocab * usize::from(seen)
    }

    /// `b` sequences of uniformly random tokens after a BOS (`b·T` draws from `rng`), with their
    /// targets and loss mask.
    pub fn batch(&self, b: usize, rng: &mut SplitMix, dev: &Device) -> Result<Batch> {
        let l = self.len();
        let raw: Vec<Vec<usize>> = (0..b)
            .map(|_| {
                std::iter::once(self.bos())
                    .chain((0..self.seq_len).map(|_| rng.below(self.vocab)))
                    .collect()
            })
            .collect();
        let mut targets = Vec::with_capacity(b * l);
        let mut mask = Vec::with_capacity(b * l);
        for seq in &raw {
            for p in 0..l {
                targets.push(if p >= 2 {
                    self.target(seq, p) as u32
                } else {
                    0
                });
                mask.push(u8::from(p >= 2));
            }
        }
        let tokens: Vec<u32> = raw.iter().flatten().map(|&t| t as u32).collect();
        Ok(Batch {
            tokens: Tensor::from_vec(tokens, (b, l), dev)?,
            targets: Tensor::from_vec(targets, (b, l), dev)?,
            loss_mask: Tensor::from_vec(mask, (b, l), dev)?,
            raw,
        })
    }

    /// The fraction of scored positions whose token occurred earlier (the seen bit's base rate).
    pub fn seen_rate(&self, batches: &[Batch]) -> f64 {
        let (mut seen, mut n) = (0usize, 0usize);
        for seq in batches.iter().flat_map(|b| &b.raw) {
            for p in 2..seq.len() {
                seen += self.target(seq, p) / self.vocab;
                n += 1;
            }
        }
        seen as f64 / n as f64
    }
}

/// Strictly causal attention with a BOS sink, `(l, l)` u8: query `i` may attend key `j` iff
/// `j < i` or `j = 0` (with `j ≤ i` every token would trivially match itself).
pub fn strict_causal_with_sink(l: usize, dev: &Device) -> Result<Tensor> {
    let data: Vec<u8> = (0..l)
        .flat_map(|i| (0..l).map(move |j| u8::from(j < i || j == 0)))
        .collect();
    Ok(Tensor::from_vec(data, (l, l), dev)?)
}

/// SplitMix64: a tiny deterministic generator for the token draws.
pub struct SplitMix(pub u64);

impl SplitMix {
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    /// The generator `SplitMix(seed)` after `draws` draws: each draw adds the same constant to the
    /// state, so any point of the stream is reached in one step.
    pub fn skipped(seed: u64, draws: u64) -> Self {
        Self(seed.wrapping_add(draws.wrapping_mul(Self::GAMMA)))
    }

    /// A uniform draw from `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(Self::GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Skipping `n` draws lands where `n` draws in a row do.
    #[test]
    fn skipped_matches_sequential_draws() {
        let mut seq = SplitMix(42);
        for n in 0..20u64 {
            assert_eq!(SplitMix::skipped(42, n).below(1000), seq.below(1000));
        }
    }
}

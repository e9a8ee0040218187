//! The task that needs order: read random tokens `x (batch, len)` and output, at every position
//! `t ≥ shift`, the token `x[t − shift]`. Nothing in the tokens says which one that is: only
//! position information can.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The task's sizes: tokens `0..vocab`, targets `shift` positions back.
#[derive(Debug, Clone, Copy)]
pub struct CopyBack {
    pub vocab: usize,
    pub shift: usize,
}

/// Tokens `(batch, len)` u32, targets `(batch, len)` u32 (`x[t − shift]`), and a loss mask
/// `(batch, len)` u8 hiding `t < shift`.
pub type Batch = (Tensor, Tensor, Tensor);

impl CopyBack {
    /// `n` uniformly random tokens.
    fn tokens(&self, rng: &mut StdRng, n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| rng.random_range(0..self.vocab as u32))
            .collect()
    }

    /// A random batch of `batch` sequences of `len` tokens, with targets and mask.
    pub fn batch(&self, rng: &mut StdRng, batch: usize, len: usize, dev: &Device) -> Result<Batch> {
        let x = self.tokens(rng, batch * len);
        let mut y = vec![0u32; batch * len];
        let mut m = vec![0u8; batch * len];
        for b in 0..batch {
            for t in self.shift..len {
                y[b * len + t] = x[b * len + t - self.shift];
                m[b * len + t] = 1;
            }
        }
        Ok((
            Tensor::from_vec(x, (batch, len), dev)?,
            Tensor::from_vec(y, (batch, len), dev)?,
            Tensor::from_vec(m, (batch, len), dev)?,
        ))
    }

    /// The best accuracy any permutation-equivariant model can reach: it sees its own token and
    /// the *multiset* of the sequence, so by exchangeability the target is equally likely to be
    /// any of the other `len − 1` tokens, and the best guess is the most frequent of them:
    /// `E[max_v count_others(v)] / (len − 1)` (Monte Carlo over random sequences).
    pub fn bag_of_tokens_ceiling(&self, len: usize, samples: usize, seed: u64) -> f64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut total = 0.0;
        for _ in 0..samples {
            let x: Vec<usize> = (0..len).map(|_| rng.random_range(0..self.vocab)).collect();
            let mut counts = vec![0usize; self.vocab];
            x.iter().for_each(|&v| counts[v] += 1);
            let t = rng.random_range(self.shift..len); // a query position
            counts[x[t]] -= 1; // the others
            total += *counts.iter().max().unwrap_or(&0) as f64 / (len - 1) as f64;
        }
        total / samples as f64
    }
}

/// The training batches of one run as a function of the step: batch `s` is the `s`-th batch
/// drawn from one `StdRng` stream seeded with `seed`. Reading the steps in order costs nothing
/// extra; any other step (a resumed run) replays the stream's draws up to it.
pub struct BatchStream {
    task: CopyBack,
    seed: u64,
    batch: usize,
    len: usize,
    rng: StdRng,
    /// The step whose batch the stream draws next.
    next: usize,
}

impl BatchStream {
    pub fn new(task: CopyBack, seed: u64, batch: usize, len: usize) -> Self {
        Self {
            task,
            seed,
            batch,
            len,
            rng: StdRng::seed_from_u64(seed),
            next: 0,
        }
    }

    /// The batch of training step `step`.
    pub fn at(&mut self, step: usize, dev: &Device) -> Result<Batch> {
        if step < self.next {
            *self = Self::new(self.task, self.seed, self.batch, self.len);
        }
        while self.next < step {
            self.task.tokens(&mut self.rng, self.batch * self.len); // a skipped batch
            self.next += 1;
        }
        self.next += 1;
        self.task.batch(&mut self.rng, self.batch, self.len, dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading a step out of order (a resume) gives the batch an in-order run gives.
    #[test]
    fn stream_batches_depend_on_the_step_only() -> Result<()> {
        let task = CopyBack { vocab: 7, shift: 1 };
        let mut in_order = BatchStream::new(task, 3, 2, 5);
        let batches: Vec<Vec<Vec<u32>>> = (0..4)
            .map(|s| Ok(in_order.at(s, &Device::Cpu)?.0.to_vec2::<u32>()?))
            .collect::<Result<_>>()?;
        let mut resumed = BatchStream::new(task, 3, 2, 5);
        for s in [2, 3, 1, 0] {
            assert_eq!(resumed.at(s, &Device::Cpu)?.0.to_vec2::<u32>()?, batches[s]);
        }
        Ok(())
    }
}

//! Batches for the two kinds of model in the module.
//!
//! * Language modelling: random windows of `seq_len + 1` tokens; inputs are the first `seq_len`,
//!   targets the last `seq_len` (targets = inputs shifted by one). Which windows a step sees is a
//!   pure function of `(seed, step)`, so a resumed run sees exactly the batches it would have seen.
//! * Sequence to sequence: pairs `(source, target)` padded to the longest in the batch, with
//!   masks (1 = real token, 0 = padding).

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Random language-model windows over one token stream.
#[derive(Debug, Clone)]
pub struct LmBatcher {
    pub batch_size: usize,
    pub seq_len: usize,
    pub seed: u64,
}

/// A language-model batch: `x` and `y` of shape `(batch, seq_len)`, dtype `u32`.
#[derive(Debug)]
pub struct LmBatch {
    pub x: Tensor,
    pub y: Tensor,
}

impl LmBatcher {
    pub fn new(batch_size: usize, seq_len: usize, seed: u64) -> Self {
        Self {
            batch_size,
            seq_len,
            seed,
        }
    }

    /// Window start offsets of the batch for `step` (deterministic in `(seed, step)`).
    pub fn offsets(&self, tokens_len: usize, step: u64) -> Result<Vec<usize>> {
        if tokens_len < self.seq_len + 2 {
            bail!(
                "token stream of {tokens_len} tokens is too short for windows of {} + 1",
                self.seq_len
            );
        }
        let mut rng = StdRng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9).wrapping_add(step));
        Ok((0..self.batch_size)
            .map(|_| rng.random_range(0..tokens_len - self.seq_len - 1))
            .collect())
    }

    /// The batch for training step `step`, on `device`.
    pub fn batch(&self, tokens: &[u32], step: u64, device: &Device) -> Result<LmBatch> {
        let offsets = self.offsets(tokens.len(), step)?;
        windows_to_batch(tokens, &offsets, self.seq_len, device)
    }
}

/// Builds `(x, y)` from window start offsets.
pub fn windows_to_batch(
    tokens: &[u32],
    offsets: &[usize],
    seq_len: usize,
    device: &Device,
) -> Result<LmBatch> {
    let mut xs = Vec::with_capacity(offsets.len() * seq_len);
    let mut ys = Vec::with_capacity(offsets.len() * seq_len);
    for &o in offsets {
        if o + seq_len + 1 > tokens.len() {
            bail!(
                "window at {o} of length {} runs past the stream's {} tokens",
                seq_len + 1,
                tokens.len()
            );
        }
        xs.extend_from_slice(&tokens[o..o + seq_len]);
        ys.extend_from_slice(&tokens[o + 1..o + seq_len + 1]);
    }
    let b = offsets.len();
    Ok(LmBatch {
        x: Tensor::from_vec(xs, (b, seq_len), device)?,
        y: Tensor::from_vec(ys, (b, seq_len), device)?,
    })
}

/// Non-overlapping evaluation windows covering the stream (at most `max_batches` batches).
pub fn eval_batches(
    tokens: &[u32],
    batch_size: usize,
    seq_len: usize,
    max_batches: usize,
    device: &Device,
) -> Result<Vec<LmBatch>> {
    let n_windows = (tokens.len().saturating_sub(1)) / seq_len;
    if n_windows == 0 {
        bail!(
            "evaluation stream of {} tokens is shorter than one window of {seq_len}",
            tokens.len()
        );
    }
    let offsets: Vec<usize> = (0..n_windows).map(|i| i * seq_len).collect();
    offsets
        .chunks(batch_size)
        .take(max_batches)
        .map(|chunk| windows_to_batch(tokens, chunk, seq_len, device))
        .collect()
}

/// One sequence-to-sequence example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seq2SeqExample {
    pub src: Vec<u32>,
    pub tgt: Vec<u32>,
}

/// A padded sequence-to-sequence batch. Shapes: `src (B, S)`, `tgt_in`/`tgt_out (B, T)`; masks
/// are `u8` with 1 for real tokens and 0 for padding. `tgt_in` is `<bos>` followed by the target
/// shifted right (teacher forcing); `tgt_out` is the target.
#[derive(Debug)]
pub struct Seq2SeqBatch {
    pub src: Tensor,
    pub src_mask: Tensor,
    pub tgt_in: Tensor,
    pub tgt_out: Tensor,
    pub tgt_mask: Tensor,
    /// Number of real target tokens (the loss is averaged over these).
    pub n_target_tokens: usize,
    /// Real tokens of each source and target (the masks' ones, known here without reading the
    /// masks back from the device).
    pub src_lengths: Vec<usize>,
    pub tgt_lengths: Vec<usize>,
}

/// Pads a list of examples into a [`Seq2SeqBatch`].
pub fn seq2seq_batch(
    examples: &[Seq2SeqExample],
    pad: u32,
    bos: u32,
    device: &Device,
) -> Result<Seq2SeqBatch> {
    if examples.is_empty() {
        bail!("seq2seq_batch: no examples");
    }
    if let Some(i) = examples
        .iter()
        .position(|e| e.src.is_empty() || e.tgt.is_empty())
    {
        bail!("seq2seq example {i} has an empty source or target");
    }
    let s = examples.iter().map(|e| e.src.len()).max().unwrap();
    let t = examples.iter().map(|e| e.tgt.len()).max().unwrap();
    let b = examples.len();
    let (mut src, mut src_mask) = (vec![pad; b * s], vec![0u8; b * s]);
    let (mut tgt_in, mut tgt_out, mut tgt_mask) =
        (vec![pad; b * t], vec![pad; b * t], vec![0u8; b * t]);
    let mut n_target_tokens = 0;
    for (i, e) in examples.iter().enumerate() {
        for (j, &tok) in e.src.iter().enumerate() {
            src[i * s + j] = tok;
            src_mask[i * s + j] = 1;
        }
        for (j, &tok) in e.tgt.iter().enumerate() {
            tgt_in[i * t + j] = if j == 0 { bos } else { e.tgt[j - 1] };
            tgt_out[i * t + j] = tok;
            tgt_mask[i * t + j] = 1;
        }
        n_target_tokens += e.tgt.len();
    }
    Ok(Seq2SeqBatch {
        src: Tensor::from_vec(src, (b, s), device)?,
        src_mask: Tensor::from_vec(src_mask, (b, s), device)?,
        tgt_in: Tensor::from_vec(tgt_in, (b, t), device)?,
        tgt_out: Tensor::from_vec(tgt_out, (b, t), device)?,
        tgt_mask: Tensor::from_vec(tgt_mask, (b, t), device)?,
        n_target_tokens,
        src_lengths: examples.iter().map(|e| e.src.len()).collect(),
        tgt_lengths: examples.iter().map(|e| e.tgt.len()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lm_targets_are_inputs_shifted_by_one_and_deterministic() -> Result<()> {
        let tokens: Vec<u32> = (0..1000).collect();
        let batcher = LmBatcher::new(4, 16, 3);
        let a = batcher.batch(&tokens, 7, &Device::Cpu)?;
        let x = a.x.to_vec2::<u32>()?;
        let y = a.y.to_vec2::<u32>()?;
        for (xr, yr) in x.iter().zip(&y) {
            for t in 0..15 {
                assert_eq!(yr[t], xr[t + 1]);
            }
            assert_eq!(yr[15], xr[15] + 1);
        }
        let again = batcher.batch(&tokens, 7, &Device::Cpu)?;
        assert_eq!(again.x.to_vec2::<u32>()?, x);
        let other = batcher.batch(&tokens, 8, &Device::Cpu)?;
        assert_ne!(other.x.to_vec2::<u32>()?, x);
        assert!(batcher.batch(&tokens[..10], 0, &Device::Cpu).is_err());
        Ok(())
    }

    #[test]
    fn eval_batches_tile_the_stream() -> Result<()> {
        let tokens: Vec<u32> = (0..101).collect();
        let batches = eval_batches(&tokens, 3, 10, 100, &Device::Cpu)?;
        let n: usize = batches.iter().map(|b| b.x.dims()[0]).sum();
        assert_eq!(n, 10);
        assert_eq!(batches[1].x.to_vec2::<u32>()?[0][0], 30);
        Ok(())
    }

    #[test]
    fn seq2seq_pads_and_masks() -> Result<()> {
        let ex = vec![
            Seq2SeqExample {
                src: vec![5, 6, 7],
                tgt: vec![8, 9],
            },
            Seq2SeqExample {
                src: vec![5],
                tgt: vec![10, 11, 12],
            },
        ];
        let b = seq2seq_batch(&ex, 0, 1, &Device::Cpu)?;
        assert_eq!(b.src.to_vec2::<u32>()?, vec![vec![5, 6, 7], vec![5, 0, 0]]);
        assert_eq!(
            b.src_mask.to_vec2::<u8>()?,
            vec![vec![1, 1, 1], vec![1, 0, 0]]
        );
        assert_eq!(
            b.tgt_in.to_vec2::<u32>()?,
            vec![vec![1, 8, 0], vec![1, 10, 11]]
        );
        assert_eq!(
            b.tgt_out.to_vec2::<u32>()?,
            vec![vec![8, 9, 0], vec![10, 11, 12]]
        );
        assert_eq!(
            b.tgt_mask.to_vec2::<u8>()?,
            vec![vec![1, 1, 0], vec![1, 1, 1]]
        );
        assert_eq!(b.n_target_tokens, 5);
        let empty = vec![Seq2SeqExample {
            src: vec![],
            tgt: vec![1],
        }];
        assert!(seq2seq_batch(&empty, 0, 1, &Device::Cpu)
            .unwrap_err()
            .to_string()
            .contains("empty source"));
        Ok(())
    }
}

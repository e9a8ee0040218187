//! The continuation task on WikiText-2.
//!
//! Cut the token stream into windows of `src_len + tgt_len` tokens; the **source** is the first
//! `src_len`, the **target** the `tgt_len` that follow. A model that predicts the target well has
//! learned English *and* how to use the source: we judge both models by target-token perplexity,
//! and compare with a decoder that sees no source at all (the language-model baseline implicit in
//! the unigram entropy).
//!
//! Why this task: it needs no labels beyond the text, every token of WikiText-2 is used, and it
//! exercises every part of the encoder–decoder (encoder, cross-attention, causal decoder).

use anyhow::{bail, Result};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use shared::batching::Seq2SeqExample;

/// Non-overlapping (source, target) windows over `tokens`, in stream order.
pub fn continuation_pairs(
    tokens: &[u32],
    src_len: usize,
    tgt_len: usize,
) -> Result<Vec<Seq2SeqExample>> {
    if src_len == 0 || tgt_len == 0 {
        bail!("continuation task: src_len ({src_len}) and tgt_len ({tgt_len}) must be positive");
    }
    let w = src_len + tgt_len;
    if tokens.len() < w {
        bail!(
            "continuation task: {} tokens are fewer than one window of {w}",
            tokens.len()
        );
    }
    Ok(tokens
        .chunks_exact(w)
        .map(|c| Seq2SeqExample {
            src: c[..src_len].to_vec(),
            tgt: c[src_len..].to_vec(),
        })
        .collect())
}

/// Pairs that predict every token of `tokens` after the first `src_len` exactly once: window `i`
/// starts at `i·tgt_len`, its source is the `src_len` tokens there and its target the (up to)
/// `tgt_len` that follow (the last one may be shorter). Each target token is predicted from
/// `src_len` tokens of source and the target tokens before it — the context and stride of the
/// word-level perplexity over a whole split.
pub fn stream_pairs(tokens: &[u32], src_len: usize, tgt_len: usize) -> Result<Vec<Seq2SeqExample>> {
    if src_len == 0 || tgt_len == 0 {
        bail!("continuation task: src_len ({src_len}) and tgt_len ({tgt_len}) must be positive");
    }
    if tokens.len() <= src_len {
        bail!(
            "continuation task: {} tokens leave nothing to predict after a source of {src_len}",
            tokens.len()
        );
    }
    Ok((0..tokens.len() - src_len)
        .step_by(tgt_len)
        .map(|s| {
            let end = (s + src_len + tgt_len).min(tokens.len());
            Seq2SeqExample {
                src: tokens[s..s + src_len].to_vec(),
                tgt: tokens[s + src_len..end].to_vec(),
            }
        })
        .collect())
}

/// The examples of training step `step`: a deterministic shuffle per epoch, so a resumed run
/// sees the same batches.
pub fn batch_for_step(
    pairs: &[Seq2SeqExample],
    batch_size: usize,
    step: usize,
    seed: u64,
) -> Vec<Seq2SeqExample> {
    let per_epoch = (pairs.len() / batch_size).max(1);
    let (epoch, i) = (step / per_epoch, step % per_epoch);
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(
        seed.wrapping_add(epoch as u64 * 7919),
    ));
    order
        .iter()
        .cycle()
        .skip(i * batch_size)
        .take(batch_size)
        .map(|&j| pairs[j].clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_split_windows_into_source_and_following_target() {
        let tokens: Vec<u32> = (0..23).collect();
        let pairs = continuation_pairs(&tokens, 3, 2).unwrap();
        assert_eq!(pairs.len(), 4);
        assert_eq!(pairs[1].src, vec![5, 6, 7]);
        assert_eq!(pairs[1].tgt, vec![8, 9]);
        assert!(continuation_pairs(&tokens, 0, 2).is_err());
        assert!(continuation_pairs(&tokens[..3], 3, 2).is_err());
    }

    #[test]
    fn stream_pairs_predict_every_token_after_the_first_source_once() {
        let tokens: Vec<u32> = (0..23).collect();
        let pairs = stream_pairs(&tokens, 3, 5).unwrap();
        let predicted: Vec<u32> = pairs.iter().flat_map(|p| p.tgt.clone()).collect();
        assert_eq!(predicted, (3..23).collect::<Vec<_>>());
        assert_eq!(pairs[1].src, vec![5, 6, 7]);
        assert_eq!(pairs[3].tgt, vec![18, 19, 20, 21, 22]);
        assert!(pairs.iter().all(|p| p.src.len() == 3));
        assert!(stream_pairs(&tokens[..3], 3, 5).is_err());
    }

    #[test]
    fn batches_are_deterministic_and_cover_an_epoch() {
        let tokens: Vec<u32> = (0..100).collect();
        let pairs = continuation_pairs(&tokens, 5, 5).unwrap();
        let a: Vec<_> = (0..5)
            .flat_map(|s| batch_for_step(&pairs, 2, s, 1))
            .collect();
        let b: Vec<_> = (0..5)
            .flat_map(|s| batch_for_step(&pairs, 2, s, 1))
            .collect();
        assert_eq!(a, b);
        let mut firsts: Vec<u32> = a.iter().map(|e| e.src[0]).collect();
        firsts.sort();
        assert_eq!(firsts, (0..10).map(|i| i * 10).collect::<Vec<_>>());
    }
}

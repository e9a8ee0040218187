//! The data of the comparison: WikiText-2 cut into (source, target) continuation pairs
//! ([`crate::task`]), `src_len` tokens of source followed by `tgt_len` of target,
//! and the special tokens that pad and start a target. For the word-level perplexity, the test
//! split also as overlapping windows whose targets cover it once ([`stream_pairs`]).

use crate::task::{continuation_pairs, stream_pairs};
use crate::Preset;
use anyhow::Result;
use candle_core::Device;
use shared::batching::{seq2seq_batch, Seq2SeqBatch, Seq2SeqExample};
use shared::tokenizer::{TokenizedWikiText, BOS, PAD};

/// The three splits as continuation pairs, batched on `dev`.
pub struct Data {
    pub train: Vec<Seq2SeqExample>,
    pub valid: Vec<Seq2SeqExample>,
    pub test: Vec<Seq2SeqExample>,
    /// The test split's every token after the first `src_len`, predicted once each.
    pub test_stream: Vec<Seq2SeqExample>,
    /// Words (+ end-of-lines) of the text `test_stream` predicts: the word-level denominator.
    pub test_stream_words: usize,
    pub pad: u32,
    pub bos: u32,
    pub dev: Device,
}

impl Data {
    /// The pairs of every split of `corpus` at the preset's `src_len → tgt_len`.
    pub fn new(corpus: &TokenizedWikiText, p: &Preset, dev: &Device) -> Result<Self> {
        let pairs = |tokens: &[u32]| continuation_pairs(tokens, p.src_len, p.tgt_len);
        let predicted = corpus
            .tokenizer
            .decode(&corpus.test[p.src_len.min(corpus.test.len())..])?;
        Ok(Self {
            train: pairs(&corpus.train)?,
            valid: pairs(&corpus.valid)?,
            test: pairs(&corpus.test)?,
            test_stream: stream_pairs(&corpus.test, p.src_len, p.tgt_len)?,
            test_stream_words: shared::wikitext::stats(&predicted).words_plus_eos,
            pad: corpus.tokenizer.special(PAD)?,
            bos: corpus.tokenizer.special(BOS)?,
            dev: dev.clone(),
        })
    }

    /// A padded batch of `examples`: `src (B, src_len)`, `tgt_in`/`tgt_out (B, tgt_len)`.
    pub fn batch(&self, examples: &[Seq2SeqExample]) -> Result<Seq2SeqBatch> {
        seq2seq_batch(examples, self.pad, self.bos, &self.dev)
    }

    /// Prints the task and the budget.
    pub fn describe(&self, p: &Preset, vocab: usize, h_unigram: f64) {
        println!(
            "   task: continue {} BPE tokens of source with the next {} (vocab {vocab}); {} train / {} valid / {} test pairs",
            p.src_len,
            p.tgt_len,
            self.train.len(),
            self.valid.len(),
            self.test.len()
        );
        println!(
            "   preset '{}': {} steps of batch {} for each model; unigram entropy {h_unigram:.3} nats",
            p.name, p.steps, p.batch
        );
    }
}

//! The loss floor a model must beat: the entropy of the unigram distribution of WikiText-2's BPE
//! tokens (a model that only learns token frequencies reaches about this validation loss).
//!
//! `WIKITEXT2_DIR=../shared/data/wikitext-2 cargo run --release -p shared --example unigram -- 1024 4096`
use shared::tokenizer::{load_corpus, Corpus};
use shared::train::unigram_entropy;

fn main() -> anyhow::Result<()> {
    shared::cpu::in_pool(run)
}

fn run() -> anyhow::Result<()> {
    let vocabs: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    for vocab in if vocabs.is_empty() {
        vec![1024]
    } else {
        vocabs
    } {
        let corpus = load_corpus(Corpus::Wikitext2, None, vocab)?;
        println!(
            "vocab {vocab}: unigram entropy {:.3} nats (train split, {} tokens)",
            unigram_entropy(&corpus.train),
            corpus.train.len()
        );
    }
    Ok(())
}

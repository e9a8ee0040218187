//! Prints WikiText-2's split statistics next to the published ones.
//!
//! `cargo run -p shared --example wikitext2 -- [--data-dir DIR]` (or `WIKITEXT2_DIR=DIR`).

use anyhow::Result;
use shared::tokenizer::WordVocab;
use shared::wikitext::{self, Split, Variant, WikiText2};

fn main() -> Result<()> {
    shared::cpu::in_pool(run)
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let data_dir = args
        .iter()
        .position(|a| a == "--data-dir")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from);
    let raw = WikiText2::load(data_dir.as_deref(), Variant::Raw)?;
    println!("WikiText-2 from {} (sha256 verified)", raw.source.display());
    let tokens = WikiText2::load(data_dir.as_deref(), Variant::Tokens).ok();
    let published = [
        (36_718, 600, 2_088_628),
        (3_760, 60, 217_646),
        (4_358, 60, 245_569),
    ];
    let mut rows = Vec::new();
    for (split, (lines, articles, toks)) in Split::ALL.iter().zip(published) {
        let s = wikitext::stats(raw.split(*split));
        let tok_count = tokens
            .as_ref()
            .map(|t| wikitext::stats(t.split(*split)).words_plus_eos);
        rows.push(vec![
            split.name().to_string(),
            format!("{} ({})", s.lines, lines),
            format!("{} ({})", s.articles, articles),
            format!("{}", s.bytes),
            tok_count.map_or("-".into(), |c| format!("{c} ({toks})")),
        ]);
    }
    shared::report::print_table(
        &[
            "split",
            "lines (published)",
            "articles (published)",
            "raw bytes",
            "tokens+<eos> (published)",
        ],
        &rows,
    );
    if let Some(t) = &tokens {
        println!(
            "word-level vocabulary: {} types (published 33,278)",
            WordVocab::build(&t.train).len()
        );
    }
    Ok(())
}

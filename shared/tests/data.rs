//! WikiText-2 loading, checksums, tokenization: on the project's own small corpus everywhere,
//! and on the real data set wherever `WIKITEXT2_DIR` points at it (CI sets it).

use shared::corpus::write_tiny_wikitext;
use shared::tokenizer::{Bpe, TokenizedWikiText, WordVocab};
use shared::wikitext::{self, read_split, stats, Split, Variant, Verify, WikiText2};
use std::path::PathBuf;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shared-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn real_data_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("WIKITEXT2_DIR")?);
    wikitext::has_variant(&dir, Variant::Raw).then_some(dir)
}

#[test]
fn missing_folder_gives_the_documented_error() {
    let err =
        WikiText2::load(Some(&PathBuf::from("/nonexistent/wikitext")), Variant::Raw).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("does not exist"), "{msg}");
    assert!(msg.contains("WIKITEXT2_DIR"), "{msg}");
    assert!(msg.contains("--data-dir"), "{msg}");
}

#[test]
fn folder_without_the_files_gives_the_documented_error() {
    let dir = temp_dir("empty");
    let msg = format!(
        "{:#}",
        WikiText2::load(Some(&dir), Variant::Raw).unwrap_err()
    );
    assert!(msg.contains("has no wiki.{train,valid,test}.raw"), "{msg}");
}

#[test]
fn corrupted_file_fails_its_checksum() {
    let dir = temp_dir("corrupt");
    write_tiny_wikitext(&dir).unwrap();
    // The tiny corpus under the official names is "corrupted" WikiText-2.
    let msg = format!(
        "{:#}",
        read_split(&dir, Split::Valid, Variant::Raw, Verify::Yes).unwrap_err()
    );
    assert!(
        msg.contains("checksum mismatch for wiki.valid.raw"),
        "{msg}"
    );
    assert!(msg.contains("4cd0f6876d07a413"), "{msg}");
    // …and loads when verification is off (the project's own corpus).
    let text = read_split(&dir, Split::Valid, Variant::Raw, Verify::No).unwrap();
    assert_eq!(stats(&text).articles, 15);
}

#[test]
fn xz_files_are_read_transparently() {
    let dir = temp_dir("xz");
    write_tiny_wikitext(&dir).unwrap();
    let plain = std::fs::read(dir.join("wiki.test.raw")).unwrap();
    let status = std::process::Command::new("xz")
        .arg("-z")
        .arg(dir.join("wiki.test.raw"))
        .status();
    if !status.map(|s| s.success()).unwrap_or(false) {
        eprintln!("xz not installed: skipping");
        return;
    }
    assert!(!dir.join("wiki.test.raw").exists());
    let text = read_split(&dir, Split::Test, Variant::Raw, Verify::No).unwrap();
    assert_eq!(text.as_bytes(), plain.as_slice());
}

#[test]
fn bpe_round_trips_and_is_cached() {
    let dir = temp_dir("bpe");
    write_tiny_wikitext(&dir).unwrap();
    let data = WikiText2::load_from_dir(&dir, Variant::Raw, Verify::No).unwrap();
    let cache = dir.join("cache");
    let tok = TokenizedWikiText::prepare(&data, 400, &cache).unwrap();
    assert_eq!(tok.tokenizer.vocab_size(), 400);
    assert_eq!(tok.tokenizer.decode(&tok.valid).unwrap(), data.valid);
    // BPE compresses: fewer tokens than bytes.
    assert!(
        tok.train.len() * 2 < data.train.len(),
        "{} tokens for {} bytes",
        tok.train.len(),
        data.train.len()
    );
    // Byte-level BPE round-trips text it never saw, including non-ASCII.
    let unseen = " Zoë's café — 東京 costs €5 .\n";
    assert_eq!(
        tok.tokenizer
            .decode(&tok.tokenizer.encode(unseen).unwrap())
            .unwrap(),
        unseen
    );
    // Second call loads from the cache and gives the same ids.
    let again = TokenizedWikiText::prepare(&data, 400, &cache).unwrap();
    assert_eq!(again.test, tok.test);
    assert!(Bpe::train(&data.train, 100).is_err());
}

#[test]
fn real_wikitext2_matches_published_statistics() {
    let Some(dir) = real_data_dir() else {
        eprintln!("WIKITEXT2_DIR not set: skipping the real-data check");
        return;
    };
    let raw = WikiText2::load(Some(&dir), Variant::Raw).unwrap();
    let s = stats(&raw.train);
    assert_eq!((s.lines, s.articles), (36_718, 600));
    assert_eq!(
        (stats(&raw.valid).articles, stats(&raw.test).articles),
        (60, 60)
    );
    let tokens = WikiText2::load(Some(&dir), Variant::Tokens).unwrap();
    let counts: Vec<usize> = Split::ALL
        .iter()
        .map(|&sp| stats(tokens.split(sp)).words_plus_eos)
        .collect();
    assert_eq!(counts, vec![2_088_628, 217_646, 245_569]);
    let vocab = WordVocab::build(&tokens.train);
    assert_eq!(vocab.len(), 33_278);
    assert_eq!(vocab.encode(&tokens.valid).len(), 217_646);
    // A BPE trained on the small corpus still round-trips real text byte for byte.
    let small = shared::corpus::tiny_split(Split::Train, 40);
    let bpe = Bpe::train(&small, 300).unwrap();
    let sample: String = raw
        .valid
        .lines()
        .take(400)
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(bpe.decode(&bpe.encode(&sample).unwrap()).unwrap(), sample);
}

//! Tokenization: a byte-level BPE trained on WikiText-2's train split (cached), and the
//! word-level vocabulary of the tokenized v1 files for perplexities comparable with the literature.
//!
//! BPE (Sennrich et al., 2016; byte-level as in GPT-2): start from the 256 byte symbols and
//! repeatedly merge the most frequent adjacent pair until the vocabulary has `vocab_size` entries.
//! Training and encoding are done once and cached under `cache/tokenizers` and `cache/tokens`,
//! keyed by vocabulary size and a hash of the training text.

use crate::wikitext::{private_temporary, sha256_hex, Split, WikiText2};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, NormalizerWrapper, PostProcessorWrapper, Tokenizer, TokenizerBuilder,
};

/// End-of-text marker between documents; also the token a model may emit to stop.
pub const EOT: &str = "<|endoftext|>";
/// Padding for sequence-to-sequence batches (never a training target).
pub const PAD: &str = "<pad>";
/// Start of the decoder's input in sequence-to-sequence models.
pub const BOS: &str = "<s>";

/// A trained byte-level BPE tokenizer.
pub struct Bpe {
    inner: Tokenizer,
    /// Where it is cached (empty for an in-memory tokenizer).
    pub path: PathBuf,
}

impl Bpe {
    /// Trains a byte-level BPE of `vocab_size` entries (special tokens included) on `text`.
    pub fn train(text: &str, vocab_size: usize) -> Result<Self> {
        if vocab_size < 256 + 3 {
            bail!("BPE vocab_size {vocab_size} is too small: it must hold the 256 bytes and 3 special tokens");
        }
        let specials = [EOT, PAD, BOS]
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect();
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let byte_level = ByteLevel::new(false, true, true);
        let mut tokenizer = TokenizerBuilder::<
            BPE,
            NormalizerWrapper,
            ByteLevel,
            PostProcessorWrapper,
            ByteLevel,
        >::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(None)
        .with_decoder(Some(byte_level))
        .build()
        .map_err(|e| anyhow!("building the BPE tokenizer: {e}"))?;
        tokenizer
            .train(&mut trainer, text.split_inclusive('\n'))
            .map_err(|e| anyhow!("training BPE: {e}"))?;
        Ok(Self {
            inner: Tokenizer::from(tokenizer),
            path: PathBuf::new(),
        })
    }

    /// Loads a tokenizer saved by [`Bpe::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("loading tokenizer {}: {e}", path.display()))?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// Saves as a Hugging Face `tokenizer.json`, written atomically ([`private_temporary`]):
    /// threads or processes caching the same tokenizer at once each leave a whole file.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = private_temporary(path);
        self.inner
            .save(&tmp, false)
            .map_err(|e| anyhow!("saving tokenizer: {e}"))?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Loads the tokenizer cached for `(vocab_size, train text)`, or trains and caches it.
    pub fn load_or_train(train_text: &str, vocab_size: usize, cache: &Path) -> Result<Self> {
        let path = cache
            .join("tokenizers")
            .join(format!("bpe-v{vocab_size}-{}.json", short_hash(train_text)));
        if path.exists() {
            return Self::load(&path);
        }
        eprintln!(
            "training a byte-level BPE tokenizer (vocab {vocab_size}) on {} MB of text …",
            train_text.len() / 1_000_000
        );
        let started = std::time::Instant::now();
        let mut bpe = Self::train(train_text, vocab_size)?;
        bpe.save(&path)?;
        bpe.path = path;
        eprintln!(
            "  done in {:.1}s → {}",
            started.elapsed().as_secs_f64(),
            bpe.path.display()
        );
        Ok(bpe)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a special token (`EOT`, `PAD`, `BOS`).
    pub fn special(&self, token: &str) -> Result<u32> {
        self.inner
            .token_to_id(token)
            .ok_or_else(|| anyhow!("tokenizer has no special token {token}"))
    }

    /// Encodes text into ids (no special tokens added). Long texts are split at line breaks and
    /// encoded in parallel; byte-level BPE never merges across a `\n`... boundary it was trained on.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let encodings = self
            .inner
            .encode_batch(lines, false)
            .map_err(|e| anyhow!("encoding: {e}"))?;
        Ok(encodings
            .iter()
            .flat_map(|e| e.get_ids().iter().copied())
            .collect())
    }

    /// Decodes ids back to text (special tokens kept, so `<pad>` shows if it appears).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("decoding: {e}"))
    }
}

/// First 16 hex digits of the sha256 of `text` (cache keys).
pub fn short_hash(text: &str) -> String {
    sha256_hex(text.as_bytes())[..16].to_string()
}

/// The three splits encoded with one tokenizer.
pub struct TokenizedWikiText {
    pub tokenizer: Bpe,
    pub train: Vec<u32>,
    pub valid: Vec<u32>,
    pub test: Vec<u32>,
}

impl TokenizedWikiText {
    /// Trains (or loads) the BPE tokenizer and encodes (or loads) every split, caching the ids as
    /// little-endian `u32` files.
    pub fn prepare(data: &WikiText2, vocab_size: usize, cache: &Path) -> Result<Self> {
        let tokenizer = Bpe::load_or_train(&data.train, vocab_size, cache)?;
        let key = format!("bpe-v{vocab_size}-{}", short_hash(&data.train));
        let mut splits = Vec::new();
        for split in Split::ALL {
            let text = data.split(split);
            let path = cache.join("tokens").join(format!(
                "{key}-{}-{}.u32",
                split.name(),
                short_hash(text)
            ));
            let ids = match read_u32s(&path) {
                Ok(ids) => ids,
                Err(_) => {
                    let ids = tokenizer.encode(text)?;
                    write_u32s(&path, &ids)?;
                    ids
                }
            };
            splits.push(ids);
        }
        let test = splits.pop().unwrap();
        let valid = splits.pop().unwrap();
        let train = splits.pop().unwrap();
        Ok(Self {
            tokenizer,
            train,
            valid,
            test,
        })
    }

    pub fn split(&self, split: Split) -> &[u32] {
        match split {
            Split::Train => &self.train,
            Split::Valid => &self.valid,
            Split::Test => &self.test,
        }
    }
}

/// Writes ids as little-endian `u32` (atomically, [`private_temporary`]).
pub fn write_u32s(path: &Path, ids: &[u32]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    let tmp = private_temporary(path);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Reads ids written by [`write_u32s`].
pub fn read_u32s(path: &Path) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() % 4 != 0 {
        bail!(
            "{} is not a u32 token file ({} bytes)",
            path.display(),
            bytes.len()
        );
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The word-level vocabulary of the tokenized v1 files: whitespace-separated words plus one
/// `<eos>` per line (33,278 types on WikiText-2's train split), for perplexities comparable
/// with the literature.
pub struct WordVocab {
    pub words: Vec<String>,
    index: HashMap<String, u32>,
}

impl WordVocab {
    pub const EOS: &'static str = "<eos>";
    pub const UNK: &'static str = "<unk>";

    /// Builds the vocabulary in order of first appearance in `train` (as PyTorch's example does).
    pub fn build(train: &str) -> Self {
        let mut vocab = Self {
            words: Vec::new(),
            index: HashMap::new(),
        };
        for line in train.split_terminator('\n') {
            for w in line.split_whitespace().chain(std::iter::once(Self::EOS)) {
                vocab.add(w);
            }
        }
        vocab.add(Self::UNK);
        vocab
    }

    fn add(&mut self, w: &str) -> u32 {
        if let Some(&i) = self.index.get(w) {
            return i;
        }
        let i = self.words.len() as u32;
        self.words.push(w.to_string());
        self.index.insert(w.to_string(), i);
        i
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Encodes text: each line's words then `<eos>`; unknown words become `<unk>`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let unk = self.index[Self::UNK];
        text.split_terminator('\n')
            .flat_map(|line| line.split_whitespace().chain(std::iter::once(Self::EOS)))
            .map(|w| self.index.get(w).copied().unwrap_or(unk))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_vocab_counts_eos_per_line_and_maps_unknowns() {
        let v = WordVocab::build(" a b \n c a\n \n");
        assert_eq!(v.words, vec!["a", "b", "<eos>", "c", "<unk>"]);
        let ids = v.encode(" a z\n");
        assert_eq!(ids, vec![0, 4, 2]);
    }

    /// Threads caching one tokenizer at the same path at once all succeed and leave a whole
    /// file (a shared temporary name made all but one fail to rename it).
    #[test]
    fn concurrent_saves_of_one_tokenizer_all_succeed() -> Result<()> {
        let bpe = Bpe::train("the cat sat on the mat. the dog sat too.\n", 280)?;
        let dir = std::env::temp_dir().join(format!("bpe-saves-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir); // a leftover of an earlier process with this pid
        let path = dir.join("tokenizer.json");
        std::thread::scope(|s| {
            let saves: Vec<_> = (0..8).map(|_| s.spawn(|| bpe.save(&path))).collect();
            saves
                .into_iter()
                .try_for_each(|h| h.join().expect("saving thread"))
        })?;
        assert_eq!(Bpe::load(&path)?.vocab_size(), bpe.vocab_size());
        let left: Vec<_> = std::fs::read_dir(&dir)?.collect::<std::io::Result<_>>()?;
        assert_eq!(left.len(), 1, "temporary files left behind: {left:?}");
        std::fs::remove_dir_all(dir)?;
        Ok(())
    }

    #[test]
    fn u32_files_round_trip() -> Result<()> {
        let path = std::env::temp_dir().join(format!("ids-{}.u32", std::process::id()));
        write_u32s(&path, &[1, 70000, 3])?;
        assert_eq!(read_u32s(&path)?, vec![1, 70000, 3]);
        std::fs::remove_file(path)?;
        Ok(())
    }
}

/// Which text a language-model experiment trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Corpus {
    /// WikiText-2 raw (found, verified or downloaded as `shared::wikitext` describes).
    Wikitext2,
    /// The project's small generated corpus (no download; for smoke tests).
    Tiny,
}

/// Loads the corpus and its BPE encoding (trained and cached on first use).
pub fn load_corpus(
    corpus: Corpus,
    data_dir: Option<&Path>,
    vocab_size: usize,
) -> Result<TokenizedWikiText> {
    let cache = crate::cache_dir();
    let data = match corpus {
        Corpus::Wikitext2 => WikiText2::load(data_dir, crate::wikitext::Variant::Raw)?,
        Corpus::Tiny => {
            let dir = cache.join("tiny-wikitext");
            crate::corpus::write_tiny_wikitext(&dir)?;
            WikiText2::load_from_dir(
                &dir,
                crate::wikitext::Variant::Raw,
                crate::wikitext::Verify::No,
            )?
        }
    };
    TokenizedWikiText::prepare(&data, vocab_size, &cache)
}

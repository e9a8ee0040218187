//! WikiText-2 (Merity et al., 2016): found, decompressed, verified, or downloaded.
//!
//! Where the files are looked for, in order:
//! 1. the folder given by `--data-dir`, else by `$WIKITEXT2_DIR`;
//! 2. the project's cache, `datasets/cache/wikitext-2/` (or `$MODULE08_CACHE/wikitext-2/`);
//! 3. a `shared/data/wikitext-2/` folder beside the project (`../shared/data/wikitext-2`, where
//!    this course's checkouts keep it);
//! 4. a download of `Salesforce/wikitext` (`wikitext-2-raw-v1`, parquet) through hf-hub into
//!    the cache — raw files only (the word-level `.tokens` files come from a folder).
//!
//! A folder may hold `wiki.{train,valid,test}.{raw,tokens}` plain or xz-compressed (`.xz`).
//! The sha256 of every *decompressed* official file is checked against [`SHA256`].

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// One of the three splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Valid, Split::Test];
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

/// The raw text (`wikitext-2-raw-v1`) or the word-level tokenized text with `<unk>` (`wikitext-2-v1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    Raw,
    Tokens,
}

impl Variant {
    pub fn extension(self) -> &'static str {
        match self {
            Variant::Raw => "raw",
            Variant::Tokens => "tokens",
        }
    }
}

/// `wiki.<split>.<raw|tokens>`
pub fn file_name(split: Split, variant: Variant) -> String {
    format!("wiki.{}.{}", split.name(), variant.extension())
}

/// sha256 of the decompressed official files (public facts of the data set).
pub const SHA256: [(&str, &str); 6] = [
    (
        "wiki.train.raw",
        "6707892fa3788b5ab9ed78ab5ff37d9fe825f6011a2ad4fcd6a6d467f0e7da57",
    ),
    (
        "wiki.valid.raw",
        "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
    ),
    (
        "wiki.test.raw",
        "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
    ),
    (
        "wiki.train.tokens",
        "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
    ),
    (
        "wiki.valid.tokens",
        "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    ),
    (
        "wiki.test.tokens",
        "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    ),
];

fn expected_sha256(name: &str) -> Option<&'static str> {
    SHA256.iter().find(|(n, _)| *n == name).map(|(_, h)| *h)
}

/// Whether to check sha256 sums: always for the real data set; the project's own small test
/// corpus (see [`crate::corpus`]) is not WikiText-2 and is loaded with `Verify::No`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    Yes,
    No,
}

/// The three splits of one variant, as text.
#[derive(Debug, Clone)]
pub struct WikiText2 {
    pub train: String,
    pub valid: String,
    pub test: String,
    /// The folder the text came from.
    pub source: PathBuf,
}

impl WikiText2 {
    pub fn split(&self, split: Split) -> &str {
        match split {
            Split::Train => &self.train,
            Split::Valid => &self.valid,
            Split::Test => &self.test,
        }
    }

    /// Loads the raw (or tokenized) splits, finding the data as the module docs describe.
    pub fn load(data_dir: Option<&Path>, variant: Variant) -> Result<Self> {
        let dir = locate(data_dir, variant)?;
        Self::load_from_dir(&dir, variant, Verify::Yes)
    }

    /// Loads all three splits from `dir`.
    pub fn load_from_dir(dir: &Path, variant: Variant, verify: Verify) -> Result<Self> {
        let read = |split| read_split(dir, split, variant, verify);
        Ok(Self {
            train: read(Split::Train)?,
            valid: read(Split::Valid)?,
            test: read(Split::Test)?,
            source: dir.to_path_buf(),
        })
    }
}

/// The message every "data not found" error ends with.
pub fn how_to_provide() -> String {
    format!(
        "WikiText-2 was not found. Provide it in one of these ways:\n  \
         * pass --data-dir DIR or set WIKITEXT2_DIR=DIR, where DIR holds wiki.{{train,valid,test}}.raw \
         (and .tokens), plain or .xz\n    (in this course's checkout: WIKITEXT2_DIR=../shared/data/wikitext-2)\n  \
         * copy those files into the cache folder {}\n  \
         * or run once with network access: the raw files are then downloaded from the Hugging Face \
         Hub (Salesforce/wikitext, wikitext-2-raw-v1) into that cache.",
        crate::cache_dir().join("wikitext-2").display()
    )
}

/// Whether `dir` holds all three splits of `variant` (plain or `.xz`).
pub fn has_variant(dir: &Path, variant: Variant) -> bool {
    Split::ALL.iter().all(|&s| {
        let f = dir.join(file_name(s, variant));
        f.exists()
            || dir
                .join(format!("{}.xz", f.file_name().unwrap().to_string_lossy()))
                .exists()
    })
}

/// Finds the folder holding the data (flag, env var, cache, then download of the raw variant).
pub fn locate(data_dir: Option<&Path>, variant: Variant) -> Result<PathBuf> {
    let explicit = data_dir
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("WIKITEXT2_DIR").map(PathBuf::from));
    if let Some(dir) = explicit {
        if !dir.is_dir() {
            bail!(
                "the WikiText-2 folder {} does not exist.\n{}",
                dir.display(),
                how_to_provide()
            );
        }
        if !has_variant(&dir, variant) {
            bail!(
                "{} has no wiki.{{train,valid,test}}.{}[.xz] files.\n{}",
                dir.display(),
                variant.extension(),
                how_to_provide()
            );
        }
        return Ok(dir);
    }
    let cache = crate::cache_dir().join("wikitext-2");
    if has_variant(&cache, variant) {
        return Ok(cache);
    }
    let beside = beside_the_project();
    if has_variant(&beside, variant) {
        return Ok(beside);
    }
    if variant == Variant::Tokens {
        bail!(
            "the word-level files (wiki.*.tokens) are only read from a folder.\n{}",
            how_to_provide()
        );
    }
    download_raw(&cache).with_context(how_to_provide)?;
    Ok(cache)
}

/// `../shared/data/wikitext-2` relative to the workspace root.
pub fn beside_the_project() -> PathBuf {
    crate::workspace_root()
        .join("..")
        .join("shared")
        .join("data")
        .join("wikitext-2")
}

/// Reads one split, decompressing `.xz` if needed, and verifies its sha256.
pub fn read_split(dir: &Path, split: Split, variant: Variant, verify: Verify) -> Result<String> {
    let name = file_name(split, variant);
    let plain = dir.join(&name);
    let xz = dir.join(format!("{name}.xz"));
    let bytes = if plain.exists() {
        std::fs::read(&plain).with_context(|| format!("reading {}", plain.display()))?
    } else if xz.exists() {
        let file = std::fs::File::open(&xz).with_context(|| format!("opening {}", xz.display()))?;
        let mut out = Vec::new();
        xz2::read::XzDecoder::new(std::io::BufReader::new(file))
            .read_to_end(&mut out)
            .with_context(|| format!("{} is not a valid xz file", xz.display()))?;
        out
    } else {
        bail!(
            "{} has no {name} (nor {name}.xz).\n{}",
            dir.display(),
            how_to_provide()
        );
    };
    if verify == Verify::Yes {
        if let Some(expected) = expected_sha256(&name) {
            let actual = sha256_hex(&bytes);
            if actual != expected {
                bail!(
                    "checksum mismatch for {name} in {}: sha256 {actual}, expected {expected}. \
                     The file is corrupted or is not the official WikiText-2; delete it and provide \
                     the original.\n{}",
                    dir.display(),
                    how_to_provide()
                );
            }
        }
    }
    String::from_utf8(bytes).with_context(|| format!("{name} is not UTF-8"))
}

/// Hex sha256 of a byte string.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Downloads the raw splits as parquet from the Hugging Face Hub and writes them as
/// `wiki.<split>.raw` into `cache`. Each parquet row is one line of the original file; empty rows
/// are the original's blank `" "` lines.
fn download_raw(cache: &Path) -> Result<()> {
    use parquet::file::reader::FileReader;
    use parquet::record::RowAccessor;
    eprintln!(
        "WikiText-2 not found locally: downloading Salesforce/wikitext (wikitext-2-raw-v1) …"
    );
    let api = hf_hub::HFClientSync::new().context("creating the Hugging Face Hub client")?;
    let repo = api.dataset("Salesforce", "wikitext");
    std::fs::create_dir_all(cache)?;
    for split in Split::ALL {
        let hub_split = match split {
            Split::Train => "train",
            Split::Valid => "validation",
            Split::Test => "test",
        };
        let remote = format!("wikitext-2-raw-v1/{hub_split}-00000-of-00001.parquet");
        let local = repo
            .download_file()
            .filename(&remote)
            .send()
            .with_context(|| format!("downloading {remote} (offline?)"))?;
        let reader =
            parquet::file::reader::SerializedFileReader::new(std::fs::File::open(&local)?)?;
        let mut text = String::new();
        for row in reader.get_row_iter(None)? {
            let row = row?;
            let line = row.get_string(0)?;
            text.push_str(if line.is_empty() { " \n" } else { line });
        }
        let name = file_name(split, Variant::Raw);
        let actual = sha256_hex(text.as_bytes());
        if Some(actual.as_str()) != expected_sha256(&name) {
            eprintln!(
                "warning: the downloaded {name} differs from the official file (sha256 {actual}); \
                 results may differ slightly from runs on the original files"
            );
        }
        let tmp = private_temporary(&cache.join(&name));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, cache.join(&name))?;
    }
    Ok(())
}

/// Published statistics of one split: lines, articles, and the word count with one `<eos>` per
/// line (the convention of the WikiText paper and of PyTorch's word_language_model).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SplitStats {
    pub lines: usize,
    pub articles: usize,
    pub words: usize,
    pub words_plus_eos: usize,
    pub bytes: usize,
}

/// Counts lines, words (whitespace-separated, like Python's `str.split`) and articles (title
/// lines ` = Title = ` with a blank line before and after).
pub fn stats(text: &str) -> SplitStats {
    let lines: Vec<&str> = text.split_terminator('\n').collect();
    let words: usize = lines.iter().map(|l| l.split_whitespace().count()).sum();
    let is_blank = |l: &str| l.trim().is_empty();
    let is_title = |l: &str| {
        let t = l.trim();
        t.starts_with("= ") && t.ends_with(" =") && !t.starts_with("= =")
    };
    let articles = (0..lines.len())
        .filter(|&i| is_title(lines[i]))
        .filter(|&i| {
            i > 0 && is_blank(lines[i - 1]) && i + 1 < lines.len() && is_blank(lines[i + 1])
        })
        .count();
    SplitStats {
        lines: lines.len(),
        articles,
        words,
        words_plus_eos: words + lines.len(),
        bytes: text.len(),
    }
}

/// A temporary file beside `path` that no other writer (thread or process) uses: write it, then
/// rename it to `path`, so that writers caching the same file at once each leave a whole one.
pub(crate) fn private_temporary(path: &Path) -> PathBuf {
    static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map_or("file".into(), |f| f.to_string_lossy());
    path.with_file_name(format!(".{name}.{}-{n}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_lines_words_and_articles() {
        let text = " \n = Alpha = \n \n A b c .\n = = Part = = \n \n = Beta = \n \n D e\n";
        let s = stats(text);
        assert_eq!(s.lines, 9);
        assert_eq!(s.words, 3 + 4 + 5 + 3 + 2);
        assert_eq!(s.words_plus_eos, s.words + 9);
        assert_eq!(s.articles, 2);
    }

    #[test]
    fn sha256_of_known_string() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

//! A small corpus the project writes itself, in WikiText-2's layout, so that tests and
//! `--quick` smoke runs work on a fresh clone without the real data set.
//!
//! It is generated from a tiny grammar with a fixed seed: articles with ` = Title = ` lines,
//! ` = = Section = = ` headings, and sentences built from subject–verb–object templates. The
//! text is regular enough that a language model's loss falls quickly, and varied enough that a
//! model cannot memorise it in a few steps.

use crate::wikitext::{file_name, Split, Variant};
use anyhow::Result;
use std::path::Path;

const SUBJECTS: &[&str] = &[
    "the river",
    "the old castle",
    "a young engineer",
    "the council",
    "the orchestra",
    "the first ship",
    "the northern army",
    "a local poet",
    "the railway company",
    "the museum",
    "the storm",
    "the king",
];
const VERBS: &[&str] = &[
    "built",
    "crossed",
    "described",
    "defended",
    "recorded",
    "opened",
    "destroyed",
    "visited",
    "praised",
    "replaced",
    "discovered",
    "followed",
];
const OBJECTS: &[&str] = &[
    "the bridge",
    "a new harbour",
    "the eastern valley",
    "the cathedral",
    "a famous song",
    "the island",
    "the city walls",
    "the first railway",
    "a small village",
    "the treaty",
    "the great library",
    "the mountain pass",
];
const TIMES: &[&str] = &[
    "in 1842",
    "in the spring of 1907",
    "during the war",
    "in 1766",
    "after the flood",
    "in the following year",
];
const TOPICS: &[&str] = &[
    "History",
    "Geography",
    "Reception",
    "Legacy",
    "Construction",
    "Background",
];
const NAMES: &[&str] = &[
    "Valdoria",
    "Kestrel Bay",
    "Marrow Hill",
    "Asterfield",
    "Port Lune",
    "Glenmoor",
    "Tarrow",
    "Elmsby",
];

/// A tiny deterministic pseudo-random generator (SplitMix64), so the corpus never changes.
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// One generated article in WikiText layout (lines begin with a space; blank lines are `" "`).
fn article(rng: &mut SplitMix, title: &str) -> String {
    let mut out = format!(" \n = {title} = \n \n");
    for section in 0..2 {
        if section > 0 {
            out.push_str(&format!(" = = {} = = \n \n", rng.pick(TOPICS)));
        }
        for _ in 0..3 {
            let mut paragraph = String::from(" ");
            for _ in 0..4 {
                let s = rng.pick(SUBJECTS);
                let sentence = format!(
                    "{}{} {} {} {} . ",
                    s[..1].to_uppercase(),
                    &s[1..],
                    rng.pick(VERBS),
                    rng.pick(OBJECTS),
                    rng.pick(TIMES)
                );
                paragraph.push_str(&sentence);
            }
            paragraph.push('\n');
            out.push_str(&paragraph);
        }
        out.push_str(" \n");
    }
    out
}

/// Text of one split: `articles` generated articles (different seeds per split).
pub fn tiny_split(split: Split, articles: usize) -> String {
    let seed = match split {
        Split::Train => 1,
        Split::Valid => 2,
        Split::Test => 3,
    };
    let mut rng = SplitMix(seed);
    (0..articles)
        .map(|i| {
            let title = format!("{} {}", rng.pick(NAMES), i + 1);
            article(&mut rng, &title)
        })
        .collect()
}

/// Writes `wiki.{train,valid,test}.{raw,tokens}` of the tiny corpus into `dir` (train 120
/// articles ≈ 60 KB, valid and test 15 each) and returns `dir`.
pub fn write_tiny_wikitext(dir: &Path) -> Result<&Path> {
    std::fs::create_dir_all(dir)?;
    for (split, n) in [(Split::Train, 120), (Split::Valid, 15), (Split::Test, 15)] {
        let text = tiny_split(split, n);
        for variant in [Variant::Raw, Variant::Tokens] {
            std::fs::write(dir.join(file_name(split, variant)), &text)?;
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_corpus_is_deterministic_and_wikitext_shaped() {
        let a = tiny_split(Split::Train, 5);
        assert_eq!(a, tiny_split(Split::Train, 5));
        assert_ne!(a, tiny_split(Split::Valid, 5));
        assert!(a.lines().all(|l| l.starts_with(' ')));
        assert_eq!(crate::wikitext::stats(&a).articles, 5);
    }
}

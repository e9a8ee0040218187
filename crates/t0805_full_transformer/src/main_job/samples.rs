//! Greedy continuations of three validation sources by every contender, printed beside the
//! reference. A weak model loops; held-out loss is the measure, samples are for looking.
//! Metric `samples`: `[{source, reference, <model>: continuation…}]`.

use super::comparison::Contender;
use super::data::Data;
use anyhow::Result;
use shared::tokenizer::Bpe;

/// Samples `min(tgt_len, 24)` tokens after three evenly spaced validation sources.
pub fn greedy(
    contenders: &[Contender],
    data: &Data,
    tok: &Bpe,
    tgt_len: usize,
) -> Result<Vec<serde_json::Value>> {
    let n = tgt_len.min(24);
    let step = (data.valid.len() / 3).max(1);
    let mut samples = Vec::new();
    for ex in data.valid.iter().step_by(step).take(3) {
        let source = tok.decode(&ex.src)?;
        let reference = tok.decode(&ex.tgt[..n])?;
        println!("\nsource     …{}", one_line(&last_chars(&source, 120)));
        println!("reference  {}", one_line(&reference));
        let mut record = serde_json::json!({ "source": source, "reference": reference });
        for c in contenders {
            let text = tok.decode(&c.model.generate(&ex.src, data.bos, n)?)?;
            println!("{:<11} {}", c.name, one_line(&text));
            record[c.name] = text.into();
        }
        samples.push(record);
    }
    Ok(samples)
}

/// The last `n` characters of `s`.
fn last_chars(s: &str, n: usize) -> String {
    let skip = s.chars().count().saturating_sub(n);
    s.chars().skip(skip).collect()
}

/// `s` with its line breaks shown as `⏎`.
fn one_line(s: &str) -> String {
    s.replace('\n', "⏎")
}

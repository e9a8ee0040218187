//! Experiment 1: KV-cache bytes per token, `2 × n_layers × n_kv_heads × d_head × bytes`, for
//! MHA, GQA and MQA — our model and the shapes of LLaMA-2-7B (32 K/V heads) and LLaMA-3-8B
//! (the same 32 × 128 query heads with 8 K/V heads).

use super::{kv_variants, variant_name, Lab};
use anyhow::Result;
use shared::report::{bar_chart, print_table, RunReport};
use t0807_grouped_query_attention::kv_cache_bytes_per_token;

/// A model shape whose cache is tabulated: `(name, n_layers, n_heads, d_head, bytes/element)`.
type CacheShape = (String, usize, usize, usize, usize);

/// Prints the table, writes `kv_cache_bytes.png` (the LLaMA-2-7B shape) and the metrics
/// `kv_bytes_per_token.<shape>.<variant>`.
pub fn run(lab: &Lab, report: &mut RunReport) -> Result<()> {
    let bytes = lab.dtype.size_in_bytes();
    let shapes: [CacheShape; 3] = [
        (
            format!("ours ({})", lab.dtype.as_str()),
            lab.shape.n_layers,
            lab.shape.n_heads,
            lab.d_head(),
            bytes,
        ),
        ("LLaMA-2-7B shape (fp16)".into(), 32, 32, 128, 2),
        ("LLaMA-3-8B shape (fp16)".into(), 32, 32, 128, 2),
    ];
    let mut rows = vec![];
    let (mut labels, mut kib) = (vec![], vec![]);
    for (name, layers, heads, d_head, bytes) in shapes {
        for k in kv_variants(heads, &[8, 4, 2, 1]) {
            let label = variant_name(k, heads);
            let b = kv_cache_bytes_per_token(layers, k, d_head, bytes);
            let note = if name.starts_with("LLaMA-3") && k == 8 {
                " ← LLaMA-3-8B"
            } else if name.starts_with("LLaMA-2") && k == heads {
                " ← LLaMA-2-7B"
            } else {
                ""
            };
            rows.push(vec![
                name.clone(),
                format!("{label}{note}"),
                k.to_string(),
                format!("{b}"),
                format!("{:.2}", b as f64 * 4096.0 / (1u64 << 30) as f64),
            ]);
            report.metric(&format!("kv_bytes_per_token.{name}.{label}"), b);
            if name.starts_with("LLaMA-2") {
                labels.push(label);
                kib.push(b as f64 / 1024.0);
            }
        }
    }
    let header = [
        "shape",
        "attention",
        "K/V heads",
        "bytes/token",
        "GiB @ 4096 tokens",
    ];
    print_table(&header, &rows);
    bar_chart(
        &lab.out_dir.join("kv_cache_bytes.png"),
        "KV cache per token, 32 layers × d_head 128, fp16",
        "KiB per token",
        &labels,
        &kib,
    )?;
    Ok(())
}

//! Heads split the width, they do not add parameters: `W_q, W_k, W_v, W_o` are `(d, d)` whatever
//! the number of heads `h` (each head works in `d_head = d / h` dimensions). Giving each of `h`
//! heads the full width instead would cost `h·3d² + d·(h·d)`.

use super::Lab;
use anyhow::Result;
use candle_core::DType;
use candle_nn::{VarBuilder, VarMap};
use serde_json::json;
use shared::params::count_params;
use shared::report::{print_table, RunReport};
use t0802_multi_head_attention::{MhaConfig, MultiHeadAttention};

/// Counts the attention layer's parameters for each head count, prints the table and records it
/// as `attention_params`.
pub fn run(lab: &Lab, heads: &[usize], report: &mut RunReport) -> Result<()> {
    let d = lab.d_model;
    let mut rows = Vec::new();
    let mut records = Vec::new();
    for &h in heads {
        let vm = VarMap::new();
        MultiHeadAttention::new(
            VarBuilder::from_varmap(&vm, DType::F32, &lab.device),
            MhaConfig::new(d, h),
        )?;
        let measured = count_params(&vm);
        let single_same_width = 4 * d * d; // W_q, W_k, W_v (d, d) and W_o (d, d)
        let full_width_heads = h * 3 * d * d + d * h * d; // h heads of width d each, W_o (d, h·d)
        rows.push(vec![
            h.to_string(),
            (d / h).to_string(),
            measured.to_string(),
            single_same_width.to_string(),
            full_width_heads.to_string(),
        ]);
        records.push(json!({"n_heads": h, "d_head": d / h, "mha_params": measured,
            "single_head_same_total_width": single_same_width, "h_heads_each_full_width": full_width_heads}));
    }
    println!("\n-- parameter count of the attention layer (d_model = {d})");
    print_table(
        &[
            "heads",
            "d_head",
            "multi-head (measured)",
            "one head of width d_model",
            "h heads of full width",
        ],
        &rows,
    );
    report.metric("attention_params", records);
    Ok(())
}

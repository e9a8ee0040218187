//! Experiment 3: uptraining (Ainslie et al., 2023). The trained MHA model becomes GQA by
//! mean-pooling the K and V projections of each group of heads,
//! `(n_heads·d_head, d_model)` → `(n_kv·d_head, d_model)`, every other parameter copied; then a
//! short fine-tune (a fifth of the budget at a third of the learning rate) recovers the loss.

use super::quality::Quality;
use super::{valid_points, Lab, TrainBudget};
use anyhow::Result;
use candle_core::Tensor;
use candle_nn::VarMap;
use shared::params::named_vars;
use shared::report::RunReport;
use shared::tokenizer::TokenizedWikiText;
use std::collections::HashMap;
use t0807_grouped_query_attention::mean_pool_kv_heads;

/// Pools MHA → GQA-`n_heads/4` (MQA when 4 does not divide the heads), evaluates before and
/// after the fine-tune and compares with the variant trained from scratch (metric `uptraining`).
pub fn run(
    lab: &Lab,
    data: &TokenizedWikiText,
    quality: &Quality,
    report: &mut RunReport,
) -> Result<()> {
    let h = lab.shape.n_heads;
    let target_kv = if h.is_multiple_of(4) { h / 4 } else { 1 };
    let (mha_vm, mha_lm) = &quality.mha;
    let (up_vm, up_lm) = lab.init(target_kv)?;
    pool_into(mha_vm, &up_vm, h, target_kv)?;
    let mha_loss = lab.evaluate(mha_lm, data)?;
    let before = lab.evaluate(&up_lm, data)?;
    let up_steps = (lab.steps / 5).max(5);
    // fresh windows: a different batch seed than pre-training
    let budget = TrainBudget {
        steps: up_steps,
        lr: lab.lr / 3.0,
        seed: lab.seed + 1,
    };
    let curve = lab.train("uptrain", (&up_vm, &up_lm), data, budget)?;
    let after = curve.final_valid_loss().unwrap_or(f64::NAN);
    let scratch = quality
        .variants
        .iter()
        .find(|v| v.n_kv == target_kv)
        .map(|v| v.val_loss);
    println!(
        "   uptraining MHA → GQA-{target_kv}: MHA {mha_loss:.3}, pooled {before:.3}, after {up_steps} steps {after:.3} (GQA-{target_kv} from scratch: {})",
        scratch.map_or("-".into(), |s| format!("{s:.3}"))
    );
    report.metric(
        "uptraining",
        serde_json::json!({"n_kv_heads": target_kv, "mha_val_loss": mha_loss,
            "pooled_val_loss": before, "finetune_steps": up_steps, "after_val_loss": after,
            "scratch_val_loss": scratch, "curve": valid_points(&curve)}),
    );
    Ok(())
}

/// Sets every parameter of `grouped` from `mha` of the same names: `k_proj` and `v_proj`
/// mean-pooled from `n_heads` to `n_kv` heads, the rest copied.
fn pool_into(mha: &VarMap, grouped: &VarMap, n_heads: usize, n_kv: usize) -> Result<()> {
    let source: HashMap<String, Tensor> = named_vars(mha)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    for (name, var) in named_vars(grouped) {
        let src = &source[&name];
        let value = if name.ends_with("k_proj") || name.ends_with("v_proj") {
            mean_pool_kv_heads(src, n_heads, n_kv)?
        } else {
            src.clone()
        };
        var.set(&value)?;
    }
    Ok(())
}

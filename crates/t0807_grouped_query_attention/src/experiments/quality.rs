//! Experiment 2: quality at equal budget. MHA (rung 1), GQA and MQA variants of rung 2, same
//! data, same initial random stream, same steps: validation loss against K/V heads.

use super::{kv_variants, valid_points, variant_name, Lab, TrainBudget};
use anyhow::Result;
use candle_nn::VarMap;
use shared::params::count_params;
use shared::report::{line_chart, print_table, Axes, RunReport, Series};
use shared::tokenizer::TokenizedWikiText;
use t0804_transformer_block::DecoderOnlyLm;
use t0807_grouped_query_attention::kv_cache_bytes_per_token;

/// One trained variant.
pub struct Variant {
    pub name: String,
    pub n_kv: usize,
    pub params: usize,
    pub val_loss: f64,
}

/// The trained variants, and the MHA model kept for uptraining.
pub struct Quality {
    pub variants: Vec<Variant>,
    pub mha: (VarMap, DecoderOnlyLm),
}

/// Trains every variant for `lab.steps` steps; metrics `quality.<variant>` and the figure
/// `quality_val_loss.png`.
pub fn run(lab: &Lab, data: &TokenizedWikiText, report: &mut RunReport) -> Result<Quality> {
    let h = lab.shape.n_heads;
    let (mut variants, mut curves, mut mha) = (vec![], vec![], None);
    for k in kv_variants(h, &[4, 2, 1]) {
        let name = variant_name(k, h);
        let (varmap, lm) = lab.init(k)?;
        let budget = TrainBudget {
            steps: lab.steps,
            lr: lab.lr,
            seed: lab.seed,
        };
        let curve = lab.train(&name, (&varmap, &lm), data, budget)?;
        let points = valid_points(&curve);
        let val_loss = curve.final_valid_loss().unwrap_or(f64::NAN);
        let params = count_params(&varmap);
        report.metric(
            &format!("quality.{name}"),
            serde_json::json!({"n_kv_heads": k, "params": params, "val_loss": val_loss,
                "val_ppl": val_loss.exp(), "train_s": curve.wall_s, "curve": points}),
        );
        curves.push(Series::new(&name, points));
        variants.push(Variant {
            name,
            n_kv: k,
            params,
            val_loss,
        });
        if k == h {
            mha = Some((varmap, lm));
        }
    }
    line_chart(
        &lab.out_dir.join("quality_val_loss.png"),
        "Validation loss: MHA vs GQA vs MQA, same budget",
        "step",
        "validation loss",
        &curves,
        Axes::default(),
    )?;
    Ok(Quality {
        variants,
        mha: mha.expect("MHA is always the first variant"),
    })
}

/// The closing table: K/V heads, parameters, validation loss and perplexity, cache per token.
pub fn print_summary(lab: &Lab, quality: &Quality) {
    let bytes = lab.dtype.size_in_bytes();
    let rows: Vec<Vec<String>> = quality
        .variants
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.n_kv.to_string(),
                v.params.to_string(),
                format!("{:.3}", v.val_loss),
                format!("{:.1}", v.val_loss.exp()),
                kv_cache_bytes_per_token(lab.shape.n_layers, v.n_kv, lab.d_head(), bytes)
                    .to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "attention",
            "K/V heads",
            "params",
            "val loss",
            "val ppl",
            "KV bytes/token",
        ],
        &rows,
    );
}

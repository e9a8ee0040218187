//! Experiment 1, correctness: three f32 implementations (8-01's naive attention, the tiled
//! tensor ops, the FlashAttention custom op) against naive attention in float64, for the output
//! and for the gradients of all three inputs.

use super::common::{max_rel, randn, tensor_ops, with_grads, Attn};
use super::lesson::Lesson;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use shared::report::print_table;
use t0809_flash_attention::*;

/// One shape: `(batch, heads, n_q, n_k, d_head, causal)`.
type Case = (usize, usize, usize, usize, usize, bool);

/// The implementations checked, by the name the table and the report use.
const IMPLEMENTATIONS: [(&str, Attn); 3] = [
    ("naive (t0801)", naive_attention),
    ("tiled tensor ops", tensor_ops),
    ("custom op", flash_attention),
];

/// Prints the error table and records it as the `correctness` metric.
pub fn run(lesson: &mut Lesson) -> Result<()> {
    println!("\n-- 1. correctness (f32 on the CPU; errors are max |x − ref| / (1 + |ref|), ref = float64 naive)");
    let mut rows = Vec::new();
    let mut correctness = Vec::new();
    for case in cases(lesson.quick) {
        let (row, json) = check_case(&lesson.dev, case)?;
        rows.push(row);
        correctness.push(json);
    }
    print_table(
        &[
            "(b,h,n_q,n_k,d)",
            "causal",
            "naive out/grad",
            "tiled out/grad",
            "custom op out/grad",
        ],
        &rows,
    );
    lesson.report.metric("correctness", &correctness);
    Ok(())
}

/// Causal and not, square and rectangular (`n_q ≠ n_k`, with the causal diagonal aligned to the
/// end), down to a single query row.
fn cases(quick: bool) -> Vec<Case> {
    if quick {
        vec![(1, 2, 70, 70, 32, true), (1, 2, 40, 100, 32, false)]
    } else {
        vec![
            (2, 4, 256, 256, 64, false),
            (2, 4, 256, 256, 64, true),
            (1, 4, 100, 300, 64, true),
            (1, 2, 1, 333, 128, true),
        ]
    }
}

/// Draws `Q (b, h, n_q, d)`, `K, V (b, h, n_k, d)` and the output weights `W (b, h, n_q, d)`,
/// computes the float64 reference, and returns the table row and the report entry with the
/// errors of every implementation.
fn check_case(dev: &Device, case: Case) -> Result<(Vec<String>, serde_json::Value)> {
    let (b, h, n_q, n_k, d, causal) = case;
    let (q, k, v, w) = (
        randn(&[b, h, n_q, d], dev)?,
        randn(&[b, h, n_k, d], dev)?,
        randn(&[b, h, n_k, d], dev)?,
        randn(&[b, h, n_q, d], dev)?,
    );
    let scale = default_softmax_scale(d);
    let f64s = |t: &Tensor| t.to_dtype(DType::F64);
    let (ref_o, ref_g) = with_grads(
        naive_attention,
        &f64s(&q)?,
        &f64s(&k)?,
        &f64s(&v)?,
        &f64s(&w)?,
        scale,
        causal,
    )?;
    let mut errs = serde_json::Map::new();
    let mut row = vec![format!("({b},{h},{n_q},{n_k},{d})"), causal.to_string()];
    for (name, f) in IMPLEMENTATIONS {
        let (o, g) = with_grads(f, &q, &k, &v, &w, scale, causal)?;
        let e_o = max_rel(&o, &ref_o)?;
        let e_g = max_rel_all(&g, &ref_g)?;
        row.push(format!("{e_o:.1e} / {e_g:.1e}"));
        errs.insert(
            name.to_string(),
            serde_json::json!({"output": e_o, "grads": e_g}),
        );
    }
    let json = serde_json::json!({"shape": [b, h, n_q, n_k, d], "causal": causal, "errors": errs});
    Ok((row, json))
}

/// The largest [`max_rel`] over pairs of tensors (here `[dQ, dK, dV]` against the reference's).
fn max_rel_all(got: &[Tensor], reference: &[Tensor]) -> Result<f64> {
    Ok(got
        .iter()
        .zip(reference)
        .map(|(a, b)| max_rel(a, b))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .fold(0.0, f64::max))
}

//! **Gradient per block at initialisation.** One batch `(batch, seq_len)` through a fresh stack,
//! one backward pass, and the norm of the gradient of each block's parameters
//! `‖∂loss/∂θ_block_i‖`, for pre- and post-norm. A deeper stack (at least 8 blocks) than the
//! training runs' shows best how post-norm rescales the gradient at every layer while pre-norm's
//! identity path carries it to the early blocks.
//!
//! Figure: `grad_norm_by_layer.png`; metric `grad_norm_by_layer_at_init`.

use super::model::{fresh_lm, model_config, Shape};
use anyhow::Result;
use candle_core::{DType, Device};
use shared::batching::LmBatcher;
use shared::report::{line_chart, Axes, Series};
use shared::train::grad_norm;
use std::path::Path;
use t0804_transformer_block::NormPlacement;

/// The gradient norm of every block, index 0 nearest the embeddings, for one placement.
pub struct LayerNorms {
    pub placement: NormPlacement,
    pub norms: Vec<f64>,
}

/// Measures [`LayerNorms`] for pre- and post-norm on a stack twice as deep as `shape` (≥ 8
/// blocks), both on the same first training batch.
pub fn run(
    shape: &Shape,
    train: &[u32],
    seed: u64,
    dtype: DType,
    dev: &Device,
) -> Result<(Shape, Vec<LayerNorms>)> {
    let deep = Shape {
        n_layers: (shape.n_layers * 2).max(8),
        ..*shape
    };
    let by_layer = [NormPlacement::Pre, NormPlacement::Post]
        .into_iter()
        .map(|placement| {
            let norms = block_grad_norms(&deep, placement, train, seed, dtype, dev)?;
            Ok(LayerNorms { placement, norms })
        })
        .collect::<Result<_>>()?;
    Ok((deep, by_layer))
}

/// `‖∂loss/∂θ‖` over the parameters named `blocks.{i}.*`, for each block `i` of a fresh model.
fn block_grad_norms(
    deep: &Shape,
    placement: NormPlacement,
    train: &[u32],
    seed: u64,
    dtype: DType,
    dev: &Device,
) -> Result<Vec<f64>> {
    let (varmap, lm) = fresh_lm(&model_config(deep, placement), seed, dtype, dev)?;
    let batch = LmBatcher::new(deep.batch, deep.seq_len, seed).batch(train, 0, dev)?;
    let grads = lm.loss(&batch.x, &batch.y)?.backward()?;
    let vars = shared::params::named_vars(&varmap);
    (0..deep.n_layers)
        .map(|i| {
            let prefix = format!("blocks.{i}.");
            let block: Vec<_> = vars
                .iter()
                .filter(|(n, _)| n.starts_with(&prefix))
                .cloned()
                .collect();
            grad_norm(&grads, &block)
        })
        .collect()
}

/// `grad_norm_by_layer.png`: gradient norm against block index, log scale.
pub fn plot(by_layer: &[LayerNorms], n_layers: usize, out_dir: &Path) -> Result<()> {
    let series: Vec<Series> = by_layer
        .iter()
        .map(|l| {
            Series::new(
                format!("{:?}-norm", l.placement),
                l.norms
                    .iter()
                    .enumerate()
                    .map(|(i, g)| (i as f64, *g))
                    .collect(),
            )
        })
        .collect();
    line_chart(
        &out_dir.join("grad_norm_by_layer.png"),
        &format!("Gradient norm per block at initialisation ({n_layers} blocks)"),
        "block index (0 = nearest the embeddings)",
        "‖∂loss/∂θ_block‖",
        &series,
        Axes {
            log_x: false,
            log_y: true,
        },
    )
}

/// The `results.json` value: `[(placement, [norm per block])]`.
pub fn metric(by_layer: &[LayerNorms]) -> Vec<(String, Vec<f64>)> {
    by_layer
        .iter()
        .map(|l| (format!("{:?}", l.placement), l.norms.clone()))
        .collect()
}

/// One line: the first and last block's gradient norm, pre-norm then post-norm.
pub fn print_first_last(by_layer: &[LayerNorms]) {
    let (pre, post) = (&by_layer[0].norms, &by_layer[1].norms);
    println!(
        "gradient norm, first/last block at init: pre-norm {:.3}/{:.3}, post-norm {:.3}/{:.3}",
        pre[0],
        pre[pre.len() - 1],
        post[0],
        post[post.len() - 1]
    );
}

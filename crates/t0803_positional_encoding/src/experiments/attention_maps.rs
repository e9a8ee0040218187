//! What the trained models attend to: the learned relative bias `b_h(j − i)` per head (the task
//! needs `j − i = −shift`), and, for the sinusoidal and relative-bias models, the attention map
//! of the head that best attends to `t − shift`, on a sequence four times the training length.

use super::training::Trained;
use super::Lab;
use anyhow::Result;
use candle_core::DType;
use rand::{rngs::StdRng, SeedableRng};
use shared::report::{heatmap, line_chart, Axes, RunReport, Series};
use t0803_positional_encoding::{PositionScheme, Positions, RelativePositionBias};

/// Draws the relative-bias curves (recording each head's peak offset) and the attention maps.
pub fn run(lab: &Lab, trained: &[Trained], report: &mut RunReport) -> Result<()> {
    let relative = trained.iter().find_map(|t| match &t.model.positions {
        Positions::RelativeBias(rel) => Some(rel),
        _ => None,
    });
    if let Some(rel) = relative {
        relative_bias_figure(lab, rel, report)?;
    }
    for t in trained.iter().filter(|t| {
        matches!(
            t.scheme,
            PositionScheme::Sinusoidal | PositionScheme::RelativeBias
        )
    }) {
        attention_figure(lab, t)?;
    }
    Ok(())
}

/// The learned bias `(heads, offsets)` for offsets `−24..=24`, one curve per head, and the
/// offset of each head's largest bias (`relative_bias_peak_offset_per_head`).
fn relative_bias_figure(
    lab: &Lab,
    rel: &RelativePositionBias,
    report: &mut RunReport,
) -> Result<()> {
    let offsets: Vec<i64> = (-24..=24).collect();
    let b = rel
        .bias_for_offsets(&offsets)?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    let series: Vec<Series> = b
        .iter()
        .enumerate()
        .map(|(h, row)| {
            let points = offsets
                .iter()
                .zip(row)
                .map(|(&o, &v)| (o as f64, v))
                .collect();
            Series::new(format!("head {h}"), points)
        })
        .collect();
    line_chart(
        &lab.out_dir.join("relative_bias.png"),
        &format!(
            "Learned relative bias b_h(j − i) (the task needs j − i = −{})",
            lab.task.shift
        ),
        "offset j − i",
        "bias added to the score",
        &series,
        Axes::default(),
    )?;
    let peak: Vec<i64> = b
        .iter()
        .map(|row| {
            offsets[row
                .iter()
                .enumerate()
                .fold(0, |best, (i, v)| if *v > row[best] { i } else { best })]
        })
        .collect();
    println!("   relative bias: offset of the largest bias per head: {peak:?}");
    report.metric("relative_bias_peak_offset_per_head", peak);
    Ok(())
}

/// The map `(4L, 4L)` of the layer and head whose weights on `t − shift` (over the first `L`
/// queries) add up to the most, on one sequence of length `4L`.
fn attention_figure(lab: &Lab, t: &Trained) -> Result<()> {
    let (len, shift) = (4 * lab.train_len, lab.task.shift);
    let mut rng = StdRng::seed_from_u64(lab.seed + 99);
    let (x, _, _) = lab.task.batch(&mut rng, 1, len, &lab.device)?;
    let (_, weights) = t.model.forward(&x)?;
    let mut best = (0.0, 0, 0, Vec::new());
    for (li, w) in weights.iter().enumerate() {
        let w = w.get(0)?.to_dtype(DType::F64)?.to_vec3::<f64>()?; // (heads, n, n)
        for (h, m) in w.into_iter().enumerate() {
            let score: f64 = (shift..len / 4).map(|i| m[i][i - shift]).sum();
            if score > best.0 {
                best = (score, li, h, m);
            }
        }
    }
    let (_, li, h, m) = best;
    heatmap(
        &lab.out_dir
            .join(format!("attention_{}_long.png", t.scheme.name())),
        &format!(
            "{} model, layer {li} head {h}, at length {len} (trained at {})",
            t.scheme.name(),
            len / 4
        ),
        "key position",
        "query position",
        &m,
        None,
    )
}

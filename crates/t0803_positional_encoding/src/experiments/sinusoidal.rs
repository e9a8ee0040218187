//! The sinusoidal matrix itself (no training): `PE (128, d_model)` as a heatmap, the dot products
//! `PE·PEᵀ (128, 128)`, a few of its waves, and `PE(p)·PE(p+k) = Σᵢ cos(k·ωᵢ)` as a function of
//! the offset `k` — the same curve whatever `p`.

use anyhow::Result;
use candle_core::{DType, Device};
use shared::report::{heatmap, line_chart, Axes, RunReport, Series};
use std::path::Path;

/// Positions drawn.
const N: usize = 128;

/// Draws the four figures and records the similarities at offsets 0, 1, 10, 100.
pub fn run(out: &Path, d_model: usize, report: &mut RunReport) -> Result<()> {
    println!("-- 1. The sinusoidal matrix (d_model = {d_model})");
    let pe =
        t0803_positional_encoding::sinusoidal(N, d_model, 0, &Device::Cpu)?.to_dtype(DType::F64)?;
    let rows = pe.to_vec2::<f64>()?; // (N, d_model)
    let sim = pe.matmul(&pe.t()?)?.to_vec2::<f64>()?; // (N, N)
    matrix_figures(out, d_model, &rows, &sim)?;
    waves_figure(out, d_model, &rows)?;
    offset_figure(out, &sim)?;
    similarity_metrics(d_model, &sim, report);
    Ok(())
}

fn matrix_figures(out: &Path, d_model: usize, rows: &[Vec<f64>], sim: &[Vec<f64>]) -> Result<()> {
    heatmap(
        &out.join("sinusoidal.png"),
        &format!("Sinusoidal encoding PE(pos, dim), d_model = {d_model}"),
        "dimension (even: sin, odd: cos)",
        "position",
        rows,
        None,
    )?;
    heatmap(
        &out.join("sinusoidal_similarity.png"),
        "Dot product PE(p)·PE(q) between positions",
        "position q",
        "position p",
        sim,
        None,
    )
}

/// Dimensions 2, 8, 16, 32 along the positions; pair `i` has wavelength `2π·10000^(2i/d)`.
fn waves_figure(out: &Path, d_model: usize, rows: &[Vec<f64>]) -> Result<()> {
    let waves: Vec<Series> = [2usize, 8, 16, 32]
        .iter()
        .map(|&dim| {
            let wavelength = 2.0
                * std::f64::consts::PI
                * 10_000f64.powf(2.0 * (dim / 2) as f64 / d_model as f64);
            Series::new(
                format!("dim {dim} (wavelength {wavelength:.0})"),
                rows.iter()
                    .enumerate()
                    .map(|(p, r)| (p as f64, r[dim]))
                    .collect(),
            )
        })
        .collect();
    line_chart(
        &out.join("sinusoidal_waves.png"),
        "Each pair of dimensions is a wave of its own frequency",
        "position",
        "PE(pos, dim)",
        &waves,
        Axes::default(),
    )
}

/// `PE(p)·PE(p+k)` for `k ∈ −10..=37` at `p = 10, 50, 90`: the curves coincide.
fn offset_figure(out: &Path, sim: &[Vec<f64>]) -> Result<()> {
    let curves: Vec<Series> = [10usize, 50, 90]
        .iter()
        .map(|&p| {
            Series::new(
                format!("p = {p}"),
                (-10i64..=37)
                    .map(|k| (k as f64, sim[p][(p as i64 + k) as usize]))
                    .collect(),
            )
        })
        .collect();
    line_chart(
        &out.join("similarity_vs_offset.png"),
        "PE(p)·PE(p+k) depends on k only: the curves for p = 10, 50, 90 coincide",
        "offset k",
        "dot product",
        &curves,
        Axes::default(),
    )
}

/// `PE(p)·PE(p) = d_model/2` (each pair contributes `sin² + cos² = 1`), and the similarity of
/// position 0 with positions 1, 10, 100 and with the most similar other position.
fn similarity_metrics(d_model: usize, sim: &[Vec<f64>], report: &mut RunReport) {
    let half = d_model as f64 / 2.0;
    let max_off_diag = (1..N).map(|k| sim[0][k]).fold(f64::NEG_INFINITY, f64::max);
    report.metric("sinusoidal_self_similarity", half);
    report.metric(
        "sinusoidal_max_similarity_other_position_0_127",
        max_off_diag,
    );
    report.metric("sinusoidal_similarity_offset_1", sim[0][1]);
    report.metric("sinusoidal_similarity_offset_10", sim[0][10]);
    report.metric("sinusoidal_similarity_offset_100", sim[0][100]);
    println!(
        "   PE(p)·PE(p) = d_model/2 = {half}; PE(0)·PE(1) = {:.2}, PE(0)·PE(10) = {:.2}, PE(0)·PE(100) = {:.2}",
        sim[0][1], sim[0][10], sim[0][100]
    );
}

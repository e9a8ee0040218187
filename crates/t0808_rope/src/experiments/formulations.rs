//! Experiment 1: RoPE as complex multiplication ([`apply_rope`], `O(d)` per vector) and as a
//! block-diagonal rotation matrix ([`apply_rope_matrix`], `O(d²)`) on `x (2, 4, 256, 64)` at
//! positions 1000…1255: the two agree with each other and with the f64 definition.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use shared::report::RunReport;
use std::time::Instant;
use t0808_rope::{
    apply_rope, apply_rope_matrix, reference_rope, RopeScaling, RopeTables, DEFAULT_BASE,
};

/// Metrics `formulations.{max_abs_diff, max_abs_err_vs_f64, complex_ms, matrix_ms}`.
pub fn run(device: &Device, report: &mut RunReport) -> Result<()> {
    let (b, h, n, d_head, start) = (2, 4, 256, 64, 1000);
    let tables = RopeTables::new(d_head, 4096, DEFAULT_BASE, RopeScaling::None, device)?;
    let x = Tensor::randn(0f32, 1.0, (b, h, n, d_head), device)?;
    let t = Instant::now();
    let c = apply_rope(&x, &tables, start)?;
    let t_complex = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let m = apply_rope_matrix(&x, &tables, start)?;
    let t_matrix = t.elapsed().as_secs_f64();
    let diff = (&c - &m)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;

    // Every row against the f64 definition at its own position.
    let xs = x
        .to_dtype(DType::F64)?
        .reshape((b * h * n, d_head))?
        .to_vec2::<f64>()?;
    let cs = c.reshape((b * h * n, d_head))?.to_vec2::<f32>()?;
    let mut ref_err = 0f64;
    for (row, xr) in xs.iter().enumerate() {
        let want = reference_rope(xr, (start + row % n) as f64, DEFAULT_BASE);
        ref_err = want
            .iter()
            .zip(&cs[row])
            .fold(ref_err, |e, (w, g)| e.max((w - *g as f64).abs()));
    }
    println!(
        "   formulations: max |complex − matrix| = {diff:.2e}, max |complex − f64| = {ref_err:.2e}; time {:.2} ms vs {:.2} ms",
        t_complex * 1e3,
        t_matrix * 1e3
    );
    report.metric("formulations.max_abs_diff", diff);
    report.metric("formulations.max_abs_err_vs_f64", ref_err);
    report.metric("formulations.complex_ms", t_complex * 1e3);
    report.metric("formulations.matrix_ms", t_matrix * 1e3);
    Ok(())
}

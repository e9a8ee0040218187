//! The benchmark's plots: TFLOP/s against sequence length (forward; forward+backward), one
//! figure per head size, and peak device memory against sequence length. `bench-plot` redraws
//! them from a saved `results.json`.

use super::row::{tflops, Row};
use super::table::print_rows;
use crate::experiments::common::mib;
use crate::experiments::TOPIC;
use anyhow::Result;
use shared::report::{line_chart, Axes, Series};
use std::path::Path;

/// The time of one path in a row, in ms (`None` where not measured).
type Pick = fn(&Row) -> Option<f64>;

/// One throughput figure: what it shows, its file name (`_d{d_head}` is inserted before
/// `.png`), the FLOP multiple of the forward, and the four lines (each drawn non-causal and
/// causal; PyTorch's where its JSONs were given).
struct TflopsPlot {
    what: &'static str,
    file: &'static str,
    flop_multiple: f64,
    lines: [(&'static str, Pick); 4],
}

const TFLOPS_PLOTS: [TflopsPlot; 2] = [
    TflopsPlot {
        what: "forward",
        file: "bench_fwd_tflops.png",
        flop_multiple: 1.0,
        lines: [
            ("flash", |r| Some(r.flash_fwd_ms)),
            ("naive", |r| r.naive_fwd_ms),
            ("PyTorch SDPA (FA2)", |r| r.pytorch_fwd_ms),
            ("PyTorch SDPA (cuDNN)", |r| r.cudnn_fwd_ms),
        ],
    },
    TflopsPlot {
        what: "forward+backward",
        file: "bench_fwd_bwd_tflops.png",
        flop_multiple: 3.5,
        lines: [
            ("flash", |r| r.flash_fwd_bwd_ops_ms),
            ("naive (autograd)", |r| r.naive_fwd_bwd_ms),
            ("PyTorch SDPA (FA2)", |r| r.pytorch_fwd_bwd_ms),
            ("PyTorch SDPA (cuDNN)", |r| r.cudnn_fwd_bwd_ms),
        ],
    },
];

/// `bench-plot`: the plots of a bench results.json (e.g. from the GPU host) on this machine.
pub fn plot_from(common: &shared::cli::CommonArgs, from: &Path) -> Result<()> {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(from)?)?;
    let rows: Vec<Row> = serde_json::from_value(json["metrics"]["bench"].clone())?;
    let out_dir = common.out.join(TOPIC);
    std::fs::create_dir_all(&out_dir)?;
    let tag = format!(
        "{}, {}",
        json["dtype"].as_str().unwrap_or("?"),
        json["device"].as_str().unwrap_or("?")
    );
    print_rows(&rows, &tag);
    plot(&rows, &out_dir, &tag)?;
    println!("plots in {}", out_dir.display());
    Ok(())
}

/// All figures of `rows` into `out_dir`; `tag` (dtype, device) ends every title.
pub fn plot(rows: &[Row], out_dir: &Path, tag: &str) -> Result<()> {
    let mut d_heads: Vec<usize> = rows.iter().map(|r| r.d_head).collect();
    d_heads.sort_unstable();
    d_heads.dedup();
    for p in &TFLOPS_PLOTS {
        for &d in &d_heads {
            plot_tflops(p, rows, d, out_dir, tag)?;
        }
    }
    plot_memory(rows, &d_heads, out_dir, tag)
}

/// Figure `p` for head size `d`: TFLOP/s against sequence length, log x; skipped if empty.
fn plot_tflops(p: &TflopsPlot, rows: &[Row], d: usize, out_dir: &Path, tag: &str) -> Result<()> {
    let mut series = Vec::new();
    for causal in [false, true] {
        let sel: Vec<&Row> = rows
            .iter()
            .filter(|r| r.d_head == d && r.causal == causal)
            .collect();
        for (name, pick) in p.lines {
            let pts: Vec<(f64, f64)> = sel
                .iter()
                .filter_map(|r| {
                    pick(r).map(|ms| (r.seq as f64, tflops(p.flop_multiple * r.fwd_flops, ms)))
                })
                .collect();
            if !pts.is_empty() {
                series.push(Series::new(
                    format!("{name}{}", if causal { ", causal" } else { "" }),
                    pts,
                ));
            }
        }
    }
    if series.is_empty() {
        return Ok(());
    }
    let path = out_dir.join(p.file.replace(".png", &format!("_d{d}.png")));
    line_chart(
        &path,
        &format!("Attention {}, d_head {d} ({tag})", p.what),
        "sequence length",
        "TFLOP/s",
        &series,
        Axes {
            log_x: true,
            log_y: false,
        },
    )
}

/// `bench_memory.png`: peak MiB of forward+backward (forward only if that is all there is)
/// against sequence length, causal rows only, flash and naive per head size; log–log.
fn plot_memory(rows: &[Row], d_heads: &[usize], out_dir: &Path, tag: &str) -> Result<()> {
    type Bytes = fn(&Row) -> Option<u64>;
    let flash: Bytes = |r| r.flash_fwd_bwd_mem_bytes.or(r.flash_fwd_mem_bytes);
    let naive: Bytes = |r| r.naive_fwd_bwd_mem_bytes.or(r.naive_fwd_mem_bytes);
    let mut series = Vec::new();
    for &d in d_heads {
        for (path, bytes) in [("flash", flash), ("naive", naive)] {
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.d_head == d && r.causal)
                .filter_map(|r| bytes(r).map(|b| (r.seq as f64, mib(b))))
                .collect();
            if !pts.is_empty() {
                series.push(Series::new(format!("{path} d{d} causal"), pts));
            }
        }
    }
    if series.is_empty() {
        return Ok(());
    }
    line_chart(
        &out_dir.join("bench_memory.png"),
        &format!("Peak device memory of fwd+bwd ({tag})"),
        "sequence length",
        "MiB",
        &series,
        Axes {
            log_x: true,
            log_y: true,
        },
    )
}

//! Topic 8-09 experiment: FlashAttention against the naive attention of 8-01.
//!
//! Default run (CPU, < 2 min): a correctness table (tiled tensor ops and custom op vs naive and
//! a float64 reference, forward and gradients), the memory bottleneck *measured* (peak bytes
//! allocated during a forward, by a counting allocator, for growing sequence lengths), and small
//! timings.
//!
//! `bench` (GPU): forward and forward+backward time, TFLOP/s and peak device memory of our
//! kernel and of the naive path, over sequence lengths, head sizes and causal/non-causal.
//!
//! This file is the table of contents; each experiment lives in [`experiments`].

mod experiments;

use anyhow::Result;
use clap::{Parser, Subcommand};
use experiments::{bench, correctness, cpu_timing, lesson::Lesson, memory};
use shared::cli::CommonArgs;

#[derive(Parser, Debug)]
#[command(about = "Topic 8-09: FlashAttention — tiled attention, online softmax, our own kernel")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// GPU benchmark: our kernel vs the naive path (time, TFLOP/s, peak memory).
    Bench(bench::BenchArgs),
    /// Redraw the bench plots from a bench results.json (e.g. one fetched from the GPU host).
    BenchPlot {
        /// Path of `output/t0809_flash_attention/bench/results.json`.
        #[arg(long)]
        from: std::path::PathBuf,
    },
}

fn main() -> Result<()> {
    shared::cpu::in_pool(run)
}

fn run() -> Result<()> {
    let args = Args::parse();
    match &args.cmd {
        Some(Cmd::Bench(b)) => bench::run(&args.common, b),
        Some(Cmd::BenchPlot { from }) => bench::plot_from(&args.common, from),
        None => cpu_lesson(&args.common),
    }
}

/// The default run: three CPU experiments sharing one `results.json`.
fn cpu_lesson(common: &CommonArgs) -> Result<()> {
    let mut lesson = Lesson::start(common)?;
    // 1. Naive, tiled tensor ops and custom op against a float64 reference, with gradients.
    correctness::run(&mut lesson)?;
    // 2. Peak host memory of one forward for growing n: n² for naive, n·d for flash.
    let memory_png = memory::run(&mut lesson)?;
    // 3. Forward and forward+backward wall time of the three implementations.
    cpu_timing::run(&mut lesson)?;
    lesson.finish(&memory_png)
}

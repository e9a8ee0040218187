//! Experiment 8-06: rung 0 of the ladder (the GPT-2-style LM), its post-norm variant and rung 1
//! (+ RMSNorm + SwiGLU, no biases) on WikiText-2 BPE tokens, same data and budget; their
//! stability at a high learning rate; RMSNorm (composed and fused) vs LayerNorm.
//!
//! ```text
//! cargo run -p t0806_modern_blocks --release -- [--quick] [--device cpu|cuda] [--norm composed|fused]
//! cargo run -p t0806_modern_blocks --release --features cuda -- --device cuda --dtype bf16 norm-bench --rows 50000 --widths 1024,2048,4096
//! ```
//!
//! Grouped-query attention and RoPE arrive in 8-07 and 8-08; the training-speed bench of the full
//! LLaMA recipe with FlashAttention is `cargo run -p t0810_kv_cache -- train-bench`.

use anyhow::Result;
use clap::{Parser, Subcommand};
use shared::cli::CommonArgs;
use shared::kernels::KernelArgs;

mod experiments;

use experiments::{norm_bench, recipes};

/// The topic's output folder name and `results.json` topic.
const TOPIC: &str = "t0806_modern_blocks";

#[derive(Parser, Debug)]
#[command(
    about = "8-06: post-norm vs GPT-2 (rung 0) vs + RMSNorm + SwiGLU (rung 1); RMSNorm vs LayerNorm"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// How the ops run (default: the fused RMSNorm, SwiGLU gate and softmax, on the CPU and CUDA).
    #[command(flatten)]
    kernels: KernelArgs,
    #[command(flatten)]
    recipes: recipes::RecipeArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Only the norm micro-benchmark: RMSNorm composed vs fused vs LayerNorm.
    NormBench(norm_bench::NormBenchArgs),
}

fn main() -> Result<()> {
    shared::cpu::in_pool(run)
}

fn run() -> Result<()> {
    let args = Args::parse();
    match &args.cmd {
        Some(Cmd::NormBench(bench)) => norm_bench::run(&args.common, bench),
        None => recipes::run(&args.common, &args.kernels, &args.recipes),
    }
}

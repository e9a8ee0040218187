//! 8-10 experiments: KV-cache memory, decoding speed with and without the cache, the arithmetic
//! intensity of a decode step, and a paged vs contiguous serving simulation; plus the
//! `generate`, `save-random`, `decode-bench` and `train-bench` commands.
//!
//! ```text
//! cargo run --release -p t0810_kv_cache                       # the experiments (CPU: ~1-2 min)
//! cargo run --release -p t0810_kv_cache --features cuda -- --max-context 2048 --device cuda
//! cargo run --release -p t0810_kv_cache -- generate --checkpoint DIR --prompt "The game"
//! cargo run --release -p t0810_kv_cache -- save-random --checkpoint DIR --tokenizer FILE
//! cargo run --release -p t0810_kv_cache --features cuda -- --device cuda --dtype bf16 decode-bench --batch 32
//! cargo run --release -p t0810_kv_cache --features cuda -- --device cuda --dtype bf16 train-bench --batch 32
//! ```
//!
//! Every command builds the top rung of the ladder (the LLaMA recipe, `t0808_rope::llama`) with
//! 8-09's parts; `--kernels`, `--norm`, `--attention`, … choose how its ops run (default: every
//! fused op and FlashAttention, on the CPU and on CUDA; `--kernels composed` for the composed ops).

use anyhow::Result;
use clap::{Parser, Subcommand};
use shared::cli::CommonArgs;
use shared::kernels::KernelArgs;

mod experiments;

use experiments::{decode_bench, generate, save_random, train_bench};

/// The topic's output folder name and `results.json` topic.
const TOPIC: &str = "t0810_kv_cache";

#[derive(Parser, Debug)]
#[command(
    about = "8-10: the KV cache — memory, decoding speed, paged vs contiguous serving; a generator and benches"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    kernels: KernelArgs,
    #[command(flatten)]
    experiments: experiments::ExperimentArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Streams a continuation of a prompt from a checkpoint folder and reports tokens/s.
    Generate(generate::GenerateArgs),
    /// Writes a random-init LLaMA-recipe checkpoint with its tokenizer, to try `generate` without
    /// training.
    SaveRandom(save_random::SaveRandomArgs),
    /// Decode throughput of a random-init LLaMA-recipe model with our KV cache: greedy, batched,
    /// the next tokens chosen on the device (no host round trip per step). Defaults: the CS336
    /// shape of the GPU-performance comparison (scripts/pytorch_twin.py decode-bench).
    DecodeBench(decode_bench::DecodeBenchArgs),
    /// Training tokens/s (forward + backward + AdamW) of the LLaMA recipe at the CS336 shape
    /// (scripts/pytorch_twin.py train-bench).
    TrainBench(train_bench::TrainBenchArgs),
}

fn main() -> Result<()> {
    shared::cpu::in_pool(run)
}

fn run() -> Result<()> {
    let args = Args::parse();
    let (common, kernels) = (&args.common, &args.kernels);
    match &args.cmd {
        Some(Cmd::Generate(a)) => generate::run(common, kernels, a),
        Some(Cmd::SaveRandom(a)) => save_random::run(common, a),
        Some(Cmd::DecodeBench(a)) => decode_bench::run(common, kernels, a),
        Some(Cmd::TrainBench(a)) => train_bench::run(common, kernels, a),
        None => experiments::run(common, kernels, &args.experiments),
    }
}

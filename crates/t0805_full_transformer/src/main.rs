//! 8-05 experiment, the project's main job: the encoder–decoder Transformer against an LSTM
//! seq2seq on WikiText-2 continuation, same data, same tokenizer, same budget, side by side.
//!
//! `cargo run -p t0805_full_transformer -- [--preset quick|cpu|full] [--resume]`; on a GPU
//! `cargo run --release -p t0805_full_transformer --features cuda -- --device cuda`
//!
//! The steps live in the library's [`t0805_full_transformer::main_job`]: the continuation pairs,
//! the contenders, training through the one loop with checkpoints, the comparison and greedy
//! samples. This binary runs the Transformer with this topic's composed LayerNorm and naive
//! attention; `cargo run -p t0810_kv_cache --example main_job` runs the same job with the fused
//! LayerNorm (8-06) and FlashAttention (8-09).

use anyhow::Result;
use clap::Parser;
use shared::kernels::Kernels;
use t0805_full_transformer::main_job::{self, Args};

/// The topic's output folder name and `results.json` topic.
const TOPIC: &str = "t0805_full_transformer";

fn main() -> Result<()> {
    shared::cpu::in_pool(run)
}

fn run() -> Result<()> {
    let args = Args::parse();
    let composed = t0804_transformer_block::parts(Kernels::composed());
    main_job::run(&args, TOPIC, &composed)
}

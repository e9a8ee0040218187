//! 8-05's main job with every fast path of the module: the encoder–decoder Transformer built
//! with the top rung's parts — 8-06's fused LayerNorm and bias + GELU, and 8-09's
//! FlashAttention, which runs the encoder's self-attention, the decoder's causal self-attention and the cross-attention over
//! each sequence's real keys (key padding as lengths, never a mask) — against the same LSTM, on
//! the same data, preset and seed as `cargo run -p t0805_full_transformer`.
//!
//! `cargo run --release -p t0810_kv_cache --example main_job -- [the t0805 options]`, e.g. on a
//! GPU `cargo run --release -p t0810_kv_cache --features cuda --example main_job -- --device cuda
//! --preset full`. Output: `output/t0805_full_transformer_fused/` (figures, `results.json`,
//! whose `config.kernels` says how the ops ran).
//!
//! The parameters, the batches and the values are those of the composed run (the test
//! `tests/main_job.rs` checks logits and gradients on padded batches); only the speed differs.

use anyhow::Result;
use clap::Parser;
use shared::kernels::Kernels;
use t0805_full_transformer::main_job::{self, Args};

const TOPIC: &str = "t0805_full_transformer_fused";

fn main() -> Result<()> {
    shared::cpu::in_pool(run)
}

fn run() -> Result<()> {
    let args = Args::parse();
    let fastest = t0809_flash_attention::parts(Kernels::fused());
    main_job::run(&args, TOPIC, &fastest)
}

//! `save-random`: a random-init LLaMA-recipe checkpoint (`config.json`, `model.safetensors`) with
//! its tokenizer (`tokenizer.json`), to try `generate` without training.

use anyhow::Result;
use candle_core::{DType, Device};
use shared::cli::CommonArgs;
use shared::kernels::Kernels;
use shared::tokenizer::Bpe;
use std::path::PathBuf;
use t0804_transformer_block::LmShape;

/// `save-random` arguments.
#[derive(clap::Args, Debug)]
pub struct SaveRandomArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub tokenizer: PathBuf,
    #[arg(long, default_value_t = 128)]
    pub d_model: usize,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 512)]
    pub max_seq: usize,
}

/// The `save-random` command (f32 on the CPU; the vocabulary is the tokenizer's).
pub fn run(common: &CommonArgs, a: &SaveRandomArgs) -> Result<()> {
    let bpe = Bpe::load(&a.tokenizer)?;
    let shape = LmShape {
        vocab_size: bpe.vocab_size(),
        max_seq_len: a.max_seq,
        d_model: a.d_model,
        n_layers: a.layers,
        n_heads: a.heads,
    };
    let cfg = t0808_rope::llama(shape, a.kv_heads);
    shared::params::set_seed(common.seed);
    let parts = t0809_flash_attention::parts(Kernels::composed());
    let (varmap, _) = t0804_transformer_block::init_lm(&cfg, &parts, DType::F32, &Device::Cpu)?;
    t0804_transformer_block::save_lm(&a.checkpoint, &cfg, &varmap)?;
    std::fs::copy(&a.tokenizer, a.checkpoint.join("tokenizer.json"))?;
    println!("wrote a random {cfg:?} to {}", a.checkpoint.display());
    Ok(())
}

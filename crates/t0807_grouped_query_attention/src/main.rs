//! Experiment 8-07: grouped-query attention, rung 2 of the ladder against rung 1.
//!
//! 1. KV-cache bytes per token for MHA, GQA and MQA — our model and LLaMA-2-7B / LLaMA-3-8B shapes.
//! 2. Quality at equal budget: rung 2 = `grouped(modern(gpt2(shape)), n_kv)` for `n_kv` ∈
//!    {n_heads (MHA = rung 1), groups, 1 (MQA)}, trained on WikiText-2 BPE tokens.
//! 3. Uptraining (Ainslie et al., 2023): mean-pool the K/V heads of the trained MHA model into
//!    GQA, evaluate before and after a short fine-tune.
//! 4. Decode throughput (full forward per new token; the KV cache itself is 8-10) vs context.
//!
//! `cargo run -p t0807_grouped_query_attention --release -- [--quick] [--device cpu|cuda]
//! [--kernels composed|fused]`

mod experiments;

use anyhow::Result;
use clap::Parser;
use experiments::Lab;
use shared::cli::CommonArgs;
use shared::kernels::KernelArgs;
use shared::report::RunReport;
use shared::tokenizer::{load_corpus, Corpus};
use t0804_transformer_block::LmShape;

const TOPIC: &str = "t0807_grouped_query_attention";

#[derive(Parser, Debug)]
#[command(about = "8-07: KV-cache size, quality and uptraining of MHA / GQA / MQA")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    kernels: KernelArgs,
    /// BPE vocabulary (default 1024; --quick: 512 on the tiny corpus; 4096+ for GPU runs).
    #[arg(long)]
    vocab: Option<usize>,
    #[arg(long, default_value_t = 128)]
    d_model: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Training context (tokens per window).
    #[arg(long, default_value_t = 64)]
    ctx: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Training steps per variant (default 200; --quick 25).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
}

/// Longest context the models accept: the decode-speed sweep reaches 512 tokens.
const MAX_SEQ: usize = 512;

fn main() -> Result<()> {
    shared::cpu::in_pool(run)
}

fn run() -> Result<()> {
    let a = Args::parse();
    let quick = a.common.quick;
    let run = a.common.setup(
        TOPIC,
        "MHA / GQA / MQA: KV-cache size, quality, uptraining, decode speed",
    )?;
    run.require_one_dtype()?;
    let device = run.picked.device.clone();
    let kernels = a
        .kernels
        .resolve(t0806_modern_blocks::fastest_kernels(&device));
    println!("   kernels: {}", kernels.describe());
    let vocab = a.vocab.unwrap_or(if quick { 512 } else { 1024 });
    let steps = a.steps.unwrap_or(if quick { 25 } else { 200 });
    let config = serde_json::json!({"vocab": vocab, "d_model": a.d_model, "layers": a.layers,
        "heads": a.heads, "ctx": a.ctx, "batch": a.batch, "steps": steps, "lr": a.lr,
        "kernels": kernels.describe()});
    let mut report = RunReport::start(TOPIC, config, &run.picked.description, run.dtype_name());
    let lab = Lab {
        shape: LmShape {
            vocab_size: vocab,
            max_seq_len: MAX_SEQ,
            d_model: a.d_model,
            n_layers: a.layers,
            n_heads: a.heads,
        },
        kernels,
        device,
        dtype: run.dtype,
        out_dir: run.out_dir.clone(),
        seed: a.common.seed,
        quick,
        batch: a.batch,
        ctx: a.ctx,
        steps,
        lr: a.lr,
    };

    experiments::kv_cache::run(&lab, &mut report)?;
    let corpus = if quick {
        Corpus::Tiny
    } else {
        Corpus::Wikitext2
    };
    let data = load_corpus(corpus, a.common.data_dir.as_deref(), vocab)?;
    let quality = experiments::quality::run(&lab, &data, &mut report)?;
    experiments::uptraining::run(&lab, &data, &quality, &mut report)?;
    experiments::decode_speed::run(&lab, &data.valid, &mut report)?;
    experiments::quality::print_summary(&lab, &quality);

    let path = report.write(&run.out_dir)?;
    println!("   wrote {}", path.display());
    Ok(())
}

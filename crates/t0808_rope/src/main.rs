//! Experiment 8-08: rotary position embeddings, rung 3 of the ladder against rung 2.
//!
//! 1. The complex and the rotation-matrix formulations agree (and agree with f64).
//! 2. ⟨RoPE(q, m), RoPE(k, n)⟩ over a grid of (m, n): constant along diagonals (depends on m − n).
//! 3. A task that needs relative order — "output the token `shift` positions back" — learned by
//!    a small rung-2 decoder with no positions, sinusoidal, learned (rung 2 itself) and RoPE
//!    (rung 3) positions.
//! 4. Length extrapolation: trained at length L, loss per position up to 4L; RoPE with and
//!    without position interpolation / NTK-aware scaling (applied at evaluation, no fine-tune).
//! 5. The same four schemes as small language models on WikiText-2 (BPE), same budget:
//!    validation loss, and loss per position up to twice the training context. Learned
//!    positions are rung 2 (`grouped(modern(gpt2(shape)), n_kv)`), RoPE is rung 3
//!    (`llama(shape, n_kv)`).
//!
//! `cargo run -p t0808_rope --release -- [--quick] [--device cpu|cuda] [--kernels composed|fused]`
//! Larger (GPU) run: `-- --device cuda --d-model 256 --layers 4 --heads 8 --steps 600
//! --lm-vocab 4096 --lm-ctx 256 --lm-steps 2000 --lm-batch 32`

mod experiments;

use anyhow::Result;
use clap::Parser;
use experiments::{wikitext::LmBudget, Models};
use shared::cli::CommonArgs;
use shared::kernels::KernelArgs;
use shared::report::RunReport;
use shared::tokenizer::{load_corpus, Corpus};

const TOPIC: &str = "t0808_rope";

#[derive(Parser, Debug)]
#[command(
    about = "8-08: RoPE formulations, the relative-position property, RoPE vs other positions, length extrapolation"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    kernels: KernelArgs,
    /// Training length L (evaluation up to 4L).
    #[arg(long, default_value_t = 32)]
    train_len: usize,
    /// The task: predict the token this many positions back.
    #[arg(long, default_value_t = 3)]
    shift: usize,
    #[arg(long, default_value_t = 32)]
    vocab: usize,
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// K/V heads of the grouped-query attention (rung 2).
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Training steps per scheme (default 120; --quick 40).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// WikiText-2 LM comparison: BPE vocabulary (default 1024; --quick: 512 on the tiny corpus).
    #[arg(long)]
    lm_vocab: Option<usize>,
    /// WikiText-2 LM comparison: training context (evaluation up to 2×).
    #[arg(long, default_value_t = 64)]
    lm_ctx: usize,
    /// WikiText-2 LM comparison: training steps per scheme (default 300; --quick 30).
    #[arg(long)]
    lm_steps: Option<usize>,
    #[arg(long, default_value_t = 16)]
    lm_batch: usize,
    /// Skip the WikiText-2 LM comparison.
    #[arg(long)]
    no_lm: bool,
}

fn main() -> Result<()> {
    shared::cpu::in_pool(run)
}

fn run() -> Result<()> {
    let a = Args::parse();
    let quick = a.common.quick;
    let run = a.common.setup(
        TOPIC,
        "RoPE: formulations, relative positions, task comparison, extrapolation",
    )?;
    run.require_one_dtype()?;
    let device = run.picked.device.clone();
    let kernels = a.kernels.resolve(t0808_rope::fastest_kernels(&device));
    println!("   kernels: {}", kernels.describe());
    let steps = a.steps.unwrap_or(if quick { 40 } else { 120 });
    let lm = LmBudget {
        vocab: a.lm_vocab.unwrap_or(if quick { 512 } else { 1024 }),
        ctx: a.lm_ctx,
        steps: a.lm_steps.unwrap_or(if quick { 30 } else { 300 }),
        batch: a.lm_batch,
    };
    let config = serde_json::json!({"train_len": a.train_len, "shift": a.shift, "vocab": a.vocab,
        "d_model": a.d_model, "heads": a.heads, "kv_heads": a.kv_heads, "layers": a.layers,
        "steps": steps, "batch": a.batch, "lr": a.lr, "kernels": kernels.describe(),
        "lm": {"vocab": lm.vocab, "ctx": lm.ctx, "steps": lm.steps, "batch": lm.batch, "skipped": a.no_lm},
        "quick": quick});
    let mut report = RunReport::start(TOPIC, config, &run.picked.description, run.dtype_name());
    let models = Models {
        d_model: a.d_model,
        n_layers: a.layers,
        n_heads: a.heads,
        n_kv_heads: a.kv_heads,
        kernels,
        device,
        dtype: run.dtype,
        seed: a.common.seed,
        lr: a.lr,
    };

    experiments::formulations::run(&models.device, &mut report)?;
    experiments::relative::run(a.common.seed, &run.out_dir, &mut report)?;
    let task = experiments::shift_task::ShiftTask {
        train_len: a.train_len,
        shift: a.shift,
        vocab: a.vocab,
        batch: a.batch,
        steps,
    };
    experiments::shift_task::run(&models, &task, &run.out_dir, &mut report)?;
    if !a.no_lm {
        let corpus = if quick {
            Corpus::Tiny
        } else {
            Corpus::Wikitext2
        };
        let data = load_corpus(corpus, a.common.data_dir.as_deref(), lm.vocab)?;
        experiments::wikitext::run(&models, &lm, &data, quick, &run.out_dir, &mut report)?;
    }

    let path = report.write(&run.out_dir)?;
    println!("   wrote {}", path.display());
    Ok(())
}

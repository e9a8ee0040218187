//! Experiment 8-03: what position information buys attention, and where each scheme breaks.
//!
//! 1. The sinusoidal matrix, its waves, and the dot-product similarity between positions.
//! 2. A task that needs order — "output the token `shift` positions back" — learned by a small
//!    attention model (embeddings + 2 layers of t0802 multi-head attention + readout, no causal
//!    mask) with no positions, sinusoidal, learned and relative-bias positions. Without positions
//!    the model is exactly permutation-equivariant (measured) and cannot do better than guessing.
//! 3. Length generalisation: trained at length L, evaluated at L, 2L and 4L. The learned table
//!    has 2L rows: at 2L it runs on untrained rows, at 4L it refuses with a clear error.
//!
//! `cargo run -p t0803_positional_encoding -- [--quick] [--device cpu|cuda]`

mod experiments;

use anyhow::Result;
use clap::Parser;
use experiments::{model::EVAL_BATCH, task::CopyBack, Lab};
use shared::cli::CommonArgs;
use shared::report::RunReport;

const TOPIC: &str = "t0803_positional_encoding";

#[derive(Parser, Debug)]
#[command(
    about = "8-03: sinusoidal, learned and relative positions on an order-dependent task, and length generalisation"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Training sequence length L (evaluation at L, 2L, 4L).
    #[arg(long, default_value_t = 16)]
    train_len: usize,
    /// The task: predict the token this many positions back.
    #[arg(long, default_value_t = 1)]
    shift: usize,
    #[arg(long, default_value_t = 32)]
    vocab: usize,
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    #[arg(long, default_value_t = 4)]
    n_heads: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Training steps per scheme (default 500; --quick: 120).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value_t = 1e-2)]
    lr: f64,
    /// CPU threads for Candle's kernels. The model is tiny: on a small, busy machine one thread is
    /// several times faster than many (hand-offs cost more than the matmuls). 0 = all cores.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.threads > 0 {
        // Sizes rayon's pool (built by `in_pool`) and Candle's CPU matmul, which reads it at
        // every call: set before any thread exists.
        std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    }
    shared::cpu::in_pool(|| run(args))
}

fn run(args: Args) -> Result<()> {
    let ctx = args.common.setup(
        TOPIC,
        "position information for attention: sinusoidal, learned, relative bias",
    )?;
    ctx.require_one_dtype()?;
    if !ctx.picked.device.is_cuda() {
        println!(
            "   Candle CPU kernels: {} thread(s) (--threads)",
            candle_core::utils::get_num_threads()
        );
    }
    let quick = args.common.quick;
    let lab = Lab {
        task: CopyBack {
            vocab: args.vocab,
            shift: args.shift,
        },
        train_len: args.train_len,
        d_model: args.d_model,
        n_heads: args.n_heads,
        layers: args.layers,
        steps: args.steps.unwrap_or(if quick { 120 } else { 500 }),
        batch: args.batch,
        lr: args.lr,
        eval_batches: if quick { 2 } else { 8 },
        seed: args.common.seed,
        device: ctx.picked.device.clone(),
        dtype: ctx.dtype,
        out_dir: ctx.out_dir.clone(),
    };
    let l = args.train_len;
    let config = serde_json::json!({
        "train_len": l, "eval_lengths": lab.lengths(), "shift": args.shift, "vocab": args.vocab, "d_model": args.d_model,
        "n_heads": args.n_heads, "layers": args.layers, "threads": args.threads, "steps": lab.steps, "batch": args.batch, "lr": args.lr,
        "learned_table_rows": 2 * l, "eval_sequences_per_length": lab.eval_batches * EVAL_BATCH, "quick": quick,
    });
    let mut report = RunReport::start(TOPIC, config, &ctx.picked.description, ctx.dtype_name());

    experiments::sinusoidal::run(&ctx.out_dir, args.d_model, &mut report)?;
    let trained = experiments::training::run(&lab)?;
    let generalisation = experiments::length_generalisation::run(&lab, &trained, &mut report)?;
    experiments::attention_maps::run(&lab, &trained, &mut report)?;
    experiments::length_generalisation::print_summary(&lab, &generalisation);

    let path = report.write(&ctx.out_dir)?;
    println!("   figures and {} written", path.display());
    Ok(())
}

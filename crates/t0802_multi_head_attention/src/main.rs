//! # 8-02 experiment: heads that learn different relations
//!
//! The task needs two relations at once. A sequence `BOS t₁ … t_T` of random tokens; at every
//! position `p ≥ 2` the model must output the pair
//!
//! ```text
//! y_p = ( t_{p−1} ,  [t_p occurred at an earlier position] )      encoded as t_{p−1} + V·seen_p
//! ```
//!
//! The first part is a **positional** relation (look one step back, whatever the token); the
//! second a **content** relation (look for an equal token, wherever it is). One attention head
//! produces one weighting of the sequence, so a single head has to blend both; two heads can
//! each take one. The model is as small as possible: a token-embedding table and a learned
//! position table (raw parameters), one multi-head attention layer with a residual, and a linear
//! readout. The attention mask is causal *and strict* (`j < p`, plus the BOS at position 0 as a
//! "nothing found" sink): with `j ≤ p` every token would trivially match itself.
//!
//! We train it with 1, 2 and 4 heads at the same width `d_model`, then
//! * show each head's attention map on one sequence and score its role (previous-token weight,
//!   mass on earlier equal tokens);
//! * compare parameter counts with a single head of the same total width;
//! * prune each head in turn (`head_gate`) and measure the loss increase.
//!
//! `cargo run -p t0802_multi_head_attention -- [--quick] [--device cpu|cuda] [--heads 1,2,4]`

mod experiments;

use anyhow::{bail, Result};
use clap::Parser;
use experiments::{task::TwoRelations, Lab};
use serde_json::json;
use shared::cli::CommonArgs;
use shared::report::RunReport;
use t0802_multi_head_attention::MhaConfig;

const TOPIC: &str = "t0802_multi_head_attention";

#[derive(Parser, Debug)]
#[command(
    about = "8-02: train 1/2/4-head attention on a task that needs two relations; head maps, parameter counts, head pruning"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Head counts to train (same d_model for all).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    heads: Vec<usize>,
    /// Number of ordinary tokens V (the readout has 2V classes).
    #[arg(long, default_value_t = 16)]
    vocab: usize,
    /// Tokens per sequence T (the BOS makes T + 1 positions).
    #[arg(long, default_value_t = 16)]
    seq_len: usize,
    #[arg(long, default_value_t = 32)]
    d_model: usize,
    /// Training steps per model (default 1200; --quick: 150).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value_t = 1e-2)]
    lr: f64,
    /// CPU threads for Candle's matmuls (0: Candle's default). The matrices here are tiny
    /// (17×8 per head): splitting them over threads costs more than it saves, so 1 is default.
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
        "multi-head attention on a task needing two relations",
    )?;
    ctx.require_one_dtype()?;
    if args.heads.is_empty() {
        bail!("--heads must name at least one head count");
    }
    for &h in &args.heads {
        MhaConfig::new(args.d_model, h).d_head()?; // fail early with the clear message
    }
    let quick = args.common.quick;
    let lab = Lab {
        task: TwoRelations {
            vocab: args.vocab,
            seq_len: args.seq_len,
        },
        d_model: args.d_model,
        steps: args.steps.unwrap_or(if quick { 150 } else { 1200 }),
        batch: args.batch,
        lr: args.lr,
        seed: args.common.seed,
        quick,
        device: ctx.picked.device.clone(),
        dtype: ctx.dtype,
        out_dir: ctx.out_dir.clone(),
    };
    let config = json!({
        "heads": args.heads, "vocab": args.vocab, "seq_len": args.seq_len, "d_model": args.d_model,
        "steps": lab.steps, "batch": args.batch, "lr": args.lr, "threads": args.threads, "seed": args.common.seed, "quick": quick,
        "task": "y_p = t_{p-1} + V * [t_p occurred earlier]; strict causal mask with BOS sink",
    });
    let mut report = RunReport::start(TOPIC, config, &ctx.picked.description, ctx.dtype_name());

    let eval = experiments::task_baselines::run(&lab, &mut report)?;
    experiments::param_counts::run(&lab, &args.heads, &mut report)?;
    let trained = experiments::training::run(&lab, &args.heads, &eval)?;
    experiments::head_roles::run(&lab, &trained, &eval, &mut report)?;
    experiments::training::print_summary(&trained, &ctx.picked.description);

    let path = report.write(&ctx.out_dir)?;
    println!("results: {}", path.display());
    Ok(())
}

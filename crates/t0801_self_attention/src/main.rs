//! # 8-01 experiment: attention as a soft dictionary lookup, and what it costs
//!
//! 1. **Lookup.** Eight nearly orthogonal keys, eight distinct values, and eight queries that are
//!    noisy copies of the keys in a shuffled order: the right answer is known, so we can check
//!    that each query retrieves *its* value, and watch how scaling the queries (sharpness,
//!    inverse temperature β) turns the soft average into a hard lookup.
//! 2. **Causal self-attention.** The weights of a layer on a random token sequence under the
//!    causal mask: a fresh layer, and one whose `W_q = W_k` makes equal tokens find each other.
//! 3. **Cost.** Time of `scaled_dot_product_attention` and bytes of the `n×n` score matrix vs
//!    the sequence length `n`, with the fitted log-log exponent (≈ 2), and time vs the head
//!    width `d` at fixed `n` (≈ linear once the matmuls dominate): `O(n²·d)`.
//!
//! Each step lives in its own module under [`experiments`]; this file reads the arguments, runs
//! the steps in order and writes `results.json`.
//!
//! `cargo run -p t0801_self_attention -- [--device cpu|cuda] [--quick] [--max-n N] [--d-head D]`

mod experiments;

use anyhow::Result;
use clap::Parser;
use experiments::{causal_maps, cost_vs_d, cost_vs_n, dictionary_lookup, CostPlan, Summary};
use serde_json::json;
use shared::cli::CommonArgs;
use shared::report::RunReport;

const TOPIC: &str = "t0801_self_attention";

#[derive(Parser, Debug)]
#[command(
    about = "8-01: self-attention as a soft dictionary lookup, causal attention maps, and the O(n²·d) cost"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Largest sequence length of the cost benchmark (default 4096 on the CPU, 16384 on CUDA; 512 with --quick).
    #[arg(long)]
    max_n: Option<usize>,
    /// Head width d of the cost-vs-n benchmark.
    #[arg(long, default_value_t = 64)]
    d_head: usize,
    /// Timed repetitions per size (the median is reported).
    #[arg(long, default_value_t = 9)]
    reps: usize,
    /// Noise of the lookup queries, relative to a key's per-coordinate scale.
    #[arg(long, default_value_t = 0.5)]
    noise: f64,
}

fn main() -> Result<()> {
    shared::cpu::in_pool(run)
}

fn run() -> Result<()> {
    let args = Args::parse();
    let ctx = args.common.setup(
        TOPIC,
        "soft dictionary lookup, causal attention maps, O(n²·d) cost",
    )?;
    ctx.require_one_dtype()?;
    let (dev, dtype, out) = (&ctx.picked.device, ctx.dtype, ctx.out_dir.as_path());
    let (seed, quick) = (args.common.seed, args.common.quick);
    let config = json!({
        "quick": quick, "seed": seed, "max_n": args.max_n,
        "d_head": args.d_head, "reps": args.reps, "noise": args.noise,
    });
    let description = &ctx.picked.description;
    let mut report = RunReport::start(TOPIC, config, description, ctx.dtype_name());
    let mut summary = Summary::default();

    println!("\n-- 1. soft dictionary lookup: 8 keys, 8 values, 8 noisy shuffled queries");
    dictionary_lookup::run(dev, out, args.noise, seed, &mut report)?.summarise(&mut summary);

    println!("\n-- 2. causal self-attention on a random token sequence");
    causal_maps::run(dev, out, seed, &mut report)?;

    let plan = CostPlan::new(quick, dev.is_cuda(), args.max_n, args.reps);
    println!("\n-- 3. cost vs sequence length n (d = {})", args.d_head);
    cost_vs_n::run(
        dev,
        dtype,
        out,
        plan.max_n,
        args.d_head,
        plan.reps,
        &mut report,
    )?
    .summarise(&mut summary);

    println!("\n-- 4. cost vs head width d (n = {})", plan.n_for_d);
    cost_vs_d::run(dev, dtype, out, plan.n_for_d, plan.reps, &mut report)?.summarise(&mut summary);

    summary.print(description);
    let path = report.write(out)?;
    println!("results: {}", path.display());
    Ok(())
}

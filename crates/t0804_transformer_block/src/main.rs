//! 8-04 experiment: pre-norm vs post-norm decoder-only LMs on WikiText-2.
//!
//! Same model, same data, same budget; two learning-rate regimes (a standard one with warm-up and
//! an aggressive one without). Records loss and gradient-norm curves, whether and when each run
//! diverges, and the gradient norm reaching each layer at initialisation.
//!
//! `cargo run -p t0804_transformer_block -- [--quick] [--corpus tiny]`; on a GPU
//! `cargo run --release -p t0804_transformer_block --features cuda -- --device cuda`
//!
//! The experiments live in `src/experiments/`: [`experiments::grad_at_init`] (gradient per block
//! at initialisation) and [`experiments::regimes`] (the four training runs), both on the model of
//! [`experiments::model`].

use anyhow::Result;
use clap::Parser;
use shared::cli::CommonArgs;
use shared::report::RunReport;
use shared::tokenizer::{load_corpus, Corpus};
use shared::train::unigram_entropy;

mod experiments;

use experiments::model::Shape;
use experiments::{grad_at_init, regimes};

/// The topic's output folder name and `results.json` topic.
const TOPIC: &str = "t0804_transformer_block";

#[derive(Parser, Debug)]
#[command(about = "8-04: pre-norm vs post-norm transformer blocks on WikiText-2")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Text to train on.
    #[arg(long, value_enum, default_value = "wikitext2")]
    corpus: Corpus,
    /// Training steps per run (default: 300 on CPU, 1500 on GPU, 40 with --quick).
    #[arg(long)]
    steps: Option<usize>,
    /// Learning rate of the standard regime (with warm-up).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Learning rate of the aggressive regime (no warm-up, no clipping).
    #[arg(long, default_value_t = 1e-2)]
    aggressive_lr: f64,
}

fn main() -> Result<()> {
    shared::cpu::in_pool(run)
}

fn run() -> Result<()> {
    let args = Args::parse();
    let ctx = args.common.setup(
        TOPIC,
        "pre-norm vs post-norm at a standard and an aggressive learning rate",
    )?;
    ctx.require_one_dtype()?;
    let dev = &ctx.picked.device;
    let mut shape = Shape::for_run(args.common.quick, dev.is_cuda());
    shape.steps = args.steps.unwrap_or(shape.steps);
    let data = load_corpus(args.corpus, args.common.data_dir.as_deref(), shape.vocab)?;
    shape.vocab = data.tokenizer.vocab_size();
    let h_unigram = unigram_entropy(&data.train);
    println!(
        "   corpus {:?}: {} train / {} valid BPE tokens (vocab {}); unigram entropy {h_unigram:.3} nats",
        args.corpus,
        data.train.len(),
        data.valid.len(),
        shape.vocab
    );
    println!(
        "   model: {} layers, d_model {}, {} heads, context {}; batch {}, {} steps per run",
        shape.n_layers, shape.d_model, shape.n_heads, shape.seq_len, shape.batch, shape.steps
    );
    let mut report = RunReport::start(
        TOPIC,
        serde_json::json!({
            "corpus": args.corpus, "vocab": shape.vocab, "d_model": shape.d_model, "n_layers": shape.n_layers,
            "n_heads": shape.n_heads, "seq_len": shape.seq_len, "batch": shape.batch, "steps": shape.steps,
            "lr": args.lr, "aggressive_lr": args.aggressive_lr, "seed": args.common.seed,
        }),
        &ctx.picked.description,
        ctx.dtype_name(),
    );

    // 1. Gradient reaching each block at initialisation (a deeper stack shows it best).
    let seed = args.common.seed;
    let (deep, by_layer) = grad_at_init::run(&shape, &data.train, seed, ctx.dtype, dev)?;
    grad_at_init::plot(&by_layer, deep.n_layers, &ctx.out_dir)?;
    report.metric(
        "grad_norm_by_layer_at_init",
        grad_at_init::metric(&by_layer),
    );

    // 2. Pre- and post-norm trained under the standard and the aggressive regime.
    let setup = regimes::Setup {
        shape,
        data: &data,
        seed,
        eval_batches: if args.common.quick { 4 } else { 16 },
        dtype: ctx.dtype,
        dev,
    };
    let runs = regimes::run(
        &setup,
        &regimes::regimes(shape.steps, args.lr, args.aggressive_lr),
    )?;
    regimes::plot(&runs, &ctx.out_dir)?;

    // 3. Summary.
    let metrics = regimes::summarise(&runs);
    println!("unigram entropy of the training tokens: {h_unigram:.3} nats (a context-free model's best loss)");
    grad_at_init::print_first_last(&by_layer);
    report.metric("unigram_entropy", h_unigram);
    report.metric("runs", metrics);
    report.metric("train_tokens", data.train.len());
    let path = report.write(&ctx.out_dir)?;
    println!(
        "wrote {} and figures in {}",
        path.display(),
        ctx.out_dir.display()
    );
    Ok(())
}

//! 8-05 experiment, the project's main job: the encoder–decoder Transformer against an LSTM
//! seq2seq on WikiText-2 continuation, same data, same tokenizer, same budget, side by side.
//!
//! `cargo run -p t0805_full_transformer -- [--preset quick|cpu|full] [--resume]`; on a GPU
//! `cargo run --release -p t0805_full_transformer --features cuda -- --device cuda`
//!
//! The steps live in `src/experiments/`: the continuation pairs ([`experiments::data`]), the
//! contenders ([`experiments::model`]), training through the one loop with checkpoints
//! ([`experiments::training`]), the comparison ([`experiments::comparison`]) and greedy samples
//! ([`experiments::samples`]).

use anyhow::Result;
use clap::Parser;
use shared::cli::CommonArgs;
use shared::kernels::OpImpl;
use shared::report::RunReport;
use shared::tokenizer::{load_corpus, Corpus};
use shared::train::unigram_entropy;
use t0805_full_transformer::Preset;

mod experiments;

use experiments::comparison::{self, Contender};
use experiments::data::Data;
use experiments::model::NAMES;
use experiments::samples;
use experiments::training::RunSettings;

/// The topic's output folder name and `results.json` topic.
const TOPIC: &str = "t0805_full_transformer";

#[derive(Parser, Debug)]
#[command(about = "8-05: the full encoder-decoder Transformer vs an LSTM seq2seq on WikiText-2")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Experiment size: quick (smoke test), cpu (default on a CPU), full (a real model; default on a GPU).
    #[arg(long)]
    preset: Option<String>,
    /// Text to train on.
    #[arg(long, value_enum, default_value = "wikitext2")]
    corpus: Corpus,
    /// Override the preset's number of training steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Continue from the checkpoints in output/t0805_full_transformer/checkpoints.
    #[arg(long)]
    resume: bool,
    /// Write a checkpoint every N steps (and always at the end).
    #[arg(long, default_value_t = 500)]
    checkpoint_every: usize,
    /// How the LSTM runs: fused (the cell as one op, backpropagation through time written out)
    /// or composed (tensor ops, gradients by autograd). Same values, different speed.
    #[arg(long, value_enum, default_value = "fused")]
    lstm: OpImpl,
}

/// The preset asked for, else `quick` with `--quick`, `full` on a GPU, `cpu` otherwise;
/// `--steps` overrides its step count.
fn preset(args: &Args, gpu: bool) -> Result<Preset> {
    let default = match (args.common.quick, gpu) {
        (true, _) => "quick",
        (false, true) => "full",
        (false, false) => "cpu",
    };
    let mut p = Preset::by_name(args.preset.as_deref().unwrap_or(default))?;
    p.steps = args.steps.unwrap_or(p.steps);
    Ok(p)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let ctx = args.common.setup_mixed(
        TOPIC,
        "encoder-decoder Transformer vs LSTM seq2seq, WikiText-2 continuation",
    )?;
    let p = preset(&args, ctx.picked.device.is_cuda())?;
    let corpus = load_corpus(args.corpus, args.common.data_dir.as_deref(), p.vocab)?;
    let vocab = corpus.tokenizer.vocab_size();
    let data = Data::new(&corpus, &p, &ctx.picked.device)?;
    let h_unigram = unigram_entropy(&corpus.train);
    data.describe(&p, vocab, h_unigram);
    let mut report = RunReport::start(
        TOPIC,
        serde_json::json!({ "preset": p, "corpus": args.corpus, "vocab": vocab, "seed": args.common.seed }),
        &ctx.picked.description,
        ctx.dtype_name(),
    );

    // Evaluation during training uses a fixed slice of the validation pairs; the final numbers use
    // all of them on the GPU preset.
    let eval_batches = if p.name == "quick" { 4 } else { 24 };
    let final_batches = if p.name == "full" {
        usize::MAX
    } else {
        eval_batches
    };
    let run = RunSettings {
        checkpoints: ctx.out_dir.join("checkpoints"),
        checkpoint_every: args.checkpoint_every,
        resume: args.resume,
        seed: args.common.seed,
        eval_batches,
        lstm: args.lstm,
    };
    let contenders = NAMES
        .into_iter()
        .map(|name| {
            let dtypes = (ctx.dtype, ctx.compute_dtype);
            Contender::train_and_test(name, &data, &p, vocab, &run, dtypes, final_batches)
        })
        .collect::<Result<Vec<_>>>()?;

    let target = comparison::loss_target(&contenders);
    comparison::print_summary(&contenders, target, h_unigram);
    let samples = samples::greedy(&contenders, &data, &corpus.tokenizer, p.tgt_len)?;
    comparison::plot(&contenders, &ctx.out_dir, &ctx.picked.description)?;

    report.metric(
        "models",
        contenders.iter().map(Contender::json).collect::<Vec<_>>(),
    );
    report.metric("unigram_entropy", h_unigram);
    report.metric("time_to_loss_target", target);
    report.metric("samples", samples);
    let path = report.write(&ctx.out_dir)?;
    println!(
        "\nwrote {} and figures in {}",
        path.display(),
        ctx.out_dir.display()
    );
    Ok(())
}

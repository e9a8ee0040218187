//! The experiment of 8-05, the project's main job, in the order it runs: the continuation pairs
//! ([`data`]), the two contenders behind one interface ([`model`]), each trained through the one
//! training loop ([`training`]) and compared side by side ([`comparison`]), with greedy samples
//! ([`samples`]). [`run`] is the whole job for the command line of [`Args`]; the rung's parts
//! decide how the Transformer's norms and attention run (this topic's binary passes 8-04's
//! composed parts; `t0810_kv_cache`'s `main_job` example passes the fused LayerNorm and
//! FlashAttention).

pub mod comparison;
pub mod data;
pub mod model;
pub mod samples;
pub mod training;

use crate::Preset;
use anyhow::Result;
use clap::Parser;
use comparison::Contender;
use data::Data;
use model::NAMES;
use shared::cli::CommonArgs;
use shared::kernels::OpImpl;
use shared::report::RunReport;
use shared::tokenizer::{load_corpus, Corpus};
use shared::train::unigram_entropy;
use t0804_transformer_block::Parts;
use training::RunSettings;

/// The main job's command line.
#[derive(Parser, Debug)]
#[command(about = "8-05: the full encoder-decoder Transformer vs an LSTM seq2seq on WikiText-2")]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Experiment size: quick (smoke test), cpu (default on a CPU), full (a real model; default on a GPU).
    #[arg(long)]
    pub preset: Option<String>,
    /// Text to train on.
    #[arg(long, value_enum, default_value = "wikitext2")]
    pub corpus: Corpus,
    /// Override the preset's number of training steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Continue from the checkpoints in <out>/<topic>/checkpoints.
    #[arg(long)]
    pub resume: bool,
    /// Write a checkpoint every N steps (and always at the end).
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: usize,
    /// How the LSTM runs: fused (the cell as one op, backpropagation through time written out)
    /// or composed (tensor ops, gradients by autograd). Same values, different speed.
    #[arg(long, value_enum, default_value = "fused")]
    pub lstm: OpImpl,
    /// In bf16-mixed, cast each f32 weight to bf16 where it is used (and each gradient back)
    /// instead of keeping bf16 copies of f32 master weights, to measure that.
    #[arg(long)]
    pub cast_weights: bool,
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

/// The whole job: both contenders trained, compared, sampled; figures and `results.json` in
/// `<out>/<topic>/`. The Transformer is built with `parts`.
pub fn run(args: &Args, topic: &str, parts: &dyn Parts) -> Result<()> {
    let ctx = args.common.setup_mixed(
        topic,
        "encoder-decoder Transformer vs LSTM seq2seq, WikiText-2 continuation",
    )?;
    let p = preset(args, ctx.picked.device.is_cuda())?;
    let corpus = load_corpus(args.corpus, args.common.data_dir.as_deref(), p.vocab)?;
    let vocab = corpus.tokenizer.vocab_size();
    let data = Data::new(&corpus, &p, &ctx.picked.device)?;
    let h_unigram = unigram_entropy(&corpus.train);
    data.describe(&p, vocab, h_unigram);
    let kernels = parts.kernels().describe();
    println!("Transformer kernels: {kernels}");
    let mut report = RunReport::start(
        topic,
        serde_json::json!({ "preset": p, "corpus": args.corpus, "vocab": vocab, "seed": args.common.seed, "kernels": kernels, "cast_weights": args.cast_weights }),
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
        parts,
        checkpoints: ctx.out_dir.join("checkpoints"),
        checkpoint_every: args.checkpoint_every,
        resume: args.resume,
        seed: args.common.seed,
        eval_batches,
        lstm: args.lstm,
        cast_weights: args.cast_weights,
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

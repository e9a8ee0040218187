//! 8-05 experiment, the project's main job: the encoder–decoder Transformer against an LSTM
//! seq2seq on WikiText-2 continuation, same data, same tokenizer, same budget, side by side.
//!
//! `cargo run -p t0805_full_transformer -- [--preset quick|cpu|full] [--resume] [--device cuda]`

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use shared::batching::{seq2seq_batch, Seq2SeqBatch, Seq2SeqExample};
use shared::cli::CommonArgs;
use shared::report::{line_chart, print_table, Axes, RunReport, Series};
use shared::tokenizer::{load_corpus, Corpus, BOS, PAD};
use shared::train::{
    human_rate, unigram_entropy, AdamWConfig, Diverged, Progress, ScheduleConfig, Trainer,
};
use t0805_full_transformer::lstm::LstmSeq2Seq;
use t0805_full_transformer::task::{batch_for_step, continuation_pairs};
use t0805_full_transformer::{Preset, Transformer};

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
}

/// Per-run record: `(step, train loss, wall s)`, `(step, valid loss, wall s)`, tokens/s.
#[derive(Default, serde::Serialize, serde::Deserialize, Clone)]
struct Curve {
    train: Vec<(usize, f64, f64)>,
    valid: Vec<(usize, f64, f64)>,
    train_seconds: f64,
    target_tokens: usize,
}

/// The two contenders behind one interface.
enum Model {
    Transformer(Transformer),
    Lstm(LstmSeq2Seq),
}

impl Model {
    fn loss(&self, b: &Seq2SeqBatch) -> candle_core::Result<Tensor> {
        match self {
            Model::Transformer(m) => m.loss(b),
            Model::Lstm(m) => m.loss(b),
        }
    }
    fn generate(&self, src: &[u32], bos: u32, n: usize) -> candle_core::Result<Vec<u32>> {
        match self {
            Model::Transformer(m) => m.generate(src, bos, n, 0.0, 0),
            Model::Lstm(m) => m.generate(src, bos, n, 0.0, 0),
        }
    }
}

struct Data {
    train: Vec<Seq2SeqExample>,
    valid: Vec<Seq2SeqExample>,
    test: Vec<Seq2SeqExample>,
    pad: u32,
    bos: u32,
}

/// Mean target-token loss over (at most `max_batches` batches of) `pairs`.
fn evaluate(
    model: &Model,
    pairs: &[Seq2SeqExample],
    data: &Data,
    batch: usize,
    max_batches: usize,
    dev: &candle_core::Device,
) -> Result<f64> {
    let (mut total, mut count) = (0.0, 0usize);
    for chunk in pairs.chunks(batch).take(max_batches) {
        let b = seq2seq_batch(chunk, data.pad, data.bos, dev)?;
        let loss = model
            .loss(&b)?
            .detach()
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()? as f64;
        total += loss * b.n_target_tokens as f64;
        count += b.n_target_tokens;
    }
    Ok(total / count.max(1) as f64)
}

#[allow(clippy::too_many_arguments)]
fn train_model(
    name: &str,
    model: &Model,
    varmap: &mut VarMap,
    data: &Data,
    p: &Preset,
    args: &Args,
    ckpt_dir: &std::path::Path,
    eval_batches: usize,
    dev: &candle_core::Device,
) -> Result<Curve> {
    let warmup = (p.steps / 20).max(1);
    let schedule = ScheduleConfig {
        max_lr: p.lr,
        min_lr: p.lr / 10.0,
        warmup_steps: warmup,
        total_steps: p.steps,
        clip_norm: Some(1.0),
    };
    let mut trainer = Trainer::new(varmap, AdamWConfig::default(), schedule)?;
    let mut curve = Curve::default();
    if args.resume && ckpt_dir.join("state.json").exists() {
        let saved = trainer
            .load_checkpoint(varmap, ckpt_dir)
            .with_context(|| format!("resuming {name}"))?;
        curve = serde_json::from_value(saved["curve"].clone()).unwrap_or_default();
        println!(
            "   resumed {name} at step {} from {}",
            trainer.step,
            ckpt_dir.display()
        );
    }
    let eval_every = (p.steps / 12).max(1);
    let mut progress = Progress::new(p.steps as u64, name);
    let offset_s = curve.train.last().map_or(0.0, |t| t.2);
    let started = std::time::Instant::now();
    let save = |trainer: &Trainer, curve: &Curve| -> Result<()> {
        trainer.save_checkpoint(
            varmap,
            ckpt_dir,
            &serde_json::json!({ "preset": p, "model": name, "curve": curve }),
        )
    };
    while trainer.step < p.steps {
        let step = trainer.step;
        if step % eval_every == 0 && curve.valid.last().is_none_or(|v| v.0 != step) {
            let v = evaluate(model, &data.valid, data, p.batch, eval_batches, dev)?;
            curve
                .valid
                .push((step, v, offset_s + started.elapsed().as_secs_f64()));
        }
        let t0 = std::time::Instant::now();
        let batch = seq2seq_batch(
            &batch_for_step(&data.train, p.batch, step, args.common.seed),
            data.pad,
            data.bos,
            dev,
        )?;
        let stats = match trainer.step(&model.loss(&batch)?) {
            Ok(s) => s,
            Err(e) if e.downcast_ref::<Diverged>().is_some() => {
                save(&trainer, &curve)?; // parameters are the last good ones
                return Err(e.context(format!(
                    "{name}: the last good checkpoint is in {}",
                    ckpt_dir.display()
                )));
            }
            Err(e) => return Err(e),
        };
        dev.synchronize()?;
        curve.train_seconds += t0.elapsed().as_secs_f64();
        curve.target_tokens += batch.n_target_tokens + batch.src.elem_count();
        curve
            .train
            .push((step, stats.loss, offset_s + started.elapsed().as_secs_f64()));
        let rate = curve.target_tokens as f64 / curve.train_seconds.max(1e-9);
        progress.update(
            trainer.step as u64,
            format!(
                "loss {:.3} · lr {:.1e} · {} tok/s",
                stats.loss,
                stats.lr,
                human_rate(rate)
            ),
        );
        if trainer.step % args.checkpoint_every == 0 {
            save(&trainer, &curve)?;
        }
    }
    progress.finish();
    if curve.valid.last().is_none_or(|v| v.0 != p.steps) {
        let v = evaluate(model, &data.valid, data, p.batch, eval_batches, dev)?;
        curve
            .valid
            .push((p.steps, v, offset_s + started.elapsed().as_secs_f64()));
    }
    save(&trainer, &curve)?;
    Ok(curve)
}

/// First wall-clock time at which a validation loss ≤ `target` was measured.
fn time_to_reach(curve: &Curve, target: f64) -> Option<f64> {
    curve.valid.iter().find(|v| v.1 <= target).map(|v| v.2)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let ctx = args.common.setup(
        TOPIC,
        "encoder-decoder Transformer vs LSTM seq2seq, WikiText-2 continuation",
    )?;
    let dev = ctx.picked.device.clone();
    let preset_name = args.preset.clone().unwrap_or_else(|| {
        if args.common.quick {
            "quick"
        } else if dev.is_cuda() {
            "full"
        } else {
            "cpu"
        }
        .to_string()
    });
    let mut p = Preset::by_name(&preset_name)?;
    if let Some(s) = args.steps {
        p.steps = s;
    }
    let corpus = load_corpus(args.corpus, args.common.data_dir.as_deref(), p.vocab)?;
    let tok = &corpus.tokenizer;
    let vocab = tok.vocab_size();
    let data = Data {
        train: continuation_pairs(&corpus.train, p.src_len, p.tgt_len)?,
        valid: continuation_pairs(&corpus.valid, p.src_len, p.tgt_len)?,
        test: continuation_pairs(&corpus.test, p.src_len, p.tgt_len)?,
        pad: tok.special(PAD)?,
        bos: tok.special(BOS)?,
    };
    let h_unigram = unigram_entropy(&corpus.train);
    // Evaluation during training uses a fixed slice of the validation pairs; the final numbers use
    // all of them on the GPU preset.
    let eval_batches = if p.name == "quick" { 4 } else { 24 };
    let final_batches = if p.name == "full" {
        usize::MAX
    } else {
        eval_batches
    };
    println!(
        "   task: continue {} BPE tokens of source with the next {} (vocab {vocab}); {} train / {} valid / {} test pairs",
        p.src_len,
        p.tgt_len,
        data.train.len(),
        data.valid.len(),
        data.test.len()
    );
    println!(
        "   preset '{}': {} steps of batch {} for each model; unigram entropy {h_unigram:.3} nats",
        p.name, p.steps, p.batch
    );

    let mut report = RunReport::start(
        TOPIC,
        serde_json::json!({ "preset": p, "corpus": args.corpus, "vocab": vocab, "seed": args.common.seed }),
        &ctx.picked.description,
        args.common.dtype.name(),
    );
    let ckpt_root = ctx.out_dir.join("checkpoints");
    let mut results = Vec::new();
    let mut curves = Vec::new();
    let mut models = Vec::new();
    for name in ["transformer", "lstm"] {
        shared::params::set_seed(args.common.seed);
        let mut varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, ctx.dtype, &dev);
        let model = match name {
            "transformer" => Model::Transformer(Transformer::new(vb, p.transformer(vocab))?),
            _ => Model::Lstm(LstmSeq2Seq::new(vb, p.lstm(vocab))?),
        };
        let n_params = shared::params::count_params(&varmap);
        println!("-- {name}: {} parameters", n_params);
        let curve = train_model(
            name,
            &model,
            &mut varmap,
            &data,
            &p,
            &args,
            &ckpt_root.join(name),
            eval_batches,
            &dev,
        )?;
        let valid = match final_batches {
            usize::MAX => evaluate(&model, &data.valid, &data, p.batch, final_batches, &dev)?,
            _ => curve.valid.last().map(|v| v.1).unwrap_or(f64::NAN),
        };
        let test = evaluate(&model, &data.test, &data, p.batch, final_batches, &dev)?;
        let rate = curve.target_tokens as f64 / curve.train_seconds.max(1e-9);
        results.push(serde_json::json!({
            "model": name, "params": n_params, "valid_loss": valid, "valid_ppl": valid.exp(), "test_loss": test, "test_ppl": test.exp(),
            "train_tokens_per_s": rate, "train_seconds": curve.train_seconds, "curve": curve,
        }));
        curves.push((name, curve, n_params, valid, test, rate));
        models.push(model);
    }

    // Time for each model to reach the loss the weaker one ends at.
    let target = curves.iter().map(|c| c.3).fold(f64::NEG_INFINITY, f64::max) + 1e-9;
    let mut rows = Vec::new();
    for (name, curve, n_params, valid, test, rate) in &curves {
        let reach = time_to_reach(curve, target);
        rows.push(vec![
            name.to_string(),
            format!("{:.2}M", *n_params as f64 / 1e6),
            format!("{valid:.3} / {:.1}", valid.exp()),
            format!("{test:.3} / {:.1}", test.exp()),
            human_rate(*rate),
            reach.map_or("-".into(), |s| format!("{s:.0} s")),
        ]);
    }
    println!();
    print_table(
        &[
            "model",
            "params",
            "valid loss / ppl",
            "test loss / ppl",
            "train tok/s",
            &format!("time to valid loss {target:.3}"),
        ],
        &rows,
    );
    println!("unigram entropy {h_unigram:.3} nats (perplexity {:.0}): the best any model ignoring context can do", h_unigram.exp());

    // Samples: greedy continuations of validation sources.
    let mut samples = Vec::new();
    for ex in data
        .valid
        .iter()
        .step_by((data.valid.len() / 3).max(1))
        .take(3)
    {
        let n = p.tgt_len.min(24);
        let src_text = tok.decode(&ex.src)?;
        let reference = tok.decode(&ex.tgt[..n])?;
        let outs: Vec<String> = models
            .iter()
            .map(|m| tok.decode(&m.generate(&ex.src, data.bos, n)?))
            .collect::<Result<_>>()?;
        println!(
            "\nsource     …{}",
            src_text
                .chars()
                .rev()
                .take(120)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<String>()
                .replace('\n', "⏎")
        );
        println!("reference  {}", reference.replace('\n', "⏎"));
        println!("transformer {}", outs[0].replace('\n', "⏎"));
        println!("lstm        {}", outs[1].replace('\n', "⏎"));
        samples.push(serde_json::json!({ "source": src_text, "reference": reference, "transformer": outs[0], "lstm": outs[1] }));
    }

    let step_series: Vec<Series> = curves
        .iter()
        .map(|c| {
            Series::new(
                format!("{} train", c.0),
                smooth(
                    &c.1.train
                        .iter()
                        .map(|t| (t.0 as f64, t.1))
                        .collect::<Vec<_>>(),
                ),
            )
        })
        .chain(curves.iter().map(|c| {
            Series::new(
                format!("{} valid", c.0),
                c.1.valid.iter().map(|v| (v.0 as f64, v.1)).collect(),
            )
        }))
        .collect();
    line_chart(
        &ctx.out_dir.join("loss_vs_step.png"),
        "Target-token loss vs step (same batches for both)",
        "step",
        "cross-entropy (nats)",
        &step_series,
        Axes::default(),
    )?;
    let wall_series: Vec<Series> = curves
        .iter()
        .map(|c| {
            Series::new(
                format!("{} valid", c.0),
                c.1.valid.iter().map(|v| (v.2, v.1)).collect(),
            )
        })
        .collect();
    line_chart(
        &ctx.out_dir.join("loss_vs_wallclock.png"),
        &format!("Validation loss vs wall-clock ({})", ctx.picked.description),
        "seconds",
        "cross-entropy (nats)",
        &wall_series,
        Axes::default(),
    )?;

    report.metric("models", results);
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

/// A 20-step running mean, for readable training curves.
fn smooth(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let w = 20;
    (0..points.len())
        .map(|i| {
            let lo = i.saturating_sub(w - 1);
            (
                points[i].0,
                points[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i + 1 - lo) as f64,
            )
        })
        .collect()
}

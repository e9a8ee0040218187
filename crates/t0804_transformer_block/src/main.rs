//! 8-04 experiment: pre-norm vs post-norm decoder-only LMs on WikiText-2.
//!
//! Same model, same data, same budget; two learning-rate regimes (a standard one with warm-up and
//! an aggressive one without). Records loss and gradient-norm curves, whether and when each run
//! diverges, and the gradient norm reaching each layer at initialisation.
//!
//! `cargo run -p t0804_transformer_block -- [--quick] [--corpus tiny] [--device cuda]`

use anyhow::Result;
use candle_core::Tensor;
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use shared::cli::CommonArgs;
use shared::report::{bar_chart, line_chart, print_table, Axes, RunReport, Series};
use shared::tokenizer::{load_corpus, Corpus};
use shared::train::{
    grad_norm, train_lm, unigram_entropy, AdamWConfig, LmCurve, LmTrainSpec, ScheduleConfig,
    Trainer,
};
use t0804_transformer_block::*;

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

struct Shape {
    vocab: usize,
    d_model: usize,
    n_layers: usize,
    n_heads: usize,
    seq_len: usize,
    batch: usize,
    steps: usize,
}

fn model_config(s: &Shape, placement: NormPlacement) -> ClassicLmConfig {
    ClassicLmConfig {
        vocab_size: s.vocab,
        max_seq_len: s.seq_len,
        n_layers: s.n_layers,
        block: BlockConfig {
            d_model: s.d_model,
            n_heads: s.n_heads,
            d_ff: 4 * s.d_model,
            activation: Activation::Gelu,
            placement,
            bias: true,
            eps: 1e-5,
        },
        positions: PositionKind::Sinusoidal,
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let ctx = args.common.setup(
        TOPIC,
        "pre-norm vs post-norm at a standard and an aggressive learning rate",
    )?;
    let dev = &ctx.picked.device;
    let gpu = dev.is_cuda();
    let quick = args.common.quick;
    let shape = match (quick, gpu) {
        (true, _) => Shape {
            vocab: 2048,
            d_model: 64,
            n_layers: 2,
            n_heads: 4,
            seq_len: 32,
            batch: 8,
            steps: 40,
        },
        (false, false) => Shape {
            vocab: 4096,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            seq_len: 64,
            batch: 16,
            steps: 300,
        },
        (false, true) => Shape {
            vocab: 8192,
            d_model: 384,
            n_layers: 6,
            n_heads: 6,
            seq_len: 256,
            batch: 32,
            steps: 1500,
        },
    };
    let shape = Shape {
        steps: args.steps.unwrap_or(shape.steps),
        ..shape
    };
    let data = load_corpus(args.corpus, args.common.data_dir.as_deref(), shape.vocab)?;
    let vocab = data.tokenizer.vocab_size();
    let shape = Shape { vocab, ..shape };
    let h_unigram = unigram_entropy(&data.train);
    println!(
        "   corpus {:?}: {} train / {} valid BPE tokens (vocab {vocab}); unigram entropy {h_unigram:.3} nats",
        args.corpus,
        data.train.len(),
        data.valid.len()
    );
    println!(
        "   model: {} layers, d_model {}, {} heads, context {}; batch {}, {} steps per run",
        shape.n_layers, shape.d_model, shape.n_heads, shape.seq_len, shape.batch, shape.steps
    );

    let mut report = RunReport::start(
        TOPIC,
        serde_json::json!({
            "corpus": args.corpus, "vocab": vocab, "d_model": shape.d_model, "n_layers": shape.n_layers,
            "n_heads": shape.n_heads, "seq_len": shape.seq_len, "batch": shape.batch, "steps": shape.steps,
            "lr": args.lr, "aggressive_lr": args.aggressive_lr, "seed": args.common.seed,
        }),
        &ctx.picked.description,
        args.common.dtype.name(),
    );

    // 1. Gradient reaching each layer at initialisation (a deeper stack shows it best).
    let deep = Shape {
        n_layers: (shape.n_layers * 2).max(8),
        ..shape
    };
    let mut by_layer = Vec::new();
    for placement in [NormPlacement::Pre, NormPlacement::Post] {
        shared::params::set_seed(args.common.seed);
        let varmap = VarMap::new();
        let lm = build_classic_lm(
            VarBuilder::from_varmap(&varmap, ctx.dtype, dev),
            &model_config(&deep, placement),
        )?;
        let batch = shared::batching::LmBatcher::new(deep.batch, deep.seq_len, args.common.seed)
            .batch(&data.train, 0, dev)?;
        let grads = lm.loss(&batch.x, &batch.y)?.backward()?;
        let vars = shared::params::named_vars(&varmap);
        let norms: Vec<f64> = (0..deep.n_layers)
            .map(|i| {
                let prefix = format!("blocks.{i}.");
                let layer: Vec<_> = vars
                    .iter()
                    .filter(|(n, _)| n.starts_with(&prefix))
                    .cloned()
                    .collect();
                grad_norm(&grads, &layer)
            })
            .collect::<Result<_>>()?;
        by_layer.push((placement, norms));
    }
    let layer_series: Vec<Series> = by_layer
        .iter()
        .map(|(p, n)| {
            Series::new(
                format!("{p:?}-norm"),
                n.iter().enumerate().map(|(i, g)| (i as f64, *g)).collect(),
            )
        })
        .collect();
    line_chart(
        &ctx.out_dir.join("grad_norm_by_layer.png"),
        &format!(
            "Gradient norm per block at initialisation ({} blocks)",
            deep.n_layers
        ),
        "block index (0 = nearest the embeddings)",
        "‖∂loss/∂θ_block‖",
        &layer_series,
        Axes {
            log_x: false,
            log_y: true,
        },
    )?;
    report.metric(
        "grad_norm_by_layer_at_init",
        by_layer
            .iter()
            .map(|(p, n)| (format!("{p:?}"), n.clone()))
            .collect::<Vec<_>>(),
    );

    // 2. Training runs.
    let regimes = [
        ("standard", args.lr, (shape.steps / 10).max(1), Some(1.0)),
        ("aggressive", args.aggressive_lr, 0, None),
    ];
    let mut runs: Vec<(String, LmCurve)> = Vec::new();
    for (regime, lr, warmup, clip) in regimes {
        for placement in [NormPlacement::Pre, NormPlacement::Post] {
            shared::params::set_seed(args.common.seed);
            let varmap = VarMap::new();
            let lm = build_classic_lm(
                VarBuilder::from_varmap(&varmap, ctx.dtype, dev),
                &model_config(&shape, placement),
            )?;
            let schedule = ScheduleConfig {
                max_lr: lr,
                min_lr: lr / 10.0,
                warmup_steps: warmup,
                total_steps: shape.steps,
                clip_norm: clip,
            };
            let mut trainer = Trainer::new(&varmap, AdamWConfig::default(), schedule)?;
            let label = format!("{placement:?}-norm {regime}");
            let spec = LmTrainSpec {
                label: label.clone(),
                steps: shape.steps,
                batch_size: shape.batch,
                seq_len: shape.seq_len,
                eval_every: (shape.steps / 10).max(1),
                eval_batches: if quick { 4 } else { 16 },
                seed: args.common.seed,
            };
            let loss_fn = |x: &Tensor, y: &Tensor| lm.loss(x, y);
            let curve = train_lm(&mut trainer, &data.train, &data.valid, &spec, dev, &loss_fn)?;
            runs.push((label, curve));
        }
    }

    // 3. Figures and summary.
    let smooth = |pts: Vec<(f64, f64)>| -> Vec<(f64, f64)> {
        let w = 10usize;
        (0..pts.len())
            .map(|i| {
                let lo = i.saturating_sub(w - 1);
                let m = pts[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i + 1 - lo) as f64;
                (pts[i].0, m)
            })
            .collect()
    };
    let train_series: Vec<Series> = runs
        .iter()
        .map(|(l, c)| {
            Series::new(
                l.clone(),
                smooth(c.train.iter().map(|t| (t.0 as f64, t.1)).collect()),
            )
        })
        .collect();
    line_chart(
        &ctx.out_dir.join("loss_vs_step.png"),
        "Training loss (10-step mean)",
        "step",
        "cross-entropy (nats)",
        &train_series,
        Axes::default(),
    )?;
    let valid_series: Vec<Series> = runs
        .iter()
        .map(|(l, c)| Series::new(l.clone(), c.valid.iter().map(|v| (v.2, v.1)).collect()))
        .collect();
    line_chart(
        &ctx.out_dir.join("valid_loss_vs_wall.png"),
        "Validation loss vs wall-clock",
        "seconds",
        "cross-entropy (nats)",
        &valid_series,
        Axes::default(),
    )?;
    let gn_series: Vec<Series> = runs
        .iter()
        .map(|(l, c)| {
            Series::new(
                l.clone(),
                smooth(c.train.iter().map(|t| (t.0 as f64, t.2)).collect()),
            )
        })
        .collect();
    line_chart(
        &ctx.out_dir.join("grad_norm_vs_step.png"),
        "Global gradient norm (before clipping, 10-step mean)",
        "step",
        "‖g‖",
        &gn_series,
        Axes {
            log_x: false,
            log_y: true,
        },
    )?;
    let finals: Vec<f64> = runs
        .iter()
        .map(|(_, c)| c.final_valid_loss().unwrap_or(f64::NAN))
        .collect();
    bar_chart(
        &ctx.out_dir.join("final_valid_loss.png"),
        "Final validation loss (NaN bar = diverged)",
        "cross-entropy (nats)",
        &runs.iter().map(|(l, _)| l.clone()).collect::<Vec<_>>(),
        &finals
            .iter()
            .map(|v| if v.is_finite() { *v } else { 0.0 })
            .collect::<Vec<_>>(),
    )?;

    let mut rows = Vec::new();
    let mut metrics = Vec::new();
    for (label, c) in &runs {
        let max_gn = c.train.iter().map(|t| t.2).fold(0.0, f64::max);
        let v = c.final_valid_loss();
        rows.push(vec![
            label.clone(),
            v.map_or("-".into(), |v| format!("{v:.3}")),
            v.map_or("-".into(), |v| format!("{:.1}", v.exp())),
            c.diverged_at
                .map_or("no".into(), |s| format!("at step {s}")),
            format!("{max_gn:.2}"),
            format!("{:.0}", c.tokens_per_s),
        ]);
        metrics.push(serde_json::json!({
            "run": label, "final_valid_loss": v, "final_valid_ppl": v.map(f64::exp), "diverged_at": c.diverged_at,
            "max_grad_norm": max_gn, "tokens_per_s": c.tokens_per_s, "wall_s": c.wall_s,
            "valid_curve": c.valid, "train_loss": c.train.iter().map(|t| t.1).collect::<Vec<_>>(),
            "grad_norm": c.train.iter().map(|t| t.2).collect::<Vec<_>>(),
        }));
    }
    println!();
    print_table(
        &[
            "run",
            "valid loss",
            "valid ppl",
            "diverged",
            "max ‖g‖",
            "tok/s",
        ],
        &rows,
    );
    println!("unigram entropy of the training tokens: {h_unigram:.3} nats (a context-free model's best loss)");
    let (pre, post) = (&by_layer[0].1, &by_layer[1].1);
    println!(
        "gradient norm, first/last block at init: pre-norm {:.3}/{:.3}, post-norm {:.3}/{:.3}",
        pre[0],
        pre[pre.len() - 1],
        post[0],
        post[post.len() - 1]
    );
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

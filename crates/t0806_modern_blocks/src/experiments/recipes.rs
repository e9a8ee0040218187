//! The recipe comparison: three decoder-only LMs of the same shape on the same WikiText-2 tokens
//! with the same budget —
//!
//! * **post-norm (2017)**: rung 0 arranged as the original Transformer, `LN(x + f(x))`, with a
//!   ReLU MLP and sinusoidal positions;
//! * **GPT-2 recipe**: rung 0 (8-04), pre-norm LayerNorm, GELU MLP of `4·d`, learned positions;
//! * **RMSNorm + SwiGLU (rung 1)**: this topic's [`t0806_modern_blocks::modern`], RMSNorm, a
//!   SwiGLU feed-forward of `≈ 8/3·d` and no biases.
//!
//! Then the same three at a high learning rate without gradient clipping (does it diverge?), and
//! the norm micro-benchmark. Figures: `recipes_val_loss.png`, `recipes_train_loss.png`,
//! `recipes_high_lr.png` (+ the norm benchmark's); metrics `<model>.*` in `results.json`.

use super::norm_bench;
use super::training::{load_tokens, smooth, train, Budget, RunResult, TrainData};
use anyhow::Result;
use candle_core::{DType, Device};
use shared::batching::{eval_batches, LmBatcher};
use shared::cli::CommonArgs;
use shared::kernels::{KernelArgs, Kernels};
use shared::report::{line_chart, print_table, Axes, RunReport, Series};
use shared::train::human_rate;
use t0804_transformer_block::{FfnKind, LmConfig, LmShape, NormPlacement, PositionKind};

/// Model shape and budget of the comparison.
#[derive(clap::Args, Debug)]
pub struct RecipeArgs {
    /// BPE vocabulary (default 1024; --quick: 512 on the tiny corpus; 4096+ for GPU runs).
    #[arg(long)]
    pub vocab: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub d_model: usize,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Attention heads.
    #[arg(long = "heads", default_value_t = 4)]
    pub n_heads: usize,
    #[arg(long, default_value_t = 64)]
    pub ctx: usize,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Training steps per model (default 200; --quick 30).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// The "high" learning rate of the stability runs.
    #[arg(long, default_value_t = 3e-2)]
    pub high_lr: f64,
}

impl RecipeArgs {
    /// The shape of all three models.
    fn shape(&self, vocab_size: usize) -> LmShape {
        LmShape {
            vocab_size,
            max_seq_len: self.ctx,
            d_model: self.d_model,
            n_layers: self.layers,
            n_heads: self.n_heads,
        }
    }
}

/// The three models, in the order of the tables and legends.
pub const MODELS: [&str; 3] = [
    "post-norm (2017)",
    "GPT-2 recipe",
    "RMSNorm + SwiGLU (rung 1)",
];

/// The config of one of [`MODELS`] at `shape`.
pub fn config(which: &str, shape: LmShape) -> LmConfig {
    let rung0 = LmConfig::gpt2(shape);
    match which {
        "post-norm (2017)" => LmConfig {
            placement: NormPlacement::Post,
            ffn: FfnKind::Relu,
            positions: PositionKind::Sinusoidal,
            ..rung0
        },
        "GPT-2 recipe" => rung0,
        _ => t0806_modern_blocks::modern(rung0),
    }
}

/// Everything the runs share: tokens, kernels, dtype.
struct Setup<'a> {
    data: TrainData<'a>,
    shape: LmShape,
    kernels: Kernels,
    dtype: DType,
    seed: u64,
}

/// Trains each of [`MODELS`] from the same seed with `budget`; `suffix` names the runs.
fn train_all(s: &Setup, budget: &Budget, suffix: &str) -> Result<Vec<RunResult>> {
    let parts = t0806_modern_blocks::parts(s.kernels);
    let mut runs = vec![];
    for name in MODELS {
        shared::params::set_seed(s.seed);
        let cfg = config(name, s.shape);
        let dev = &s.data.device;
        let (varmap, lm) = t0804_transformer_block::init_lm(&cfg, &parts, s.dtype, dev)?;
        runs.push(train(
            &format!("{name}{suffix}"),
            &varmap,
            &lm,
            &s.data,
            budget,
        )?);
    }
    Ok(runs)
}

/// `recipes_val_loss.png` and `recipes_train_loss.png` of the same-budget runs.
fn plot_curves(runs: &[RunResult], out: &std::path::Path) -> Result<()> {
    let val: Vec<Series> = runs
        .iter()
        .map(|r| Series::new(&r.name, r.val_curve.clone()))
        .collect();
    line_chart(
        &out.join("recipes_val_loss.png"),
        "Validation loss, same data and budget",
        "step",
        "validation loss (nats/token)",
        &val,
        Axes::default(),
    )?;
    let train: Vec<Series> = runs
        .iter()
        .map(|r| Series::new(&r.name, smooth(&r.train_curve, 10)))
        .collect();
    line_chart(
        &out.join("recipes_train_loss.png"),
        "Training loss (moving average of 10)",
        "step",
        "training loss",
        &train,
        Axes::default(),
    )?;
    Ok(())
}

/// `recipes_high_lr.png`: training loss of the high-learning-rate runs.
fn plot_high_lr(high: &[RunResult], lr: f64, out: &std::path::Path) -> Result<()> {
    let series: Vec<Series> = high
        .iter()
        .map(|r| Series::new(&r.name, smooth(&r.train_curve, 5)))
        .collect();
    line_chart(
        &out.join("recipes_high_lr.png"),
        &format!("Training loss at lr {lr} without clipping"),
        "step",
        "training loss",
        &series,
        Axes::default(),
    )?;
    Ok(())
}

/// The summary table and the `<model>.*` metrics.
fn summarize(runs: &[RunResult], high: &[RunResult], high_lr: f64, report: &mut RunReport) {
    let mut rows = vec![];
    for (r, h) in runs.iter().zip(high) {
        rows.push(vec![
            r.name.clone(),
            format!("{}", r.params),
            format!("{:.3}", r.final_val),
            format!("{:.1}", r.final_val.exp()),
            human_rate(r.tokens_per_s),
            match h.diverged_at {
                Some(s) => format!("diverged at {s}"),
                None => format!("{:.3}", h.final_val),
            },
        ]);
        report.metric(&format!("{}.params", r.name), r.params);
        report.metric(&format!("{}.val_loss", r.name), r.final_val);
        report.metric(&format!("{}.val_ppl", r.name), r.final_val.exp());
        report.metric(&format!("{}.tokens_per_s", r.name), r.tokens_per_s);
        report.metric(&format!("{}.val_curve", r.name), &r.val_curve);
        report.metric(&format!("{}.high_lr_val_loss", r.name), h.final_val);
        report.metric(&format!("{}.high_lr_diverged_at", r.name), h.diverged_at);
    }
    let high_col = format!("val @ lr {high_lr}");
    let header = [
        "model",
        "params",
        "val loss",
        "val ppl",
        "train tok/s",
        &high_col,
    ];
    print_table(&header, &rows);
}

/// The norm micro-benchmark's size in the full experiment: 50 000 rows on the GPU.
fn norm_bench_size(dev: &Device, quick: bool) -> (usize, &'static [usize], usize) {
    let rows = match (dev.is_cuda(), quick) {
        (true, _) => 50_000,
        (false, true) => 1024,
        (false, false) => 4096,
    };
    if quick {
        (rows, &[256, 512], 3)
    } else {
        (rows, &[1024, 2048, 4096], 5)
    }
}

/// The whole experiment: same-budget runs, high-learning-rate runs, norm micro-benchmark.
pub fn run(common: &CommonArgs, kernel_args: &KernelArgs, a: &RecipeArgs) -> Result<()> {
    let quick = common.quick;
    let ctx = common.setup(
        crate::TOPIC,
        "post-norm vs GPT-2 (rung 0) vs + RMSNorm + SwiGLU (rung 1), RMSNorm vs LayerNorm",
    )?;
    ctx.require_one_dtype()?;
    let dev = ctx.picked.device.clone();
    let kernels = kernel_args.resolve(t0806_modern_blocks::fastest_kernels(&dev));
    println!("   kernels: {}", kernels.describe());
    let vocab = a.vocab.unwrap_or(if quick { 512 } else { 1024 });
    let steps = a.steps.unwrap_or(if quick { 30 } else { 200 });
    let config = serde_json::json!({"vocab": vocab, "d_model": a.d_model, "layers": a.layers, "heads": a.n_heads, "ctx": a.ctx, "batch": a.batch, "steps": steps, "lr": a.lr, "high_lr": a.high_lr, "kernels": kernels, "quick": quick});
    let mut report = RunReport::start(
        crate::TOPIC,
        config,
        &ctx.picked.description,
        ctx.dtype_name(),
    );
    let tok = load_tokens(common, vocab)?;
    let n_valid = if quick { 2 } else { 8 };
    let setup = Setup {
        data: TrainData {
            train: &tok.train,
            valid: eval_batches(&tok.valid, a.batch, a.ctx, n_valid, &dev)?,
            batcher: LmBatcher::new(a.batch, a.ctx, common.seed),
            device: dev.clone(),
        },
        shape: a.shape(vocab),
        kernels,
        dtype: ctx.dtype,
        seed: common.seed,
    };
    // 1. Same budget, side by side: clipping at 1, validation every tenth of the run.
    let same = Budget {
        steps,
        lr: a.lr,
        clip: Some(1.0),
        eval_every: (steps / 10).max(1),
    };
    let runs = train_all(&setup, &same, "")?;
    plot_curves(&runs, &ctx.out_dir)?;
    // 2. Stability at a high learning rate, no gradient clipping.
    let high_steps = (steps / 2).max(10);
    let high_budget = Budget {
        steps: high_steps,
        lr: a.high_lr,
        clip: None,
        eval_every: high_steps,
    };
    let high = train_all(&setup, &high_budget, " @ high lr")?;
    plot_high_lr(&high, a.high_lr, &ctx.out_dir)?;
    summarize(&runs, &high, a.high_lr, &mut report);
    // 3. RMSNorm vs LayerNorm, composed vs fused.
    let (rows, widths, reps) = norm_bench_size(&dev, quick);
    norm_bench::measure(
        &dev,
        ctx.dtype,
        rows,
        widths,
        reps,
        &mut report,
        &ctx.out_dir,
    )?;
    let path = report.write(&ctx.out_dir)?;
    println!("   wrote {}", path.display());
    Ok(())
}

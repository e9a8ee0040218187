//! Experiment 8-06: the original post-norm block vs the GPT-2 recipe vs the LLaMA recipe on
//! WikiText-2 BPE tokens, same data and budget; stability at a high learning rate; RMSNorm
//! (composed and fused) vs LayerNorm micro-benchmark. `bench`: training tokens/s of the LLaMA
//! recipe (CS336 shape). `norm-bench`: the norm micro-benchmark alone.
//!
//! `cargo run -p t0806_modern_blocks --release -- [--quick] [--device cpu|cuda] [--norm composed|fused]`
//! `cargo run -p t0806_modern_blocks --release -- --device cuda --dtype bf16 --norm fused bench --batch 32`
//! `cargo run -p t0806_modern_blocks --release -- --device cuda --dtype bf16 norm-bench --rows 50000 --widths 1024,2048,4096`

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use clap::{Parser, Subcommand};
use shared::batching::{eval_batches, LmBatch, LmBatcher};
use shared::cli::CommonArgs;
use shared::params::count_params;
use shared::report::{bar_chart, line_chart, print_table, Axes, RunReport, Series};
use shared::tokenizer::TokenizedWikiText;
use shared::train::{human_rate, AdamWConfig, Diverged, Progress, ScheduleConfig, Trainer};
use shared::wikitext::{Variant, Verify, WikiText2};
use std::time::Instant;
use t0804_transformer_block::{
    build_classic_lm, Activation, BlockConfig, ClassicLmConfig, DecoderOnlyLm, Layer, LayerNorm,
    NormPlacement, PositionKind,
};
use t0806_modern_blocks::*;

const TOPIC: &str = "t0806_modern_blocks";

#[derive(Parser, Debug)]
#[command(
    about = "8-06: post-norm vs GPT-2 vs LLaMA recipes; RMSNorm vs LayerNorm; training throughput bench"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// BPE vocabulary (default 1024; --quick: 512 on the tiny corpus; 4096+ for GPU runs).
    #[arg(long)]
    vocab: Option<usize>,
    #[arg(long, default_value_t = 128)]
    d_model: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 64)]
    ctx: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Training steps per recipe (default 200; --quick 30).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// The "high" learning rate of the stability runs.
    #[arg(long, default_value_t = 3e-2)]
    high_lr: f64,
    /// RMSNorm of the LLaMA recipe: composed tensor ops, or the fused op (CUDA kernel on the GPU).
    #[arg(long, default_value = "composed", value_parser = ["composed", "fused"])]
    norm: String,
    /// RoPE of the LLaMA recipe: composed tensor ops (t0808's `apply_rope`) or the fused op.
    #[arg(long, default_value = "composed", value_parser = ["composed", "fused"])]
    rope: String,
    /// SwiGLU gate of the LLaMA recipe: composed tensor ops or the fused op.
    #[arg(long, default_value = "composed", value_parser = ["composed", "fused"])]
    swiglu: String,
    /// Causal softmax of naive attention: composed tensor ops (t0801) or the fused op.
    #[arg(long, default_value = "composed", value_parser = ["composed", "fused"])]
    softmax: String,
    /// Shorthand for `--norm fused --rope fused --swiglu fused --softmax fused`.
    #[arg(long)]
    fused: bool,
    /// Attention kernel of the LLaMA recipe: naive (t0801/t0807) or flash (t0809's custom op).
    #[arg(long = "attention", default_value = "naive", value_parser = ["naive", "flash"])]
    attention_kernel: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Only the norm micro-benchmark: RMSNorm composed vs fused vs LayerNorm.
    NormBench {
        /// Rows (default: 50 000 on the GPU, 4096 on the CPU).
        #[arg(long)]
        rows: Option<usize>,
        /// Widths, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096")]
        widths: Vec<usize>,
        #[arg(long, default_value_t = 10)]
        reps: usize,
    },
    /// Training tokens/s (forward + backward + AdamW) of the LLaMA recipe.
    Bench {
        #[arg(long, default_value_t = 10_000)]
        vocab: usize,
        #[arg(long, default_value_t = 256)]
        ctx: usize,
        #[arg(long, default_value_t = 512)]
        d_model: usize,
        #[arg(long, default_value_t = 1344)]
        d_ff: usize,
        #[arg(long, default_value_t = 4)]
        layers: usize,
        #[arg(long, default_value_t = 16)]
        heads: usize,
        #[arg(long, default_value_t = 16)]
        kv_heads: usize,
        #[arg(long, default_value_t = 10_000.0)]
        theta: f64,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Attention kernel: naive (matmul-softmax-matmul) or flash (t0809).
        #[arg(long, default_value = "naive")]
        attention: String,
        /// After the timed steps, time each phase of a step (forward, backward, clipping, AdamW)
        /// separately, host enqueue time and device completion apart; the last profiled step is
        /// the region `ncu --profile-from-start off` records.
        #[arg(long)]
        profile: bool,
        /// Time the step as it was before `Trainer::step_deferred`: read the loss before the
        /// backward and the gradient norm before AdamW (two host synchronisations inside the
        /// step), instead of computing the clipping factor on the device.
        #[arg(long)]
        synchronous_step: bool,
    },
}

/// `--norm`, `--rope`, `--swiglu`, `--softmax` (or `--fused` for all four) onto a LLaMA-recipe
/// config.
fn apply_kernel_choices(cfg: &mut ModernLmConfig, a: &Args) {
    cfg.fused_norm = a.fused || a.norm == "fused";
    cfg.fused_rope = a.fused || a.rope == "fused";
    cfg.fused_swiglu = a.fused || a.swiglu == "fused";
    cfg.fused_softmax = a.fused || a.softmax == "fused";
}

fn main() -> Result<()> {
    let args = Args::parse();
    match &args.cmd {
        Some(Cmd::Bench { .. }) => bench(&args),
        Some(Cmd::NormBench { rows, widths, reps }) => {
            let ctx = args.common.setup(
                TOPIC,
                "norm micro-benchmark: RMSNorm composed vs fused vs LayerNorm",
            )?;
            let dev = ctx.picked.device.clone();
            let rows = rows.unwrap_or(if dev.is_cuda() { 50_000 } else { 4096 });
            let mut report = RunReport::start(
                TOPIC,
                serde_json::json!({"norm_bench": {"rows": rows, "widths": widths, "reps": reps}}),
                &ctx.picked.description,
                args.common.dtype.name(),
            );
            let dir = ctx.out_dir.join("norm_bench");
            std::fs::create_dir_all(&dir)?;
            norm_bench(&dev, ctx.dtype, rows, widths, *reps, &mut report, &dir)?;
            report.write(&dir)?;
            println!("   wrote {}", dir.join("results.json").display());
            Ok(())
        }
        None => experiment(&args),
    }
}

/// Loads WikiText-2 (or the tiny corpus with --quick) as BPE ids.
fn load_tokens(common: &CommonArgs, vocab: usize) -> Result<TokenizedWikiText> {
    let data = if common.quick {
        let dir = std::env::temp_dir().join("module08_tiny_wikitext");
        shared::corpus::write_tiny_wikitext(&dir)?;
        WikiText2::load_from_dir(&dir, Variant::Raw, Verify::No)?
    } else {
        WikiText2::load(common.data_dir.as_deref(), Variant::Raw)?
    };
    let t = Instant::now();
    let tok = TokenizedWikiText::prepare(&data, vocab, &shared::cache_dir())?;
    println!(
        "   BPE vocab {vocab}: train {} / valid {} tokens ({:.1}s)",
        tok.train.len(),
        tok.valid.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(tok)
}

struct RunResult {
    name: String,
    params: usize,
    val_curve: Vec<(f64, f64)>,
    train_curve: Vec<(f64, f64)>,
    final_val: f64,
    tokens_per_s: f64,
    diverged_at: Option<usize>,
}

fn evaluate(lm: &DecoderOnlyLm, batches: &[LmBatch]) -> Result<f64> {
    let mut total = 0.0;
    for b in batches {
        total += lm
            .loss(&b.x, &b.y)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()? as f64;
    }
    Ok(total / batches.len() as f64)
}

#[allow(clippy::too_many_arguments)]
fn train(
    name: &str,
    varmap: &VarMap,
    lm: &DecoderOnlyLm,
    train: &[u32],
    valid: &[LmBatch],
    batcher: &LmBatcher,
    steps: usize,
    lr: f64,
    clip: Option<f64>,
    eval_every: usize,
    dev: &Device,
) -> Result<RunResult> {
    let sched = ScheduleConfig {
        max_lr: lr,
        min_lr: lr / 10.0,
        warmup_steps: steps / 10,
        total_steps: steps,
        clip_norm: clip,
    };
    let mut trainer = Trainer::new(varmap, AdamWConfig::default(), sched)?;
    let mut progress = Progress::new(steps as u64, name);
    let (mut val_curve, mut train_curve) = (vec![], vec![]);
    let mut diverged_at = None;
    let mut train_time = 0.0;
    for step in 0..steps {
        let b = batcher.batch(train, step as u64, dev)?;
        let t = Instant::now();
        let stats = match trainer.step(&lm.loss(&b.x, &b.y)?) {
            Ok(s) => s,
            Err(e) if e.downcast_ref::<Diverged>().is_some() => {
                diverged_at = Some(step);
                break;
            }
            Err(e) => return Err(e),
        };
        train_time += t.elapsed().as_secs_f64();
        train_curve.push((step as f64, stats.loss));
        if (step + 1) % eval_every == 0 || step + 1 == steps {
            val_curve.push(((step + 1) as f64, evaluate(lm, valid)?));
        }
        let tps = ((step + 1) * batcher.batch_size * batcher.seq_len) as f64 / train_time;
        progress.update(
            step as u64 + 1,
            format!("loss {:.3} · {} tok/s", stats.loss, human_rate(tps)),
        );
    }
    progress.finish();
    let done = train_curve.len();
    Ok(RunResult {
        name: name.to_string(),
        params: count_params(varmap),
        final_val: val_curve.last().map_or(f64::NAN, |p| p.1),
        val_curve,
        train_curve,
        tokens_per_s: (done * batcher.batch_size * batcher.seq_len) as f64 / train_time.max(1e-9),
        diverged_at,
    })
}

/// The three models compared: post-norm 2017 block, GPT-2 recipe, LLaMA recipe.
fn build(
    which: &str,
    vocab: usize,
    a: &Args,
    dev: &Device,
    dtype: DType,
) -> Result<(VarMap, DecoderOnlyLm)> {
    let d = a.d_model;
    match which {
        "post-norm (2017)" => {
            let cfg = ClassicLmConfig {
                vocab_size: vocab,
                max_seq_len: a.ctx,
                n_layers: a.layers,
                block: BlockConfig {
                    d_model: d,
                    n_heads: a.heads,
                    d_ff: 4 * d,
                    activation: Activation::Relu,
                    placement: NormPlacement::Post,
                    bias: true,
                    eps: 1e-5,
                },
                positions: PositionKind::Sinusoidal,
            };
            let varmap = VarMap::new();
            let lm = build_classic_lm(VarBuilder::from_varmap(&varmap, dtype, dev), &cfg)?;
            Ok((varmap, lm))
        }
        "GPT-2 recipe" => Ok(init_modern_lm(
            &ModernLmConfig::gpt2(vocab, a.ctx, d, a.layers, a.heads),
            dtype,
            dev,
        )?),
        _ => {
            let mut cfg = ModernLmConfig::llama(vocab, a.ctx, d, a.layers, a.heads, a.heads);
            apply_kernel_choices(&mut cfg, a);
            let (varmap, lm) = init_modern_lm(&cfg, dtype, dev)?;
            let lm = if a.attention_kernel == "flash" {
                with_flash_attention(lm)?
            } else {
                lm
            };
            Ok((varmap, lm))
        }
    }
}

fn experiment(a: &Args) -> Result<()> {
    let quick = a.common.quick;
    let ctx = a.common.setup(
        TOPIC,
        "post-norm vs GPT-2 vs LLaMA recipe, RMSNorm vs LayerNorm",
    )?;
    let (dev, dtype) = (ctx.picked.device.clone(), ctx.dtype);
    let vocab = a.vocab.unwrap_or(if quick { 512 } else { 1024 });
    let steps = a.steps.unwrap_or(if quick { 30 } else { 200 });
    let config = serde_json::json!({"vocab": vocab, "d_model": a.d_model, "layers": a.layers, "heads": a.heads, "ctx": a.ctx, "batch": a.batch, "steps": steps, "lr": a.lr, "high_lr": a.high_lr, "norm": a.norm, "attention": a.attention_kernel, "quick": quick});
    let mut report = RunReport::start(
        TOPIC,
        config,
        &ctx.picked.description,
        a.common.dtype.name(),
    );
    let tok = load_tokens(&a.common, vocab)?;
    let batcher = LmBatcher::new(a.batch, a.ctx, a.common.seed);
    let valid = eval_batches(&tok.valid, a.batch, a.ctx, if quick { 2 } else { 8 }, &dev)?;
    let names = ["post-norm (2017)", "GPT-2 recipe", "LLaMA recipe"];

    // 1. Same budget, side by side.
    let mut runs = vec![];
    for name in names {
        shared::params::set_seed(a.common.seed);
        let (varmap, lm) = build(name, vocab, a, &dev, dtype)?;
        runs.push(train(
            name,
            &varmap,
            &lm,
            &tok.train,
            &valid,
            &batcher,
            steps,
            a.lr,
            Some(1.0),
            (steps / 10).max(1),
            &dev,
        )?);
    }
    let val_series: Vec<Series> = runs
        .iter()
        .map(|r| Series::new(&r.name, r.val_curve.clone()))
        .collect();
    line_chart(
        &ctx.out_dir.join("recipes_val_loss.png"),
        "Validation loss, same data and budget",
        "step",
        "validation loss (nats/token)",
        &val_series,
        Axes::default(),
    )?;
    let train_series: Vec<Series> = runs
        .iter()
        .map(|r| Series::new(&r.name, smooth(&r.train_curve, 10)))
        .collect();
    line_chart(
        &ctx.out_dir.join("recipes_train_loss.png"),
        "Training loss (moving average of 10)",
        "step",
        "training loss",
        &train_series,
        Axes::default(),
    )?;

    // 2. Stability at a high learning rate, no gradient clipping.
    let high_steps = (steps / 2).max(10);
    let mut high = vec![];
    for name in names {
        shared::params::set_seed(a.common.seed);
        let (varmap, lm) = build(name, vocab, a, &dev, dtype)?;
        high.push(train(
            &format!("{name} @ high lr"),
            &varmap,
            &lm,
            &tok.train,
            &valid,
            &batcher,
            high_steps,
            a.high_lr,
            None,
            high_steps,
            &dev,
        )?);
    }
    let hs: Vec<Series> = high
        .iter()
        .map(|r| Series::new(&r.name, smooth(&r.train_curve, 5)))
        .collect();
    line_chart(
        &ctx.out_dir.join("recipes_high_lr.png"),
        &format!("Training loss at lr {} without clipping", a.high_lr),
        "step",
        "training loss",
        &hs,
        Axes::default(),
    )?;

    let mut rows = vec![];
    for (r, h) in runs.iter().zip(&high) {
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
    print_table(
        &[
            "model",
            "params",
            "val loss",
            "val ppl",
            "train tok/s",
            &format!("val @ lr {}", a.high_lr),
        ],
        &rows,
    );

    // 3. RMSNorm vs LayerNorm, composed vs fused.
    let rows_n = if dev.is_cuda() {
        50_000
    } else if quick {
        1024
    } else {
        4096
    };
    let widths: &[usize] = if quick {
        &[256, 512]
    } else {
        &[1024, 2048, 4096]
    };
    norm_bench(
        &dev,
        dtype,
        rows_n,
        widths,
        if quick { 3 } else { 5 },
        &mut report,
        &ctx.out_dir,
    )?;
    let path = report.write(&ctx.out_dir)?;
    println!("   wrote {}", path.display());
    Ok(())
}

fn smooth(points: &[(f64, f64)], k: usize) -> Vec<(f64, f64)> {
    (0..points.len())
        .map(|i| {
            let lo = i.saturating_sub(k - 1);
            let w = &points[lo..=i];
            (
                points[i].0,
                w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64,
            )
        })
        .collect()
}

fn sync(t: &Tensor) -> Result<()> {
    t.device().synchronize()?;
    Ok(())
}

/// Median wall time of `reps` calls of `f` (each ends in a device synchronisation), after one
/// warm-up call.
fn median_time(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn time_fwd(norm: &dyn Layer, x: &Tensor, reps: usize) -> Result<f64> {
    median_time(reps, || sync(&norm.forward(x)?))
}

/// Forward + backward of `Σ norm(x)`, gradients for `x` and for the norm's parameters.
fn time_fwd_bwd(norm: &dyn Layer, x: &Var, reps: usize) -> Result<f64> {
    median_time(reps, || {
        let grads = norm.forward(x.as_tensor())?.sum_all()?.backward()?;
        sync(grads.get(x.as_tensor()).expect("x has a gradient"))
    })
}

/// The norm micro-benchmark: `rows × width` activations in `dtype`; RMSNorm composed and fused,
/// LayerNorm (composed); forward, and forward + backward (dx, dg, and LayerNorm's db).
/// Writes `norm_bench.*` metrics, `norm_speedup.png` and `fused_speedup.png`.
fn norm_bench(
    dev: &Device,
    dtype: DType,
    rows: usize,
    widths: &[usize],
    reps: usize,
    report: &mut RunReport,
    out_dir: &std::path::Path,
) -> Result<()> {
    println!("   norm micro-benchmark: {rows} rows × {widths:?}, {dtype:?}, median of {reps}");
    let mut table = vec![];
    let (mut labels, mut ln_vs_rms, mut composed_vs_fused) = (vec![], vec![], vec![]);
    let bytes = dtype.size_in_bytes();
    for &w in widths {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, w), dev)?.to_dtype(dtype)?)?;
        let g = Var::from_tensor(&Tensor::ones(w, dtype, dev)?)?;
        let b = Var::from_tensor(&Tensor::zeros(w, dtype, dev)?)?;
        let rms = RmsNorm::from_weights(g.as_tensor().clone(), 1e-5)?;
        let fused = rms.clone().with_fused(true);
        let ln = LayerNorm::from_weights(g.as_tensor().clone(), b.as_tensor().clone(), 1e-5)?;
        let (rf, rb) = (time_fwd(&rms, &x, reps)?, time_fwd_bwd(&rms, &x, reps)?);
        let (ff, fb) = (time_fwd(&fused, &x, reps)?, time_fwd_bwd(&fused, &x, reps)?);
        let (lf, lb) = (time_fwd(&ln, &x, reps)?, time_fwd_bwd(&ln, &x, reps)?);
        // The fused forward's minimum traffic: read x, write y.
        let fused_gbs = 2.0 * (rows * w * bytes) as f64 / ff / 1e9;
        let ms = |t: f64| format!("{:.3}", t * 1e3);
        table.push(vec![
            format!("{rows} × {w}"),
            ms(rf),
            ms(ff),
            ms(lf),
            ms(rb),
            ms(fb),
            ms(lb),
            format!("{fused_gbs:.1}"),
        ]);
        report.metric(
            &format!("norm_bench.{rows}x{w}"),
            serde_json::json!({"rms_fwd_ms": rf * 1e3, "fused_rms_fwd_ms": ff * 1e3, "ln_fwd_ms": lf * 1e3,
                "rms_fwd_bwd_ms": rb * 1e3, "fused_rms_fwd_bwd_ms": fb * 1e3, "ln_fwd_bwd_ms": lb * 1e3,
                "fused_fwd_gb_per_s": fused_gbs, "dtype": format!("{dtype:?}")}),
        );
        for (what, l, r, c, f) in [("fwd", lf, rf, rf, ff), ("fwd+bwd", lb, rb, rb, fb)] {
            labels.push(format!("{w} {what}"));
            ln_vs_rms.push(l / r);
            composed_vs_fused.push(c / f);
        }
    }
    print_table(
        &[
            "rows × width",
            "RMSNorm fwd ms",
            "fused fwd ms",
            "LayerNorm fwd ms",
            "RMSNorm fwd+bwd ms",
            "fused fwd+bwd ms",
            "LayerNorm fwd+bwd ms",
            "fused fwd GB/s",
        ],
        &table,
    );
    bar_chart(
        &out_dir.join("norm_speedup.png"),
        &format!("LayerNorm time / RMSNorm time (composed, {rows} rows)"),
        "speed-up of RMSNorm (×)",
        &labels,
        &ln_vs_rms,
    )?;
    bar_chart(
        &out_dir.join("fused_speedup.png"),
        &format!("Composed RMSNorm time / fused RMSNorm time ({rows} rows)"),
        "speed-up of the fused op (×)",
        &labels,
        &composed_vs_fused,
    )?;
    Ok(())
}

/// Times the phases of a training step one by one, `steps` times, and prints the medians: the
/// host's time to enqueue each phase (Candle's per-op overhead: building the graph, choosing
/// and launching kernels) and the time until the device has finished it. Where the two are
/// close, the phase is bound by the host, not by the GPU. Returns `(phase, host ms, total ms)`.
fn profile_phases(
    varmap: &VarMap,
    lm: &DecoderOnlyLm,
    batcher: &LmBatcher,
    tokens: &[u32],
    steps: usize,
    dev: &Device,
) -> Result<Vec<(&'static str, f64, f64)>> {
    use shared::train::{clip_grad_norm, AdamW};
    let mut opt = AdamW::new(varmap, AdamWConfig::default())?;
    let names = ["forward", "backward", "clip", "adamw"];
    let mut samples: Vec<[(f64, f64); 4]> = Vec::new();
    shared::device::reset_device_memory_peak(dev)?;
    println!(
        "   profiling {steps} steps phase by phase (a device synchronisation after each phase)"
    );
    for step in 0..steps {
        let b = batcher.batch(tokens, 1000 + step as u64, dev)?;
        dev.synchronize()?;
        if step + 1 == steps {
            shared::device::profiler_range(dev, true)?;
        }
        let mut row = [(0.0, 0.0); 4];
        let t = Instant::now();
        let loss = lm.loss(&b.x, &b.y)?;
        row[0].0 = t.elapsed().as_secs_f64();
        dev.synchronize()?;
        row[0].1 = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut grads = loss.backward()?;
        row[1].0 = t.elapsed().as_secs_f64();
        dev.synchronize()?;
        row[1].1 = t.elapsed().as_secs_f64();
        let t = Instant::now();
        clip_grad_norm(&mut grads, opt.vars(), 1.0)?;
        row[2].0 = t.elapsed().as_secs_f64();
        dev.synchronize()?;
        row[2].1 = t.elapsed().as_secs_f64();
        let t = Instant::now();
        opt.step(&grads, 1e-4)?;
        row[3].0 = t.elapsed().as_secs_f64();
        dev.synchronize()?;
        row[3].1 = t.elapsed().as_secs_f64();
        if step + 1 == steps {
            shared::device::profiler_range(dev, false)?;
        }
        samples.push(row);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e3
    };
    let phases: Vec<(&'static str, f64, f64)> = names
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            (
                n,
                median(samples.iter().map(|r| r[i].0).collect()),
                median(samples.iter().map(|r| r[i].1).collect()),
            )
        })
        .collect();
    let rows: Vec<Vec<String>> = phases
        .iter()
        .map(|(n, h, d)| vec![n.to_string(), format!("{h:.2}"), format!("{d:.2}")])
        .collect();
    print_table(&["phase", "host enqueue ms", "until done ms"], &rows);
    let mut phases = phases;
    if let Some(peak) = shared::device::device_memory_peak(dev)? {
        let gib = peak as f64 / (1u64 << 30) as f64;
        println!("   peak device memory held by tensors over the profiled steps: {gib:.2} GiB");
        phases.push(("memory_gib", gib, gib));
    }
    Ok(phases)
}

/// One training step with the host in the loop, as `Trainer::step` was before the device-side
/// gate: the loss is read (a synchronisation) before the backward, the gradient norm (another)
/// before AdamW, and the clipping factor travels from the host. For `bench --synchronous-step`.
fn synchronous_step_of(trainer: &mut Trainer, loss: &Tensor) -> Result<()> {
    let lr = trainer.lr();
    let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    anyhow::ensure!(value.is_finite(), "loss {value} at step {}", trainer.step);
    let grads = loss.backward()?;
    let norm = shared::train::grad_norm(&grads, trainer.opt.vars())?;
    anyhow::ensure!(
        norm.is_finite(),
        "gradient norm {norm} at step {}",
        trainer.step
    );
    let scale = shared::train::clip_factor(norm, trainer.schedule.clip_norm.unwrap_or(f64::MAX));
    trainer.opt.step_scaled(&grads, lr, scale)?;
    trainer.step += 1;
    Ok(())
}

fn bench(a: &Args) -> Result<()> {
    let Some(Cmd::Bench {
        vocab,
        ctx: seq,
        d_model,
        d_ff,
        layers,
        heads,
        kv_heads,
        theta,
        batch,
        steps,
        warmup,
        ref attention,
        profile,
        synchronous_step,
    }) = a.cmd
    else {
        unreachable!()
    };
    let ctx = a
        .common
        .setup(TOPIC, "bench: LLaMA-recipe training tokens/s")?;
    let (dev, dtype) = (ctx.picked.device.clone(), ctx.dtype);
    let mut cfg = ModernLmConfig::llama(vocab, seq, d_model, layers, heads, kv_heads);
    cfg.d_ff = d_ff;
    cfg.rope_theta = theta;
    apply_kernel_choices(&mut cfg, a);
    let (varmap, lm) = init_modern_lm(&cfg, dtype, &dev)?;
    let lm = match attention.as_str() {
        "naive" => lm,
        "flash" => with_flash_attention(lm)?,
        other => anyhow::bail!("unknown --attention '{other}': use naive or flash"),
    };
    if attention == "flash" && dev.is_cuda() {
        let family = t0809_flash_attention::cuda_kernel_family(dtype, d_model / heads, &[0]);
        println!(
            "   attention: flash, {family:?} kernels (d_head {})",
            d_model / heads
        );
    } else {
        println!("   attention: {attention}");
    }
    let sched = ScheduleConfig {
        max_lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 0,
        total_steps: steps + warmup,
        clip_norm: Some(1.0),
    };
    let mut trainer = Trainer::new(&varmap, AdamWConfig::default(), sched)?;
    let tokens: Vec<u32> = (0..(batch * (seq + 1) * 4))
        .map(|i| ((i * 7919) % vocab) as u32)
        .collect();
    let batcher = LmBatcher::new(batch, seq, a.common.seed);
    println!(
        "   config {cfg:?}, {} parameters, batch {batch}",
        count_params(&varmap)
    );
    let mut elapsed = 0.0;
    let mut progress = Progress::new((steps + warmup) as u64, "bench");
    for step in 0..steps + warmup {
        let b = batcher.batch(&tokens, step as u64, &dev)?;
        // As the twin does: enqueue the whole step (the clipping factor and the finite check
        // are computed on the device), wait for the GPU once at the end, then read the loss.
        let t = Instant::now();
        let loss = lm.loss(&b.x, &b.y)?;
        let pending = if synchronous_step {
            synchronous_step_of(&mut trainer, &loss)?;
            None
        } else {
            Some(trainer.step_deferred(&loss)?)
        };
        dev.synchronize()?;
        if step >= warmup {
            elapsed += t.elapsed().as_secs_f64();
        }
        if let Some(pending) = pending {
            trainer.finish(pending)?;
        }
        progress.update(step as u64 + 1, String::new());
    }
    progress.finish();
    let tps = (steps * batch * seq) as f64 / elapsed;
    print_table(
        &["device", "dtype", "batch", "ctx", "tokens/s", "ms/step"],
        &[vec![
            ctx.picked.description.clone(),
            a.common.dtype.name().into(),
            batch.to_string(),
            seq.to_string(),
            human_rate(tps),
            format!("{:.1}", elapsed / steps as f64 * 1e3),
        ]],
    );
    let mut report = RunReport::start(
        TOPIC,
        serde_json::json!({"bench": cfg, "batch": batch, "steps": steps}),
        &ctx.picked.description,
        a.common.dtype.name(),
    );
    report.metric("bench.tokens_per_s", tps);
    report.metric("bench.ms_per_step", elapsed / steps as f64 * 1e3);
    if profile {
        let phases = profile_phases(&varmap, &lm, &batcher, &tokens, steps, &dev)?;
        for (name, host_ms, device_ms) in &phases {
            if *name == "memory_gib" {
                report.metric("bench.peak_device_memory_gib", *host_ms);
                continue;
            }
            report.metric(&format!("profile.{name}.host_ms"), *host_ms);
            report.metric(&format!("profile.{name}.total_ms"), *device_ms);
        }
    }
    let bench_dir = ctx.out_dir.join("bench");
    report.write(&bench_dir)?;
    println!("   wrote {}", bench_dir.join("results.json").display());
    Ok(())
}

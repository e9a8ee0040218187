//! Loss-parity dump for the PyTorch twin (`scripts/pytorch_twin.py parity DIR`).
//!
//! Builds the LLaMA-recipe LM (the top rung of the ladder) at the CS336 "TinyStories" shape (vocab 10,000, context 256,
//! d_model 512, d_ff 1344, 4 layers, 16 heads, RoPE θ 10,000) on WikiText-2 BPE tokens, writes its
//! *initial* weights, the exact batches of every step, and the loss of every step of our own
//! training run. The twin loads the same weights, replays the same batches with the same AdamW,
//! schedule and clipping, and compares the two loss curves: proof that a speed comparison
//! compares the same computation.
//!
//! `cargo run --release -p t0810_kv_cache --example parity -- --dump DIR [--steps 200]
//!  [--batch 16] [--device cuda] [--data-dir DIR] [--kernels composed|fused] [--attention naive|flash]`
//!
//! How the ops run is the run's kernels (default: every fused op and FlashAttention, on the CPU
//! and on CUDA); the parameters, batches and schedule are the same whatever they are.
//!
//! Then, with the twin's result (`pytorch_twin.py parity DIR --json TWIN.json`):
//! `... --example parity -- --plot TWIN.json --dump DIR` draws both curves and their relative
//! difference into `DIR/loss_parity.png` and `DIR/loss_parity_difference.png`.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use shared::batching::LmBatcher;
use shared::cli::CommonArgs;
use shared::kernels::KernelArgs;
use shared::tokenizer::{load_corpus, Corpus};
use shared::train::{AdamWConfig, ScheduleConfig, Trainer};
use std::collections::HashMap;
use std::path::Path;
use t0804_transformer_block::{init_lm, save_lm, DecoderOnlyLm, LmConfig, LmShape};

#[derive(Parser, Debug)]
#[command(about = "Loss-parity dump for the PyTorch twin (scripts/pytorch_twin.py parity DIR)")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    kernels: KernelArgs,
    /// Folder receiving config.json, init.safetensors, batches.safetensors and parity.json.
    #[arg(long = "dump", default_value = "output/parity")]
    dump: std::path::PathBuf,
    #[arg(long, default_value_t = 200)]
    steps: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, value_enum, default_value = "wikitext2")]
    corpus: Corpus,
    /// Instead of training: plot the twin's parity result (its `--json` file, which carries both
    /// loss curves) into the dump folder.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
}

/// Both loss curves and their step-by-step relative difference, as two PNG charts in `dir`.
fn plot_parity(twin_json: &std::path::Path, dir: &std::path::Path) -> Result<()> {
    use anyhow::Context;
    use shared::report::{line_chart, Axes, Series};
    let text = std::fs::read_to_string(twin_json)
        .with_context(|| format!("reading the twin's parity result {}", twin_json.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let curve = |key: &str| -> Result<Vec<f64>> {
        v[key]
            .as_array()
            .with_context(|| format!("{} has no '{key}' array", twin_json.display()))?
            .iter()
            .map(|x| x.as_f64().context("a loss that is not a number"))
            .collect()
    };
    let (ours, twin) = (curve("rust_losses")?, curve("twin_losses")?);
    anyhow::ensure!(
        !ours.is_empty() && ours.len() == twin.len(),
        "loss curves of {} and {} steps",
        ours.len(),
        twin.len()
    );
    let points = |c: &[f64]| -> Vec<(f64, f64)> {
        c.iter().enumerate().map(|(i, &l)| (i as f64, l)).collect()
    };
    let device = v["device"].as_str().unwrap_or("?");
    std::fs::create_dir_all(dir)?;
    line_chart(
        &dir.join("loss_parity.png"),
        &format!("Same weights, same batches: Candle vs PyTorch ({device}, f32)"),
        "step",
        "training loss",
        &[
            Series::new("ours (Candle)", points(&ours)),
            Series::new("PyTorch twin", points(&twin)),
        ],
        Axes::default(),
    )?;
    let rel: Vec<f64> = ours
        .iter()
        .zip(&twin)
        .map(|(a, b)| 100.0 * (a - b).abs() / a.abs())
        .collect();
    line_chart(
        &dir.join("loss_parity_difference.png"),
        "|ours - twin| / ours per step (target: below 2 %)",
        "step",
        "relative difference (%)",
        &[Series::new("relative difference", points(&rel))],
        Axes::default(),
    )?;
    let max = rel.iter().cloned().fold(0.0, f64::max);
    let mean = rel.iter().sum::<f64>() / rel.len() as f64;
    println!(
        "{} steps: max relative difference {max:.4}%, mean {mean:.4}%; wrote {}",
        rel.len(),
        dir.join("loss_parity.png").display()
    );
    Ok(())
}

/// The CS336 shape with the corpus's vocabulary: context 256, d_model 512, d_ff 1344, 4 layers,
/// 16 heads (MHA), RoPE θ 10 000.
fn cs336_config(vocab_size: usize) -> LmConfig {
    let shape = LmShape {
        vocab_size,
        max_seq_len: 256,
        d_model: 512,
        n_layers: 4,
        n_heads: 16,
    };
    LmConfig {
        d_ff: 1344,
        ..t0808_rope::llama(shape, 16)
    }
}

/// A batch's tokens as the twin reads them: i64 on the CPU.
fn for_twin(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::I64)?.to_device(&Device::Cpu)?)
}

/// Trains `steps` steps, recording every batch (`x.<step>`, `y.<step>`) and every step's loss.
fn train_recording(
    lm: &DecoderOnlyLm,
    trainer: &mut Trainer,
    batcher: &LmBatcher,
    tokens: &[u32],
    steps: usize,
    dev: &Device,
) -> Result<(HashMap<String, Tensor>, Vec<f64>)> {
    let mut batches: HashMap<String, Tensor> = HashMap::new();
    let mut losses = Vec::with_capacity(steps);
    let started = std::time::Instant::now();
    for step in 0..steps {
        let b = batcher.batch(tokens, step as u64, dev)?;
        batches.insert(format!("x.{step}"), for_twin(&b.x)?);
        batches.insert(format!("y.{step}"), for_twin(&b.y)?);
        let stats = trainer.step(&lm.loss(&b.x, &b.y)?)?;
        losses.push(stats.loss);
        if step % 20 == 0 || step + 1 == steps {
            println!(
                "step {step:>4}  loss {:.4}  ({:.1}s)",
                stats.loss,
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok((batches, losses))
}

/// `config.json` and the initial weights `init.safetensors` into `dir`.
fn save_initial(dir: &Path, cfg: &LmConfig, varmap: &candle_nn::VarMap) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    save_lm(dir, cfg, varmap)?;
    std::fs::rename(dir.join("model.safetensors"), dir.join("init.safetensors"))?;
    Ok(())
}

fn main() -> Result<()> {
    shared::cpu::in_pool(run)
}

fn run() -> Result<()> {
    let args = Args::parse();
    if let Some(twin) = &args.plot {
        return plot_parity(twin, &args.dump);
    }
    let ctx = args
        .common
        .setup("t0810_parity", "loss-parity dump for the PyTorch twin")?;
    let dev = &ctx.picked.device;
    let kernels = args
        .kernels
        .resolve(t0809_flash_attention::fastest_kernels(dev));
    println!("   kernels: {}", kernels.describe());
    let data = load_corpus(args.corpus, args.common.data_dir.as_deref(), 10_000)?;
    let cfg = cs336_config(data.tokenizer.vocab_size());
    let (varmap, lm) = init_lm(&cfg, &t0809_flash_attention::parts(kernels), ctx.dtype, dev)?;
    save_initial(&args.dump, &cfg, &varmap)?;
    let batcher = LmBatcher::new(args.batch, cfg.max_seq_len, args.common.seed);
    let adamw = AdamWConfig::default();
    let schedule = ScheduleConfig {
        max_lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 20,
        total_steps: args.steps,
        clip_norm: Some(1.0),
    };
    let mut trainer = Trainer::new(&varmap, adamw, schedule.clone())?;
    let (batches, losses) =
        train_recording(&lm, &mut trainer, &batcher, &data.train, args.steps, dev)?;
    candle_core::safetensors::save(&batches, args.dump.join("batches.safetensors"))?;
    let spec = serde_json::json!({
        "steps": args.steps, "batch": args.batch, "device": ctx.picked.description, "dtype": ctx.dtype_name(),
        "kernels": kernels, "adamw": adamw, "schedule": schedule, "losses": losses,
    });
    std::fs::write(
        args.dump.join("parity.json"),
        serde_json::to_string_pretty(&spec)?,
    )?;
    println!("wrote {}", args.dump.display());
    Ok(())
}

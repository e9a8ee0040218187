//! `train-bench`: training tokens/s (forward + backward + AdamW) of the LLaMA recipe, the top
//! rung of the ladder, at the CS336 "TinyStories" shape (vocab 10 000, context 256, d_model 512,
//! d_ff 1344, 4 layers, 16 heads, RoPE θ 10 000) — the row `scripts/compare_with_twin.sh`
//! compares with the PyTorch twin. How each op runs is the run's kernels (`--kernels`,
//! `--attention naive|flash`, …).
//!
//! A step is enqueued whole, the clipping factor and the finite check computed on the device
//! (`Trainer::step_deferred`), and the host waits for the GPU once at its end, as the twin does;
//! `--synchronous-step` reads the loss and the gradient norm inside the step instead (two host
//! synchronisations) to measure what the deferred step saves. `--profile` then times each phase.
//! Written to `train_bench/results.json` (metrics `bench.*`, `profile.*`).
//!
//! The model's FLOPs per token are counted as in PaLM (Chowdhery et al., 2022, appendix B) and
//! nanoGPT: `6·N + 12·L·d·T` for forward and backward, `N` the parameters that multiply
//! (everything but the token-embedding table, whose lookup is a gather), `L` layers of width `d`,
//! context `T` (the attention scores and their weighted sum, causal masking not discounted). The
//! model FLOP/s over the card's dense bf16 peak (`--peak-tflops`, 989.4 for an H100 or H200 SXM)
//! is the model FLOPs utilisation (MFU). `scripts/shape_bench.sh` runs the bench and the PyTorch
//! twin at another shape, e.g. GPT-2 small (`scripts/gpt2_small_config.json`).

use super::profile::profile_phases;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use shared::batching::LmBatcher;
use shared::cli::CommonArgs;
use shared::data_parallel::Collective;
use shared::kernels::{AttentionImpl, KernelArgs, Kernels};
use shared::params::count_params;
use shared::report::{print_table, RunReport};
use shared::train::{human_rate, AdamW, AdamWConfig, Progress, ScheduleConfig, Trainer};
use std::time::Instant;
use t0804_transformer_block::{DecoderOnlyLm, LmConfig, LmShape};

/// `train-bench` arguments (defaults: the CS336 shape).
#[derive(clap::Args, Debug)]
pub struct TrainBenchArgs {
    #[arg(long, default_value_t = 10_000)]
    pub vocab: usize,
    #[arg(long, default_value_t = 256)]
    pub ctx: usize,
    #[arg(long, default_value_t = 512)]
    pub d_model: usize,
    #[arg(long, default_value_t = 1344)]
    pub d_ff: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 16)]
    pub heads: usize,
    #[arg(long, default_value_t = 16)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 10_000.0)]
    pub theta: f64,
    /// Sequences per step (per rank in a launched group: the global batch is batch × ranks).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Timed steps (--quick: 2).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first (--quick: 1).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// After the timed steps, time each phase of a step (forward, backward, clipping, AdamW)
    /// separately, host enqueue time and device completion apart; the last profiled step is
    /// the region `ncu --profile-from-start off` records.
    #[arg(long)]
    pub profile: bool,
    /// Read the loss before the backward and the gradient norm before AdamW (two host
    /// synchronisations inside the step) instead of computing the clipping factor on the device.
    #[arg(long)]
    pub synchronous_step: bool,
    /// Accumulate gradients as upstream Candle does (into fresh zeros) instead of the patched
    /// backward's storing of the first gradient (third_party/README.md), to measure the patch.
    #[arg(long)]
    pub upstream_grad_accumulation: bool,
    /// Form the gradient of a transposed matmul operand as upstream Candle does (`Xᵀ · dY`, then
    /// a copy into `W`'s layout) instead of the patched rule's `dW = dYᵀ · X` in place
    /// (third_party/README.md), to measure the patch.
    #[arg(long)]
    pub upstream_matmul_grads: bool,
    /// AdamW and the gradient norm with one launch per tensor (three for AdamW) instead of one
    /// launch for all of them, to measure the multi-tensor kernels.
    #[arg(long)]
    pub per_tensor_adamw: bool,
    /// Form the backward pass's gradient sums with Candle's addition instead of
    /// `shared::add::add` (16 bytes per thread), to measure that.
    #[arg(long)]
    pub candle_gradient_sum: bool,
    /// Add the residual connections with Candle's addition instead of
    /// `shared::add::residual_add` (16 bytes per thread), to measure that.
    #[arg(long)]
    pub candle_residual_add: bool,
    /// Add each branch to the residual stream and normalise the sum in two ops instead of one
    /// (`t0806_modern_blocks::add_rms_norm_fused`), to measure that.
    #[arg(long)]
    pub unfused_add_norm: bool,
    /// Hand freed device memory back to the driver at every synchronisation (the driver's
    /// default) instead of keeping it in the pool (`shared::device::keep_freed_memory`), to
    /// measure that.
    #[arg(long)]
    pub release_pool_memory: bool,
    /// In bf16-mixed, cast each f32 weight to bf16 where it is used (and each gradient back)
    /// instead of keeping bf16 copies that AdamW refreshes from the f32 master weights, to
    /// measure that.
    #[arg(long)]
    pub cast_weights: bool,
    /// The card's dense bf16 tensor-core peak in TFLOP/s, the denominator of the MFU (989.4:
    /// an H100 or H200 SXM).
    #[arg(long, default_value_t = 989.4)]
    pub peak_tflops: f64,
}

/// Training FLOPs per token (forward and backward), PaLM's count: `6·N + 12·L·d·T` with `N` the
/// parameters that multiply (all but the token-embedding table).
pub fn flops_per_token(cfg: &LmConfig, n_params: usize) -> f64 {
    let multiplying = n_params - cfg.vocab_size * cfg.d_model;
    6.0 * multiplying as f64 + 12.0 * (cfg.n_layers * cfg.d_model * cfg.max_seq_len) as f64
}

/// The LLaMA recipe of the bench's shape.
fn config(a: &TrainBenchArgs) -> LmConfig {
    let shape = LmShape {
        vocab_size: a.vocab,
        max_seq_len: a.ctx,
        d_model: a.d_model,
        n_layers: a.layers,
        n_heads: a.heads,
    };
    LmConfig {
        d_ff: a.d_ff,
        rope_theta: a.theta,
        ..t0808_rope::llama(shape, a.kv_heads)
    }
}

/// Prints the attention kernel, and on CUDA which FlashAttention kernel family runs.
fn describe_attention(kernels: &Kernels, cfg: &LmConfig, dtype: DType, dev: &Device) {
    if kernels.attention == AttentionImpl::Flash && dev.is_cuda() {
        let hopper = t0809_flash_attention::hopper_kernels_on(dev);
        let family = t0809_flash_attention::cuda_kernel_family(
            dtype,
            cfg.d_head(),
            &[0],
            kernels.flash,
            hopper,
        );
        println!(
            "   attention: flash, {family:?} kernels (d_head {})",
            cfg.d_head()
        );
    } else {
        println!(
            "   attention: {}",
            format!("{:?}", kernels.attention).to_lowercase()
        );
    }
    println!("   kernels: {}", kernels.describe());
}

/// One training step with the host in the loop: the loss is read (a synchronisation) before the
/// backward, the gradient norm (another) before AdamW, and the clipping factor travels from the
/// host.
fn synchronous_step(trainer: &mut Trainer, loss: &Tensor) -> Result<()> {
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

/// The bench's model, data and step budget.
struct Bench<'a> {
    varmap: VarMap,
    /// With master weights: the model's bf16 copies of `varmap`'s f32 parameters.
    compute: Option<VarMap>,
    lm: DecoderOnlyLm,
    batcher: LmBatcher,
    /// A fixed pseudo-random token stream, four batches long.
    tokens: Vec<u32>,
    steps: usize,
    warmup: usize,
    args: &'a TrainBenchArgs,
    /// In a launched group ([`shared::process_group::join_from_env`]): this rank's group. Each
    /// rank trains its own batch and the gradients are averaged (data parallelism).
    group: Option<&'a dyn Collective>,
}

/// Seconds of the `steps` timed steps (after `warmup` untimed ones), each ending when the device
/// has finished it.
fn timed_steps(b: &Bench, dev: &Device) -> Result<f64> {
    let total = b.steps + b.warmup;
    let sched = ScheduleConfig {
        max_lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 0,
        total_steps: total,
        clip_norm: Some(1.0),
    };
    let copies = b.compute.as_ref();
    let mut trainer = Trainer::for_params(&b.varmap, copies, AdamWConfig::default(), sched)?;
    trainer.opt.multi_tensor = !b.args.per_tensor_adamw;
    if let Some(group) = b.group {
        trainer.broadcast_parameters(group, 0)?; // every rank starts from rank 0's weights
    }
    let mut elapsed = 0.0;
    // One progress bar for a group: rank 0's.
    let shown = b.group.is_none_or(|g| g.rank() == 0);
    let mut progress = shown.then(|| Progress::new(total as u64, "bench"));
    for step in 0..total {
        let batch = b.batcher.batch(&b.tokens, step as u64, dev)?;
        let t = Instant::now();
        let loss = b.lm.loss(&batch.x, &batch.y)?;
        let pending = if let Some(group) = b.group {
            trainer.step_data_parallel(&loss, group)?; // waits for the averaged loss
            None
        } else if b.args.synchronous_step {
            synchronous_step(&mut trainer, &loss)?;
            None
        } else {
            Some(trainer.step_deferred(&loss)?)
        };
        dev.synchronize()?;
        if step >= b.warmup {
            elapsed += t.elapsed().as_secs_f64();
        }
        if let Some(pending) = pending {
            trainer.finish(pending)?;
        }
        if let Some(p) = progress.as_mut() {
            p.update(step as u64 + 1, String::new());
        }
    }
    if let Some(p) = progress {
        p.finish();
    }
    Ok(elapsed)
}

/// Adds the per-phase medians of `--profile` to the report.
fn record_profile(b: &Bench, dev: &Device, report: &mut RunReport) -> Result<()> {
    let mut opt = match &b.compute {
        Some(compute) => AdamW::with_master_weights(compute, &b.varmap, AdamWConfig::default())?,
        None => AdamW::new(&b.varmap, AdamWConfig::default())?,
    };
    opt.multi_tensor = !b.args.per_tensor_adamw;
    let phases = profile_phases(opt, &b.lm, &b.batcher, &b.tokens, b.steps, dev)?;
    for p in &phases.phases {
        report.metric(&format!("profile.{}.host_ms", p.name), p.host_ms);
        report.metric(&format!("profile.{}.total_ms", p.name), p.total_ms);
        if let Some((at_start, peak)) = p.memory_gib {
            report.metric(&format!("profile.{}.memory_at_start_gib", p.name), at_start);
            report.metric(&format!("profile.{}.memory_peak_gib", p.name), peak);
        }
    }
    if let Some(gib) = phases.peak_memory_gib {
        report.metric("bench.peak_device_memory_gib", gib);
    }
    Ok(())
}

/// The process-wide A/B switches (each turns one optimisation off, to measure it).
fn set_switches(a: &TrainBenchArgs, dev: &Device) -> Result<()> {
    candle_core::backprop::set_upstream_grad_accumulation(a.upstream_grad_accumulation);
    candle_core::backprop::set_upstream_matmul_grads(a.upstream_matmul_grads);
    if a.release_pool_memory {
        shared::device::keep_freed_memory(dev, false)?;
    }
    if a.candle_gradient_sum {
        candle_core::backprop::set_gradient_sum(None);
    }
    shared::add::set_fast_residual_add(!a.candle_residual_add);
    t0806_modern_blocks::add_norm::set_fused_add_norm(!a.unfused_add_norm);
    Ok(())
}

/// The model and its parameters: `(parameters in dtype, compute copies, model)`. In mixed
/// precision the model computes with bf16 copies of the f32 parameters, which AdamW keeps in step
/// with its f32 master weights (or, with `--cast-weights`, casts every weight where it is used).
fn model(
    cfg: &LmConfig,
    kernels: Kernels,
    dtype: DType,
    compute_dtype: DType,
    a: &TrainBenchArgs,
    dev: &Device,
) -> Result<(VarMap, Option<VarMap>, DecoderOnlyLm)> {
    let parts = t0809_flash_attention::parts(kernels);
    if a.cast_weights {
        let (varmap, lm) = t0804_transformer_block::init_lm(cfg, &parts, dtype, dev)?;
        return Ok((varmap, None, lm.with_compute_dtype(compute_dtype)));
    }
    t0804_transformer_block::init_lm_mixed(cfg, &parts, (dtype, compute_dtype), dev)
}

/// Refuses the options that measure one process (`--profile`, `--synchronous-step`) when this
/// process is a rank of a launched group.
fn check_group_flags(in_group: bool, a: &TrainBenchArgs) -> Result<()> {
    if in_group && (a.profile || a.synchronous_step) {
        anyhow::bail!(
            "train-bench: --profile and --synchronous-step measure one process; run them outside a launched group"
        );
    }
    Ok(())
}

/// The `train-bench` command.
pub fn run(common: &CommonArgs, kernel_args: &KernelArgs, a: &TrainBenchArgs) -> Result<()> {
    let ctx = common.setup_mixed(crate::TOPIC, "train-bench: LLaMA-recipe training tokens/s")?;
    let (dev, dtype) = (ctx.picked.device.clone(), ctx.dtype);
    let kernels = kernel_args.resolve(t0809_flash_attention::fastest_kernels(&dev));
    set_switches(a, &dev)?;
    let cfg = config(a);
    let group = shared::process_group::join_from_env(&dev)?;
    let (rank, world) = group.as_ref().map_or((0, 1), |g| (g.rank(), g.world()));
    check_group_flags(group.is_some(), a)?;
    let (varmap, compute, lm) = model(&cfg, kernels, dtype, ctx.compute_dtype, a, &dev)?;
    describe_attention(&kernels, &cfg, dtype, &dev);
    let (steps, warmup) = if common.quick {
        (2, 1)
    } else {
        (a.steps, a.warmup)
    };
    let tokens = (0..(a.batch * (a.ctx + 1) * 4))
        .map(|i| ((i * 7919) % a.vocab) as u32)
        .collect();
    let bench = Bench {
        varmap,
        compute,
        lm,
        // In a group every rank draws its own windows.
        batcher: LmBatcher::new(a.batch, a.ctx, common.seed + rank as u64),
        tokens,
        steps,
        warmup,
        args: a,
        group: group.as_deref(),
    };
    let n_params = count_params(&bench.varmap);
    println!(
        "   config {cfg:?}, {n_params} parameters, batch {}{}",
        a.batch,
        match world {
            1 => String::new(),
            w => format!(" on each of {w} ranks (rank {rank} here)"),
        }
    );
    let elapsed = timed_steps(&bench, &dev)?;
    if rank != 0 {
        return Ok(()); // rank 0 reports for the group
    }
    // Tokens of every rank: the group's throughput.
    let tps = (steps * a.batch * a.ctx * world) as f64 / elapsed;
    let ms_per_step = elapsed / steps as f64 * 1e3;
    let model_tflops = flops_per_token(&cfg, n_params) * tps / 1e12;
    // The peak is a bf16 tensor-core rate: an MFU only for a bf16 (or bf16-mixed) run on a GPU,
    // one GPU per rank.
    let peak = a.peak_tflops * world as f64;
    let mfu = (dev.is_cuda() && ctx.compute_dtype == DType::BF16).then(|| model_tflops / peak);
    print_table(
        &[
            "device",
            "dtype",
            "ranks",
            "batch",
            "ctx",
            "tokens/s",
            "ms/step",
            "model TFLOP/s",
            "MFU",
        ],
        &[vec![
            ctx.picked.description.clone(),
            ctx.dtype_name().into(),
            world.to_string(),
            a.batch.to_string(),
            a.ctx.to_string(),
            human_rate(tps),
            format!("{ms_per_step:.1}"),
            format!("{model_tflops:.1}"),
            mfu.map_or("–".into(), |m| format!("{:.1} %", 100.0 * m)),
        ]],
    );
    let config = serde_json::json!({"bench": cfg, "batch": a.batch, "steps": steps, "kernels": kernels, "synchronous_step": a.synchronous_step, "upstream_grad_accumulation": a.upstream_grad_accumulation, "upstream_matmul_grads": a.upstream_matmul_grads, "per_tensor_adamw": a.per_tensor_adamw, "candle_gradient_sum": a.candle_gradient_sum, "candle_residual_add": a.candle_residual_add, "unfused_add_norm": a.unfused_add_norm, "release_pool_memory": a.release_pool_memory, "cast_weights": a.cast_weights, "peak_tflops": a.peak_tflops, "params": n_params, "world": world});
    let mut report = RunReport::start(
        crate::TOPIC,
        config,
        &ctx.picked.description,
        ctx.dtype_name(),
    );
    report.metric("bench.tokens_per_s", tps);
    report.metric("bench.ms_per_step", ms_per_step);
    report.metric("bench.flops_per_token", flops_per_token(&cfg, n_params));
    report.metric("bench.model_tflops", model_tflops);
    report.metric("bench.world", world);
    if let Some(mfu) = mfu {
        report.metric("bench.mfu", mfu);
    }
    if a.profile {
        record_profile(&bench, &dev, &mut report)?;
    }
    let dir = ctx.out_dir.join("train_bench");
    report.write(&dir)?;
    println!("   wrote {}", dir.join("results.json").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_refuses_the_single_process_measurements() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: TrainBenchArgs,
        }
        let parse = |args: &[&str]| <Cli as clap::Parser>::parse_from(args).a;
        for flag in ["--profile", "--synchronous-step"] {
            let a = parse(&["train-bench", flag]);
            let err = check_group_flags(true, &a).unwrap_err().to_string();
            assert!(err.contains("outside a launched group"), "{flag}: {err}");
            assert!(check_group_flags(false, &a).is_ok(), "{flag} alone");
        }
        assert!(check_group_flags(true, &parse(&["train-bench"])).is_ok());
    }

    #[test]
    fn flops_per_token_counts_every_matmul_and_attention() -> anyhow::Result<()> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: TrainBenchArgs,
        }
        let a = <Cli as clap::Parser>::parse_from(["train-bench"]).a;
        let cfg = config(&a);
        // The parameters the model really has, from a built model (norm gains included).
        let (varmap, _lm) = t0804_transformer_block::init_lm(
            &cfg,
            &t0809_flash_attention::parts(Kernels::composed()),
            DType::F32,
            &Device::Cpu,
        )?;
        let n = count_params(&varmap);
        // Counted from the matmuls instead: per layer Q, K, V, O (d × d each) and SwiGLU's three
        // (d × d_ff), the LM head (d × vocab); 2 FLOPs per multiply-add forward, 4 backward.
        let (d, ff, l) = (cfg.d_model, cfg.d_ff, cfg.n_layers);
        let matmul_weights = l * (4 * d * d + 3 * d * ff) + d * cfg.vocab_size;
        let attention = 2 * 2 * l * d * cfg.max_seq_len; // QKᵀ and P·V per token, forward
        let by_shapes = 3.0 * (2 * matmul_weights + attention) as f64;
        let counted = flops_per_token(&cfg, n);
        // They differ only by the norm gains (6 FLOPs per gain element): < 0.1 %.
        let rel = (counted - by_shapes).abs() / by_shapes;
        assert!(rel < 1e-3, "{counted} vs {by_shapes} ({rel:.2e})");
        assert!(
            counted > by_shapes,
            "the norm gains count as multiplying parameters"
        );
        Ok(())
    }
}

//! The experiments and commands of 8-10, one module each. [`run`] is the default command: the
//! memory table, the speed comparison, the arithmetic intensity of a decode step and the serving
//! simulation, written to `<out>/t0810_kv_cache/results.json` with their figures.

pub mod decode_bench;
pub mod generate;
pub mod intensity;
pub mod memory;
pub mod profile;
pub mod save_random;
pub mod serving;
pub mod speed;
pub mod train_bench;

use anyhow::Result;
use shared::cli::{CommonArgs, RunContext};
use shared::kernels::{KernelArgs, Kernels};
use shared::report::RunReport;
use t0804_transformer_block::{DecoderOnlyLm, LmConfig, LmShape};

/// Arguments of the default command.
#[derive(clap::Args, Debug)]
pub struct ExperimentArgs {
    /// Longest context of the speed experiment (CPU default 512; use 2048 on a GPU).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Tokens generated per context length in the speed experiment.
    #[arg(long, default_value_t = 16)]
    pub n_gen: usize,
}

/// What the experiments share: the run's context and the speed model — the LLaMA recipe with GQA
/// (8 query heads and 2 K/V heads; 4 and 2 with `--quick`), random weights.
pub struct Env {
    pub ctx: RunContext,
    pub quick: bool,
    pub seed: u64,
    pub dtype_name: &'static str,
    pub max_context: usize,
    /// Tokens generated per context length.
    pub n_gen: usize,
    pub cfg: LmConfig,
    pub lm: DecoderOnlyLm,
}

impl Env {
    /// `d_model / n_heads` of the speed model.
    pub fn d_head(&self) -> usize {
        self.cfg.d_head()
    }
}

/// The speed model's config: context `max_context + n_gen + 1`.
fn speed_model(quick: bool, max_context: usize, n_gen: usize) -> LmConfig {
    let (d_model, n_layers, n_heads, kv_heads, vocab_size) = if quick {
        (128, 2, 4, 2, 1024)
    } else {
        (256, 4, 8, 2, 4096)
    };
    let max_seq_len = max_context + n_gen + 1;
    let shape = LmShape {
        vocab_size,
        max_seq_len,
        d_model,
        n_layers,
        n_heads,
    };
    t0808_rope::llama(shape, kv_heads)
}

/// The default command: sections 1–3 and `results.json`.
pub fn run(common: &CommonArgs, kernel_args: &KernelArgs, a: &ExperimentArgs) -> Result<()> {
    let ctx = common.setup_mixed(
        crate::TOPIC,
        "KV cache memory, cached vs uncached decoding, paged vs contiguous serving",
    )?;
    let quick = common.quick;
    let max_context = a.max_context.unwrap_or(if quick { 128 } else { 512 });
    let n_gen = if quick { 4 } else { a.n_gen.max(2) };
    let cfg = speed_model(quick, max_context, n_gen);
    let kernels = kernel_args.resolve(t0810_kv_cache::decoding_kernels(&ctx.picked.device));
    println!("   kernels: {}", kernels.describe());
    let config = serde_json::json!({ "max_context": max_context, "n_gen": n_gen, "speed_model": cfg, "kernels": kernels, "quick": quick });
    let mut report = RunReport::start(
        crate::TOPIC,
        config,
        &ctx.picked.description,
        ctx.dtype_name(),
    );
    shared::params::set_seed(common.seed);
    let lm = init_speed_model(&cfg, kernels, &ctx)?;
    let dtype_name = ctx.dtype_name();
    let env = Env {
        ctx,
        quick,
        seed: common.seed,
        dtype_name,
        max_context,
        n_gen,
        cfg,
        lm,
    };

    memory::run(&env, &mut report)?;
    let last_decode_ms = speed::run(&env, &mut report)?;
    intensity::run(&env, last_decode_ms, &mut report);
    serving::run(&env, &mut report)?;

    let path = report.write(&env.ctx.out_dir)?;
    println!(
        "\nwrote {} and the figures in {}",
        path.display(),
        env.ctx.out_dir.display()
    );
    Ok(())
}

fn init_speed_model(cfg: &LmConfig, kernels: Kernels, ctx: &RunContext) -> Result<DecoderOnlyLm> {
    let parts = t0809_flash_attention::parts(kernels);
    let (_varmap, lm) =
        t0804_transformer_block::init_lm(cfg, &parts, ctx.dtype, &ctx.picked.device)?;
    Ok(lm.with_compute_dtype(ctx.compute_dtype))
}

/// `1536` → `"1.5 KiB"`, binary units up to GiB.
pub fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.2} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

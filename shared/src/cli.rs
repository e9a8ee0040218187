//! The flags every topic binary shares:
//! `[--device auto|cpu|cuda[:N]] [--dtype f32|bf16|f16] [--seed N] [--quick] [--out output/] [--data-dir DIR]`.

use crate::device::{check_dtype, pick_device, DTypeChoice, DeviceChoice, PickedDevice};
use anyhow::Result;
use candle_core::DType;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Where to run: auto (CUDA if built with it and present, else CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Precision of parameters and activations (bf16/f16 on the GPU only).
    #[arg(long, default_value = "f32")]
    pub dtype: DTypeChoice,
    /// Seed of every random draw (initialisation, batches, sampling).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// A much smaller run, for a smoke test.
    #[arg(long)]
    pub quick: bool,
    /// Output root: results go to `<out>/<topic>/`.
    #[arg(long, default_value = "output")]
    pub out: PathBuf,
    /// Folder holding wiki.{train,valid,test}.{raw,tokens}[.xz] (else $WIKITEXT2_DIR, the cache, or a download).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// What a binary needs after parsing [`CommonArgs`]: the device, the dtype and the output folder.
pub struct RunContext {
    pub picked: PickedDevice,
    /// The parameters' dtype.
    pub dtype: DType,
    /// The activations' dtype (bf16 under `--dtype bf16-mixed`, else `dtype`).
    pub compute_dtype: DType,
    pub out_dir: PathBuf,
}

impl RunContext {
    /// For binaries whose models are built in one dtype: refuses `--dtype bf16-mixed` with a
    /// message naming where mixed precision is available.
    pub fn require_one_dtype(&self) -> Result<()> {
        if self.compute_dtype != self.dtype {
            anyhow::bail!("--dtype bf16-mixed is available in t0805_full_transformer, t0810_kv_cache (train-bench, decode-bench, its experiments) and its ladder example; here use f32, bf16 or f16");
        }
        Ok(())
    }
}

impl CommonArgs {
    /// Picks the device, checks the dtype, seeds the device RNG, creates `<out>/<topic>/`, and
    /// prints what is being run.
    pub fn setup(&self, topic: &str, what: &str) -> Result<RunContext> {
        let picked = pick_device(self.device)?;
        let dtype = check_dtype(&picked.device, self.dtype)?;
        crate::report::set_figure_context(&format!(
            "{}, {}",
            picked.description,
            self.dtype.name()
        ));
        crate::params::set_seed(self.seed);
        if picked.device.is_cuda() {
            picked.device.set_seed(self.seed)?;
        }
        let out_dir = self.out.join(topic);
        std::fs::create_dir_all(&out_dir)?;
        println!("== {topic}: {what}");
        println!(
            "   device {} · dtype {} · seed {}{} · output {}",
            picked.description,
            self.dtype.name(),
            self.seed,
            if self.quick { " · quick" } else { "" },
            out_dir.display()
        );
        Ok(RunContext {
            picked,
            dtype,
            compute_dtype: self.dtype.compute_dtype(),
            out_dir,
        })
    }
}

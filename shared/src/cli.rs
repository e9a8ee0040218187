//! The flags every topic binary shares:
//! `[--device auto|cpu|cuda[:N]] [--dtype auto|f32|bf16|f16|bf16-mixed] [--seed N] [--quick] [--out output/] [--data-dir DIR]`.

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
    /// Precision of parameters and activations: auto (f32 on the CPU; on a GPU bf16-mixed where
    /// the binary trains in mixed precision, else f32), f32, bf16, f16, bf16-mixed (bf16 compute
    /// over f32 parameters and AdamW moments); all but f32 on the GPU only.
    #[arg(long, default_value = "auto")]
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
    /// The precision chosen, `auto` resolved for the device.
    pub dtype_choice: DTypeChoice,
    pub out_dir: PathBuf,
}

impl RunContext {
    /// The precision's name for logs and `results.json` (`f32`, `bf16-mixed`, …).
    pub fn dtype_name(&self) -> &'static str {
        self.dtype_choice.name()
    }

    /// For binaries whose models are built in one dtype: refuses `--dtype bf16-mixed` with a
    /// message naming where mixed precision is available.
    pub fn require_one_dtype(&self) -> Result<()> {
        if self.compute_dtype != self.dtype {
            anyhow::bail!("--dtype bf16-mixed is available in t0805_full_transformer, t0810_kv_cache (train-bench, decode-bench, its experiments) and its ladder example; here use auto, f32, bf16 or f16");
        }
        Ok(())
    }
}

impl CommonArgs {
    /// Picks the device, checks the dtype (`--dtype auto`: f32), seeds the device RNG, creates
    /// `<out>/<topic>/`, and prints what is being run.
    pub fn setup(&self, topic: &str, what: &str) -> Result<RunContext> {
        self.setup_with_gpu_default(topic, what, DTypeChoice::F32)
    }

    /// [`Self::setup`] for binaries that train in mixed precision: `--dtype auto` is bf16-mixed on
    /// a GPU (f32 on the CPU).
    pub fn setup_mixed(&self, topic: &str, what: &str) -> Result<RunContext> {
        self.setup_with_gpu_default(topic, what, DTypeChoice::Bf16Mixed)
    }

    fn setup_with_gpu_default(
        &self,
        topic: &str,
        what: &str,
        gpu_default: DTypeChoice,
    ) -> Result<RunContext> {
        let picked = pick_device(self.device)?;
        let choice = resolve_dtype(self.dtype, picked.device.is_cuda(), gpu_default);
        let dtype = check_dtype(&picked.device, choice)?;
        crate::report::set_figure_context(&format!("{}, {}", picked.description, choice.name()));
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
            choice.name(),
            self.seed,
            if self.quick { " · quick" } else { "" },
            out_dir.display()
        );
        Ok(RunContext {
            picked,
            dtype,
            compute_dtype: choice.compute_dtype(),
            dtype_choice: choice,
            out_dir,
        })
    }
}

/// `--dtype auto` made concrete: f32 on the CPU, `gpu_default` on a GPU; any other choice as given.
pub fn resolve_dtype(choice: DTypeChoice, cuda: bool, gpu_default: DTypeChoice) -> DTypeChoice {
    match choice {
        DTypeChoice::Auto if cuda => gpu_default,
        DTypeChoice::Auto => DTypeChoice::F32,
        chosen => chosen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonArgs,
    }

    fn parse(args: &[&str]) -> CommonArgs {
        let out = std::env::temp_dir().join(format!("module08-cli-{}", std::process::id()));
        let out = out.to_str().unwrap().to_string();
        let mut argv = vec!["bin", "--device", "cpu", "--out", out.as_str()];
        argv.extend_from_slice(args);
        Cli::parse_from(argv).common
    }

    #[test]
    fn auto_resolves_to_f32_on_the_cpu_and_to_the_binarys_default_on_a_gpu() {
        use DTypeChoice::*;
        for gpu_default in [F32, Bf16Mixed] {
            assert_eq!(resolve_dtype(Auto, false, gpu_default), F32);
            assert_eq!(resolve_dtype(Auto, true, gpu_default), gpu_default);
            for chosen in [F32, Bf16, F16, Bf16Mixed] {
                assert_eq!(resolve_dtype(chosen, true, gpu_default), chosen);
                assert_eq!(resolve_dtype(chosen, false, gpu_default), chosen);
            }
        }
    }

    #[test]
    fn auto_dtype_is_f32_on_the_cpu_and_explicit_choices_are_kept_or_refused() -> Result<()> {
        let auto = parse(&[]);
        assert_eq!(auto.dtype, DTypeChoice::Auto);
        for ctx in [auto.setup("t", "w")?, auto.setup_mixed("t", "w")?] {
            assert_eq!((ctx.dtype, ctx.compute_dtype), (DType::F32, DType::F32));
            assert_eq!(ctx.dtype_name(), "f32");
        }
        let f32 = parse(&["--dtype", "f32"]).setup_mixed("t", "w")?;
        assert_eq!(f32.dtype_name(), "f32");
        let err = parse(&["--dtype", "bf16-mixed"])
            .setup("t", "w")
            .err()
            .expect("bf16-mixed on the CPU is refused");
        assert!(
            err.to_string().contains("use --dtype f32 on the CPU"),
            "{err}"
        );
        Ok(())
    }
}

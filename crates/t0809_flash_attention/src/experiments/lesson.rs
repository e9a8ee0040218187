//! The default CPU run as one lesson: the setup the three experiments share, and the
//! `results.json` they each add a metric to.

use super::TOPIC;
use anyhow::Result;
use candle_core::Device;
use shared::cli::CommonArgs;
use shared::report::RunReport;
use std::path::{Path, PathBuf};

/// What the CPU experiments share: the size of the run, the device, the output folder and the
/// report that becomes `<out>/t0809_flash_attention/results.json`.
pub struct Lesson {
    /// `--quick`: a few small shapes instead of the full lesson.
    pub quick: bool,
    /// Always the CPU: the lesson measures host memory with the counting allocator.
    pub dev: Device,
    /// `<out>/t0809_flash_attention/`.
    pub out_dir: PathBuf,
    pub report: RunReport,
}

impl Lesson {
    /// Prints the header, creates the output folder and starts the report (config: quick, seed).
    pub fn start(common: &CommonArgs) -> Result<Self> {
        let ctx = common.setup(
            TOPIC,
            "FlashAttention: exact attention without the n×n matrix",
        )?;
        ctx.require_one_dtype()?;
        if !ctx.picked.device.is_cpu() {
            println!(
                "   note: the default run is the CPU lesson; on the GPU use the `bench` subcommand"
            );
        }
        let report = RunReport::start(
            TOPIC,
            serde_json::json!({"quick": common.quick, "seed": common.seed}),
            &shared::device::pick_device(shared::device::DeviceChoice::Cpu)?.description,
            "f32",
        );
        Ok(Self {
            quick: common.quick,
            dev: Device::Cpu,
            out_dir: ctx.out_dir,
            report,
        })
    }

    /// Writes `results.json` and says where it and `figure` are.
    pub fn finish(self, figure: &Path) -> Result<()> {
        let path = self.report.write(&self.out_dir)?;
        println!("\nwrote {} and {}", path.display(), figure.display());
        println!("GPU benchmark: cargo run --release -p {TOPIC} --features cuda -- bench");
        Ok(())
    }
}

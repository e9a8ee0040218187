//! One measured configuration of the benchmark, as it is stored in `results.json`.

use super::measure::Case;

/// One measured configuration: times in ms (medians), memory in bytes (peaks), `None` where
/// not measured. The naive fields stay `None` when the naive path is skipped or fails, and
/// `naive_status` says which (`ok`, `skipped`, `OOM`, `too big`, `failed`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub seq: usize,
    pub d_head: usize,
    pub causal: bool,
    pub batch: usize,
    pub heads: usize,
    pub fwd_flops: f64,
    pub flash_fwd_ms: f64,
    /// Our forward on the `mma.sync` kernels, measured where the automatic choice is another
    /// family (Hopper's warpgroup MMA): the step the Hopper kernels take.
    #[serde(default)]
    pub mma_sync_fwd_ms: Option<f64>,
    /// The backward op on the `mma.sync` kernels, measured on a Hopper card wherever the Hopper
    /// backward can run (d_head 64 and 128), beside [`Row::hopper_bwd_ms`], whatever the
    /// automatic choice ([`t0809_flash_attention::hopper_backward`]).
    #[serde(default)]
    pub mma_sync_bwd_ms: Option<f64>,
    /// The backward op on the Hopper kernel at any length
    /// ([`shared::kernels::FlashKernels::WarpgroupMma`]), measured where `mma_sync_bwd_ms` is.
    #[serde(default)]
    pub hopper_bwd_ms: Option<f64>,
    pub flash_bwd_ms: Option<f64>,
    pub flash_fwd_bwd_ms: Option<f64>,
    /// Forward op then backward op, called directly (no autograd bookkeeping).
    #[serde(default)]
    pub flash_fwd_bwd_ops_ms: Option<f64>,
    pub flash_fwd_mem_bytes: Option<u64>,
    pub flash_fwd_bwd_mem_bytes: Option<u64>,
    pub naive_fwd_ms: Option<f64>,
    pub naive_fwd_bwd_ms: Option<f64>,
    pub naive_fwd_mem_bytes: Option<u64>,
    pub naive_fwd_bwd_mem_bytes: Option<u64>,
    pub naive_status: String,
    pub max_abs_diff_vs_naive: Option<f64>,
    #[serde(default)]
    pub pytorch_fwd_ms: Option<f64>,
    #[serde(default)]
    pub pytorch_fwd_bwd_ms: Option<f64>,
    /// PyTorch SDPA with the cuDNN backend (`--pytorch-cudnn`).
    #[serde(default)]
    pub cudnn_fwd_ms: Option<f64>,
    #[serde(default)]
    pub cudnn_fwd_bwd_ms: Option<f64>,
}

/// TFLOP/s of `flops` done in `ms` milliseconds.
pub fn tflops(flops: f64, ms: f64) -> f64 {
    flops / (ms * 1e-3) / 1e12
}

impl Row {
    /// A row for `case` with nothing measured yet (`naive_status` = `skipped`).
    pub fn new(case: &Case, fwd_flops: f64) -> Self {
        Self {
            seq: case.n,
            d_head: case.d,
            causal: case.causal,
            batch: case.batch,
            heads: case.heads,
            fwd_flops,
            flash_fwd_ms: 0.0,
            mma_sync_fwd_ms: None,
            mma_sync_bwd_ms: None,
            hopper_bwd_ms: None,
            flash_bwd_ms: None,
            flash_fwd_bwd_ms: None,
            flash_fwd_bwd_ops_ms: None,
            flash_fwd_mem_bytes: None,
            flash_fwd_bwd_mem_bytes: None,
            naive_fwd_ms: None,
            naive_fwd_bwd_ms: None,
            naive_fwd_mem_bytes: None,
            naive_fwd_bwd_mem_bytes: None,
            naive_status: "skipped".into(),
            max_abs_diff_vs_naive: None,
            pytorch_fwd_ms: None,
            pytorch_fwd_bwd_ms: None,
            cudnn_fwd_ms: None,
            cudnn_fwd_bwd_ms: None,
        }
    }

    /// PyTorch SDPA's times for the same (seq, d_head, causal), from the `results` of
    /// `scripts/bench_attention_pytorch.py`'s JSON, if it has them.
    pub fn attach_pytorch(&mut self, pt: &serde_json::Value) {
        if let Some((fwd, fwd_bwd)) = self.find_in(pt) {
            (self.pytorch_fwd_ms, self.pytorch_fwd_bwd_ms) = (fwd, fwd_bwd);
        }
    }

    /// The same from a run of the script with `--backend cudnn`.
    pub fn attach_cudnn(&mut self, pt: &serde_json::Value) {
        if let Some((fwd, fwd_bwd)) = self.find_in(pt) {
            (self.cudnn_fwd_ms, self.cudnn_fwd_bwd_ms) = (fwd, fwd_bwd);
        }
    }

    /// `(fwd_ms, fwd_bwd_ms)` of this row's configuration in a PyTorch results JSON.
    fn find_in(&self, pt: &serde_json::Value) -> Option<(Option<f64>, Option<f64>)> {
        let x = pt["results"].as_array()?.iter().find(|x| {
            x["seq"].as_u64() == Some(self.seq as u64)
                && x["d_head"].as_u64() == Some(self.d_head as u64)
                && x["causal"].as_bool() == Some(self.causal)
        })?;
        Some((x["fwd_ms"].as_f64(), x["fwd_bwd_ms"].as_f64()))
    }
}

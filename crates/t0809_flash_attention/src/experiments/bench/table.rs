//! The benchmark's summary table: ms (TFLOP/s) per path, peak memory, PyTorch ratios.

use super::row::{tflops, Row};
use crate::experiments::common::mib;
use shared::report::print_table;

const HEADER: [&str; 20] = [
    "seq",
    "d",
    "causal",
    "b x h",
    "flash fwd",
    "mma.sync fwd",
    "flash bwd",
    "mma.sync bwd",
    "hopper bwd",
    "flash fwd+bwd",
    "flash f+b autograd",
    "naive fwd",
    "naive f+b autograd",
    "flash MiB",
    "naive MiB",
    "ours/pt fwd",
    "ours/pt f+b",
    "ours/cudnn fwd",
    "ours/cudnn f+b",
    "|flash-naive|",
];

/// Prints the table of `rows`, titled with `what` (dtype and device).
pub fn print_rows(rows: &[Row], what: &str) {
    let table: Vec<Vec<String>> = rows.iter().map(table_row).collect();
    println!(
        "\n-- FlashAttention (ours) vs naive, {what}: ms (TFLOP/s); memory = peak MiB of fwd+bwd"
    );
    println!("   flash fwd / bwd / fwd+bwd: our ops called directly; 'autograd': Σ O∘dO through Candle's backward (adds its bookkeeping)");
    if rows.iter().any(|r| r.mma_sync_fwd_ms.is_some()) {
        println!("   flash fwd on this Hopper card: the warpgroup-MMA kernel, and the backward too at d 64 and 128 from {} keys; 'mma.sync fwd' / 'mma.sync bwd': the same ops on the mma.sync kernels (FlashKernels::MmaSync); 'hopper bwd': the backward on the Hopper kernel at every length (FlashKernels::WarpgroupMma, d 64 and 128)", t0809_flash_attention::HOPPER_BACKWARD_MIN_KEYS);
    }
    print_table(&HEADER, &table);
    if rows.iter().any(|r| r.pytorch_fwd_ms.is_some()) {
        println!("   ours/pt = our throughput / PyTorch SDPA's (FlashAttention-2 backend) on the same card (= PyTorch time / our time)");
    }
    if rows.iter().any(|r| r.cudnn_fwd_ms.is_some()) {
        println!("   ours/cudnn = the same against PyTorch SDPA's cuDNN backend");
    }
}

/// One line of the table, in the order of [`HEADER`]; the naive cells show the status
/// (`OOM`, `skipped`, …) where there is no time.
fn table_row(r: &Row) -> Vec<String> {
    let naive = |ms: Option<f64>, flops: f64| {
        if ms.is_some() {
            ms_tflops(ms, flops)
        } else {
            r.naive_status.clone()
        }
    };
    vec![
        format!("{}", r.seq),
        format!("{}", r.d_head),
        if r.causal { "yes".into() } else { "no".into() },
        format!("{}x{}", r.batch, r.heads),
        ms_tflops(Some(r.flash_fwd_ms), r.fwd_flops),
        ms_tflops(r.mma_sync_fwd_ms, r.fwd_flops),
        ms_tflops(r.flash_bwd_ms, 2.5 * r.fwd_flops),
        ms_tflops(r.mma_sync_bwd_ms, 2.5 * r.fwd_flops),
        ms_tflops(r.hopper_bwd_ms, 2.5 * r.fwd_flops),
        ms_tflops(r.flash_fwd_bwd_ops_ms, 3.5 * r.fwd_flops),
        ms_tflops(r.flash_fwd_bwd_ms, 3.5 * r.fwd_flops),
        naive(r.naive_fwd_ms, r.fwd_flops),
        naive(r.naive_fwd_bwd_ms, 3.5 * r.fwd_flops),
        mib_cell(r.flash_fwd_bwd_mem_bytes.or(r.flash_fwd_mem_bytes)),
        if r.naive_status == "ok" {
            mib_cell(r.naive_fwd_bwd_mem_bytes.or(r.naive_fwd_mem_bytes))
        } else {
            format!("{} ({})", r.naive_status, mib_cell(r.naive_fwd_mem_bytes))
        },
        ratio(r.pytorch_fwd_ms, Some(r.flash_fwd_ms)),
        ratio(
            r.pytorch_fwd_bwd_ms,
            r.flash_fwd_bwd_ops_ms.or(r.flash_fwd_bwd_ms),
        ),
        ratio(r.cudnn_fwd_ms, Some(r.flash_fwd_ms)),
        ratio(
            r.cudnn_fwd_bwd_ms,
            r.flash_fwd_bwd_ops_ms.or(r.flash_fwd_bwd_ms),
        ),
        r.max_abs_diff_vs_naive
            .map_or("-".into(), |e| format!("{e:.1e}")),
    ]
}

/// `"1.234 (56.7)"`: milliseconds and the TFLOP/s of `flops` in that time; `-` if unmeasured.
fn ms_tflops(ms: Option<f64>, flops: f64) -> String {
    ms.map_or("-".to_string(), |ms| {
        format!("{ms:.3} ({:.1})", tflops(flops, ms))
    })
}

/// Whole MiB, or `-` if unmeasured.
fn mib_cell(bytes: Option<u64>) -> String {
    bytes.map_or("-".to_string(), |b| format!("{:.0}", mib(b)))
}

/// PyTorch's time over ours (= our throughput over PyTorch's), or `-`.
fn ratio(theirs: Option<f64>, ours: Option<f64>) -> String {
    match (theirs, ours) {
        (Some(t), Some(o)) => format!("{:.2}", t / o),
        _ => "-".into(),
    }
}

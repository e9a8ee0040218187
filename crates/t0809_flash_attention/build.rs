//! Compiles `kernels/flash_attn.cu` to PTX with `nvcc`, only when the `cuda` feature is on: a
//! CPU-only build needs no CUDA toolkit. The PTX is embedded by `src/cuda.rs` with
//! `include_str!(concat!(env!("OUT_DIR"), "/flash_attn.ptx"))`.
//!
//! Target: `compute_90` PTX (Hopper, H100/H200), JIT-compiled by the driver at module load.
//! Override with `FLASH_ATTN_ARCH` (e.g. `compute_80` for an A100).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/flash_attn.cu");
    println!("cargo:rerun-if-env-changed=FLASH_ATTN_ARCH");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let ptx = out_dir.join("flash_attn.ptx");
    let arch = std::env::var("FLASH_ATTN_ARCH").unwrap_or_else(|_| "compute_90".to_string());
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "-lineinfo", "--use_fast_math"])
        .arg(format!("-arch={arch}"))
        .arg("kernels/flash_attn.cu")
        .arg("-o")
        .arg(&ptx)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "running {} (needed by the `cuda` feature): {e}",
                nvcc.display()
            )
        });
    assert!(
        status.success(),
        "nvcc failed on kernels/flash_attn.cu ({status})"
    );
}

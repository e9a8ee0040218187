//! Compiles `kernels/rmsnorm.cu` to PTX with `nvcc`, only when the `cuda` feature is on: a
//! CPU-only build needs no CUDA toolkit. `src/cuda.rs` embeds the PTX with
//! `include_str!(concat!(env!("OUT_DIR"), "/rmsnorm.ptx"))`.
//!
//! Target: `compute_90` PTX (Hopper, H100/H200), JIT-compiled by the driver when the module is
//! loaded. Override with `RMSNORM_ARCH` (e.g. `compute_80` for an A100).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/rmsnorm.cu");
    println!("cargo:rerun-if-env-changed=RMSNORM_ARCH");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let ptx = out_dir.join("rmsnorm.ptx");
    let arch = std::env::var("RMSNORM_ARCH").unwrap_or_else(|_| "compute_90".to_string());
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // No --use_fast_math: IEEE sqrt and division keep the kernel within an ulp of the composed ops.
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
        .arg(format!("-arch={arch}"))
        .arg("kernels/rmsnorm.cu")
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
        "nvcc failed on kernels/rmsnorm.cu ({status})"
    );
}

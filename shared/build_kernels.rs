// The one build step of every crate that ships a CUDA kernel (shared, t0806, t0809): each
// crate's `build.rs` is `include!("…/shared/build_kernels.rs")` plus a `main` that lists its
// kernels. Only with the `cuda` feature is anything compiled: a CPU-only build needs no CUDA
// toolkit.
//
// `kernels/NAME.cu` becomes `$OUT_DIR/NAME.ptx`, which the crate embeds with
// `include_str!(concat!(env!("OUT_DIR"), "/NAME.ptx"))`. Target: `compute_90` PTX (Hopper,
// H100/H200), JIT-compiled by the driver when the module is loaded; `MODULE08_CUDA_ARCH`
// overrides it (e.g. `compute_80` for an A100). Kernels written for Hopper only (`wgmma`) are
// compiled for `compute_90a` by `compile_hopper_kernel`, and left out (an empty module) when
// `MODULE08_CUDA_ARCH` names another card. `nvcc` is `$CUDA_HOME/bin/nvcc`, else the one on the
// PATH.

/// The `-arch` of `compile_kernel`: `MODULE08_CUDA_ARCH`, else `compute_90`.
fn kernel_arch() -> String {
    std::env::var("MODULE08_CUDA_ARCH").unwrap_or_else(|_| "compute_90".to_string())
}

/// Compiles `kernels/<name>.cu` to `$OUT_DIR/<name>.ptx` with `nvcc --ptx -O3` and `extra` flags.
fn compile_kernel(name: &str, extra: &[&str]) {
    compile_kernel_for(name, extra, &kernel_arch());
}

/// [`compile_kernel`] for a file of Hopper-only kernels: `compute_90a` (the `a` features:
/// `wgmma`) when the build targets sm_90 (`MODULE08_CUDA_ARCH` unset, `compute_90…` or
/// `sm_90…`), else a module without kernels.
#[allow(dead_code)]
fn compile_hopper_kernel(name: &str, extra: &[&str]) {
    let arch = kernel_arch();
    if arch.starts_with("compute_90") || arch.starts_with("sm_90") {
        compile_kernel_for(name, extra, "compute_90a");
    } else if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let empty = ".version 8.0\n.target sm_80\n.address_size 64\n";
        std::fs::write(out_dir.join(format!("{name}.ptx")), empty).expect("write the empty module");
    }
}

fn compile_kernel_for(name: &str, extra: &[&str], arch: &str) {
    use std::path::PathBuf;
    use std::process::Command;
    let source = format!("kernels/{name}.cu");
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=MODULE08_CUDA_ARCH");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let ptx = out_dir.join(format!("{name}.ptx"));
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // shared/kernels (common.cuh): the first folder above the crate that holds it.
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let common = manifest
        .ancestors()
        .map(|dir| dir.join("shared").join("kernels"))
        .find(|dir| dir.join("common.cuh").exists())
        .expect("shared/kernels/common.cuh above the crate");
    println!("cargo:rerun-if-changed={}", common.join("common.cuh").display());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
        .arg("-I")
        .arg(&common)
        .args(extra)
        .arg(format!("-arch={arch}"))
        .arg(&source)
        .arg("-o")
        .arg(&ptx)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "running {} (needed by the `cuda` feature): {e}",
                nvcc.display()
            )
        });
    assert!(status.success(), "nvcc failed on {source} ({status})");
}

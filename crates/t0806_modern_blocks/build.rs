//! Compiles `kernels/rmsnorm.cu` and `kernels/swiglu.cu` to PTX (only with the `cuda` feature;
//! see `shared/build_kernels.rs`). `src/cuda.rs` and `src/swiglu_fused.rs` embed them.
include!("../../shared/build_kernels.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // No --use_fast_math: IEEE sqrt and division keep the kernel within an ulp of the composed ops.
    compile_kernel("rmsnorm", &[]);
    compile_kernel("swiglu", &[]);
}

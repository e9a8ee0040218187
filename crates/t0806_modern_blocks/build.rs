//! Compiles `kernels/rmsnorm.cu`, `kernels/swiglu.cu`, `kernels/gelu.cu` and `kernels/softmax.cu` to PTX (only with the `cuda` feature;
//! see `shared/build_kernels.rs`). `src/cuda.rs`, `src/swiglu_fused.rs`, `src/gelu_fused.rs` and `src/softmax_fused.rs` embed them.
include!("../../shared/build_kernels.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // No --use_fast_math: IEEE sqrt and division keep the kernel within an ulp of the composed ops.
    compile_kernel("rmsnorm", &[]);
    compile_kernel("swiglu", &[]);
    compile_kernel("gelu", &[]);
    compile_kernel("softmax", &[]);
}

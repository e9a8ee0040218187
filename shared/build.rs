//! Compiles `kernels/embedding.cu` (the embedding gather and its scatter-add gradient) and
//! `kernels/cross_entropy.cu` (the fused loss) to PTX, only with the `cuda` feature (see
//! `build_kernels.rs`). `src/embedding.rs` and `src/cross_entropy.rs` embed them.
include!("build_kernels.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build_kernels.rs");
    compile_kernel("embedding", &[]);
    compile_kernel("cross_entropy", &[]);
}

//! Compiles `kernels/embedding.cu` (the embedding gather and its scatter-add gradient) and
//! `kernels/cross_entropy.cu` (the fused loss) and `kernels/adamw.cu` (the in-place optimiser
//! step) and `kernels/heads.cu` (the head split and merge) and `kernels/add.cu` (the gradient
//! sums of the backward pass) to PTX, only with the `cuda` feature (see `build_kernels.rs`); the modules of the same
//! names embed them.
include!("build_kernels.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build_kernels.rs");
    compile_kernel("embedding", &[]);
    compile_kernel("cross_entropy", &[]);
    compile_kernel("adamw", &[]);
    compile_kernel("heads", &[]);
    compile_kernel("add", &[]);
}

//! Compiles `kernels/embedding.cu` (the embedding gather and its scatter-add gradient) to PTX,
//! only with the `cuda` feature (see `build_kernels.rs`). `src/embedding.rs` embeds it.
include!("build_kernels.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build_kernels.rs");
    compile_kernel("embedding", &[]);
}

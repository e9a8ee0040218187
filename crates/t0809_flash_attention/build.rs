//! Compiles `kernels/flash_attn.cu` to PTX (only with the `cuda` feature; see
//! `shared/build_kernels.rs`). `src/cuda.rs` embeds it.
include!("../../shared/build_kernels.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    compile_kernel("flash_attn", &["--use_fast_math"]);
}

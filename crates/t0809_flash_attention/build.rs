//! Compiles `kernels/flash_attn.cu` (every card) and `kernels/flash_attn_hopper.cu` (Hopper,
//! `compute_90a`) to PTX, only with the `cuda` feature; see `shared/build_kernels.rs`.
//! `src/cuda.rs` embeds both.
include!("../../shared/build_kernels.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    compile_kernel("flash_attn", &["--use_fast_math"]);
    compile_hopper_kernel("flash_attn_hopper", &["--use_fast_math"]);
}

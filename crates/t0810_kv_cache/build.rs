//! Compiles `kernels/argmax.cu` to PTX (only with the `cuda` feature; see
//! `shared/build_kernels.rs`). `src/argmax.rs` embeds it.
include!("../../shared/build_kernels.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    compile_kernel("argmax", &[]);
}

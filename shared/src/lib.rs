//! # `shared`: the mechanics every topic of Module 08 stands on
//!
//! The topic crates (`t0801_self_attention` … `t0810_kv_cache`) teach *ideas*; this crate holds
//! the plumbing they all need, written once:
//!
//! | module | what it gives a topic |
//! |---|---|
//! | [`params`] | raw parameters (`(d_out, d_in)` weights, CS336 truncated-normal init), the one [`params::linear`] helper `x·Wᵀ`, parameter counts, safetensors save/load |
//! | [`bias`] | a bias added to every row, its gradient one GEMV (`1ᵀ·G`) instead of a strided column reduction |
//! | [`embedding`] | the token-embedding lookup (a row gather) and its scatter-add gradient, one fused op on the GPU |
//! | [`device`] | `--device auto\|cpu\|cuda[:N]` and `--dtype f32\|bf16\|f16` |
//! | [`cli`] | the command-line flags every topic binary shares |
//! | [`compare`] | the largest absolute difference between two tensors, what the tests compare with |
//! | [`wikitext`] | WikiText-2 found, verified (sha256), decompressed, or downloaded |
//! | [`tokenizer`] | byte-level BPE trained on WikiText-2 (cached), and the word-level v1 vocabulary |
//! | [`corpus`] | a small deterministic corpus the project writes itself, for tests on a fresh clone |
//! | [`cross_entropy`] | the loss over a vocabulary as one op (one pass forward, one backward; CUDA kernel on the GPU) |
//! | [`batching`] | language-model windows and padded sequence-to-sequence batches |
//! | [`adamw`] | AdamW's update as three in-place passes per tensor (CUDA kernels on the GPU) |
//! | [`cpu`] | the arithmetic of the custom ops' CPU loops: a vectorisable `exp`, rows spread over the cores |
//! | [`custom_op`] | the contiguous-slice helpers every custom op's CPU side uses |
//! | [`train`] | AdamW, cosine schedule, gradient clipping, NaN guard, evaluation, checkpoints |
//! | [`report`] | PNG charts (lines, heatmaps, bars) and the `results.json` of every run |

pub mod adamw;
pub mod add;
pub mod batching;
pub mod bias;
pub mod checkpoint;
pub mod cli;
pub mod compare;
pub mod corpus;
pub mod cpu;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod custom_op;
pub mod data_parallel;
pub mod device;
pub mod embedding;
pub mod fit;
pub mod heads;
pub mod kernels;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod params;
pub mod process_group;
pub mod report;
pub mod rng;
pub mod tokenizer;
pub mod train;
pub mod wikitext;

pub use embedding::{embedding, embedding_with};
pub use heads::{merge_heads, merge_heads_with, split_heads, split_heads_with};
pub use kernels::Kernels;
pub use params::{linear, linear_with_bias};

/// The workspace root (the folder holding the top-level `Cargo.toml`), resolved at compile time.
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("shared/ lives inside the workspace")
        .to_path_buf()
}

/// The project's cache folder: `$MODULE08_CACHE`, else `<workspace>/datasets/cache`.
pub fn cache_dir() -> std::path::PathBuf {
    match std::env::var_os("MODULE08_CACHE") {
        Some(dir) => dir.into(),
        None => workspace_root().join("datasets").join("cache"),
    }
}

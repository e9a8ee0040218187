//! The experiments of 8-06, one module each, and the training loop they share.

pub mod norm_bench;
pub mod recipes;
pub mod training;

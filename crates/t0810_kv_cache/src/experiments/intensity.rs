//! The arithmetic intensity of one decode step: FLOPs per byte read (weights and cache, bf16),
//! `2·params + 4·layers·d_model·context` FLOPs per sequence against `2·params + cache` bytes, for
//! batch 1, 16 and 256, compared with the H100's ridge point (990 TFLOP/s ÷ 3.35 TB/s ≈ 295
//! FLOP/byte). Then the bandwidth and FLOP rate our own decode step reached at the longest context.

use super::{human_bytes, Env};
use shared::report::{print_table, RunReport};
use t0810_kv_cache::kv_cache_bytes;

/// The H100's ridge point: bf16 dense FLOP/s over HBM bytes/s.
const H100_RIDGE: f64 = 990e12 / 3.35e12;

/// A model of the table: non-embedding parameters and cache shape at one context.
struct StepModel {
    name: &'static str,
    params: usize,
    layers: usize,
    kv_heads: usize,
    d_head: usize,
    d_model: usize,
    context: usize,
}

impl StepModel {
    /// `(FLOPs, bytes read)` of one decode step for `batch` sequences.
    fn step(&self, batch: usize) -> (f64, f64) {
        let attn = 4.0 * self.layers as f64 * self.d_model as f64 * self.context as f64;
        let flops = batch as f64 * (2.0 * self.params as f64 + attn);
        let cache = kv_cache_bytes(
            batch,
            self.layers,
            self.kv_heads,
            self.context,
            self.d_head,
            2,
        );
        (flops, 2.0 * self.params as f64 + cache as f64)
    }
}

/// Parameters outside the token embedding and the output head.
fn non_embedding_params(env: &Env) -> usize {
    env.cfg.n_params() - 2 * env.cfg.vocab_size * env.cfg.d_model
}

fn models(env: &Env) -> [StepModel; 3] {
    let c = &env.cfg;
    let llama = |name, params: f64, kv_heads, context| StepModel {
        name,
        params: params as usize,
        layers: 32,
        kv_heads,
        d_head: 128,
        d_model: 4096,
        context,
    };
    [
        StepModel {
            name: "speed model",
            params: non_embedding_params(env),
            layers: c.n_layers,
            kv_heads: c.n_kv_heads,
            d_head: env.d_head(),
            d_model: c.d_model,
            context: 2048,
        },
        llama("LLaMA-2-7B", 6.5e9, 32, 4096),
        llama("LLaMA-3-8B", 7.0e9, 8, 8192),
    ]
}

/// The table, metrics `arithmetic_intensity` and `h100_ridge_flop_per_byte`.
fn table(env: &Env, report: &mut RunReport) {
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for m in models(env) {
        for batch in [1usize, 16, 256] {
            let (flops, bytes) = m.step(batch);
            let i = flops / bytes;
            let bound = if i < H100_RIDGE { "memory" } else { "compute" };
            rows.push(vec![
                m.name.to_string(),
                batch.to_string(),
                m.context.to_string(),
                format!("{flops:.2e}"),
                human_bytes(bytes as usize),
                format!("{i:.1}"),
                bound.to_string(),
            ]);
            json.push(serde_json::json!({ "model": m.name, "batch": batch, "context": m.context, "flops": flops, "bytes": bytes, "flop_per_byte": i }));
        }
    }
    println!("   arithmetic intensity of a decode step (bf16 weights + cache read once) vs H100 ridge {H100_RIDGE:.0} FLOP/byte:");
    print_table(
        &[
            "model",
            "batch",
            "context",
            "FLOPs",
            "bytes read",
            "FLOP/byte",
            "bound",
        ],
        &rows,
    );
    report.metric("arithmetic_intensity", &json);
    report.metric("h100_ridge_flop_per_byte", H100_RIDGE);
}

/// Effective bandwidth and FLOP rate of our decode step at `max_context` (`last_ms` per step):
/// every weight (the head included) and the whole cache read once.
fn our_step(env: &Env, last_ms: f64, report: &mut RunReport) {
    let c = &env.cfg;
    let weights = non_embedding_params(env) + c.vocab_size * c.d_model;
    let dtype_bytes = env.ctx.dtype.size_in_bytes();
    let cache = kv_cache_bytes(
        1,
        c.n_layers,
        c.n_kv_heads,
        env.max_context,
        env.d_head(),
        dtype_bytes,
    );
    let bytes_step = (weights * dtype_bytes + cache) as f64;
    let flops_step = 2.0 * weights as f64 + 4.0 * (c.n_layers * c.d_model * env.max_context) as f64;
    let (gb_s, gflop_s) = (bytes_step / last_ms / 1e6, flops_step / last_ms / 1e6);
    println!("   our decode step at context {}: {} read, {flops_step:.2e} FLOP in {last_ms:.2} ms → {gb_s:.1} GB/s, {gflop_s:.2} GFLOP/s", env.max_context, human_bytes(bytes_step as usize));
    report.metric("decode_step_bandwidth_gb_s", gb_s);
    report.metric("decode_step_gflop_s", gflop_s);
}

/// The intensity table and our own step's rates.
pub fn run(env: &Env, last_decode_ms: f64, report: &mut RunReport) {
    table(env, report);
    our_step(env, last_decode_ms, report);
}

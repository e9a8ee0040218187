//! Section 1: KV-cache memory. The formula
//! `bytes = 2 (K and V) × batch × n_layers × n_kv_heads × seq × d_head × bytes/element` for a few
//! model shapes (`memory_table`), the caches of the speed model measured after a prefill
//! (`memory_measured`), and `kv_memory.png`: one sequence's cache against the context.

use super::{human_bytes, Env};
use anyhow::Result;
use candle_core::{DType, Tensor};
use shared::report::{line_chart, print_table, Axes, RunReport, Series};
use t0805_full_transformer::Preset;
use t0810_kv_cache::{kv_cache_bytes, lm_cache, CacheKind};

/// A model shape of the memory table.
struct Shape {
    name: &'static str,
    layers: usize,
    n_kv_heads: usize,
    d_head: usize,
    bytes: usize,
    context: usize,
}

impl Shape {
    /// Cache bytes of `batch` sequences of `seq` tokens.
    fn bytes(&self, batch: usize, seq: usize) -> usize {
        kv_cache_bytes(
            batch,
            self.layers,
            self.n_kv_heads,
            seq,
            self.d_head,
            self.bytes,
        )
    }
}

/// t0805's decoders, the speed model of this run and three LLaMA models.
fn shapes(env: &Env) -> Result<Vec<Shape>> {
    let decoder = |name, p: Preset| Shape {
        name,
        layers: p.n_layers,
        n_kv_heads: p.n_heads,
        d_head: p.d_model / p.n_heads,
        bytes: 4,
        context: p.tgt_len,
    };
    let llama = |name, layers, n_kv_heads, context| Shape {
        name,
        layers,
        n_kv_heads,
        d_head: 128,
        bytes: 2,
        context,
    };
    Ok(vec![
        decoder("t0805 cpu preset (decoder)", Preset::by_name("cpu")?),
        decoder("t0805 full preset (decoder)", Preset::by_name("full")?),
        Shape {
            name: "speed model (this run, GQA)",
            layers: env.cfg.n_layers,
            n_kv_heads: env.cfg.n_kv_heads,
            d_head: env.d_head(),
            bytes: env.ctx.dtype.size_in_bytes(),
            context: env.max_context,
        },
        llama("LLaMA-2-7B (MHA, fp16)", 32, 32, 4096),
        llama("LLaMA-3-8B (GQA 8, bf16)", 32, 8, 8192),
        llama("LLaMA-2-70B (GQA 8, fp16)", 80, 8, 4096),
    ])
}

/// The formula's table: per token, one full-context sequence, a batch of 32.
fn formula_table(shapes: &[Shape], report: &mut RunReport) {
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for s in shapes {
        let (per_token, full_ctx, batch32) =
            (s.bytes(1, 1), s.bytes(1, s.context), s.bytes(32, s.context));
        rows.push(vec![
            s.name.to_string(),
            format!("{}×{}×{}", s.layers, s.n_kv_heads, s.d_head),
            human_bytes(per_token),
            s.context.to_string(),
            human_bytes(full_ctx),
            human_bytes(batch32),
        ]);
        json.push(serde_json::json!({ "model": s.name, "layers": s.layers, "n_kv_heads": s.n_kv_heads, "d_head": s.d_head, "bytes_per_element": s.bytes, "bytes_per_token": per_token, "context": s.context, "bytes_one_sequence": full_ctx, "bytes_batch32": batch32 }));
    }
    print_table(
        &[
            "model",
            "layers×kv×d_head",
            "per token",
            "context",
            "1 sequence",
            "batch 32",
        ],
        &rows,
    );
    report.metric("memory_table", &json);
}

/// Fills a cache of `kind` for `batch` sequences of `max_context` tokens and compares what it
/// holds with the formula. On the GPU the device allocator's own count is read too: memory in use
/// before the cache exists and after it is filled, with the prefill's activations and logits
/// already freed. A first prefill of the same shape (into a throw-away cache) comes before the
/// "before" reading, so one-time allocations (library workspaces) are not counted.
fn measure_cache(env: &Env, batch: usize, kind: CacheKind) -> Result<serde_json::Value> {
    let (lm, dev, dtype, seq) = (
        &env.lm,
        &env.ctx.picked.device,
        env.ctx.dtype,
        env.max_context,
    );
    let toks = Tensor::zeros((batch, seq), DType::U32, dev)?;
    if dev.is_cuda() {
        let mut warm = lm_cache(lm, batch, seq, kind, dtype)?;
        drop(lm.forward_cached(&toks, &mut warm)?);
    }
    let device_before = shared::device::device_memory_in_use(dev)?;
    let mut cache = lm_cache(lm, batch, seq, kind, dtype)?;
    let before = cache.allocated_bytes();
    drop(lm.forward_cached(&toks, &mut cache)?);
    drop(toks);
    let device_held = shared::device::device_memory_in_use(dev)?
        .zip(device_before)
        .map(|(after, before)| after.saturating_sub(before));
    let after = cache.allocated_bytes();
    let formula = kv_cache_bytes(
        batch,
        env.cfg.n_layers,
        env.cfg.n_kv_heads,
        seq,
        env.d_head(),
        dtype.size_in_bytes(),
    );
    let device_note = device_held
        .map(|b| format!("; device allocator: {} held", human_bytes(b as usize)))
        .unwrap_or_default();
    println!("   measured {kind:?} cache, batch {batch}, {seq} tokens: {} before, {} after filling; formula {}{device_note}", human_bytes(before), human_bytes(after), human_bytes(formula));
    Ok(
        serde_json::json!({ "kind": kind, "batch": batch, "seq": seq, "bytes_before": before, "bytes_after": after, "formula": formula, "device_bytes_held": device_held }),
    )
}

/// `kv_memory.png`: one sequence's cache (GiB) against the context, for the LLaMA shapes.
fn plot(shapes: &[Shape], out_dir: &std::path::Path) -> Result<()> {
    let contexts: Vec<usize> = (8..=17).map(|e| 1usize << e).collect();
    let gib = (1u64 << 30) as f64;
    let series: Vec<Series> = shapes
        .iter()
        .filter(|s| s.name.starts_with("LLaMA"))
        .map(|s| {
            let points = contexts
                .iter()
                .map(|&c| (c as f64, s.bytes(1, c) as f64 / gib))
                .collect();
            Series::new(s.name, points)
        })
        .collect();
    line_chart(
        &out_dir.join("kv_memory.png"),
        "KV cache of one sequence vs context",
        "context (tokens)",
        "GiB",
        &series,
        Axes {
            log_x: true,
            log_y: true,
        },
    )?;
    Ok(())
}

/// Section 1.
pub fn run(env: &Env, report: &mut RunReport) -> Result<()> {
    println!("\n[1/3] KV-cache memory = 2 × batch × layers × n_kv_heads × seq × d_head × bytes");
    let shapes = shapes(env)?;
    formula_table(&shapes, report);
    let mut measured = Vec::new();
    for batch in [1usize, 4] {
        for kind in [CacheKind::Preallocated, CacheKind::Concat] {
            measured.push(measure_cache(env, batch, kind)?);
        }
    }
    report.metric("memory_measured", &measured);
    plot(&shapes, &env.ctx.out_dir)
}

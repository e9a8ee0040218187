//! `decode-bench`: batched greedy decoding with the KV cache, the next tokens chosen on the
//! device (argmax, no host round trip per step). A prefill of `prompt` tokens, then `new − 1`
//! decode steps of one token; the second of two repetitions is timed (the first warms up kernel
//! loading and the allocator). With `--graphs` the steps run through the static cache
//! ([`t0810_kv_cache::GreedyDecoder`]), captured into a CUDA graph on CUDA (during the first
//! repetition) and replayed. Both pack each layer's `W_q, W_k, W_v` into one matrix (one GEMM).
//! Written to `decode_bench_b<batch>_<dtype>[_graphs]/results.json`.

use anyhow::Result;
use candle_core::{DType, Tensor};
use shared::cli::CommonArgs;
use shared::kernels::AttentionImpl;
use shared::kernels::KernelArgs;
use shared::report::{print_table, RunReport};
use t0804_transformer_block::{DecoderOnlyLm, LmConfig, LmShape};
use t0810_kv_cache::{greedy_next, lm_cache, CacheKind, GraphNodes, GreedyDecoder};

/// `decode-bench` arguments (defaults: the CS336 shape).
#[derive(clap::Args, Debug)]
pub struct DecodeBenchArgs {
    #[arg(long, default_value_t = 10_000)]
    pub vocab: usize,
    #[arg(long, default_value_t = 512)]
    pub d_model: usize,
    #[arg(long, default_value_t = 1344)]
    pub d_ff: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 16)]
    pub heads: usize,
    #[arg(long, default_value_t = 16)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 128)]
    pub prompt: usize,
    #[arg(long, default_value_t = 512)]
    pub new: usize,
    /// Decode with the static cache (position on the device), the step captured into a CUDA
    /// graph and replayed on CUDA (attention defaults to naive with the fused softmax, which
    /// reads the static cache's last key on the device; FlashAttention cannot).
    #[arg(long)]
    pub graphs: bool,
    /// After the timing, a prefill and three steps inside the region that
    /// `ncu --profile-from-start off` records (per-kernel GPU times of a step).
    #[arg(long)]
    pub profile: bool,
}

/// The LLaMA recipe of the bench's shape, context `prompt + new`.
fn config(a: &DecodeBenchArgs) -> LmConfig {
    let shape = LmShape {
        vocab_size: a.vocab,
        max_seq_len: a.prompt + a.new,
        d_model: a.d_model,
        n_layers: a.layers,
        n_heads: a.heads,
    };
    LmConfig {
        d_ff: a.d_ff,
        ..t0808_rope::llama(shape, a.kv_heads)
    }
}

/// `(prefill seconds, decode seconds)` of one repetition with a fresh preallocated cache.
fn time_once(lm: &DecoderOnlyLm, prompt: &Tensor, new: usize, dtype: DType) -> Result<(f64, f64)> {
    let (batch, n) = prompt.dims2()?;
    let dev = prompt.device();
    let mut cache = lm_cache(lm, batch, n + new, CacheKind::Preallocated, dtype)?;
    dev.synchronize()?;
    let t0 = std::time::Instant::now();
    let mut next = greedy_next(&lm.forward_cached(prompt, &mut cache)?)?;
    dev.synchronize()?;
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    for _ in 0..new - 1 {
        next = greedy_next(&lm.forward_cached(&next, &mut cache)?)?;
    }
    dev.synchronize()?;
    Ok((prefill, t1.elapsed().as_secs_f64()))
}

/// `(prefill seconds, decode seconds)` of one repetition of the static-cache decoder; on CUDA
/// the first call captures its step (after one real step), later calls replay it.
fn time_static(dec: &mut GreedyDecoder, prompt: &Tensor, new: usize) -> Result<(f64, f64)> {
    let dev = prompt.device();
    dev.synchronize()?;
    let t0 = std::time::Instant::now();
    dec.prefill(prompt)?;
    dev.synchronize()?;
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut steps = new - 1;
    if dev.is_cuda() && !dec.is_captured() {
        dec.capture()?; // one real step, then the recording
        steps -= 1;
    }
    for _ in 0..steps {
        dec.step()?;
    }
    dev.synchronize()?;
    Ok((prefill, t1.elapsed().as_secs_f64()))
}

/// The static-cache decoder: a warm-up repetition (which captures the step on CUDA), the timed
/// one, and with `--profile` three more steps for ncu. `(prefill s, decode s, graph nodes)`.
fn measure_captured(
    lm: &DecoderOnlyLm,
    prompt: &Tensor,
    a: &DecodeBenchArgs,
    dtype: DType,
) -> Result<(f64, f64, Option<GraphNodes>)> {
    let mut dec = GreedyDecoder::new(lm, a.batch, a.prompt + a.new, dtype)?;
    time_static(&mut dec, prompt, a.new)?; // warm-up (and the capture)
    let nodes = dec.graph_nodes()?;
    if let Some(n) = nodes {
        println!("   the captured step: {n:?}");
    }
    let (prefill, decode) = time_static(&mut dec, prompt, a.new)?;
    if a.profile {
        dec.prefill(prompt)?;
        profiled_steps(prompt.device(), || dec.step())?;
    }
    Ok((prefill, decode, nodes))
}

/// The eager loop with the preallocated cache: a warm-up repetition, the timed one, and with
/// `--profile` three more steps for ncu. `(prefill s, decode s)`.
fn measure_eager(
    lm: &DecoderOnlyLm,
    prompt: &Tensor,
    a: &DecodeBenchArgs,
    dtype: DType,
) -> Result<(f64, f64)> {
    time_once(lm, prompt, a.new, dtype)?; // warm-up
    let timed = time_once(lm, prompt, a.new, dtype)?;
    if a.profile {
        let mut cache = lm_cache(lm, a.batch, a.prompt + 4, CacheKind::Preallocated, dtype)?;
        let mut next = greedy_next(&lm.forward_cached(prompt, &mut cache)?)?;
        profiled_steps(prompt.device(), || {
            next = greedy_next(&lm.forward_cached(&next, &mut cache)?)?;
            Ok(())
        })?;
    }
    Ok(timed)
}

/// Three decode steps inside the region `ncu --profile-from-start off` records.
fn profiled_steps(
    dev: &candle_core::Device,
    mut step: impl FnMut() -> candle_core::Result<()>,
) -> Result<()> {
    shared::device::profiler_range(dev, true)?;
    for _ in 0..3 {
        step()?;
    }
    shared::device::profiler_range(dev, false)
}

/// The `decode-bench` command.
pub fn run(common: &CommonArgs, kernel_args: &KernelArgs, a: &DecodeBenchArgs) -> Result<()> {
    let ctx = common.setup(
        crate::TOPIC,
        "decode-bench: batched greedy decoding with the KV cache",
    )?;
    if a.new < 3 {
        anyhow::bail!("decode-bench: --new must be at least 3 (a capture takes one real step)");
    }
    let dev = ctx.picked.device.clone();
    let default = t0810_kv_cache::decoding_kernels(&dev);
    let kernels = if a.graphs {
        t0810_kv_cache::prepare_for_graphs(&dev)?; // before any tensor of the model exists
        kernel_args.resolve(default.with_attention(AttentionImpl::Naive))
    } else {
        kernel_args.resolve(default)
    };
    println!("   ops: {}", kernels.describe());
    let cfg = config(a);
    let parts = t0809_flash_attention::parts(kernels);
    let (_varmap, lm) = t0804_transformer_block::init_lm(&cfg, &parts, ctx.dtype, &dev)?;
    // One GEMM for q, k and v per layer (a detached copy of the weights, as inference engines pack them).
    let lm = lm.with_compute_dtype(ctx.compute_dtype).with_packed_qkv()?;
    let ids: Vec<u32> = (0..a.batch * a.prompt)
        .map(|i| ((i * 7919 + 13) % a.vocab) as u32)
        .collect();
    let prompt = Tensor::from_vec(ids, (a.batch, a.prompt), &dev)?;
    let (prefill, decode, nodes) = if a.graphs {
        measure_captured(&lm, &prompt, a, ctx.compute_dtype)?
    } else {
        let (prefill, decode) = measure_eager(&lm, &prompt, a, ctx.compute_dtype)?;
        (prefill, decode, None)
    };
    let step_kind = match (a.graphs, dev.is_cuda()) {
        (false, _) => "eager",
        (true, false) => "static cache, eager",
        (true, true) => "static cache, CUDA graph",
    };
    let steps = (a.new - 1) as f64;
    let tps = a.batch as f64 * steps / decode;
    print_table(
        &[
            "device",
            "step",
            "dtype",
            "batch",
            "prompt",
            "new",
            "prefill ms",
            "ms/step",
            "tokens/s",
        ],
        &[vec![
            ctx.picked.description.clone(),
            step_kind.into(),
            ctx.dtype_name().into(),
            a.batch.to_string(),
            a.prompt.to_string(),
            a.new.to_string(),
            format!("{:.1}", prefill * 1e3),
            format!("{:.2}", decode / steps * 1e3),
            format!("{tps:.0}"),
        ]],
    );
    let config = serde_json::json!({"decode_bench": cfg, "batch": a.batch, "prompt": a.prompt, "new": a.new, "kernels": kernels, "graphs": a.graphs, "step": step_kind, "graph_nodes": nodes});
    let mut report = RunReport::start(
        crate::TOPIC,
        config,
        &ctx.picked.description,
        ctx.dtype_name(),
    );
    report.metric("prefill_ms", prefill * 1e3);
    report.metric("ms_per_token_step", decode / steps * 1e3);
    report.metric("tokens_per_s", tps);
    report.write(&ctx.out_dir.join(format!(
        "decode_bench_b{}_{}{}",
        a.batch,
        ctx.dtype_name(),
        if a.graphs { "_graphs" } else { "" }
    )))?;
    Ok(())
}

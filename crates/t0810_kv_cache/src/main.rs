//! 8-10 experiment: KV-cache memory, decoding speed with and without the cache, and a paged vs
//! contiguous serving simulation; plus the `generate` command.
//!
//! ```text
//! cargo run --release -p t0810_kv_cache                       # the experiments (CPU: ~1-2 min)
//! cargo run --release -p t0810_kv_cache -- --max-context 2048 --device cuda
//! cargo run --release -p t0810_kv_cache -- generate --checkpoint DIR --prompt "The game"
//! cargo run --release -p t0810_kv_cache -- save-random --checkpoint DIR --tokenizer FILE
//! ```

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::{Parser, Subcommand};
use shared::cli::CommonArgs;
use shared::report::{bar_chart, line_chart, print_table, Axes, RunReport, Series};
use shared::tokenizer::{load_corpus, Bpe, Corpus, BOS};
use std::io::Write;
use std::path::{Path, PathBuf};
use t0805_full_transformer::{Preset, Transformer};
use t0806_modern_blocks::{init_modern_lm, load_modern_lm, save_modern_lm, ModernLmConfig};
use t0810_kv_cache::sim::{prefix_sharing_blocks, simulate, workload, Policy};
use t0810_kv_cache::*;

const TOPIC: &str = "t0810_kv_cache";

#[derive(Parser, Debug)]
#[command(
    about = "8-10: the KV cache — memory, decoding speed, paged vs contiguous serving; and a generator"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Longest context of the speed experiment (CPU default 512; use 2048 on a GPU).
    #[arg(long)]
    max_context: Option<usize>,
    /// Tokens generated per context length in the speed experiment.
    #[arg(long, default_value_t = 16)]
    n_gen: usize,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Streams a continuation of a prompt from a checkpoint folder and reports tokens/s.
    Generate {
        /// A t0806 folder (config.json + model.safetensors) or t0805's checkpoints/transformer.
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_new: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f64>,
        /// Recompute the whole prefix at every step (for comparison).
        #[arg(long)]
        no_cache: bool,
        /// BPE tokenizer file; default: <checkpoint>/tokenizer.json, else the cached BPE of --corpus
        /// with the checkpoint's vocabulary size.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "wikitext2")]
        corpus: Corpus,
    },
    /// Writes a random-init LLaMA-recipe checkpoint (t0806's format) with its tokenizer, to try
    /// `generate` without training.
    SaveRandom {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long, default_value_t = 128)]
        d_model: usize,
        #[arg(long, default_value_t = 2)]
        layers: usize,
        #[arg(long, default_value_t = 4)]
        heads: usize,
        #[arg(long, default_value_t = 2)]
        kv_heads: usize,
        #[arg(long, default_value_t = 512)]
        max_seq: usize,
    },
    /// Decode throughput of a random-init LLaMA-recipe model with our KV cache: greedy, batched,
    /// the next tokens chosen on the device (no host round trip per step). Defaults: the CS336
    /// shape of the GPU-performance comparison (scripts/pytorch_twin.py decode-bench).
    DecodeBench {
        #[arg(long, default_value_t = 10_000)]
        vocab: usize,
        #[arg(long, default_value_t = 512)]
        d_model: usize,
        #[arg(long, default_value_t = 1344)]
        d_ff: usize,
        #[arg(long, default_value_t = 4)]
        layers: usize,
        #[arg(long, default_value_t = 16)]
        heads: usize,
        #[arg(long, default_value_t = 16)]
        kv_heads: usize,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        #[arg(long, default_value_t = 512)]
        new: usize,
        /// 8-06's fused ops (RMSNorm, RoPE, SwiGLU gate, causal softmax), as `t0806 --fused`.
        #[arg(long)]
        fused: bool,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    match &args.cmd {
        Some(Cmd::Generate { .. }) => generate(&args),
        Some(Cmd::SaveRandom {
            checkpoint,
            tokenizer,
            d_model,
            layers,
            heads,
            kv_heads,
            max_seq,
        }) => {
            let bpe = Bpe::load(tokenizer)?;
            let cfg = ModernLmConfig::llama(
                bpe.vocab_size(),
                *max_seq,
                *d_model,
                *layers,
                *heads,
                *kv_heads,
            );
            shared::params::set_seed(args.common.seed);
            let (varmap, _) = init_modern_lm(&cfg, DType::F32, &Device::Cpu)?;
            save_modern_lm(checkpoint, &cfg, &varmap)?;
            std::fs::copy(tokenizer, checkpoint.join("tokenizer.json"))?;
            println!("wrote a random {cfg:?} to {}", checkpoint.display());
            Ok(())
        }
        Some(Cmd::DecodeBench { .. }) => decode_bench(&args),
        None => experiments(&args),
    }
}

fn decode_bench(args: &Args) -> Result<()> {
    let Some(Cmd::DecodeBench {
        vocab,
        d_model,
        d_ff,
        layers,
        heads,
        kv_heads,
        batch,
        prompt,
        new,
        fused,
    }) = args.cmd
    else {
        unreachable!()
    };
    let ctx = args.common.setup(
        TOPIC,
        "decode-bench: batched greedy decoding with the KV cache",
    )?;
    let dev = ctx.picked.device.clone();
    let cfg = ModernLmConfig {
        d_ff,
        ..ModernLmConfig::llama(vocab, prompt + new, d_model, layers, heads, kv_heads)
    }
    .with_fused_ops(fused);
    println!(
        "   ops: {}",
        if fused {
            "fused (RMSNorm, RoPE, SwiGLU gate, causal softmax)"
        } else {
            "composed"
        }
    );
    let (_varmap, lm) = init_modern_lm(&cfg, ctx.dtype, &dev)?;
    let ids: Vec<u32> = (0..batch * prompt)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect();
    let prompt_t = Tensor::from_vec(ids, (batch, prompt), &dev)?;
    let mut best: Option<(f64, f64)> = None;
    for _rep in 0..2 {
        // The first repetition warms up (kernel loading, allocator); the second is timed.
        let mut cache = lm_cache(&lm, batch, prompt + new, CacheKind::Preallocated, ctx.dtype)?;
        dev.synchronize()?;
        let t0 = std::time::Instant::now();
        let logits = lm_forward_cached(&lm, &prompt_t, &mut cache)?;
        let mut next = logits
            .narrow(1, prompt - 1, 1)?
            .argmax_keepdim(candle_core::D::Minus1)?
            .squeeze(2)?; // (batch, 1)
        dev.synchronize()?;
        let prefill = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        for _ in 0..new - 1 {
            let logits = lm_forward_cached(&lm, &next, &mut cache)?;
            next = logits.argmax_keepdim(candle_core::D::Minus1)?.squeeze(2)?;
        }
        dev.synchronize()?;
        best = Some((prefill, t1.elapsed().as_secs_f64()));
    }
    let (prefill, decode) = best.expect("two repetitions");
    let steps = (new - 1) as f64;
    let tps = batch as f64 * steps / decode;
    print_table(
        &[
            "device",
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
            args.common.dtype.name().into(),
            batch.to_string(),
            prompt.to_string(),
            new.to_string(),
            format!("{:.1}", prefill * 1e3),
            format!("{:.2}", decode / steps * 1e3),
            format!("{tps:.0}"),
        ]],
    );
    let mut report = RunReport::start(
        TOPIC,
        serde_json::json!({"decode_bench": cfg, "batch": batch, "prompt": prompt, "new": new, "fused": fused}),
        &ctx.picked.description,
        args.common.dtype.name(),
    );
    report.metric("prefill_ms", prefill * 1e3);
    report.metric("ms_per_token_step", decode / steps * 1e3);
    report.metric("tokens_per_s", tps);
    let dir = ctx.out_dir.join(format!(
        "decode_bench_b{batch}_{}",
        args.common.dtype.name()
    ));
    report.write(&dir)?;
    Ok(())
}

// ---------------------------------------------------------------- generate

/// The model a checkpoint folder holds.
enum Loaded {
    Modern(t0804_transformer_block::DecoderOnlyLm),
    Seq2Seq(Transformer),
}

fn tokenizer_for(
    dir: &Path,
    explicit: &Option<PathBuf>,
    corpus: Corpus,
    data_dir: Option<&Path>,
    vocab: usize,
) -> Result<Bpe> {
    if let Some(p) = explicit {
        return Bpe::load(p).with_context(|| format!("loading tokenizer {}", p.display()));
    }
    let inside = dir.join("tokenizer.json");
    if inside.exists() {
        return Bpe::load(&inside);
    }
    println!("   tokenizer: the cached BPE of {corpus:?} with vocab {vocab}");
    Ok(load_corpus(corpus, data_dir, vocab)?.tokenizer)
}

fn generate(args: &Args) -> Result<()> {
    let Some(Cmd::Generate {
        checkpoint,
        prompt,
        max_new,
        temperature,
        top_k,
        top_p,
        no_cache,
        tokenizer,
        corpus,
    }) = &args.cmd
    else {
        unreachable!()
    };
    let ctx = args.common.setup(TOPIC, "generate")?;
    let dev = &ctx.picked.device;
    let (model, bpe) = if checkpoint.join("config.json").exists() {
        let (cfg, lm) = load_modern_lm(checkpoint, ctx.dtype, dev)?;
        println!(
            "   model: {:?} recipe, d_model {}, {} layers, {} heads / {} K/V heads, context {}",
            cfg.recipe, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.max_seq_len
        );
        (
            Loaded::Modern(lm),
            tokenizer_for(
                checkpoint,
                tokenizer,
                *corpus,
                args.common.data_dir.as_deref(),
                cfg.vocab_size,
            )?,
        )
    } else if checkpoint.join("state.json").exists() {
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(checkpoint.join("state.json"))?)?;
        let name = state["config"]["preset"]["name"]
            .as_str()
            .context("state.json has no config.preset.name: not a t0805 checkpoint")?;
        let p = Preset::by_name(name)?;
        let bpe = tokenizer_for(
            checkpoint,
            tokenizer,
            *corpus,
            args.common.data_dir.as_deref(),
            p.vocab,
        )?;
        let weights = checkpoint.join("model.safetensors");
        // Safety: read-only memory map of a file nobody modifies while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], ctx.dtype, dev)? };
        let model = Transformer::new(vb, p.transformer(bpe.vocab_size()))?;
        println!(
            "   model: t0805 encoder-decoder, preset '{name}' (source ≤ {}, target ≤ {} tokens)",
            p.src_len, p.tgt_len
        );
        (Loaded::Seq2Seq(model), bpe)
    } else {
        bail!(
            "{} holds neither config.json (t0806) nor state.json (t0805)",
            checkpoint.display()
        );
    };
    let ids = bpe.encode(prompt)?;
    let cfg = SamplingConfig {
        temperature: *temperature,
        top_k: *top_k,
        top_p: *top_p,
    };
    let mut sampler = Sampler::new(cfg, args.common.seed)?;
    println!(
        "   prompt: {} tokens · sampling {cfg:?} · seed {} · cache {}",
        ids.len(),
        args.common.seed,
        if *no_cache { "off" } else { "on" }
    );
    print!("\n{prompt}");
    std::io::stdout().flush()?;
    // Stream: decode everything generated so far and print the new suffix (a byte-level BPE
    // token may be half of a UTF-8 character).
    let mut out: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let mut on_token = |t: u32| {
        out.push(t);
        if let Ok(text) = bpe.decode(&out) {
            if text.len() > printed.len()
                && text.starts_with(printed.as_str())
                && !text.ends_with('\u{FFFD}')
            {
                print!("{}", &text[printed.len()..]);
                let _ = std::io::stdout().flush();
                printed = text;
            }
        }
    };
    let stats = match &model {
        Loaded::Modern(lm) if *no_cache => {
            generate_lm_no_cache(lm, &ids, *max_new, &mut sampler, &mut on_token)?
        }
        Loaded::Modern(lm) => {
            let mut cache = lm_cache(lm, 1, lm.max_seq_len, CacheKind::Preallocated, ctx.dtype)?;
            generate_lm(lm, &ids, *max_new, &mut sampler, &mut cache, &mut on_token)?
        }
        Loaded::Seq2Seq(m) => {
            let src = &ids[ids.len().saturating_sub(m.cfg.max_len)..]; // the model's source window
            generate_seq2seq(
                m,
                src,
                bpe.special(BOS)?,
                *max_new,
                &mut sampler,
                CacheKind::Preallocated,
                &mut on_token,
            )?
        }
    };
    println!("\n");
    println!(
        "   {} tokens: prefill {:.1} ms (prompt {} tokens), decode {:.1} tokens/s ({:.2} ms/token) on {}",
        stats.tokens.len(),
        1e3 * stats.prefill_s,
        stats.prompt_len,
        stats.decode_tokens_per_s(),
        1e3 * stats.decode_s / (stats.tokens.len().saturating_sub(1).max(1)) as f64,
        ctx.picked.description
    );
    Ok(())
}

// ---------------------------------------------------------------- experiments

/// A model shape for the memory table.
struct Shape {
    name: &'static str,
    layers: usize,
    n_kv_heads: usize,
    d_head: usize,
    bytes: usize,
    context: usize,
}

fn experiments(args: &Args) -> Result<()> {
    let ctx = args.common.setup(
        TOPIC,
        "KV cache memory, cached vs uncached decoding, paged vs contiguous serving",
    )?;
    let dev = ctx.picked.device.clone();
    let quick = args.common.quick;
    let max_context = args.max_context.unwrap_or(if quick { 128 } else { 512 });
    let n_gen = if quick { 4 } else { args.n_gen.max(2) };
    // The speed model: LLaMA recipe, GQA (8 query heads, 2 K/V heads).
    let (d_model, layers, heads, kv_heads, vocab) = if quick {
        (128, 2, 4, 2, 1024)
    } else {
        (256, 4, 8, 2, 4096)
    };
    let lm_cfg = ModernLmConfig::llama(
        vocab,
        max_context + n_gen + 1,
        d_model,
        layers,
        heads,
        kv_heads,
    );
    let config = serde_json::json!({ "max_context": max_context, "n_gen": n_gen, "speed_model": lm_cfg, "quick": quick });
    let mut report = RunReport::start(
        TOPIC,
        config,
        &ctx.picked.description,
        args.common.dtype.name(),
    );
    let dtype_bytes = ctx.dtype.size_in_bytes();

    // ---- 1. memory
    println!("\n[1/3] KV-cache memory = 2 × batch × layers × n_kv_heads × seq × d_head × bytes");
    let p_full = Preset::by_name("full")?;
    let p_cpu = Preset::by_name("cpu")?;
    let shapes = [
        Shape {
            name: "t0805 cpu preset (decoder)",
            layers: p_cpu.n_layers,
            n_kv_heads: p_cpu.n_heads,
            d_head: p_cpu.d_model / p_cpu.n_heads,
            bytes: 4,
            context: p_cpu.tgt_len,
        },
        Shape {
            name: "t0805 full preset (decoder)",
            layers: p_full.n_layers,
            n_kv_heads: p_full.n_heads,
            d_head: p_full.d_model / p_full.n_heads,
            bytes: 4,
            context: p_full.tgt_len,
        },
        Shape {
            name: "speed model (this run, GQA)",
            layers,
            n_kv_heads: kv_heads,
            d_head: d_model / heads,
            bytes: dtype_bytes,
            context: max_context,
        },
        Shape {
            name: "LLaMA-2-7B (MHA, fp16)",
            layers: 32,
            n_kv_heads: 32,
            d_head: 128,
            bytes: 2,
            context: 4096,
        },
        Shape {
            name: "LLaMA-3-8B (GQA 8, bf16)",
            layers: 32,
            n_kv_heads: 8,
            d_head: 128,
            bytes: 2,
            context: 8192,
        },
        Shape {
            name: "LLaMA-2-70B (GQA 8, fp16)",
            layers: 80,
            n_kv_heads: 8,
            d_head: 128,
            bytes: 2,
            context: 4096,
        },
    ];
    let mut rows = Vec::new();
    let mut mem_json = Vec::new();
    for s in &shapes {
        let per_token = kv_cache_bytes(1, s.layers, s.n_kv_heads, 1, s.d_head, s.bytes);
        let full_ctx = kv_cache_bytes(1, s.layers, s.n_kv_heads, s.context, s.d_head, s.bytes);
        let batch32 = kv_cache_bytes(32, s.layers, s.n_kv_heads, s.context, s.d_head, s.bytes);
        rows.push(vec![
            s.name.to_string(),
            format!("{}×{}×{}", s.layers, s.n_kv_heads, s.d_head),
            human_bytes(per_token),
            s.context.to_string(),
            human_bytes(full_ctx),
            human_bytes(batch32),
        ]);
        mem_json.push(serde_json::json!({ "model": s.name, "layers": s.layers, "n_kv_heads": s.n_kv_heads, "d_head": s.d_head, "bytes_per_element": s.bytes, "bytes_per_token": per_token, "context": s.context, "bytes_one_sequence": full_ctx, "bytes_batch32": batch32 }));
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
    report.metric("memory_table", &mem_json);

    shared::params::set_seed(args.common.seed);
    let (_varmap, lm) = init_modern_lm(&lm_cfg, ctx.dtype, &dev)?;
    let mut measured = Vec::new();
    for batch in [1usize, 4] {
        for kind in [CacheKind::Preallocated, CacheKind::Concat] {
            // The device allocator's own count (GPU only): memory in use before the cache exists
            // and after it is filled, with the prefill's activations and logits already freed.
            // A first prefill of the same shape (into a throw-away cache) comes before the
            // "before" reading, so one-time allocations (library workspaces) are not counted.
            let toks = Tensor::zeros((batch, max_context), DType::U32, &dev)?;
            if dev.is_cuda() {
                let mut warm = lm_cache(&lm, batch, max_context, kind, ctx.dtype)?;
                drop(lm_forward_cached(&lm, &toks, &mut warm)?);
            }
            let device_before = shared::device::device_memory_in_use(&dev)?;
            let mut cache = lm_cache(&lm, batch, max_context, kind, ctx.dtype)?;
            let before = cache.allocated_bytes();
            drop(lm_forward_cached(&lm, &toks, &mut cache)?);
            drop(toks);
            let device_held = shared::device::device_memory_in_use(&dev)?
                .zip(device_before)
                .map(|(after, before)| after.saturating_sub(before));
            let formula = kv_cache_bytes(
                batch,
                layers,
                kv_heads,
                max_context,
                d_model / heads,
                dtype_bytes,
            );
            let device_note = device_held
                .map(|b| format!("; device allocator: {} held", human_bytes(b as usize)))
                .unwrap_or_default();
            println!("   measured {kind:?} cache, batch {batch}, {max_context} tokens: {} before, {} after filling; formula {}{device_note}", human_bytes(before), human_bytes(cache.allocated_bytes()), human_bytes(formula));
            measured.push(serde_json::json!({ "kind": kind, "batch": batch, "seq": max_context, "bytes_before": before, "bytes_after": cache.allocated_bytes(), "formula": formula, "device_bytes_held": device_held }));
            drop(cache);
        }
    }
    report.metric("memory_measured", &measured);
    let ctx_pts: Vec<f64> = (8..=17).map(|e| (1usize << e) as f64).collect();
    let mem_series: Vec<Series> = shapes[3..]
        .iter()
        .map(|s| {
            Series::new(
                s.name,
                ctx_pts
                    .iter()
                    .map(|&c| {
                        (
                            c,
                            kv_cache_bytes(1, s.layers, s.n_kv_heads, c as usize, s.d_head, s.bytes)
                                as f64
                                / (1u64 << 30) as f64,
                        )
                    })
                    .collect(),
            )
        })
        .collect();
    line_chart(
        &ctx.out_dir.join("kv_memory.png"),
        "KV cache of one sequence vs context",
        "context (tokens)",
        "GiB",
        &mem_series,
        Axes {
            log_x: true,
            log_y: true,
        },
    )?;

    // ---- 2. speed
    println!(
        "\n[2/3] decoding speed with and without the cache ({} on {})",
        args.common.dtype.name(),
        ctx.picked.description
    );
    let mut contexts = Vec::new();
    let mut c = 32;
    while c <= max_context {
        contexts.push(c);
        c *= 2;
    }
    let mut speed = Vec::new();
    let (mut s_cached, mut s_plain, mut s_prefill, mut s_decode_ms) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut rows = Vec::new();
    let greedy = SamplingConfig::greedy();
    let mut progress = shared::train::Progress::new(contexts.len() as u64, "context lengths");
    // Warm-up (first-call allocations).
    let mut warm = lm_cache(&lm, 1, 64, CacheKind::Preallocated, ctx.dtype)?;
    generate_lm(
        &lm,
        &[1, 2, 3],
        4,
        &mut Sampler::new(greedy, 0)?,
        &mut warm,
        &mut |_| {},
    )?;
    for (i, &l) in contexts.iter().enumerate() {
        let prompt: Vec<u32> = (0..l).map(|j| ((j * 7919 + 13) % vocab) as u32).collect();
        let run = |kind: CacheKind| -> Result<GenStats> {
            let mut cache = lm_cache(&lm, 1, l + n_gen + 1, kind, ctx.dtype)?;
            Ok(generate_lm(
                &lm,
                &prompt,
                n_gen,
                &mut Sampler::new(greedy, 0)?,
                &mut cache,
                &mut |_| {},
            )?)
        };
        // Best of 3 (the machine is shared): the run with the fastest decode.
        let best = |kind: CacheKind| -> Result<GenStats> {
            let mut runs = (0..3).map(|_| run(kind)).collect::<Result<Vec<_>>>()?;
            runs.sort_by(|a, b| a.decode_s.total_cmp(&b.decode_s));
            Ok(runs.swap_remove(0))
        };
        let pre = best(CacheKind::Preallocated)?;
        let cat = best(CacheKind::Concat)?;
        let plain_n = if quick { 2 } else { 3 };
        let plain = generate_lm_no_cache(
            &lm,
            &prompt,
            plain_n,
            &mut Sampler::new(greedy, 0)?,
            &mut |_| {},
        )?;
        assert_eq!(
            plain.tokens[..],
            pre.tokens[..plain_n],
            "cache changed the greedy tokens"
        );
        let plain_tps = plain_n as f64 / (plain.prefill_s + plain.decode_s);
        let decode_ms = 1e3 * pre.decode_s / (n_gen - 1) as f64;
        s_cached.push((l as f64, pre.decode_tokens_per_s()));
        s_plain.push((l as f64, plain_tps));
        s_prefill.push((l as f64, 1e3 * pre.prefill_s));
        s_decode_ms.push((l as f64, decode_ms));
        rows.push(vec![
            l.to_string(),
            format!("{:.1}", 1e3 * pre.prefill_s),
            format!("{decode_ms:.2}"),
            format!("{:.1}", pre.decode_tokens_per_s()),
            format!("{:.1}", cat.decode_tokens_per_s()),
            format!("{plain_tps:.1}"),
            format!("{:.1}×", pre.decode_tokens_per_s() / plain_tps),
        ]);
        speed.push(serde_json::json!({ "context": l, "prefill_ms": 1e3 * pre.prefill_s, "decode_ms_per_token": decode_ms, "cached_tokens_per_s": pre.decode_tokens_per_s(), "concat_cache_tokens_per_s": cat.decode_tokens_per_s(), "no_cache_tokens_per_s": plain_tps, "speedup": pre.decode_tokens_per_s() / plain_tps }));
        progress.update(i as u64 + 1, format!("context {l}"));
    }
    progress.finish();
    print_table(
        &[
            "context",
            "prefill ms",
            "decode ms/token",
            "cached tok/s",
            "concat-cache tok/s",
            "no-cache tok/s",
            "speed-up",
        ],
        &rows,
    );
    report.metric("speed", &speed);
    line_chart(
        &ctx.out_dir.join("speed_vs_context.png"),
        &format!("Decoding speed vs context ({})", ctx.picked.description),
        "context (tokens)",
        "tokens/s",
        &[
            Series::new("KV cache", s_cached),
            Series::new("no cache (recompute prefix)", s_plain),
        ],
        Axes {
            log_x: true,
            log_y: true,
        },
    )?;
    line_chart(
        &ctx.out_dir.join("prefill_decode_time.png"),
        "Time: prefill of the prompt vs one decode step",
        "context (tokens)",
        "ms",
        &[
            Series::new("prefill (whole prompt)", s_prefill),
            Series::new("decode (per token, cached)", s_decode_ms.clone()),
        ],
        Axes {
            log_x: true,
            log_y: true,
        },
    )?;

    // Arithmetic intensity of one decode step: FLOPs / bytes read (weights + cache).
    let n_params_speed = lm_non_embedding_params(&lm_cfg);
    let intensity_rows = [
        (
            "speed model",
            n_params_speed,
            layers,
            kv_heads,
            d_model / heads,
            d_model,
            2048usize,
        ),
        ("LLaMA-2-7B", 6.5e9 as usize, 32, 32, 128, 4096, 4096),
        ("LLaMA-3-8B", 7.0e9 as usize, 32, 8, 128, 4096, 8192),
    ];
    let ridge = 990e12 / 3.35e12;
    let mut rows = Vec::new();
    let mut ai = Vec::new();
    for (name, params, nl, kvh, dh, dm, ctxl) in intensity_rows {
        for batch in [1usize, 16, 256] {
            let flops =
                batch as f64 * (2.0 * params as f64 + 4.0 * nl as f64 * dm as f64 * ctxl as f64);
            let bytes = 2.0 * params as f64 + kv_cache_bytes(batch, nl, kvh, ctxl, dh, 2) as f64;
            let i = flops / bytes;
            rows.push(vec![
                name.to_string(),
                batch.to_string(),
                ctxl.to_string(),
                format!("{:.2e}", flops),
                human_bytes(bytes as usize),
                format!("{i:.1}"),
                if i < ridge { "memory" } else { "compute" }.to_string(),
            ]);
            ai.push(serde_json::json!({ "model": name, "batch": batch, "context": ctxl, "flops": flops, "bytes": bytes, "flop_per_byte": i }));
        }
    }
    println!("   arithmetic intensity of a decode step (bf16 weights + cache read once) vs H100 ridge {ridge:.0} FLOP/byte:");
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
    report.metric("arithmetic_intensity", &ai);
    report.metric("h100_ridge_flop_per_byte", ridge);
    // Effective bandwidth of our own decode step at the longest context.
    let last_ms = s_decode_ms.last().map(|p| p.1).unwrap_or(f64::NAN);
    let bytes_step = (n_params_speed + vocab * d_model) as f64 * dtype_bytes as f64
        + kv_cache_bytes(
            1,
            layers,
            kv_heads,
            max_context,
            d_model / heads,
            dtype_bytes,
        ) as f64;
    let flops_step = 2.0 * (n_params_speed + vocab * d_model) as f64
        + 4.0 * (layers * d_model * max_context) as f64;
    println!("   our decode step at context {max_context}: {} read, {:.2e} FLOP in {last_ms:.2} ms → {:.1} GB/s, {:.2} GFLOP/s", human_bytes(bytes_step as usize), flops_step, bytes_step / last_ms / 1e6, flops_step / last_ms / 1e6);
    report.metric("decode_step_bandwidth_gb_s", bytes_step / last_ms / 1e6);
    report.metric("decode_step_gflop_s", flops_step / last_ms / 1e6);

    // ---- 3. paged vs contiguous
    println!("\n[3/3] serving simulation: contiguous max-length reservation vs paged blocks");
    let (n_req, max_seq, budget) = if quick {
        (100, 2048, 32_768)
    } else {
        (400, 2048, 65_536)
    };
    let reqs = workload(n_req, 4, (16, 1024), (16, 1024), args.common.seed);
    println!("   {n_req} requests (4 per step; prompts and outputs uniform in 16..1024 tokens), max_seq {max_seq}, budget {budget} token slots (= {} of LLaMA-2-7B fp16 cache)", human_bytes(budget * kv_cache_bytes(1, 32, 32, 1, 128, 2)));
    let mut results = vec![simulate(&reqs, Policy::Contiguous, budget, max_seq)?];
    for bs in [1, 8, 16, 32, 64, 128] {
        results.push(simulate(
            &reqs,
            Policy::Paged { block_size: bs },
            budget,
            max_seq,
        )?);
    }
    let mut rows = Vec::new();
    for r in &results {
        let name = match r.policy {
            Policy::Contiguous => "contiguous (max_seq)".to_string(),
            Policy::Paged { block_size } => format!("paged, block {block_size}"),
        };
        rows.push(vec![
            name,
            format!("{:.1}", r.waste_pct),
            format!("{:.1}", r.mean_batch),
            r.max_batch.to_string(),
            r.steps.to_string(),
            format!("{:.1}", r.tokens_per_step),
            r.preemptions.to_string(),
        ]);
    }
    print_table(
        &[
            "policy",
            "waste %",
            "mean batch",
            "max batch",
            "steps",
            "tokens/step",
            "preemptions",
        ],
        &rows,
    );
    report.metric("serving", &results);
    let labels: Vec<String> = rows
        .iter()
        .map(|r| {
            r[0].replace("paged, block ", "paged B=")
                .replace(" (max_seq)", "")
        })
        .collect();
    let waste: Vec<f64> = results.iter().map(|r| r.waste_pct).collect();
    bar_chart(
        &ctx.out_dir.join("serving_waste.png"),
        "KV memory reserved but unused (simulated serving)",
        "waste %",
        &labels,
        &waste,
    )?;
    let batch: Vec<f64> = results.iter().map(|r| r.mean_batch).collect();
    bar_chart(
        &ctx.out_dir.join("serving_batch.png"),
        "Sequences running at once in the same memory",
        "mean batch",
        &labels,
        &batch,
    )?;
    // Prefix sharing: 32 requests with a common 512-token system prompt.
    let own: Vec<usize> = workload(32, 32, (64, 256), (1, 1), args.common.seed + 1)
        .iter()
        .map(|r| r.prompt)
        .collect();
    let (without, with) = prefix_sharing_blocks(512, &own, 16, max_seq)?;
    let saving = 100.0 * (1.0 - with as f64 / without as f64);
    println!("   prefix sharing (32 sequences, 512-token shared prompt + 64..256 own, blocks of 16): {without} → {with} blocks ({saving:.1}% saved)");
    report.metric("prefix_sharing", serde_json::json!({ "sequences": 32, "prefix": 512, "block_size": 16, "blocks_without": without, "blocks_with": with, "saving_pct": saving }));

    let path = report.write(&ctx.out_dir)?;
    println!(
        "\nwrote {} and the figures in {}",
        path.display(),
        ctx.out_dir.display()
    );
    Ok(())
}

/// Parameters outside the embedding and the head of a LLaMA-recipe config.
fn lm_non_embedding_params(c: &ModernLmConfig) -> usize {
    let d_head = c.d_model / c.n_heads;
    let attn = 2 * c.d_model * c.d_model + 2 * c.d_model * c.n_kv_heads * d_head;
    c.n_layers * (attn + 3 * c.d_model * c.d_ff + 2 * c.d_model) + c.d_model
}

fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.2} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

//! The ladder, measured: every rung of the module's decoder-only LM trained on the same
//! WikiText-2 batches with the same budget, one after the other in one run.
//!
//! | rung | topic | what changes |
//! |---|---|---|
//! | 0 | 8-04 | GPT-2 style: LayerNorm, GELU MLP, learned positions, MHA, biases |
//! | 1 | 8-06 | + RMSNorm + SwiGLU, no biases |
//! | 2 | 8-07 | + grouped-query attention (half as many K/V heads) |
//! | 3 | 8-08 | + RoPE instead of learned positions (the LLaMA recipe) |
//! | 4 | 8-09 | + FlashAttention (same model, same values; only how attention runs) |
//! | 5 | 8-10 | + KV cache (inference: decoding speed cached vs recomputing the prefix) |
//! | 2′ | 8-07-mqa | rung 1 with multi-query attention (one K/V head), beside rung 2 |
//!
//! Every rung's KV-cache bytes per token and cached decoding speed are measured on the trained
//! model, so MHA (rungs 0, 1), GQA (rung 2) and MQA (2′) compare at inference too.
//! Prints the table the README shows and writes `output/ladder/results.json`. Every trained rung
//! is kept in `output/ladder/checkpoints/rung-<topic>/` (config, weights, tokenizer), which
//! `t0810_kv_cache generate --checkpoint …` continues; the top rung's samples are in the results.
//!
//! `cargo run --release -p t0810_kv_cache --example ladder -- [--quick]`; on a GPU
//! `cargo run --release -p t0810_kv_cache --example ladder --features cuda -- --device cuda`

use anyhow::Result;
use candle_core::{DType, Device};
use clap::Parser;
use shared::cli::CommonArgs;
use shared::data_parallel::Collective;
use shared::kernels::{AttentionImpl, KernelArgs, Kernels};
use shared::report::{print_table, RunReport};
use shared::tokenizer::{load_corpus, Corpus};
use shared::train::{
    train_lm, train_lm_in_group, AdamWConfig, LmData, LmTrainSpec, ScheduleConfig, Trainer,
};
use t0804_transformer_block::{init_lm_mixed, LmConfig, LmShape};
use t0810_kv_cache::{
    generate_lm, generate_lm_no_cache, lm_cache, CacheKind, Sampler, SamplingConfig,
};

#[derive(Parser, Debug)]
#[command(about = "The ladder: each rung of the decoder-only LM against the rung below")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    kernels: KernelArgs,
    /// Text to train on.
    #[arg(long, value_enum, default_value = "wikitext2")]
    corpus: Corpus,
    /// Training steps per rung (default: 300 on the CPU, 1000 on CUDA, 20 with --quick).
    #[arg(long)]
    steps: Option<usize>,
    /// Train only these rungs, by topic (`--rung 8-08`; repeatable); default: every rung.
    #[arg(long = "rung", value_name = "TOPIC")]
    only: Vec<String>,
    /// Early stopping: evaluate every twentieth of the run, stop after this many evaluations
    /// without a better validation loss, and keep the best evaluation's parameters.
    #[arg(long, value_name = "EVALUATIONS")]
    patience: Option<usize>,
}

/// Sizes and budget shared by every rung.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Budget {
    vocab: usize,
    d_model: usize,
    n_layers: usize,
    n_heads: usize,
    seq_len: usize,
    batch: usize,
    steps: usize,
    lr: f64,
    /// Early stopping's patience, in evaluations (see `--patience`).
    patience: Option<usize>,
    /// Words (+ end-of-lines) of the test split, the denominator of word-level perplexity.
    test_words: usize,
}

impl Budget {
    fn for_run(quick: bool, gpu: bool, steps: Option<usize>, patience: Option<usize>) -> Self {
        let b = match (quick, gpu) {
            (true, _) => Budget {
                vocab: 1024,
                d_model: 64,
                n_layers: 2,
                n_heads: 4,
                seq_len: 32,
                batch: 8,
                steps: 20,
                lr: 3e-3,
                patience: None,
                test_words: 0,
            },
            (false, false) => Budget {
                vocab: 4096,
                d_model: 128,
                n_layers: 4,
                n_heads: 4,
                seq_len: 64,
                batch: 16,
                steps: 300,
                lr: 3e-3,
                patience: None,
                test_words: 0,
            },
            (false, true) => Budget {
                vocab: 8192,
                d_model: 512,
                n_layers: 8,
                n_heads: 8,
                seq_len: 256,
                batch: 32,
                steps: 1000,
                lr: 1e-3,
                patience: None,
                test_words: 0,
            },
        };
        Budget {
            steps: steps.unwrap_or(b.steps),
            patience,
            ..b
        }
    }

    fn shape(&self) -> LmShape {
        LmShape {
            vocab_size: self.vocab,
            max_seq_len: self.seq_len,
            d_model: self.d_model,
            n_layers: self.n_layers,
            n_heads: self.n_heads,
        }
    }
}

/// One rung: its config and the kernels it runs with.
struct Rung {
    /// 0 (8-04) … 4 (8-09).
    index: usize,
    topic: &'static str,
    ingredient: &'static str,
    cfg: LmConfig,
    kernels: Kernels,
}

/// Rungs 0–4, each built from the one below by the function its topic teaches.
fn rungs(b: &Budget, kernels: Kernels) -> Vec<Rung> {
    let naive = kernels.with_attention(AttentionImpl::Naive);
    let rung0 = LmConfig::gpt2(b.shape());
    let rung1 = t0806_modern_blocks::modern(rung0);
    let rung2 = t0807_grouped_query_attention::grouped(rung1, (b.n_heads / 2).max(1));
    let rung3 = t0808_rope::with_rope(rung2);
    let rung = |index, topic, ingredient, cfg, kernels| Rung {
        index,
        topic,
        ingredient,
        cfg,
        kernels,
    };
    vec![
        rung(
            0,
            "8-04",
            "GPT-2 style (LayerNorm, GELU, learned positions, MHA)",
            rung0,
            naive,
        ),
        rung(1, "8-06", "+ RMSNorm + SwiGLU, no biases", rung1, naive),
        rung(2, "8-07", "+ grouped-query attention", rung2, naive),
        rung(3, "8-08", "+ RoPE = the LLaMA recipe", rung3, naive),
        rung(
            4,
            "8-09",
            "+ FlashAttention",
            rung3,
            kernels.with_attention(AttentionImpl::Flash),
        ),
        // Beside rung 2: the far end of grouped-query attention, one K/V head for every query
        // head (MQA), so that MHA (rung 1), GQA (rung 2) and MQA compare trained.
        rung(
            2,
            "8-07-mqa",
            "+ multi-query attention (1 K/V head; beside rung 2)",
            t0807_grouped_query_attention::grouped(rung1, 1),
            naive,
        ),
    ]
}

/// What one rung measured.
#[derive(Debug, Clone, serde::Serialize)]
struct Measured {
    rung: usize,
    topic: String,
    ingredient: String,
    params: usize,
    valid_loss: f64,
    train_tokens_per_s: f64,
    /// WikiText-2 test split: total NLL over its word count (words + end-of-lines), exponentiated.
    test_word_ppl: f64,
    kv_bytes_per_token: usize,
    /// Greedy decoding of the trained rung with its KV cache, batch 1, tokens/s (a quarter of the
    /// context as prompt, the rest generated): what its cache size costs at inference.
    decode_tokens_per_s: f64,
    kernels: String,
    /// `(step, validation loss)` every tenth of the run (twentieth with early stopping).
    valid_curve: Vec<(usize, f64)>,
    /// With early stopping: the step whose parameters the rung kept (its best validation loss)
    /// and the step it stopped at, if it stopped before the budget.
    best_step: Option<usize>,
    stopped_early_at: Option<usize>,
    /// The step whose loss or gradient was not finite (the run stopped there), if any.
    diverged_at: Option<usize>,
    /// `(step, MiB)`: the most device memory tensors held in each evaluation interval (CUDA only;
    /// step 0 is the first evaluation, before training).
    memory_peak_mib: Vec<(usize, f64)>,
}

/// Trains one rung; in a launched group (`shared::process_group::launch`) every rank trains its
/// share of each batch from rank 0's initial parameters, and only rank 0 keeps the model.
#[allow(clippy::too_many_arguments)]
fn train_rung(
    r: &Rung,
    b: &Budget,
    data: &shared::tokenizer::TokenizedWikiText,
    (dtype, compute): (DType, DType),
    dev: &Device,
    seed: u64,
    keep_in: &std::path::Path,
    group: Option<&dyn Collective>,
) -> Result<Option<(Measured, t0804_transformer_block::DecoderOnlyLm)>> {
    shared::params::set_seed(seed);
    let parts = t0809_flash_attention::parts(r.kernels);
    // Mixed precision keeps f32 master weights in `varmap` (what AdamW updates, what is saved)
    // and builds the model on bf16 copies of them, which AdamW refreshes after every step.
    let (varmap, copies, lm) = init_lm_mixed(&r.cfg, &parts, (dtype, compute), dev)?;
    let schedule = ScheduleConfig {
        max_lr: b.lr,
        min_lr: b.lr / 10.0,
        warmup_steps: b.steps / 10,
        total_steps: b.steps,
        clip_norm: Some(1.0),
    };
    let mut trainer =
        Trainer::for_params(&varmap, copies.as_ref(), AdamWConfig::default(), schedule)?;
    let spec = LmTrainSpec {
        label: format!("rung {}", r.topic),
        steps: b.steps,
        batch_size: b.batch,
        seq_len: b.seq_len,
        eval_every: (b.steps / if b.patience.is_some() { 20 } else { 10 }).max(1),
        eval_batches: 16,
        seed,
        patience: b.patience,
    };
    let loss_fn = |x: &candle_core::Tensor, y: &candle_core::Tensor| lm.loss(x, y);
    let curve = match group {
        Some(g) => {
            trainer.broadcast_parameters(g, 0)?; // rank 0's masters, and the copies of them
            let lm_data = LmData {
                train_tokens: &data.train,
                valid_tokens: &data.valid,
                device: dev,
                loss_fn: &loss_fn,
            };
            let curve = train_lm_in_group(&mut trainer, &lm_data, &spec, g)?;
            if g.rank() != 0 {
                return Ok(None); // rank 0 evaluates, keeps and reports
            }
            curve
        }
        None => train_lm(&mut trainer, &data.train, &data.valid, &spec, dev, &loss_fn)?,
    };
    t0804_transformer_block::save_lm(keep_in, &r.cfg, &varmap)?;
    data.tokenizer.save(&keep_in.join("tokenizer.json"))?;
    println!("   kept in {}", keep_in.display());
    let (test_nll, _) =
        shared::train::corpus_nll(&data.test, b.seq_len, b.batch, dev, &|x, y| lm.loss(x, y))?;
    let prompt = &data.valid[..(b.seq_len / 4).max(1)];
    let mut greedy = Sampler::new(SamplingConfig::greedy(), seed)?;
    let decoded = generate_cached(&lm, prompt, b.seq_len - prompt.len(), &mut greedy, compute)?;
    let measured = Measured {
        rung: r.index,
        topic: r.topic.into(),
        ingredient: r.ingredient.into(),
        params: r.cfg.n_params(),
        valid_loss: curve.final_valid_loss().unwrap_or(f64::NAN),
        train_tokens_per_s: curve.tokens_per_s,
        test_word_ppl: shared::train::word_level_perplexity(test_nll, b.test_words),
        kv_bytes_per_token: r.cfg.kv_bytes_per_token(compute.size_in_bytes()),
        decode_tokens_per_s: decoded.decode_tokens_per_s(),
        kernels: r.kernels.describe(),
        valid_curve: curve.valid.iter().map(|v| (v.0, v.1)).collect(),
        best_step: curve.best.map(|b| b.0),
        stopped_early_at: curve.stopped_early_at,
        diverged_at: curve.diverged_at,
        memory_peak_mib: curve
            .memory_peak
            .iter()
            .map(|m| (m.0, m.1 as f64 / (1u64 << 20) as f64))
            .collect(),
    };
    if let Some((first, last)) = curve.memory_peak_first_last() {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        println!(
            "   device memory peak: {:.0} MiB in the first evaluation interval, {:.0} MiB in the last",
            mib(first),
            mib(last)
        );
    }
    if let Some((step, loss)) = curve.best {
        println!("   kept the parameters of step {step} (validation loss {loss:.3})");
    }
    if let Some(step) = curve.diverged_at {
        println!("   diverged at step {step} (the loss or a gradient was not finite)");
    }
    Ok(Some((measured, lm)))
}

/// `new_tokens` after `prompt` (batch 1) with a preallocated KV cache sized for them.
fn generate_cached(
    lm: &t0804_transformer_block::DecoderOnlyLm,
    prompt: &[u32],
    new_tokens: usize,
    sampler: &mut Sampler,
    dtype: DType,
) -> Result<t0810_kv_cache::GenStats> {
    let len = prompt.len() + new_tokens;
    let mut cache = lm_cache(lm, 1, len, CacheKind::Preallocated, dtype)?;
    Ok(generate_lm(
        lm,
        prompt,
        new_tokens,
        sampler,
        &mut cache,
        &mut |_| {},
    )?)
}

/// Rung 5: decoding tokens/s of the trained top rung with the KV cache and without it.
fn decode_speeds(
    lm: &t0804_transformer_block::DecoderOnlyLm,
    prompt: &[u32],
    new_tokens: usize,
    dtype: DType,
) -> Result<(f64, f64)> {
    let mut sampler = Sampler::new(SamplingConfig::greedy(), 0)?;
    let cached = generate_cached(lm, prompt, new_tokens, &mut sampler, dtype)?;
    let uncached = generate_lm_no_cache(lm, prompt, new_tokens, &mut sampler, &mut |_| {})?;
    if cached.tokens != uncached.tokens {
        anyhow::bail!(
            "cached and uncached greedy decoding disagree: {:?} vs {:?}",
            cached.tokens,
            uncached.tokens
        );
    }
    Ok((cached.decode_tokens_per_s(), uncached.decode_tokens_per_s()))
}

/// Prompts the samples continue (the same for every run, so that runs compare).
const PROMPTS: [&str; 2] = ["The history of the city", "In 1997 , the band released"];

/// Continuations of [`PROMPTS`] by `lm`, greedy and sampled (temperature 0.8, top-p 0.95), 48
/// new tokens each, with the KV cache.
fn samples(
    lm: &t0804_transformer_block::DecoderOnlyLm,
    tokenizer: &shared::tokenizer::Bpe,
    dtype: DType,
    seed: u64,
) -> Result<Vec<serde_json::Value>> {
    let sampled = SamplingConfig {
        temperature: 0.8,
        top_k: None,
        top_p: Some(0.95),
    };
    let mut out = Vec::new();
    for prompt in PROMPTS {
        let ids = tokenizer.encode(prompt)?;
        for (name, cfg) in [
            ("greedy", SamplingConfig::greedy()),
            ("T=0.8, top-p 0.95", sampled),
        ] {
            let mut sampler = Sampler::new(cfg, seed)?;
            let new_tokens = 48.min(lm.max_seq_len.saturating_sub(ids.len()));
            let g = generate_cached(lm, &ids, new_tokens, &mut sampler, dtype)?;
            out.push(serde_json::json!({
                "prompt": prompt,
                "sampling": name,
                "continuation": tokenizer.decode(&g.tokens)?,
            }));
        }
    }
    Ok(out)
}

fn main() -> Result<()> {
    shared::cpu::in_pool(run)
}

fn run() -> Result<()> {
    let args = Args::parse();
    let ctx = args.common.setup_mixed(
        "ladder",
        "every rung of the decoder-only LM, same data and budget",
    )?;
    let dev = &ctx.picked.device;
    let b = Budget::for_run(args.common.quick, dev.is_cuda(), args.steps, args.patience);
    let data = load_corpus(args.corpus, args.common.data_dir.as_deref(), b.vocab)?;
    // Word-level perplexity divides by the test split's words (+ end-of-lines): the BPE tokens
    // decode back to the exact text.
    let test_text = data.tokenizer.decode(&data.test)?;
    let b = Budget {
        vocab: data.tokenizer.vocab_size(),
        test_words: shared::wikitext::stats(&test_text).words_plus_eos,
        ..b
    };
    let kernels = args.kernels.resolve(Kernels::for_device(dev));
    println!("   budget {b:?}\n   kernels {}", kernels.describe());
    // Started by `shared::process_group::launch` (or `cargo run -p shared --bin launch`): one
    // rank of a data-parallel group.
    let group = shared::process_group::join_from_env(dev)?;
    if let Some(g) = &group {
        println!(
            "   rank {} of a data-parallel group of {}",
            g.rank(),
            g.world()
        );
    }
    let mut report = RunReport::start(
        "ladder",
        serde_json::json!({ "budget": b, "corpus": args.corpus }),
        &ctx.picked.description,
        ctx.dtype_name(),
    );
    let mut rows = Vec::new();
    let mut top = None;
    let all = rungs(&b, kernels);
    if let Some(unknown) = args
        .only
        .iter()
        .find(|t| all.iter().all(|r| r.topic != t.as_str()))
    {
        let topics: Vec<_> = all.iter().map(|r| r.topic).collect();
        anyhow::bail!("--rung {unknown}: no such rung; choose among {topics:?}");
    }
    let chosen = all
        .into_iter()
        .filter(|r| args.only.is_empty() || args.only.iter().any(|t| t == r.topic));
    for r in chosen {
        let Some((m, lm)) = train_rung(
            &r,
            &b,
            &data,
            (ctx.dtype, ctx.compute_dtype),
            dev,
            args.common.seed,
            &ctx.out_dir.join(format!("checkpoints/rung-{}", r.topic)),
            group.as_deref(),
        )?
        else {
            continue; // a rank other than 0 of a group
        };
        rows.push(m);
        if top.as_ref().is_none_or(|(_, _, index)| r.index > *index) {
            top = Some((lm, r.topic, r.index)); // the highest rung trained
        }
    }
    let Some((lm, top_topic, _)) = top else {
        println!("   trained every rung as a rank of the group; rank 0 reports");
        return Ok(());
    };
    let prompt: Vec<u32> = data.valid[..(b.seq_len / 4).max(1)].to_vec();
    let new_tokens = b.seq_len - prompt.len();
    let (cached, uncached) = decode_speeds(&lm, &prompt, new_tokens, ctx.compute_dtype)?;
    print_ladder(&rows, cached, uncached);
    let samples = samples(&lm, &data.tokenizer, ctx.compute_dtype, args.common.seed)?;
    println!("\n   samples of the top rung ({top_topic}), 48 new tokens each:");
    for s in &samples {
        let field = |k: &str| s[k].as_str().unwrap_or_default().to_string();
        println!(
            "   [{}] {} ⟶ {}",
            field("sampling"),
            field("prompt"),
            field("continuation")
        );
    }
    report.metric("samples", &samples);
    report.metric("rungs", &rows);
    report.metric("decode_tokens_per_s", serde_json::json!({ "cached": cached, "uncached": uncached, "prompt": prompt.len(), "new_tokens": new_tokens }));
    let path = report.write(&ctx.out_dir)?;
    println!("   wrote {}", path.display());
    Ok(())
}

fn print_ladder(rows: &[Measured], cached: f64, uncached: f64) {
    let mut table: Vec<Vec<String>> = rows
        .iter()
        .map(|m| {
            vec![
                m.rung.to_string(),
                m.topic.clone(),
                m.ingredient.clone(),
                format!("{:.2} M", m.params as f64 / 1e6),
                format!("{:.3}", m.valid_loss),
                format!("{:.1}", m.test_word_ppl),
                format!("{:.0}", m.train_tokens_per_s),
                m.kv_bytes_per_token.to_string(),
                format!("{:.0}", m.decode_tokens_per_s),
            ]
        })
        .collect();
    table.push(vec![
        "5".into(),
        "8-10".into(),
        format!("+ KV cache: decoding {cached:.0} vs {uncached:.0} tokens/s uncached"),
        "".into(),
        "".into(),
        "".into(),
        "".into(),
        "".into(),
        "".into(),
    ]);
    print_table(
        &[
            "rung",
            "topic",
            "ingredient",
            "params",
            "valid loss",
            "test word ppl",
            "train tok/s",
            "KV B/token",
            "decode tok/s",
        ],
        &table,
    );
}

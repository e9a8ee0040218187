//! `generate`: streams a continuation of a prompt from a checkpoint folder — a decoder-only LM
//! (`config.json` + `model.safetensors`, any rung, the recipe-style config included) or t0805's
//! encoder–decoder (`state.json`) — and reports prefill time and decode tokens/s.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use shared::cli::CommonArgs;
use shared::kernels::KernelArgs;
use shared::tokenizer::{load_corpus, Bpe, Corpus, BOS};
use std::io::Write;
use std::path::{Path, PathBuf};
use t0804_transformer_block::DecoderOnlyLm;
use t0805_full_transformer::{Preset, Transformer};
use t0810_kv_cache::*;

/// `generate` arguments.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A decoder-only LM folder (config.json + model.safetensors) or t0805's checkpoints/transformer.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_new: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Recompute the whole prefix at every step (for comparison).
    #[arg(long)]
    pub no_cache: bool,
    /// Greedy decoding (`--temperature 0`) of a decoder-only LM with the static cache, its step
    /// captured into a CUDA graph on CUDA (attention defaults to naive with the fused softmax).
    #[arg(long)]
    pub graphs: bool,
    /// BPE tokenizer file; default: <checkpoint>/tokenizer.json, else the cached BPE of --corpus
    /// with the checkpoint's vocabulary size.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "wikitext2")]
    pub corpus: Corpus,
}

/// The model a checkpoint folder holds.
enum Loaded {
    DecoderOnly(DecoderOnlyLm),
    Seq2Seq(Transformer),
}

/// The tokenizer: `--tokenizer`, else the folder's `tokenizer.json`, else the corpus's cached BPE.
fn tokenizer_for(a: &GenerateArgs, data_dir: Option<&Path>, vocab: usize) -> Result<Bpe> {
    if let Some(p) = &a.tokenizer {
        return Bpe::load(p).with_context(|| format!("loading tokenizer {}", p.display()));
    }
    let inside = a.checkpoint.join("tokenizer.json");
    if inside.exists() {
        return Bpe::load(&inside);
    }
    println!(
        "   tokenizer: the cached BPE of {:?} with vocab {vocab}",
        a.corpus
    );
    Ok(load_corpus(a.corpus, data_dir, vocab)?.tokenizer)
}

/// A decoder-only LM folder, built with 8-09's parts and the run's kernels.
fn load_decoder_only(
    a: &GenerateArgs,
    common: &CommonArgs,
    kernels: &KernelArgs,
    dtype: DType,
    dev: &Device,
) -> Result<(Loaded, Bpe)> {
    let default = t0810_kv_cache::decoding_kernels(dev);
    let default = if a.graphs {
        // The static cache's key index is read on the device by the fused softmax; FlashAttention
        // takes host lengths. Event tracking goes off before the model's tensors exist.
        t0810_kv_cache::prepare_for_graphs(dev)?;
        default.with_attention(shared::kernels::AttentionImpl::Naive)
    } else {
        default
    };
    let parts = t0809_flash_attention::parts(kernels.resolve(default));
    let (cfg, lm) = t0804_transformer_block::load_lm(&a.checkpoint, &parts, dtype, dev)?;
    let lm = if a.graphs { lm.with_packed_qkv()? } else { lm };
    println!(
        "   model: {:?} + {:?} + {:?} positions, d_model {}, {} layers, {} heads / {} K/V heads, context {}",
        cfg.norm, cfg.ffn, cfg.positions, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.max_seq_len
    );
    let bpe = tokenizer_for(a, common.data_dir.as_deref(), cfg.vocab_size)?;
    Ok((Loaded::DecoderOnly(lm), bpe))
}

/// The folder of t0805's latest checkpoint under `path` (a checkpoint root with a `latest`
/// pointer, or one `step-…` folder), if `path` holds one.
fn seq2seq_folder(path: &std::path::Path) -> Result<Option<std::path::PathBuf>> {
    if let Some(dir) = shared::checkpoint::latest(path)? {
        return Ok(Some(dir));
    }
    Ok(path.join("state.json").exists().then(|| path.to_path_buf()))
}

/// t0805's encoder–decoder checkpoint: the preset recorded with it, the weights.
fn load_seq2seq(
    a: &GenerateArgs,
    folder: &std::path::Path,
    common: &CommonArgs,
    dtype: DType,
    dev: &Device,
) -> Result<(Loaded, Bpe)> {
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("state.json"))?)?;
    let name = state["config"]["meta"]["preset"]["name"]
        .as_str()
        .context("state.json has no config.meta.preset.name: not a t0805 checkpoint")?;
    let p = Preset::by_name(name)?;
    let bpe = tokenizer_for(a, common.data_dir.as_deref(), p.vocab)?;
    let weights = folder.join("model.safetensors");
    // Safety: read-only memory map of a file nobody modifies while the model lives.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, dev)? };
    let model = Transformer::new(vb, p.transformer(bpe.vocab_size()))?;
    println!(
        "   model: t0805 encoder-decoder, preset '{name}' (source ≤ {}, target ≤ {} tokens)",
        p.src_len, p.tgt_len
    );
    Ok((Loaded::Seq2Seq(model), bpe))
}

/// A callback that prints the text generated so far as it grows: it decodes every token so far
/// and prints the new suffix (a byte-level BPE token may be half of a UTF-8 character).
fn streamer(bpe: &Bpe) -> impl FnMut(u32) + '_ {
    let mut out: Vec<u32> = Vec::new();
    let mut printed = String::new();
    move |t: u32| {
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
    }
}

/// Generates with the loaded model, cached or not, streaming through `on_token`.
fn generate_with(
    model: &Loaded,
    ids: &[u32],
    a: &GenerateArgs,
    bpe: &Bpe,
    sampler: &mut Sampler,
    dtype: DType,
    on_token: &mut dyn FnMut(u32),
) -> Result<GenStats> {
    Ok(match model {
        Loaded::DecoderOnly(lm) if a.no_cache => {
            generate_lm_no_cache(lm, ids, a.max_new, sampler, on_token)?
        }
        Loaded::DecoderOnly(lm) if a.graphs => {
            generate_lm_greedy_static(lm, ids, a.max_new, on_token)?
        }
        Loaded::DecoderOnly(lm) => {
            let mut cache = lm_cache(lm, 1, lm.max_seq_len, CacheKind::Preallocated, dtype)?;
            generate_lm(lm, ids, a.max_new, sampler, &mut cache, on_token)?
        }
        Loaded::Seq2Seq(_) if a.graphs => {
            bail!("--graphs decodes decoder-only LMs (the encoder-decoder's cross-attention has no static form here)")
        }
        Loaded::Seq2Seq(m) => {
            let src = &ids[ids.len().saturating_sub(m.cfg.max_len)..]; // the model's source window
            generate_seq2seq(
                m,
                src,
                bpe.special(BOS)?,
                a.max_new,
                sampler,
                CacheKind::Preallocated,
                on_token,
            )?
        }
    })
}

/// The `generate` command.
pub fn run(common: &CommonArgs, kernels: &KernelArgs, a: &GenerateArgs) -> Result<()> {
    let ctx = common.setup(crate::TOPIC, "generate")?;
    ctx.require_one_dtype()?;
    if a.graphs && (a.temperature != 0.0 || a.no_cache) {
        bail!(
            "--graphs decodes greedily with the cache: add --temperature 0 (and drop --no-cache)"
        );
    }
    let dev = &ctx.picked.device;
    let (model, bpe) = if a.checkpoint.join("config.json").exists() {
        load_decoder_only(a, common, kernels, ctx.dtype, dev)?
    } else if let Some(folder) = seq2seq_folder(&a.checkpoint)? {
        load_seq2seq(a, &folder, common, ctx.dtype, dev)?
    } else {
        bail!(
            "{} holds neither config.json (decoder-only LM) nor a t0805 checkpoint (latest, state.json)",
            a.checkpoint.display()
        );
    };
    let ids = bpe.encode(&a.prompt)?;
    let cfg = SamplingConfig {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
    };
    let mut sampler = Sampler::new(cfg, common.seed)?;
    let cache = match (a.no_cache, a.graphs) {
        (true, _) => "off",
        (false, true) => "static (CUDA graph on CUDA)",
        (false, false) => "on",
    };
    println!(
        "   prompt: {} tokens · sampling {cfg:?} · seed {} · cache {cache}",
        ids.len(),
        common.seed
    );
    print!("\n{}", a.prompt);
    std::io::stdout().flush()?;
    let stats = generate_with(
        &model,
        &ids,
        a,
        &bpe,
        &mut sampler,
        ctx.dtype,
        &mut streamer(&bpe),
    )?;
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

//! Experiment 8-07: grouped-query attention.
//!
//! 1. KV-cache bytes per token for MHA, GQA and MQA — our model and LLaMA-2-7B / LLaMA-3-8B shapes.
//! 2. Quality at equal budget: MHA, GQA and MQA variants of a small RoPE decoder (t0804's stack
//!    with LayerNorm + GELU FFN and this crate's attention) trained on WikiText-2 BPE tokens.
//! 3. Uptraining (Ainslie et al., 2023): mean-pool the K/V heads of the trained MHA model into
//!    GQA, evaluate before and after a short fine-tune.
//! 4. Decode throughput (full forward per new token; the KV cache itself is 8-10) vs context.
//!
//! `cargo run -p t0807_grouped_query_attention --release -- [--quick] [--device cpu|cuda]`

use anyhow::Result;
use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use shared::batching::{eval_batches, LmBatch, LmBatcher};
use shared::cli::CommonArgs;
use shared::params::{count_params, named_vars, normal, weight};
use shared::report::{bar_chart, line_chart, print_table, Axes, RunReport, Series};
use shared::tokenizer::TokenizedWikiText;
use shared::train::{AdamWConfig, Progress, ScheduleConfig, Trainer};
use shared::wikitext::{Variant, Verify, WikiText2};
use std::sync::Arc;
use std::time::Instant;
use t0804_transformer_block::{
    Activation, DecoderOnlyBlock, DecoderOnlyLm, FeedForward, LayerNorm, NormPlacement,
};
use t0807_grouped_query_attention::*;
use t0808_rope::{RopeScaling, RopeTables};

const TOPIC: &str = "t0807_grouped_query_attention";

#[derive(Parser, Debug)]
#[command(about = "8-07: KV-cache size, quality and uptraining of MHA / GQA / MQA")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// BPE vocabulary (default 1024; --quick: 512 on the tiny corpus; 4096+ for GPU runs).
    #[arg(long)]
    vocab: Option<usize>,
    #[arg(long, default_value_t = 128)]
    d_model: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 8)]
    heads: usize,
    #[arg(long, default_value_t = 64)]
    ctx: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Training steps per variant (default 200; --quick 25).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
}

/// A pre-norm RoPE decoder with grouped-query attention (LayerNorm, GELU FFN, no biases).
fn build_lm(
    vb: VarBuilder,
    vocab: usize,
    a: &Args,
    n_kv: usize,
    max_seq: usize,
) -> candle_core::Result<DecoderOnlyLm> {
    let d = a.d_model;
    let cfg = GqaConfig::new(d, a.heads, n_kv);
    let rope = Arc::new(RopeTables::new(
        cfg.d_head()?,
        max_seq,
        10_000.0,
        RopeScaling::None,
        vb.device(),
    )?);
    let mut blocks = vec![];
    for i in 0..a.layers {
        let vb = vb.pp(format!("blocks.{i}"));
        blocks.push(DecoderOnlyBlock {
            attn_norm: Box::new(LayerNorm::new(vb.pp("attn_norm"), d, 1e-5)?),
            attn: Box::new(GroupedQueryAttention::new(
                vb.pp("attn"),
                cfg,
                Some(rope.clone()),
            )?),
            ffn_norm: Box::new(LayerNorm::new(vb.pp("ffn_norm"), d, 1e-5)?),
            ffn: Box::new(FeedForward::new(
                vb.pp("ffn"),
                d,
                4 * d,
                Activation::Gelu,
                false,
            )?),
            placement: NormPlacement::Pre,
        });
    }
    Ok(DecoderOnlyLm {
        token_embedding: normal(&vb, (vocab, d), "token_embedding", 1.0)?,
        positions: None,
        blocks,
        final_norm: Some(Box::new(LayerNorm::new(vb.pp("final_norm"), d, 1e-5)?)),
        lm_head: weight(&vb, vocab, d, "lm_head")?,
        lm_head_bias: None,
        max_seq_len: max_seq,
    })
}

fn evaluate(lm: &DecoderOnlyLm, batches: &[LmBatch]) -> Result<f64> {
    let mut total = 0.0;
    for b in batches {
        total += lm
            .loss(&b.x, &b.y)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()? as f64;
    }
    Ok(total / batches.len() as f64)
}

#[allow(clippy::too_many_arguments)]
fn train(
    name: &str,
    varmap: &VarMap,
    lm: &DecoderOnlyLm,
    tokens: &[u32],
    valid: &[LmBatch],
    batcher: &LmBatcher,
    steps: usize,
    lr: f64,
    first_step: u64,
) -> Result<Vec<(f64, f64)>> {
    let sched = ScheduleConfig {
        max_lr: lr,
        min_lr: lr / 10.0,
        warmup_steps: steps / 10,
        total_steps: steps,
        clip_norm: Some(1.0),
    };
    let mut trainer = Trainer::new(varmap, AdamWConfig::default(), sched)?;
    let mut progress = Progress::new(steps as u64, name);
    let mut curve = vec![];
    let eval_every = (steps / 6).max(1);
    for step in 0..steps {
        let b = batcher.batch(
            tokens,
            first_step + step as u64,
            lm.token_embedding.device(),
        )?;
        let s = trainer.step(&lm.loss(&b.x, &b.y)?)?;
        if (step + 1) % eval_every == 0 || step + 1 == steps {
            curve.push(((step + 1) as f64, evaluate(lm, valid)?));
        }
        progress.update(step as u64 + 1, format!("loss {:.3}", s.loss));
    }
    progress.finish();
    Ok(curve)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let quick = a.common.quick;
    let ctx = a.common.setup(
        TOPIC,
        "MHA / GQA / MQA: KV-cache size, quality, uptraining, decode speed",
    )?;
    let dev = ctx.picked.device.clone();
    let vocab = a.vocab.unwrap_or(if quick { 512 } else { 1024 });
    let steps = a.steps.unwrap_or(if quick { 25 } else { 200 });
    let d_head = a.d_model / a.heads;
    let config = serde_json::json!({"vocab": vocab, "d_model": a.d_model, "layers": a.layers, "heads": a.heads, "ctx": a.ctx, "batch": a.batch, "steps": steps, "lr": a.lr});
    let mut report = RunReport::start(
        TOPIC,
        config,
        &ctx.picked.description,
        a.common.dtype.name(),
    );

    // 1. KV-cache bytes per token.
    let shapes = [
        ("ours (f32)", a.layers, a.heads, d_head, 4),
        ("LLaMA-2-7B shape (fp16)", 32, 32, 128, 2),
        ("LLaMA-3-8B shape (fp16)", 32, 32, 128, 2),
    ];
    let mut rows = vec![];
    let (mut labels, mut kib) = (vec![], vec![]);
    for (name, layers, heads, dh, bytes) in shapes {
        let mut kvs: Vec<usize> = vec![heads];
        kvs.extend(
            [8, 4, 2, 1]
                .into_iter()
                .filter(|&k| k < heads && heads % k == 0),
        );
        for k in kvs {
            let label = match k {
                k if k == heads => "MHA".to_string(),
                1 => "MQA".to_string(),
                k => format!("GQA-{k}"),
            };
            let b = kv_cache_bytes_per_token(layers, k, dh, bytes);
            let note = if name.starts_with("LLaMA-3") && k == 8 {
                " ← LLaMA-3-8B"
            } else if name.starts_with("LLaMA-2") && k == heads {
                " ← LLaMA-2-7B"
            } else {
                ""
            };
            rows.push(vec![
                name.to_string(),
                format!("{label}{note}"),
                k.to_string(),
                format!("{b}"),
                format!("{:.2}", b as f64 * 4096.0 / (1u64 << 30) as f64),
            ]);
            report.metric(&format!("kv_bytes_per_token.{name}.{label}"), b);
            if name.starts_with("LLaMA-2") {
                labels.push(label);
                kib.push(b as f64 / 1024.0);
            }
        }
    }
    print_table(
        &[
            "shape",
            "attention",
            "K/V heads",
            "bytes/token",
            "GiB @ 4096 tokens",
        ],
        &rows,
    );
    bar_chart(
        &ctx.out_dir.join("kv_cache_bytes.png"),
        "KV cache per token, 32 layers × d_head 128, fp16",
        "KiB per token",
        &labels,
        &kib,
    )?;

    // 2. Quality at equal budget.
    let data = if quick {
        let dir = std::env::temp_dir().join("module08_tiny_wikitext");
        shared::corpus::write_tiny_wikitext(&dir)?;
        WikiText2::load_from_dir(&dir, Variant::Raw, Verify::No)?
    } else {
        WikiText2::load(a.common.data_dir.as_deref(), Variant::Raw)?
    };
    let tok = TokenizedWikiText::prepare(&data, vocab, &shared::cache_dir())?;
    let batcher = LmBatcher::new(a.batch, a.ctx, a.common.seed);
    let valid = eval_batches(&tok.valid, a.batch, a.ctx, if quick { 2 } else { 8 }, &dev)?;
    let max_seq = 512;
    let mut variants: Vec<usize> = vec![a.heads];
    variants.extend(
        [4, 2, 1]
            .into_iter()
            .filter(|&k| k < a.heads && a.heads % k == 0),
    );
    let mut results = vec![];
    let mut curves = vec![];
    let mut mha: Option<(VarMap, DecoderOnlyLm)> = None;
    for &k in &variants {
        let name = match k {
            k if k == a.heads => "MHA".to_string(),
            1 => "MQA".to_string(),
            k => format!("GQA-{k}"),
        };
        shared::params::set_seed(a.common.seed);
        let varmap = VarMap::new();
        let lm = build_lm(
            VarBuilder::from_varmap(&varmap, DType::F32, &dev),
            vocab,
            &a,
            k,
            max_seq,
        )?;
        let t = Instant::now();
        let curve = train(
            &name, &varmap, &lm, &tok.train, &valid, &batcher, steps, a.lr, 0,
        )?;
        let secs = t.elapsed().as_secs_f64();
        let final_val = curve.last().unwrap().1;
        report.metric(&format!("quality.{name}"), serde_json::json!({"n_kv_heads": k, "params": count_params(&varmap), "val_loss": final_val, "val_ppl": final_val.exp(), "train_s": secs, "curve": curve}));
        results.push((name.clone(), k, count_params(&varmap), final_val));
        curves.push(Series::new(&name, curve));
        if k == a.heads {
            mha = Some((varmap, lm));
        }
    }
    line_chart(
        &ctx.out_dir.join("quality_val_loss.png"),
        "Validation loss: MHA vs GQA vs MQA, same budget",
        "step",
        "validation loss",
        &curves,
        Axes::default(),
    )?;

    // 3. Uptraining MHA → GQA by mean-pooling K/V heads.
    let (mha_vm, mha_lm) = mha.expect("MHA trained first");
    let target_kv = if a.heads % 4 == 0 { a.heads / 4 } else { 1 };
    let up_vm = VarMap::new();
    let up_lm = build_lm(
        VarBuilder::from_varmap(&up_vm, DType::F32, &dev),
        vocab,
        &a,
        target_kv,
        max_seq,
    )?;
    let source: std::collections::HashMap<String, Tensor> = named_vars(&mha_vm)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    for (name, var) in named_vars(&up_vm) {
        let src = &source[&name];
        let value = if name.ends_with("k_proj") || name.ends_with("v_proj") {
            mean_pool_kv_heads(src, a.heads, target_kv)?
        } else {
            src.clone()
        };
        var.set(&value)?;
    }
    let mha_loss = evaluate(&mha_lm, &valid)?;
    let before = evaluate(&up_lm, &valid)?;
    let up_steps = (steps / 5).max(5);
    let up_curve = train(
        "uptrain",
        &up_vm,
        &up_lm,
        &tok.train,
        &valid,
        &batcher,
        up_steps,
        a.lr / 3.0,
        steps as u64,
    )?;
    let after = up_curve.last().unwrap().1;
    let scratch = results.iter().find(|r| r.1 == target_kv).map(|r| r.3);
    println!("   uptraining MHA → GQA-{target_kv}: MHA {mha_loss:.3}, pooled {before:.3}, after {up_steps} steps {after:.3} (GQA-{target_kv} from scratch: {})", scratch.map_or("-".into(), |s| format!("{s:.3}")));
    report.metric("uptraining", serde_json::json!({"n_kv_heads": target_kv, "mha_val_loss": mha_loss, "pooled_val_loss": before, "finetune_steps": up_steps, "after_val_loss": after, "scratch_val_loss": scratch, "curve": up_curve}));

    // 4. Decode speed: one new token with a full forward over the context.
    let contexts: Vec<usize> = if quick {
        vec![32, 128]
    } else {
        vec![32, 64, 128, 256, 512]
    };
    let mut speed_series = vec![];
    let mut speed_rows = vec![];
    for &k in &variants {
        let name = match k {
            k if k == a.heads => "MHA".to_string(),
            1 => "MQA".to_string(),
            k => format!("GQA-{k}"),
        };
        shared::params::set_seed(a.common.seed);
        let vm = VarMap::new();
        let lm = build_lm(
            VarBuilder::from_varmap(&vm, DType::F32, &dev),
            vocab,
            &a,
            k,
            max_seq,
        )?;
        let mut pts = vec![];
        for &c in &contexts {
            let ids: Vec<u32> = tok.valid[..c].to_vec();
            let x = Tensor::from_vec(ids, (1, c), &dev)?;
            let reps = if quick { 2 } else { 5 };
            lm.forward(&x, 0)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?;
            let t = Instant::now();
            for _ in 0..reps {
                lm.forward(&x, 0)?
                    .to_dtype(DType::F32)?
                    .sum_all()?
                    .to_scalar::<f32>()?;
            }
            let tps = reps as f64 / t.elapsed().as_secs_f64();
            pts.push((c as f64, tps));
            report.metric(&format!("decode_tokens_per_s.{name}.ctx{c}"), tps);
        }
        speed_rows.push(
            std::iter::once(name.clone())
                .chain(pts.iter().map(|p| format!("{:.1}", p.1)))
                .collect(),
        );
        speed_series.push(Series::new(&name, pts));
    }
    let header: Vec<String> = std::iter::once("tokens/s at ctx".to_string())
        .chain(contexts.iter().map(|c| c.to_string()))
        .collect();
    print_table(
        &header.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        &speed_rows,
    );
    line_chart(
        &ctx.out_dir.join("decode_throughput.png"),
        "Decode speed without a KV cache (full forward per token)",
        "context length",
        "new tokens / s",
        &speed_series,
        Axes {
            log_x: true,
            log_y: true,
        },
    )?;

    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(n, k, p, l)| {
            vec![
                n.clone(),
                k.to_string(),
                p.to_string(),
                format!("{l:.3}"),
                format!("{:.1}", l.exp()),
                format!("{}", kv_cache_bytes_per_token(a.layers, *k, d_head, 4)),
            ]
        })
        .collect();
    print_table(
        &[
            "attention",
            "K/V heads",
            "params",
            "val loss",
            "val ppl",
            "KV bytes/token",
        ],
        &rows,
    );
    let path = report.write(&ctx.out_dir)?;
    println!("   wrote {}", path.display());
    Ok(())
}

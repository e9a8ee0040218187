//! Experiment 8-08: rotary position embeddings.
//!
//! 1. The complex and the rotation-matrix formulations agree (and agree with f64).
//! 2. ⟨RoPE(q, m), RoPE(k, n)⟩ over a grid of (m, n): constant along diagonals (depends on m − n).
//! 3. A task that needs relative order — "output the token `shift` positions back" — learned by a
//!    small causal decoder (t0804's stack) with no positions, sinusoidal, learned, and RoPE.
//! 4. Length extrapolation: trained at length L, loss per position up to 4L; RoPE with and
//!    without position interpolation / NTK-aware scaling (applied at evaluation, no fine-tune).
//! 5. The same four schemes as small language models on WikiText-2 (BPE), same budget:
//!    validation loss, and loss per position up to twice the training context.
//!
//! `cargo run -p t0808_rope --release -- [--quick] [--device cpu|cuda]`
//! Larger (GPU) run: `-- --device cuda --d-model 256 --layers 4 --heads 8 --steps 600
//! --lm-vocab 4096 --lm-ctx 256 --lm-steps 2000 --lm-batch 32`

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use rand::{rngs::StdRng, Rng, SeedableRng};
use shared::batching::{eval_batches, LmBatcher};
use shared::cli::CommonArgs;
use shared::params::count_params;
use shared::report::{heatmap, line_chart, print_table, Axes, RunReport, Series};
use shared::tokenizer::TokenizedWikiText;
use shared::train::{cross_entropy, AdamWConfig, Progress, ScheduleConfig, Trainer};
use shared::wikitext::{Variant, Verify, WikiText2};
use std::sync::Arc;
use std::time::Instant;
use t0801_self_attention::{causal_mask, scaled_dot_product_attention};
use t0802_multi_head_attention::MultiHeadAttention;
use t0804_transformer_block::{
    build_classic_lm, Activation, BlockConfig, CausalMha, ClassicLmConfig, DecoderOnlyLm, Mixer,
    NormPlacement, PositionKind,
};
use t0808_rope::*;

const TOPIC: &str = "t0808_rope";

#[derive(Parser, Debug)]
#[command(
    about = "8-08: RoPE formulations, the relative-position property, RoPE vs other positions, length extrapolation"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Training length L (evaluation up to 4L).
    #[arg(long, default_value_t = 32)]
    train_len: usize,
    /// The task: predict the token this many positions back.
    #[arg(long, default_value_t = 3)]
    shift: usize,
    #[arg(long, default_value_t = 32)]
    vocab: usize,
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Training steps per scheme (default 120; --quick 40).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// WikiText-2 LM comparison: BPE vocabulary (default 1024; --quick: 512 on the tiny corpus).
    #[arg(long)]
    lm_vocab: Option<usize>,
    /// WikiText-2 LM comparison: training context (evaluation up to 2×).
    #[arg(long, default_value_t = 64)]
    lm_ctx: usize,
    /// WikiText-2 LM comparison: training steps per scheme (default 300; --quick 30).
    #[arg(long)]
    lm_steps: Option<usize>,
    #[arg(long, default_value_t = 16)]
    lm_batch: usize,
    /// Skip the WikiText-2 LM comparison.
    #[arg(long)]
    no_lm: bool,
}

/// Causal multi-head attention (t0802 weights) with RoPE applied to q and k.
struct RopeMha {
    mha: MultiHeadAttention,
    tables: Arc<RopeTables>,
}

impl Mixer for RopeMha {
    fn forward(&self, x: &Tensor, start_pos: usize) -> candle_core::Result<Tensor> {
        let n = x.dim(1)?;
        let q = apply_rope(
            &self.mha.split_heads(&shared::linear(x, &self.mha.w_q)?)?,
            &self.tables,
            start_pos,
        )?;
        let k = apply_rope(
            &self.mha.split_heads(&shared::linear(x, &self.mha.w_k)?)?,
            &self.tables,
            start_pos,
        )?;
        let v = self.mha.split_heads(&shared::linear(x, &self.mha.w_v)?)?;
        let att = scaled_dot_product_attention(&q, &k, &v, Some(&causal_mask(n, n, x.device())?))?;
        shared::linear(
            &MultiHeadAttention::merge_heads(&att.output)?,
            &self.mha.w_o,
        )
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Replaces every block's attention by RoPE attention over the same weights.
fn install_rope(lm: &mut DecoderOnlyLm, tables: Arc<RopeTables>) {
    for b in &mut lm.blocks {
        let mha = if let Some(c) = b.attn.as_any().downcast_ref::<CausalMha>() {
            c.mha.clone()
        } else {
            b.attn
                .as_any()
                .downcast_ref::<RopeMha>()
                .expect("a RoPE or plain MHA mixer")
                .mha
                .clone()
        };
        b.attn = Box::new(RopeMha {
            mha,
            tables: tables.clone(),
        });
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    let quick = a.common.quick;
    let ctx = a.common.setup(
        TOPIC,
        "RoPE: formulations, relative positions, task comparison, extrapolation",
    )?;
    let dev = ctx.picked.device.clone();
    let steps = a.steps.unwrap_or(if quick { 40 } else { 120 });
    let config = serde_json::json!({"train_len": a.train_len, "shift": a.shift, "vocab": a.vocab, "d_model": a.d_model, "heads": a.heads, "layers": a.layers, "steps": steps, "batch": a.batch, "lr": a.lr,
        "lm": {"vocab": a.lm_vocab.unwrap_or(if quick { 512 } else { 1024 }), "ctx": a.lm_ctx, "steps": a.lm_steps.unwrap_or(if quick { 30 } else { 300 }), "batch": a.lm_batch, "skipped": a.no_lm}, "quick": quick});
    let mut report = RunReport::start(
        TOPIC,
        config,
        &ctx.picked.description,
        a.common.dtype.name(),
    );

    // 1. The two formulations.
    let (d_head, n) = (64, 256);
    let tables = RopeTables::new(d_head, 4096, DEFAULT_BASE, RopeScaling::None, &dev)?;
    let x = Tensor::randn(0f32, 1.0, (2, 4, n, d_head), &dev)?;
    let t = Instant::now();
    let c = apply_rope(&x, &tables, 1000)?;
    let t_complex = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let m = apply_rope_matrix(&x, &tables, 1000)?;
    let t_matrix = t.elapsed().as_secs_f64();
    let diff = (&c - &m)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let xs = x
        .to_dtype(DType::F64)?
        .reshape((2 * 4 * n, d_head))?
        .to_vec2::<f64>()?;
    let cs = c.reshape((2 * 4 * n, d_head))?.to_vec2::<f32>()?;
    let mut ref_err = 0f64;
    for (row, xr) in xs.iter().enumerate() {
        let want = reference_rope(xr, (1000 + row % n) as f64, DEFAULT_BASE);
        ref_err = want
            .iter()
            .zip(&cs[row])
            .fold(ref_err, |e, (w, g)| e.max((w - *g as f64).abs()));
    }
    println!("   formulations: max |complex − matrix| = {diff:.2e}, max |complex − f64| = {ref_err:.2e}; time {:.2} ms vs {:.2} ms", t_complex * 1e3, t_matrix * 1e3);
    report.metric("formulations.max_abs_diff", diff);
    report.metric("formulations.max_abs_err_vs_f64", ref_err);
    report.metric("formulations.complex_ms", t_complex * 1e3);
    report.metric("formulations.matrix_ms", t_matrix * 1e3);

    // 2. The relative-position property.
    let mut rng = StdRng::seed_from_u64(a.common.seed);
    let q: Vec<f64> = (0..d_head).map(|_| rng.random::<f64>() - 0.5).collect();
    let k: Vec<f64> = q
        .iter()
        .map(|v| v + 0.3 * (rng.random::<f64>() - 0.5))
        .collect(); // similar to q
    let grid = 48;
    let scores: Vec<Vec<f64>> = (0..grid)
        .map(|mm| {
            (0..grid)
                .map(|nn| rope_score(&q, mm as f64, &k, nn as f64, DEFAULT_BASE))
                .collect()
        })
        .collect();
    let mut diag_dev = 0f64;
    for mm in 1..grid {
        for nn in 1..grid {
            diag_dev = diag_dev.max((scores[mm][nn] - scores[mm - 1][nn - 1]).abs());
        }
    }
    heatmap(
        &ctx.out_dir.join("relative_scores.png"),
        "⟨RoPE(q, m), RoPE(k, n)⟩ — constant along diagonals",
        "key position n",
        "query position m",
        &scores,
        None,
    )?;
    let by_offset: Vec<(f64, f64)> = (0..512)
        .map(|o| (o as f64, rope_score(&q, o as f64, &k, 0.0, DEFAULT_BASE)))
        .collect();
    line_chart(
        &ctx.out_dir.join("score_vs_offset.png"),
        "RoPE score of a similar pair (q ≈ k) vs distance",
        "m − n",
        "⟨RoPE(q, m), RoPE(k, n)⟩",
        &[Series::new("d_head 64, base 10 000", by_offset)],
        Axes::default(),
    )?;
    println!("   relative property: largest change along a diagonal of the {grid}×{grid} grid = {diag_dev:.2e}");
    report.metric("relative.max_diagonal_deviation", diag_dev);

    // 3. + 4. The synthetic task.
    let eval_len = 4 * a.train_len;
    let schemes = ["none", "sinusoidal", "learned", "RoPE"];
    let mut rows = vec![];
    let mut extrap = vec![];
    for scheme in schemes {
        shared::params::set_seed(a.common.seed);
        let (varmap, mut lm) = build_lm(scheme, a.vocab, eval_len, &a, &dev)?;
        let d_head = a.d_model / a.heads;
        let sched = ScheduleConfig {
            max_lr: a.lr,
            min_lr: a.lr / 10.0,
            warmup_steps: steps / 10,
            total_steps: steps,
            clip_norm: Some(1.0),
        };
        let mut trainer = Trainer::new(
            &varmap,
            AdamWConfig {
                weight_decay: 0.0,
                ..Default::default()
            },
            sched,
        )?;
        let mut progress = Progress::new(steps as u64, scheme);
        for step in 0..steps {
            let (x, y, mask) = task_batch(&mut rng, a.batch, a.train_len, a.vocab, a.shift, &dev)?;
            let stats = trainer.step(&cross_entropy(&lm.forward(&x, 0)?, &y, Some(&mask))?)?;
            progress.update(step as u64 + 1, format!("loss {:.3}", stats.loss));
        }
        progress.finish();
        let mut eval_rng = StdRng::seed_from_u64(999);
        let (x, y, mask) = task_batch(&mut eval_rng, 64, eval_len, a.vocab, a.shift, &dev)?;
        let variants: Vec<(String, Option<RopeScaling>)> = if scheme == "RoPE" {
            vec![
                ("RoPE".into(), Some(RopeScaling::None)),
                (
                    "RoPE + PI ×4".into(),
                    Some(RopeScaling::PositionInterpolation { factor: 4.0 }),
                ),
                (
                    "RoPE + NTK ×4".into(),
                    Some(RopeScaling::NtkAware { factor: 4.0 }),
                ),
            ]
        } else {
            vec![(scheme.to_string(), None)]
        };
        for (name, scaling) in variants {
            if let Some(s) = scaling {
                install_rope(
                    &mut lm,
                    Arc::new(RopeTables::new(d_head, eval_len, DEFAULT_BASE, s, &dev)?),
                );
            }
            let (per_pos, acc_in, acc_out) = per_position(&lm, &x, &y, &mask, a.train_len)?;
            let mean_in =
                per_pos[a.shift..a.train_len].iter().sum::<f64>() / (a.train_len - a.shift) as f64;
            let mean_out =
                per_pos[a.train_len..].iter().sum::<f64>() / (eval_len - a.train_len) as f64;
            rows.push(vec![
                name.clone(),
                format!("{mean_in:.3}"),
                format!("{:.1}%", 100.0 * acc_in),
                format!("{mean_out:.3}"),
                format!("{:.1}%", 100.0 * acc_out),
            ]);
            report.metric(&format!("task.{name}"), serde_json::json!({"loss_within_L": mean_in, "acc_within_L": acc_in, "loss_beyond_L": mean_out, "acc_beyond_L": acc_out}));
            extrap.push(Series::new(
                &name,
                per_pos
                    .iter()
                    .enumerate()
                    .skip(a.shift)
                    .map(|(i, l)| (i as f64, *l))
                    .collect(),
            ));
        }
    }
    print_table(
        &[
            "positions",
            &format!("loss ≤ L={}", a.train_len),
            "accuracy ≤ L",
            &format!("loss L..{eval_len}"),
            "accuracy beyond L",
        ],
        &rows,
    );
    line_chart(
        &ctx.out_dir.join("extrapolation.png"),
        &format!("Loss per position, trained at L = {}", a.train_len),
        "position",
        "cross-entropy (nats)",
        &extrap,
        Axes::default(),
    )?;

    // 5. WikiText-2.
    if !a.no_lm {
        wikitext_comparison(&a, &dev, &mut report, &ctx.out_dir)?;
    }
    let path = report.write(&ctx.out_dir)?;
    println!("   wrote {}", path.display());
    Ok(())
}

/// A small pre-norm causal decoder (t0804's stack, GELU FFN, no biases) with position scheme
/// `scheme`: "none", "sinusoidal" or "learned" (added to the embeddings), or "RoPE" (in attention).
fn build_lm(
    scheme: &str,
    vocab: usize,
    max_seq: usize,
    a: &Args,
    dev: &Device,
) -> Result<(VarMap, DecoderOnlyLm)> {
    let varmap = VarMap::new();
    let cfg = ClassicLmConfig {
        vocab_size: vocab,
        max_seq_len: max_seq,
        n_layers: a.layers,
        block: BlockConfig {
            d_model: a.d_model,
            n_heads: a.heads,
            d_ff: 2 * a.d_model,
            activation: Activation::Gelu,
            placement: NormPlacement::Pre,
            bias: false,
            eps: 1e-5,
        },
        positions: match scheme {
            "sinusoidal" => PositionKind::Sinusoidal,
            "learned" => PositionKind::Learned,
            _ => PositionKind::None,
        },
    };
    let mut lm = build_classic_lm(VarBuilder::from_varmap(&varmap, DType::F32, dev), &cfg)?;
    if scheme == "RoPE" {
        let tables = RopeTables::new(
            a.d_model / a.heads,
            max_seq,
            DEFAULT_BASE,
            RopeScaling::None,
            dev,
        )?;
        install_rope(&mut lm, Arc::new(tables));
    }
    Ok((varmap, lm))
}

/// Part 5: the four position schemes as language models on WikiText-2 (BPE), same budget; validation
/// loss within the training context and per position up to twice that context.
fn wikitext_comparison(
    a: &Args,
    dev: &Device,
    report: &mut RunReport,
    out_dir: &std::path::Path,
) -> Result<()> {
    let quick = a.common.quick;
    let vocab = a.lm_vocab.unwrap_or(if quick { 512 } else { 1024 });
    let steps = a.lm_steps.unwrap_or(if quick { 30 } else { 300 });
    let ctx = a.lm_ctx;
    let data = if quick {
        let dir = std::env::temp_dir().join("module08_tiny_wikitext");
        shared::corpus::write_tiny_wikitext(&dir)?;
        WikiText2::load_from_dir(&dir, Variant::Raw, Verify::No)?
    } else {
        WikiText2::load(a.common.data_dir.as_deref(), Variant::Raw)?
    };
    let tok = TokenizedWikiText::prepare(&data, vocab, &shared::cache_dir())?;
    println!("   WikiText-2{}: BPE vocab {vocab}, train {} / valid {} tokens; {steps} steps of {} × {ctx} tokens per scheme", if quick { " (tiny stand-in)" } else { "" }, tok.train.len(), tok.valid.len(), a.lm_batch);
    let batcher = LmBatcher::new(a.lm_batch, ctx, a.common.seed);
    let valid = eval_batches(&tok.valid, a.lm_batch, ctx, if quick { 2 } else { 8 }, dev)?;
    let long = eval_batches(
        &tok.valid,
        a.lm_batch,
        2 * ctx,
        if quick { 2 } else { 24 },
        dev,
    )?;
    let eval = |lm: &DecoderOnlyLm| -> Result<f64> {
        let mut total = 0.0;
        for b in &valid {
            total += lm.loss(&b.x, &b.y)?.to_scalar::<f32>()? as f64;
        }
        Ok(total / valid.len() as f64)
    };
    let (mut curves, mut per_pos_series, mut rows) = (vec![], vec![], vec![]);
    for scheme in ["none", "sinusoidal", "learned", "RoPE"] {
        shared::params::set_seed(a.common.seed);
        let (varmap, lm) = build_lm(scheme, vocab, 2 * ctx, a, dev)?;
        let sched = ScheduleConfig {
            max_lr: a.lr,
            min_lr: a.lr / 10.0,
            warmup_steps: steps / 10,
            total_steps: steps,
            clip_norm: Some(1.0),
        };
        let mut trainer = Trainer::new(&varmap, AdamWConfig::default(), sched)?;
        let mut progress = Progress::new(steps as u64, &format!("WikiText-2 {scheme}"));
        let mut curve = vec![];
        let eval_every = (steps / 6).max(1);
        let t = Instant::now();
        for step in 0..steps {
            let b = batcher.batch(&tok.train, step as u64, dev)?;
            let stats = trainer.step(&lm.loss(&b.x, &b.y)?)?;
            if (step + 1) % eval_every == 0 || step + 1 == steps {
                curve.push(((step + 1) as f64, eval(&lm)?));
            }
            progress.update(step as u64 + 1, format!("loss {:.3}", stats.loss));
        }
        progress.finish();
        let secs = t.elapsed().as_secs_f64();
        let val = curve.last().map_or(f64::NAN, |p| p.1);
        // Loss per position on windows of 2·ctx (positions ≥ ctx were never trained).
        let mut per_pos = vec![0f64; 2 * ctx];
        for b in &long {
            let mask = Tensor::ones(b.y.dims2()?, DType::U8, dev)?;
            let (p, _, _) = per_position(&lm, &b.x, &b.y, &mask, ctx)?;
            for (acc, v) in per_pos.iter_mut().zip(p) {
                *acc += v / long.len() as f64;
            }
        }
        let within = per_pos[..ctx].iter().sum::<f64>() / ctx as f64;
        let beyond = per_pos[ctx..].iter().sum::<f64>() / ctx as f64;
        rows.push(vec![
            scheme.to_string(),
            count_params(&varmap).to_string(),
            format!("{val:.3}"),
            format!("{:.1}", val.exp()),
            format!("{within:.3}"),
            format!("{beyond:.3}"),
            format!("{secs:.1}"),
        ]);
        report.metric(&format!("wikitext.{scheme}"), serde_json::json!({"params": count_params(&varmap), "val_loss": val, "val_ppl": val.exp(), "loss_within_ctx": within, "loss_ctx_to_2ctx": beyond, "train_s": secs, "curve": curve}));
        curves.push(Series::new(scheme, curve));
        per_pos_series.push(Series::new(scheme, bucket_means(&per_pos, 8)));
    }
    print_table(
        &[
            "positions",
            "params",
            "val loss",
            "val ppl",
            &format!("loss pos < {ctx}"),
            &format!("loss pos {ctx}..{}", 2 * ctx),
            "train s",
        ],
        &rows,
    );
    line_chart(
        &out_dir.join("wikitext_val_loss.png"),
        &format!(
            "WikiText-2 validation loss, {steps} steps × {} × {ctx} tokens",
            a.lm_batch
        ),
        "step",
        "validation loss (nats/token)",
        &curves,
        Axes::default(),
    )?;
    line_chart(
        &out_dir.join("wikitext_loss_by_position.png"),
        &format!("WikiText-2 loss per position, trained at context {ctx}"),
        "position",
        "cross-entropy (nats, mean over 8 positions)",
        &per_pos_series,
        Axes::default(),
    )?;
    Ok(())
}

/// Means of consecutive buckets of `k` positions, as `(first position of the bucket, mean)`.
fn bucket_means(v: &[f64], k: usize) -> Vec<(f64, f64)> {
    v.chunks(k)
        .enumerate()
        .map(|(i, c)| ((i * k) as f64, c.iter().sum::<f64>() / c.len() as f64))
        .collect()
}

/// Random tokens; the target at `t` is the token at `t − shift` (positions `< shift` masked).
fn task_batch(
    rng: &mut StdRng,
    b: usize,
    len: usize,
    vocab: usize,
    shift: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let mut xs = vec![0u32; b * len];
    for v in xs.iter_mut() {
        *v = rng.random_range(0..vocab as u32);
    }
    let mut ys = vec![0u32; b * len];
    let mut ms = vec![0u8; b * len];
    for r in 0..b {
        for t in shift..len {
            ys[r * len + t] = xs[r * len + t - shift];
            ms[r * len + t] = 1;
        }
    }
    Ok((
        Tensor::from_vec(xs, (b, len), dev)?,
        Tensor::from_vec(ys, (b, len), dev)?,
        Tensor::from_vec(ms, (b, len), dev)?,
    ))
}

/// Mean loss at every position, and accuracy within / beyond the training length.
fn per_position(
    lm: &DecoderOnlyLm,
    x: &Tensor,
    y: &Tensor,
    mask: &Tensor,
    train_len: usize,
) -> Result<(Vec<f64>, f64, f64)> {
    let logits = lm.forward(x, 0)?.to_dtype(DType::F32)?.to_vec3::<f32>()?;
    let ys = y.to_vec2::<u32>()?;
    let ms = mask.to_vec2::<u8>()?;
    let (b, len) = (ys.len(), ys[0].len());
    let mut loss = vec![0f64; len];
    let (mut hit_in, mut n_in, mut hit_out, mut n_out) = (0, 0, 0, 0);
    for r in 0..b {
        for t in 0..len {
            if ms[r][t] == 0 {
                continue;
            }
            let z = &logits[r][t];
            let max = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + z.iter().map(|v| (*v as f64 - max).exp()).sum::<f64>().ln();
            loss[t] += (lse - z[ys[r][t] as usize] as f64) / b as f64;
            let argmax = z
                .iter()
                .enumerate()
                .max_by(|p, q| p.1.total_cmp(q.1))
                .unwrap()
                .0;
            let hit = usize::from(argmax == ys[r][t] as usize);
            if t < train_len {
                hit_in += hit;
                n_in += 1;
            } else {
                hit_out += hit;
                n_out += 1;
            }
        }
    }
    Ok((
        loss,
        hit_in as f64 / n_in.max(1) as f64,
        hit_out as f64 / n_out.max(1) as f64,
    ))
}

//! # 8-02 experiment: heads that learn different relations
//!
//! The task needs two relations at once. A sequence `BOS t₁ … t_T` of random tokens; at every
//! position `p ≥ 2` the model must output the pair
//!
//! ```text
//! y_p = ( t_{p−1} ,  [t_p occurred at an earlier position] )      encoded as t_{p−1} + V·seen_p
//! ```
//!
//! The first part is a **positional** relation (look one step back, whatever the token); the
//! second a **content** relation (look for an equal token, wherever it is). One attention head
//! produces one weighting of the sequence, so a single head has to blend both; two heads can
//! each take one. The model is as small as possible: a token-embedding table and a learned
//! position table (raw parameters), one multi-head attention layer with a residual, and a linear
//! readout. The attention mask is causal *and strict* (`j < p`, plus the BOS at position 0 as a
//! "nothing found" sink): with `j ≤ p` every token would trivially match itself.
//!
//! We train it with 1, 2 and 4 heads at the same width `d_model`, then
//! * show each head's attention map on one sequence and score its role (previous-token weight,
//!   mass on earlier equal tokens);
//! * compare parameter counts with a single head of the same total width;
//! * prune each head in turn (`head_gate`) and measure the loss increase.
//!
//! `cargo run -p t0802_multi_head_attention -- [--quick] [--device cpu|cuda] [--heads 1,2,4]`

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use serde_json::json;
use shared::cli::CommonArgs;
use shared::params::{count_params, normal, weight, zeros};
use shared::report::{bar_chart, heatmap, line_chart, print_table, Axes, RunReport, Series};
use shared::train::{cross_entropy, AdamWConfig, Progress, ScheduleConfig, Trainer};
use t0802_multi_head_attention::{MhaConfig, MultiHeadAttention};

const TOPIC: &str = "t0802_multi_head_attention";

#[derive(Parser, Debug)]
#[command(
    about = "8-02: train 1/2/4-head attention on a task that needs two relations; head maps, parameter counts, head pruning"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Head counts to train (same d_model for all).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    heads: Vec<usize>,
    /// Number of ordinary tokens V (the readout has 2V classes).
    #[arg(long, default_value_t = 16)]
    vocab: usize,
    /// Tokens per sequence T (the BOS makes T + 1 positions).
    #[arg(long, default_value_t = 16)]
    seq_len: usize,
    #[arg(long, default_value_t = 32)]
    d_model: usize,
    /// Training steps per model (default 1200; --quick: 150).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value_t = 1e-2)]
    lr: f64,
    /// CPU threads for Candle's matmuls (0: Candle's default). The matrices here are tiny
    /// (17×8 per head): splitting them over threads costs more than it saves, so 1 is default.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// The synthetic task.
#[derive(Debug, Clone, Copy)]
struct Task {
    vocab: usize,
    seq_len: usize,
}

impl Task {
    fn bos(&self) -> usize {
        self.vocab
    }
    /// Positions including the BOS.
    fn len(&self) -> usize {
        self.seq_len + 1
    }
    /// Target of position `p ≥ 2` of `tokens` (BOS at 0): `t_{p−1} + V·[t_p ∈ t_{1..p−1}]`.
    fn target(&self, tokens: &[usize], p: usize) -> usize {
        let seen = tokens[1..p].contains(&tokens[p]);
        tokens[p - 1] + self.vocab * usize::from(seen)
    }
}

/// A batch: tokens `(b, T+1)` u32, targets `(b, T+1)` u32, loss mask `(b, T+1)` u8 (positions ≥ 2).
struct Batch {
    tokens: Tensor,
    targets: Tensor,
    loss_mask: Tensor,
    raw: Vec<Vec<usize>>,
}

/// SplitMix64: a tiny deterministic generator for the token draws.
struct SplitMix(u64);
impl SplitMix {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

fn make_batch(task: Task, b: usize, rng: &mut SplitMix, dev: &Device) -> Result<Batch> {
    let l = task.len();
    let raw: Vec<Vec<usize>> = (0..b)
        .map(|_| {
            std::iter::once(task.bos())
                .chain((0..task.seq_len).map(|_| rng.below(task.vocab)))
                .collect()
        })
        .collect();
    let mut targets = Vec::with_capacity(b * l);
    let mut mask = Vec::with_capacity(b * l);
    for seq in &raw {
        for p in 0..l {
            targets.push(if p >= 2 {
                task.target(seq, p) as u32
            } else {
                0
            });
            mask.push(u8::from(p >= 2));
        }
    }
    let tokens: Vec<u32> = raw.iter().flatten().map(|&t| t as u32).collect();
    Ok(Batch {
        tokens: Tensor::from_vec(tokens, (b, l), dev)?,
        targets: Tensor::from_vec(targets, (b, l), dev)?,
        loss_mask: Tensor::from_vec(mask, (b, l), dev)?,
        raw,
    })
}

/// Strictly causal attention with a BOS sink: query `i` may attend key `j` iff `j < i` or `j = 0`.
fn strict_causal_with_sink(l: usize, dev: &Device) -> Result<Tensor> {
    let data: Vec<u8> = (0..l)
        .flat_map(|i| (0..l).map(move |j| u8::from(j < i || j == 0)))
        .collect();
    Ok(Tensor::from_vec(data, (l, l), dev)?)
}

/// Embeddings (raw tables) → one multi-head attention layer with a residual → linear readout.
///
/// Parameter names: `tok_emb (V+1, d)`, `pos_emb (T+1, d)`, `attn.{q,k,v,output}_proj`,
/// `readout (2V, d)`, `readout_bias (2V)`.
struct Model {
    tok_emb: Tensor,
    pos_emb: Tensor,
    attn: MultiHeadAttention,
    readout: Tensor,
    readout_bias: Tensor,
}

impl Model {
    fn new(vb: VarBuilder, task: Task, d_model: usize, n_heads: usize) -> Result<Self> {
        Ok(Self {
            tok_emb: normal(&vb, (task.vocab + 1, d_model), "tok_emb", 1.0)?,
            pos_emb: normal(&vb, (task.len(), d_model), "pos_emb", 1.0)?,
            attn: MultiHeadAttention::new(vb.pp("attn"), MhaConfig::new(d_model, n_heads))?,
            readout: weight(&vb, 2 * task.vocab, d_model, "readout")?,
            readout_bias: zeros(&vb, 2 * task.vocab, "readout_bias")?,
        })
    }

    /// `tokens (b, l)` → logits `(b, l, 2V)` and attention weights `(b, heads, l, l)`.
    fn forward(
        &self,
        tokens: &Tensor,
        mask: &Tensor,
        head_gate: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (_, l) = tokens.dims2()?;
        let tok = shared::embedding(&self.tok_emb, tokens)?; // (b, l, d)
        let x = tok.broadcast_add(&self.pos_emb.narrow(0, 0, l)?)?; // (b, l, d)
        let att = self.attn.forward_cross(&x, &x, Some(mask), head_gate)?;
        let h = (x + att.output)?; // residual
        Ok((
            shared::linear_with_bias(&h, &self.readout, &self.readout_bias)?,
            att.weights,
        ))
    }
}

/// Loss and the accuracy of each half of the target on a fixed evaluation set.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Eval {
    loss: f64,
    /// Both parts right.
    accuracy: f64,
    /// `t_{p−1}` right (the previous-token relation).
    prev_accuracy: f64,
    /// The seen-before bit right (the equal-token relation).
    seen_accuracy: f64,
}

fn evaluate(
    model: &Model,
    eval: &[Batch],
    mask: &Tensor,
    gate: Option<&Tensor>,
    vocab: usize,
) -> Result<Eval> {
    let (mut loss, mut n, mut both, mut prev, mut seen) = (0.0, 0usize, 0usize, 0usize, 0usize);
    for batch in eval {
        let (logits, _) = model.forward(&batch.tokens, mask, gate)?;
        loss += cross_entropy(&logits, &batch.targets, Some(&batch.loss_mask))?
            .to_scalar::<f32>()? as f64;
        let pred = logits.argmax(candle_core::D::Minus1)?.to_vec2::<u32>()?;
        let tgt = batch.targets.to_vec2::<u32>()?;
        for (pr, tr) in pred.iter().zip(&tgt) {
            for p in 2..pr.len() {
                let (a, b) = (pr[p] as usize, tr[p] as usize);
                both += usize::from(a == b);
                prev += usize::from(a % vocab == b % vocab);
                seen += usize::from(a / vocab == b / vocab);
                n += 1;
            }
        }
    }
    let n = n as f64;
    Ok(Eval {
        loss: loss / eval.len() as f64,
        accuracy: both as f64 / n,
        prev_accuracy: prev as f64 / n,
        seen_accuracy: seen as f64 / n,
    })
}

/// What a head does, measured on the evaluation set: mean weight on the previous position, and
/// mean mass on earlier equal tokens (over queries that have one) and on the BOS (over those that
/// do not).
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct HeadRole {
    prev_weight: f64,
    equal_token_mass: f64,
    bos_mass_when_unseen: f64,
}

fn head_roles(model: &Model, eval: &[Batch], mask: &Tensor) -> Result<Vec<HeadRole>> {
    let h = model.attn.cfg.n_heads;
    let mut sums = vec![[0.0f64; 3]; h];
    let mut counts = [0usize; 3];
    for batch in eval {
        let (_, w) = model.forward(&batch.tokens, mask, None)?;
        let (b, hh, l, _) = w.dims4()?;
        let w = w
            .to_dtype(DType::F32)?
            .reshape((b * hh, l, l))?
            .to_vec3::<f32>()?; // row b·h + head
        for (bi, seq) in batch.raw.iter().enumerate() {
            for p in 2..l {
                let earlier: Vec<usize> = (1..p).filter(|&j| seq[j] == seq[p]).collect();
                counts[0] += 1;
                counts[if earlier.is_empty() { 2 } else { 1 }] += 1;
                for (hi, s) in sums.iter_mut().enumerate() {
                    let row = &w[bi * h + hi][p];
                    s[0] += row[p - 1] as f64;
                    if earlier.is_empty() {
                        s[2] += row[0] as f64;
                    } else {
                        s[1] += earlier.iter().map(|&j| row[j] as f64).sum::<f64>();
                    }
                }
            }
        }
    }
    Ok(sums
        .iter()
        .map(|s| HeadRole {
            prev_weight: s[0] / counts[0] as f64,
            equal_token_mass: s[1] / counts[1].max(1) as f64,
            bos_mass_when_unseen: s[2] / counts[2].max(1) as f64,
        })
        .collect())
}

struct Trained {
    n_heads: usize,
    model: Model,
    n_params: usize,
    curve: Vec<(f64, f64)>,
    final_eval: Eval,
    seconds: f64,
}

#[allow(clippy::too_many_arguments)]
fn train(
    task: Task,
    args: &Args,
    n_heads: usize,
    steps: usize,
    dev: &Device,
    dtype: DType,
    eval: &[Batch],
    mask: &Tensor,
) -> Result<Trained> {
    let varmap = VarMap::new();
    let model = Model::new(
        VarBuilder::from_varmap(&varmap, dtype, dev),
        task,
        args.d_model,
        n_heads,
    )?;
    let n_params = count_params(&varmap);
    let schedule = ScheduleConfig {
        max_lr: args.lr,
        min_lr: args.lr / 20.0,
        warmup_steps: steps / 20,
        total_steps: steps,
        clip_norm: Some(1.0),
    };
    let mut trainer = Trainer::new(
        &varmap,
        AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        },
        schedule,
    )?;
    let mut rng = SplitMix(args.common.seed.wrapping_mul(1000 + n_heads as u64));
    let mut progress = Progress::new(steps as u64, &format!("{n_heads} head(s)"));
    let mut curve = Vec::new();
    let started = std::time::Instant::now();
    let mut smoothed = f64::NAN;
    for step in 0..steps {
        let batch = make_batch(task, args.batch, &mut rng, dev)?;
        let (logits, _) = model.forward(&batch.tokens, mask, None)?;
        let stats = trainer.step(&cross_entropy(
            &logits,
            &batch.targets,
            Some(&batch.loss_mask),
        )?)?;
        smoothed = if smoothed.is_nan() {
            stats.loss
        } else {
            0.95 * smoothed + 0.05 * stats.loss
        };
        if step % 10 == 0 || step + 1 == steps {
            curve.push((step as f64 + 1.0, smoothed));
            progress.update(
                step as u64 + 1,
                format!("loss {smoothed:.3} · lr {:.1e}", stats.lr),
            );
        }
    }
    progress.finish();
    let seconds = started.elapsed().as_secs_f64();
    let final_eval = evaluate(&model, eval, mask, None, task.vocab)?;
    println!(
        "   {n_heads} head(s): eval loss {}, accuracy {:.3} (previous token {:.3}, seen-before {:.3}) in {seconds:.1} s",
        fmt_loss(final_eval.loss),
        final_eval.accuracy,
        final_eval.prev_accuracy, final_eval.seen_accuracy
    );
    Ok(Trained {
        n_heads,
        model,
        n_params,
        curve,
        final_eval,
        seconds,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.threads > 0 {
        // Read by Candle's CPU matmul at every call; set before any tensor work.
        std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    }
    let ctx = args.common.setup(
        TOPIC,
        "multi-head attention on a task needing two relations",
    )?;
    let dev = ctx.picked.device.clone();
    for &h in &args.heads {
        MhaConfig::new(args.d_model, h).d_head()?; // fail early with the clear message
    }
    if args.heads.is_empty() {
        bail!("--heads must name at least one head count");
    }
    let task = Task {
        vocab: args.vocab,
        seq_len: args.seq_len,
    };
    let steps = args
        .steps
        .unwrap_or(if args.common.quick { 150 } else { 1200 });
    let config = json!({
        "heads": args.heads, "vocab": args.vocab, "seq_len": args.seq_len, "d_model": args.d_model,
        "steps": steps, "batch": args.batch, "lr": args.lr, "threads": args.threads, "seed": args.common.seed, "quick": args.common.quick,
        "task": "y_p = t_{p-1} + V * [t_p occurred earlier]; strict causal mask with BOS sink",
    });
    let mut report = RunReport::start(
        TOPIC,
        config,
        &ctx.picked.description,
        args.common.dtype.name(),
    );
    let mask = strict_causal_with_sink(task.len(), &dev)?;
    let mut eval_rng = SplitMix(args.common.seed ^ 0xE7A1);
    let eval: Vec<Batch> = (0..if args.common.quick { 8 } else { 32 })
        .map(|_| make_batch(task, 64, &mut eval_rng, &dev))
        .collect::<Result<_>>()?;
    let seen_rate = {
        let (mut s, mut n) = (0usize, 0usize);
        for b in &eval {
            for seq in &b.raw {
                for p in 2..seq.len() {
                    s += task.target(seq, p) / task.vocab;
                    n += 1;
                }
            }
        }
        s as f64 / n as f64
    };
    let h_seen = -(seen_rate * seen_rate.ln() + (1.0 - seen_rate) * (1.0 - seen_rate).ln());
    println!(
        "   task: V = {}, T = {}, {} eval sequences; seen-before rate {seen_rate:.3}; chance loss ln(2V) = {:.3}, \
         loss knowing only the seen bit = ln V = {:.3}, knowing only the previous token = H(seen) = {h_seen:.3}",
        task.vocab,
        task.seq_len,
        eval.len() * 64,
        (2.0 * task.vocab as f64).ln(),
        (task.vocab as f64).ln()
    );
    report.metric(
        "task",
        json!({"seen_rate": seen_rate, "chance_loss": (2.0 * task.vocab as f64).ln(), "loss_without_prev_token": (task.vocab as f64).ln(),
            "loss_without_seen_bit": h_seen, "eval_sequences": eval.len() * 64}),
    );

    // ---- parameter counts: heads split the width, they do not add parameters
    let d = args.d_model;
    let mut param_rows = Vec::new();
    let mut param_json = Vec::new();
    for &h in &args.heads {
        let vm = VarMap::new();
        MultiHeadAttention::new(
            VarBuilder::from_varmap(&vm, DType::F32, &dev),
            MhaConfig::new(d, h),
        )?;
        let measured = count_params(&vm);
        let single_same_width = 4 * d * d; // W_q, W_k, W_v (d, d) and W_o (d, d)
        let full_width_heads = h * 3 * d * d + d * h * d; // h heads of width d each, W_o (d, h·d)
        param_rows.push(vec![
            h.to_string(),
            (d / h).to_string(),
            measured.to_string(),
            single_same_width.to_string(),
            full_width_heads.to_string(),
        ]);
        param_json.push(json!({"n_heads": h, "d_head": d / h, "mha_params": measured, "single_head_same_total_width": single_same_width,
            "h_heads_each_full_width": full_width_heads}));
    }
    println!("\n-- parameter count of the attention layer (d_model = {d})");
    print_table(
        &[
            "heads",
            "d_head",
            "multi-head (measured)",
            "one head of width d_model",
            "h heads of full width",
        ],
        &param_rows,
    );
    report.metric("attention_params", param_json);

    // ---- training
    println!(
        "\n-- training ({steps} steps of {} sequences each)",
        args.batch
    );
    let mut trained = Vec::new();
    for &h in &args.heads {
        trained.push(train(task, &args, h, steps, &dev, ctx.dtype, &eval, &mask)?);
    }
    line_chart(
        &ctx.out_dir.join("t0802_training.png"),
        "Training loss (smoothed) by number of heads, same d_model",
        "step",
        "cross-entropy (nats, EMA 0.95)",
        &trained
            .iter()
            .map(|t| {
                Series::new(
                    format!("{} head(s) (d_head = {})", t.n_heads, d / t.n_heads),
                    t.curve.clone(),
                )
            })
            .collect::<Vec<_>>(),
        Axes {
            log_x: false,
            log_y: false,
        },
    )?;

    // ---- per-head roles, maps and pruning
    let mut summary = Vec::new();
    let mut bar_labels = Vec::new();
    let mut bar_values = Vec::new();
    let mut models_json = Vec::new();
    let example = make_batch(task, 1, &mut SplitMix(args.common.seed ^ 0xF00D), &dev)?;
    let names: Vec<String> = example.raw[0]
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            if i == 0 {
                "0:BOS".into()
            } else {
                format!("{i}:{}", token_name(t))
            }
        })
        .collect();
    println!("   example sequence: {}", names.join(" "));
    for t in &trained {
        let roles = head_roles(&t.model, &eval, &mask)?;
        let (_, w) = t.model.forward(&example.tokens, &mask, None)?;
        let mut pruning = Vec::new();
        println!(
            "\n-- {} head(s): what each head does, and the cost of pruning it",
            t.n_heads
        );
        let mut rows = Vec::new();
        for (hi, role) in roles.iter().enumerate() {
            let gate = Tensor::from_vec(
                (0..t.n_heads)
                    .map(|i| if i == hi { 0f32 } else { 1.0 })
                    .collect::<Vec<_>>(),
                t.n_heads,
                &dev,
            )?;
            let ablated = evaluate(&t.model, &eval, &mask, Some(&gate), task.vocab)?;
            let increase = ablated.loss - t.final_eval.loss;
            rows.push(vec![
                hi.to_string(),
                format!("{:.3}", role.prev_weight),
                format!("{:.3}", role.equal_token_mass),
                format!("{:.3}", role.bos_mass_when_unseen),
                format!("{:+.3}", increase),
                format!("{:.3}", ablated.prev_accuracy),
                format!("{:.3}", ablated.seen_accuracy),
            ]);
            pruning.push(
                json!({"head": hi, "role": role, "ablated": ablated, "loss_increase": increase}),
            );
            if t.n_heads > 1 {
                bar_labels.push(format!("{}h: head {hi}", t.n_heads));
                bar_values.push(increase);
            }
            let map = w.get(0)?.get(hi)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
            heatmap(
                &ctx.out_dir
                    .join(format!("t0802_heads{}_head{hi}.png", t.n_heads)),
                &format!(
                    "{} head(s): head {hi} (prev-token weight {:.2}, equal-token mass {:.2})",
                    t.n_heads, role.prev_weight, role.equal_token_mass
                ),
                "key position : token",
                "query position : token",
                &map,
                Some((&names, &names)),
            )?;
        }
        print_table(
            &[
                "head",
                "weight on p−1",
                "mass on earlier equal tokens",
                "BOS mass (unseen)",
                "Δloss pruned",
                "prev acc pruned",
                "seen acc pruned",
            ],
            &rows,
        );
        summary.push(vec![
            t.n_heads.to_string(),
            t.n_params.to_string(),
            fmt_loss(t.final_eval.loss),
            format!("{:.3}", t.final_eval.accuracy),
            format!("{:.3}", t.final_eval.prev_accuracy),
            format!("{:.3}", t.final_eval.seen_accuracy),
            format!("{:.1}", t.seconds),
        ]);
        models_json.push(json!({"n_heads": t.n_heads, "d_head": d / t.n_heads, "model_params": t.n_params, "eval": t.final_eval,
            "train_seconds": t.seconds, "heads": pruning, "train_curve": t.curve}));
    }
    if !bar_values.is_empty() {
        bar_chart(
            &ctx.out_dir.join("t0802_pruning.png"),
            "Head pruning: eval-loss increase when one head is gated off",
            "Δ loss (nats)",
            &bar_labels,
            &bar_values,
        )?;
    }
    report.metric("models", models_json);

    println!("\n== summary ({})", ctx.picked.description);
    print_table(
        &[
            "heads",
            "model params",
            "eval loss",
            "accuracy",
            "prev-token acc",
            "seen-before acc",
            "train s",
        ],
        &summary,
    );
    let path = report.write(&ctx.out_dir)?;
    println!("results: {}", path.display());
    Ok(())
}

/// Tokens shown as letters A, B, … (then numbers past Z).
fn token_name(t: usize) -> String {
    if t < 26 {
        ((b'A' + t as u8) as char).to_string()
    } else {
        t.to_string()
    }
}

/// A loss with 4 decimals, or in scientific notation once it is that small.
fn fmt_loss(x: f64) -> String {
    if x.abs() < 1e-3 {
        format!("{x:.2e}")
    } else {
        format!("{x:.4}")
    }
}

//! Experiment 8-03: what position information buys attention, and where each scheme breaks.
//!
//! 1. The sinusoidal matrix, its waves, and the dot-product similarity between positions.
//! 2. A task that needs order — "output the token `shift` positions back" — learned by a small
//!    attention model (embeddings + 2 layers of t0802 multi-head attention + readout, no causal
//!    mask) with no positions, sinusoidal, learned and relative-bias positions. Without positions
//!    the model is exactly permutation-equivariant (measured) and cannot do better than guessing.
//! 3. Length generalisation: trained at length L, evaluated at L, 2L and 4L. The learned table
//!    has 2L rows: at 2L it runs on untrained rows, at 4L it refuses with a clear error.
//!
//! `cargo run -p t0803_positional_encoding -- [--quick] [--device cpu|cuda]`

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use shared::cli::CommonArgs;
use shared::params::{count_params, truncated_normal, weight};
use shared::report::{heatmap, line_chart, print_table, Axes, RunReport, Series};
use shared::train::{cross_entropy, AdamWConfig, Progress, ScheduleConfig, Trainer};
use std::sync::Arc;
use t0802_multi_head_attention::{MhaConfig, MultiHeadAttention, PositionPlug};
use t0803_positional_encoding::{
    sinusoidal, PositionConfig, PositionScheme, Positions, RelativePositionBias,
};

const TOPIC: &str = "t0803_positional_encoding";

#[derive(Parser, Debug)]
#[command(
    about = "8-03: sinusoidal, learned and relative positions on an order-dependent task, and length generalisation"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Training sequence length L (evaluation at L, 2L, 4L).
    #[arg(long, default_value_t = 16)]
    train_len: usize,
    /// The task: predict the token this many positions back.
    #[arg(long, default_value_t = 1)]
    shift: usize,
    #[arg(long, default_value_t = 32)]
    vocab: usize,
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    #[arg(long, default_value_t = 4)]
    n_heads: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Training steps per scheme (default 500; --quick: 120).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value_t = 1e-2)]
    lr: f64,
    /// CPU threads for Candle's kernels. The model is tiny: on a small, busy machine one thread is
    /// several times faster than many (hand-offs cost more than the matmuls). 0 = all cores.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// The task's shape, shared by training and evaluation.
#[derive(Debug, Clone, Copy)]
struct Task {
    vocab: usize,
    shift: usize,
}

impl Task {
    /// Random tokens `(batch, len)`, targets `x[t − shift]`, and a mask hiding `t < shift`.
    fn batch(
        &self,
        rng: &mut StdRng,
        batch: usize,
        len: usize,
        dev: &Device,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let x: Vec<u32> = (0..batch * len)
            .map(|_| rng.random_range(0..self.vocab as u32))
            .collect();
        let mut y = vec![0u32; batch * len];
        let mut m = vec![0u8; batch * len];
        for b in 0..batch {
            for t in self.shift..len {
                y[b * len + t] = x[b * len + t - self.shift];
                m[b * len + t] = 1;
            }
        }
        Ok((
            Tensor::from_vec(x, (batch, len), dev)?,
            Tensor::from_vec(y, (batch, len), dev)?,
            Tensor::from_vec(m, (batch, len), dev)?,
        ))
    }
}

/// Token embeddings → positions → `layers` × (x + MHA(x)) → readout. No causal mask: the model
/// sees the whole sequence, so only the position scheme can tell it about order.
struct Model {
    embed: Tensor,
    positions: Positions,
    layers: Vec<MultiHeadAttention>,
    readout: Tensor,
}

impl Model {
    fn new(vb: VarBuilder, args: &Args, scheme: PositionScheme) -> Result<Self> {
        let d = args.d_model;
        let mut pcfg = PositionConfig::new(scheme, d, args.n_heads, 2 * args.train_len);
        // T5's rule: offsets ≥ max_distance share the last bucket. Setting it to the training length
        // makes that bucket one that training has seen, so any longer offset reuses a trained bias.
        pcfg.max_distance = args.train_len;
        // Positions are created last, so that the shared parts (embeddings, attention, readout)
        // get the same initial values whatever the scheme.
        let embed = truncated_normal(&vb, (args.vocab, d), "token_embeddings", 1.0)?;
        let layers: Vec<MultiHeadAttention> = (0..args.layers)
            .map(|l| {
                MultiHeadAttention::new(
                    vb.pp(format!("layers.{l}.attn")),
                    MhaConfig::new(d, args.n_heads),
                )
            })
            .collect::<candle_core::Result<_>>()?;
        let readout = weight(&vb, args.vocab, d, "readout")?;
        let positions = Positions::new(vb.pp("positions"), &pcfg)?;
        // A relative bias plugs into every layer's attention; absolute schemes act on the input.
        let plug: Option<Arc<dyn PositionPlug>> = match &positions {
            Positions::RelativeBias(r) => Some(Arc::new(r.clone())),
            _ => None,
        };
        let layers = layers
            .into_iter()
            .map(|l| l.with_positions(plug.clone()))
            .collect();
        Ok(Self {
            embed,
            positions,
            layers,
            readout,
        })
    }

    /// `tokens (batch, n)` → logits `(batch, n, vocab)` and each layer's weights `(batch, heads, n, n)`.
    fn forward(&self, tokens: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let x = shared::embedding(&self.embed, tokens)?; // (b, n, d)
        let mut x = self.positions.add_to_input(&x, 0)?; // errors beyond a learned table
        let mut weights = Vec::new();
        for layer in &self.layers {
            let att = layer.forward(&x, None)?; // the relative bias, if any, is the layer's plug
            x = (x + att.output)?;
            weights.push(att.weights);
        }
        Ok((shared::linear(&x, &self.readout)?, weights))
    }
}

#[derive(Debug, Clone, serde::Serialize)]
struct Eval {
    len: usize,
    accuracy: f64,
    loss: f64,
    /// Accuracy at each position `t ≥ shift`, indexed by `t`.
    per_position: Vec<f64>,
}

fn evaluate(
    model: &Model,
    task: Task,
    len: usize,
    batches: usize,
    seed: u64,
    dev: &Device,
) -> Result<Eval> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut correct, mut count, mut loss) = (vec![0usize; len], 0usize, 0f64);
    for _ in 0..batches {
        let (x, y, m) = task.batch(&mut rng, 128, len, dev)?;
        let (logits, _) = model.forward(&x)?;
        loss += cross_entropy(&logits, &y, Some(&m))?.to_scalar::<f32>()? as f64;
        let hit = logits.argmax(D::Minus1)?.eq(&y)?.to_vec2::<u8>()?;
        for row in hit {
            for (t, h) in row.into_iter().enumerate().skip(task.shift) {
                correct[t] += h as usize;
            }
            count += len - task.shift;
        }
    }
    let per_position: Vec<f64> = correct
        .iter()
        .map(|&c| c as f64 / (batches * 128) as f64)
        .collect();
    Ok(Eval {
        len,
        accuracy: correct.iter().sum::<usize>() as f64 / count as f64,
        loss: loss / batches as f64,
        per_position,
    })
}

/// The best accuracy any permutation-equivariant model can reach: it sees its own token and the
/// *multiset* of the sequence, so by exchangeability the target is equally likely to be any of the
/// other `len − 1` tokens, and the best guess is the most frequent of them:
/// `E[max_v count_others(v)] / (len − 1)` (Monte Carlo over random sequences).
fn bag_of_tokens_ceiling(task: Task, len: usize, samples: usize, seed: u64) -> f64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut total = 0.0;
    for _ in 0..samples {
        let x: Vec<usize> = (0..len).map(|_| rng.random_range(0..task.vocab)).collect();
        let mut counts = vec![0usize; task.vocab];
        x.iter().for_each(|&v| counts[v] += 1);
        let t = rng.random_range(task.shift..len); // a query position
        counts[x[t]] -= 1; // the others
        total += *counts.iter().max().unwrap_or(&0) as f64 / (len - 1) as f64;
    }
    total / samples as f64
}

/// `max |f(P·x) − P·f(x)| / max |f(x)|` over a batch: 0 (up to rounding) for an equivariant model.
fn permutation_gap(model: &Model, task: Task, len: usize, seed: u64, dev: &Device) -> Result<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (x, _, _) = task.batch(&mut rng, 16, len, dev)?;
    let mut perm: Vec<u32> = (0..len as u32).collect();
    perm.shuffle(&mut rng);
    let perm = Tensor::from_vec(perm, len, dev)?;
    let (fx, _) = model.forward(&x)?;
    let (fpx, _) = model.forward(&x.index_select(&perm, 1)?)?;
    let diff = (fpx - fx.index_select(&perm, 1)?)?
        .abs()?
        .max_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    let scale = fx
        .abs()?
        .max_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    Ok(diff as f64 / scale as f64)
}

struct Trained {
    scheme: PositionScheme,
    model: Model,
    losses: Vec<(f64, f64)>,
    position_params: usize,
    train_s: f64,
}

fn train(
    args: &Args,
    scheme: PositionScheme,
    steps: usize,
    dev: &Device,
    dtype: DType,
) -> Result<Trained> {
    shared::params::set_seed(args.common.seed); // same initial weights for the shared parts
    let varmap = VarMap::new();
    let model = Model::new(VarBuilder::from_varmap(&varmap, dtype, dev), args, scheme)?;
    let position_params = shared::params::named_vars(&varmap)
        .iter()
        .filter(|(n, _)| n.starts_with("positions."))
        .map(|(_, v)| v.elem_count())
        .sum();
    let schedule = ScheduleConfig {
        max_lr: args.lr,
        min_lr: args.lr / 10.0,
        warmup_steps: steps / 10,
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
    let task = Task {
        vocab: args.vocab,
        shift: args.shift,
    };
    let mut rng = StdRng::seed_from_u64(args.common.seed ^ 0x5eed);
    let mut progress = Progress::new(steps as u64, scheme.name());
    let (mut losses, start) = (Vec::new(), std::time::Instant::now());
    for step in 0..steps {
        let (x, y, m) = task.batch(&mut rng, args.batch, args.train_len, dev)?;
        let (logits, _) = model.forward(&x)?;
        let stats = trainer.step(&cross_entropy(&logits, &y, Some(&m))?)?;
        losses.push((step as f64, stats.loss));
        progress.update(
            step as u64 + 1,
            format!("loss {:.3} · lr {:.1e}", stats.loss, stats.lr),
        );
    }
    progress.finish();
    println!(
        "   {:<14} {} parameters ({} for positions), final loss {:.4}",
        scheme.name(),
        count_params(&varmap),
        position_params,
        losses.last().map_or(f64::NAN, |l| l.1)
    );
    Ok(Trained {
        scheme,
        model,
        losses,
        position_params,
        train_s: start.elapsed().as_secs_f64(),
    })
}

/// Figures of the sinusoidal matrix itself (no training).
fn sinusoidal_figures(out: &std::path::Path, d_model: usize, report: &mut RunReport) -> Result<()> {
    let n = 128;
    let pe = sinusoidal(n, d_model, 0, &Device::Cpu)?.to_dtype(DType::F64)?;
    let rows = pe.to_vec2::<f64>()?;
    heatmap(
        &out.join("sinusoidal.png"),
        &format!("Sinusoidal encoding PE(pos, dim), d_model = {d_model}"),
        "dimension (even: sin, odd: cos)",
        "position",
        &rows,
        None,
    )?;
    let sim = pe.matmul(&pe.t()?)?.to_vec2::<f64>()?;
    heatmap(
        &out.join("sinusoidal_similarity.png"),
        "Dot product PE(p)·PE(q) between positions",
        "position q",
        "position p",
        &sim,
        None,
    )?;
    let waves: Vec<Series> = [2usize, 8, 16, 32]
        .iter()
        .map(|&dim| {
            let wavelength = 2.0
                * std::f64::consts::PI
                * 10_000f64.powf(2.0 * (dim / 2) as f64 / d_model as f64);
            Series::new(
                format!("dim {dim} (wavelength {wavelength:.0})"),
                rows.iter()
                    .enumerate()
                    .map(|(p, r)| (p as f64, r[dim]))
                    .collect(),
            )
        })
        .collect();
    line_chart(
        &out.join("sinusoidal_waves.png"),
        "Each pair of dimensions is a wave of its own frequency",
        "position",
        "PE(pos, dim)",
        &waves,
        Axes::default(),
    )?;
    // PE(p)·PE(p+k) = Σᵢ cos(k·ωᵢ): the same curve whatever p.
    let curves: Vec<Series> = [10usize, 50, 90]
        .iter()
        .map(|&p| {
            Series::new(
                format!("p = {p}"),
                (-10i64..=37)
                    .map(|k| (k as f64, sim[p][(p as i64 + k) as usize]))
                    .collect(),
            )
        })
        .collect();
    line_chart(
        &out.join("similarity_vs_offset.png"),
        "PE(p)·PE(p+k) depends on k only: the curves for p = 10, 50, 90 coincide",
        "offset k",
        "dot product",
        &curves,
        Axes::default(),
    )?;
    let half = d_model as f64 / 2.0;
    let max_off_diag = (1..n).map(|k| sim[0][k]).fold(f64::NEG_INFINITY, f64::max);
    report.metric("sinusoidal_self_similarity", half);
    report.metric(
        "sinusoidal_max_similarity_other_position_0_127",
        max_off_diag,
    );
    report.metric("sinusoidal_similarity_offset_1", sim[0][1]);
    report.metric("sinusoidal_similarity_offset_10", sim[0][10]);
    report.metric("sinusoidal_similarity_offset_100", sim[0][100]);
    println!("   PE(p)·PE(p) = d_model/2 = {half}; PE(0)·PE(1) = {:.2}, PE(0)·PE(10) = {:.2}, PE(0)·PE(100) = {:.2}", sim[0][1], sim[0][10], sim[0][100]);
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.threads > 0 {
        // Candle's CPU kernels read RAYON_NUM_THREADS on every call; set before any work starts.
        std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    }
    let ctx = args.common.setup(
        TOPIC,
        "position information for attention: sinusoidal, learned, relative bias",
    )?;
    let dev = ctx.picked.device.clone();
    if !dev.is_cuda() {
        println!(
            "   Candle CPU kernels: {} thread(s) (--threads)",
            candle_core::utils::get_num_threads()
        );
    }
    let quick = args.common.quick;
    let steps = args.steps.unwrap_or(if quick { 120 } else { 500 });
    let eval_batches = if quick { 2 } else { 8 };
    let l = args.train_len;
    let lengths = [l, 2 * l, 4 * l];
    let config = serde_json::json!({
        "train_len": l, "eval_lengths": lengths, "shift": args.shift, "vocab": args.vocab, "d_model": args.d_model,
        "n_heads": args.n_heads, "layers": args.layers, "threads": args.threads, "steps": steps, "batch": args.batch, "lr": args.lr,
        "learned_table_rows": 2 * l, "eval_sequences_per_length": eval_batches * 128, "quick": quick,
    });
    let mut report = RunReport::start(
        TOPIC,
        config,
        &ctx.picked.description,
        args.common.dtype.name(),
    );
    let out = &ctx.out_dir;

    println!("-- 1. The sinusoidal matrix (d_model = {})", args.d_model);
    sinusoidal_figures(out, args.d_model, &mut report)?;

    println!(
        "-- 2. Task: output the token {} position(s) back; vocab {}, trained at length {l}, {} steps × {} sequences per scheme",
        args.shift, args.vocab, steps, args.batch
    );
    let task = Task {
        vocab: args.vocab,
        shift: args.shift,
    };
    let mut trained = Vec::new();
    for scheme in PositionScheme::ALL {
        trained.push(train(&args, scheme, steps, &dev, ctx.dtype)?);
    }

    println!(
        "-- 3. Evaluation at lengths {lengths:?} (learned table: {} rows)",
        2 * l
    );
    let mut rows = Vec::new();
    let mut length_series = Vec::new();
    let mut position_series = Vec::new();
    let mut learned_error = String::new();
    for t in &trained {
        let name = t.scheme.name();
        let gap = permutation_gap(&t.model, task, l, args.common.seed + 7, &dev)?;
        let mut evals = Vec::new();
        for &len in &lengths {
            match evaluate(
                &t.model,
                task,
                len,
                eval_batches,
                args.common.seed + 1000 + len as u64,
                &dev,
            ) {
                Ok(e) => evals.push(e),
                Err(e) => {
                    let msg = e.to_string().lines().next().unwrap_or_default().to_string(); // no backtrace
                    println!("   {name} at length {len}: ERROR: {msg}");
                    learned_error = msg;
                }
            }
        }
        let cell = |len: usize| {
            evals
                .iter()
                .find(|e| e.len == len)
                .map_or("error".to_string(), |e| format!("{:.3}", e.accuracy))
        };
        rows.push(vec![
            name.to_string(),
            t.position_params.to_string(),
            format!("{:.3}", t.losses.last().map_or(f64::NAN, |x| x.1)),
            cell(lengths[0]),
            cell(lengths[1]),
            cell(lengths[2]),
            format!("{gap:.1e}"),
            format!("{:.1}", t.train_s),
        ]);
        length_series.push(Series::new(
            name,
            evals.iter().map(|e| (e.len as f64, e.accuracy)).collect(),
        ));
        if let Some(longest) = evals.last() {
            let pts = longest
                .per_position
                .iter()
                .enumerate()
                .skip(args.shift)
                .map(|(p, a)| (p as f64, *a))
                .collect();
            position_series.push(Series::new(
                format!("{name} (at length {})", longest.len),
                pts,
            ));
        }
        report.metric(
            name,
            serde_json::json!({
                "position_params": t.position_params,
                "final_train_loss": t.losses.last().map(|x| x.1),
                "permutation_gap": gap,
                "train_seconds": t.train_s,
                "eval": evals,
            }),
        );
    }
    let chance = 1.0 / args.vocab as f64;
    report.metric("chance_accuracy", chance);
    let ceilings: Vec<f64> = lengths
        .iter()
        .map(|&len| bag_of_tokens_ceiling(task, len, 200_000, args.common.seed))
        .collect();
    report.metric(
        "bag_of_tokens_ceiling",
        serde_json::json!(lengths
            .iter()
            .zip(&ceilings)
            .map(|(l, c)| (l.to_string(), serde_json::json!(c)))
            .collect::<serde_json::Map<_, _>>()),
    );
    rows.push(vec![
        "(bag-of-tokens ceiling)".into(),
        "-".into(),
        "-".into(),
        format!("{:.3}", ceilings[0]),
        format!("{:.3}", ceilings[1]),
        format!("{:.3}", ceilings[2]),
        "-".into(),
        "-".into(),
    ]);
    report.metric("learned_beyond_table_error", &learned_error);

    let loss_series: Vec<Series> = trained
        .iter()
        .map(|t| Series::new(t.scheme.name(), t.losses.clone()))
        .collect();
    line_chart(
        &out.join("training_loss.png"),
        &format!(
            "Training loss at length {l} (copy the token {} back)",
            args.shift
        ),
        "step",
        "cross-entropy",
        &loss_series,
        Axes::default(),
    )?;
    line_chart(
        &out.join("length_generalisation.png"),
        &format!("Trained at length {l}: accuracy at longer lengths"),
        "evaluation sequence length",
        "accuracy",
        &length_series,
        Axes::default(),
    )?;
    line_chart(
        &out.join("accuracy_by_position.png"),
        &format!(
            "Accuracy by position at the longest length each scheme runs (trained on 0..{})",
            l - 1
        ),
        "position t",
        "accuracy",
        &position_series,
        Axes::default(),
    )?;
    if let Some(Positions::RelativeBias(rel)) = trained
        .iter()
        .map(|t| &t.model.positions)
        .find(|p| matches!(p, Positions::RelativeBias(_)))
    {
        relative_bias_figure(out, rel, args.shift, &mut report)?;
    }
    for t in trained.iter().filter(|t| {
        matches!(
            t.scheme,
            PositionScheme::Sinusoidal | PositionScheme::RelativeBias
        )
    }) {
        attention_figure(out, t, task, 4 * l, args.common.seed, &dev)?;
    }

    println!(
        "-- Summary (accuracy of predicting x[t−{}]; chance {:.3})",
        args.shift, chance
    );
    let header = [
        "scheme",
        "pos. params",
        "train loss",
        &format!("acc@{}", lengths[0]),
        &format!("acc@{}", lengths[1]),
        &format!("acc@{}", lengths[2]),
        "perm. gap",
        "train s",
    ];
    print_table(&header, &rows);
    if !learned_error.is_empty() {
        println!("   learned positions beyond the table: {learned_error}");
    }
    let path = report.write(out)?;
    println!("   figures and {} written", path.display());
    Ok(())
}

/// The learned relative bias per head as a function of the offset `j − i`.
fn relative_bias_figure(
    out: &std::path::Path,
    rel: &RelativePositionBias,
    shift: usize,
    report: &mut RunReport,
) -> Result<()> {
    let offsets: Vec<i64> = (-24..=24).collect();
    let b = rel
        .bias_for_offsets(&offsets)?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    let series: Vec<Series> = b
        .iter()
        .enumerate()
        .map(|(h, row)| {
            Series::new(
                format!("head {h}"),
                offsets
                    .iter()
                    .zip(row)
                    .map(|(&o, &v)| (o as f64, v))
                    .collect(),
            )
        })
        .collect();
    line_chart(
        &out.join("relative_bias.png"),
        &format!("Learned relative bias b_h(j − i) (the task needs j − i = −{shift})"),
        "offset j − i",
        "bias added to the score",
        &series,
        Axes::default(),
    )?;
    let peak: Vec<i64> = b
        .iter()
        .map(|row| {
            offsets[row
                .iter()
                .enumerate()
                .fold(0, |best, (i, v)| if *v > row[best] { i } else { best })]
        })
        .collect();
    println!("   relative bias: offset of the largest bias per head: {peak:?}");
    report.metric("relative_bias_peak_offset_per_head", peak);
    Ok(())
}

/// Attention weights of the model's head that best attends to `t − shift`, on a
/// sequence four times the training length.
fn attention_figure(
    out: &std::path::Path,
    t: &Trained,
    task: Task,
    len: usize,
    seed: u64,
    dev: &Device,
) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed + 99);
    let (x, _, _) = task.batch(&mut rng, 1, len, dev)?;
    let (_, weights) = t.model.forward(&x)?;
    let mut best = (0.0, 0, 0, Vec::new());
    for (li, w) in weights.iter().enumerate() {
        let w = w.get(0)?.to_dtype(DType::F64)?.to_vec3::<f64>()?; // (heads, n, n)
        for (h, m) in w.into_iter().enumerate() {
            let score: f64 = (task.shift..len / 4).map(|i| m[i][i - task.shift]).sum();
            if score > best.0 {
                best = (score, li, h, m);
            }
        }
    }
    let (_, li, h, m) = best;
    heatmap(
        &out.join(format!("attention_{}_long.png", t.scheme.name())),
        &format!(
            "{} model, layer {li} head {h}, at length {len} (trained at {})",
            t.scheme.name(),
            len / 4
        ),
        "key position",
        "query position",
        &m,
        None,
    )?;
    Ok(())
}

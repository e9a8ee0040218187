//! # 8-01 experiment: attention as a soft dictionary lookup, and what it costs
//!
//! 1. **Lookup.** Eight nearly orthogonal keys, eight distinct values, and eight queries that are
//!    noisy copies of the keys in a shuffled order: the right answer is known, so we can check
//!    that each query retrieves *its* value, and watch how scaling the queries (sharpness,
//!    inverse temperature β) turns the soft average into a hard lookup.
//! 2. **Causal self-attention.** The weights of a layer on a random token sequence under the
//!    causal mask: a fresh layer, and one whose `W_q = W_k` makes equal tokens find each other.
//! 3. **Cost.** Time of `scaled_dot_product_attention` and bytes of the `n×n` score matrix vs
//!    the sequence length `n`, with the fitted log-log exponent (≈ 2), and time vs the head
//!    width `d` at fixed `n` (≈ linear once the matmuls dominate): `O(n²·d)`.
//!
//! `cargo run -p t0801_self_attention -- [--device cpu|cuda] [--quick] [--max-n N] [--d-head D]`

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use serde_json::json;
use shared::cli::CommonArgs;
use shared::params::sample_normal;
use shared::report::{heatmap, line_chart, print_table, Axes, RunReport, Series};
use std::path::Path;
use std::time::Instant;
use t0801_self_attention::{
    attention_flops, causal_mask, scaled_dot_product_attention, SelfAttention,
};

const TOPIC: &str = "t0801_self_attention";

#[derive(Parser, Debug)]
#[command(
    about = "8-01: self-attention as a soft dictionary lookup, causal attention maps, and the O(n²·d) cost"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Largest sequence length of the cost benchmark (default 4096 on the CPU, 16384 on CUDA; 512 with --quick).
    #[arg(long)]
    max_n: Option<usize>,
    /// Head width d of the cost-vs-n benchmark.
    #[arg(long, default_value_t = 64)]
    d_head: usize,
    /// Timed repetitions per size (the median is reported).
    #[arg(long, default_value_t = 9)]
    reps: usize,
    /// Noise of the lookup queries, relative to a key's per-coordinate scale.
    #[arg(long, default_value_t = 0.5)]
    noise: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let ctx = args.common.setup(
        TOPIC,
        "soft dictionary lookup, causal attention maps, O(n²·d) cost",
    )?;
    let dev = ctx.picked.device.clone();
    let config = json!({
        "quick": args.common.quick, "seed": args.common.seed, "max_n": args.max_n,
        "d_head": args.d_head, "reps": args.reps, "noise": args.noise,
    });
    let mut report = RunReport::start(
        TOPIC,
        config,
        &ctx.picked.description,
        args.common.dtype.name(),
    );
    let mut summary: Vec<Vec<String>> = Vec::new();

    println!("\n-- 1. soft dictionary lookup: 8 keys, 8 values, 8 noisy shuffled queries");
    let lookup = dictionary_lookup(
        &dev,
        &ctx.out_dir,
        args.noise,
        args.common.seed,
        &mut report,
    )?;
    summary.push(vec![
        "lookup accuracy (β = 1)".into(),
        format!("{:.3}", lookup.accuracy),
    ]);
    summary.push(vec![
        "weight on intended key (β = 1)".into(),
        format!("{:.3}", lookup.weight_on_target),
    ]);
    summary.push(vec![
        "retrieved-value rel. error (β = 1)".into(),
        format!("{:.3}", lookup.value_error),
    ]);
    summary.push(vec![
        "accuracy over 256 random dictionaries".into(),
        format!("{:.3}", lookup.accuracy_many),
    ]);

    println!("\n-- 2. causal self-attention on a random token sequence");
    causal_maps(&dev, &ctx.out_dir, args.common.seed, &mut report)?;

    println!("\n-- 3. cost vs sequence length n (d = {})", args.d_head);
    let max_n = args.max_n.unwrap_or(if args.common.quick {
        512
    } else if dev.is_cuda() {
        16384
    } else {
        4096
    });
    let reps = if args.common.quick {
        args.reps.min(3)
    } else {
        args.reps
    };
    let (time_exp, mem_exp) = cost_vs_n(
        &dev,
        ctx.dtype,
        &ctx.out_dir,
        max_n,
        args.d_head,
        reps,
        &mut report,
    )?;
    summary.push(vec![
        "fitted time exponent in n".into(),
        format!("{time_exp:.2}"),
    ]);
    summary.push(vec![
        "fitted score-memory exponent in n".into(),
        format!("{mem_exp:.2}"),
    ]);

    let n_for_d = if args.common.quick {
        256
    } else if dev.is_cuda() {
        4096
    } else {
        1024
    };
    println!("\n-- 4. cost vs head width d (n = {n_for_d})");
    let d_exp = cost_vs_d(&dev, ctx.dtype, &ctx.out_dir, n_for_d, reps, &mut report)?;
    summary.push(vec![
        "fitted time exponent in d (d ≥ 64)".into(),
        format!("{d_exp:.2}"),
    ]);

    println!("\n== summary ({})", ctx.picked.description);
    print_table(&["quantity", "value"], &summary);
    let path = report.write(&ctx.out_dir)?;
    println!("results: {}", path.display());
    Ok(())
}

/// A small deterministic generator (SplitMix64) for shuffles and token draws.
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// A uniformly random permutation of `0..n` (Fisher–Yates).
    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, self.below(i + 1));
        }
        p
    }
}

fn gaussian(shape: &[usize], std: f64, dev: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(
        sample_normal(n, std, f64::INFINITY),
        shape,
        dev,
    )?)
}

fn to_rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.to_dtype(DType::F64)?.to_vec2::<f64>()?)
}

struct LookupSummary {
    accuracy: f64,
    weight_on_target: f64,
    value_error: f64,
    accuracy_many: f64,
}

/// What one lookup measured, per batch of dictionaries.
struct LookupStats {
    accuracy: f64,
    weight_on_target: f64,
    value_error: f64,
    entropy: f64,
}

/// Queries `(b, m, d)` look up keys `(b, m, d)` / values `(b, m, d_v)`; `target[b][i]` is the key
/// query `i` copies. Returns the weights and the statistics.
fn lookup_stats(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    target: &[Vec<usize>],
) -> Result<(Tensor, LookupStats)> {
    let att = scaled_dot_product_attention(q, k, v, None)?;
    let w = att.weights.to_dtype(DType::F64)?.to_vec3::<f64>()?; // (b, m, m)
    let out = att.output.to_dtype(DType::F64)?.to_vec3::<f64>()?; // (b, m, d_v)
    let vals = v.to_dtype(DType::F64)?.to_vec3::<f64>()?;
    let (mut hits, mut on_target, mut err, mut ent, mut count) = (0usize, 0.0, 0.0, 0.0, 0usize);
    for b in 0..w.len() {
        for (i, row) in w[b].iter().enumerate() {
            let t = target[b][i];
            let argmax = row
                .iter()
                .enumerate()
                .fold(0, |best, (j, x)| if *x > row[best] { j } else { best });
            hits += usize::from(argmax == t);
            on_target += row[t];
            ent -= row
                .iter()
                .filter(|p| **p > 0.0)
                .map(|p| p * p.ln())
                .sum::<f64>();
            let want = &vals[b][t];
            let diff: f64 = out[b][i]
                .iter()
                .zip(want)
                .map(|(o, w)| (o - w).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm: f64 = want.iter().map(|w| w * w).sum::<f64>().sqrt();
            err += diff / norm;
            count += 1;
        }
    }
    let c = count as f64;
    Ok((
        att.weights,
        LookupStats {
            accuracy: hits as f64 / c,
            weight_on_target: on_target / c,
            value_error: err / c,
            entropy: ent / c,
        },
    ))
}

fn dictionary_lookup(
    dev: &Device,
    out_dir: &Path,
    noise: f64,
    seed: u64,
    report: &mut RunReport,
) -> Result<LookupSummary> {
    let (m, d_k, d_v) = (8usize, 32usize, 8usize);
    let mut rng = SplitMix(seed);
    // Keys: random Gaussian vectors in 32 dimensions are nearly orthogonal (|cos| ~ 1/√d).
    let keys = gaussian(&[1, m, d_k], 1.0, dev)?;
    let values = gaussian(&[1, m, d_v], 1.0, dev)?;
    let perm = rng.permutation(m); // query i is a noisy copy of key perm[i]
    let idx = Tensor::from_vec(perm.iter().map(|&p| p as u32).collect::<Vec<_>>(), m, dev)?;
    let queries = (keys.squeeze(0)?.index_select(&idx, 0)? + gaussian(&[m, d_k], noise, dev)?)?
        .unsqueeze(0)?;
    let (max_cos, ci, cj) = max_abs_cosine(&to_rows(&keys.squeeze(0)?)?);
    println!(
        "   keys {m}×{d_k} (max |cos| between keys {max_cos:.3}, k{ci} and k{cj}), values {m}×{d_v}, query noise σ = {noise}"
    );
    println!("   query i copies key {perm:?}");

    let key_names: Vec<String> = (0..m).map(|j| format!("k{j}")).collect();
    let query_names: Vec<String> = perm
        .iter()
        .enumerate()
        .map(|(i, p)| format!("q{i}≈k{p}"))
        .collect();
    let betas = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0];
    let mut rows = Vec::new();
    let mut sweep = Vec::new();
    let mut at_one = None;
    let mut weights_at_one = Vec::new();
    for &beta in &betas {
        let (w, s) = lookup_stats(
            &(&queries * beta)?,
            &keys,
            &values,
            std::slice::from_ref(&perm),
        )?;
        rows.push(vec![
            format!("{beta}"),
            format!("{:.3}", s.accuracy),
            format!("{:.3}", s.weight_on_target),
            format!("{:.3}", s.entropy),
            format!("{:.3}", s.value_error),
        ]);
        sweep.push(
            json!({"beta": beta, "accuracy": s.accuracy, "weight_on_target": s.weight_on_target,
            "entropy_nats": s.entropy, "rel_value_error": s.value_error}),
        );
        if [0.25, 1.0, 4.0].contains(&beta) {
            let name = match beta {
                b if b < 1.0 => "t0801_lookup_soft.png",
                b if b > 1.0 => "t0801_lookup_sharp.png",
                _ => "t0801_lookup.png",
            };
            heatmap(
                &out_dir.join(name),
                &format!("Soft lookup: attention weights, queries scaled by β = {beta}"),
                "key",
                "query (≈ the key it copies)",
                &to_rows(&w.squeeze(0)?)?,
                Some((&key_names, &query_names)),
            )?;
        }
        if beta == 1.0 {
            weights_at_one = to_rows(&w.squeeze(0)?)?;
            at_one = Some(s);
        }
    }
    println!("   sharpness: queries scaled by β (= dividing the temperature by β); uniform weights have entropy ln 8 = {:.3}", (m as f64).ln());
    print_table(
        &[
            "β",
            "accuracy",
            "weight on intended key",
            "entropy (nats)",
            "value rel. error",
        ],
        &rows,
    );
    // x = log₂ β on a linear axis (ticks at every doubling).
    let at = |key: &str| -> Vec<(f64, f64)> {
        sweep
            .iter()
            .map(|s| (s["beta"].as_f64().unwrap().log2(), s[key].as_f64().unwrap()))
            .collect()
    };
    line_chart(
        &out_dir.join("t0801_sharpness.png"),
        "Sharpness: scaling the queries by β (β = 1: plain attention)",
        "log₂ β   (β = query scale = 1 / temperature)",
        "value",
        &[
            Series::new("weight on intended key", at("weight_on_target")),
            Series::new("retrieved value: relative error", at("rel_value_error")),
            Series::new(
                "row entropy / ln 8",
                at("entropy_nats")
                    .into_iter()
                    .map(|(b, e)| (b, e / (m as f64).ln()))
                    .collect(),
            ),
        ],
        Axes {
            log_x: false,
            log_y: false,
        },
    )?;

    // The same lookup on 256 independent random dictionaries, at several noise levels (β = 1).
    let many = 256;
    let mut noise_rows = Vec::new();
    let mut noise_sweep = Vec::new();
    let mut accuracy_many = 0.0;
    for sigma in [0.25, 0.5, 1.0, 1.5, 2.0] {
        let k = gaussian(&[many, m, d_k], 1.0, dev)?;
        let v = gaussian(&[many, m, d_v], 1.0, dev)?;
        let perms: Vec<Vec<usize>> = (0..many).map(|_| rng.permutation(m)).collect();
        let flat: Vec<u32> = perms
            .iter()
            .enumerate()
            .flat_map(|(b, p)| p.iter().map(move |&j| (b * m + j) as u32))
            .collect();
        let q = k
            .reshape((many * m, d_k))?
            .index_select(&Tensor::from_vec(flat, many * m, dev)?, 0)?
            .reshape((many, m, d_k))?;
        let q = (q + gaussian(&[many, m, d_k], sigma, dev)?)?;
        let (_, s) = lookup_stats(&q, &k, &v, &perms)?;
        if sigma == noise {
            accuracy_many = s.accuracy;
        }
        noise_rows.push(vec![
            format!("{sigma}"),
            format!("{:.3}", s.accuracy),
            format!("{:.3}", s.weight_on_target),
            format!("{:.3}", s.value_error),
        ]);
        noise_sweep.push(json!({"noise": sigma, "accuracy": s.accuracy, "weight_on_target": s.weight_on_target, "rel_value_error": s.value_error}));
    }
    println!("   {many} random dictionaries (β = 1) at several query-noise levels:");
    print_table(
        &[
            "noise σ",
            "accuracy",
            "weight on intended key",
            "value rel. error",
        ],
        &noise_rows,
    );

    let s = at_one.expect("β = 1 is in the sweep");
    report.metric(
        "lookup",
        json!({
            "n_keys": m, "d_k": d_k, "d_v": d_v, "noise": noise, "max_abs_cos_between_keys": max_cos, "most_similar_keys": [ci, cj],
            "query_copies_key": perm, "accuracy": s.accuracy, "weight_on_target": s.weight_on_target,
            "rel_value_error": s.value_error, "entropy_nats": s.entropy, "weights": weights_at_one,
            "accuracy_256_dictionaries": accuracy_many,
        }),
    );
    report.metric("lookup_sharpness", sweep);
    report.metric("lookup_noise_sweep_256_dictionaries", noise_sweep);
    Ok(LookupSummary {
        accuracy: s.accuracy,
        weight_on_target: s.weight_on_target,
        value_error: s.value_error,
        accuracy_many,
    })
}

/// The largest |cosine| between two rows, and which rows.
fn max_abs_cosine(rows: &[Vec<f64>]) -> (f64, usize, usize) {
    let norm = |v: &Vec<f64>| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut best = (0.0, 0, 0);
    for i in 0..rows.len() {
        for j in 0..i {
            let dot: f64 = rows[i].iter().zip(&rows[j]).map(|(a, b)| a * b).sum();
            let cos = (dot / (norm(&rows[i]) * norm(&rows[j]))).abs();
            if cos > best.0 {
                best = (cos, j, i);
            }
        }
    }
    best
}

/// Heatmaps of a causal layer on a random 16-token sequence over a 6-letter vocabulary.
fn causal_maps(dev: &Device, out_dir: &Path, seed: u64, report: &mut RunReport) -> Result<()> {
    let (n, vocab, d_model, d_k) = (16usize, 6usize, 32usize, 16usize);
    let mut rng = SplitMix(seed ^ 0x5EED_0801);
    let tokens: Vec<usize> = (0..n).map(|_| rng.below(vocab)).collect();
    let letters: Vec<String> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{i}:{}", (b'A' + *t as u8) as char))
        .collect();
    println!("   sequence: {}", letters.join(" "));
    let table = gaussian(&[vocab, d_model], 1.0, dev)?; // a random token-embedding table
    let idx = Tensor::from_vec(tokens.iter().map(|&t| t as u32).collect::<Vec<_>>(), n, dev)?;
    let x = table.index_select(&idx, 0)?.unsqueeze(0)?; // (1, n, d_model)
    let mask = causal_mask(n, n, dev)?;

    // (a) A freshly initialised layer (CS336 truncated-normal weights).
    let varmap = VarMap::new();
    let fresh = SelfAttention::new(
        VarBuilder::from_varmap(&varmap, DType::F32, dev),
        d_model,
        d_k,
        d_k,
    )?;
    // (b) The same layer with W_k := W_q: the score of (i, j) is ⟨W_q xᵢ, W_q xⱼ⟩/√d_k, largest
    //     when token j equals token i, so each position attends to earlier copies of itself.
    let matching =
        SelfAttention::from_weights(fresh.w_q.clone(), fresh.w_q.clone(), fresh.w_v.clone())?;

    let mut stats = serde_json::Map::new();
    for (layer, file, title, key) in [
        (
            &fresh,
            "t0801_causal_fresh.png",
            "Causal self-attention, fresh random layer",
            "fresh",
        ),
        (
            &matching,
            "t0801_causal_match.png",
            "Causal self-attention with W_k = W_q (equal tokens match)",
            "w_k_equals_w_q",
        ),
    ] {
        let w = to_rows(&layer.forward(&x, Some(&mask))?.weights.squeeze(0)?)?;
        heatmap(
            &out_dir.join(file),
            title,
            "key position : token",
            "query position : token",
            &w,
            Some((&letters, &letters)),
        )?;
        let above: f64 = (0..n)
            .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
            .map(|(i, j)| w[i][j])
            .fold(0.0, f64::max);
        let row_sum_err = w
            .iter()
            .map(|r| (r.iter().sum::<f64>() - 1.0).abs())
            .fold(0.0, f64::max);
        // Mass a query puts on earlier positions holding the same token (where there is one).
        let (mut same, mut rows_with_copy) = (0.0, 0);
        for i in 0..n {
            if (0..i).any(|j| tokens[j] == tokens[i]) {
                same += (0..i)
                    .filter(|&j| tokens[j] == tokens[i])
                    .map(|j| w[i][j])
                    .sum::<f64>();
                rows_with_copy += 1;
            }
        }
        let same = same / rows_with_copy.max(1) as f64;
        // A uniform causal row i gives every allowed key weight 1/(i+1).
        let max_dev_from_uniform = (0..n)
            .map(|i| {
                (0..=i)
                    .map(|j| (w[i][j] - 1.0 / (i + 1) as f64).abs())
                    .fold(0.0, f64::max)
            })
            .fold(0.0, f64::max);
        println!(
            "   {key}: max weight above the diagonal {above:.1e}, max |row sum − 1| {row_sum_err:.1e}, \
             mass on earlier equal tokens {same:.3} (rows that have one), max |w − uniform causal| {max_dev_from_uniform:.3}"
        );
        stats.insert(
            key.into(),
            json!({"max_weight_above_diagonal": above, "max_row_sum_error": row_sum_err,
                "mass_on_earlier_equal_tokens": same, "max_deviation_from_uniform_causal": max_dev_from_uniform}),
        );
    }
    stats.insert("tokens".into(), json!(letters));
    report.metric("causal", stats);
    Ok(())
}

/// Timing of one attention shape.
struct Timing {
    median_ms: f64,
    min_ms: f64,
    /// Bytes of the `n×n` weight matrix the call materialised.
    score_bytes: usize,
}

/// Wall time of one attention forward on `(1, 1, n, d)` inputs for each `(n, d)` of `shapes`.
///
/// Each shape is warmed up twice; then the `reps` timed rounds are *interleaved* (round r times
/// every shape once), so a burst of load from other processes hits all sizes alike instead of
/// ruining one. The device is synchronised before every clock reading (CUDA is asynchronous).
fn time_attention(
    dev: &Device,
    dtype: DType,
    shapes: &[(usize, usize)],
    reps: usize,
    label: &str,
) -> Result<Vec<Timing>> {
    let make = |n: usize, d: usize| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, (1, 1, n, d), dev)?.to_dtype(dtype)?)
    };
    let inputs: Vec<[Tensor; 3]> = shapes
        .iter()
        .map(|&(n, d)| Ok([make(n, d)?, make(n, d)?, make(n, d)?]))
        .collect::<Result<_>>()?;
    let mut bytes = vec![0; shapes.len()];
    for (i, [q, k, v]) in inputs.iter().enumerate() {
        for _ in 0..2 {
            let att = scaled_dot_product_attention(q, k, v, None)?; // warm-up (allocator, kernels)
            bytes[i] = att.weights.elem_count() * att.weights.dtype().size_in_bytes();
        }
    }
    dev.synchronize()?;
    let mut times = vec![Vec::with_capacity(reps); shapes.len()];
    let mut progress = shared::train::Progress::new(reps as u64, label);
    for r in 0..reps {
        for (i, [q, k, v]) in inputs.iter().enumerate() {
            dev.synchronize()?;
            let t0 = Instant::now();
            let att = scaled_dot_product_attention(q, k, v, None)?;
            dev.synchronize()?;
            times[i].push(t0.elapsed().as_secs_f64() * 1e3);
            drop(att);
        }
        progress.update(r as u64 + 1, format!("round {}/{reps}", r + 1));
    }
    progress.finish();
    Ok(times
        .into_iter()
        .zip(bytes)
        .map(|(mut t, score_bytes)| {
            t.sort_by(f64::total_cmp);
            Timing {
                median_ms: t[t.len() / 2],
                min_ms: t[0],
                score_bytes,
            }
        })
        .collect())
}

/// Least-squares line `y ≈ a + b·x`; returns `(a, b)`.
fn linear_fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let cov: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = points.iter().map(|(x, _)| (x - mx).powi(2)).sum();
    let b = cov / var;
    (my - b * mx, b)
}

/// Least-squares slope of `ln y` against `ln x`.
fn loglog_slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (lx, ly): (Vec<f64>, Vec<f64>) = points.iter().map(|(x, y)| (x.ln(), y.ln())).unzip();
    let (mx, my) = (lx.iter().sum::<f64>() / n, ly.iter().sum::<f64>() / n);
    let cov: f64 = lx.iter().zip(&ly).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = lx.iter().map(|x| (x - mx).powi(2)).sum();
    cov / var
}

fn cost_vs_n(
    dev: &Device,
    dtype: DType,
    out_dir: &Path,
    max_n: usize,
    d: usize,
    reps: usize,
    report: &mut RunReport,
) -> Result<(f64, f64)> {
    let sizes: Vec<usize> = std::iter::successors(Some(64usize), |n| Some(n * 2))
        .take_while(|n| *n <= max_n)
        .collect();
    let shapes: Vec<(usize, usize)> = sizes.iter().map(|&n| (n, d)).collect();
    let timings = time_attention(dev, dtype, &shapes, reps, "cost vs n")?;
    let mut rows = Vec::new();
    let mut table = Vec::new();
    let mut points = Vec::new();
    for (&n, t) in sizes.iter().zip(&timings) {
        let (ms, bytes) = (t.median_ms, t.score_bytes);
        let gflops = attention_flops(n, n, d, d) / (ms * 1e-3) / 1e9;
        rows.push(vec![
            n.to_string(),
            format!("{ms:.3}"),
            format!("{:.3}", t.min_ms),
            format!("{bytes}"),
            format!("{:.1}", bytes as f64 / (1 << 20) as f64),
            format!("{gflops:.1}"),
        ]);
        table.push(
            json!({"n": n, "ms": ms, "min_ms": t.min_ms, "score_bytes": bytes, "gflops": gflops}),
        );
        points.push((n as f64, ms, bytes as f64));
    }
    print_table(
        &[
            "n",
            "ms (median)",
            "ms (min)",
            "score bytes",
            "MiB",
            "GFLOP/s",
        ],
        &rows,
    );
    // Fit on the larger sizes (the top half, at least 3), where fixed overheads no longer dominate.
    let fit_from = sizes.len().saturating_sub((sizes.len() / 2).max(3));
    let fit = &points[fit_from..];
    let time_exp = loglog_slope(&fit.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>());
    let mem_exp = loglog_slope(&points.iter().map(|p| (p.0, p.2)).collect::<Vec<_>>());
    println!(
        "   fitted on n ≥ {}: time ∝ n^{time_exp:.2}; score memory ∝ n^{mem_exp:.2} (= 4·n² bytes in f32 per head)",
        sizes[fit_from]
    );
    let (n_last, ms_last, _) = *points.last().expect("at least one size");
    let reference: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.0, ms_last * (p.0 / n_last).powi(2)))
        .collect();
    let device_name = if dev.is_cuda() { "CUDA" } else { "CPU" };
    line_chart(
        &out_dir.join("t0801_cost_time.png"),
        &format!(
            "Attention forward time vs n ({device_name}, d = {d}; fitted exponent {time_exp:.2})"
        ),
        "sequence length n",
        "time (ms, median)",
        &[
            Series::new("measured", points.iter().map(|p| (p.0, p.1)).collect()),
            Series::new("reference ∝ n²", reference),
        ],
        Axes {
            log_x: true,
            log_y: true,
        },
    )?;
    line_chart(
        &out_dir.join("t0801_cost_memory.png"),
        &format!("Score-matrix memory per head vs n (fitted exponent {mem_exp:.2})"),
        "sequence length n",
        "MiB of the n×n weight matrix",
        &[Series::new(
            format!("{dtype:?} weights (n×n), one head"),
            points
                .iter()
                .map(|p| (p.0, p.2 / (1u64 << 20) as f64))
                .collect(),
        )],
        Axes {
            log_x: true,
            log_y: true,
        },
    )?;
    report.metric(
        "cost_vs_n",
        json!({"d": d, "reps": reps, "dtype": format!("{dtype:?}"), "table": table, "fit_from_n": sizes[fit_from],
            "time_exponent": time_exp, "memory_exponent": mem_exp}),
    );
    Ok((time_exp, mem_exp))
}

fn cost_vs_d(
    dev: &Device,
    dtype: DType,
    out_dir: &Path,
    n: usize,
    reps: usize,
    report: &mut RunReport,
) -> Result<f64> {
    let widths = [16usize, 32, 64, 128, 256];
    let shapes: Vec<(usize, usize)> = widths.iter().map(|&d| (n, d)).collect();
    let timings = time_attention(dev, dtype, &shapes, reps, "cost vs d")?;
    let mut rows = Vec::new();
    let mut table = Vec::new();
    let mut points = Vec::new();
    for (&d, t) in widths.iter().zip(&timings) {
        let ms = t.median_ms;
        rows.push(vec![
            d.to_string(),
            format!("{ms:.3}"),
            format!("{:.3}", t.min_ms),
            format!("{:.1}", attention_flops(n, n, d, d) / (ms * 1e-3) / 1e9),
        ]);
        table.push(json!({"d": d, "ms": ms, "min_ms": t.min_ms}));
        points.push((d as f64, ms));
    }
    print_table(&["d", "ms (median)", "ms (min)", "GFLOP/s"], &rows);
    let d_exp = loglog_slope(&points[2..]);
    // time ≈ a + b·d: `a` is the d-independent part (the n² scale/max/exp/sum/divide passes),
    // `b·d` the two matmuls.
    let (a, b) = linear_fit(&points);
    let floor_share_64 = a / (a + b * 64.0);
    println!(
        "   fitted on d ≥ 64: time ∝ d^{d_exp:.2}; linear fit time ≈ {a:.2} ms + {b:.4} ms·d: \
         at d = 64 the d-independent n² passes are {:.0}% of the time",
        100.0 * floor_share_64
    );
    let (d_last, ms_last) = *points.last().expect("widths");
    line_chart(
        &out_dir.join("t0801_cost_width.png"),
        &format!(
            "Attention forward time vs head width d (n = {n}; exponent on d ≥ 64: {d_exp:.2})"
        ),
        "head width d",
        "time (ms, median)",
        &[
            Series::new("measured", points.clone()),
            Series::new(
                "reference ∝ d",
                points
                    .iter()
                    .map(|p| (p.0, ms_last * p.0 / d_last))
                    .collect(),
            ),
            Series::new(
                format!("fit {a:.2} ms + {b:.4} ms·d"),
                points.iter().map(|p| (p.0, a + b * p.0)).collect(),
            ),
        ],
        Axes {
            log_x: true,
            log_y: true,
        },
    )?;
    report.metric(
        "cost_vs_d",
        json!({"n": n, "table": table, "d_exponent_from_64": d_exp, "linear_fit_intercept_ms": a,
            "linear_fit_ms_per_d": b, "d_independent_share_at_d64": floor_share_64}),
    );
    Ok(d_exp)
}

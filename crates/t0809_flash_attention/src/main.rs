//! Topic 8-09 experiment: FlashAttention against the naive attention of 8-01.
//!
//! Default run (CPU, < 2 min): a correctness table (tiled tensor ops and custom op vs naive and
//! a float64 reference, forward and gradients), the memory bottleneck *measured* (peak bytes
//! allocated during a forward, by a counting allocator, for growing sequence lengths), and small
//! timings.
//!
//! `bench` (GPU): forward and forward+backward time, TFLOP/s and peak device memory of our
//! kernel and of the naive path, over sequence lengths, head sizes and causal/non-causal.

mod bench;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use clap::{Parser, Subcommand};
use shared::cli::CommonArgs;
use shared::report::{line_chart, print_table, Axes, RunReport, Series};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use t0809_flash_attention::*;

const TOPIC: &str = "t0809_flash_attention";

// ---------------------------------------------------------------------------------------------
// A counting allocator: current and peak bytes of host memory, so the memory of the naive and
// the flash paths on the CPU is measured, not computed.
// ---------------------------------------------------------------------------------------------
struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new_size) };
        if !q.is_null() {
            CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
            grew(new_size);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns its result with the peak of *extra* host bytes allocated meanwhile.
fn peak_extra_bytes<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (r, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

#[derive(Parser, Debug)]
#[command(about = "Topic 8-09: FlashAttention — tiled attention, online softmax, our own kernel")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// GPU benchmark: our kernel vs the naive path (time, TFLOP/s, peak memory).
    Bench(bench::BenchArgs),
    /// Redraw the bench plots from a bench results.json (e.g. one fetched from the GPU host).
    BenchPlot {
        /// Path of `output/t0809_flash_attention/bench/results.json`.
        #[arg(long)]
        from: std::path::PathBuf,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    match &args.cmd {
        Some(Cmd::Bench(b)) => bench::run(&args.common, b),
        Some(Cmd::BenchPlot { from }) => bench::plot_from(&args.common, from),
        None => demo(&args.common),
    }
}

/// Random `(b, h, n, d)` f32 tensors on `dev`.
fn randn(shape: &[usize], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        shared::params::sample_normal(shape.iter().product(), 1.0, f64::INFINITY),
        shape,
        dev,
    )?)
}

/// `max |a − b| / (1 + |b|)` over all elements.
fn max_rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f64::max))
}

type Attn = fn(&Tensor, &Tensor, &Tensor, f64, bool) -> candle_core::Result<Tensor>;

fn tensor_ops(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
) -> candle_core::Result<Tensor> {
    Ok(flash_attention_tensor_ops(q, k, v, causal, scale, 64, 64)?.0)
}

/// Output and `(dQ, dK, dV)` of `Σ O∘W` through Candle's autograd.
fn with_grads(
    f: Attn,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    w: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars = [
        Var::from_tensor(q)?,
        Var::from_tensor(k)?,
        Var::from_tensor(v)?,
    ];
    let o = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        scale,
        causal,
    )?;
    let g = (&o * w)?.sum_all()?.backward()?;
    let grads = vars
        .iter()
        .map(|x| {
            g.get(x.as_tensor())
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("missing gradient"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((o, grads))
}

fn demo(common: &CommonArgs) -> Result<()> {
    let ctx = common.setup(
        TOPIC,
        "FlashAttention: exact attention without the n×n matrix",
    )?;
    let dev = ctx.picked.device.clone();
    if !dev.is_cpu() {
        println!(
            "   note: the default run is the CPU lesson; on the GPU use the `bench` subcommand"
        );
    }
    let dev = Device::Cpu;
    let mut report = RunReport::start(
        TOPIC,
        serde_json::json!({"quick": common.quick, "seed": common.seed}),
        &shared::device::pick_device(shared::device::DeviceChoice::Cpu)?.description,
        "f32",
    );

    // 1. Correctness: three implementations against float64, forward and gradients.
    println!("\n-- 1. correctness (f32 on the CPU; errors are max |x − ref| / (1 + |ref|), ref = float64 naive)");
    let cases: Vec<(usize, usize, usize, usize, usize, bool)> = if common.quick {
        vec![(1, 2, 70, 70, 32, true), (1, 2, 40, 100, 32, false)]
    } else {
        vec![
            (2, 4, 256, 256, 64, false),
            (2, 4, 256, 256, 64, true),
            (1, 4, 100, 300, 64, true),
            (1, 2, 1, 333, 128, true),
        ]
    };
    let mut rows = Vec::new();
    let mut correctness = Vec::new();
    for &(b, h, n_q, n_k, d, causal) in &cases {
        let (q, k, v, w) = (
            randn(&[b, h, n_q, d], &dev)?,
            randn(&[b, h, n_k, d], &dev)?,
            randn(&[b, h, n_k, d], &dev)?,
            randn(&[b, h, n_q, d], &dev)?,
        );
        let scale = default_softmax_scale(d);
        let f64s = |t: &Tensor| t.to_dtype(DType::F64);
        let (ref_o, ref_g) = with_grads(
            naive_attention,
            &f64s(&q)?,
            &f64s(&k)?,
            &f64s(&v)?,
            &f64s(&w)?,
            scale,
            causal,
        )?;
        let mut errs = serde_json::Map::new();
        let mut row = vec![format!("({b},{h},{n_q},{n_k},{d})"), causal.to_string()];
        for (name, f) in [
            ("naive (t0801)", naive_attention as Attn),
            ("tiled tensor ops", tensor_ops as Attn),
            ("custom op", flash_attention as Attn),
        ] {
            let (o, g) = with_grads(f, &q, &k, &v, &w, scale, causal)?;
            let e_o = max_rel(&o, &ref_o)?;
            let e_g = g
                .iter()
                .zip(&ref_g)
                .map(|(a, b)| max_rel(a, b))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .fold(0.0, f64::max);
            row.push(format!("{e_o:.1e} / {e_g:.1e}"));
            errs.insert(
                name.to_string(),
                serde_json::json!({"output": e_o, "grads": e_g}),
            );
        }
        rows.push(row);
        correctness.push(
            serde_json::json!({"shape": [b, h, n_q, n_k, d], "causal": causal, "errors": errs}),
        );
    }
    print_table(
        &[
            "(b,h,n_q,n_k,d)",
            "causal",
            "naive out/grad",
            "tiled out/grad",
            "custom op out/grad",
        ],
        &rows,
    );
    report.metric("correctness", &correctness);

    // 2. The memory bottleneck, measured: peak extra host bytes during one forward.
    println!("\n-- 2. memory of one causal forward (b·h = 2, d = 64): peak extra bytes allocated, measured");
    let seqs: Vec<usize> = if common.quick {
        vec![128, 256, 512]
    } else {
        vec![256, 512, 1024, 2048, 4096]
    };
    let (bh, d) = (2usize, 64usize);
    let mut progress = shared::train::Progress::new(seqs.len() as u64, "memory");
    let mut mem_rows = Vec::new();
    let mut mem_json = Vec::new();
    let (mut s_naive, mut s_flash, mut s_tiled, mut s_matrix) = (vec![], vec![], vec![], vec![]);
    for (i, &n) in seqs.iter().enumerate() {
        let (q, k, v) = (
            randn(&[1, bh, n, d], &dev)?,
            randn(&[1, bh, n, d], &dev)?,
            randn(&[1, bh, n, d], &dev)?,
        );
        let scale = default_softmax_scale(d);
        let t0 = Instant::now();
        let (o_naive, m_naive) = peak_extra_bytes(|| naive_attention(&q, &k, &v, scale, true));
        let t_naive = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let (o_flash, m_flash) = peak_extra_bytes(|| flash_attention(&q, &k, &v, scale, true));
        let t_flash = t0.elapsed().as_secs_f64();
        let (o_tiled, m_tiled) =
            peak_extra_bytes(|| flash_attention_tensor_ops(&q, &k, &v, true, scale, 64, 64));
        let (o_naive, o_flash, o_tiled) = (o_naive?, o_flash?, o_tiled?.0);
        let agree = max_rel(&o_flash, &o_naive)?.max(max_rel(&o_tiled, &o_naive)?);
        let matrix = bh * n * n * 4; // one f32 score matrix
        let out_bytes = bh * n * d * 4;
        mem_rows.push(vec![
            n.to_string(),
            mb(matrix),
            mb(m_naive),
            mb(m_tiled),
            mb(m_flash),
            mb(out_bytes),
            format!("{:.2}", t_naive),
            format!("{:.2}", t_flash),
            format!("{agree:.0e}"),
        ]);
        mem_json.push(serde_json::json!({"seq": n, "score_matrix_bytes": matrix, "naive_peak_bytes": m_naive, "tiled_tensor_ops_peak_bytes": m_tiled, "flash_custom_op_peak_bytes": m_flash, "output_bytes": out_bytes, "naive_s": t_naive, "flash_s": t_flash, "max_rel_diff": agree}));
        let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
        s_naive.push((n as f64, mib(m_naive)));
        s_flash.push((n as f64, mib(m_flash)));
        s_tiled.push((n as f64, mib(m_tiled)));
        s_matrix.push((n as f64, mib(matrix)));
        progress.update(i as u64 + 1, format!("seq {n}"));
    }
    progress.finish();
    print_table(
        &[
            "seq",
            "one n×n f32 matrix",
            "naive peak",
            "tiled (tensor ops) peak",
            "flash (custom op) peak",
            "output O",
            "naive s",
            "flash s",
            "max diff",
        ],
        &mem_rows,
    );
    report.metric("memory", &mem_json);
    let mem_png = ctx.out_dir.join("memory_vs_seq.png");
    line_chart(
        &mem_png,
        "Peak extra memory of one causal forward (CPU, measured; b·h = 2, d = 64)",
        "sequence length n",
        "MiB",
        &[
            Series::new("naive (t0801): materialises n×n", s_naive),
            Series::new("tiled tensor ops (64×64 tiles)", s_tiled),
            Series::new("FlashAttention custom op", s_flash),
            Series::new("one f32 n×n score matrix", s_matrix),
        ],
        Axes {
            log_x: true,
            log_y: true,
        },
    )?;

    // 3. Small timings: forward and forward+backward on the CPU.
    println!("\n-- 3. CPU time (b·h = 4, d = 64, causal; median of 3)");
    let seqs: Vec<usize> = if common.quick {
        vec![128]
    } else {
        vec![256, 512, 1024]
    };
    let mut t_rows = Vec::new();
    let mut t_json = Vec::new();
    for &n in &seqs {
        let (q, k, v, w) = (
            randn(&[1, 4, n, 64], &dev)?,
            randn(&[1, 4, n, 64], &dev)?,
            randn(&[1, 4, n, 64], &dev)?,
            randn(&[1, 4, n, 64], &dev)?,
        );
        let scale = default_softmax_scale(64);
        let flops = attention_fwd_flops(4, n, n, 64, true);
        let mut row = vec![n.to_string()];
        let mut entry = serde_json::json!({"seq": n});
        for (name, f) in [
            ("naive", naive_attention as Attn),
            ("tiled", tensor_ops as Attn),
            ("flash", flash_attention as Attn),
        ] {
            let fwd = median_secs(3, || Ok(f(&q, &k, &v, scale, true).map(|_| ())?))?;
            let fb = median_secs(3, || with_grads(f, &q, &k, &v, &w, scale, true).map(|_| ()))?;
            row.push(format!("{:.1} / {:.1}", fwd * 1e3, fb * 1e3));
            entry[name] = serde_json::json!({"fwd_s": fwd, "fwd_bwd_s": fb, "fwd_gflops": flops / fwd / 1e9, "fwd_bwd_gflops": 3.5 * flops / fb / 1e9});
        }
        t_rows.push(row);
        t_json.push(entry);
    }
    print_table(
        &[
            "seq",
            "naive fwd / fwd+bwd ms",
            "tiled tensor ops ms",
            "flash custom op ms",
        ],
        &t_rows,
    );
    report.metric("cpu_timings", &t_json);
    let path = report.write(&ctx.out_dir)?;
    println!("\nwrote {} and {}", path.display(), mem_png.display());
    println!("GPU benchmark: cargo run --release -p {TOPIC} --features cuda -- bench");
    Ok(())
}

fn mb(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

/// Median wall time of `reps` runs of `f` (CPU: no synchronisation needed).
fn median_secs(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        t.push(t0.elapsed().as_secs_f64());
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

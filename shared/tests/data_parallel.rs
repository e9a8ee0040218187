//! Data parallelism on the CPU, with the ranks as threads ([`LocalGroup`]):
//! - a world of N, each rank on its N-th of the batch, trains as one worker on the whole batch;
//! - every rank ends with the same parameters, bit for bit;
//! - the broadcast gives every rank rank 0's initial parameters; bad shards are refused;
//! - rank 0 writes the checkpoints, and a group killed mid-run resumes from them to the same
//!   parameters and losses as a group that was never stopped, bit for bit;
//! - with master weights (bf16 copies of f32 parameters) the broadcast refreshes every rank's
//!   copies, and a world of two trains as one worker with master weights.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use shared::data_parallel::{
    average_gradients_and_loss, backward_averaged, shard_rows, Collective, LocalGroup,
};
use shared::train::{AdamWConfig, ScheduleConfig, Trainer};

const ROWS: usize = 32;

/// Models are initialised from the process-wide seeded generator: the tests take turns, and the
/// ranks' models are built one after the other before their threads start.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    shared::params::init_turn()
}

/// A two-layer MLP `x (rows, 8) → tanh → (rows, 1)`, regressing `sin(Σx)`.
struct Mlp {
    w1: Tensor,
    w2: Tensor,
}

impl Mlp {
    fn new(varmap: &VarMap, seed: u64) -> Result<Self> {
        shared::params::set_seed(seed);
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        Ok(Self {
            w1: shared::params::weight(&vb, 16, 8, "w1")?,
            w2: shared::params::weight(&vb, 1, 16, "w2")?,
        })
    }

    /// The same model computing with `copies` (bf16 copies of its f32 parameters, made by
    /// `shared::train::copies_for`).
    fn on_copies(copies: &VarMap) -> Result<Self> {
        let vb = VarBuilder::from_varmap(copies, DType::BF16, &Device::Cpu);
        Ok(Self {
            w1: shared::params::weight(&vb, 16, 8, "w1")?,
            w2: shared::params::weight(&vb, 1, 16, "w2")?,
        })
    }

    /// Mean squared error on `rows` of step `step`'s global batch, computed in the weights' dtype
    /// and returned in f32.
    fn loss(&self, step: usize, rows: std::ops::Range<usize>) -> Result<Tensor> {
        let (x, y) = batch(step)?;
        let dtype = self.w1.dtype();
        let (x, y) = (
            x.narrow(0, rows.start, rows.len())?.to_dtype(dtype)?,
            y.narrow(0, rows.start, rows.len())?.to_dtype(dtype)?,
        );
        let h = shared::linear(&x, &self.w1)?.tanh()?;
        let mse = (shared::linear(&h, &self.w2)? - y)?.sqr()?.mean_all()?;
        Ok(mse.to_dtype(DType::F32)?)
    }
}

/// The global batch of `step`: `ROWS` inputs from a seeded generator, targets `sin(Σx)`.
fn batch(step: usize) -> Result<(Tensor, Tensor)> {
    let mut s = 0x2545_F491_4F6C_DD1Du64 ^ (step as u64 + 1);
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
    };
    let x: Vec<f32> = (0..ROWS * 8).map(|_| next()).collect();
    let y: Vec<f32> = x.chunks(8).map(|r| r.iter().sum::<f32>().sin()).collect();
    Ok((
        Tensor::from_vec(x, (ROWS, 8), &Device::Cpu)?,
        Tensor::from_vec(y, (ROWS, 1), &Device::Cpu)?,
    ))
}

fn schedule() -> ScheduleConfig {
    ScheduleConfig {
        max_lr: 1e-2,
        min_lr: 1e-3,
        warmup_steps: 2,
        total_steps: 12,
        clip_norm: Some(0.5), // small enough to clip: clipping must see the averaged gradient
    }
}

fn trainer(varmap: &VarMap) -> Result<Trainer> {
    Trainer::new(varmap, AdamWConfig::default(), schedule())
}

/// One worker's (or rank's) parameters and model, drawn from `seed`: f32, or with `master` f32
/// master weights whose bf16 copies (`shared::train::copies_for`) the model computes with.
struct Worker {
    params: VarMap,
    copies: Option<VarMap>,
    model: Mlp,
}

impl Worker {
    fn new(seed: u64, master: bool) -> Result<Self> {
        let params = VarMap::new();
        let model = Mlp::new(&params, seed)?;
        if !master {
            let copies = None;
            return Ok(Self {
                params,
                copies,
                model,
            });
        }
        let copies = shared::train::copies_for(&params, DType::BF16)?.expect("f32 → bf16");
        let model = Mlp::on_copies(&copies)?;
        let copies = Some(copies);
        Ok(Self {
            params,
            copies,
            model,
        })
    }

    fn trainer(&self) -> Result<Trainer> {
        let copies = self.copies.as_ref();
        Trainer::for_params(&self.params, copies, AdamWConfig::default(), schedule())
    }
}

/// Runs `f` on each input in its own thread (one per rank) and collects the results in order.
fn on_threads<I: Send, T: Send>(
    inputs: Vec<I>,
    f: impl Fn(I) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = inputs
            .into_iter()
            .map(|input| scope.spawn(move || f(input)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn values(varmap: &VarMap) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for (_, v) in shared::params::named_vars(varmap) {
        out.extend(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Parameters (the f32 masters with master weights) after 12 steps, and the losses.
type Trained = (Vec<f32>, Vec<f64>);

/// One worker on the whole batch.
fn single(master: bool) -> Result<Trained> {
    let w = Worker::new(3, master)?;
    let mut t = w.trainer()?;
    let losses = (0..12)
        .map(|s| Ok(t.step(&w.model.loss(s, 0..ROWS)?)?.loss))
        .collect::<Result<Vec<_>>>()?;
    Ok((values(&w.params)?, losses))
}

/// A world of `world` threads, rank r initialised from seed 100 + r and then given rank 0's
/// parameters by broadcast; what each rank trained.
fn data_parallel(world: usize, master: bool) -> Result<Vec<Trained>> {
    let ranks = LocalGroup::new(world)?;
    // Different seeds per rank (only rank 0's is the single worker's 3): the broadcast must make
    // them equal.
    let workers = (0..world)
        .map(|r| Worker::new(if r == 0 { 3 } else { 100 + r as u64 }, master))
        .collect::<Result<Vec<_>>>()?;
    let inputs: Vec<_> = ranks.into_iter().zip(workers).collect();
    on_threads(inputs, |(group, w)| {
        let mut t = w.trainer()?;
        t.broadcast_parameters(&group, 0)?;
        let rows = shard_rows(ROWS, group.world(), group.rank())?;
        let losses = (0..12)
            .map(|s| {
                let loss = w.model.loss(s, rows.clone())?;
                Ok(t.step_data_parallel(&loss, &group)?.loss)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((values(&w.params)?, losses))
    })
}

/// Every rank ended where one worker did (parameters within `params_tol`, each step's loss
/// `close` to the worker's), and all ranks hold the same parameters, bit for bit: they applied
/// the same averaged updates.
fn assert_trains_as_one_worker(
    (want, want_losses): &Trained,
    ranks: &[Trained],
    params_tol: f32,
    close: impl Fn(f64, f64) -> bool,
    what: &str,
) {
    for (rank, (got, losses)) in ranks.iter().enumerate() {
        let worst = max_abs_diff(want, got);
        assert!(
            worst < params_tol,
            "{what}, rank {rank}: parameters differ by {worst}"
        );
        for (s, (a, b)) in want_losses.iter().zip(losses).enumerate() {
            assert!(
                close(*a, *b),
                "{what}, rank {rank}, step {s}: loss {a} vs {b}"
            );
        }
    }
    assert!(
        ranks.iter().all(|r| r.0 == ranks[0].0),
        "{what}: ranks drifted apart"
    );
}

#[test]
fn a_world_of_n_trains_as_one_worker_with_n_times_the_batch() -> Result<()> {
    let _turn = one_at_a_time();
    let want = single(false)?;
    for world in [1, 2, 4] {
        let ranks = data_parallel(world, false)?;
        let close = |a: f64, b: f64| (a - b).abs() < 1e-5 * a.abs().max(1.0);
        assert_trains_as_one_worker(&want, &ranks, 1e-5, close, &format!("world {world}"));
    }
    Ok(())
}

#[test]
fn without_the_broadcast_or_the_average_the_ranks_drift_apart() -> Result<()> {
    // The control that shows the test above can fail: ranks that step on their own shards with
    // plain `step` end with different parameters.
    let _turn = one_at_a_time();
    let (a, b) = (VarMap::new(), VarMap::new());
    let (ma, mb) = (Mlp::new(&a, 3)?, Mlp::new(&b, 3)?);
    let (mut ta, mut tb) = (trainer(&a)?, trainer(&b)?);
    for s in 0..3 {
        ta.step(&ma.loss(s, 0..ROWS / 2)?)?;
        tb.step(&mb.loss(s, ROWS / 2..ROWS)?)?;
    }
    assert_ne!(values(&a)?, values(&b)?);
    Ok(())
}

#[test]
fn collectives_sum_and_broadcast_and_bad_shards_are_refused() -> Result<()> {
    let ranks = LocalGroup::new(3)?;
    let out = on_threads(ranks, |g| {
        let mine = Tensor::new(&[g.rank() as f32, 10.0 * g.rank() as f32], &Device::Cpu)?;
        let sum = g.all_reduce_sum(&mine)?.to_vec1::<f32>()?;
        let root = g.broadcast(&mine, 2)?.to_vec1::<f32>()?;
        Ok((sum, root))
    })?;
    for (sum, root) in out {
        assert_eq!(sum, vec![3.0, 30.0]);
        assert_eq!(root, vec![2.0, 20.0]);
    }
    assert!(LocalGroup::new(0).is_err());
    assert_eq!(shard_rows(32, 4, 3)?, 24..32);
    assert!(shard_rows(30, 4, 0)
        .unwrap_err()
        .to_string()
        .contains("does not split evenly"));
    assert!(shard_rows(32, 4, 4).is_err());
    Ok(())
}

/// The MLP as the one loop's task, on `rows` of each step's global batch.
struct Shard<'a> {
    model: &'a Mlp,
    rows: std::ops::Range<usize>,
    /// Fail while fetching this step's batch, as a killed job would (every rank at once).
    crash_at: Option<usize>,
}

impl shared::fit::Task for Shard<'_> {
    fn train_loss(&mut self, step: usize) -> Result<(Tensor, usize)> {
        if self.crash_at == Some(step) {
            anyhow::bail!("killed at step {step}");
        }
        Ok((self.model.loss(step, self.rows.clone())?, self.rows.len()))
    }

    fn valid_loss(&mut self) -> Result<f64> {
        Ok(self.model.loss(999, 0..ROWS)?.to_scalar::<f32>()? as f64)
    }
}

#[test]
fn the_one_loop_in_a_group_equals_the_one_loop_on_the_whole_batch_and_rank_0_checkpoints(
) -> Result<()> {
    use shared::fit::{fit, fit_in_group, Checkpointing, FitSpec};
    let _turn = one_at_a_time();
    let spec = FitSpec {
        label: "mlp".into(),
        eval_every: 4,
        patience: None,
    };
    // One worker, the whole batch.
    let varmap = VarMap::new();
    let model = Mlp::new(&varmap, 3)?;
    let mut t = trainer(&varmap)?;
    let single = fit(
        &mut t,
        &mut Shard {
            model: &model,
            rows: 0..ROWS,
            crash_at: None,
        },
        &spec,
        None,
    )?;
    let want = values(&varmap)?;
    // Two ranks, half the batch each, checkpoints into one folder.
    let dir = std::env::temp_dir().join(format!("module08-dp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ck = Checkpointing {
        dir: dir.clone(),
        every: 4,
        resume: false,
        meta: serde_json::json!({ "model": "mlp" }),
    };
    let models = (0..2)
        .map(|_| {
            let varmap = VarMap::new();
            let model = Mlp::new(&varmap, 3)?;
            Ok((varmap, model))
        })
        .collect::<Result<Vec<_>>>()?;
    let ranks = LocalGroup::new(2)?;
    let inputs: Vec<_> = ranks.into_iter().zip(models).collect();
    let results = on_threads(inputs, |(group, (mut varmap, model))| {
        let mut t = trainer(&varmap)?;
        let rows = shard_rows(ROWS, 2, group.rank())?;
        let mut task = Shard {
            model: &model,
            rows,
            crash_at: None,
        };
        let ck = Some((&mut varmap, &ck));
        let curve = fit_in_group(&mut t, &mut task, &spec, ck, Some(&group))?;
        Ok((values(&varmap)?, curve))
    })?;
    for (rank, (got, curve)) in results.iter().enumerate() {
        let worst = max_abs_diff(&want, got);
        assert!(worst < 1e-5, "rank {rank}: parameters differ by {worst}");
        let (a, b) = (
            single.final_valid_loss().unwrap(),
            curve.final_valid_loss().unwrap(),
        );
        assert!((a - b).abs() < 1e-5, "rank {rank}: valid loss {a} vs {b}");
    }
    // Rank 0's checkpoint holds the final parameters, and loads.
    let varmap = VarMap::new();
    let _model = Mlp::new(&varmap, 77)?;
    let mut t = trainer(&varmap)?;
    let mut restore = varmap.clone();
    t.load_checkpoint(&mut restore, &dir)?;
    assert_eq!(t.step, 12);
    assert_eq!(values(&varmap)?, results[0].0);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A group of two ranks as threads, each from a fresh model of `seed`, trained with `fit_in_group`
/// on its half of the batch with checkpoints every 4 steps in `ck_dir` (resuming from there when
/// `resume`), the task failing at `crash_at`: each rank's parameters and curve, or the first error.
fn group_run(
    seed: u64,
    ck_dir: &std::path::Path,
    resume: bool,
    crash_at: Option<usize>,
) -> Result<Vec<(Vec<f32>, shared::fit::Curve)>> {
    use shared::fit::{fit_in_group, Checkpointing, FitSpec};
    let spec = FitSpec {
        label: "mlp".into(),
        eval_every: 4,
        patience: None,
    };
    let ck = Checkpointing {
        dir: ck_dir.to_path_buf(),
        every: 4,
        resume,
        meta: serde_json::json!({ "model": "mlp" }),
    };
    let models = (0..2)
        .map(|_| {
            let varmap = VarMap::new();
            let model = Mlp::new(&varmap, seed)?;
            Ok((varmap, model))
        })
        .collect::<Result<Vec<_>>>()?;
    let inputs: Vec<_> = LocalGroup::new(2)?.into_iter().zip(models).collect();
    on_threads(inputs, |(group, (mut varmap, model))| {
        let mut t = trainer(&varmap)?;
        let rows = shard_rows(ROWS, 2, group.rank())?;
        let mut task = Shard {
            model: &model,
            rows,
            crash_at,
        };
        let curve = fit_in_group(
            &mut t,
            &mut task,
            &spec,
            Some((&mut varmap, &ck)),
            Some(&group),
        )?;
        assert_eq!(t.step, 12);
        Ok((values(&varmap)?, curve))
    })
}

#[test]
fn a_group_killed_mid_run_resumes_from_rank_0s_checkpoint_as_if_never_stopped() -> Result<()> {
    let _turn = one_at_a_time();
    let root = std::env::temp_dir().join(format!("module08-dp-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let straight = group_run(3, &root.join("straight"), false, None)?;
    // Killed while fetching step 10's batch: the last checkpoint is step 8's, written by rank 0.
    let stopped = root.join("stopped");
    let killed = group_run(3, &stopped, false, Some(10));
    assert!(killed
        .unwrap_err()
        .to_string()
        .contains("killed at step 10"));
    let last = shared::checkpoint::latest(&stopped)?.expect("a checkpoint");
    assert!(last.ends_with("step-00000008"), "{}", last.display());
    // Resumed by fresh ranks whose own initialisation (seed 77) differs: every rank loads rank
    // 0's checkpoint and goes on.
    let resumed = group_run(77, &stopped, true, None)?;
    let losses = |c: &shared::fit::Curve| {
        c.train
            .iter()
            .map(|t| (t.0, t.1.to_bits()))
            .collect::<Vec<_>>()
    };
    for rank in 0..2 {
        assert_eq!(
            resumed[rank].0, straight[rank].0,
            "rank {rank}: parameters, bit for bit"
        );
        assert_eq!(
            losses(&resumed[rank].1),
            losses(&straight[rank].1),
            "rank {rank}: every step's loss, bit for bit"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

#[test]
fn buckets_sent_during_the_backward_average_to_the_bits_of_one_flat_bucket() -> Result<()> {
    // Each rank: the flat average after the backward, then the bucketed one whose buckets leave
    // while the backward runs; the same gradients and loss, bit for bit. Buckets of 16 numbers
    // split the MLP's two weights (w2: 16 numbers, final first; w1: 128), and a variable the loss
    // never reaches goes as zeros.
    let _turn = one_at_a_time();
    let models = (0..2)
        .map(|_| {
            let varmap = VarMap::new();
            let model = Mlp::new(&varmap, 3)?;
            Ok((varmap, model))
        })
        .collect::<Result<Vec<_>>>()?;
    let inputs: Vec<_> = LocalGroup::new(2)?.into_iter().zip(models).collect();
    let out = on_threads(inputs, |(group, (varmap, model))| {
        let mut vars = shared::params::named_vars(&varmap);
        vars.push((
            "unused".into(),
            candle_core::Var::ones(3, DType::F32, &Device::Cpu)?,
        ));
        let rows = shard_rows(ROWS, 2, group.rank())?;
        let loss = model.loss(0, rows)?;
        let mut flat = loss.backward()?;
        let flat_loss = average_gradients_and_loss(&mut flat, &vars, &loss, &group)?;
        let (bucketed, bucketed_loss, report) = backward_averaged(&loss, &vars, &group, 16)?;
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|x| x.to_bits())
                .collect())
        };
        for (name, v) in &vars {
            let (a, b) = (flat.get(v.as_tensor()), bucketed.get(v.as_tensor()));
            let (a, b) = (a.expect("flat gradient"), b.expect("bucketed gradient"));
            assert_eq!(bits(a)?, bits(b)?, "rank {}: {name}", group.rank());
        }
        assert_eq!(bits(&flat_loss)?, bits(&bucketed_loss)?);
        Ok(report)
    })?;
    for report in out {
        // w2's bucket left before the backward had formed w1's gradient; w1's when it was final;
        // the unused variable's after the backward.
        assert_eq!(report.buckets, 3, "{report:?}");
        assert_eq!(report.sent_during_backward, 2, "{report:?}");
    }
    Ok(())
}

/// With master weights, `Trainer::broadcast_parameters` gives every rank rank 0's f32 masters and
/// rounds them into that rank's bf16 copies, the tensors its model computes with.
#[test]
fn broadcast_with_master_weights_refreshes_the_copies() -> Result<()> {
    let _turn = one_at_a_time();
    let ranks = LocalGroup::new(2)?;
    let workers = (0..2u64)
        .map(|r| Worker::new(7 + r, true)) // different draws per rank
        .collect::<Result<Vec<_>>>()?;
    let inputs: Vec<_> = ranks.into_iter().zip(workers).collect();
    let per_rank = on_threads(inputs, |(group, w)| {
        w.trainer()?.broadcast_parameters(&group, 0)?;
        let (masters, copies) = (&w.params, w.copies.as_ref().expect("bf16 copies"));
        let rounded: Vec<f32> = values(masters)?
            .iter()
            .map(|&m| half::bf16::from_f32(m).to_f32())
            .collect();
        let mut copy_values = Vec::new();
        for (_, v) in shared::params::named_vars(copies) {
            let t = v.as_tensor().to_dtype(DType::F32)?.flatten_all()?;
            copy_values.extend(t.to_vec1::<f32>()?);
        }
        Ok((values(masters)?, rounded, copy_values))
    })?;
    let (masters0, _, _) = &per_rank[0];
    for (rank, (masters, rounded, copies)) in per_rank.iter().enumerate() {
        assert_eq!(
            masters, masters0,
            "rank {rank}: masters differ from rank 0's"
        );
        assert_eq!(
            copies, rounded,
            "rank {rank}: the copies are not the masters rounded"
        );
    }
    Ok(())
}

/// Master weights in a group: two ranks, each computing with bf16 copies of its f32 masters, train
/// as one worker with master weights on the whole batch, to the rounding of the averaged gradient
/// (averaged in f32, rounded to bf16 once, where the single worker's is one bf16 product).
#[test]
fn master_weights_train_in_a_group_as_one_worker() -> Result<()> {
    let _turn = one_at_a_time();
    let want = single(true)?;
    let ranks = data_parallel(2, true)?;
    // lr 1e-2 for 12 steps: a rank that missed the average would be ~1e-2 away. Each loss is a
    // bf16 mean (of 32 rows, or of two means of 16).
    let close = |a: f64, b: f64| (a - b).abs() < 0.02 * a.abs();
    assert_trains_as_one_worker(&want, &ranks, 1e-3, close, "master weights");
    Ok(())
}

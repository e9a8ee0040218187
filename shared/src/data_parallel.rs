//! # Data parallelism: the same step on several workers, gradients averaged
//!
//! Each of `world` workers (ranks) holds a full copy of the model and trains on its own share of
//! the batch. After the backward pass the ranks average their gradients (an all-reduce), so every
//! rank applies the same update and the copies never drift apart:
//!
//! ```text
//! rank r:  loss_r = L(θ; batch_r)        g_r = ∇θ loss_r              (batch_r: B rows of N·B)
//! all:     ḡ = (g_0 + … + g_{N−1}) / N   ℓ̄ = (loss_0 + … + loss_{N−1}) / N
//! rank r:  θ ← AdamW(θ, ḡ)                                            (clipping on ḡ)
//! ```
//!
//! With equal shares and a loss that is a mean over its rows, `ḡ` is the gradient of the mean
//! loss over the whole `N·B` batch: a world of `N` trains exactly as one worker with `N×` the
//! batch, up to the order of floating-point additions. The parameters start equal by a
//! broadcast from rank 0.
//!
//! How the ranks talk is a [`Collective`]: [`LocalGroup`] runs the ranks as threads of one
//! process (the CPU tests); `shared::nccl::NcclGroup` (feature `nccl`, one process per GPU)
//! implements the same trait over NCCL.
//!
//! Gradients travel in buckets, and the buckets travel during the backward pass
//! ([`backward_averaged`]): Candle's backward (patched, `third_party/README.md`) hands each
//! variable's gradient over as soon as it is final — the last layers' first — and once a bucket
//! holds [`BUCKET_ELEMS`] numbers a communication thread starts summing it over the ranks while
//! the backward goes on through the earlier layers. [`average_gradients_and_loss`] is the same
//! average with one flat bucket after the backward.

use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use std::sync::{Arc, Barrier, Mutex};

/// The operations data parallelism needs from the ranks of a group.
pub trait Collective: Send + Sync {
    /// This worker's index, `0 ≤ rank < world`.
    fn rank(&self) -> usize;
    /// The number of workers.
    fn world(&self) -> usize;
    /// The element-wise sum of `t` over every rank; the same tensor (bit for bit) on each rank.
    /// Every rank must call it, with tensors of one shape and dtype.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s `t` on every rank.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
}

/// The ranks of a [`LocalGroup`] share one table of contributions and a barrier.
struct Exchange {
    slots: Mutex<Vec<Option<Tensor>>>,
    barrier: Barrier,
}

/// One rank of a group of threads in one process (see [`LocalGroup::new`]).
pub struct LocalGroup {
    rank: usize,
    world: usize,
    exchange: Arc<Exchange>,
}

impl LocalGroup {
    /// `world` connected ranks; hand one to each thread.
    pub fn new(world: usize) -> Result<Vec<LocalGroup>> {
        if world == 0 {
            bail!("LocalGroup: a group needs at least one rank");
        }
        let exchange = Arc::new(Exchange {
            slots: Mutex::new(vec![None; world]),
            barrier: Barrier::new(world),
        });
        Ok((0..world)
            .map(|rank| LocalGroup {
                rank,
                world,
                exchange: exchange.clone(),
            })
            .collect())
    }

    /// Puts this rank's tensor in its slot, waits for every rank, lets `read` see all slots, and
    /// waits again so that no rank overwrites a slot another has not read.
    fn exchange<R>(&self, t: &Tensor, read: impl FnOnce(&[Option<Tensor>]) -> R) -> R {
        self.exchange.slots.lock().expect("exchange lock")[self.rank] = Some(t.clone());
        self.exchange.barrier.wait();
        let out = read(&self.exchange.slots.lock().expect("exchange lock"));
        self.exchange.barrier.wait();
        out
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        // Every rank adds the contributions in rank order: the same sum everywhere.
        self.exchange(t, |slots| {
            let mut parts = slots.iter().map(|s| s.as_ref().expect("every rank wrote"));
            let first = parts.next().expect("a group has a rank").clone();
            parts.try_fold(first, |acc, p| acc.add(p))
        })
        .map_err(Into::into)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world {
            bail!(
                "broadcast: root {root} is not a rank of a world of {}",
                self.world
            );
        }
        Ok(self.exchange(t, |slots| slots[root].clone().expect("the root wrote")))
    }
}

/// Replaces each gradient in `grads` (of `vars`) by its mean over the ranks and returns the mean
/// of `loss` (a single f32 value): the gradients and the loss travel as one flat f32 bucket,
/// summed by one all-reduce, divided by the world size, and put back in their shapes and dtypes.
/// Variables without a gradient contribute zeros, so every rank sends a bucket of the same size.
pub fn average_gradients_and_loss(
    grads: &mut GradStore,
    vars: &[(String, Var)],
    loss: &Tensor,
    group: &dyn Collective,
) -> Result<Tensor> {
    if group.world() == 1 {
        return Ok(loss.clone());
    }
    let device = loss.device();
    let mut flat = vars
        .iter()
        .map(|(_, v)| match grads.get(v.as_tensor()) {
            Some(g) => g.to_dtype(DType::F32)?.flatten_all(),
            None => Tensor::zeros(v.elem_count(), DType::F32, device),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    flat.push(loss.to_dtype(DType::F32)?.detach().reshape(1)?);
    let bucket = Tensor::cat(&flat, 0)?; // (Σ parameters + 1,)
    let mean = (group.all_reduce_sum(&bucket)? / group.world() as f64)?;
    let offset = insert_bucket(grads, vars, 0..vars.len(), &mean)?;
    Ok(mean.narrow(0, offset, 1)?.reshape(())?)
}

/// Puts the gradients of `members` (indices into `vars`, in bucket order) back from the flat f32
/// `bucket`, each in its variable's shape and dtype; returns how many numbers they took.
fn insert_bucket(
    grads: &mut GradStore,
    vars: &[(String, Var)],
    members: impl IntoIterator<Item = usize>,
    bucket: &Tensor,
) -> Result<usize> {
    let mut offset = 0;
    for i in members {
        let v = &vars[i].1;
        let n = v.elem_count();
        let g = bucket
            .narrow(0, offset, n)?
            .reshape(v.shape())?
            .to_dtype(v.dtype())?;
        grads.insert(v.as_tensor(), g);
        offset += n;
    }
    Ok(offset)
}

/// The size of a gradient bucket, in numbers: 4 MiB of f32. Big enough that a bucket's all-reduce
/// is not all latency, small enough that the first one leaves while most of the backward is
/// still to run.
pub const BUCKET_ELEMS: usize = 1 << 20;

/// How a [`backward_averaged`] call sent its buckets: how many, and how many left while the
/// backward pass was still running (the overlap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketReport {
    pub buckets: usize,
    pub sent_during_backward: usize,
}

/// `loss.backward()` with every gradient of `vars` replaced by its mean over the ranks, and the
/// mean loss. Gradients are grouped, in the order the backward finishes them (the same on every
/// rank: one graph), into f32 buckets of at least `bucket_elems` numbers; a thread of this rank
/// all-reduces each bucket as soon as it is full, while the backward goes on. Variables without a
/// gradient go last, as zeros, so every rank sends the same buckets. The sums are the ones
/// [`average_gradients_and_loss`] forms (each number is added over the ranks in the
/// collective's order): the same bits, sooner.
pub fn backward_averaged(
    loss: &Tensor,
    vars: &[(String, Var)],
    group: &dyn Collective,
    bucket_elems: usize,
) -> Result<(GradStore, Tensor, BucketReport)> {
    if group.world() == 1 {
        let report = BucketReport {
            buckets: 0,
            sent_during_backward: 0,
        };
        return Ok((loss.backward()?, loss.clone(), report));
    }
    let index: std::collections::HashMap<_, _> = vars
        .iter()
        .enumerate()
        .map(|(i, (_, v))| (v.as_tensor().id(), i))
        .collect();
    let (to_comm, from_backward) = std::sync::mpsc::channel::<Bucket>();
    std::thread::scope(|scope| {
        let comm = scope.spawn(move || -> Result<Vec<(Vec<usize>, Tensor)>> {
            let mut summed = Vec::new();
            for bucket in from_backward {
                let flat = Tensor::cat(&bucket.grads, 0)?; // (Σ elements,) f32
                summed.push((bucket.vars, group.all_reduce_sum(&flat)?));
            }
            Ok(summed)
        });
        let filler = BucketFiller::new(to_comm.clone(), bucket_elems, vars.len());
        let filling = Arc::new(Mutex::new(filler));
        let hook_filler = filling.clone();
        let previous =
            candle_core::backprop::set_gradient_ready(Some(Box::new(move |var, grad| match index
                .get(&var.id())
            {
                Some(&i) => hook_filler
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .add(i, grad),
                None => Ok(()),
            })));
        let backward = loss.backward();
        let _ = candle_core::backprop::set_gradient_ready(previous);
        let mut grads = backward?;
        let mut filler = Arc::try_unwrap(filling)
            .map_err(|_| anyhow::anyhow!("backward_averaged: the gradient hook is still held"))?
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        let sent_during_backward = filler.sent;
        // Variables the backward did not reach: zeros, in the order of `vars`.
        for (i, (_, v)) in vars.iter().enumerate() {
            if !filler.seen[i] {
                let zeros = Tensor::zeros(v.shape(), DType::F32, loss.device())?;
                filler.add(i, &zeros)?;
            }
        }
        filler.flush()?;
        let buckets = filler.sent;
        drop(filler);
        drop(to_comm);
        let summed = comm.join().map_err(|_| {
            anyhow::anyhow!("backward_averaged: the communication thread panicked")
        })??;
        let world = group.world() as f64;
        for (members, sum) in summed {
            insert_bucket(&mut grads, vars, members, &(sum / world)?)?;
        }
        let loss_sum = group.all_reduce_sum(&loss.to_dtype(DType::F32)?.detach().reshape(1)?)?;
        let mean_loss = (loss_sum / world)?.reshape(())?;
        let report = BucketReport {
            buckets,
            sent_during_backward,
        };
        Ok((grads, mean_loss, report))
    })
}

/// A bucket on its way to the communication thread: its variables (indices into `vars`) and their
/// gradients, flattened to f32.
struct Bucket {
    vars: Vec<usize>,
    grads: Vec<Tensor>,
}

/// Collects final gradients into buckets and sends each full one.
struct BucketFiller {
    to_comm: std::sync::mpsc::Sender<Bucket>,
    bucket_elems: usize,
    current: Bucket,
    elems: usize,
    seen: Vec<bool>,
    sent: usize,
}

impl BucketFiller {
    fn new(to_comm: std::sync::mpsc::Sender<Bucket>, bucket_elems: usize, n_vars: usize) -> Self {
        Self {
            to_comm,
            bucket_elems: bucket_elems.max(1),
            current: Bucket {
                vars: Vec::new(),
                grads: Vec::new(),
            },
            elems: 0,
            seen: vec![false; n_vars],
            sent: 0,
        }
    }

    /// Adds variable `i`'s gradient; sends the bucket once it holds `bucket_elems` numbers.
    fn add(&mut self, i: usize, grad: &Tensor) -> candle_core::Result<()> {
        self.seen[i] = true;
        let flat = grad.to_dtype(DType::F32)?.flatten_all()?;
        self.elems += flat.elem_count();
        self.current.vars.push(i);
        self.current.grads.push(flat);
        if self.elems >= self.bucket_elems {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends what the current bucket holds, if anything.
    fn flush(&mut self) -> candle_core::Result<()> {
        if self.current.vars.is_empty() {
            return Ok(());
        }
        let bucket = std::mem::replace(
            &mut self.current,
            Bucket {
                vars: Vec::new(),
                grads: Vec::new(),
            },
        );
        self.elems = 0;
        self.sent += 1;
        self.to_comm.send(bucket).map_err(|_| {
            candle_core::Error::Msg("backward_averaged: the communication thread stopped".into())
        })
    }
}

/// Sets every variable to rank `root`'s value (the same initial parameters on every rank).
pub fn broadcast_parameters(
    vars: &[(String, Var)],
    group: &dyn Collective,
    root: usize,
) -> Result<()> {
    for (_, v) in vars {
        let value = group.broadcast(v.as_tensor(), root)?;
        if group.rank() != root {
            v.set(&value)?; // the root keeps its own (a variable cannot be set from itself)
        }
    }
    Ok(())
}

/// The rows of a global batch of `global_rows` that rank `rank` of `world` trains on:
/// `rank·B .. (rank+1)·B` with `B = global_rows / world` (the global batch must divide evenly,
/// so that the mean of the ranks' mean losses is the global mean).
pub fn shard_rows(global_rows: usize, world: usize, rank: usize) -> Result<std::ops::Range<usize>> {
    if world == 0 || rank >= world {
        bail!("shard_rows: rank {rank} is not a rank of a world of {world}");
    }
    if !global_rows.is_multiple_of(world) {
        bail!("shard_rows: a global batch of {global_rows} rows does not split evenly over {world} ranks");
    }
    let b = global_rows / world;
    Ok(rank * b..(rank + 1) * b)
}

//! The data-parallel [`Collective`] on GPUs: NCCL, one process per GPU (feature `nccl`).
//!
//! Rank 0 makes a group id ([`NcclGroup::new_id`]) and hands its bytes to the other processes
//! (a file, an environment variable); every rank then joins with its own CUDA device
//! ([`NcclGroup::join`]). The collectives run on Candle's stream of that device, so they are
//! ordered with the step's kernels like any other op: the all-reduce is a custom op whose CUDA
//! side calls `ncclAllReduce` into a fresh buffer. One consequence for
//! [`crate::data_parallel::backward_averaged`]: a bucket's all-reduce is enqueued while the
//! backward is still being enqueued, but on the GPU it runs between the backward's kernels, not
//! beside them. Running them at the same time, as PyTorch's DDP does, needs the collectives on a
//! stream of their own, ordered against the compute stream by events (and the buckets' memory
//! kept alive until the collective has read it); that is not built.
//!
//! Built only with `--features nccl` (which links `libnccl.so.2`; the GPU host has PyTorch's).
//! Run on a GPU as a world of one (`shared/tests/nccl.rs`, one H100); worlds of several GPUs
//! have not run. The CPU implementation of the same trait,
//! [`crate::data_parallel::LocalGroup`], is what the multi-rank tests exercise.

use crate::data_parallel::Collective;
use anyhow::{anyhow, bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use std::ffi::c_char;
use std::sync::Arc;

/// One rank of a group of processes, one GPU each.
pub struct NcclGroup {
    comm: Arc<SharedComm>,
    rank: usize,
    world: usize,
}

/// The communicator (a raw NCCL handle, so neither `Send` nor `Sync` to Rust).
struct SharedComm(Comm);

// SAFETY: the communicator is used by the one thread that trains on this rank (one process per
// GPU, one training loop per process); `Collective` asks for Send + Sync so that the CPU group's
// ranks can be threads, which NCCL's ranks never are here.
unsafe impl Send for SharedComm {}
unsafe impl Sync for SharedComm {}

impl NcclGroup {
    /// A new group's id, made by rank 0 and given to every other rank.
    pub fn new_id() -> Result<[c_char; 128]> {
        Ok(*Id::new()
            .map_err(|e| anyhow!("ncclGetUniqueId: {e:?}"))?
            .internal())
    }

    /// Joins the group a launcher described in the environment (`shared::process_group`): the
    /// ranks meet at the rendezvous, rank 0 makes the NCCL id and hands it to the others there,
    /// and every rank joins on `device`. `None` outside a launched group.
    pub fn from_env(device: &Device) -> Result<Option<Self>> {
        let Some(rendezvous) = crate::process_group::TcpGroup::from_env()? else {
            return Ok(None);
        };
        let mine = if rendezvous.rank() == 0 {
            Self::new_id()?
        } else {
            [0; 128]
        };
        // The id's bytes as f32 values (exact for every byte), rank 0's to every rank.
        let bytes: Vec<f32> = mine.iter().map(|&c| c as f32).collect();
        let sent = rendezvous.broadcast(&Tensor::from_vec(bytes, 128, &Device::Cpu)?, 0)?;
        let mut id = [0 as c_char; 128];
        for (slot, v) in id.iter_mut().zip(sent.to_vec1::<f32>()?) {
            *slot = v as c_char;
        }
        Self::join(device, rendezvous.rank(), rendezvous.world(), id).map(Some)
    }

    /// Joins the group `id` as `rank` of `world` on `device` (blocks until every rank joined).
    pub fn join(device: &Device, rank: usize, world: usize, id: [c_char; 128]) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            bail!("NcclGroup::join: NCCL needs a CUDA device, got {device:?}");
        };
        if rank >= world {
            bail!("NcclGroup::join: rank {rank} is not a rank of a world of {world}");
        }
        let comm = Comm::from_rank(dev.cuda_stream(), rank, world, Id::uninit(id))
            .map_err(|e| anyhow!("ncclCommInitRank (rank {rank} of {world}): {e:?}"))?;
        Ok(Self {
            comm: Arc::new(SharedComm(comm)),
            rank,
            world,
        })
    }

    fn run(&self, t: &Tensor, op: Exchange) -> Result<Tensor> {
        if t.dtype() != DType::F32 {
            bail!(
                "NCCL collectives here take f32 tensors (the gradient bucket), got {:?}",
                t.dtype()
            );
        }
        let op = NcclOp {
            comm: self.comm.clone(),
            op,
        };
        Ok(t.contiguous()?.apply_op1_no_bwd(&op)?)
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.run(t, Exchange::Sum)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world {
            bail!(
                "broadcast: root {root} is not a rank of a world of {}",
                self.world
            );
        }
        self.run(t, Exchange::Broadcast(root))
    }
}

#[derive(Clone, Copy)]
enum Exchange {
    Sum,
    Broadcast(usize),
}

/// The collective as a Candle op: the input's elements in, a new buffer out.
struct NcclOp {
    comm: Arc<SharedComm>,
    op: Exchange,
}

impl CustomOp1 for NcclOp {
    fn name(&self) -> &'static str {
        "nccl-collective"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives run on CUDA tensors; on the CPU use LocalGroup")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (a, b) = crate::custom_op::contiguous_range(l, "NCCL input")?;
        let dev = s.device().clone();
        let src = s.as_cuda_slice::<f32>()?.slice(a..b);
        // SAFETY: NCCL writes every element of `dst` before anything reads it.
        let mut dst = unsafe { dev.alloc::<f32>(b - a)? };
        let done = match self.op {
            Exchange::Sum => self.comm.0.all_reduce(&src, &mut dst, &ReduceOp::Sum),
            Exchange::Broadcast(root) => self.comm.0.broadcast(Some(&src), &mut dst, root as i32),
        };
        done.map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}

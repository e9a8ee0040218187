//! # Ranks as processes: a [`Collective`] over TCP, and how a process finds its group
//!
//! Data parallelism on several GPUs runs one process per GPU ([`crate::nccl::NcclGroup`] moves
//! the tensors there). What a process needs besides the all-reduce is the same on any device: its
//! rank, the world size, and a meeting point where the ranks find each other. [`launch`] starts
//! `world` copies of a program with those three in the environment (`MODULE08_RANK`,
//! `MODULE08_WORLD`, `MODULE08_RENDEZVOUS`, an `address:port` that rank 0 listens on), and
//! [`TcpGroup::from_env`] joins the group from inside each copy.
//!
//! [`TcpGroup`] is the collective itself over those connections, for CPU tensors (or any tensor,
//! through host memory): every rank sends its contribution to rank 0, which adds them in rank
//! order and sends the sum back, so every rank holds the same sum bit for bit. It is slow (one
//! host round trip per call) and meant for what the CPU can test: that processes started apart
//! train as one worker on the whole batch.

use crate::data_parallel::Collective;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The environment variables [`launch`] sets and [`TcpGroup::from_env`] reads.
pub const RANK: &str = "MODULE08_RANK";
pub const WORLD: &str = "MODULE08_WORLD";
pub const RENDEZVOUS: &str = "MODULE08_RENDEZVOUS";

/// The launched group this process is a rank of ([`launch`]), if any: NCCL on a GPU (in a build
/// with the `nccl` feature, [`crate::nccl::NcclGroup`]), else the ranks' TCP connections
/// ([`TcpGroup`], which move every gradient through host memory). `None` for a process on its
/// own.
pub fn join_from_env(device: &candle_core::Device) -> Result<Option<Box<dyn Collective>>> {
    #[cfg(feature = "nccl")]
    if device.is_cuda() {
        let group = crate::nccl::NcclGroup::from_env(device)?;
        return Ok(group.map(|g| Box::new(g) as Box<dyn Collective>));
    }
    let _ = device;
    Ok(TcpGroup::from_env()?.map(|g| Box::new(g) as Box<dyn Collective>))
}

/// One rank of a group of processes connected by TCP: rank 0 holds a connection to every other
/// rank, each other rank one to rank 0.
pub struct TcpGroup {
    rank: usize,
    world: usize,
    /// Rank 0: the connections to ranks 1.. in rank order; other ranks: the one to rank 0.
    peers: Mutex<Vec<TcpStream>>,
}

impl TcpGroup {
    /// Joins the group described by `MODULE08_RANK`, `MODULE08_WORLD` and
    /// `MODULE08_RENDEZVOUS`; `None` when `MODULE08_WORLD` is not set (a process on its own).
    pub fn from_env() -> Result<Option<Self>> {
        let Ok(world) = std::env::var(WORLD) else {
            return Ok(None);
        };
        let world: usize = world.parse().with_context(|| format!("{WORLD}={world}"))?;
        let rank: usize = std::env::var(RANK)
            .with_context(|| format!("{WORLD} is set but {RANK} is not"))?
            .parse()
            .with_context(|| format!("{RANK} is not a number"))?;
        let address = std::env::var(RENDEZVOUS)
            .with_context(|| format!("{WORLD} is set but {RENDEZVOUS} is not"))?;
        Self::join(rank, world, &address, Duration::from_secs(60)).map(Some)
    }

    /// Rank 0 listens on `address` and waits for the other `world − 1` ranks; every other rank
    /// connects to it (retrying until `timeout`) and says its rank.
    pub fn join(rank: usize, world: usize, address: &str, timeout: Duration) -> Result<Self> {
        if world == 0 || rank >= world {
            bail!("TcpGroup: rank {rank} is not a rank of a world of {world}");
        }
        let peers = if rank == 0 {
            let listener = TcpListener::bind(address)
                .with_context(|| format!("rank 0 cannot listen on {address}"))?;
            listener.set_nonblocking(true)?;
            let start = Instant::now();
            let mut by_rank: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
            for _ in 1..world {
                let mut stream = loop {
                    match listener.accept() {
                        Ok((s, _)) => break s,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if start.elapsed() > timeout {
                                bail!("rank 0: not every rank of {world} joined at {address} within {timeout:?}");
                            }
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                stream.set_nonblocking(false)?;
                let r = read_u64(&mut stream)? as usize;
                if r == 0 || r >= world || by_rank[r - 1].is_some() {
                    bail!("TcpGroup: a peer says it is rank {r} of {world}, twice or out of range");
                }
                by_rank[r - 1] = Some(stream);
            }
            by_rank
                .into_iter()
                .map(|s| s.expect("every rank joined"))
                .collect()
        } else {
            let start = Instant::now();
            let mut stream = loop {
                match TcpStream::connect(address) {
                    Ok(s) => break s,
                    Err(e) if start.elapsed() < timeout => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => bail!("rank {rank} cannot reach rank 0 at {address}: {e}"),
                }
            };
            write_u64(&mut stream, rank as u64)?;
            vec![stream]
        };
        for p in &peers {
            p.set_nodelay(true)?;
            // A rank that died leaves the others an error, not a wait without end.
            p.set_read_timeout(Some(Duration::from_secs(300)))?;
        }
        Ok(Self {
            rank,
            world,
            peers: Mutex::new(peers),
        })
    }
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let mut peers = self.peers.lock().expect("TcpGroup lock poisoned");
        let values = to_host(t)?;
        let sum = if self.rank == 0 {
            // Rank order, as LocalGroup adds: the same sum on every rank.
            let mut sum = values;
            for peer in peers.iter_mut() {
                let part = read_values(peer, sum.len())?;
                for (s, p) in sum.iter_mut().zip(part) {
                    *s += p;
                }
            }
            for peer in peers.iter_mut() {
                write_values(peer, &sum)?;
            }
            sum
        } else {
            write_values(&mut peers[0], &values)?;
            read_values(&mut peers[0], values.len())?
        };
        from_host(sum, t)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world {
            bail!(
                "broadcast: root {root} is not a rank of a world of {}",
                self.world
            );
        }
        let mut peers = self.peers.lock().expect("TcpGroup lock poisoned");
        let values = to_host(t)?;
        let value = if self.rank == 0 {
            let value = if root == 0 {
                values
            } else {
                read_values(&mut peers[root - 1], values.len())?
            };
            for peer in peers.iter_mut() {
                write_values(peer, &value)?;
            }
            value
        } else {
            if self.rank == root {
                write_values(&mut peers[0], &values)?;
            }
            read_values(&mut peers[0], values.len())?
        };
        from_host(value, t)
    }
}

/// The values of `t` as f64 on the host (exact for f32, bf16 and f16).
fn to_host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// `values` as a tensor shaped, typed and placed like `like`. Sums are formed in f64 and
/// rounded once to the tensor's dtype.
fn from_host(values: Vec<f64>, like: &Tensor) -> Result<Tensor> {
    Ok(
        Tensor::from_vec(values, like.shape(), &candle_core::Device::Cpu)?
            .to_dtype(like.dtype())?
            .to_device(like.device())?,
    )
}

fn write_u64(s: &mut TcpStream, v: u64) -> Result<()> {
    s.write_all(&v.to_le_bytes())?;
    Ok(())
}

fn read_u64(s: &mut TcpStream) -> Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// A length-prefixed block of f64 values.
fn write_values(s: &mut TcpStream, values: &[f64]) -> Result<()> {
    write_u64(s, values.len() as u64)?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    s.write_all(&bytes)?;
    Ok(())
}

fn read_values(s: &mut TcpStream, expected: usize) -> Result<Vec<f64>> {
    let n = read_u64(s)? as usize;
    if n != expected {
        bail!("TcpGroup: a peer sent {n} values where {expected} were expected (tensors of different sizes)");
    }
    let mut bytes = vec![0u8; n * 8];
    s.read_exact(&mut bytes)?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Starts `world` copies of `program args…`, rank `r` with `MODULE08_RANK=r`,
/// `MODULE08_WORLD=world` and `MODULE08_RENDEZVOUS=address` (and `envs`), and waits for all of
/// them; an error
/// names every rank that failed (the others are left to finish or fail on their own connection).
pub fn launch(
    world: usize,
    address: &str,
    program: &std::path::Path,
    args: &[String],
    envs: &[(&str, String)],
) -> Result<()> {
    if world == 0 {
        bail!("launch: a world needs at least one rank");
    }
    let mut children = Vec::with_capacity(world);
    for rank in 0..world {
        let child = std::process::Command::new(program)
            .args(args)
            .env(RANK, rank.to_string())
            .env(WORLD, world.to_string())
            .env(RENDEZVOUS, address)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .spawn()
            .with_context(|| format!("starting rank {rank}: {}", program.display()))?;
        children.push(child);
    }
    let mut failed = Vec::new();
    for (rank, mut child) in children.into_iter().enumerate() {
        let status = child.wait()?;
        if !status.success() {
            failed.push(format!("rank {rank} ({status})"));
        }
    }
    if !failed.is_empty() {
        bail!("launch: {} failed", failed.join(", "));
    }
    Ok(())
}

/// A free local address for a rendezvous: `127.0.0.1:<a port the system just handed out>`.
pub fn free_local_address() -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(format!("127.0.0.1:{}", listener.local_addr()?.port()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Three ranks as threads over real sockets: the sum in rank order on every rank, the root's
    /// value from a broadcast, and an error for a size mismatch.
    #[test]
    fn three_ranks_sum_and_broadcast_over_tcp() -> Result<()> {
        let address = free_local_address()?;
        let results: Vec<Result<(Vec<f32>, Vec<f32>)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    let address = address.clone();
                    scope.spawn(move || -> Result<(Vec<f32>, Vec<f32>)> {
                        let g = TcpGroup::join(rank, 3, &address, Duration::from_secs(10))?;
                        let mine =
                            Tensor::new(&[rank as f32, 10.0 * rank as f32 + 0.5], &Device::Cpu)?;
                        let sum = g.all_reduce_sum(&mine)?.to_vec1::<f32>()?;
                        let from_two = g.broadcast(&mine, 2)?.to_vec1::<f32>()?;
                        Ok((sum, from_two))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank thread"))
                .collect()
        });
        for r in results {
            let (sum, from_two) = r?;
            assert_eq!(sum, vec![3.0, 31.5]);
            assert_eq!(from_two, vec![2.0, 20.5]);
        }
        assert!(TcpGroup::join(3, 3, &address, Duration::from_secs(1)).is_err());
        Ok(())
    }
}

//! The paged KV cache of PagedAttention (Kwon et al., 2023, vLLM).
//!
//! A contiguous cache must reserve `max_seq` positions per sequence up front, because it cannot
//! know how long the answer will be. The paged cache borrows the operating system's answer:
//! **virtual memory**. GPU memory is cut into fixed-size **blocks** of `block_size` tokens (the
//! pages) held in one shared pool; each sequence owns a **block table** (its page table) mapping
//! logical block `i` (positions `i·B … i·B + B − 1`) to a physical block. A sequence grows one
//! block at a time, so at most `B − 1` slots per sequence are wasted, and blocks return to the
//! **free list** when the sequence finishes.
//!
//! ```text
//! logical position p  →  physical slot  table[p / B] · B + p mod B
//! ```
//!
//! Blocks are **reference-counted**, so sequences with a common prefix (a system prompt, the
//! samples of one prompt) can share its blocks; the first write into a shared, partly filled
//! block copies it first (**copy-on-write**), exactly like `fork()`.
//!
//! [`BlockAllocator`] is the bookkeeping alone (also used by the serving simulation);
//! [`PagedKvCache`] adds the K/V tensors: per layer a pool `(num_blocks · B, n_kv_heads, d_head)`
//! for K and for V; attention gathers a sequence's blocks through its table.

use crate::cache::KvStore;
use candle_core::{bail, DType, Device, Result, Tensor};
use std::collections::BTreeMap;

/// A sequence's handle in a paged cache.
pub type SeqId = usize;

/// The per-sequence state: its block table and the tokens it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqBlocks {
    /// Physical block of each logical block.
    pub table: Vec<usize>,
    pub len: usize,
}

/// Block bookkeeping: free list, reference counts, block tables. No tensors.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    pub block_size: usize,
    pub num_blocks: usize,
    /// Longest sequence allowed (the model's maximum context).
    pub max_seq_len: usize,
    free: Vec<usize>,
    refcount: Vec<u32>,
    seqs: BTreeMap<SeqId, SeqBlocks>,
    next_id: SeqId,
}

/// What [`BlockAllocator::reserve`] did, so the tensor side can perform the copies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reservation {
    /// `(from, to)`: physical blocks to copy before writing (copy-on-write).
    pub copies: Vec<(usize, usize)>,
    /// Newly allocated physical blocks.
    pub fresh: Vec<usize>,
}

impl BlockAllocator {
    pub fn new(block_size: usize, num_blocks: usize, max_seq_len: usize) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 || max_seq_len == 0 {
            bail!("BlockAllocator: block_size ({block_size}), num_blocks ({num_blocks}) and max_seq_len ({max_seq_len}) must be positive");
        }
        // Pop from the end: hand out block 0 first.
        Ok(Self {
            block_size,
            num_blocks,
            max_seq_len,
            free: (0..num_blocks).rev().collect(),
            refcount: vec![0; num_blocks],
            seqs: BTreeMap::new(),
            next_id: 0,
        })
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn used_blocks(&self) -> usize {
        self.num_blocks - self.free.len()
    }

    pub fn refcount(&self, block: usize) -> u32 {
        self.refcount[block]
    }

    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    pub fn seq(&self, id: SeqId) -> Result<&SeqBlocks> {
        self.seqs
            .get(&id)
            .ok_or_else(|| candle_core::Error::Msg(format!("paged cache: no sequence {id}")))
    }

    /// A new, empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(
            id,
            SeqBlocks {
                table: Vec::new(),
                len: 0,
            },
        );
        id
    }

    /// A new sequence sharing every block of `parent` (refcounts + 1, no copy).
    pub fn fork(&mut self, parent: SeqId) -> Result<SeqId> {
        let blocks = self.seq(parent)?.clone();
        for &b in &blocks.table {
            self.refcount[b] += 1;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, blocks);
        Ok(id)
    }

    /// Blocks `seq` needs to hold `n_new` more tokens: new logical blocks, plus one copy if its
    /// last block is shared and partly filled (copy-on-write).
    pub fn blocks_needed(&self, seq: SeqId, n_new: usize) -> Result<usize> {
        let s = self.seq(seq)?;
        let total = (s.len + n_new).div_ceil(self.block_size);
        let cow = n_new > 0
            && s.len % self.block_size != 0
            && self.refcount[*s.table.last().expect("len > 0 has a block")] > 1;
        Ok(total - s.table.len() + usize::from(cow))
    }

    /// Allocates what `seq` needs for `n_new` more tokens, or fails changing nothing: beyond the
    /// maximum context, or when the pool has too few free blocks.
    pub fn reserve(&mut self, seq: SeqId, n_new: usize) -> Result<Reservation> {
        let len = self.seq(seq)?.len;
        if len + n_new > self.max_seq_len {
            bail!(
                "sequence {seq} would hold {} tokens, beyond the maximum context of {}",
                len + n_new,
                self.max_seq_len
            );
        }
        let need = self.blocks_needed(seq, n_new)?;
        if need > self.free.len() {
            bail!("KV block pool exhausted: sequence {seq} needs {need} more blocks of {} tokens, {} of {} free", self.block_size, self.free.len(), self.num_blocks);
        }
        let mut r = Reservation::default();
        let bs = self.block_size;
        let s = self.seqs.get_mut(&seq).expect("checked above");
        if n_new > 0 && len % bs != 0 {
            let last = *s.table.last().expect("len > 0 has a block");
            if self.refcount[last] > 1 {
                let fresh = self.free.pop().expect("counted in need");
                self.refcount[last] -= 1;
                self.refcount[fresh] = 1;
                *s.table.last_mut().expect("non-empty") = fresh;
                r.copies.push((last, fresh));
            }
        }
        while s.table.len() * bs < len + n_new {
            let fresh = self.free.pop().expect("counted in need");
            self.refcount[fresh] = 1;
            s.table.push(fresh);
            r.fresh.push(fresh);
        }
        Ok(r)
    }

    /// Counts `n_new` tokens as written (after [`reserve`](Self::reserve)).
    pub fn advance(&mut self, seq: SeqId, n_new: usize) -> Result<()> {
        let bs = self.block_size;
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or_else(|| candle_core::Error::Msg(format!("paged cache: no sequence {seq}")))?;
        if s.len + n_new > s.table.len() * bs {
            bail!(
                "sequence {seq}: advancing by {n_new} past its {} reserved slots",
                s.table.len() * bs
            );
        }
        s.len += n_new;
        Ok(())
    }

    /// Releases a finished sequence: every block whose refcount drops to 0 returns to the pool.
    pub fn free_sequence(&mut self, seq: SeqId) -> Result<()> {
        let s = self.seqs.remove(&seq).ok_or_else(|| {
            candle_core::Error::Msg(format!("paged cache: no sequence {seq} to free"))
        })?;
        for b in s.table {
            self.refcount[b] -= 1;
            if self.refcount[b] == 0 {
                self.free.push(b);
            }
        }
        Ok(())
    }

    /// Physical slot of logical position `pos` of `seq`.
    pub fn slot(&self, seq: SeqId, pos: usize) -> Result<usize> {
        let s = self.seq(seq)?;
        match s.table.get(pos / self.block_size) {
            Some(b) => Ok(b * self.block_size + pos % self.block_size),
            None => bail!("sequence {seq}: position {pos} has no block"),
        }
    }
}

/// Sizes of a paged cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PagedConfig {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub d_head: usize,
    /// Tokens per block (vLLM's default is 16).
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_seq_len: usize,
}

/// A paged KV cache: one pool of blocks shared by many sequences of batch size 1.
pub struct PagedKvCache {
    pub cfg: PagedConfig,
    pub alloc: BlockAllocator,
    /// Per layer `(K, V)`, each `(num_blocks · block_size, n_kv_heads, d_head)`: slot-major, so
    /// one token's heads are contiguous and a block is `block_size` consecutive rows.
    pools: Vec<(Tensor, Tensor)>,
}

impl PagedKvCache {
    pub fn new(cfg: PagedConfig, dtype: DType, device: &Device) -> Result<Self> {
        if cfg.n_layers == 0 || cfg.n_kv_heads == 0 || cfg.d_head == 0 {
            bail!("PagedKvCache: sizes must be positive: {cfg:?}");
        }
        let alloc = BlockAllocator::new(cfg.block_size, cfg.num_blocks, cfg.max_seq_len)?;
        let slots = cfg.num_blocks * cfg.block_size;
        let pools = (0..cfg.n_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros((slots, cfg.n_kv_heads, cfg.d_head), dtype, device)?,
                    Tensor::zeros((slots, cfg.n_kv_heads, cfg.d_head), dtype, device)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self { cfg, alloc, pools })
    }

    /// Bytes of the pool tensors (`2 × layers × num_blocks × block_size × n_kv_heads × d_head × bytes`).
    pub fn allocated_bytes(&self) -> usize {
        self.pools
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    pub fn add_sequence(&mut self) -> SeqId {
        self.alloc.add_sequence()
    }

    pub fn fork(&mut self, parent: SeqId) -> Result<SeqId> {
        self.alloc.fork(parent)
    }

    pub fn free_sequence(&mut self, seq: SeqId) -> Result<()> {
        self.alloc.free_sequence(seq)
    }

    /// A view of one sequence that a decoder can use as its [`KvStore`].
    pub fn seq(&mut self, seq: SeqId) -> Result<PagedSeq<'_>> {
        self.alloc.seq(seq)?;
        Ok(PagedSeq { cache: self, seq })
    }

    fn copy_block(&mut self, from: usize, to: usize) -> Result<()> {
        let bs = self.cfg.block_size;
        for (k, v) in &self.pools {
            // Materialise the source rows first: slice_set refuses a source sharing the pool's
            // storage. `force_contiguous` copies the block's rows (`copy` would clone the pool).
            let (ks, vs) = (
                k.narrow(0, from * bs, bs)?.force_contiguous()?,
                v.narrow(0, from * bs, bs)?.force_contiguous()?,
            );
            k.slice_set(&ks, 0, to * bs)?;
            v.slice_set(&vs, 0, to * bs)?;
        }
        Ok(())
    }

    /// Keys and values of `seq` in `layer`, gathered through its block table:
    /// `(1, n_kv_heads, len, d_head)` each.
    pub fn gather(&self, seq: SeqId, layer: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let s = self.alloc.seq(seq)?;
        let (bs, h, d) = (self.cfg.block_size, self.cfg.n_kv_heads, self.cfg.d_head);
        let n_blocks = len.div_ceil(bs);
        if n_blocks > s.table.len() {
            bail!(
                "sequence {seq}: {len} positions but only {} blocks",
                s.table.len()
            );
        }
        let (k, v) = &self.pools[layer];
        let ids = Tensor::from_vec(
            s.table[..n_blocks]
                .iter()
                .map(|&b| b as u32)
                .collect::<Vec<_>>(),
            n_blocks,
            k.device(),
        )?;
        let nb = self.cfg.num_blocks;
        let pick = |pool: &Tensor| -> Result<Tensor> {
            pool.reshape((nb, bs, h, d))? // (num_blocks, block, heads, d_head)
                .index_select(&ids, 0)? // the sequence's blocks, in logical order
                .reshape((n_blocks * bs, h, d))?
                .narrow(0, 0, len)?
                .transpose(0, 1)? // (heads, len, d_head)
                .contiguous()? // a standard layout: CUDA's matmul (cuBLAS) takes no other
                .unsqueeze(0)
        };
        Ok((pick(k)?, pick(v)?))
    }

    /// Writes `k, v (1, n_kv_heads, t, d_head)` of `layer` at positions `start … start + t − 1`.
    fn write(&self, seq: SeqId, layer: usize, start: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let (pk, pv) = &self.pools[layer];
        let k = k
            .squeeze(0)?
            .transpose(0, 1)?
            .to_dtype(pk.dtype())?
            .contiguous()?; // (t, heads, d_head)
        let v = v
            .squeeze(0)?
            .transpose(0, 1)?
            .to_dtype(pv.dtype())?
            .contiguous()?;
        let t = k.dim(0)?;
        let bs = self.cfg.block_size;
        let mut p = 0;
        while p < t {
            // A run of positions inside one block is contiguous in the pool.
            let pos = start + p;
            let run = (bs - pos % bs).min(t - p);
            let slot = self.alloc.slot(seq, pos)?;
            pk.slice_set(&k.narrow(0, p, run)?.contiguous()?, 0, slot)?;
            pv.slice_set(&v.narrow(0, p, run)?.contiguous()?, 0, slot)?;
            p += run;
        }
        Ok(())
    }
}

/// One sequence of a [`PagedKvCache`], usable by the decoders as a [`KvStore`].
pub struct PagedSeq<'a> {
    pub cache: &'a mut PagedKvCache,
    pub seq: SeqId,
}

impl KvStore for PagedSeq<'_> {
    fn seq_len(&self) -> usize {
        self.cache.alloc.seq(self.seq).map(|s| s.len).unwrap_or(0)
    }

    fn begin(&mut self, n_new: usize) -> Result<()> {
        let r = self.cache.alloc.reserve(self.seq, n_new)?;
        for (from, to) in r.copies {
            self.cache.copy_block(from, to)?;
        }
        Ok(())
    }

    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
        if b != 1
            || h != self.cache.cfg.n_kv_heads
            || d != self.cache.cfg.d_head
            || v.dims() != k.dims()
        {
            bail!(
                "paged cache: k {:?} / v {:?} must be (1, {}, t, {})",
                k.dims(),
                v.dims(),
                self.cache.cfg.n_kv_heads,
                self.cache.cfg.d_head
            );
        }
        if layer >= self.cache.cfg.n_layers {
            bail!(
                "paged cache: layer {layer} out of range ({} layers)",
                self.cache.cfg.n_layers
            );
        }
        let start = self.seq_len();
        self.cache.write(self.seq, layer, start, k, v)?;
        self.cache.gather(self.seq, layer, start + t)
    }

    fn commit(&mut self, n_new: usize) -> Result<()> {
        self.cache.alloc.advance(self.seq, n_new) // reserved by `begin`
    }
}

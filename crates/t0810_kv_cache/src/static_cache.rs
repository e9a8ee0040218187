//! The static KV cache: the preallocated cache of [`crate::cache`] whose *position lives on the
//! device*, so that every decode step runs the same kernels with the same arguments and can be
//! captured once into a CUDA graph and replayed ([`crate::graph`]).
//!
//! [`crate::KvCache`] writes token `t` at `slice_set(k, 2, t)` and attends over `narrow(2, 0,
//! t + 1)`: both put the host number `t` into a kernel's arguments, so each step is a different
//! launch. Here a single-token step instead
//!
//! ```text
//! writes    K[:, :, pos] ← k          a scatter whose index is read from the device tensor pos
//! attends   over all max_seq slots    keys 0 ..= pos only (8-02's `AttnMask::KeysUpTo(pos)`)
//! rotates   q, k by RoPE's row pos    read on the device (8-08's `rotate_at`)
//! advances  pos ← pos + 1             on the device
//! ```
//!
//! The prompt (many tokens, run once) takes the host path of [`crate::KvCache`]. The host keeps
//! a mirror of the position for its capacity checks.

use crate::cache::{CacheShape, KvStore};
use candle_core::{bail, DType, Device, Result, Tensor};

/// A preallocated KV cache, `(batch, n_kv_heads, max_seq, d_head)` per layer for K and for V,
/// whose single-token steps read and advance a position held on the device.
pub struct StaticKvCache {
    pub shape: CacheShape,
    pub dtype: DType,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// The host's mirror of the position (tokens cached).
    len: usize,
    /// `(1,)` `u32`: the position of the next token, on the device.
    pos: Tensor,
    /// During a single-token step (from [`KvStore::begin`] to [`KvStore::commit`]): the
    /// scatter's index `(batch, n_kv_heads, 1, d_head)` `u32`, every entry `pos`, shared by
    /// every layer.
    write_index: Option<Tensor>,
}

impl StaticKvCache {
    /// An empty cache with all `2 × n_layers` buffers allocated now.
    pub fn new(shape: CacheShape, dtype: DType, device: &Device) -> Result<Self> {
        shape.check("StaticKvCache")?;
        if shape.max_seq > u32::MAX as usize {
            bail!(
                "StaticKvCache: max_seq {} does not fit a u32 position",
                shape.max_seq
            );
        }
        let buffers = || {
            (0..shape.n_layers)
                .map(|_| shape.layer_buffer(dtype, device))
                .collect::<Result<Vec<_>>>()
        };
        Ok(Self {
            shape,
            dtype,
            k: buffers()?,
            v: buffers()?,
            len: 0,
            pos: Tensor::zeros(1, DType::U32, device)?,
            write_index: None,
        })
    }

    /// The `(1,)` `u32` device tensor holding the next token's position.
    pub fn position(&self) -> &Tensor {
        &self.pos
    }

    /// Forgets every cached token (the buffers are kept; old entries beyond the position are
    /// never attended to).
    pub fn reset(&mut self) -> Result<()> {
        self.len = 0;
        self.write_index = None;
        self.pos.slice_set(&self.pos.zeros_like()?, 0, 0)
    }

    /// Sets the host's mirror of the position: after a capture (recorded, not run) and after
    /// each replay of a captured step, whose kernels advance only the device position.
    pub(crate) fn set_host_len(&mut self, len: usize) {
        self.len = len;
    }

    /// Drops a begun step's tensors (a capture must free what it allocated before it ends).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn clear_step(&mut self) {
        self.write_index = None;
    }

    fn check_new(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<usize> {
        let (b, h, t, d) = k.dims4()?;
        let s = self.shape;
        if (b, h, d) != (s.batch, s.n_kv_heads, s.d_head) || v.dims() != k.dims() {
            bail!("StaticKvCache: new k {:?} / v {:?} do not fit a cache of batch {}, {} K/V heads, d_head {}", k.dims(), v.dims(), s.batch, s.n_kv_heads, s.d_head);
        }
        if layer >= self.k.len() {
            bail!(
                "StaticKvCache: layer {layer} out of range ({} layers)",
                self.k.len()
            );
        }
        Ok(t)
    }
}

impl KvStore for StaticKvCache {
    fn seq_len(&self) -> usize {
        self.len
    }

    /// Checks room on the host; a single-token step also computes, from the device position,
    /// the scatter index every layer uses.
    fn begin(&mut self, n_new: usize) -> Result<()> {
        let s = self.shape;
        if self.len + n_new > s.max_seq {
            bail!(
                "KV cache full: {} cached + {n_new} new tokens exceed its max_seq of {}",
                self.len,
                s.max_seq
            );
        }
        self.write_index = if n_new == 1 {
            let index_shape = (s.batch, s.n_kv_heads, 1, s.d_head);
            let pos = self.pos.reshape((1, 1, 1, 1))?;
            Some(pos.broadcast_as(index_shape)?.contiguous()?)
        } else {
            None
        };
        Ok(())
    }

    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = self.check_new(layer, k, v)?;
        let (kb, vb) = (&self.k[layer], &self.v[layer]);
        let (k, v) = (
            k.to_dtype(self.dtype)?.contiguous()?,
            v.to_dtype(self.dtype)?.contiguous()?,
        );
        match &self.write_index {
            Some(index) if t == 1 => {
                kb.scatter_set(index, &k, 2)?; // K[:, :, pos] ← k
                vb.scatter_set(index, &v, 2)?;
                Ok((kb.clone(), vb.clone())) // every slot; attention reads 0 ..= pos
            }
            Some(_) => bail!("StaticKvCache: begin(1) was called, but {t} tokens were appended"),
            None => {
                if self.len + t > self.shape.max_seq {
                    bail!(
                        "KV cache full: {} cached + {t} new tokens exceed its max_seq of {}",
                        self.len,
                        self.shape.max_seq
                    );
                }
                kb.slice_set(&k, 2, self.len)?;
                vb.slice_set(&v, 2, self.len)?;
                Ok((
                    kb.narrow(2, 0, self.len + t)?,
                    vb.narrow(2, 0, self.len + t)?,
                ))
            }
        }
    }

    /// Advances the host mirror and, on the device, `pos ← pos + n_new`.
    fn commit(&mut self, n_new: usize) -> Result<()> {
        self.write_index = None;
        self.pos.slice_set(&(&self.pos + n_new as f64)?, 0, 0)?;
        self.len += n_new;
        Ok(())
    }

    fn device_position(&self) -> Option<&Tensor> {
        self.write_index.as_ref().map(|_| &self.pos)
    }
}

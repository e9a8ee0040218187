//! The contiguous KV cache: one `(batch, n_kv_heads, max_seq, d_head)` buffer per layer for K and
//! one for V, allocated once and written in place, plus the naive concatenating version.

use candle_core::{bail, DType, Device, Result, Tensor};

/// The store the attention component writes through (defined with the component in 8-02).
pub use t0802_multi_head_attention::KvStore;

/// The two ways of growing a per-layer cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CacheKind {
    /// One buffer of `max_seq` positions per layer, allocated up front, written in place
    /// (`Tensor::slice_set`): no allocation and no copy of old entries while decoding.
    Preallocated,
    /// `K ← cat(K, k_new)`: allocates and copies the whole cache at every step (`O(t)` per
    /// token, `O(t²)` per sequence) — the version to compare against.
    Concat,
}

/// The shape of a cache: `(batch, n_kv_heads, max_seq, d_head)` per layer, for K and for V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CacheShape {
    pub n_layers: usize,
    pub batch: usize,
    pub n_kv_heads: usize,
    pub max_seq: usize,
    pub d_head: usize,
}

impl CacheShape {
    /// Refuses a zero size, naming the cache `what`.
    pub fn check(&self, what: &str) -> Result<()> {
        let s = self;
        if [s.n_layers, s.batch, s.n_kv_heads, s.max_seq, s.d_head].contains(&0) {
            bail!("{what}: every size must be positive, got {self:?}");
        }
        Ok(())
    }

    /// One layer's K (or V) buffer, all `max_seq` slots, zeroed:
    /// `(batch, n_kv_heads, max_seq, d_head)`.
    pub fn layer_buffer(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let s = self;
        Tensor::zeros((s.batch, s.n_kv_heads, s.max_seq, s.d_head), dtype, device)
    }

    /// `2 × batch × layers × n_kv_heads × seq × d_head × bytes`: the memory formula.
    pub fn bytes(&self, seq: usize, bytes_per_element: usize) -> usize {
        kv_cache_bytes(
            self.batch,
            self.n_layers,
            self.n_kv_heads,
            seq,
            self.d_head,
            bytes_per_element,
        )
    }
}

/// KV-cache bytes: `2 (K and V) × batch × n_layers × n_kv_heads × seq × d_head × bytes/element`.
pub fn kv_cache_bytes(
    batch: usize,
    n_layers: usize,
    n_kv_heads: usize,
    seq: usize,
    d_head: usize,
    bytes_per_element: usize,
) -> usize {
    2 * batch * n_layers * n_kv_heads * seq * d_head * bytes_per_element
}

enum LayerKv {
    /// Full-size buffers; only `..len` is valid.
    Preallocated { k: Tensor, v: Tensor },
    /// Exactly `len` positions (None before the first token).
    Concat { kv: Option<(Tensor, Tensor)> },
}

/// A contiguous KV cache for every layer of a decoder.
pub struct KvCache {
    pub shape: CacheShape,
    pub kind: CacheKind,
    pub dtype: DType,
    layers: Vec<LayerKv>,
    len: usize,
}

impl KvCache {
    /// An empty cache; [`CacheKind::Preallocated`] allocates all `2 × n_layers` buffers now.
    pub fn new(shape: CacheShape, kind: CacheKind, dtype: DType, device: &Device) -> Result<Self> {
        shape.check("KvCache")?;
        let layers = (0..shape.n_layers)
            .map(|_| match kind {
                CacheKind::Preallocated => Ok(LayerKv::Preallocated {
                    k: shape.layer_buffer(dtype, device)?,
                    v: shape.layer_buffer(dtype, device)?,
                }),
                CacheKind::Concat => Ok(LayerKv::Concat { kv: None }),
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            shape,
            kind,
            dtype,
            layers,
            len: 0,
        })
    }

    /// Forgets every cached token (the buffers are kept and reused).
    pub fn reset(&mut self) {
        self.len = 0;
        for l in &mut self.layers {
            if let LayerKv::Concat { kv } = l {
                *kv = None;
            }
        }
    }

    /// Bytes held by the cache's tensors right now (the preallocated version holds the full
    /// `max_seq` from the start; the concatenating one only what it has seen).
    pub fn allocated_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.layers
            .iter()
            .map(|l| match l {
                LayerKv::Preallocated { k, v } => bytes(k) + bytes(v),
                LayerKv::Concat { kv: Some((k, v)) } => bytes(k) + bytes(v),
                LayerKv::Concat { kv: None } => 0,
            })
            .sum()
    }

    /// The cached keys and values of `layer`: `(batch, n_kv_heads, seq_len, d_head)` each.
    pub fn layer(&self, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        if self.len == 0 {
            return Ok(None);
        }
        match self.layers.get(layer) {
            Some(LayerKv::Preallocated { k, v }) => {
                Ok(Some((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?)))
            }
            Some(LayerKv::Concat { kv }) => Ok(kv.clone()),
            None => bail!(
                "KvCache: layer {layer} out of range ({} layers)",
                self.layers.len()
            ),
        }
    }

    fn check_new(&self, k: &Tensor, v: &Tensor) -> Result<usize> {
        let (b, h, t, d) = k.dims4()?;
        let s = self.shape;
        if (b, h, d) != (s.batch, s.n_kv_heads, s.d_head) || v.dims() != k.dims() {
            bail!("KvCache: new k {:?} / v {:?} do not fit a cache of batch {}, {} K/V heads, d_head {}", k.dims(), v.dims(), s.batch, s.n_kv_heads, s.d_head);
        }
        Ok(t)
    }
}

impl KvStore for KvCache {
    fn seq_len(&self) -> usize {
        self.len
    }

    fn begin(&mut self, n_new: usize) -> Result<()> {
        if self.len + n_new > self.shape.max_seq {
            bail!(
                "KV cache full: {} cached + {n_new} new tokens exceed its max_seq of {}",
                self.len,
                self.shape.max_seq
            );
        }
        Ok(())
    }

    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = self.check_new(k, v)?;
        let (len, max_seq, n_layers) = (self.len, self.shape.max_seq, self.layers.len());
        if len + t > max_seq {
            bail!("KV cache full: {len} cached + {t} new tokens exceed its max_seq of {max_seq}");
        }
        match self.layers.get_mut(layer) {
            Some(LayerKv::Preallocated { k: kb, v: vb }) => {
                // In place: positions len .. len+t of dim 2 (seq) of the big buffers.
                kb.slice_set(&k.to_dtype(kb.dtype())?.contiguous()?, 2, len)?;
                vb.slice_set(&v.to_dtype(vb.dtype())?.contiguous()?, 2, len)?;
                Ok((kb.narrow(2, 0, len + t)?, vb.narrow(2, 0, len + t)?))
            }
            Some(LayerKv::Concat { kv }) => {
                // Detached: a cached tensor must not keep the autograd graph that produced it
                // alive (with trainable weights, that graph reaches every activation of the
                // prefill, attention weights included).
                let (k, v) = (
                    k.to_dtype(self.dtype)?.detach(),
                    v.to_dtype(self.dtype)?.detach(),
                );
                let new = match kv.take() {
                    // Drop anything a failed step may have left beyond `len`.
                    Some((ko, vo)) => (
                        Tensor::cat(&[&ko.narrow(2, 0, len)?, &k], 2)?,
                        Tensor::cat(&[&vo.narrow(2, 0, len)?, &v], 2)?,
                    ),
                    None => (k, v),
                };
                *kv = Some(new.clone());
                Ok(new)
            }
            None => bail!("KvCache: layer {layer} out of range ({n_layers} layers)"),
        }
    }

    fn commit(&mut self, n_new: usize) -> Result<()> {
        self.len += n_new;
        Ok(())
    }
}

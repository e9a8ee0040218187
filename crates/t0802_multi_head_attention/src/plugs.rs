//! The component's other two plug points: positions *inside* attention, and a KV store.

use candle_core::{Result, Tensor};

/// A position scheme that acts inside attention rather than on the embeddings: RoPE (8-08)
/// rotates `q` and `k`; relative biases (8-03's T5 bias) add a learned term to the scores.
pub trait PositionPlug: Send + Sync {
    /// Rotates `q (batch, n_heads, n, d)` and `k (batch, n_kv_heads, n, d)` of the `n` tokens at
    /// positions `start_pos …` (identity by default).
    fn rotate(&self, q: &Tensor, k: &Tensor, start_pos: usize) -> Result<(Tensor, Tensor)> {
        let _ = start_pos;
        Ok((q.clone(), k.clone()))
    }

    /// Rotates one new token per sequence whose position is the `(1,)` `u32` device tensor
    /// `pos` rather than a host number: the form a decode step captured into a CUDA graph
    /// needs (8-10), whose position changes at every replay while its kernels' arguments do
    /// not. Schemes without a device form say so.
    fn rotate_at(&self, q: &Tensor, k: &Tensor, pos: &Tensor) -> Result<(Tensor, Tensor)> {
        let _ = (q, k, pos);
        candle_core::bail!(
            "this position scheme reads its position on the host; it cannot rotate at a device position"
        )
    }

    /// An additive score bias broadcastable to `(batch, n_heads, n_q, n_k)` for queries that are
    /// the last `n_q` of `n_k` positions (`None` by default).
    fn score_bias(&self, n_q: usize, n_k: usize) -> Result<Option<Tensor>> {
        let _ = (n_q, n_k);
        Ok(None)
    }
}

/// Where cached decoding keeps the keys and values of earlier tokens (8-10 implements it: a
/// preallocated or concatenating cache, and the paged cache). The attention component writes
/// its new `k, v` through it and attends over everything it returns.
pub trait KvStore {
    /// Tokens already cached (= the position of the next token).
    fn seq_len(&self) -> usize;
    /// Makes room for `n_new` more tokens, or fails without changing anything.
    fn begin(&mut self, n_new: usize) -> Result<()>;
    /// Writes `k, v (batch, n_kv_heads, n_new, d_head)` of `layer` after the cached tokens and
    /// returns the keys and values of all `seq_len() + n_new` tokens, same layout.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)>;
    /// Counts the `n_new` tokens written by the last `append` of every layer.
    fn commit(&mut self, n_new: usize) -> Result<()>;

    /// For a store whose position lives on the device (8-10's static cache, decoding one token
    /// per step): the `(1,)` `u32` position of the token being written. `append` then returns
    /// the store's whole buffer, of which slots `0 ..= position` are written
    /// ([`crate::AttnMask::KeysUpTo`]), so that every step has the same shapes and arguments.
    /// `None` (the default): the position is `seq_len()` on the host.
    fn device_position(&self) -> Option<&Tensor> {
        None
    }
}

/// One layer's slot in a [`KvStore`], handed to the attention component's forward.
pub struct CacheSlot<'a> {
    pub store: &'a mut dyn KvStore,
    pub layer: usize,
}

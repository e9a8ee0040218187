//! The attention *kernel*: the part of the component that turns per-head `q, k, v` into per-head
//! outputs. The component (projections, heads, positions, cache, `W_o`) is written once; what
//! computes `softmax(Q·Kᵀ/√d + bias, masked)·V` is a plug:
//!
//! * [`NaiveAttention`] (this topic): 8-01's scaled dot-product attention on every head,
//!   materialising the `(n_q, n_k)` weights;
//! * 8-06's fused causal softmax and 8-09's FlashAttention implement the same trait.
//!
//! ## Fewer K/V heads than query heads
//! Grouped-query attention (8-07) gives `n_kv_heads < n_heads` K/V heads, each shared by a group
//! of `g = n_heads / n_kv_heads` consecutive query heads. Every kernel accepts that layout. The
//! naive kernel folds each group into the query rows — `q (b, n_heads, n_q, d)` →
//! `(b, n_kv, g·n_q, d)`, a free reshape — so one batched matmul per K/V head serves its whole
//! group and no K/V head is copied ([`fold_query_groups`]); with an explicit mask or a score bias
//! it repeats the K/V heads instead ([`repeat_kv`]), which is simple and exact.

use candle_core::{bail, DType, Device, Result, Tensor};
use t0801_self_attention::{and_masks, attention_with_bias, causal_mask, Attention};

/// What a kernel must hide.
#[derive(Debug, Clone, Copy)]
pub enum AttnMask<'a> {
    /// Every query sees every key.
    None,
    /// The queries are the *last* `n_q` of the `n_k` positions and see only keys at or before
    /// their own position (end-aligned, so decoding with a cache needs no other mask).
    Causal,
    /// A `u8` mask, 1 = may attend, broadcastable to `(batch, heads, n_q, n_k)` (hand-made
    /// patterns).
    Explicit(&'a Tensor),
    /// Padding at the end of each sequence's keys (the batches of `shared::batching`), and
    /// causal on top when `causal` is set: a kernel that knows the lengths skips the padding
    /// (FlashAttention), the others get it as an explicit mask ([`AttnMask::lowered`]).
    Padding { keys: &'a KeyPadding, causal: bool },
    /// Keys `0 ..= last` only, `last` being a `(1,)` `u32` tensor on the device (8-10's static
    /// cache: its write position). The queries' count of keys lives on the device, so a step
    /// captured into a CUDA graph replays it for any position. A kernel that reads it there
    /// (8-06's fused softmax) needs nothing more; naive attention gets the explicit mask;
    /// FlashAttention, whose key lengths are host numbers, refuses it.
    KeysUpTo(&'a Tensor),
}

/// `0, 1, …, n − 1` as a `(1, 1, 1, n)` `u32` tensor on `device`, made once per device and
/// length and then shared: lowering [`AttnMask::KeysUpTo`] compares it with the last key, and a
/// step captured into a CUDA graph may not upload it from the host.
fn slot_indices(n: usize, device: &Device) -> Result<Tensor> {
    use std::sync::{Mutex, OnceLock};
    static MADE: OnceLock<Mutex<Vec<Tensor>>> = OnceLock::new();
    let mut made = MADE
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .map_err(|_| candle_core::Error::Msg("slot indices: a thread panicked".into()))?;
    if let Some(t) = made
        .iter()
        .find(|t| t.dim(3).ok() == Some(n) && t.device().same_device(device))
    {
        return Ok(t.clone());
    }
    let t = Tensor::arange(0u32, n as u32, device)?.reshape((1, 1, 1, n))?;
    made.push(t.clone());
    Ok(t)
}

/// Key padding of a batch: sequence `b` has `lengths[b]` real keys of `n_keys`, then padding.
/// Holds the lengths (host) and, when some sequence is padded, the `u8` mask
/// `(batch, 1, 1, n_keys)` built from them (a batch without padding makes no tensor).
#[derive(Debug, Clone)]
pub struct KeyPadding {
    lengths: std::sync::Arc<[usize]>,
    n_keys: usize,
    mask: Option<Tensor>,
}

impl KeyPadding {
    /// `lengths[b]` real keys (each in `1..=n_keys`: a sequence with no key has no attention).
    pub fn new(lengths: &[usize], n_keys: usize, device: &Device) -> Result<Self> {
        if lengths.is_empty() {
            bail!("key padding: no sequences");
        }
        if let Some((b, &n)) = lengths
            .iter()
            .enumerate()
            .find(|(_, &n)| n == 0 || n > n_keys)
        {
            bail!("key padding: sequence {b} has {n} real keys, not in 1..={n_keys}");
        }
        let mask = if lengths.iter().all(|&n| n == n_keys) {
            None
        } else {
            let data: Vec<u8> = lengths
                .iter()
                .flat_map(|&n| (0..n_keys).map(move |j| u8::from(j < n)))
                .collect();
            Some(Tensor::from_vec(
                data,
                (lengths.len(), 1, 1, n_keys),
                device,
            )?)
        };
        Ok(Self {
            lengths: lengths.into(),
            n_keys,
            mask,
        })
    }

    /// From a `(batch, n_keys)` mask, 1 = real token, whose ones come first in every row (read
    /// back to the host); a mask with a hole is an error.
    pub fn from_mask(key_mask: &Tensor) -> Result<Self> {
        let (_, n_keys) = key_mask.dims2()?;
        let rows = key_mask.to_dtype(DType::U8)?.to_vec2::<u8>()?;
        let mut lengths = Vec::with_capacity(rows.len());
        for (b, row) in rows.iter().enumerate() {
            let n = row.iter().take_while(|&&m| m != 0).count();
            if row[n..].iter().any(|&m| m != 0) {
                bail!("key padding: the mask of sequence {b} has padding before a real token (padding must come last)");
            }
            lengths.push(n);
        }
        Self::new(&lengths, n_keys, key_mask.device())
    }

    /// Real keys of each sequence.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// The lengths, shareable with an op that outlives this value.
    pub fn shared_lengths(&self) -> std::sync::Arc<[usize]> {
        self.lengths.clone()
    }

    /// Keys per sequence, padding included.
    pub fn n_keys(&self) -> usize {
        self.n_keys
    }

    /// `(batch, 1, 1, n_keys)` `u8`, 1 = real key; `None` when no sequence has padding.
    pub fn mask(&self) -> Option<&Tensor> {
        self.mask.as_ref()
    }

    /// Whether no sequence has padding.
    pub fn is_full(&self) -> bool {
        self.mask.is_none()
    }
}

/// An [`AttnMask`] without its [`AttnMask::Padding`] form (see [`AttnMask::lowered`]).
pub enum LoweredMask<'a> {
    Borrowed(AttnMask<'a>),
    Owned(Tensor),
}

impl LoweredMask<'_> {
    pub fn get(&self) -> AttnMask<'_> {
        match self {
            LoweredMask::Borrowed(m) => *m,
            LoweredMask::Owned(t) => AttnMask::Explicit(t),
        }
    }
}

impl<'a> AttnMask<'a> {
    /// The same mask for kernels that take no lengths: padding of which nothing is padded
    /// becomes `None` or `Causal`, other padding the explicit mask (causal ∧ key padding) for
    /// `n_q` queries over the padding's keys; keys up to a device index, the explicit mask
    /// `(1, 1, 1, n_k)` over `n_k` keys.
    pub fn lowered(self, n_q: usize, n_k: usize) -> Result<LoweredMask<'a>> {
        if let AttnMask::KeysUpTo(last) = self {
            let slots = slot_indices(n_k, last.device())?;
            let last = last.reshape((1, 1, 1, 1))?;
            return Ok(LoweredMask::Owned(slots.broadcast_le(&last)?));
        }
        let AttnMask::Padding { keys, causal } = self else {
            return Ok(LoweredMask::Borrowed(self));
        };
        Ok(match (keys.mask(), causal) {
            (None, false) => LoweredMask::Borrowed(AttnMask::None),
            (None, true) => LoweredMask::Borrowed(AttnMask::Causal),
            (Some(mask), false) => LoweredMask::Borrowed(AttnMask::Explicit(mask)),
            (Some(mask), true) => {
                let causal = causal_mask(n_q, keys.n_keys(), mask.device())?;
                LoweredMask::Owned(and_masks(&causal, mask)?) // (batch, 1, n_q, n_keys)
            }
        })
    }
}

/// An attention kernel: `q (batch, n_heads, n_q, d)`, `k, v (batch, n_kv_heads, n_k, d)` with
/// `n_kv_heads` dividing `n_heads` (query head `h` reads K/V head `h / (n_heads / n_kv_heads)`),
/// an optional additive `score_bias` broadcastable to `(batch, n_heads, n_q, n_k)` →
/// `(batch, n_heads, n_q, d)`, scaled by `1/√d`.
pub trait AttentionKernel: Send + Sync {
    /// A short name for logs (`naive`, `fused-softmax`, `flash`).
    fn name(&self) -> &'static str;
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: AttnMask<'_>,
        score_bias: Option<&Tensor>,
    ) -> Result<Tensor>;
}

/// 8-01's scaled dot-product attention on every head, composed from tensor ops.
#[derive(Debug, Clone, Copy, Default)]
pub struct NaiveAttention;

impl NaiveAttention {
    /// The outputs *and* the attention weights `(batch, n_heads, n_q, n_k)`, for inspection.
    pub fn attend_with_weights(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: AttnMask<'_>,
        score_bias: Option<&Tensor>,
    ) -> Result<Attention> {
        let lowered = mask.lowered(q.dim(2)?, k.dim(2)?)?;
        let mask = lowered.get();
        let g = group_size(q, k)?;
        let (k, v) = (repeat_kv(k, g)?, repeat_kv(v, g)?);
        let causal = match mask {
            AttnMask::Causal => Some(causal_mask(q.dim(2)?, k.dim(2)?, q.device())?),
            _ => None,
        };
        let mask = match mask {
            AttnMask::None => None,
            AttnMask::Causal => causal.as_ref(),
            AttnMask::Explicit(m) => Some(m),
            AttnMask::Padding { .. } | AttnMask::KeysUpTo(_) => {
                bail!("naive attention: a mask left unlowered")
            }
        };
        attention_with_bias(q, &k, &v, score_bias, mask)
    }
}

impl AttentionKernel for NaiveAttention {
    fn name(&self) -> &'static str {
        "naive"
    }

    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: AttnMask<'_>,
        score_bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let lowered = mask.lowered(q.dim(2)?, k.dim(2)?)?;
        let mask = lowered.get();
        let g = group_size(q, k)?;
        let foldable = matches!(mask, AttnMask::None | AttnMask::Causal) && score_bias.is_none();
        if g == 1 || !foldable {
            return Ok(self.attend_with_weights(q, k, v, mask, score_bias)?.output);
        }
        let (b, n_heads, n_q, d) = q.dims4()?;
        let n_k = k.dim(2)?;
        let (q, g) = fold_query_groups(q, k.dim(1)?)?; // (b, n_kv, g·n_q, d)
        let mask = match mask {
            AttnMask::Causal => Some(grouped_causal_mask(g, n_q, n_k, q.device())?),
            _ => None,
        };
        let (k, v) = (gemm_operand(k)?, gemm_operand(v)?);
        let att = attention_with_bias(&q, &k, &v, None, mask.as_ref())?;
        att.output.reshape((b, n_heads, n_q, d))
    }
}

/// `g = n_heads / n_kv_heads` of `q (b, n_heads, n_q, d)` and `k (b, n_kv_heads, n_k, d)`, or an
/// error naming both when the K/V heads cannot serve the query heads.
pub fn group_size(q: &Tensor, k: &Tensor) -> Result<usize> {
    let (n_heads, n_kv) = (q.dim(1)?, k.dim(1)?);
    if n_kv == 0 || !n_heads.is_multiple_of(n_kv) {
        bail!("attention kernel: {n_kv} K/V heads cannot serve {n_heads} query heads");
    }
    Ok(n_heads / n_kv)
}

/// Folds each group of `g = n_heads / n_kv_heads` query heads into the query rows:
/// `q (b, n_heads, n_q, d)` → `(b, n_kv_heads, g·n_q, d)`, rows ordered (head in group, query),
/// so that one batched matmul per K/V head serves its whole group. Returns the folded `q` and `g`;
/// `reshape((b, n_heads, n_q, d))` of an output unfolds it.
pub fn fold_query_groups(q: &Tensor, n_kv: usize) -> Result<(Tensor, usize)> {
    let (b, n_heads, n_q, d) = q.dims4()?;
    if n_kv == 0 || !n_heads.is_multiple_of(n_kv) {
        bail!("attention kernel: {n_kv} K/V heads cannot serve {n_heads} query heads");
    }
    let g = n_heads / n_kv;
    Ok((q.contiguous()?.reshape((b, n_kv, g * n_q, d))?, g))
}

/// The causal mask `(g·n_q, n_k)` for `g` stacked query groups (row `r` is query `r mod n_q`).
pub fn grouped_causal_mask(g: usize, n_q: usize, n_k: usize, device: &Device) -> Result<Tensor> {
    let m = causal_mask(n_q, n_k, device)?; // (n_q, n_k)
    if g == 1 {
        return Ok(m);
    }
    Tensor::cat(&vec![m; g], 0)
}

/// Repeats each K/V head `group` times: `(b, n_kv, n, d)` → `(b, n_kv·group, n, d)`, head `h` of
/// the result being K/V head `h / group`. Materialises the copies that grouped-query attention
/// saves; used where a kernel needs one K/V head per query head.
pub fn repeat_kv(x: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(x.clone());
    }
    let (b, n_kv, n, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, n_kv, group, n, d))?
        .contiguous()?
        .reshape((b, n_kv * group, n, d))
}

/// `x (b, h, n, d)` as a batched-GEMM operand: as it is when its rows are contiguous and its
/// `b·h` matrices evenly spaced — the first `n` positions of a preallocated KV cache
/// `(b, h, max_seq, d)` are, so decoding reads the cache in place — else a contiguous copy.
pub fn gemm_operand(x: &Tensor) -> Result<Tensor> {
    let (_, h, n, d) = x.dims4()?;
    let s = x.stride();
    let rows_contiguous = s[3] == 1 && (s[2] == d || n == 1);
    let evenly_spaced = s[0] == s[1] * h || x.dim(0)? == 1 || h == 1;
    if rows_contiguous && evenly_spaced {
        Ok(x.clone())
    } else {
        x.contiguous()
    }
}

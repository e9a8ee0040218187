//! The FlashAttention forward written with Candle tensor ops: the algorithm to read.
//!
//! Every `(batch, head)` is processed at once (the tensors keep their two leading dims); the
//! loops run over **query blocks** (outer) and **key blocks** (inner), as in FlashAttention-2.
//! At no point does a tensor of `n_q × n_k` scores exist: the largest is one
//! `(batch, heads, block_q, block_k)` tile.
//!
//! It runs on any device and is differentiable through Candle's autograd (the running maximum is
//! detached: the result does not depend on it mathematically), but it is *not* fast: each tile
//! is a handful of separate kernels whose intermediates still go through memory. The speed comes
//! from fusing the whole loop into one kernel ([`crate::FlashAttention`]).

use candle_core::{bail, DType, Device, Result, Tensor, D};

/// Tiled attention with the online softmax; returns `(O, L)`.
///
/// `q (b, h, n_q, d)`, `k (b, h, n_k, d)`, `v (b, h, n_k, d_v)` → `O (b, h, n_q, d_v)` and the row
/// log-sum-exp `L (b, h, n_q)` (same dtype as the inputs). Causal masks are end-aligned
/// (`j ≤ i + n_k − n_q`); key blocks entirely above the diagonal are skipped.
pub fn flash_attention_tensor_ops(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    softmax_scale: f64,
    block_q: usize,
    block_k: usize,
) -> Result<(Tensor, Tensor)> {
    crate::check_inputs(q, k, v, softmax_scale, causal)?;
    if block_q == 0 || block_k == 0 {
        bail!("flash_attention_tensor_ops: block sizes must be ≥ 1, got block_q {block_q}, block_k {block_k}");
    }
    let (b, h, n_q, _d) = q.dims4()?;
    let (n_k, d_v) = (k.dim(2)?, v.dim(3)?);
    let offset = n_k.saturating_sub(n_q); // causal: key j visible to query i iff j ≤ i + offset
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for i0 in (0..n_q).step_by(block_q) {
        let rows = block_q.min(n_q - i0);
        // The block's queries, pre-scaled: (b, h, rows, d).
        let q_i = (q.narrow(2, i0, rows)? * softmax_scale)?;

        // Running max m, running sum ℓ and unnormalised output õ of the block's rows.
        let minus_inf = Tensor::full(f32::NEG_INFINITY, (b, h, rows, 1), q.device())?;
        let mut m = minus_inf.to_dtype(q.dtype())?;
        let mut l = Tensor::zeros((b, h, rows, 1), q.dtype(), q.device())?;
        let mut acc = Tensor::zeros((b, h, rows, d_v), q.dtype(), q.device())?;
        // Causal: the block's last query sees keys < i0 + rows + offset; later tiles are skipped.
        let k_end = if causal {
            (i0 + rows + offset).min(n_k)
        } else {
            n_k
        };
        for j0 in (0..k_end).step_by(block_k) {
            let cols = block_k.min(k_end - j0);
            let k_j = k.narrow(2, j0, cols)?; // (b, h, cols, d)
            let v_j = v.narrow(2, j0, cols)?; // (b, h, cols, d_v)
            let mut s = q_i.matmul(&k_j.t()?)?; // (b, h, rows, cols): one tile of scores
            if causal && j0 + cols - 1 > i0 + offset {
                // The tile crosses the diagonal: mask the keys a query may not see.
                s = t0801_self_attention::mask_scores(
                    &s,
                    &tile_causal_mask(i0, rows, j0, cols, offset, q.device())?,
                )?;
            }
            let m_new = m.maximum(&s.max_keepdim(D::Minus1)?.detach())?; // (b, h, rows, 1)
            let p = s.broadcast_sub(&m_new)?.exp()?; // (b, h, rows, cols)
            let alpha = (&m - &m_new)?.exp()?; // rescales what was summed against the old max
            l = ((&alpha * &l)? + p.sum_keepdim(D::Minus1)?)?;
            acc = (acc.broadcast_mul(&alpha)? + p.matmul(&v_j.contiguous()?)?)?;
            m = m_new;
        }
        outs.push(acc.broadcast_div(&l)?); // O = õ / ℓ
        lses.push((m + l.log()?)?.squeeze(3)?); // L = m + ln ℓ
    }
    Ok((Tensor::cat(&outs, 2)?, Tensor::cat(&lses, 2)?))
}

/// The `(rows, cols)` piece of the end-aligned causal mask for queries `i0..i0+rows` and keys
/// `j0..j0+cols`: 1 where `j ≤ i + offset`.
fn tile_causal_mask(
    i0: usize,
    rows: usize,
    j0: usize,
    cols: usize,
    offset: usize,
    dev: &Device,
) -> Result<Tensor> {
    let data: Vec<u8> = (i0..i0 + rows)
        .flat_map(|i| (j0..j0 + cols).map(move |j| u8::from(j <= i + offset)))
        .collect();
    Tensor::from_vec(data, (rows, cols), dev)?.to_dtype(DType::U8)
}

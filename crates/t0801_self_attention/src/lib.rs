//! # 8-01 · Self-attention from raw Q/K/V matrices
//!
//! Attention is a *soft dictionary lookup*. Each position asks a question (its **query**), every
//! position advertises what it holds (its **key**) and what it will hand over (its **value**).
//! The answer is an average of the values, weighted by how well each key matches the query:
//!
//! ```text
//! Attention(Q, K, V) = softmax(Q·Kᵀ / √d_k) · V
//!   Q: (…, n_q, d_k)   K: (…, n_k, d_k)   V: (…, n_k, d_v)   → (…, n_q, d_v)
//! ```
//!
//! In *self*-attention the three come from the same sequence `X (batch, seq, d_model)` through
//! three raw weight matrices, stored `(d_out, d_in)` and applied as `X·Wᵀ`:
//! `Q = X·W_qᵀ`, `K = X·W_kᵀ`, `V = X·W_vᵀ`.
//!
//! Cost: the score matrix `Q·Kᵀ` has `n²` entries, each a `d`-long dot product, so the layer
//! does `O(n²·d)` work and holds `O(n²)` memory per head: the bottleneck that FlashAttention
//! (8-09) attacks.

use candle_core::{bail, DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use shared::params::{expect_last_dim, weight};

/// The output of an attention call and the weights that produced it.
#[derive(Debug, Clone)]
pub struct Attention {
    /// `(…, n_q, d_v)`
    pub output: Tensor,
    /// `(…, n_q, n_k)`; every row sums to 1 over the keys it may attend to.
    pub weights: Tensor,
}

/// Softmax over the last dimension, written from differentiable primitives:
/// `softmax(x)ᵢ = exp(xᵢ − max x) / Σⱼ exp(xⱼ − max x)`.
///
/// Subtracting the row maximum changes nothing mathematically but keeps `exp` from overflowing.
/// Entries equal to `−∞` (masked) get weight exactly 0. A row that is *entirely* `−∞` has no
/// defined softmax and yields NaN; the mask builders of this crate never produce one.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach(); // the shift needs no gradient
    let exp = x.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    exp.broadcast_div(&sum)
}

/// Replaces scores where `mask` is 0 (false = may *not* attend) by `−∞`.
/// `mask` is `u8`, broadcastable to `scores`' shape.
pub fn mask_scores(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let shape = scores.shape();
    let mask = mask.broadcast_as(shape).map_err(|_| {
        candle_core::Error::Msg(format!(
            "mask of shape {:?} does not broadcast to scores {:?}",
            mask.dims(),
            scores.dims()
        ))
    })?;
    let neg_inf = Tensor::new(f32::NEG_INFINITY, scores.device())?
        .to_dtype(scores.dtype())?
        .broadcast_as(shape)?;
    mask.where_cond(scores, &neg_inf)
}

/// Scaled dot-product attention, `softmax(Q·Kᵀ/√d_k [masked]) · V`.
///
/// Shapes: `q (…, n_q, d_k)`, `k (…, n_k, d_k)`, `v (…, n_k, d_v)` with the same leading
/// (batch, or batch and heads) dimensions; 3-D and 4-D both work and `n_q ≠ n_k` is allowed.
/// `mask`: `u8`, 1 = may attend, broadcastable to `(…, n_q, n_k)`.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Attention> {
    attention_with_bias(q, k, v, None, mask)
}

/// Scaled dot-product attention with an additive score bias:
/// `softmax(Q·Kᵀ/√d_k + bias [masked]) · V` — how relative position schemes (8-03's T5 bias,
/// ALiBi) enter attention. `bias` is float and broadcastable to the scores `(…, n_q, n_k)`; it is
/// added *before* the mask, so masked entries stay `−∞` whatever the bias.
pub fn attention_with_bias(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    mask: Option<&Tensor>,
) -> Result<Attention> {
    check_qkv(q, k, v)?;
    let d_k = q.dim(D::Minus1)?;
    let scores = (q.matmul(&k.t()?)? / (d_k as f64).sqrt())?; // (…, n_q, n_k)
    let scores = match bias {
        Some(b) => add_score_bias(&scores, b)?,
        None => scores,
    };
    let scores = match mask {
        Some(m) => mask_scores(&scores, m)?,
        None => scores,
    };
    let weights = softmax_last_dim(&scores)?;
    let output = weights.matmul(v)?; // (…, n_q, d_v)
    Ok(Attention { output, weights })
}

/// `scores + bias`, with an error naming both shapes when the bias does not broadcast.
fn add_score_bias(scores: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let b = bias.to_dtype(scores.dtype())?;
    let b = b.broadcast_as(scores.shape()).map_err(|_| {
        candle_core::Error::Msg(format!(
            "bias of shape {:?} does not broadcast to scores {:?}",
            bias.dims(),
            scores.dims()
        ))
    })?;
    scores + b
}

fn check_qkv(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    if qd.len() < 2 || qd.len() != kd.len() || qd.len() != vd.len() {
        bail!("attention: q {qd:?}, k {kd:?}, v {vd:?} must have the same rank (≥ 2)");
    }
    let r = qd.len();
    if qd[..r - 2] != kd[..r - 2] || kd[..r - 2] != vd[..r - 2] {
        bail!("attention: leading dims differ: q {qd:?}, k {kd:?}, v {vd:?}");
    }
    if qd[r - 1] != kd[r - 1] {
        bail!(
            "attention: query width {} ≠ key width {} (q {qd:?}, k {kd:?})",
            qd[r - 1],
            kd[r - 1]
        );
    }
    if kd[r - 2] != vd[r - 2] {
        bail!(
            "attention: {} keys but {} values (k {kd:?}, v {vd:?})",
            kd[r - 2],
            vd[r - 2]
        );
    }
    Ok(())
}

/// The causal mask `(n_q, n_k)`: query `i` may attend key `j` iff `j ≤ i + (n_k − n_q)`.
///
/// With `n_q = n_k` this is the lower triangle (`j ≤ i`). When the queries are the *last* `n_q`
/// positions of an `n_k`-long sequence (decoding with a KV cache, 8-10), the offset keeps each
/// query aligned with its own position.
pub fn causal_mask(n_q: usize, n_k: usize, device: &Device) -> Result<Tensor> {
    if n_q > n_k {
        bail!("causal_mask: {n_q} queries cannot be the last positions of {n_k} keys");
    }
    let offset = n_k - n_q;
    let data: Vec<u8> = (0..n_q)
        .flat_map(|i| (0..n_k).map(move |j| u8::from(j <= i + offset)))
        .collect();
    Tensor::from_vec(data, (n_q, n_k), device)
}

/// Turns a key padding mask `(batch, n_k)` (1 = real token) into `(batch, 1, 1, n_k)`, which
/// broadcasts over heads and queries of `(batch, heads, n_q, n_k)` scores.
pub fn key_padding_mask(key_mask: &Tensor) -> Result<Tensor> {
    let (b, n_k) = key_mask.dims2()?;
    key_mask.to_dtype(DType::U8)?.reshape((b, 1, 1, n_k))
}

/// Logical AND of two broadcast-compatible `u8` masks.
pub fn and_masks(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.broadcast_mul(b)
}

/// Floating-point operations of one attention call: `2·n_q·n_k·d_k` for `Q·Kᵀ` plus
/// `2·n_q·n_k·d_v` for `P·V` (softmax is O(n²), negligible for large `d`).
pub fn attention_flops(n_q: usize, n_k: usize, d_k: usize, d_v: usize) -> f64 {
    2.0 * (n_q * n_k) as f64 * (d_k + d_v) as f64
}

/// A single-head self-attention layer: raw `W_q, W_k (d_k, d_model)` and `W_v (d_v, d_model)`.
///
/// Parameter names (checkpoint keys): `w_q`, `w_k`, `w_v`.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    pub w_q: Tensor,
    pub w_k: Tensor,
    pub w_v: Tensor,
}

impl SelfAttention {
    /// Fresh parameters (CS336 truncated-normal init) or a checkpoint's, through `vb`.
    pub fn new(vb: VarBuilder, d_model: usize, d_k: usize, d_v: usize) -> Result<Self> {
        Ok(Self {
            w_q: weight(&vb, d_k, d_model, "w_q")?,
            w_k: weight(&vb, d_k, d_model, "w_k")?,
            w_v: weight(&vb, d_v, d_model, "w_v")?,
        })
    }

    /// From explicit weights (tests inject known values this way).
    pub fn from_weights(w_q: Tensor, w_k: Tensor, w_v: Tensor) -> Result<Self> {
        let (dq, dm) = w_q.dims2()?;
        if w_k.dims2()? != (dq, dm) || w_v.dim(1)? != dm {
            bail!(
                "SelfAttention: W_q {:?}, W_k {:?}, W_v {:?} do not fit one d_model",
                w_q.dims(),
                w_k.dims(),
                w_v.dims()
            );
        }
        Ok(Self { w_q, w_k, w_v })
    }

    pub fn d_model(&self) -> usize {
        self.w_q.dims()[1]
    }

    /// `x (batch, seq, d_model)` → output `(batch, seq, d_v)` and weights `(batch, seq, seq)`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Attention> {
        expect_last_dim(x, self.d_model(), "SelfAttention input")?;
        let q = shared::linear(x, &self.w_q)?; // (batch, seq, d_k)
        let k = shared::linear(x, &self.w_k)?; // (batch, seq, d_k)
        let v = shared::linear(x, &self.w_v)?; // (batch, seq, d_v)
        scaled_dot_product_attention(&q, &k, &v, mask)
    }
}

/// Float64 triple-loop reference of masked scaled dot-product attention for one `(n_q, n_k)`
/// problem (`mask[i][j]` true = may attend). Used by the tests of this and later crates.
pub fn reference_attention(
    q: &[Vec<f64>],
    k: &[Vec<f64>],
    v: &[Vec<f64>],
    mask: Option<&[Vec<bool>]>,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let d_k = q[0].len() as f64;
    let mut out = vec![vec![0.0; v[0].len()]; q.len()];
    let mut weights = vec![vec![0.0; k.len()]; q.len()];
    for i in 0..q.len() {
        let allowed = |j: usize| mask.is_none_or(|m| m[i][j]);
        let scores: Vec<f64> = (0..k.len())
            .map(|j| {
                if allowed(j) {
                    q[i].iter().zip(&k[j]).map(|(a, b)| a * b).sum::<f64>() / d_k.sqrt()
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        for j in 0..k.len() {
            weights[i][j] = exps[j] / total;
            for (o, vv) in out[i].iter_mut().zip(&v[j]) {
                *o += weights[i][j] * vv;
            }
        }
    }
    (out, weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_is_lower_triangular_and_end_aligned() -> Result<()> {
        let m = causal_mask(3, 3, &Device::Cpu)?.to_vec2::<u8>()?;
        assert_eq!(m, vec![vec![1, 0, 0], vec![1, 1, 0], vec![1, 1, 1]]);
        let m = causal_mask(2, 4, &Device::Cpu)?.to_vec2::<u8>()?;
        assert_eq!(m, vec![vec![1, 1, 1, 0], vec![1, 1, 1, 1]]);
        assert!(causal_mask(4, 2, &Device::Cpu).is_err());
        Ok(())
    }

    #[test]
    fn softmax_handles_large_scores_and_minus_infinity() -> Result<()> {
        let x = Tensor::new(&[[1000f32, 1001.0, f32::NEG_INFINITY]], &Device::Cpu)?;
        let p = softmax_last_dim(&x)?.to_vec2::<f32>()?;
        let e = (-1f32).exp();
        assert!((p[0][0] - e / (1.0 + e)).abs() < 1e-6);
        assert_eq!(p[0][2], 0.0);
        Ok(())
    }

    #[test]
    fn shape_errors_name_the_problem() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((2, 5, 8), DType::F32, &dev).unwrap();
        let err = scaled_dot_product_attention(&q, &k, &k, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("query width 4 ≠ key width 8"), "{err}");
        let bad_mask = Tensor::zeros((7, 7), DType::U8, &dev).unwrap();
        let k = Tensor::zeros((2, 5, 4), DType::F32, &dev).unwrap();
        let err = scaled_dot_product_attention(&q, &k, &k, Some(&bad_mask))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not broadcast"), "{err}");
    }
}

//! Helpers shared by the test files: seeded random tensors, a float64 reference with the
//! log-sum-exp, error measures, and the GPU probe.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};

pub use shared::rng::Rng;

/// `(q, k, v)` in f64 on the CPU, drawn from `rng`.
pub fn qkv(
    rng: &mut Rng,
    b: usize,
    h: usize,
    n_q: usize,
    n_k: usize,
    d: usize,
    d_v: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((
        rng.tensor(&[b, h, n_q, d], 1.0)?,
        rng.tensor(&[b, h, n_k, d], 1.0)?,
        rng.tensor(&[b, h, n_k, d_v], 1.0)?,
    ))
}

/// Float64 triple-loop attention with an arbitrary scale and end-aligned causal mask: returns
/// the output `(b, h, n_q, d_v)` and the row log-sum-exp `(b, h, n_q)` as flat vectors.
pub fn reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (b, h, n_q, d) = q.dims4()?;
    let (n_k, d_v) = (k.dim(2)?, v.dim(3)?);
    let f = |t: &Tensor| -> Result<Vec<f64>> {
        t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
    };
    let (q, k, v) = (f(q)?, f(k)?, f(v)?);
    let offset = n_k.saturating_sub(n_q);
    let (mut out, mut lse) = (vec![0.0; b * h * n_q * d_v], vec![0.0; b * h * n_q]);
    for bh in 0..b * h {
        for i in 0..n_q {
            let qi = &q[(bh * n_q + i) * d..][..d];
            let s: Vec<f64> = (0..n_k)
                .map(|j| {
                    if causal && j > i + offset {
                        f64::NEG_INFINITY
                    } else {
                        scale
                            * qi.iter()
                                .zip(&k[(bh * n_k + j) * d..][..d])
                                .map(|(a, b)| a * b)
                                .sum::<f64>()
                    }
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            lse[bh * n_q + i] = m + z.ln();
            for j in 0..n_k {
                let p = (s[j] - m).exp() / z;
                for c in 0..d_v {
                    out[(bh * n_q + i) * d_v + c] += p * v[(bh * n_k + j) * d_v + c];
                }
            }
        }
    }
    Ok((out, lse))
}

pub fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()
}

/// Largest `|a − b| / (1 + |b|)` over all elements (NaN counts as infinitely wrong).
pub fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_finite() {
                (x - y).abs() / (1.0 + y.abs())
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
}

/// Largest `|a − b|` (NaN counts as infinitely wrong).
pub fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_finite() {
                (x - y).abs()
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
}

/// `‖a − b‖ / ‖b‖`.
pub fn rel_norm(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_finite() {
                (x - y).powi(2)
            } else {
                f64::INFINITY
            }
        })
        .sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

/// `‖a − b‖ / max(‖b‖, floor·√len)`: relative, except where the reference is (nearly) zero
/// (e.g. dQ with a single key, exactly 0), where it is an RMS error measured against `floor`.
pub fn rel_norm_floor(a: &[f64], b: &[f64], floor: f64) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_finite() {
                (x - y).powi(2)
            } else {
                f64::INFINITY
            }
        })
        .sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    num.sqrt() / den.sqrt().max(floor * (a.len() as f64).sqrt())
}

/// The CUDA device when this build has CUDA and a GPU answers; otherwise prints why the GPU
/// test is skipped and returns `None`. With `MODULE08_EXPECT_GPU` set (the GPU host's runner),
/// a missing GPU is an error instead of a skip.
pub fn gpu(test: &str) -> Option<Device> {
    let expect = std::env::var_os("MODULE08_EXPECT_GPU").is_some();
    if !candle_core::utils::cuda_is_available() {
        assert!(
            !expect,
            "{test}: MODULE08_EXPECT_GPU is set but this build has no CUDA"
        );
        println!("note: {test} skipped: built without the `cuda` feature");
        return None;
    }
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(
                !expect,
                "{test}: MODULE08_EXPECT_GPU is set but no GPU opened: {e}"
            );
            println!("note: {test} skipped: no CUDA device ({e})");
            None
        }
    }
}

/// An attention function `(q, k, v, scale, causal) → O`: FlashAttention or a reference.
pub type Attn = fn(&Tensor, &Tensor, &Tensor, f64, bool) -> Result<Tensor>;

/// `(O, [dQ, dK, dV])` of `loss = Σ O ⊙ dO` through Candle's autograd.
pub fn grads(
    f: Attn,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_o: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<(Tensor, [Tensor; 3])> {
    let (vq, vk, vv) = (
        Var::from_tensor(q)?,
        Var::from_tensor(k)?,
        Var::from_tensor(v)?,
    );
    let o = f(
        vq.as_tensor(),
        vk.as_tensor(),
        vv.as_tensor(),
        scale,
        causal,
    )?;
    let g = (&o * d_o)?.sum_all()?.backward()?;
    let get = |x: &Var| {
        g.get(x.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("missing gradient".into()))
    };
    Ok((o, [get(&vq)?, get(&vk)?, get(&vv)?]))
}

/// 2·max |round_dtype(ref + 0.3) − 0.3 − ref|: the dtype's own rounding noise at ref's scale.
pub fn rounding_atol(reference: &[f64], dt: DType) -> Result<f64> {
    let r = Tensor::new(reference, &Device::Cpu)?;
    let rounded = ((r.clone() + 0.3)?.to_dtype(dt)?.to_dtype(DType::F64)? - 0.3)?;
    Ok(2.0 * max_abs(&to_vec(&rounded)?, reference))
}

//! The FlashAttention loops in plain Rust: the CPU side of the custom op.
//!
//! One `(batch, head)` is one independent problem; [`forward`] and [`backward`] hand them to
//! rayon's threads. Inside a head the structure is the kernel's: a block of `BLOCK_Q` query rows
//! meets the keys block by block (`BLOCK_K` keys, which stay in cache while every row of the
//! query block uses them), with the running max `m`, running sum `ℓ` and rescaled accumulator
//! `õ` per row. Extra memory per thread: one block of accumulators and one row of scores, O(d·B)
//! — never `n_q × n_k`.
//!
//! Arithmetic is in the accumulator type `A` (f32, or f64 for f64 inputs, used by the
//! finite-difference tests); f16/bf16 inputs are widened to f32 by the caller.

use rayon::prelude::*;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Sub};

/// Query rows per block.
pub const BLOCK_Q: usize = 32;
/// Keys per block.
pub const BLOCK_K: usize = 64;

/// The float type the loops accumulate in: f32 or f64.
pub trait Acc:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + AddAssign
    + MulAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
}

macro_rules! impl_acc {
    ($t:ty, $exp:path) => {
        impl Acc for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INF: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    };
}
// f32: shared's branch-free exp (within 2 ulp), inlined into the score loop.
impl_acc!(f32, shared::cpu::exp_f32);
impl_acc!(f64, f64::exp);

/// Sizes of one call: `bh = batch·heads` independent problems of `n_q` queries, `n_k` keys,
/// query/key width `d` and value width `d_v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub bh: usize,
    pub n_q: usize,
    pub n_k: usize,
    pub d: usize,
    pub d_v: usize,
}

impl Dims {
    /// End-aligned causal offset: query `i` sees key `j` iff `j ≤ i + offset`.
    pub fn causal_offset(&self) -> usize {
        self.n_k.saturating_sub(self.n_q)
    }

    /// How many keys of the block `j0..j0+cols` query `i` may see (they are the first ones).
    fn visible(&self, causal: bool, i: usize, j0: usize, cols: usize) -> usize {
        if causal {
            (i + self.causal_offset() + 1).saturating_sub(j0).min(cols)
        } else {
            cols
        }
    }
}

/// `Σ aᵢ·bᵢ` with eight independent partial sums, so the compiler can vectorise it.
#[inline]
fn dot<A: Acc>(a: &[A], b: &[A]) -> A {
    let mut part = [A::ZERO; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for t in 0..8 {
            part[t] += x[t] * y[t];
        }
    }
    let mut s = A::ZERO;
    for (x, y) in ra.iter().zip(rb) {
        s += *x * *y;
    }
    part.iter().fold(s, |acc, &p| acc + p)
}

/// `y ← y + a·x`
#[inline]
fn axpy<A: Acc>(y: &mut [A], a: A, x: &[A]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Forward of one head: `q (n_q, d)`, `k (n_k, d)`, `v (n_k, d_v)` → `o (n_q, d_v)`, `lse (n_q)`.
/// Only the first `keys` keys are real (key padding: the rest are seen by no query); the causal
/// diagonal stays end-aligned to all `n_k`.
#[allow(clippy::too_many_arguments)]
pub fn forward_head<A: Acc>(
    q: &[A],
    k: &[A],
    v: &[A],
    dims: Dims,
    scale: A,
    causal: bool,
    keys: usize,
    o: &mut [A],
    lse: &mut [A],
) {
    let Dims { n_q, d, d_v, .. } = dims;
    let mut s = [A::ZERO; BLOCK_K]; // one row of one tile of scores
    let mut m = [A::NEG_INF; BLOCK_Q]; // running max per row
    let mut l = [A::ZERO; BLOCK_Q]; // running sum of exp per row
    let mut acc = vec![A::ZERO; BLOCK_Q * d_v]; // unnormalised output rows
    for i0 in (0..n_q).step_by(BLOCK_Q) {
        let rows = BLOCK_Q.min(n_q - i0);
        m.fill(A::NEG_INF);
        l.fill(A::ZERO);
        acc.fill(A::ZERO);
        // Causal: keys past the last row's diagonal are never visited (whole tiles skipped).
        let k_end = if causal {
            (i0 + rows + dims.causal_offset()).min(keys)
        } else {
            keys
        };
        for j0 in (0..k_end).step_by(BLOCK_K) {
            let cols = BLOCK_K.min(k_end - j0);
            for r in 0..rows {
                let i = i0 + r;
                let seen = dims.visible(causal, i, j0, cols);
                if seen == 0 {
                    continue;
                }
                let q_i = &q[i * d..(i + 1) * d];
                let mut row_max = A::NEG_INF;
                for (c, s_c) in s[..seen].iter_mut().enumerate() {
                    *s_c = dot(q_i, &k[(j0 + c) * d..(j0 + c + 1) * d]) * scale;
                    row_max = row_max.max(*s_c);
                }
                let m_new = m[r].max(row_max);
                let alpha = (m[r] - m_new).exp(); // 0 on the first visited block (m = −∞)
                let acc_r = &mut acc[r * d_v..(r + 1) * d_v];
                if alpha != A::ONE {
                    acc_r.iter_mut().for_each(|x| *x *= alpha);
                }
                l[r] *= alpha;
                for (c, &s_c) in s[..seen].iter().enumerate() {
                    let p = (s_c - m_new).exp();
                    l[r] += p;
                    axpy(acc_r, p, &v[(j0 + c) * d_v..(j0 + c + 1) * d_v]);
                }
                m[r] = m_new;
            }
        }
        for r in 0..rows {
            let i = i0 + r;
            let inv = A::ONE / l[r];
            for (o_x, &a) in o[i * d_v..(i + 1) * d_v]
                .iter_mut()
                .zip(&acc[r * d_v..(r + 1) * d_v])
            {
                *o_x = a * inv;
            }
            lse[i] = m[r] + l[r].ln();
        }
    }
}

/// Forward of all `bh` heads in parallel: returns `(O (bh·n_q·d_v), L (bh·n_q))`. Head `h` has
/// `key_lengths[h]` real keys (all `n_k` without lengths).
pub fn forward<A: Acc>(
    q: &[A],
    k: &[A],
    v: &[A],
    dims: Dims,
    scale: A,
    causal: bool,
    key_lengths: Option<&[usize]>,
) -> (Vec<A>, Vec<A>) {
    let Dims {
        bh,
        n_q,
        n_k,
        d,
        d_v,
    } = dims;
    let mut o = vec![A::ZERO; bh * n_q * d_v];
    let mut lse = vec![A::ZERO; bh * n_q];
    o.par_chunks_mut(n_q * d_v)
        .zip(lse.par_chunks_mut(n_q))
        .enumerate()
        .for_each(|(h, (o_h, lse_h))| {
            let (qs, ks) = (h * n_q * d, h * n_k * d);
            let vs = h * n_k * d_v;
            forward_head(
                &q[qs..qs + n_q * d],
                &k[ks..ks + n_k * d],
                &v[vs..vs + n_k * d_v],
                dims,
                scale,
                causal,
                key_lengths.map_or(n_k, |l| l[h].min(n_k)),
                o_h,
                lse_h,
            );
        });
    (o, lse)
}

/// The gradients of one head.
pub struct HeadGrads<'a, A> {
    pub dq: &'a mut [A],
    pub dk: &'a mut [A],
    pub dv: &'a mut [A],
}

/// Backward of one head (FlashAttention-2 order: key blocks outside, queries inside), given the
/// forward's output `o`, its row log-sum-exp `lse` and the output gradient `d_o`; keys from
/// `keys` on are padding (their `dK`, `dV` stay 0).
#[allow(clippy::too_many_arguments)]
pub fn backward_head<A: Acc>(
    q: &[A],
    k: &[A],
    v: &[A],
    o: &[A],
    d_o: &[A],
    lse: &[A],
    dims: Dims,
    scale: A,
    causal: bool,
    keys: usize,
    g: HeadGrads<'_, A>,
) {
    let Dims {
        n_q, n_k, d, d_v, ..
    } = dims;
    let HeadGrads { dq, dk, dv } = g;
    // D_i = rowsum(dO ∘ O)_i  (= Σⱼ Pᵢⱼ dPᵢⱼ)
    let big_d: Vec<A> = (0..n_q)
        .map(|i| dot(&d_o[i * d_v..(i + 1) * d_v], &o[i * d_v..(i + 1) * d_v]))
        .collect();
    dq.fill(A::ZERO);
    dk.fill(A::ZERO);
    dv.fill(A::ZERO);
    for j0 in (0..keys.min(n_k)).step_by(BLOCK_K) {
        let cols = BLOCK_K.min(keys.min(n_k) - j0);
        // Causal: the first query that sees key j0 has i + offset ≥ j0; earlier ones are skipped.
        let i_start = if causal {
            j0.saturating_sub(dims.causal_offset())
        } else {
            0
        };
        for i in i_start..n_q {
            let seen = dims.visible(causal, i, j0, cols);
            let (q_i, do_i) = (&q[i * d..(i + 1) * d], &d_o[i * d_v..(i + 1) * d_v]);
            for c in 0..seen {
                let j = j0 + c;
                let (k_j, v_j) = (&k[j * d..(j + 1) * d], &v[j * d_v..(j + 1) * d_v]);
                let p = (dot(q_i, k_j) * scale - lse[i]).exp(); // P = exp(S − L), recomputed
                axpy(&mut dv[j * d_v..(j + 1) * d_v], p, do_i); // dV += Pᵀ·dO
                let dp = dot(do_i, v_j); // dP = dO·Vᵀ
                let ds = p * (dp - big_d[i]) * scale; // dS = P∘(dP − D), times s for dQ, dK
                axpy(&mut dq[i * d..(i + 1) * d], ds, k_j); // dQ += dS·K·s
                axpy(&mut dk[j * d..(j + 1) * d], ds, q_i); // dK += dSᵀ·Q·s
            }
        }
    }
}

/// Backward of all heads in parallel: returns `(dQ, dK, dV)`, each laid out like its input.
#[allow(clippy::too_many_arguments)]
pub fn backward<A: Acc>(
    q: &[A],
    k: &[A],
    v: &[A],
    o: &[A],
    d_o: &[A],
    lse: &[A],
    dims: Dims,
    scale: A,
    causal: bool,
    key_lengths: Option<&[usize]>,
) -> (Vec<A>, Vec<A>, Vec<A>) {
    let Dims {
        bh,
        n_q,
        n_k,
        d,
        d_v,
    } = dims;
    let mut dq = vec![A::ZERO; bh * n_q * d];
    let mut dk = vec![A::ZERO; bh * n_k * d];
    let mut dv = vec![A::ZERO; bh * n_k * d_v];
    dq.par_chunks_mut(n_q * d)
        .zip(dk.par_chunks_mut(n_k * d))
        .zip(dv.par_chunks_mut(n_k * d_v))
        .enumerate()
        .for_each(|(h, ((dq, dk), dv))| {
            let (qs, ks, vs, os) = (h * n_q * d, h * n_k * d, h * n_k * d_v, h * n_q * d_v);
            backward_head(
                &q[qs..qs + n_q * d],
                &k[ks..ks + n_k * d],
                &v[vs..vs + n_k * d_v],
                &o[os..os + n_q * d_v],
                &d_o[os..os + n_q * d_v],
                &lse[h * n_q..(h + 1) * n_q],
                dims,
                scale,
                causal,
                key_lengths.map_or(n_k, |l| l[h].min(n_k)),
                HeadGrads { dq, dk, dv },
            );
        });
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_a_plain_sum_for_every_remainder() {
        for n in 0..20 {
            let a: Vec<f64> = (0..n).map(|i| i as f64 * 0.5 - 2.0).collect();
            let b: Vec<f64> = (0..n).map(|i| 1.0 / (i as f64 + 1.0)).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - want).abs() < 1e-12, "n = {n}");
        }
    }

    #[test]
    fn visible_keys_follow_the_end_aligned_diagonal() {
        let dims = Dims {
            bh: 1,
            n_q: 2,
            n_k: 5,
            d: 1,
            d_v: 1,
        };
        // offset 3: query 0 sees keys 0..=3, query 1 sees 0..=4.
        assert_eq!(dims.visible(true, 0, 0, 5), 4);
        assert_eq!(dims.visible(true, 1, 0, 5), 5);
        assert_eq!(dims.visible(true, 0, 4, 1), 0);
        assert_eq!(dims.visible(false, 0, 4, 1), 1);
    }
}

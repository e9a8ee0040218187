//! # 8-08 · Rotary position embeddings (RoPE)
//!
//! Sinusoidal and learned positions (8-03) are *added* to the token embeddings, so every layer
//! has to untangle "what" from "where". RoPE (Su et al., 2021) instead **rotates** the queries
//! and keys of every head by an angle proportional to their position, right before the dot
//! product. Split a `d_head`-wide vector into `d_head/2` consecutive pairs `(x[2k], x[2k+1])`
//! and read pair `k` as the complex number `z_k = x[2k] + i·x[2k+1]`. At position `m`:
//!
//! ```text
//! RoPE(x, m)_k = z_k · e^{i·m·θ_k},        θ_k = base^(−2k/d_head),  k = 0 … d_head/2 − 1
//! ```
//!
//! — the *interleaved* convention of the paper, Meta's LLaMA code and candle's `rope_i`
//! (HF-transformers' "half-split" layout pairs `x[k]` with `x[k + d/2]` instead; the two are
//! the same up to a fixed permutation of the weight rows). Written with real numbers, every
//! pair is multiplied by a 2×2 rotation matrix, and the whole vector by a block-diagonal one:
//!
//! ```text
//! ⎡y₂ₖ  ⎤   ⎡cos mθ_k  −sin mθ_k⎤ ⎡x₂ₖ  ⎤
//! ⎣y₂ₖ₊₁⎦ = ⎣sin mθ_k   cos mθ_k⎦ ⎣x₂ₖ₊₁⎦          RoPE(x, m) = R_m·x,  R_m = diag(R(mθ₀), …)
//! ```
//!
//! ## Why it encodes *relative* position
//! Rotations are orthogonal and compose by adding angles (`R_mᵀ R_n = R_{n−m}`), so
//!
//! ```text
//! ⟨RoPE(q, m), RoPE(k, n)⟩ = qᵀ R_mᵀ R_n k = qᵀ R_{n−m} k = Re Σ_k q̄_k·k_k·e^{i(n−m)θ_k}
//! ```
//!
//! depends on the offset `n − m` only, never on `m` and `n` themselves — and the norm of every
//! vector is preserved. Fast pairs (`θ₀ = 1` rad/token) resolve neighbours, slow pairs
//! (`θ ≈ 1/base`) resolve long distances.
//!
//! ## Implementation
//! [`RopeTables`] precomputes `cos(m·θ_k)` and `sin(m·θ_k)` for `m < max_seq` once:
//! `(max_seq, d_head/2)` each. [`apply_rope`] (complex form) and [`apply_rope_matrix`] (the
//! explicit 2×2 form) rotate `x (batch, heads, seq, d_head)` whose first token sits at absolute
//! position `start_pos` (0 for training; the cache length when decoding, 8-10). Both are built
//! from differentiable tensor ops (narrow, mul, add, matmul), so gradients flow to `x`.
//!
//! ## Longer contexts than trained
//! Positions beyond the trained length produce angles the model never saw. Two cheap fixes
//! ([`RopeScaling`]): **position interpolation** (Chen et al., 2023) squeezes positions,
//! `m → m/s`, so a model trained on `L` sees angles of `[0, L)` over `sL` tokens;
//! **NTK-aware scaling** (bloc97, 2023) raises the base instead, `base → base·s^{d/(d−2)}`,
//! stretching the slow (long-range) pairs by ≈ `s` while leaving the fast pairs almost untouched.
//!
//! ## Rung 3 of the ladder
//! [`with_rope`] turns rung 2 (8-07) into the LLaMA recipe: learned positions out, RoPE in.
//! The tables plug into 8-02's attention component as its position scheme
//! ([`t0802_multi_head_attention::PositionPlug`]): the component rotates `q` and `k` through them
//! at the tokens' absolute positions, in the full forward and in cached decoding alike.

use candle_core::{bail, DType, Device, Result, Tensor};
use shared::kernels::OpImpl;

pub mod fused;
pub mod ladder;
pub use fused::{apply_rope_fused, apply_rope_fused_at};
pub use ladder::{fastest_kernels, llama, parts, with_rope, RopeParts};

/// The base of the frequencies in RoFormer and LLaMA 1/2 (LLaMA 3 uses 500 000).
pub const DEFAULT_BASE: f64 = 10_000.0;

/// How positions are stretched to reach beyond the training length.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RopeScaling {
    /// Plain RoPE: angle `m·θ_k`.
    None,
    /// Position interpolation (Chen et al., 2023): angle `(m / factor)·θ_k`.
    PositionInterpolation { factor: f64 },
    /// NTK-aware base scaling: `base' = base·factor^{d/(d−2)}`, angle `m·θ'_k`.
    NtkAware { factor: f64 },
}

/// The rotation frequencies `θ_k = base^(−2k/d_head)`, `k = 0 … d_head/2 − 1`, in f64.
pub fn frequencies(d_head: usize, base: f64) -> Vec<f64> {
    (0..d_head / 2)
        .map(|k| base.powf(-((2 * k) as f64) / d_head as f64))
        .collect()
}

/// The effective base and position scale of a scaling scheme: angle = `pos_scale · m · θ_k(base)`.
pub fn scaled_base(d_head: usize, base: f64, scaling: RopeScaling) -> (f64, f64) {
    match scaling {
        RopeScaling::None => (base, 1.0),
        RopeScaling::PositionInterpolation { factor } => (base, 1.0 / factor),
        RopeScaling::NtkAware { factor } => (
            base * factor.powf(d_head as f64 / (d_head as f64 - 2.0)),
            1.0,
        ),
    }
}

/// Precomputed `cos(m·θ_k)`, `sin(m·θ_k)` for positions `m < max_seq`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// `(max_seq, d_head/2)`, f32
    pub cos: Tensor,
    /// `(max_seq, d_head/2)`, f32
    pub sin: Tensor,
    pub d_head: usize,
    pub base: f64,
    pub scaling: RopeScaling,
    /// [`RopeTables::apply`] runs the composed ops or the fused op ([`apply_rope_fused`]).
    pub imp: OpImpl,
}

impl RopeTables {
    /// Tables for `d_head` (even) and positions `0 … max_seq − 1`.
    pub fn new(
        d_head: usize,
        max_seq: usize,
        base: f64,
        scaling: RopeScaling,
        device: &Device,
    ) -> Result<Self> {
        if d_head == 0 || !d_head.is_multiple_of(2) {
            bail!("RoPE needs an even, positive d_head (pairs of dimensions), got {d_head}");
        }
        if max_seq == 0 || base <= 1.0 {
            bail!("RopeTables: max_seq ({max_seq}) must be positive and base ({base}) > 1");
        }
        match scaling {
            RopeScaling::PositionInterpolation { factor } | RopeScaling::NtkAware { factor }
                if factor < 1.0 =>
            {
                bail!("RoPE scaling factor ({factor}) must be ≥ 1")
            }
            _ => {}
        }
        let (eff_base, pos_scale) = scaled_base(d_head, base, scaling);
        let theta = frequencies(d_head, eff_base);
        let half = d_head / 2;
        let mut cos = Vec::with_capacity(max_seq * half);
        let mut sin = Vec::with_capacity(max_seq * half);
        for m in 0..max_seq {
            for &t in &theta {
                let angle = pos_scale * m as f64 * t; // in f64: large m·θ loses digits in f32
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_seq, half), device)?,
            sin: Tensor::from_vec(sin, (max_seq, half), device)?,
            d_head,
            base,
            scaling,
            imp: OpImpl::Composed,
        })
    }

    /// The same tables, applied by the fused op or the composed ops (same values).
    pub fn with_impl(mut self, imp: OpImpl) -> Self {
        self.imp = imp;
        self
    }

    /// RoPE of `x (batch, heads, seq, d_head)` at positions `start_pos …`: [`apply_rope`] or
    /// [`apply_rope_fused`], as chosen by [`Self::with_impl`].
    pub fn apply(&self, x: &Tensor, start_pos: usize) -> Result<Tensor> {
        match self.imp {
            OpImpl::Fused => apply_rope_fused(x, self, start_pos),
            OpImpl::Composed => apply_rope(x, self, start_pos),
        }
    }

    /// RoPE of one token per sequence, `x (batch, heads, 1, d_head)`, with the `f32` rows
    /// `cos, sin (1, d/2)` of its position ([`Self::rows_at`]). (`rotate_at` of fused tables
    /// skips the rows: its kernel reads the position itself.)
    pub fn apply_rows(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (_, _, t, _) = check_input(x, self)?;
        let row = [1, self.d_head / 2];
        if t != 1 || cos.dims() != row || sin.dims() != row {
            bail!(
                "RoPE at a device position rotates one token per sequence: x {:?}, rows {:?}",
                x.dims(),
                cos.dims()
            );
        }
        match self.imp {
            OpImpl::Fused => fused::apply_rope_fused_rows(x, cos, sin),
            OpImpl::Composed => {
                rotate_pairs(x, &cos.to_dtype(x.dtype())?, &sin.to_dtype(x.dtype())?)
            }
        }
    }

    /// The table rows `(1, d/2)` of the position in `pos` (`(1,)` `u32`), gathered on the
    /// device: no host number enters the kernels' arguments. The position must be below
    /// [`Self::max_seq`] (the caller's cache checks its capacity on the host).
    pub fn rows_at(&self, pos: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        check_device_position(pos)?;
        Ok((
            self.cos.index_select(pos, 0)?.to_dtype(dtype)?,
            self.sin.index_select(pos, 0)?.to_dtype(dtype)?,
        ))
    }

    /// Number of positions covered.
    pub fn max_seq(&self) -> usize {
        self.cos.dims()[0]
    }

    /// The rows of positions `start_pos … start_pos + len − 1` in `dtype`: `(len, d_head/2)` each.
    pub fn rows(&self, start_pos: usize, len: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        if start_pos + len > self.max_seq() {
            bail!(
                "RoPE: positions {start_pos}..{} exceed the precomputed table of {} positions; build RopeTables \
                 with a larger max_seq (RoPE is defined for every position — the table is only a cache)",
                start_pos + len,
                self.max_seq()
            );
        }
        Ok((
            self.cos.narrow(0, start_pos, len)?.to_dtype(dtype)?,
            self.sin.narrow(0, start_pos, len)?.to_dtype(dtype)?,
        ))
    }
}

/// A device position is a `(1,)` `u32` tensor.
pub(crate) fn check_device_position(pos: &Tensor) -> Result<()> {
    if pos.dims() != [1] || pos.dtype() != DType::U32 {
        bail!(
            "RoPE: a device position is a (1,) u32 tensor, got {:?} {:?}",
            pos.dims(),
            pos.dtype()
        );
    }
    Ok(())
}

pub(crate) fn check_input(x: &Tensor, tables: &RopeTables) -> Result<(usize, usize, usize, usize)> {
    let (b, h, t, d) = x.dims4().map_err(|_| {
        candle_core::Error::Msg(format!(
            "RoPE expects (batch, heads, seq, d_head), got {:?}",
            x.dims()
        ))
    })?;
    if d != tables.d_head {
        bail!(
            "RoPE: input d_head ({d}) differs from the tables' d_head ({})",
            tables.d_head
        );
    }
    Ok((b, h, t, d))
}

/// RoPE as complex multiplication: pair `k` of the token at position `start_pos + t` becomes
/// `(re·cos − im·sin, re·sin + im·cos)`. `x (batch, heads, seq, d_head)` → same shape.
pub fn apply_rope(x: &Tensor, tables: &RopeTables, start_pos: usize) -> Result<Tensor> {
    let (_, _, t, _) = check_input(x, tables)?;
    let (cos, sin) = tables.rows(start_pos, t, x.dtype())?; // (seq, d/2)
    rotate_pairs(x, &cos, &sin)
}

/// [`apply_rope`] with the table rows given: `cos, sin (seq, d_head/2)` in `x`'s dtype.
fn rotate_pairs(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let pairs = x.contiguous()?.reshape((b, h, t, d / 2, 2))?;
    let re = pairs.narrow(4, 0, 1)?.squeeze(4)?; // (batch, heads, seq, d/2): x[2k]
    let im = pairs.narrow(4, 1, 1)?.squeeze(4)?; //                          x[2k+1]
    let new_re = (re.broadcast_mul(cos)? - im.broadcast_mul(sin)?)?;
    let new_im = (re.broadcast_mul(sin)? + im.broadcast_mul(cos)?)?;
    Tensor::stack(&[new_re, new_im], 4)?.reshape((b, h, t, d)) // interleave back
}

/// The block-diagonal rotation matrices `R_m` for positions `start_pos … start_pos + len − 1`:
/// `(len, d_head, d_head)`, f32.
pub fn rotation_matrices(tables: &RopeTables, start_pos: usize, len: usize) -> Result<Tensor> {
    let (cos, sin) = tables.rows(start_pos, len, DType::F32)?;
    let (cos, sin) = (cos.to_vec2::<f32>()?, sin.to_vec2::<f32>()?);
    let d = tables.d_head;
    let mut r = vec![0f32; len * d * d];
    for m in 0..len {
        let block = &mut r[m * d * d..(m + 1) * d * d];
        for k in 0..d / 2 {
            let (c, s) = (cos[m][k], sin[m][k]);
            let (i, j) = (2 * k, 2 * k + 1);
            block[i * d + i] = c;
            block[i * d + j] = -s;
            block[j * d + i] = s;
            block[j * d + j] = c;
        }
    }
    Tensor::from_vec(r, (len, d, d), tables.cos.device())
}

/// RoPE as an explicit matrix product `y = R_m·x` per position (the slow, obvious form:
/// `O(d²)` per vector instead of `O(d)`). Same shapes as [`apply_rope`].
pub fn apply_rope_matrix(x: &Tensor, tables: &RopeTables, start_pos: usize) -> Result<Tensor> {
    let (b, h, t, d) = check_input(x, tables)?;
    let r_t = rotation_matrices(tables, start_pos, t)?
        .to_dtype(x.dtype())?
        .transpose(1, 2)?
        .contiguous()?; // (seq, d, d) = R_mᵀ
                        // Group the tokens by position: (seq, batch·heads, d) row vectors, one batched matmul per position.
    let rows = x
        .permute((2, 0, 1, 3))?
        .contiguous()?
        .reshape((t, b * h, d))?;
    let y = rows.matmul(&r_t)?; // x·R_mᵀ = (R_m·x)ᵀ
    y.reshape((t, b, h, d))?.permute((1, 2, 0, 3))?.contiguous()
}

/// Float64 reference of RoPE for one vector at (possibly fractional) position `pos`:
/// complex multiplication of the pairs, straight from the definition.
pub fn reference_rope(x: &[f64], pos: f64, base: f64) -> Vec<f64> {
    let theta = frequencies(x.len(), base);
    let mut y = vec![0.0; x.len()];
    for (k, t) in theta.iter().enumerate() {
        let (c, s) = ((pos * t).cos(), (pos * t).sin());
        y[2 * k] = x[2 * k] * c - x[2 * k + 1] * s;
        y[2 * k + 1] = x[2 * k] * s + x[2 * k + 1] * c;
    }
    y
}

/// The RoPE score `⟨RoPE(q, m), RoPE(k, n)⟩` in f64 (for the relative-position heatmap).
pub fn rope_score(q: &[f64], m: f64, k: &[f64], n: f64, base: f64) -> f64 {
    reference_rope(q, m, base)
        .iter()
        .zip(reference_rope(k, n, base))
        .map(|(a, b)| a * b)
        .sum()
}

/// RoPE as a position plug of 8-02's attention component: `q` and `k` are rotated at their
/// absolute positions before the scores are formed.
impl t0802_multi_head_attention::PositionPlug for RopeTables {
    fn rotate(&self, q: &Tensor, k: &Tensor, start_pos: usize) -> Result<(Tensor, Tensor)> {
        Ok((self.apply(q, start_pos)?, self.apply(k, start_pos)?))
    }

    /// The fused form reads the position inside its kernel; the composed one gathers the rows.
    fn rotate_at(&self, q: &Tensor, k: &Tensor, pos: &Tensor) -> Result<(Tensor, Tensor)> {
        if q.dim(2)? != 1 || k.dim(2)? != 1 {
            bail!(
                "RoPE at a device position rotates one token per sequence: q {:?}, k {:?}",
                q.dims(),
                k.dims()
            );
        }
        if self.imp == OpImpl::Fused {
            return Ok((
                fused::apply_rope_fused_at(q, self, pos)?,
                fused::apply_rope_fused_at(k, self, pos)?,
            ));
        }
        let (cos, sin) = self.rows_at(pos, DType::F32)?; // (1, d/2), gathered once for q and k
        Ok((
            self.apply_rows(q, &cos, &sin)?,
            self.apply_rows(k, &cos, &sin)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequencies_run_from_one_to_nearly_one_over_base() {
        let f = frequencies(8, 10_000.0);
        assert_eq!(f.len(), 4);
        assert!((f[0] - 1.0).abs() < 1e-15);
        assert!((f[1] - 0.1).abs() < 1e-12); // 10000^(−2/8) = 0.1
        assert!((f[3] - 1e-3).abs() < 1e-15);
    }

    #[test]
    fn ntk_scaling_stretches_slowest_pair_by_factor() {
        let d = 16;
        let (b, _) = scaled_base(d, 10_000.0, RopeScaling::NtkAware { factor: 4.0 });
        let plain = frequencies(d, 10_000.0);
        let ntk = frequencies(d, b);
        assert!((plain[0] - ntk[0]).abs() < 1e-15, "fastest pair unchanged");
        // the slowest pair θ_{d/2−1} = base^{−(d−2)/d} is divided by exactly the factor
        assert!((plain[d / 2 - 1] / ntk[d / 2 - 1] - 4.0).abs() < 1e-9);
    }

    #[test]
    fn odd_d_head_is_rejected() {
        let e = RopeTables::new(7, 4, DEFAULT_BASE, RopeScaling::None, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("even"), "{e}");
    }
}

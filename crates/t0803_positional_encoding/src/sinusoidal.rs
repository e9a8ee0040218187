//! Sinusoidal position encoding (Vaswani et al., 2017, §3.5), computed from the frequency formula.

use candle_core::{bail, DType, Device, Result, Tensor};

/// The base of the wavelengths in "Attention Is All You Need": wavelengths run from `2π` to
/// `10000·2π`, far longer than any sequence of the paper.
pub const DEFAULT_BASE: f64 = 10_000.0;

/// The angular frequencies `ωᵢ = base^(−2i/d_model)` for `i = 0 … d_model/2 − 1` (f64).
///
/// `ω₀ = 1` (wavelength `2π` positions); each next pair is slower by the constant factor
/// `base^(2/d_model)`. `d_model` must be even: dimensions come in (sin, cos) pairs.
pub fn frequencies(d_model: usize, base: f64) -> Result<Vec<f64>> {
    if d_model == 0 || d_model % 2 == 1 {
        bail!("sinusoidal encoding needs an even, positive d_model (got {d_model}): dimensions come in (sin, cos) pairs");
    }
    if !(base.is_finite() && base > 1.0) {
        bail!("sinusoidal encoding needs a finite base > 1 (got {base})");
    }
    Ok((0..d_model / 2)
        .map(|i| base.powf(-((2 * i) as f64) / d_model as f64))
        .collect())
}

/// The encodings of positions `offset, offset+1, …, offset+seq_len−1`: `(seq_len, d_model)`, f32,
/// with the default base 10000.
///
/// `offset` is the position of the first row: a decoder generating token 57 with a KV cache asks
/// for `sinusoidal(1, d_model, 57, dev)`.
pub fn sinusoidal(
    seq_len: usize,
    d_model: usize,
    offset: usize,
    device: &Device,
) -> Result<Tensor> {
    sinusoidal_with_base(seq_len, d_model, offset, DEFAULT_BASE, device)
}

/// [`sinusoidal`] with a chosen `base` (a larger base stretches the slowest wavelengths).
pub fn sinusoidal_with_base(
    seq_len: usize,
    d_model: usize,
    offset: usize,
    base: f64,
    device: &Device,
) -> Result<Tensor> {
    let positions: Vec<f64> = (offset..offset + seq_len).map(|p| p as f64).collect();
    sinusoidal_at(&positions, d_model, base, device)
}

/// The encodings of arbitrary (even fractional) positions: `(positions.len(), d_model)`, f32.
///
/// Angles are formed and passed through `sin`/`cos` in f64, then rounded once to f32: at position
/// 10⁴ an f32 angle would already be off by ~10⁻³ rad.
pub fn sinusoidal_at(
    positions: &[f64],
    d_model: usize,
    base: f64,
    device: &Device,
) -> Result<Tensor> {
    let omega = frequencies(d_model, base)?;
    let n = positions.len();
    let omega = Tensor::from_vec(omega, (1, d_model / 2), device)?; // (1, d/2)
    let pos = Tensor::from_slice(positions, (n, 1), device)?; // (n, 1)
    let angles = pos.broadcast_mul(&omega)?; // (n, d/2): pos·ωᵢ

    // Interleave: (n, d/2, 2) with [.., 0] = sin, [.., 1] = cos → columns sin, cos, sin, cos, …
    let pairs = Tensor::stack(&[angles.sin()?, angles.cos()?], 2)?;
    pairs.reshape((n, d_model))?.to_dtype(DType::F32)
}

/// The `(d_model, d_model)` matrix `M_k` with `PE(pos + k) = M_k · PE(pos)` for every `pos`
/// (column vectors; for rows `PE[k..] = PE[..] · M_kᵀ`). It is block-diagonal with one 2×2
/// rotation `[[cos kωᵢ, sin kωᵢ], [−sin kωᵢ, cos kωᵢ]]` per frequency pair, and depends on `k`
/// only: relative position is a *linear* function of absolute position. Returned in f64.
pub fn shift_matrix(k: f64, d_model: usize, base: f64, device: &Device) -> Result<Tensor> {
    let omega = frequencies(d_model, base)?;
    let mut m = vec![0f64; d_model * d_model];
    for (i, w) in omega.iter().enumerate() {
        let (s, c) = (k * w).sin_cos();
        let (r, col) = (2 * i, 2 * i);
        m[r * d_model + col] = c; // sin' = cos(kω)·sin + sin(kω)·cos
        m[r * d_model + col + 1] = s;
        m[(r + 1) * d_model + col] = -s; // cos' = −sin(kω)·sin + cos(kω)·cos
        m[(r + 1) * d_model + col + 1] = c;
    }
    Tensor::from_vec(m, (d_model, d_model), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_frequency_is_one_and_they_decay_geometrically() -> Result<()> {
        let w = frequencies(8, 10_000.0)?;
        assert_eq!(w.len(), 4);
        assert_eq!(w[0], 1.0);
        for pair in w.windows(2) {
            assert!((pair[0] / pair[1] - 10_000f64.powf(2.0 / 8.0)).abs() < 1e-9);
        }
        Ok(())
    }

    #[test]
    fn odd_width_and_bad_base_are_named() {
        let err = frequencies(7, 10_000.0).unwrap_err().to_string();
        assert!(err.contains("got 7"), "{err}");
        let err = frequencies(8, 0.5).unwrap_err().to_string();
        assert!(err.contains("got 0.5"), "{err}");
    }

    #[test]
    fn position_zero_is_sin0_cos0() -> Result<()> {
        let pe = sinusoidal(1, 6, 0, &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(pe[0], vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
        Ok(())
    }
}

//! Small helpers shared by the experiments: a seeded generator, Gaussian tensors, tensor →
//! rows conversion and least-squares fits.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use shared::params::sample_normal;

/// A small deterministic generator (SplitMix64) for shuffles and token draws.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform draw from `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A uniformly random permutation of `0..n` (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, self.below(i + 1));
        }
        p
    }
}

/// An f32 tensor of `shape` with i.i.d. `N(0, std²)` entries from the shared seeded generator.
pub fn gaussian(shape: &[usize], std: f64, dev: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(
        sample_normal(n, std, f64::INFINITY),
        shape,
        dev,
    )?)
}

/// A matrix `(r, c)` as `r` rows of f64.
pub fn to_rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.to_dtype(DType::F64)?.to_vec2::<f64>()?)
}

/// Least-squares line `y ≈ a + b·x`; returns `(a, b)`.
pub fn linear_fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let cov: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = points.iter().map(|(x, _)| (x - mx).powi(2)).sum();
    let b = cov / var;
    (my - b * mx, b)
}

/// Least-squares slope of `ln y` against `ln x`: the exponent `p` of `y ∝ xᵖ`.
pub fn loglog_slope(points: &[(f64, f64)]) -> f64 {
    let logs: Vec<(f64, f64)> = points.iter().map(|(x, y)| (x.ln(), y.ln())).collect();
    linear_fit(&logs).1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_recover_line_and_power() {
        let (a, b) = linear_fit(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]);
        assert!((a - 1.0).abs() < 1e-12 && (b - 2.0).abs() < 1e-12);
        let square: Vec<(f64, f64)> = (1..6).map(|x| (x as f64, (x * x) as f64)).collect();
        assert!((loglog_slope(&square) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = SplitMix(7).permutation(10);
        p.sort_unstable();
        assert_eq!(p, (0..10).collect::<Vec<_>>());
    }
}

//! A small seeded generator for tests and property sweeps: splitmix64 for integers and uniforms,
//! Box–Muller for normals. The same seed gives the same draws on every machine, so a failing
//! random case can be replayed from the seed its message prints.

use candle_core::{Device, Result, Tensor};

/// splitmix64 + Box–Muller.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller, cosine branch).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniform in `0 .. n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    pub fn coin(&mut self) -> bool {
        self.below(2) == 1
    }

    /// `std·N(0, 1)` of `shape`, f64 on the CPU.
    pub fn tensor(&mut self, shape: &[usize], std: f64) -> Result<Tensor> {
        self.shifted_tensor(shape, 0.0, std)
    }

    /// `mean + std·N(0, 1)` of `shape`, f64 on the CPU.
    pub fn shifted_tensor(&mut self, shape: &[usize], mean: f64, std: f64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f64> = (0..n).map(|_| mean + std * self.normal()).collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_reproducible_and_in_range() {
        let (mut a, mut b) = (Rng::new(3), Rng::new(3));
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        assert_eq!(xs, (0..5).map(|_| b.next_u64()).collect::<Vec<_>>());
        let mut r = Rng::new(9);
        let (mut sum, mut sq) = (0.0, 0.0);
        for _ in 0..20_000 {
            let u = r.uniform();
            assert!((0.0..1.0).contains(&u));
            assert!(r.below(7) < 7);
            let z = r.normal();
            sum += z;
            sq += z * z;
        }
        assert!((sum / 20_000.0).abs() < 0.03 && (sq / 20_000.0 - 1.0).abs() < 0.05);
    }
}

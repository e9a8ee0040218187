//! What the custom ops' CPU loops share so that they run at the speed of the machine:
//!
//! - [`Real`], the arithmetic they compute in: f32 for f32, bf16 and f16 tensors (as the CUDA
//!   kernels do), f64 for f64 tensors (the tests' references);
//! - [`exp_f32`] and [`tanh_f32`], an `eˣ` and a `tanh` the compiler can vectorise: libm's `expf`
//!   and `tanhf` are a call per element, and a softmax, a SiLU, a GELU, an LSTM cell or a
//!   cross-entropy spends most of its time there;
//! - [`for_each_row`], which spreads the rows of an output over the cores when there are enough
//!   of them to pay for the hand-over;
//! - [`in_pool`], which runs a whole program on a worker of rayon's pool, so that every one of
//!   those loops, and every matmul, forks inside the pool instead of being handed to it.
//!
//! Written as plain loops over slices, with no `unsafe` and no intrinsics: the compiler turns
//! them into SIMD code for the target it builds for.

use candle_core::WithDType;
use rayon::prelude::*;

/// The arithmetic of a CPU loop: `f32` or `f64`, with the few functions the ops need.
pub trait Real: WithDType + PartialOrd + std::ops::AddAssign + Send + Sync {
    fn exp(self) -> Self;
    fn tanh(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn maximum(self, other: Self) -> Self;
    fn neg_infinity() -> Self;
    /// The logistic function `σ(x) = 1/(1 + e⁻ˣ)` (0 and 1 at the infinities).
    #[inline(always)]
    fn sigmoid(self) -> Self {
        Self::one() / (Self::one() + (Self::zero() - self).exp())
    }
    /// From a tensor element of type `T` (exact for f32 → f32, f64 → f64 and the halves → f32).
    fn of<T: Element>(v: T) -> Self;
    /// Back to a tensor element of type `T` (rounded once).
    fn to<T: Element>(self) -> T;
}

/// A tensor element the CPU loops read and write (f32, f64, bf16, f16), with conversions the
/// compiler always inlines: Candle's `WithDType::to_f64`/`from_f64` are calls into another crate,
/// which a dev build does not inline, and a call per element stops a loop from being vectorised.
pub trait Element: WithDType {
    fn as_f32(self) -> f32;
    fn as_f64(self) -> f64;
    fn of_f32(v: f32) -> Self;
    fn of_f64(v: f64) -> Self;
}

macro_rules! element {
    ($t:ty, $to32:expr, $to64:expr, $from32:expr, $from64:expr) => {
        impl Element for $t {
            #[inline(always)]
            fn as_f32(self) -> f32 {
                $to32(self)
            }
            #[inline(always)]
            fn as_f64(self) -> f64 {
                $to64(self)
            }
            #[inline(always)]
            fn of_f32(v: f32) -> Self {
                $from32(v)
            }
            #[inline(always)]
            fn of_f64(v: f64) -> Self {
                $from64(v)
            }
        }
    };
}

element!(f32, |v| v, |v: f32| v as f64, |v| v, |v: f64| v as f32);
element!(f64, |v: f64| v as f32, |v| v, |v: f32| v as f64, |v| v);
element!(
    half::bf16,
    half::bf16::to_f32,
    half::bf16::to_f64,
    half::bf16::from_f32,
    half::bf16::from_f64
);
element!(
    half::f16,
    half::f16::to_f32,
    half::f16::to_f64,
    half::f16::from_f32,
    half::f16::from_f64
);

impl Real for f32 {
    #[inline(always)]
    fn of<T: Element>(v: T) -> Self {
        v.as_f32()
    }
    #[inline(always)]
    fn to<T: Element>(self) -> T {
        T::of_f32(self)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        tanh_f32(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn maximum(self, other: Self) -> Self {
        f32::max(self, other)
    }
    fn neg_infinity() -> Self {
        f32::NEG_INFINITY
    }
}

impl Real for f64 {
    #[inline(always)]
    fn of<T: Element>(v: T) -> Self {
        v.as_f64()
    }
    #[inline(always)]
    fn to<T: Element>(self) -> T {
        T::of_f64(self)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn maximum(self, other: Self) -> Self {
        f64::max(self, other)
    }
    fn neg_infinity() -> Self {
        f64::NEG_INFINITY
    }
}

/// `eˣ` in f32, within 2 ulp of the exact value for `x ∈ [−87.3, 88.3]`, without a branch or a
/// library call, so that a loop calling it is vectorised.
///
/// Range reduction: `eˣ = 2ⁿ·eʳ` with `n = round(x·log₂e)` and `r = x − n·ln 2`, so
/// `|r| ≤ ln 2 / 2`. `ln 2` is split in two (`LN2_HI` has few enough bits that `n·LN2_HI` is
/// exact), which keeps `r` accurate. `eʳ` is its Taylor series to `r⁷` (the next term is below
/// `0.347⁸/8! ≈ 5·10⁻⁹`, a tenth of an f32 ulp), and `2ⁿ` is built directly in the exponent bits.
/// `n` comes from the magic-number rounding `t + 1.5·2²³`, whose low mantissa bits hold
/// `round(t)`. Outside the range: `0` below `−87.34` (where `eˣ` falls under the smallest normal
/// float), `+∞` above `88.72`, `NaN` for `NaN`.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 0x3F318000: 9 significant bits
    const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³
    let xc = x.clamp(-87.3, 88.3);
    let shifted = xc * LOG2E + ROUND;
    let n = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let nf = shifted - ROUND;
    let r = (xc - nf * LN2_HI) - nf * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let two_n = f32::from_bits(((n + 127) as u32) << 23);
    let y = p * two_n;
    let y = if x < -87.34 { 0.0 } else { y };
    let y = if x > 88.72 { f32::INFINITY } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// `tanh x` in f32, within a few ulp of the exact value, without a branch or a library call (as
/// [`exp_f32`]). Two formulas, both computed and one selected:
///
/// - `|x| ≥ 0.4`: `tanh|x| = (1 − e^(−2|x|)) / (1 + e^(−2|x|))` with the sign put back. The
///   numerator loses no precision there (`e^(−0.8) ≈ 0.45`), and `e^(−2|x|)` underflows to 0 for
///   large `|x|`, which gives exactly ±1.
/// - `|x| < 0.4`: the odd Taylor series to `x¹³`, `x − x³/3 + 2x⁵/15 − …` (the next term is below
///   `0.0015·0.4¹⁵ ≈ 1.6·10⁻⁹`), because near 0 the quotient above would subtract two numbers
///   close to 1.
#[inline(always)]
pub fn tanh_f32(x: f32) -> f32 {
    let a = x.abs();
    let e = exp_f32(-2.0 * a);
    let far = (1.0 - e) / (1.0 + e);
    let z = x * x;
    let near = a
        * (1.0
            + z * (-1.0 / 3.0
                + z * (2.0 / 15.0
                    + z * (-17.0 / 315.0
                        + z * (62.0 / 2835.0
                            + z * (-1382.0 / 155_925.0 + z * (21_844.0 / 6_081_075.0)))))));
    let t = if a < 0.4 { near } else { far };
    let t = if x.is_nan() { x } else { t };
    t.copysign(x)
}

/// `Σᵢ f(xᵢ)` in eight interleaved partial sums, which the compiler keeps in SIMD registers (a
/// single running sum is a chain of dependent additions it may not reorder).
#[inline(always)]
pub fn sum_by<T: Copy, A: Real>(xs: &[T], f: impl Fn(T) -> A) -> A {
    let mut lanes = [A::zero(); 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += f(x);
        }
    }
    let tail = chunks.remainder().iter().fold(A::zero(), |s, &x| s + f(x));
    lanes.iter().fold(tail, |s, &l| s + l)
}

/// `Σᵢ f(xᵢ, yᵢ)` over two slices of one length, in eight partial sums as [`sum_by`].
#[inline(always)]
pub fn sum_zip<T: Copy, U: Copy, A: Real>(xs: &[T], ys: &[U], f: impl Fn(T, U) -> A) -> A {
    assert_eq!(xs.len(), ys.len(), "sum_zip: slices of different lengths");
    let mut lanes = [A::zero(); 8];
    let (mut cx, mut cy) = (xs.chunks_exact(8), ys.chunks_exact(8));
    for (a, b) in (&mut cx).zip(&mut cy) {
        for ((l, &x), &y) in lanes.iter_mut().zip(a).zip(b) {
            *l += f(x, y);
        }
    }
    let tail = cx
        .remainder()
        .iter()
        .zip(cy.remainder())
        .fold(A::zero(), |s, (&x, &y)| s + f(x, y));
    lanes.iter().fold(tail, |s, &l| s + l)
}

/// `maxᵢ xᵢ` (as `A`) in eight interleaved lanes, as [`sum_by`]; `−∞` for an empty slice.
#[inline(always)]
pub fn max_of<T: Element, A: Real>(xs: &[T]) -> A {
    let mut lanes = [A::neg_infinity(); 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = l.maximum(A::of(x));
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(A::neg_infinity(), |m, &x| m.maximum(A::of(x)));
    lanes.iter().fold(tail, |m, &l| m.maximum(l))
}

/// Elements below which a loop stays on the calling thread: handing rows to another core costs
/// a few microseconds, as much as a few thousand elements of arithmetic.
const PARALLEL_MIN_ELEMENTS: usize = 16 * 1024;

/// Runs `f(row_index, row)` over the rows of `out` (each `row_len` long), on several threads
/// when `out` is large, in order on this thread otherwise.
pub fn for_each_row<T: Send>(
    out: &mut [T],
    row_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    for_each_row_costing(out, row_len, row_len, f)
}

/// [`for_each_row`] for rows whose work is not their length (a row of a reduction writes one
/// value from `work_per_row` inputs).
pub fn for_each_row_costing<T: Send>(
    out: &mut [T],
    row_len: usize,
    work_per_row: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if row_len == 0 {
        return;
    }
    let rows = out.len() / row_len;
    let work = rows * work_per_row.max(1);
    if work < PARALLEL_MIN_ELEMENTS || rayon::current_num_threads() < 2 {
        out.chunks_mut(row_len)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
        return;
    }
    let rows_per_task = (PARALLEL_MIN_ELEMENTS / 4 / work_per_row.max(1)).max(1);
    out.par_chunks_mut(row_len)
        .enumerate()
        .with_min_len(rows_per_task)
        .for_each(|(i, r)| f(i, r));
}

/// A zero-filled output of `len` elements, ready for [`for_each_row`].
pub fn zeros<T: WithDType>(len: usize) -> Vec<T> {
    vec![T::zero(); len]
}

/// The stack of the pool's threads: the main thread's usual 8 MiB (Candle's backward walks the
/// graph recursively; rayon's default for its workers is 2 MiB).
const POOL_STACK_BYTES: usize = 8 << 20;

/// Runs `f` on a worker thread of rayon's global pool and returns what it returns. Every binary's
/// `main` runs its work this way.
///
/// This project's CPU loops ([`for_each_row`]) and Candle's matmuls fork their work onto rayon's
/// pool. From the main thread each fork is a hand-off: the job is queued for the pool, a worker
/// is woken, and the main thread sleeps on a latch until the job is done — two futex round trips
/// per op, thousands per training step of a small model. From a worker thread the same fork is
/// rayon's work stealing: the calling thread does its share, the other workers steal the rest,
/// and nobody sleeps. The thread pools are set up first (see [`crate::device`]: one pool, of
/// the machine's cores), before any thread exists.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    crate::device::one_cpu_thread_pool();
    // Fails only when the global pool already exists (a second call): it is then used as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(POOL_STACK_BYTES)
        .build_global();
    rayon::join(f, || ()).0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ulps between two finite f32 of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_f32_is_within_two_ulp_of_the_exact_value_over_its_range() {
        let mut worst = 0;
        let mut x = -87.3f32;
        while x <= 88.3 {
            let exact = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp_f32(x), exact));
            x += 0.001_37;
        }
        for x in [
            0.0f32,
            1e-8,
            -1e-8,
            0.5,
            -0.5,
            1.0,
            -1.0,
            0.346_573_6,
            -0.346_573_6,
        ] {
            worst = worst.max(ulps(exp_f32(x), (x as f64).exp() as f32));
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn exp_f32_limits_match_ieee() {
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn tanh_f32_is_within_a_few_ulp_of_the_exact_value() {
        let mut worst = 0;
        let mut x = -12.0f32;
        while x <= 12.0 {
            let exact = (x as f64).tanh() as f32;
            worst = worst.max(ulps(tanh_f32(x), exact));
            x += 0.000_71;
        }
        for x in [
            1e-30f32,
            1e-8,
            1e-3,
            0.399_999_98,
            0.4,
            0.400_000_1,
            9.0,
            20.0,
        ] {
            for x in [x, -x] {
                worst = worst.max(ulps(tanh_f32(x), (x as f64).tanh() as f32));
            }
        }
        assert!(worst <= 3, "worst error {worst} ulp");
        assert_eq!(tanh_f32(0.0), 0.0);
        assert_eq!(tanh_f32(f32::INFINITY), 1.0);
        assert_eq!(tanh_f32(f32::NEG_INFINITY), -1.0);
        assert_eq!(tanh_f32(-100.0), -1.0);
        assert!(tanh_f32(f32::NAN).is_nan());
    }

    #[test]
    fn sigmoid_saturates_to_zero_and_one() {
        assert_eq!(Real::sigmoid(f32::NEG_INFINITY), 0.0f32);
        assert_eq!(Real::sigmoid(f32::INFINITY), 1.0f32);
        assert_eq!(Real::sigmoid(0.0f32), 0.5);
        for x in [-20.0f32, -3.0, -0.1, 0.7, 5.0] {
            let exact = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!(
                (Real::sigmoid(x) as f64 - exact).abs() <= 2e-7 * exact,
                "σ({x})"
            );
        }
    }

    #[test]
    fn lane_sums_and_maxima_equal_the_plain_ones() {
        for n in [0usize, 1, 7, 8, 9, 100] {
            let xs: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
            let plain: f64 = xs.iter().map(|&x| (x as f64) * (x as f64)).sum();
            assert_eq!(sum_by(&xs, |x| (x as f64) * (x as f64)), plain);
            let m = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_of::<f32, f32>(&xs), m);
            assert_eq!(sum_zip(&xs, &xs, |x, y| (x as f64) * (y as f64)), plain);
        }
    }

    #[test]
    fn rows_are_visited_once_with_their_index_on_one_thread_or_many() {
        for rows in [3, 5000] {
            let mut out = zeros::<f32>(rows * 7);
            for_each_row(&mut out, 7, |i, r| {
                r.iter_mut().for_each(|v| *v += i as f32)
            });
            for (i, r) in out.chunks(7).enumerate() {
                assert!(r.iter().all(|&v| v == i as f32), "row {i}: {r:?}");
            }
        }
    }

    #[test]
    fn in_pool_runs_on_a_worker_and_returns_the_result() {
        assert_eq!(rayon::current_thread_index(), None); // the test's own thread
                                                         // Enough rows of enough work that for_each_row forks them over the pool.
        let (rows, width) = (64u64, 4096u64);
        let (index, sum) = in_pool(|| {
            let v: Vec<u64> = (0..rows * width).collect();
            let mut out = vec![0u64; (rows * width) as usize];
            for_each_row(&mut out, width as usize, |i, o| {
                let row = &v[i * width as usize..(i + 1) * width as usize];
                o.copy_from_slice(row);
            });
            (rayon::current_thread_index(), out.iter().sum::<u64>())
        });
        assert!(
            index.is_some(),
            "in_pool ran its closure outside rayon's pool"
        );
        let n = rows * width;
        assert_eq!(sum, n * (n - 1) / 2);
    }
}

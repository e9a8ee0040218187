//! Randomized equivalence tests (seeded, bounded): FlashAttention forward and backward against
//! the float64 naive path over random shapes, dtypes, causal flags and inputs that start at
//! non-zero element offsets of a larger buffer; FlashAttention as 8-02's attention kernel against
//! the naive kernel with random grouped K/V heads; padded keys (random lengths per sequence,
//! causal or not) against 8-02's naive kernel with the padding mask, padded keys' gradients zero.
//!
//! On the CPU (the default) the dtypes are f32 and f64. With `MODULE08_TEST_DEVICE=cuda` the same
//! tests run on the GPU with f32, bf16 and f16, the kernel choice `Auto` or `Simple`, and head
//! sizes that reach every CUDA kernel family (tensor cores, register-tiled f32, simple fp32 FMA);
//! the test asserts that every family was exercised. Low-precision dtypes are judged as
//! `tests/gpu.rs` does: error ≤ 2 × the naive path's error in the same dtype + a rounding
//! allowance. Every failure message starts with the case that failed.

mod common;
use candle_core::{DType, Device, Result, Tensor, Var};
use common::*;
use shared::device::test_device;
use std::collections::BTreeSet;
use t0802_multi_head_attention::{AttentionKernel, AttnMask, KeyPadding, NaiveAttention};
use t0809_flash_attention::*;

/// Cases per property on the CPU (dev profile, 2 cores: each file well under 30 s).
const CPU_CASES: usize = 200;
/// Cases per property on the GPU (every kernel family, both kernel choices, three dtypes); a
/// third of them under compute-sanitizer (`MODULE08_SANITIZER`, set by `scripts/sanitize.sh`),
/// where every launch is a hundred times slower.
fn gpu_cases() -> usize {
    if std::env::var_os("MODULE08_SANITIZER").is_some() {
        20
    } else {
        60
    }
}

fn flash_auto(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    flash_attention_with(q, k, v, scale, causal, FlashKernels::Auto)
}

fn flash_simple(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    flash_attention_with(q, k, v, scale, causal, FlashKernels::Simple)
}

fn flash_mma_sync(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    flash_attention_with(q, k, v, scale, causal, FlashKernels::MmaSync)
}

/// On a Hopper card the warpgroup-MMA kernels at every length, the backward included.
fn flash_warpgroup_mma(q: &Tensor, k: &Tensor, v: &Tensor, s: f64, causal: bool) -> Result<Tensor> {
    flash_attention_with(q, k, v, s, causal, FlashKernels::WarpgroupMma)
}

/// One random case of the attention op.
#[derive(Debug, Clone, Copy)]
struct Case {
    b: usize,
    h: usize,
    n_q: usize,
    n_k: usize,
    d: usize,
    causal: bool,
    scale: f64,
    dtype: DType,
    kernels: FlashKernels,
    /// Element offsets at which q, k and v start in their buffers.
    offsets: [usize; 3],
}

impl Case {
    /// Case `i` of a GPU sweep: the first four are drawn in the dtype, head size and kernel
    /// choice of one CUDA kernel family each (mma.sync tensor cores, register-tiled f32, simple
    /// f32, and on a Hopper card the warpgroup-MMA kernels), so that even a short sweep (under
    /// compute-sanitizer) reaches every family; the rest as [`Case::draw`].
    fn draw_nth(rng: &mut Rng, on_gpu: bool, i: usize) -> Self {
        let c = Self::draw(rng, on_gpu);
        let family = |dtype, d, kernels| Case {
            dtype,
            d,
            kernels,
            offsets: [0; 3],
            scale: default_softmax_scale(d),
            ..c
        };
        match (on_gpu, i) {
            (true, 0) => family(DType::BF16, 64, FlashKernels::MmaSync),
            (true, 1) => family(DType::F32, 64, FlashKernels::Auto),
            (true, 2) => family(DType::F32, 40, FlashKernels::Auto),
            (true, 3) => family(DType::BF16, 64, FlashKernels::WarpgroupMma),
            _ => c,
        }
    }

    fn draw(rng: &mut Rng, on_gpu: bool) -> Self {
        let b = 1 + rng.below(2);
        let h = 1 + rng.below(4);
        let causal = rng.below(2) == 1;
        let n_k = 1 + rng.below(if on_gpu { 150 } else { 80 });
        // n_q ≠ n_k allowed; the causal mask needs n_q ≤ n_k (end-aligned diagonal).
        let n_q = if causal {
            1 + rng.below(n_k)
        } else {
            1 + rng.below(if on_gpu { 150 } else { 80 })
        };
        let ds: &[usize] = if on_gpu {
            &[8, 16, 32, 40, 64, 128]
        } else {
            &[8, 16, 32, 40, 64]
        };
        let d = ds[rng.below(ds.len())];
        let dtypes: &[DType] = if on_gpu {
            &[DType::F32, DType::BF16, DType::F16]
        } else {
            &[DType::F32, DType::F64]
        };
        let dtype = dtypes[rng.below(dtypes.len())];
        let kernels = match rng.below(6) {
            0 => FlashKernels::Simple,
            1 => FlashKernels::MmaSync,
            2 => FlashKernels::WarpgroupMma,
            _ => FlashKernels::Auto,
        };
        // Two thirds of the cases start every input 16-byte aligned for 16-bit types (multiples of
        // 8 elements); the rest start anywhere in 1..=20.
        let aligned = rng.below(3) != 0;
        let mut offset = || {
            if aligned {
                8 * rng.below(4)
            } else {
                1 + rng.below(20)
            }
        };
        let offsets = [offset(), offset(), offset()];
        let scale = default_softmax_scale(d) * (0.5 + rng.uniform());
        Self {
            b,
            h,
            n_q,
            n_k,
            d,
            causal,
            scale,
            dtype,
            kernels,
            offsets,
        }
    }

    fn flash(&self) -> Attn {
        match self.kernels {
            FlashKernels::Auto => flash_auto,
            FlashKernels::MmaSync => flash_mma_sync,
            FlashKernels::Simple => flash_simple,
            FlashKernels::WarpgroupMma => flash_warpgroup_mma,
        }
    }

    /// The family that runs this case on `dev`.
    fn family(&self, dev: &Device) -> CudaKernelFamily {
        let hopper = hopper_kernels_on(dev);
        cuda_kernel_family(self.dtype, self.d, &self.offsets, self.kernels, hopper)
    }
}

/// A `shape` input of `dtype` on `dev` that starts `offset` elements into a larger buffer. The
/// buffer is the variable, so the view handed to the op keeps its offset under autograd
/// (`Var::from_tensor` of a view would copy it to offset 0).
struct Input {
    buf: Var,
    offset: usize,
    shape: Vec<usize>,
}

impl Input {
    fn draw(
        rng: &mut Rng,
        shape: &[usize],
        offset: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let n: usize = shape.iter().product();
        let buf = rng
            .tensor(&[n + offset + 5], 1.0)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        Ok(Self {
            buf: Var::from_tensor(&buf)?,
            offset,
            shape: shape.to_vec(),
        })
    }

    /// The contiguous view at `offset` (differentiable with respect to the buffer).
    fn view(&self) -> Result<Tensor> {
        let n: usize = self.shape.iter().product();
        let t = self
            .buf
            .as_tensor()
            .narrow(0, self.offset, n)?
            .reshape(self.shape.as_slice())?;
        assert_eq!(
            t.layout().start_offset(),
            self.offset,
            "the view must keep its offset"
        );
        assert!(t.is_contiguous());
        Ok(t)
    }

    /// The gradient of the view, read from the buffer's.
    fn grad(&self, g: &candle_core::backprop::GradStore) -> Result<Tensor> {
        let n: usize = self.shape.iter().product();
        g.get(self.buf.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("missing gradient".into()))?
            .narrow(0, self.offset, n)?
            .reshape(self.shape.as_slice())
    }
}

/// `(O, [dQ, dK, dV])` of `loss = Σ O ⊙ dO` with the op run on the offset views themselves.
fn grads_at_offsets(
    f: Attn,
    ins: &[Input; 3],
    d_o: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<(Tensor, [Tensor; 3])> {
    let o = f(
        &ins[0].view()?,
        &ins[1].view()?,
        &ins[2].view()?,
        scale,
        causal,
    )?;
    let g = (&o * d_o)?.sum_all()?.backward()?;
    Ok((o, [ins[0].grad(&g)?, ins[1].grad(&g)?, ins[2].grad(&g)?]))
}

fn up(t: &Tensor) -> Result<Tensor> {
    t.to_device(&Device::Cpu)?.to_dtype(DType::F64)
}

/// Runs one case and checks the output, the log-sum-exp and the three gradients.
fn check_case(rng: &mut Rng, c: &Case, dev: &Device) -> Result<()> {
    let who = format!("{c:?}");
    let Case {
        b,
        h,
        n_q,
        n_k,
        d,
        causal,
        scale,
        dtype,
        offsets,
        ..
    } = *c;
    let ins = [
        Input::draw(rng, &[b, h, n_q, d], offsets[0], dtype, dev)?,
        Input::draw(rng, &[b, h, n_k, d], offsets[1], dtype, dev)?,
        Input::draw(rng, &[b, h, n_k, d], offsets[2], dtype, dev)?,
    ];
    let (q, k, v) = (
        ins[0].view()?.detach(),
        ins[1].view()?.detach(),
        ins[2].view()?.detach(),
    );
    let d_o = rng.tensor(&[b, h, n_q, d], 1.0)?;
    // The references: a float64 triple loop (output, log-sum-exp) and the float64 naive path
    // with autograd (output, gradients), both on exactly the rounded inputs.
    let (q64, k64, v64) = (up(&q)?, up(&k)?, up(&v)?);
    let d_o_low = d_o.to_dtype(dtype)?.to_device(dev)?;
    let d_o64 = up(&d_o_low)?;
    let (loop_o, loop_l) = reference(&q64, &k64, &v64, scale, causal)?;
    let (want_o, want_g) = grads(naive_attention, &q64, &k64, &v64, &d_o64, scale, causal)?;
    let want_o = to_vec(&want_o)?;
    assert!(
        max_rel(&want_o, &loop_o) <= 1e-12,
        "{who}: the two float64 references disagree"
    );

    let (o, g) = grads_at_offsets(c.flash(), &ins, &d_o_low, scale, causal)?;
    assert_eq!(o.dims(), &[b, h, n_q, d], "{who}");
    assert_eq!(o.dtype(), dtype, "{who}");
    assert!(
        o.device().same_device(dev),
        "{who}: output on another device"
    );
    for (i, name) in ["dQ", "dK", "dV"].iter().enumerate() {
        assert_eq!(g[i].dims(), want_g[i].dims(), "{who}: {name} shape");
        assert_eq!(g[i].dtype(), dtype, "{who}: {name} dtype");
    }
    let (_, l) = flash_attention_with_lse(&q, &k, &v, scale, causal)?;
    let names = ["O", "dQ", "dK", "dV"];
    let ours = [&o, &g[0], &g[1], &g[2]];
    let wants = [
        want_o.clone(),
        to_vec(&want_g[0])?,
        to_vec(&want_g[1])?,
        to_vec(&want_g[2])?,
    ];
    match (dtype, dev.is_cuda()) {
        (DType::F64, _) => {
            // Same loops in f64: exact up to rounding (tests/forward.rs, tests/backward.rs).
            let e = max_rel(&to_vec(&o)?, &loop_o);
            assert!(e <= 1e-12, "{who}: f64 output error {e:e}");
            let e = max_rel(&to_vec(&l)?, &loop_l);
            assert!(e <= 1e-12, "{who}: f64 log-sum-exp error {e:e}");
            for i in 1..4 {
                let e = max_rel(&to_vec(ours[i])?, &wants[i]);
                assert!(e <= 1e-10, "{who}: f64 {} error {e:e}", names[i]);
            }
        }
        (DType::F32, false) => {
            // The CPU op in f32 (tests/forward.rs, tests/backward.rs).
            let e = max_rel(&to_vec(&o)?, &loop_o);
            assert!(e <= 1e-5, "{who}: f32 output error {e:e}");
            let e = max_rel(&to_vec(&l)?, &loop_l);
            assert!(e <= 1e-5, "{who}: f32 log-sum-exp error {e:e}");
            for i in 1..4 {
                let e = max_rel(&to_vec(ours[i])?, &wants[i]);
                assert!(e <= 1e-5, "{who}: f32 {} error {e:e}", names[i]);
            }
        }
        (DType::F32, true) => {
            // The CUDA kernels in f32 (tests/gpu.rs).
            let e = rel_norm(&to_vec(&o)?, &loop_o);
            assert!(e <= 1e-4, "{who}: f32 output error {e:e}");
            let e = max_abs(&to_vec(&l)?, &loop_l);
            let lmax = loop_l.iter().fold(0.0f64, |a, x| a.max(x.abs()));
            assert!(e <= 1e-4 * (1.0 + lmax), "{who}: f32 lse error {e:e}");
            for i in 1..4 {
                // dQ is exactly 0 with a single key: an RMS error against the natural scale 1.
                let e = rel_norm_floor(&to_vec(ours[i])?, &wants[i], 1.0);
                assert!(e <= 1e-4, "{who}: f32 {} error {e:e}", names[i]);
            }
        }
        (DType::BF16 | DType::F16, true) => {
            // Within twice the naive path's error in the same dtype, plus the dtype's rounding.
            let (naive_o, naive_g) = grads(naive_attention, &q, &k, &v, &d_o_low, scale, causal)?;
            let naives = [&naive_o, &naive_g[0], &naive_g[1], &naive_g[2]];
            for i in 0..4 {
                let (e_ours, e_naive) = (
                    max_abs(&to_vec(ours[i])?, &wants[i]),
                    max_abs(&to_vec(naives[i])?, &wants[i]),
                );
                let atol = rounding_atol(&wants[i], dtype)?;
                assert!(
                    e_ours <= 2.0 * e_naive + atol,
                    "{who}: {} ours {e_ours:e}, naive {e_naive:e}, atol {atol:e}",
                    names[i]
                );
            }
        }
        (other, on_gpu) => panic!("{who}: no rule for {other:?} (gpu: {on_gpu})"),
    }
    Ok(())
}

#[test]
fn random_shapes_offsets_and_dtypes_forward_and_backward_match_float64_naive() -> Result<()> {
    let dev = test_device();
    let on_gpu = dev.is_cuda();
    let mut rng = Rng::new(0x0809_0001);
    let cases = if on_gpu { gpu_cases() } else { CPU_CASES };
    let mut families = BTreeSet::new();
    let mut dtypes = BTreeSet::new();
    let (mut causal, mut offset, mut unequal) = (0, 0, 0);
    for i in 0..cases {
        let c = Case::draw_nth(&mut rng, on_gpu, i);
        check_case(&mut rng, &c, &dev)?;
        families.insert(format!("{:?}", c.family(&dev)));
        dtypes.insert(format!("{:?}", c.dtype));
        causal += c.causal as usize;
        offset += c.offsets.iter().any(|&o| o > 0) as usize;
        unequal += (c.n_q != c.n_k) as usize;
    }
    // The draw must have reached what the test claims to cover.
    assert!(
        causal > 0 && causal < cases,
        "causal and non-causal cases: {causal}/{cases}"
    );
    assert!(
        offset > 0 && unequal > 0,
        "offsets {offset}, n_q ≠ n_k {unequal}"
    );
    let want_dtypes: &[&str] = if on_gpu {
        &["BF16", "F16", "F32"]
    } else {
        &["F32", "F64"]
    };
    for dt in want_dtypes {
        assert!(dtypes.contains(*dt), "dtype {dt} never drawn: {dtypes:?}");
    }
    if on_gpu {
        for f in gpu_families(&dev) {
            assert!(
                families.contains(f),
                "CUDA kernel family {f} never exercised: {families:?}"
            );
        }
    }
    println!("{cases} cases; CUDA families (if on the GPU): {families:?}; dtypes {dtypes:?}");
    Ok(())
}

/// The CUDA kernel families a random draw must reach on `dev`: warpgroup MMA too on Hopper.
fn gpu_families(dev: &Device) -> Vec<&'static str> {
    let mut f = vec!["TensorCores", "Fp32Tiled", "Fp32Fma"];
    if hopper_kernels_on(dev) {
        f.push("WarpgroupMma");
    }
    f
}

#[test]
fn every_cuda_kernel_family_matches_float64_naive() -> Result<()> {
    // One hand-picked case per (family, kernel choice), the rest random: every family is run even
    // if the random draw of the other test were to miss one. CPU runs take the f32/f64 rules.
    let dev = test_device();
    let on_gpu = dev.is_cuda();
    let mut rng = Rng::new(0x0809_0002);
    let plans: &[(DType, usize, [usize; 3], FlashKernels, CudaKernelFamily)] = &[
        (
            DType::BF16,
            64,
            [0, 8, 16],
            FlashKernels::Auto,
            CudaKernelFamily::TensorCores,
        ),
        (
            DType::F16,
            32,
            [8, 0, 24],
            FlashKernels::Auto,
            CudaKernelFamily::TensorCores,
        ),
        (
            DType::BF16,
            128,
            [16, 16, 0],
            FlashKernels::Auto,
            CudaKernelFamily::TensorCores,
        ),
        (
            DType::BF16,
            64,
            [3, 8, 0],
            FlashKernels::Auto,
            CudaKernelFamily::Fp32Fma,
        ),
        (
            DType::F16,
            32,
            [0, 0, 0],
            FlashKernels::Simple,
            CudaKernelFamily::Fp32Fma,
        ),
        (
            DType::F32,
            32,
            [4, 0, 12],
            FlashKernels::Auto,
            CudaKernelFamily::Fp32Tiled,
        ),
        (
            DType::F32,
            64,
            [0, 8, 4],
            FlashKernels::Auto,
            CudaKernelFamily::Fp32Tiled,
        ),
        (
            DType::F32,
            64,
            [2, 0, 0],
            FlashKernels::Auto,
            CudaKernelFamily::Fp32Fma,
        ),
        (
            DType::F32,
            40,
            [0, 0, 0],
            FlashKernels::Auto,
            CudaKernelFamily::Fp32Fma,
        ),
        (
            DType::F32,
            32,
            [4, 4, 4],
            FlashKernels::Simple,
            CudaKernelFamily::Fp32Fma,
        ),
        (
            DType::BF16,
            64,
            [8, 0, 8],
            FlashKernels::MmaSync,
            CudaKernelFamily::TensorCores,
        ),
        // The Hopper kernels forced at a short length (the backward too): warpgroup MMA on Hopper.
        (
            DType::BF16,
            64,
            [0, 0, 0],
            FlashKernels::WarpgroupMma,
            CudaKernelFamily::TensorCores,
        ),
        (
            DType::F16,
            128,
            [0, 0, 0],
            FlashKernels::MmaSync,
            CudaKernelFamily::TensorCores,
        ),
    ];
    let hopper = hopper_kernels_on(&dev);
    for &(dtype, d, offsets, kernels, family) in plans {
        // On Hopper the automatic choice for 16-bit types at d 64 and 128 is warpgroup MMA (and
        // so is WarpgroupMma's).
        let hopper_choice = matches!(kernels, FlashKernels::Auto | FlashKernels::WarpgroupMma);
        let family = match family {
            CudaKernelFamily::TensorCores if hopper && hopper_choice && d != 32 => {
                CudaKernelFamily::WarpgroupMma
            }
            f => f,
        };
        if !on_gpu && matches!(dtype, DType::BF16 | DType::F16) {
            continue; // low precision is judged on the GPU only
        }
        if !on_gpu && d == 128 {
            continue;
        }
        let mut c = Case::draw(&mut rng, on_gpu);
        c.dtype = dtype;
        c.d = d;
        c.offsets = offsets;
        c.kernels = kernels;
        c.scale = default_softmax_scale(d);
        assert_eq!(c.family(&dev), family, "{c:?}: kernel family");
        check_case(&mut rng, &c, &dev)?;
        if !on_gpu {
            // The same case in f64 on the CPU.
            c.dtype = DType::F64;
            check_case(&mut rng, &c, &dev)?;
        }
    }
    Ok(())
}

#[test]
fn flash_kernel_in_multi_head_attention_matches_naive_kernel_with_grouped_heads() -> Result<()> {
    use std::sync::Arc;
    use t0802_multi_head_attention::{AttnMask, MultiHeadAttention};
    let dev = test_device();
    let on_gpu = dev.is_cuda();
    let mut rng = Rng::new(0x0809_0003);
    let cases = if on_gpu { 40 } else { 60 };
    let mut grouped = 0;
    for _ in 0..cases {
        let n_heads = 1 + rng.below(4);
        let divisors: Vec<usize> = (1..=n_heads)
            .filter(|&k| n_heads.is_multiple_of(k))
            .collect();
        let n_kv = divisors[rng.below(divisors.len())];
        let d_head = [8, 16, 32, 40, 64][rng.below(5)];
        let d_model = n_heads * d_head;
        let (b, n) = (1 + rng.below(2), 1 + rng.below(40));
        let causal = rng.below(2) == 1;
        let kernels = match rng.below(6) {
            0 => FlashKernels::Simple,
            1 => FlashKernels::MmaSync,
            _ => FlashKernels::Auto,
        };
        let dtypes: &[DType] = if on_gpu {
            &[DType::F32]
        } else {
            &[DType::F32, DType::F64]
        };
        let dtype = dtypes[rng.below(dtypes.len())];
        let who = format!(
            "b {b} n {n} d_model {d_model} heads {n_heads} kv {n_kv} causal {causal} {kernels:?} {dtype:?}"
        );
        grouped += (n_kv < n_heads) as usize;
        let kv_w = n_kv * d_head;
        let std = 1.0 / (d_model as f64).sqrt();
        let w = [
            rng.tensor(&[d_model, d_model], std)?,
            rng.tensor(&[kv_w, d_model], std)?,
            rng.tensor(&[kv_w, d_model], std)?,
            rng.tensor(&[d_model, d_model], std)?,
        ];
        let x = rng.tensor(&[b, n, d_model], 1.0)?;
        // The reference: the naive kernel in f64 on the CPU, same weights.
        let naive = MultiHeadAttention::from_weights(
            n_heads,
            w[0].clone(),
            w[1].clone(),
            w[2].clone(),
            w[3].clone(),
        )?;
        assert_eq!(naive.cfg.n_kv_heads, n_kv, "{who}");
        let mask = if causal {
            AttnMask::Causal
        } else {
            AttnMask::None
        };
        let want = to_vec(&naive.self_attention(&x, mask, 0, None)?)?;
        let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(&dev);
        let flash = MultiHeadAttention::from_weights(
            n_heads,
            on(&w[0])?,
            on(&w[1])?,
            on(&w[2])?,
            on(&w[3])?,
        )?
        .with_kernel(Arc::new(FlashAttentionKernel { kernels }));
        let got = flash.self_attention(&on(&x)?, mask, 0, None)?;
        assert_eq!(got.dims(), &[b, n, d_model], "{who}");
        assert_eq!(got.dtype(), dtype, "{who}");
        let got = to_vec(&got)?;
        let (e, tol) = match (dtype, on_gpu) {
            (DType::F64, _) => (max_rel(&got, &want), 1e-12),
            (_, false) => (max_rel(&got, &want), 1e-5),
            (_, true) => (rel_norm(&got, &want), 1e-4),
        };
        assert!(
            e <= tol,
            "{who}: flash kernel vs f64 naive kernel {e:e} > {tol:e}"
        );
        // The inspection path (naive, keeps the weights) agrees too: the reference is not alone.
        let mask_t = if causal {
            Some(t0801_self_attention::causal_mask(n, n, &Device::Cpu)?)
        } else {
            None
        };
        let inspect = to_vec(&naive.forward(&x, mask_t.as_ref())?.output)?;
        let e = max_rel(&inspect, &want);
        assert!(e <= 1e-12, "{who}: naive kernel vs inspection path {e:e}");
    }
    assert!(grouped > 0, "no case with fewer K/V heads than query heads");
    Ok(())
}

/// `(O, [dQ, dK, dV])` of `loss = Σ O ⊙ dO` for an attention function of `(q, k, v)`.
fn grads_of(
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    [q, k, v]: [&Tensor; 3],
    d_o: &Tensor,
) -> Result<(Tensor, [Tensor; 3])> {
    let vars = [
        Var::from_tensor(q)?,
        Var::from_tensor(k)?,
        Var::from_tensor(v)?,
    ];
    let o = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    )?;
    let g = (&o * d_o)?.sum_all()?.backward()?;
    let get = |x: &Var| {
        g.get(x.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("missing gradient".into()))
    };
    Ok((o, [get(&vars[0])?, get(&vars[1])?, get(&vars[2])?]))
}

/// 8-02's naive kernel with key padding (lowered to the explicit mask, causal ∧ padding).
fn naive_padded(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keys: &KeyPadding,
    causal: bool,
) -> Result<Tensor> {
    NaiveAttention.attend(q, k, v, AttnMask::Padding { keys, causal }, None)
}

#[test]
fn padded_keys_match_float64_naive_with_the_padding_mask() -> Result<()> {
    let dev = test_device();
    let on_gpu = dev.is_cuda();
    let mut rng = Rng::new(0x0809_0005);
    let cases = if on_gpu { gpu_cases() } else { CPU_CASES / 2 };
    let (mut families, mut padded) = (BTreeSet::new(), 0);
    for i in 0..cases {
        let c = Case {
            offsets: [0; 3],
            ..Case::draw_nth(&mut rng, on_gpu, i)
        };
        let Case {
            b,
            h,
            n_q,
            n_k,
            d,
            causal,
            dtype,
            ..
        } = c;
        let lengths: Vec<usize> = (0..b).map(|_| 1 + rng.below(n_k)).collect();
        padded += lengths.iter().any(|&n| n < n_k) as usize;
        let who = format!("{c:?} lengths {lengths:?}");
        let draw = |rng: &mut Rng, n: usize| -> Result<Tensor> {
            rng.tensor(&[b, h, n, d], 1.0)?
                .to_dtype(dtype)?
                .to_device(&dev)
        };
        let (q, k, v, d_o) = (
            draw(&mut rng, n_q)?,
            draw(&mut rng, n_k)?,
            draw(&mut rng, n_k)?,
            draw(&mut rng, n_q)?,
        );
        let scale = default_softmax_scale(d); // the attention kernels' scale
        let flash = |q: &Tensor, k: &Tensor, v: &Tensor| {
            flash_attention_padded(q, k, v, scale, causal, c.kernels, &lengths)
        };
        let (o, g) = grads_of(flash, [&q, &k, &v], &d_o)?;
        // The float64 reference on the CPU, on exactly the rounded inputs.
        let keys64 = KeyPadding::new(&lengths, n_k, &Device::Cpu)?;
        let naive64 = |q: &Tensor, k: &Tensor, v: &Tensor| naive_padded(q, k, v, &keys64, causal);
        let (want_o, want_g) = grads_of(naive64, [&up(&q)?, &up(&k)?, &up(&v)?], &up(&d_o)?)?;
        // Padded keys get exactly zero gradients.
        for (name, grad) in [("dK", &g[1]), ("dV", &g[2])] {
            let rows = to_vec(grad)?;
            for (bi, &len) in lengths.iter().enumerate() {
                let per_seq = h * n_k * d;
                for hi in 0..h {
                    let start = bi * per_seq + hi * n_k * d + len * d;
                    let end = bi * per_seq + (hi + 1) * n_k * d;
                    assert!(
                        rows[start..end].iter().all(|&x| x == 0.0),
                        "{who}: {name} of padded keys is not zero"
                    );
                }
            }
        }
        let ours = [&o, &g[0], &g[1], &g[2]];
        let wants = [&want_o, &want_g[0], &want_g[1], &want_g[2]];
        let keys = KeyPadding::new(&lengths, n_k, &dev)?;
        let naive = |q: &Tensor, k: &Tensor, v: &Tensor| naive_padded(q, k, v, &keys, causal);
        let (naive_o, naive_g) = grads_of(naive, [&q, &k, &v], &d_o)?;
        let naives = [&naive_o, &naive_g[0], &naive_g[1], &naive_g[2]];
        for (i, name) in ["O", "dQ", "dK", "dV"].iter().enumerate() {
            let (a, want) = (to_vec(ours[i])?, to_vec(wants[i])?);
            match (dtype, on_gpu) {
                (DType::F64, _) => {
                    let e = max_rel(&a, &want);
                    assert!(e <= 1e-10, "{who}: f64 {name} error {e:e}");
                }
                (DType::F32, false) => {
                    let e = max_rel(&a, &want);
                    assert!(e <= 1e-5, "{who}: f32 {name} error {e:e}");
                }
                (DType::F32, true) => {
                    let e = rel_norm_floor(&a, &want, 1.0);
                    assert!(e <= 1e-4, "{who}: f32 {name} error {e:e}");
                }
                _ => {
                    let e_ours = max_abs(&a, &want);
                    let e_naive = max_abs(&to_vec(naives[i])?, &want);
                    let atol = rounding_atol(&want, dtype)?;
                    assert!(
                        e_ours <= 2.0 * e_naive + atol,
                        "{who}: {name} ours {e_ours:e}, naive {e_naive:e}, atol {atol:e}"
                    );
                }
            }
        }
        families.insert(format!("{:?}", c.family(&dev)));
    }
    assert!(
        padded > cases / 2,
        "only {padded}/{cases} cases had padding"
    );
    if on_gpu {
        for f in gpu_families(&dev) {
            assert!(
                families.contains(f),
                "family {f} never padded: {families:?}"
            );
        }
    }
    println!("{cases} padded cases, {padded} with padding; families {families:?}");
    Ok(())
}

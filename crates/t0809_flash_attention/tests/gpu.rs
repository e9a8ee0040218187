//! CUDA tests: our kernels (forward and backward) against the naive path and a float64 CPU
//! reference. Each test returns early, with a printed note, when this build has no CUDA or no
//! GPU answers (on the GPU host `MODULE08_EXPECT_GPU=1` turns that into a failure).
//!
//! Tolerances: f32 ≤ 1e-4 relative (‖·‖ norm); f16/bf16 judged as FlashAttention's own tests
//! do: max |ours − ref| ≤ 2·max |naive in the same dtype − ref| + 2·(rounding of ref in the dtype).

mod common;
use candle_core::{DType, Device, Result, Tensor};
use common::*;
use t0809_flash_attention::*;

/// `(b, h, n_q, n_k, d, causal)`: tile edges (64 × 64 tensor-core and register-tiled tiles,
/// 32 × 32 simple tiles), n_q ≠ n_k, single query, exact multiples. Under compute-sanitizer
/// (`MODULE08_SANITIZER=1`, set by `scripts/sanitize.sh`, where every kernel runs a hundred times
/// slower and racecheck more still) two of them: 77 queries × 333 keys with the causal mask, which
/// reaches every kernel family with partial tiles on both axes and n_q ≠ n_k, and a single query
/// over 190 keys (the property tests, also run under the sanitizer, draw more queries than keys).
fn shapes(d: usize) -> Vec<(usize, usize, usize, usize, usize, bool)> {
    let all = vec![
        (2, 3, 200, 200, d, false),
        (2, 3, 200, 200, d, true),
        (1, 2, 77, 333, d, false),
        (1, 2, 77, 333, d, true),
        (1, 2, 256, 256, d, true),
        (1, 1, 1, 1, d, false),
        (1, 3, 1, 190, d, true),
        (2, 1, 130, 65, d, false),
    ];
    if std::env::var_os("MODULE08_SANITIZER").is_some() {
        return vec![all[3], all[6]];
    }
    all
}

/// FlashAttention with the simple fp32-FMA kernels forced ([`FlashKernels::Simple`]).
fn flash_simple(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    flash_attention_with(q, k, v, scale, causal, FlashKernels::Simple)
}

/// FlashAttention with the `mma.sync` tensor-core kernels forced ([`FlashKernels::MmaSync`]):
/// on a Hopper card the automatic choice is the warpgroup-MMA forward instead.
fn flash_mma_sync(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    flash_attention_with(q, k, v, scale, causal, FlashKernels::MmaSync)
}

/// Every kernel choice with the function that runs it.
fn kernel_choices() -> [(FlashKernels, Attn); 3] {
    [
        (FlashKernels::Auto, flash_attention as Attn),
        (FlashKernels::MmaSync, flash_mma_sync as Attn),
        (FlashKernels::Simple, flash_simple as Attn),
    ]
}

#[test]
fn gpu_f32_forward_and_backward_match_float64() -> Result<()> {
    let Some(dev) = gpu("gpu_f32_forward_and_backward_match_float64") else {
        return Ok(());
    };
    let mut rng = Rng::new(100);
    for (kernels, flash) in kernel_choices() {
        let forced_simple = kernels == FlashKernels::Simple;
        for d in [32, 64, 128, 40, 5] {
            // Both f32 families are covered: register-tiled for 32 and 64, simple for 128, 40
            // and 5. With d = 5, b·h·n_q·d is not a multiple of 4 (77 queries: 770 elements), so
            // dQ's conversion (`flash_bwd_dq_*`) runs its element-by-element remainder too.
            let want = if matches!(d, 32 | 64) && !forced_simple {
                CudaKernelFamily::Fp32Tiled
            } else {
                CudaKernelFamily::Fp32Fma
            };
            assert_eq!(
                cuda_kernel_family(DType::F32, d, &[0, 0, 0], kernels, hopper_kernels_on(&dev)),
                want,
                "f32 d {d}"
            );
            for (b, h, n_q, n_k, d, causal) in shapes(d) {
                let (q, k, v) = qkv(&mut rng, b, h, n_q, n_k, d, d)?;
                let d_o = rng.tensor(&[b, h, n_q, d], 1.0)?;
                let scale = default_softmax_scale(d);
                let (want_o, want_g) = grads(naive_attention, &q, &k, &v, &d_o, scale, causal)?; // f64, CPU
                let (_, want_l) = reference(&q, &k, &v, scale, causal)?;
                let g32 = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(&dev);
                let (o, g) = grads(
                    flash,
                    &g32(&q)?,
                    &g32(&k)?,
                    &g32(&v)?,
                    &g32(&d_o)?,
                    scale,
                    causal,
                )?;
                let (_, l) =
                    flash_attention_with_lse(&g32(&q)?, &g32(&k)?, &g32(&v)?, scale, causal)?;
                let shape = format!("{:?}", (b, h, n_q, n_k, d, causal));
                assert!(o.device().is_cuda() && g[0].device().is_cuda());
                let e = rel_norm(&to_vec(&o)?, &to_vec(&want_o)?);
                assert!(e <= 1e-4, "{shape}: f32 output error {e:e}");
                let e = max_abs(&to_vec(&l)?, &want_l);
                assert!(
                    e <= 1e-4 * (1.0 + want_l.iter().fold(0.0f64, |a, x| a.max(x.abs()))),
                    "{shape}: f32 lse error {e:e}"
                );
                for (i, name) in ["dQ", "dK", "dV"].iter().enumerate() {
                    // dQ is exactly 0 with a single key: there the error is an RMS against the
                    // gradients' natural scale (1 for unit-normal inputs).
                    let e = rel_norm_floor(&to_vec(&g[i])?, &to_vec(&want_g[i])?, 1.0);
                    assert!(e <= 1e-4, "{shape}: f32 {name} error {e:e}");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn gpu_low_precision_within_twice_the_naive_error() -> Result<()> {
    let Some(dev) = gpu("gpu_low_precision_within_twice_the_naive_error") else {
        return Ok(());
    };
    let mut rng = Rng::new(101);
    let hopper = hopper_kernels_on(&dev);
    for (kernels, flash) in kernel_choices() {
        let forced_simple = kernels == FlashKernels::Simple;
        for dt in [DType::BF16, DType::F16] {
            for d in [32, 64, 128, 48, 12] {
                // Every family is covered: warpgroup MMA for 64/128 on Hopper, mma.sync tensor
                // cores for 32 (and 64/128 elsewhere or when forced), fp32 FMA for 48 and 12.
                // d = 12 (not a multiple of 8) takes `D = rowsum(dO∘O)` element by element.
                let want = if matches!(d, 48 | 12) || forced_simple {
                    CudaKernelFamily::Fp32Fma
                } else if hopper && kernels == FlashKernels::Auto && d != 32 {
                    CudaKernelFamily::WarpgroupMma
                } else {
                    CudaKernelFamily::TensorCores
                };
                assert_eq!(
                    cuda_kernel_family(dt, d, &[0, 0, 0], kernels, hopper),
                    want,
                    "{dt:?} d {d}"
                );
                for (b, h, n_q, n_k, d, causal) in shapes(d) {
                    let (q, k, v) = qkv(&mut rng, b, h, n_q, n_k, d, d)?;
                    let d_o = rng.tensor(&[b, h, n_q, d], 1.0)?;
                    let scale = default_softmax_scale(d);
                    // Inputs rounded to the dtype; the reference computes on exactly those, in f64.
                    let low = |t: &Tensor| t.to_dtype(dt)?.to_device(&dev);
                    let (ql, kl, vl, dol) = (low(&q)?, low(&k)?, low(&v)?, low(&d_o)?);
                    let up = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
                    let (want_o, want_g) = grads(
                        naive_attention,
                        &up(&ql)?,
                        &up(&kl)?,
                        &up(&vl)?,
                        &up(&dol)?,
                        scale,
                        causal,
                    )?;
                    let (naive_o, naive_g) =
                        grads(naive_attention, &ql, &kl, &vl, &dol, scale, causal)?;
                    let (o, g) = grads(flash, &ql, &kl, &vl, &dol, scale, causal)?;
                    let shape = format!("{dt:?} {:?}", (b, h, n_q, n_k, d, causal));
                    assert_eq!(o.dtype(), dt);
                    let pairs = [
                        ("O", &o, &naive_o, &want_o),
                        ("dQ", &g[0], &naive_g[0], &want_g[0]),
                        ("dK", &g[1], &naive_g[1], &want_g[1]),
                        ("dV", &g[2], &naive_g[2], &want_g[2]),
                    ];
                    for (name, ours, naive, want) in pairs {
                        let want = to_vec(want)?;
                        let (e_ours, e_naive) = (
                            max_abs(&to_vec(ours)?, &want),
                            max_abs(&to_vec(naive)?, &want),
                        );
                        let atol = rounding_atol(&want, dt)?;
                        assert!(
                            e_ours <= 2.0 * e_naive + atol,
                            "{shape} {name}: ours {e_ours:e}, naive {e_naive:e}, atol {atol:e}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Keys (and queries) of the Hopper backward test: past both Hopper thresholds, with a partial
/// last tile.
const HOPPER_KEYS: usize = 8192 + 77;
const _: () = assert!(
    HOPPER_KEYS > HOPPER_BACKWARD_MIN_KEYS && HOPPER_KEYS > HOPPER_THREE_CONSUMERS_MIN_QUERIES
);
/// Its padded case keeps the first `HOPPER_KEYS - 300` keys (padding spans the last three tiles).
const HOPPER_KEPT: usize = HOPPER_KEYS - 300;

/// FlashAttention with the kernels chosen for the card, over keys of which the first `HOPPER_KEPT`
/// are real.
fn padded_auto(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    flash_attention_padded(q, k, v, scale, causal, FlashKernels::Auto, &[HOPPER_KEPT])
}

/// [`padded_auto`] with the Hopper kernels at any length and head size.
fn padded_warpgroup(q: &Tensor, k: &Tensor, v: &Tensor, s: f64, causal: bool) -> Result<Tensor> {
    flash_attention_padded(
        q,
        k,
        v,
        s,
        causal,
        FlashKernels::WarpgroupMma,
        &[HOPPER_KEPT],
    )
}

/// FlashAttention with the Hopper kernels at any length and head size.
fn flash_warpgroup(q: &Tensor, k: &Tensor, v: &Tensor, s: f64, causal: bool) -> Result<Tensor> {
    flash_attention_with(q, k, v, s, causal, FlashKernels::WarpgroupMma)
}

/// [`padded_auto`] with the `mma.sync` kernels.
fn padded_mma_sync(q: &Tensor, k: &Tensor, v: &Tensor, s: f64, causal: bool) -> Result<Tensor> {
    flash_attention_padded(q, k, v, s, causal, FlashKernels::MmaSync, &[HOPPER_KEPT])
}

#[test]
fn gpu_hopper_backward_within_twice_the_mma_sync_error() -> Result<()> {
    // The Hopper backward runs from HOPPER_BACKWARD_MIN_KEYS keys on: the shapes above are too
    // short for it. Here d 64 past the threshold, against float64 on the CPU, the mma.sync
    // kernels on the same inputs setting the bar: bf16 causal and not, f16 with 333 queries
    // (n_q ≠ n_k), and bf16 with the last 300 keys padding (whose dK, dV must be zero). The
    // forward's O is checked too: the cases with HOPPER_KEYS queries (past
    // HOPPER_THREE_CONSUMERS_MIN_QUERIES) run its three-consumer instance, causal and not, which
    // the shapes above are too short for. The d 128 Hopper backward the same way: bf16 causal,
    // f16 with 333 queries, and bf16 with the padding.
    let Some(dev) = gpu("gpu_hopper_backward_within_twice_the_mma_sync_error") else {
        return Ok(());
    };
    if !hopper_kernels_on(&dev) {
        println!("gpu_hopper_backward_within_twice_the_mma_sync_error: not a Hopper card, skipped");
        return Ok(());
    }
    let n = HOPPER_KEYS;
    assert!(hopper_backward(64, n));
    assert!(hopper_backward(128, n));
    assert_eq!(hopper_forward_consumers(64, n), 3);
    let mut rng = Rng::new(106);
    let cases = [
        (64, DType::BF16, n, true, false),
        (64, DType::BF16, n, false, false),
        (64, DType::F16, 333, false, false),
        (64, DType::BF16, n, false, true),
        (128, DType::BF16, n, true, false),
        (128, DType::F16, 333, false, false),
        (128, DType::BF16, n, false, true),
    ];
    for (d, dtype, n_q, causal, padded) in cases {
        let case = format!("d {d} {dtype:?} n_q {n_q} causal {causal} padded {padded}");
        let (q, k, v) = qkv(&mut rng, 1, 2, n_q, n, d, d)?;
        let d_o = rng.tensor(&[1, 2, n_q, d], 1.0)?;
        let scale = default_softmax_scale(d);
        let low = |t: &Tensor| t.to_dtype(dtype)?.to_device(&dev);
        let (ql, kl, vl, dol) = (low(&q)?, low(&k)?, low(&v)?, low(&d_o)?);
        let up = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
        let kept = if padded { HOPPER_KEPT } else { n };
        let (want_o, mut want) = grads(
            naive_attention,
            &up(&ql)?,
            &up(&kl)?.narrow(2, 0, kept)?,
            &up(&vl)?.narrow(2, 0, kept)?,
            &up(&dol)?,
            scale,
            causal,
        )?;
        for g in &mut want[1..] {
            let padding = Tensor::zeros((1, 2, n - kept, d), DType::F64, &Device::Cpu)?;
            *g = Tensor::cat(&[&*g, &padding], 2)?; // no gradient reaches a padding key
        }
        let (ours, mma): (Attn, Attn) = match (d, padded) {
            (64, false) => (flash_attention, flash_mma_sync),
            (64, true) => (padded_auto, padded_mma_sync),
            (_, false) => (flash_warpgroup, flash_mma_sync),
            (_, true) => (padded_warpgroup, padded_mma_sync),
        };
        let (o_hopper, [dq_h, dk_h, dv_h]) = grads(ours, &ql, &kl, &vl, &dol, scale, causal)?;
        let (o_mma, [dq_m, dk_m, dv_m]) = grads(mma, &ql, &kl, &vl, &dol, scale, causal)?;
        let [dq, dk, dv] = want;
        let checks = [
            ("O", want_o, o_hopper, o_mma),
            ("dQ", dq, dq_h, dq_m),
            ("dK", dk, dk_h, dk_m),
            ("dV", dv, dv_h, dv_m),
        ];
        for (name, want, hopper, mma) in checks {
            let want = to_vec(&want)?;
            let e_hopper = max_abs(&to_vec(&hopper)?, &want);
            let e_mma = max_abs(&to_vec(&mma)?, &want);
            let atol = rounding_atol(&want, dtype)?;
            assert!(
                e_hopper <= 2.0 * e_mma + atol,
                "{case} {name}: Hopper {e_hopper:e}, mma.sync {e_mma:e}, atol {atol:e}"
            );
        }
    }
    Ok(())
}

#[test]
fn gpu_lse_and_determinism() -> Result<()> {
    let Some(dev) = gpu("gpu_lse_and_determinism") else {
        return Ok(());
    };
    let mut rng = Rng::new(102);
    for (d, causal) in [(64, true), (128, false)] {
        let (q, k, v) = qkv(&mut rng, 2, 4, 300, 300, d, d)?;
        let scale = default_softmax_scale(d);
        let bf = |t: &Tensor| t.to_dtype(DType::BF16)?.to_device(&dev);
        let (qb, kb, vb) = (bf(&q)?, bf(&k)?, bf(&v)?);
        let up = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
        let (_, want_l) = reference(&up(&qb)?, &up(&kb)?, &up(&vb)?, scale, causal)?;
        let (o1, l1) = flash_attention_with_lse(&qb, &kb, &vb, scale, causal)?;
        let (o2, _) = flash_attention_with_lse(&qb, &kb, &vb, scale, causal)?;
        // L is accumulated in f32 from exact bf16 products: close to the reference.
        let e = max_abs(&to_vec(&l1)?, &want_l);
        assert!(e <= 2e-3, "d {d}: bf16 lse error {e:e}");
        // The forward has no atomics: two runs agree bit for bit (a moving result is a race).
        assert_eq!(
            to_vec(&o1)?,
            to_vec(&o2)?,
            "d {d}: forward not deterministic"
        );
        assert!(
            to_vec(&o1)?.iter().all(|x| x.is_finite()),
            "d {d}: non-finite output"
        );
    }
    Ok(())
}

#[test]
fn gpu_misaligned_inputs_take_the_simple_path_and_agree() -> Result<()> {
    let Some(dev) = gpu("gpu_misaligned_inputs_take_the_simple_path_and_agree") else {
        return Ok(());
    };
    let mut rng = Rng::new(103);
    let (b, h, n, d) = (1, 2, 150, 64);
    let n_el = b * h * n * d;
    // Contiguous views that start 3 elements into their buffer: no 16-byte loads possible.
    let mk = |rng: &mut Rng| -> Result<Tensor> {
        rng.tensor(&[n_el + 3], 1.0)?
            .to_dtype(DType::BF16)?
            .to_device(&dev)?
            .narrow(0, 3, n_el)?
            .reshape((b, h, n, d))
    };
    let (q, k, v) = (mk(&mut rng)?, mk(&mut rng)?, mk(&mut rng)?);
    let odd = flash_attention(&q, &k, &v, 0.125, true)?;
    let aligned = flash_attention(&q.copy()?, &k.copy()?, &v.copy()?, 0.125, true)?;
    let e = max_abs(&to_vec(&odd)?, &to_vec(&aligned)?);
    assert!(e <= 2e-2, "misaligned vs aligned: {e:e}");
    Ok(())
}

#[test]
fn gpu_f32_views_at_an_offset_agree_with_contiguous_inputs() -> Result<()> {
    let Some(dev) = gpu("gpu_f32_views_at_an_offset_agree_with_contiguous_inputs") else {
        return Ok(());
    };
    let mut rng = Rng::new(104);
    let (b, h, n, d) = (1, 2, 150, 32);
    let n_el = b * h * n * d;
    let d_o = rng
        .tensor(&[b, h, n, d], 1.0)?
        .to_dtype(DType::F32)?
        .to_device(&dev)?;
    // Offset 4 (16 bytes) keeps the register-tiled kernels; offset 3 sends f32 to the simple ones.
    for (offset, family) in [
        (4, CudaKernelFamily::Fp32Tiled),
        (3, CudaKernelFamily::Fp32Fma),
    ] {
        assert_eq!(
            cuda_kernel_family(DType::F32, d, &[offset], FlashKernels::Auto, false),
            family
        );
        let mk = |rng: &mut Rng| -> Result<Tensor> {
            rng.tensor(&[n_el + offset], 1.0)?
                .to_dtype(DType::F32)?
                .to_device(&dev)?
                .narrow(0, offset, n_el)?
                .reshape((b, h, n, d))
        };
        let (q, k, v) = (mk(&mut rng)?, mk(&mut rng)?, mk(&mut rng)?);
        let (o, g) = grads(flash_attention, &q, &k, &v, &d_o, 0.2, true)?;
        let (q2, k2, v2) = (q.copy()?, k.copy()?, v.copy()?);
        let (o2, g2) = grads(flash_attention, &q2, &k2, &v2, &d_o, 0.2, true)?;
        let e = rel_norm(&to_vec(&o)?, &to_vec(&o2)?);
        assert!(e <= 1e-5, "offset {offset}: output {e:e}");
        for i in 0..3 {
            let e = rel_norm(&to_vec(&g[i])?, &to_vec(&g2[i])?);
            assert!(e <= 1e-5, "offset {offset}: gradient {i} {e:e}");
        }
    }
    Ok(())
}

#[test]
fn gpu_tensor_op_version_runs_on_the_gpu() -> Result<()> {
    let Some(dev) = gpu("gpu_tensor_op_version_runs_on_the_gpu") else {
        return Ok(());
    };
    let mut rng = Rng::new(104);
    let (q, k, v) = qkv(&mut rng, 1, 2, 100, 150, 64, 64)?;
    let (want, _) = reference(&q, &k, &v, 0.125, true)?;
    let g = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(&dev);
    let (o, _) = flash_attention_tensor_ops(&g(&q)?, &g(&k)?, &g(&v)?, true, 0.125, 64, 64)?;
    assert!(rel_norm(&to_vec(&o)?, &want) <= 1e-4);
    Ok(())
}

#[test]
fn gpu_errors_name_device_and_head_size() -> Result<()> {
    let Some(dev) = gpu("gpu_errors_name_device_and_head_size") else {
        return Ok(());
    };
    let first =
        |e: candle_core::Error| e.to_string().lines().next().unwrap_or_default().to_string();
    let cpu = Tensor::zeros((1, 1, 4, 64), DType::F32, &Device::Cpu)?;
    let gpu_t = cpu.to_device(&dev)?;
    let e = first(flash_attention(&cpu, &gpu_t, &gpu_t, 1.0, false).unwrap_err());
    assert!(e.contains("different devices"), "{e}");
    let wide = Tensor::zeros((1, 1, 4, 160), DType::BF16, &dev)?;
    let e = first(flash_attention(&wide, &wide, &wide, 1.0, false).unwrap_err());
    assert!(e.contains("d_head = d_v ≤ 128") && e.contains("160"), "{e}");
    let f64t = Tensor::zeros((1, 1, 4, 64), DType::F64, &dev)?;
    let e = first(flash_attention(&f64t, &f64t, &f64t, 1.0, false).unwrap_err());
    assert!(e.contains("f64 is CPU-only"), "{e}");
    Ok(())
}

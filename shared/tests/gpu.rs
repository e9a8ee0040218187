//! Checks that only mean something on a GPU build (`--features cuda` on the GPU host): the
//! device is picked, and a bf16 matmul on the GPU agrees with the CPU in f32 within bf16's
//! precision. On a CPU-only build they check the CPU path instead.

use candle_core::{DType, Device, Tensor};
use shared::device::{pick_device, DeviceChoice};

#[test]
fn auto_device_is_cuda_on_a_cuda_build_with_a_gpu() {
    let picked = pick_device(DeviceChoice::Auto).unwrap();
    println!("picked {}", picked.description);
    if cfg!(feature = "cuda") && std::env::var_os("MODULE08_EXPECT_GPU").is_some() {
        assert!(
            picked.device.is_cuda(),
            "expected a GPU, got {}",
            picked.description
        );
    }
    if !cfg!(feature = "cuda") {
        // A CPU-only build must never pick (or claim) a GPU.
        assert!(
            picked.device.is_cpu() && picked.description.starts_with("cpu"),
            "{}",
            picked.description
        );
    }
}

#[test]
fn bf16_matmul_on_the_device_matches_cpu_f32() -> candle_core::Result<()> {
    let picked = pick_device(DeviceChoice::Auto).unwrap();
    let dev = &picked.device;
    let (m, k, n) = (192, 256, 128);
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let b: Vec<f32> = (0..k * n)
        .map(|i| ((i * 104_729 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let a_cpu = Tensor::from_vec(a, (m, k), &Device::Cpu)?;
    let b_cpu = Tensor::from_vec(b, (k, n), &Device::Cpu)?;
    let want = a_cpu
        .to_dtype(DType::F64)?
        .matmul(&b_cpu.to_dtype(DType::F64)?)?;
    let dtype = if dev.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    let got = a_cpu
        .to_device(dev)?
        .to_dtype(dtype)?
        .matmul(&b_cpu.to_device(dev)?.to_dtype(dtype)?)?;
    let got = got.to_dtype(DType::F64)?.to_device(&Device::Cpu)?;
    let rel = ((&got - &want)?.sqr()?.sum_all()?.sqrt()? / want.sqr()?.sum_all()?.sqrt()?)?
        .to_scalar::<f64>()?;
    println!(
        "{} {dtype:?} matmul relative error vs f64: {rel:.2e}",
        picked.description
    );
    let tol = if dtype == DType::BF16 { 1e-2 } else { 1e-6 };
    assert!(rel < tol, "relative error {rel}");
    assert!(rel > 0.0 || dtype == DType::F32);
    Ok(())
}

/// The tests that read the device's memory counters (one pool per process) take turns. Run the
/// GPU tests with `--test-threads=1` (as scripts/gpu-run.sh does) so that no other test allocates
/// meanwhile either.
static MEMORY_COUNTERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn memory_counters() -> std::sync::MutexGuard<'static, ()> {
    MEMORY_COUNTERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn device_memory_counters_see_a_256_mib_allocation() -> anyhow::Result<()> {
    let _turn = memory_counters();
    let picked = pick_device(DeviceChoice::Auto)?;
    let dev = &picked.device;
    use shared::device::{device_memory_in_use, device_memory_peak, reset_device_memory_peak};
    let Some(before) = device_memory_in_use(dev)? else {
        assert!(
            dev.is_cpu(),
            "only the CPU may lack a device allocator reading"
        );
        return Ok(());
    };
    reset_device_memory_peak(dev)?;
    let bytes = 256u64 << 20;
    let t = Tensor::ones((bytes / 4) as usize, DType::F32, dev)?;
    let held = device_memory_in_use(dev)?.unwrap();
    // The pool counts whole allocations (rounded up to its granularity), never less.
    let grew = held.saturating_sub(before);
    assert!(
        grew >= bytes && grew <= bytes + (4 << 20),
        "allocated {bytes} B, the pool's in-use counter grew by {grew} B"
    );
    drop(t);
    let after = device_memory_in_use(dev)?.unwrap();
    assert_eq!(
        after, before,
        "freeing must return the pool to where it was"
    );
    let peak = device_memory_peak(dev)?.unwrap();
    assert!(peak >= held, "peak {peak} below the use {held} it saw");
    Ok(())
}

/// Freed memory stays in the pool when kept (what `open_cuda` sets), and goes back to the driver
/// at the next synchronisation when not (the driver's default).
#[test]
fn freed_memory_stays_in_the_pool_when_kept() -> anyhow::Result<()> {
    let _turn = memory_counters();
    let dev = shared::device::test_device();
    use shared::device::{device_memory_reserved, keep_freed_memory};
    let Some(start) = device_memory_reserved(&dev)? else {
        assert!(dev.is_cpu(), "only the CPU may lack a pool reading");
        keep_freed_memory(&dev, false)?; // a no-op there
        return Ok(());
    };
    let bytes = 256u64 << 20;
    let allocate_and_free = || -> anyhow::Result<()> {
        drop(Tensor::ones((bytes / 4) as usize, DType::F32, &dev)?);
        dev.synchronize()?;
        Ok(())
    };
    allocate_and_free()?;
    let kept = device_memory_reserved(&dev)?.unwrap();
    assert!(
        kept >= bytes,
        "kept: the pool holds {kept} B after a {bytes} B tensor was freed (before: {start} B)"
    );
    keep_freed_memory(&dev, false)?;
    allocate_and_free()?;
    let released = device_memory_reserved(&dev)?.unwrap();
    keep_freed_memory(&dev, true)?;
    assert!(
        released < bytes,
        "released: the pool still holds {released} B after a synchronisation"
    );
    Ok(())
}

#[test]
fn integration_tests_run_on_the_gpu_on_the_gpu_host() {
    // gpu-run.sh sets both variables on the GPU host: then every topic's tests must really run
    // on the GPU, not silently on the CPU.
    let dev = shared::device::test_device();
    if std::env::var("MODULE08_TEST_DEVICE").as_deref() == Ok("cuda") {
        assert!(dev.is_cuda(), "MODULE08_TEST_DEVICE=cuda gave {dev:?}");
    } else {
        assert!(dev.is_cpu());
    }
}

#[test]
fn embedding_gather_and_scatter_add_match_the_cpu() -> candle_core::Result<()> {
    // On the GPU this runs kernels/embedding.cu; on a CPU build it compares the CPU op to itself
    // through index_select. A skewed id distribution (id 5 on every fourth token) makes many
    // atomics hit one row, as frequent tokens do.
    let dev = shared::device::test_device();
    let (vocab, d, n) = (50, 96, 1000);
    let ids: Vec<u32> = (0..n)
        .map(|i| {
            if i % 4 == 0 {
                5
            } else {
                (i * 7 % vocab) as u32
            }
        })
        .collect();
    let table_cpu = Tensor::randn(0f32, 1.0, (vocab, d), &Device::Cpu)?;
    let dout_cpu = Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu)?;
    let ids_cpu = Tensor::new(ids.as_slice(), &Device::Cpu)?;
    let want_out = table_cpu.index_select(&ids_cpu, 0)?;
    // bf16: the one rounding of each fp32 sum costs up to 2⁻⁹ relative.
    for (dtype, tol) in [
        (DType::F32, 1e-5f64),
        (DType::BF16, 4e-3),
        (DType::F64, 1e-12),
    ] {
        let table = candle_core::Var::from_tensor(&table_cpu.to_dtype(dtype)?.to_device(&dev)?)?;
        let out = shared::embedding(table.as_tensor(), &ids_cpu.to_device(&dev)?)?;
        let dout = dout_cpu.to_dtype(dtype)?.to_device(&dev)?;
        // The reference sums the same (rounded) gradient rows in f64.
        let want_grad = Tensor::zeros((vocab, d), DType::F64, &Device::Cpu)?.index_add(
            &ids_cpu,
            &dout_cpu.to_dtype(dtype)?.to_dtype(DType::F64)?,
            0,
        )?;
        let grads = (&out * &dout)?.sum_all()?.backward()?;
        let grad = grads.get(table.as_tensor()).unwrap();
        let out_diff = (out.to_dtype(DType::F32)?.to_device(&Device::Cpu)?
            - &want_out.to_dtype(dtype)?.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(out_diff, 0.0, "{dtype:?}: gathered rows differ");
        // Relative error |a − b| / (1 + |b|): the summed rows reach |50|.
        let grad_diff = (grad.to_dtype(DType::F64)?.to_device(&Device::Cpu)? - &want_grad)?
            .abs()?
            .div(&(want_grad.abs()? + 1.0)?)?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(
            grad_diff < tol,
            "{dtype:?}: gradient differs by {grad_diff}"
        );
    }
    Ok(())
}

#[test]
fn fused_cross_entropy_matches_the_composed_reference() -> anyhow::Result<()> {
    // On the GPU this runs kernels/cross_entropy.cu; the reference is the composed loss in f64 on
    // the CPU. Rows of 3000 logits (not a multiple of the block) with a wide spread.
    let dev = shared::device::test_device();
    let (rows, vocab) = (37, 3000);
    let z_cpu = (Tensor::randn(0f32, 4.0, (rows, vocab), &Device::Cpu)?).to_dtype(DType::F64)?;
    let t: Vec<u32> = (0..rows).map(|i| (i * 811 % vocab) as u32).collect();
    let t_cpu = Tensor::new(t.as_slice(), &Device::Cpu)?;
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-5)] {
        // The reference sees the same rounded logits.
        let z_ref = candle_core::Var::from_tensor(&z_cpu.to_dtype(dtype)?.to_dtype(DType::F64)?)?;
        let want = shared::train::cross_entropy_composed(z_ref.as_tensor(), &t_cpu, None)?;
        let want_grad = want.backward()?.get(z_ref.as_tensor()).unwrap().clone();
        let z = candle_core::Var::from_tensor(&z_cpu.to_dtype(dtype)?.to_device(&dev)?)?;
        let got = shared::train::cross_entropy(z.as_tensor(), &t_cpu.to_device(&dev)?, None)?;
        let got_grad = got
            .backward()?
            .get(z.as_tensor())
            .unwrap()
            .to_dtype(DType::F64)?;
        let (a, b) = (
            got.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            want.to_scalar::<f64>()?,
        );
        assert!((a - b).abs() < tol * b.abs(), "{dtype:?}: loss {a} vs {b}");
        // The gradient is stored in the logits' dtype: bf16 keeps 2⁻⁹ of each (|g| < 1/rows).
        let gtol = if dtype == DType::BF16 {
            4e-3 / rows as f64
        } else {
            1e-6
        };
        let diff = (got_grad.to_device(&Device::Cpu)? - want_grad)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(diff < gtol, "{dtype:?}: gradient differs by {diff}");
    }
    Ok(())
}

#[test]
fn sum_of_squares_matches_f64() -> anyhow::Result<()> {
    // The gradient norm's per-tensor pass (kernels/adamw.cu on the GPU): sizes below, at and far
    // above one block's share, in f32 and bf16, against an f64 sum of the same (rounded) values.
    let dev = shared::device::test_device();
    for n in [1usize, 255, 1000, 1_000_003] {
        let x = Tensor::randn(0f32, 1.0, n, &Device::Cpu)?;
        for dtype in [DType::F32, DType::BF16] {
            let xr = x.to_dtype(dtype)?;
            let want: f64 = xr
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
            let got = shared::adamw::sum_of_squares(&xr.to_device(&dev)?)?
                .to_device(&Device::Cpu)?
                .to_vec1::<f32>()?[0] as f64;
            let rel = (got - want).abs() / want;
            assert!(
                rel < 1e-5,
                "{dtype:?}, n = {n}: {got} vs {want} (relative {rel:.1e})"
            );
        }
    }
    Ok(())
}

/// A tensor of `n` pseudo-random values in `[lo, lo + 1)`, as `dtype` on `dev`, in a buffer of
/// its own.
fn filled(
    n: usize,
    seed: usize,
    lo: f32,
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = (0..n)
        .map(|i| lo + ((i * 7919 + seed * 104_729) % 1000) as f32 / 1000.0)
        .collect();
    Tensor::from_vec(v, n, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)?
        .copy()
}

/// AdamW's scalars at update `t` (lr 10⁻², β = (0.9, 0.95), ε = 10⁻⁸).
fn adamw_step(t: i32) -> shared::adamw::StepScalars {
    shared::adamw::StepScalars {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        bias_correction1: 1.0 - 0.9f64.powi(t),
        bias_correction2: 1.0 - 0.95f64.powi(t),
    }
}

/// The multi-tensor AdamW (one kernel over every tensor on the GPU) stores what the three
/// per-tensor kernels store, over tensors of mixed sizes (empty, one element, above a block's
/// share), two dtypes (two launches), per-tensor decays and a clipping scale, for two steps; and
/// the multi-tensor `Σ g²` equals an f64 sum of the same values.
#[test]
fn multi_tensor_adamw_equals_the_per_tensor_kernels() -> anyhow::Result<()> {
    use shared::adamw::{update_all, update_one, Slot};
    let dev = shared::device::test_device();
    let sizes = [1000usize, 0, 1, 70_001, 255, 4096];
    let dtype_of = |i: usize| {
        if i.is_multiple_of(2) {
            DType::F32
        } else {
            DType::BF16
        }
    };
    // (θ, g, m, v) twice: for the multi-tensor kernel and for the per-tensor ones.
    let make = || -> candle_core::Result<Vec<[Tensor; 4]>> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let dt = dtype_of(i);
                Ok([
                    filled(n, i, -0.5, dt, &dev)?,
                    filled(n, i + 10, -0.5, dt, &dev)?,
                    filled(n, i + 20, -0.5, dt, &dev)?.affine(0.1, 0.0)?,
                    filled(n, i + 30, 0.0, dt, &dev)?.affine(0.01, 0.0)?,
                ])
            })
            .collect()
    };
    let (multi, single) = (make()?, make()?);
    let gate = shared::adamw::host_gate(0.5, &dev)?; // gradients scaled by 0.5 (clipping)
    fn slots(set: &[[Tensor; 4]]) -> Vec<Slot<'_>> {
        set.iter()
            .enumerate()
            .map(|(i, [theta, grad, m, v])| Slot {
                theta,
                grad,
                m,
                v,
                weight_decay: if i.is_multiple_of(3) { 0.0 } else { 0.1 },
                copy: None,
            })
            .collect()
    }
    for t in 1..=2 {
        let step = adamw_step(t);
        update_all(&slots(&multi), &step, &gate)?;
        for s in slots(&single) {
            update_one(&s, &step, &gate)?;
        }
    }
    for (i, (a, b)) in multi.iter().zip(&single).enumerate() {
        if sizes[i] == 0 {
            continue; // nothing to compare (and Candle's CUDA casts refuse empty tensors)
        }
        for (what, x, y) in [
            ("θ", &a[0], &b[0]),
            ("m", &a[2], &b[2]),
            ("v", &a[3], &b[3]),
        ] {
            let x: Vec<f32> = x.to_dtype(DType::F32)?.to_vec1()?;
            let y: Vec<f32> = y.to_dtype(DType::F32)?.to_vec1()?;
            // The same arithmetic; the compiler may contract it into FMAs differently in the
            // two kernels, so a few roundings of the stored type apart at most, relative to the
            // magnitude of the operands (θ − lr·step may cancel to a small value).
            let ulp = if dtype_of(i) == DType::F32 {
                1e-6
            } else {
                8e-3
            };
            for (j, (p, q)) in x.iter().zip(&y).enumerate() {
                assert!(
                    (p - q).abs() <= ulp * (q.abs() + 1e-2),
                    "tensor {i} ({:?}, n = {}) {what}[{j}]: multi {p} vs per-tensor {q}",
                    dtype_of(i),
                    sizes[i]
                );
            }
        }
    }
    let grads: Vec<&Tensor> = multi.iter().map(|s| &s[1]).collect();
    let want: f64 = grads
        .iter()
        .filter(|g| g.elem_count() > 0)
        .map(|g| g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>())
        .sum::<candle_core::Result<f64>>()?;
    let got = shared::adamw::sum_of_squares_all(&grads)?
        .expect("a sum for six tensors")
        .to_scalar::<f32>()? as f64;
    assert!((got - want).abs() <= 1e-5 * want, "Σg² {got} vs {want}");
    // The same total bit for bit, every time (a resumed run must clip exactly as the original).
    for _ in 0..20 {
        let again = shared::adamw::sum_of_squares_all(&grads)?
            .expect("a sum")
            .to_scalar::<f32>()? as f64;
        assert_eq!(again, got, "Σg² changed between two identical calls");
    }
    assert!(shared::adamw::sum_of_squares_all(&[])?.is_none());
    Ok(())
}

/// Master weights in the multi-tensor step (on the GPU `adamw_multi_master`: f32 θ, m, v, the
/// gradient and the compute copy in bf16 or f16) store what the per-tensor path stores (the
/// gradient cast to f32, three passes, the copy cast from θ), and the copy is θ rounded.
#[test]
fn multi_tensor_adamw_with_master_weights_equals_the_per_tensor_path() -> anyhow::Result<()> {
    use shared::adamw::{update_all, update_one, Slot};
    let dev = shared::device::test_device();
    let sizes = [1000usize, 3, 70_001];
    let half = |i: usize| if i == 1 { DType::F16 } else { DType::BF16 };
    // (θ, g, m, v, copy)
    let make = || -> candle_core::Result<Vec<[Tensor; 5]>> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let theta = filled(n, i, -0.5, DType::F32, &dev)?;
                Ok([
                    theta.clone(),
                    filled(n, i + 10, -0.5, half(i), &dev)?,
                    filled(n, i + 20, -0.5, DType::F32, &dev)?.affine(0.1, 0.0)?,
                    filled(n, i + 30, 0.0, DType::F32, &dev)?.affine(0.01, 0.0)?,
                    theta.to_dtype(half(i))?.copy()?,
                ])
            })
            .collect()
    };
    let (multi, single) = (make()?, make()?);
    let gate = shared::adamw::host_gate(0.5, &dev)?;
    fn slots(set: &[[Tensor; 5]]) -> Vec<Slot<'_>> {
        set.iter()
            .map(|[theta, grad, m, v, copy]| Slot {
                theta,
                grad,
                m,
                v,
                weight_decay: 0.1,
                copy: Some(copy),
            })
            .collect()
    }
    for t in 1..=2 {
        let step = adamw_step(t);
        update_all(&slots(&multi), &step, &gate)?;
        for s in slots(&single) {
            update_one(&s, &step, &gate)?;
        }
    }
    let f32s = |t: &Tensor| -> candle_core::Result<Vec<f32>> { t.to_dtype(DType::F32)?.to_vec1() };
    for (i, (a, b)) in multi.iter().zip(&single).enumerate() {
        for k in [0usize, 2, 3] {
            for (p, q) in f32s(&a[k])?.iter().zip(&f32s(&b[k])?) {
                assert!(
                    (p - q).abs() <= 1e-6 * (q.abs() + 1e-2),
                    "tensor {i}, part {k}: {p} vs {q}"
                );
            }
        }
        // The copy is θ rounded to the half type.
        assert_eq!(
            f32s(&a[4])?,
            f32s(&a[0].to_dtype(half(i))?)?,
            "tensor {i}: copy"
        );
    }
    // A gradient in the parameter's dtype where a copy is given is refused, before any update.
    let bad = &multi[0];
    let err = update_all(
        &[Slot {
            grad: &bad[0],
            ..slots(&multi)[0]
        }],
        &adamw_step(1),
        &gate,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("gradient"), "{err}");
    Ok(())
}

/// `AdamW::multi_tensor` on and off move a trainer's parameters and moments alike.
#[test]
fn adamw_multi_tensor_switch_keeps_the_trajectory() -> anyhow::Result<()> {
    let dev = shared::device::test_device();
    let mut on = Problem::new(&dev)?;
    let mut off = Problem::new(&dev)?;
    off.trainer.opt.multi_tensor = false;
    for _ in 0..3 {
        on.trainer.step(&on.loss()?)?;
        off.trainer.step(&off.loss()?)?;
    }
    let close = |a: Vec<f32>, b: Vec<f32>, what: &str| {
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-6 * y.abs().max(1e-3),
                "{what}: {x} vs {y}"
            );
        }
    };
    close(on.weights()?, off.weights()?, "weights");
    for ((name, a), (_, b)) in on.moments()?.into_iter().zip(off.moments()?) {
        close(a, b, &name);
    }
    Ok(())
}

/// `shared::add::add` equals Candle's addition on the test device: f32, bf16 and f16, lengths
/// with and without a remainder past the 16-byte packs, and views that start one element into
/// their buffer (contiguous but not 16-byte aligned: the one-element path).
#[test]
fn add_equals_candles_addition() -> anyhow::Result<()> {
    let dev = shared::device::test_device();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for n in [1usize, 7, 8, 4096, 100_003] {
            let a = filled(n + 1, 1, -0.5, dtype, &dev)?;
            let b = filled(n + 1, 2, -0.5, dtype, &dev)?;
            for (x, y) in [
                (a.narrow(0, 0, n)?, b.narrow(0, 0, n)?),
                (a.narrow(0, 1, n)?, b.narrow(0, 1, n)?),
            ] {
                let got: Vec<f32> = shared::add::add(&x, &y)?.to_dtype(DType::F32)?.to_vec1()?;
                let want: Vec<f32> = (&x + &y)?.to_dtype(DType::F32)?.to_vec1()?;
                assert_eq!(got, want, "{dtype:?}, n = {n}");
            }
        }
    }
    Ok(())
}

/// `shared::add::residual_add` is differentiable: for `L = Σ (x + y)·w` the sum is `x + y` and
/// both gradients are `w`, checked against the host's values on the test device, in f32 and bf16
/// (a bf16 sum rounded once), for operands the 16-byte kernel takes (41 × 3 elements: a remainder
/// past the 16-byte packs) and for a transposed `y`, which it leaves to Candle; and with the
/// kernel switched off.
#[test]
fn residual_add_passes_the_gradient_to_both_inputs() -> anyhow::Result<()> {
    use candle_core::Var;
    let dev = shared::device::test_device();
    let host = |t: &Tensor| -> anyhow::Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    };
    let round = |v: f32, dtype: DType| match dtype {
        DType::BF16 => half::bf16::from_f32(v).to_f32(),
        _ => v,
    };
    for fast in [true, false] {
        shared::add::set_fast_residual_add(fast);
        for dtype in [DType::F32, DType::BF16] {
            for transposed in [false, true] {
                let x = Var::from_tensor(&filled(123, 1, -0.5, dtype, &dev)?.reshape((3, 41))?)?;
                let y = filled(123, 2, -0.5, dtype, &dev)?;
                let y = match transposed {
                    false => Var::from_tensor(&y.reshape((3, 41))?)?,
                    true => Var::from_tensor(&y.reshape((41, 3))?)?,
                };
                let y_view = if transposed {
                    y.t()?
                } else {
                    y.as_tensor().clone()
                };
                let w = filled(123, 3, -0.5, dtype, &dev)?.reshape((3, 41))?;
                let sum = shared::add::residual_add(&x, &y_view)?;
                let grads = (&sum * &w)?.sum_all()?.backward()?;
                let case = format!("{dtype:?}, y transposed {transposed}, kernel {fast}");
                let (xs, ys) = (host(&x)?, host(&y_view)?);
                let want: Vec<f32> = xs
                    .iter()
                    .zip(&ys)
                    .map(|(a, b)| round(a + b, dtype))
                    .collect();
                assert_eq!(host(&sum)?, want, "{case}: the sum");
                let gx = grads.get(&x).expect("x has a gradient");
                assert_eq!(host(gx)?, host(&w)?, "{case}: dx");
                let gy = grads.get(&y).expect("y has a gradient");
                let gy = if transposed { gy.t()? } else { gy.clone() };
                assert_eq!(host(&gy)?, host(&w)?, "{case}: dy");
            }
        }
    }
    shared::add::set_fast_residual_add(true);
    Ok(())
}

/// Least squares `L = mean((x·Wᵀ − 1)²)` on the test device, in f32, with gradients large enough
/// for clipping to engage: (parameters, trainer, loss of the current W).
struct Problem {
    w: candle_core::Var,
    x: Tensor,
    trainer: shared::train::Trainer,
}

impl Problem {
    fn new(dev: &Device) -> anyhow::Result<Self> {
        use shared::train::{AdamWConfig, ScheduleConfig, Trainer};
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, dev);
        vb.get_with_hints((8, 16), "w", candle_nn::Init::Const(0.5))?;
        let w = varmap.all_vars().remove(0);
        let x = Tensor::arange(0f32, 64.0, dev)?
            .reshape((4, 16))?
            .affine(0.05, -1.0)?;
        let schedule = ScheduleConfig {
            max_lr: 0.05,
            min_lr: 0.01,
            warmup_steps: 0,
            total_steps: 10,
            clip_norm: Some(1.0),
        };
        let trainer = Trainer::new(&varmap, AdamWConfig::default(), schedule)?;
        Ok(Self { w, x, trainer })
    }

    fn loss(&self) -> candle_core::Result<Tensor> {
        (self.x.matmul(&self.w.as_tensor().t()?)? - 1.0)?
            .sqr()?
            .mean_all()
    }

    fn weights(&self) -> candle_core::Result<Vec<f32>> {
        self.w.as_tensor().flatten_all()?.to_vec1()
    }

    /// The AdamW moments by name.
    fn moments(&self) -> candle_core::Result<Vec<(String, Vec<f32>)>> {
        let mut named: Vec<(String, Vec<f32>)> = self
            .trainer
            .opt
            .state_tensors()
            .into_iter()
            .map(|(name, t)| Ok((name, t.flatten_all()?.to_vec1()?)))
            .collect::<candle_core::Result<_>>()?;
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(named)
    }
}

/// `Trainer::step_deferred` (clipping factor and finite check computed on the device, no host
/// synchronisation) moves the parameters exactly as the host-side recipe does: read the norm,
/// compute the clipping factor on the host, step AdamW with it (`AdamW::step_scaled`).
#[test]
fn deferred_trainer_steps_equal_host_clipping() -> anyhow::Result<()> {
    use shared::train::{clip_factor, grad_norm};
    let dev = shared::device::test_device();
    let mut host = Problem::new(&dev)?;
    let mut deferred = Problem::new(&dev)?;
    let mut pending = Vec::new();
    for _ in 0..4 {
        let lr = host.trainer.lr();
        let grads = host.loss()?.backward()?;
        let norm = grad_norm(&grads, host.trainer.opt.vars())?;
        assert!(norm > 1.0, "the test needs clipping to engage");
        host.trainer
            .opt
            .step_scaled(&grads, lr, clip_factor(norm, 1.0))?;
        host.trainer.step += 1;
        pending.push(deferred.trainer.step_deferred(&deferred.loss()?)?);
    }
    for (i, p) in pending.into_iter().enumerate() {
        assert_eq!(deferred.trainer.finish(p)?.step, i);
    }
    assert_eq!(host.weights()?, deferred.weights()?);
    assert_eq!(host.moments()?, deferred.moments()?);
    Ok(())
}

/// A loss of shape (1,) is a single value too; anything larger is refused before any update.
#[test]
fn trainer_takes_single_value_losses_only() -> anyhow::Result<()> {
    let dev = shared::device::test_device();
    let mut p = Problem::new(&dev)?;
    let stats = p.trainer.step(&p.loss()?.reshape(1)?)?;
    assert_eq!((stats.step, p.trainer.step), (0, 1));
    let before = p.weights()?;
    let two = Tensor::cat(&[p.loss()?.reshape(1)?, p.loss()?.reshape(1)?], 0)?;
    let err = p.trainer.step(&two).unwrap_err().to_string();
    assert!(err.contains("single value"), "{err}");
    assert_eq!((p.weights()?, p.trainer.step), (before, 1));
    Ok(())
}

/// A step whose gradient is not finite is skipped on the device (parameters and AdamW moments
/// unchanged before the host has looked), and `finish` reports it and takes the counters back.
#[test]
fn a_divergent_step_changes_nothing_on_the_device() -> anyhow::Result<()> {
    let dev = shared::device::test_device();
    let mut p = Problem::new(&dev)?;
    p.trainer.step(&p.loss()?)?;
    let before = p.weights()?;
    let moments = p.moments()?;
    // √(w − w) at 0: a finite loss (0) with an infinite gradient.
    let bad = (p.w.as_tensor() - p.w.as_tensor().detach())?
        .sqrt()?
        .sum_all()?;
    let pending = p.trainer.step_deferred(&bad)?;
    assert_eq!(
        p.weights()?,
        before,
        "parameters changed by a divergent step"
    );
    assert_eq!(
        p.moments()?,
        moments,
        "AdamW moments changed by a divergent step"
    );
    let err = p.trainer.finish(pending).unwrap_err();
    let diverged = err
        .downcast_ref::<shared::train::Diverged>()
        .expect("a Diverged error");
    assert_eq!(diverged.step, 1);
    assert!(diverged.grad_norm.is_infinite(), "{diverged:?}");
    assert_eq!((p.trainer.step, p.trainer.opt.t), (1, 1));
    // Training goes on from where it was.
    assert_eq!(p.trainer.step(&p.loss()?)?.step, 1);
    Ok(())
}

/// The device's gate `[s, ok]` equals the host's clipping factor and finite check.
#[test]
fn step_gate_matches_the_host_clip_factor() -> anyhow::Result<()> {
    let dev = shared::device::test_device();
    let gate = |sum_sq: f32, loss: f32, max: Option<f64>| -> anyhow::Result<Vec<f64>> {
        let s = Tensor::new(&[sum_sq], &dev)?;
        let l = Tensor::new(loss, &dev)?;
        Ok(shared::adamw::step_gate(&s, &l, max)?.to_vec1()?)
    };
    let norm = 16f32.sqrt() as f64;
    assert_eq!(
        gate(16.0, 0.5, Some(1.0))?,
        vec![shared::train::clip_factor(norm, 1.0), 1.0]
    );
    assert_eq!(gate(16.0, 0.5, Some(10.0))?, vec![1.0, 1.0]);
    assert_eq!(gate(16.0, 0.5, None)?, vec![1.0, 1.0]);
    assert_eq!(gate(f32::INFINITY, 0.5, Some(1.0))?, vec![1.0, 0.0]);
    assert_eq!(gate(16.0, f32::NAN, Some(1.0))?, vec![1.0, 0.0]);
    Ok(())
}

/// The head swap moves the same bits as Candle's `transpose(1, 2).contiguous()` on the device:
/// every float dtype; rows moved in 16-byte units (f32 widths 32 and 4), 8-byte (f32 width 2),
/// 4-byte (f32 width 1) and 2-byte ones (bf16/f16 width 13, and any input that starts one
/// element into its buffer); the gradient swapped back. The 64-bit-index path (more than ~2³¹
/// units) is not exercised here.
#[test]
fn head_swap_on_the_device_equals_transpose_contiguous() -> candle_core::Result<()> {
    let dev = shared::device::test_device();
    for dt in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        for (a, b, c, r) in [
            (2, 5, 3, 32),
            (3, 4, 7, 4),
            (2, 3, 5, 2),
            (2, 6, 4, 1),
            (1, 9, 2, 13),
        ] {
            let n = a * b * c * r;
            let base = Tensor::randn(0f32, 1.0, n + 1, &dev)?.to_dtype(dt)?;
            // offset 0, and offset one element (a contiguous view the kernel reads in 1-element units)
            for x in [base.narrow(0, 0, n)?, base.narrow(0, 1, n)?] {
                let x = x.reshape((a, b, c, r))?;
                let want = x.transpose(1, 2)?.contiguous()?.to_dtype(DType::F64)?;
                let got = shared::heads::swap_axes_1_2(&x)?;
                assert_eq!(got.dims(), &[a, c, b, r]);
                let diff = (got.to_dtype(DType::F64)? - &want)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f64>()?;
                assert_eq!(diff, 0.0, "{dt:?} {:?}", (a, b, c, r));
            }
        }
    }
    // the gradient: d/dx Σ swap(x) ⊙ w = swap⁻¹(w)
    let x = candle_core::Var::randn(0f32, 1.0, (2, 8, 4, 32), &dev)?;
    let w = Tensor::randn(0f32, 1.0, (2, 4, 8, 32), &dev)?;
    let grads = (shared::heads::swap_axes_1_2(&x)? * &w)?
        .sum_all()?
        .backward()?;
    let diff = (grads.get(&x).expect("dx") - w.transpose(1, 2)?.contiguous()?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert_eq!(diff, 0.0);
    Ok(())
}

/// A least-squares fit `y = x·wᵀ` on the test device: the smallest [`shared::fit::Task`].
struct DeviceRegression {
    w: candle_core::Var,
    x: Tensor,
    y: Tensor,
}

impl shared::fit::Task for DeviceRegression {
    fn train_loss(&mut self, _step: usize) -> anyhow::Result<(Tensor, usize)> {
        let err = (self.x.matmul(&self.w.t()?)? - &self.y)?;
        Ok((err.sqr()?.mean_all()?, self.x.dim(0)?))
    }

    fn valid_loss(&mut self) -> anyhow::Result<f64> {
        let (loss, _) = self.train_loss(0)?;
        Ok(loss.to_scalar::<f32>()? as f64)
    }
}

#[test]
fn fit_records_the_device_memory_peak_at_each_evaluation() -> anyhow::Result<()> {
    use shared::fit::{fit, FitSpec};
    use shared::train::{AdamWConfig, ScheduleConfig, Trainer};
    let _turn = memory_counters();
    let dev = shared::device::test_device();
    // A 64 MiB high-water mark before the run: `fit` must start a new one, and every evaluation
    // interval must report its own, far below it.
    let big = 64usize << 20;
    drop(Tensor::zeros(big / 4, DType::F32, &dev)?);
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    vb.get_with_hints((64, 256), "w", candle_nn::Init::Const(0.0))?;
    let w = varmap.all_vars().remove(0);
    let x = Tensor::randn(0f32, 1.0, (512, 256), &dev)?;
    let y = Tensor::randn(0f32, 1.0, (512, 64), &dev)?;
    let mut task = DeviceRegression { w, x, y };
    let schedule = ScheduleConfig {
        max_lr: 1e-2,
        min_lr: 1e-3,
        warmup_steps: 0,
        total_steps: 20,
        clip_norm: None,
    };
    let mut trainer = Trainer::new(&varmap, AdamWConfig::default(), schedule)?;
    let spec = FitSpec {
        label: "memory".into(),
        eval_every: 5,
        patience: None,
    };
    let curve = fit(&mut trainer, &mut task, &spec, None)?;
    let valid_steps: Vec<usize> = curve.valid.iter().map(|v| v.0).collect();
    assert_eq!(valid_steps, [0, 5, 10, 15, 20]);
    if dev.is_cpu() {
        assert!(curve.memory_peak.is_empty(), "{:?}", curve.memory_peak);
        assert!(curve.memory_peak_first_last().is_none());
        return Ok(());
    }
    let steps: Vec<usize> = curve.memory_peak.iter().map(|m| m.0).collect();
    assert_eq!(steps, valid_steps, "one peak per evaluation");
    for &(step, peak) in &curve.memory_peak {
        assert!(
            (peak as usize) < big,
            "step {step}: peak {peak} B carries the earlier 64 MiB high-water mark (no reset)"
        );
    }
    // Every training interval holds at least the inputs (512 KiB) and the weight's gradient.
    let (first, last) = curve.memory_peak_first_last().unwrap();
    println!("memory peaks {:?}", curve.memory_peak);
    assert!(first >= 512 << 10 && last >= 512 << 10, "{first} {last}");
    assert!(
        last <= first,
        "the same steps came to hold more memory: {first} B, then {last} B"
    );
    Ok(())
}

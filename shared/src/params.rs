//! Raw parameters: every weight of the course is a plain tensor created here.
//!
//! Convention (PyTorch, CS336): a weight mapping `d_in → d_out` is stored with shape
//! `(d_out, d_in)` and applied as `y = x · Wᵀ` by [`linear`]. Parameters are created through a
//! [`VarBuilder`], so the same component code can
//! * create fresh trainable parameters (a `VarMap`-backed builder),
//! * load a checkpoint (a safetensors-backed builder), or
//! * be built from explicit tensors in tests (`from_weights` constructors in each topic crate).
//!
//! The name given to each parameter is its key in the checkpoint: keep names stable.

use candle_core::{bail, Result, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::path::Path;
use std::sync::Mutex;

/// Standard deviation of the CS336 initialisation of a `(d_out, d_in)` weight:
/// `σ² = 2 / (d_in + d_out)` (Glorot), truncated at ±3σ.
pub fn glorot_std(d_out: usize, d_in: usize) -> f64 {
    (2.0 / (d_in + d_out) as f64).sqrt()
}

/// A `(d_out, d_in)` projection weight with the CS336 truncated-normal initialisation.
pub fn weight(vb: &VarBuilder, d_out: usize, d_in: usize, name: &str) -> Result<Tensor> {
    truncated_normal(vb, (d_out, d_in), name, glorot_std(d_out, d_in))
}

/// The host random generator behind every initialisation (Candle's CPU backend cannot be
/// seeded, so parameters are drawn here and copied to the device: the same seed gives the same
/// weights on the CPU and on the GPU).
static INIT_RNG: Mutex<Option<StdRng>> = Mutex::new(None);

/// Guards [`INIT_RNG`] for code that runs concurrently in one process, such as the tests of
/// one test binary, which the harness runs on parallel threads.
static INIT_TURN: Mutex<()> = Mutex::new(());

/// A turn at the initialisation generator: hold it while seeding and building models, so that a
/// seed gives the same weights whatever else runs in the process (another thread building a
/// model meanwhile would draw from the same generator). Tests take it first thing.
pub fn init_turn() -> std::sync::MutexGuard<'static, ()> {
    INIT_TURN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Seeds the initialisation generator (the binaries call this with `--seed`).
pub fn set_seed(seed: u64) {
    *INIT_RNG.lock().expect("init rng poisoned") = Some(StdRng::seed_from_u64(seed));
}

/// `n` draws from `N(0, std²)`, re-drawing any outside `±bound·std` (`bound = ∞`: plain normal).
pub fn sample_normal(n: usize, std: f64, bound: f64) -> Vec<f32> {
    let mut guard = INIT_RNG.lock().expect("init rng poisoned");
    let rng = guard.get_or_insert_with(|| StdRng::seed_from_u64(0));
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        // Box–Muller: two uniforms → two independent standard normals.
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        for z in [
            r * (std::f64::consts::TAU * u2).cos(),
            r * (std::f64::consts::TAU * u2).sin(),
        ] {
            if z.abs() <= bound && out.len() < n {
                out.push((z * std) as f32);
            }
        }
    }
    out
}

/// Creates (or loads) parameter `name` and, when it is a fresh variable, fills it with
/// `values(element_count)` (a loaded parameter, or a variable the `VarMap` already holds, e.g.
/// a compute copy of a master weight, keeps its value).
fn fresh_param(
    vb: &VarBuilder,
    shape: Shape,
    name: &str,
    values: impl FnOnce(usize) -> Vec<f32>,
) -> Result<Tensor> {
    if vb.contains_tensor(name) {
        return vb.get_with_hints(shape, name, Init::Const(0.0));
    }
    let t = vb.get_with_hints(shape.clone(), name, Init::Const(0.0))?;
    if !t.is_variable() {
        return Ok(t); // loaded from a checkpoint: keep the stored value
    }
    // The tensor shares storage with the VarMap's variable: fill it in place.
    let var = Var::from_tensor(&t)?;
    let init =
        Tensor::from_vec(values(shape.elem_count()), shape, t.device())?.to_dtype(t.dtype())?;
    var.set(&init)?;
    Ok(var.as_tensor().clone())
}

/// A parameter drawn from `N(0, std²)` truncated to `[-3·std, 3·std]`.
///
/// Out-of-range draws are *re-sampled* (a true truncated normal, like `torch.nn.init.trunc_normal_`),
/// not clamped. When the builder loads a checkpoint instead of creating variables, the stored
/// value is returned untouched.
pub fn truncated_normal<S: Into<Shape>>(
    vb: &VarBuilder,
    shape: S,
    name: &str,
    std: f64,
) -> Result<Tensor> {
    fresh_param(vb, shape.into(), name, |n| sample_normal(n, std, 3.0))
}

/// A parameter drawn uniformly from `[-bound, bound]`.
pub fn uniform<S: Into<Shape>>(
    vb: &VarBuilder,
    shape: S,
    name: &str,
    bound: f64,
) -> Result<Tensor> {
    fresh_param(vb, shape.into(), name, |n| {
        let mut guard = INIT_RNG.lock().expect("init rng poisoned");
        let rng = guard.get_or_insert_with(|| StdRng::seed_from_u64(0));
        (0..n)
            .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
            .collect()
    })
}

/// A parameter drawn from `N(0, std²)`.
pub fn normal<S: Into<Shape>>(vb: &VarBuilder, shape: S, name: &str, std: f64) -> Result<Tensor> {
    fresh_param(vb, shape.into(), name, |n| {
        sample_normal(n, std, f64::INFINITY)
    })
}

/// A parameter initialised to ones (norm gains).
pub fn ones<S: Into<Shape>>(vb: &VarBuilder, shape: S, name: &str) -> Result<Tensor> {
    vb.get_with_hints(shape, name, Init::Const(1.0))
}

/// A parameter initialised to zeros (biases).
pub fn zeros<S: Into<Shape>>(vb: &VarBuilder, shape: S, name: &str) -> Result<Tensor> {
    vb.get_with_hints(shape, name, Init::Const(0.0))
}

/// `y = x · Wᵀ` for `x` of shape `(…, d_in)` and `W` of shape `(d_out, d_in)`; returns `(…, d_out)`.
///
/// The leading dimensions are flattened into one matrix so that a single GEMM does the work
/// (the transposed weight is a strided view: no copy).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (d_out, d_in) = w.dims2()?;
    let x_dims = x.dims();
    let Some(&last) = x_dims.last() else {
        bail!("linear: input is a scalar, expected (…, {d_in})")
    };
    if last != d_in {
        bail!(
            "linear: input's last dim is {last} but the weight {:?} expects d_in = {d_in}",
            w.dims()
        );
    }
    let rows = x.elem_count() / d_in;
    // The weight in the activation's dtype: a no-op unless a mixed-precision model keeps f32
    // master weights and computes in bf16 (the cast's backward returns an f32 gradient).
    let w = w.to_dtype(x.dtype())?;
    let y = x.reshape((rows, d_in))?.matmul(&w.t()?)?; // (rows, d_out)
    let mut out_dims = x_dims.to_vec();
    *out_dims.last_mut().unwrap() = d_out;
    y.reshape(out_dims)
}

/// `y = x · Wᵀ + b` with `b` of shape `(d_out,)` (added by [`crate::bias::add_bias`], whose
/// gradient for `b` is one GEMV).
pub fn linear_with_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    crate::bias::add_bias(&linear(x, w)?, &b.to_dtype(x.dtype())?)
}

/// Checks that `t` has exactly `expected` dims, naming the tensor in the error.
pub fn expect_shape(t: &Tensor, expected: &[usize], what: &str) -> Result<()> {
    if t.dims() != expected {
        bail!("{what} has shape {:?}, expected {:?}", t.dims(), expected);
    }
    Ok(())
}

/// Checks the rank of `t` and the size of its last dimension.
pub fn expect_last_dim(t: &Tensor, size: usize, what: &str) -> Result<()> {
    match t.dims().last() {
        Some(&s) if s == size => Ok(()),
        _ => bail!(
            "{what} has shape {:?}, expected last dimension {size}",
            t.dims()
        ),
    }
}

/// The number of scalar parameters held by a `VarMap`.
pub fn count_params(varmap: &VarMap) -> usize {
    varmap.all_vars().iter().map(|v| v.elem_count()).sum()
}

/// The variables of a `VarMap` sorted by name (a stable order for optimisers and checkpoints).
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Saves every parameter under its stable name in a safetensors file (written atomically).
pub fn save_params(varmap: &VarMap, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    varmap.save(&tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Loads parameters saved by [`save_params`] into an existing `VarMap` (names and shapes must
/// match; a missing name is an error naming it).
pub fn load_params(varmap: &mut VarMap, path: &Path) -> Result<()> {
    if !path.exists() {
        bail!("checkpoint {} does not exist", path.display());
    }
    let stored = candle_core::safetensors::load(path, &candle_core::Device::Cpu)?;
    set_params(varmap, &stored, path)
}

/// Sets every parameter of `varmap` from `stored` (read from `path`, named in errors).
pub fn set_params(
    varmap: &mut VarMap,
    stored: &std::collections::HashMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    for (name, var) in named_vars(varmap) {
        let Some(t) = stored.get(&name) else {
            bail!(
                "checkpoint {} has no parameter named '{name}'",
                path.display()
            );
        };
        if t.dims() != var.dims() {
            bail!(
                "checkpoint parameter '{name}' has shape {:?}, the model expects {:?}",
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn linear_is_x_times_w_transposed_over_batch_dims() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 4), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let y = linear(&x, &w)?;
        assert_eq!(y.dims(), &[2, 3, 5]);
        let xv = x.to_vec3::<f32>()?;
        let wv = w.to_vec2::<f32>()?;
        let yv = y.to_vec3::<f32>()?;
        for b in 0..2 {
            for t in 0..3 {
                for o in 0..5 {
                    let want: f64 = (0..4).map(|i| xv[b][t][i] as f64 * wv[o][i] as f64).sum();
                    assert!((yv[b][t][o] as f64 - want).abs() < 1e-5);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn linear_rejects_wrong_width() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((5, 4), DType::F32, &dev).unwrap();
        let err = linear(&x, &w).unwrap_err().to_string();
        assert!(err.contains("d_in = 4"), "{err}");
    }

    #[test]
    fn truncated_normal_respects_bound_and_std() -> Result<()> {
        let dev = Device::Cpu;
        set_seed(7);
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let (d_out, d_in) = (256, 512);
        let w = weight(&vb, d_out, d_in, "w")?;
        let std = glorot_std(d_out, d_in);
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        let max = values.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        assert!(max <= 3.0 * std + 1e-6, "max {max} > 3σ {}", 3.0 * std);
        // A normal truncated at ±3σ has std 0.98654·σ.
        let n = values.len() as f64;
        let var = values.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n;
        let ratio = var.sqrt() / std;
        assert!((ratio - 0.98654).abs() < 0.01, "std ratio {ratio}");
        // The VarMap holds the truncated values (the tensor shares the variable's storage).
        let stored = named_vars(&varmap)[0].1.as_tensor().clone();
        let diff = (stored - &w)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        assert_eq!(count_params(&varmap), d_out * d_in);
        Ok(())
    }

    #[test]
    fn save_then_load_restores_parameters() -> Result<()> {
        let dev = Device::Cpu;
        let dir = std::env::temp_dir().join(format!("shared-params-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("p.safetensors");
        let a = VarMap::new();
        let vb = VarBuilder::from_varmap(&a, DType::F32, &dev);
        let w = weight(&vb, 3, 4, "layer.w")?;
        ones(&vb, 3, "layer.g")?;
        save_params(&a, &path)?;
        let mut b = VarMap::new();
        let vb = VarBuilder::from_varmap(&b, DType::F32, &dev);
        weight(&vb, 3, 4, "layer.w")?;
        ones(&vb, 3, "layer.g")?;
        load_params(&mut b, &path)?;
        let loaded = named_vars(&b)[1].1.as_tensor().clone();
        assert_eq!(loaded.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        // Wrong shapes are named.
        let mut c = VarMap::new();
        let vb = VarBuilder::from_varmap(&c, DType::F32, &dev);
        weight(&vb, 4, 4, "layer.w")?;
        let err = load_params(&mut c, &path).unwrap_err().to_string();
        assert!(err.contains("layer.w") && err.contains("[3, 4]"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}

//! The backward pass on the CPU: the custom op's FlashAttention-2 gradients against central
//! finite differences in f64, against Candle's autograd through 8-01's naive attention (f64 and
//! f32), and the tensor-op version's autograd against the same.

mod common;
use candle_core::{DType, Result, Tensor, Var};
use common::*;
use t0809_flash_attention::*;

type Attn = fn(&Tensor, &Tensor, &Tensor, f64, bool) -> Result<Tensor>;

/// `Σ O ∘ W`: a scalar whose gradient with respect to `O` is the random `W`.
fn loss(
    f: Attn,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    w: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    (f(q, k, v, scale, causal)? * w)?.sum_all()
}

/// Gradients of `loss` with respect to q, k, v through Candle's autograd.
fn grads(
    f: Attn,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    w: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<[Tensor; 3]> {
    let (vq, vk, vv) = (
        Var::from_tensor(q)?,
        Var::from_tensor(k)?,
        Var::from_tensor(v)?,
    );
    let g = loss(
        f,
        vq.as_tensor(),
        vk.as_tensor(),
        vv.as_tensor(),
        w,
        scale,
        causal,
    )?
    .backward()?;
    let get = |x: &Var| {
        g.get(x.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("missing gradient".into()))
    };
    Ok([get(&vq)?, get(&vk)?, get(&vv)?])
}

fn tensor_ops(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    Ok(flash_attention_tensor_ops(q, k, v, causal, scale, 3, 4)?.0)
}

#[test]
fn custom_op_gradients_match_finite_differences_in_f64() -> Result<()> {
    let mut rng = Rng::new(10);
    for (b, h, n_q, n_k, d, d_v, causal) in [
        (1, 2, 5, 7, 4, 3, false),
        (1, 1, 6, 9, 3, 5, true),
        (2, 1, 1, 4, 2, 2, true),
        (1, 1, 40, 70, 2, 2, true),
    ] {
        let (q, k, v) = qkv(&mut rng, b, h, n_q, n_k, d, d_v)?;
        let w = rng.tensor(&[b, h, n_q, d_v], 1.0)?;
        let scale = 0.8;
        let analytic = grads(flash_attention, &q, &k, &v, &w, scale, causal)?;
        let eps = 1e-5;
        let inputs = [&q, &k, &v];
        for which in 0..3 {
            let base = to_vec(inputs[which])?;
            let an = to_vec(&analytic[which])?;
            // Every element for the small cases; a sample of 60 for the one past the tiles.
            let picks: Vec<usize> = if base.len() <= 200 {
                (0..base.len()).collect()
            } else {
                (0..60).map(|_| rng.below(base.len())).collect()
            };
            for idx in picks {
                let eval = |delta: f64| -> Result<f64> {
                    let mut x = base.clone();
                    x[idx] += delta;
                    let xt = Tensor::from_vec(x, inputs[which].dims(), inputs[which].device())?;
                    let mut args = [q.clone(), k.clone(), v.clone()];
                    args[which] = xt;
                    loss(
                        flash_attention,
                        &args[0],
                        &args[1],
                        &args[2],
                        &w,
                        scale,
                        causal,
                    )?
                    .to_scalar::<f64>()
                };
                let fd = (eval(eps)? - eval(-eps)?) / (2.0 * eps);
                assert!(
                    (fd - an[idx]).abs() <= 1e-6 * (1.0 + an[idx].abs()),
                    "{:?} input {which} element {idx}: finite difference {fd} vs analytic {}",
                    (b, h, n_q, n_k, d, d_v, causal),
                    an[idx]
                );
            }
        }
    }
    Ok(())
}

#[test]
fn custom_op_gradients_match_autograd_of_the_naive_path() -> Result<()> {
    let mut rng = Rng::new(11);
    for (b, h, n_q, n_k, d, d_v, causal) in [
        (2, 2, 33, 65, 8, 8, false),
        (1, 3, 50, 50, 16, 16, true),
        (1, 1, 1, 1, 4, 4, false),
        (1, 2, 7, 130, 8, 4, true),
        (2, 1, 70, 20, 5, 6, false),
    ] {
        let (q, k, v) = qkv(&mut rng, b, h, n_q, n_k, d, d_v)?;
        let w = rng.tensor(&[b, h, n_q, d_v], 1.0)?;
        let shape = format!("{:?}", (b, h, n_q, n_k, d, d_v, causal));
        // f64: both exact up to rounding.
        let want = grads(naive_attention, &q, &k, &v, &w, 0.5, causal)?;
        let got = grads(flash_attention, &q, &k, &v, &w, 0.5, causal)?;
        for (i, name) in ["dQ", "dK", "dV"].iter().enumerate() {
            assert_eq!(got[i].dims(), want[i].dims());
            let e = max_rel(&to_vec(&got[i])?, &to_vec(&want[i])?);
            assert!(e <= 1e-10, "{shape} f64 {name}: {e:e}");
        }
        // f32 against the f64 gradients.
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let got = grads(
            flash_attention,
            &f(&q)?,
            &f(&k)?,
            &f(&v)?,
            &f(&w)?,
            0.5,
            causal,
        )?;
        for (i, name) in ["dQ", "dK", "dV"].iter().enumerate() {
            assert_eq!(got[i].dtype(), DType::F32);
            let e = max_rel(&to_vec(&got[i])?, &to_vec(&want[i])?);
            assert!(e <= 1e-5, "{shape} f32 {name}: {e:e}");
        }
    }
    Ok(())
}

#[test]
fn tensor_op_version_is_differentiable_too() -> Result<()> {
    let mut rng = Rng::new(12);
    for causal in [false, true] {
        let (q, k, v) = qkv(&mut rng, 1, 2, 9, 11, 4, 4)?;
        let w = rng.tensor(&[1, 2, 9, 4], 1.0)?;
        let want = grads(naive_attention, &q, &k, &v, &w, 0.6, causal)?;
        let got = grads(tensor_ops, &q, &k, &v, &w, 0.6, causal)?;
        for i in 0..3 {
            let e = max_rel(&to_vec(&got[i])?, &to_vec(&want[i])?);
            assert!(e <= 1e-10, "causal {causal} gradient {i}: {e:e}");
        }
    }
    Ok(())
}

#[test]
fn backward_function_matches_the_op_and_low_precision_is_judged_against_naive() -> Result<()> {
    // flash_attention_backward called directly, with bf16 inputs: each gradient's error against
    // the f64 gradients (of the rounded inputs) is at most twice the naive bf16 path's.
    let mut rng = Rng::new(13);
    let (q, k, v) = qkv(&mut rng, 1, 2, 40, 72, 16, 16)?;
    let d_o = rng.tensor(&[1, 2, 40, 16], 1.0)?;
    for causal in [false, true] {
        let bf = |t: &Tensor| t.to_dtype(DType::BF16);
        let (qb, kb, vb, dob) = (bf(&q)?, bf(&k)?, bf(&v)?, bf(&d_o)?);
        let up = |t: &Tensor| t.to_dtype(DType::F64);
        let want = grads(
            naive_attention,
            &up(&qb)?,
            &up(&kb)?,
            &up(&vb)?,
            &up(&dob)?,
            0.25,
            causal,
        )?;
        let naive = grads(naive_attention, &qb, &kb, &vb, &dob, 0.25, causal)?;
        let (o, lse) = flash_attention_with_lse(&qb, &kb, &vb, 0.25, causal)?;
        assert_eq!(lse.dtype(), DType::F32);
        let got = t0809_flash_attention::op::flash_attention_backward(
            &qb, &kb, &vb, &o, &dob, &lse, 0.25, causal,
        )?;
        for (i, g) in [got.0, got.1, got.2].iter().enumerate() {
            assert_eq!(g.dtype(), DType::BF16);
            let w = to_vec(&want[i])?;
            let (e_flash, e_naive) = (max_abs(&to_vec(g)?, &w), max_abs(&to_vec(&naive[i])?, &w));
            assert!(
                e_flash <= 2.0 * e_naive,
                "causal {causal} gradient {i}: flash {e_flash} vs naive bf16 {e_naive}"
            );
        }
    }
    Ok(())
}

#[test]
fn gradients_accumulate_when_the_output_is_used_twice() -> Result<()> {
    // y = O + 2·O: the op's backward runs once per use and Candle sums them: 3× the gradient.
    let mut rng = Rng::new(14);
    let (q, k, v) = qkv(&mut rng, 1, 1, 6, 6, 4, 4)?;
    let vq = Var::from_tensor(&q)?;
    let o = flash_attention(vq.as_tensor(), &k, &v, 0.5, true)?;
    let g1 = o.sum_all()?.backward()?;
    let g3 = ((&o + (&o * 2.0)?)?).sum_all()?.backward()?;
    let (a, b) = (
        to_vec(g1.get(vq.as_tensor()).unwrap())?,
        to_vec(g3.get(vq.as_tensor()).unwrap())?,
    );
    for (x, y) in a.iter().zip(&b) {
        assert!((3.0 * x - y).abs() <= 1e-12 * (1.0 + y.abs()));
    }
    Ok(())
}

//! 8-05's encoder–decoder with the fast parts (8-06's fused LayerNorm, 8-09's FlashAttention over
//! key padding) against the same model with 8-04's composed parts, on one set of parameters and a
//! batch whose sources and targets are padded to different lengths: equal logits at every
//! position and equal gradients of every parameter; cached decoding with the fast parts equals
//! the full decoder at every real target position. Runs on the GPU with `MODULE08_TEST_DEVICE=cuda`.

use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use shared::batching::{seq2seq_batch, Seq2SeqExample};
use shared::kernels::Kernels;
use t0804_transformer_block::NormPlacement;
use t0805_full_transformer::{Transformer, TransformerConfig};
use t0810_kv_cache::{seq2seq_start, seq2seq_step, CacheKind};

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn scale(t: &Tensor) -> f64 {
    let t = t.to_dtype(DType::F64).unwrap();
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1e-3)
}

fn config(placement: NormPlacement) -> TransformerConfig {
    TransformerConfig {
        vocab_size: 50,
        max_len: 16,
        d_model: 32,
        n_heads: 4,
        d_ff: 64,
        n_encoder_layers: 2,
        n_decoder_layers: 2,
        placement,
    }
}

/// Three examples of different source and target lengths: every sequence but the longest is
/// padded, in the source and in the target.
fn examples() -> Vec<Seq2SeqExample> {
    vec![
        Seq2SeqExample {
            src: vec![3, 7, 9, 11, 2, 5, 8],
            tgt: vec![4, 6, 8],
        },
        Seq2SeqExample {
            src: vec![12, 13],
            tgt: vec![14, 15, 16, 17, 18, 19],
        },
        Seq2SeqExample {
            src: vec![20, 21, 22, 23],
            tgt: vec![24],
        },
    ]
}

#[test]
fn fused_layer_norm_and_flash_over_padding_equal_the_composed_model() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    let dev = shared::device::test_device();
    for placement in [NormPlacement::Pre, NormPlacement::Post] {
        let cfg = config(placement);
        shared::params::set_seed(11);
        let varmap = VarMap::new();
        let vb = || VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let composed = Transformer::new(vb(), cfg)?;
        let fast =
            Transformer::with_parts(vb(), cfg, &t0809_flash_attention::parts(Kernels::fused()))?;
        let batch = seq2seq_batch(&examples(), 0, 1, &dev)?;
        let (la, lb) = (composed.forward(&batch)?, fast.forward(&batch)?);
        let e = max_abs(&la, &lb);
        assert!(
            e <= 1e-4 * scale(&la),
            "{placement:?}: logits differ by {e:.2e}"
        );
        let ga = composed.loss(&batch)?.backward()?;
        let gb = fast.loss(&batch)?.backward()?;
        for (name, var) in shared::params::named_vars(&varmap) {
            let (a, b) = (
                ga.get(var.as_tensor()).expect("composed gradient"),
                gb.get(var.as_tensor()).expect("fast gradient"),
            );
            let e = max_abs(a, b);
            assert!(
                e <= 1e-4 * scale(a),
                "{placement:?} {name}: gradients differ by {e:.2e} (scale {:.2e})",
                scale(a)
            );
        }
    }
    Ok(())
}

#[test]
fn cached_decoding_with_the_fast_parts_equals_the_full_decoder() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    let dev = shared::device::test_device();
    shared::params::set_seed(12);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let fast = Transformer::with_parts(
        vb,
        config(NormPlacement::Pre),
        &t0809_flash_attention::parts(Kernels::fused()),
    )?;
    let batch = seq2seq_batch(&examples(), 0, 1, &dev)?;
    let full = fast.forward(&batch)?; // (3, 6, vocab), teacher-forced
    let mut state = seq2seq_start(
        &fast,
        &batch.src,
        &batch.src_mask,
        6,
        CacheKind::Preallocated,
        DType::F32,
    )?;
    for t in 0..6 {
        let step = seq2seq_step(&fast, &batch.tgt_in.narrow(1, t, 1)?, &mut state)?;
        // Only real target positions: the cache holds no target padding, so a padded position
        // sees itself where the teacher-forced pass hides it.
        for (b, &len) in batch.tgt_lengths.iter().enumerate() {
            if t < len {
                let want = full.get(b)?.get(t)?;
                let e = max_abs(&step.get(b)?.get(0)?, &want);
                assert!(
                    e <= 1e-4 * scale(&want),
                    "sequence {b} step {t}: cached vs full {e:.2e}"
                );
            }
        }
    }
    Ok(())
}

//! Masks, causality, learning and resuming of the encoder–decoder (and the LSTM baseline).

use candle_core::{DType, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use shared::batching::{seq2seq_batch, Seq2SeqExample};
use shared::compare::max_abs_diff;
use shared::device::test_device;
use shared::train::{AdamWConfig, ScheduleConfig, Trainer};
use t0804_transformer_block::NormPlacement;
use t0805_full_transformer::lstm::{LstmConfig, LstmSeq2Seq};
use t0805_full_transformer::task::{batch_for_step, continuation_pairs};
use t0805_full_transformer::*;

const PAD: u32 = 0;
const BOS: u32 = 1;

fn small(placement: NormPlacement) -> TransformerConfig {
    TransformerConfig {
        vocab_size: 40,
        max_len: 12,
        d_model: 16,
        n_heads: 2,
        d_ff: 32,
        n_encoder_layers: 2,
        n_decoder_layers: 2,
        placement,
    }
}

fn model(placement: NormPlacement) -> Result<(VarMap, Transformer)> {
    let varmap = VarMap::new();
    let m = Transformer::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &test_device()),
        small(placement),
    )?;
    Ok((varmap, m))
}

#[test]
fn encoder_output_ignores_padding_content() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    let (_, m) = model(NormPlacement::Pre)?;
    let ex = |pad_token: u32| {
        vec![
            Seq2SeqExample {
                src: vec![5, 6, 7, 8, 9],
                tgt: vec![3],
            },
            Seq2SeqExample {
                src: vec![10, 11],
                tgt: vec![3],
            },
        ]
        .into_iter()
        .map(|e| (e, pad_token))
        .collect::<Vec<_>>()
    };
    let a = seq2seq_batch(
        &ex(PAD).into_iter().map(|x| x.0).collect::<Vec<_>>(),
        PAD,
        BOS,
        &test_device(),
    )?;
    let mem_a = m.encode(&a.src, &a.src_mask)?;
    // Same batch with different garbage in the padding slots.
    let src_b = Tensor::new(&[[5u32, 6, 7, 8, 9], [10, 11, 33, 34, 35]], &test_device())?;
    let mem_b = m.encode(&src_b, &a.src_mask)?;
    assert!(max_abs_diff(&mem_a.narrow(1, 0, 2)?, &mem_b.narrow(1, 0, 2)?)? < 1e-6);
    // …and the decoder's logits (cross-attention sees only real positions) are identical.
    let la = m.decode(&a.tgt_in, &a.tgt_mask, &mem_a, &a.src_mask)?;
    let lb = m.decode(&a.tgt_in, &a.tgt_mask, &mem_b, &a.src_mask)?;
    assert!(max_abs_diff(&la, &lb)? < 1e-5);
    // Whereas changing a real source token does change them.
    let src_c = Tensor::new(&[[5u32, 6, 7, 8, 9], [10, 12, 0, 0, 0]], &test_device())?;
    let lc = m.decode(
        &a.tgt_in,
        &a.tgt_mask,
        &m.encode(&src_c, &a.src_mask)?,
        &a.src_mask,
    )?;
    assert!(max_abs_diff(&la, &lc)? > 1e-4);
    Ok(())
}

#[test]
fn decoder_logits_at_t_ignore_later_target_tokens() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    for placement in [NormPlacement::Pre, NormPlacement::Post] {
        let (_, m) = model(placement)?;
        let mk = |tgt: Vec<u32>| {
            seq2seq_batch(
                &[Seq2SeqExample {
                    src: vec![4, 5, 6],
                    tgt,
                }],
                PAD,
                BOS,
                &test_device(),
            )
        };
        let a = m.forward(&mk(vec![7, 8, 9, 10, 11, 12])?)?;
        let b = m.forward(&mk(vec![7, 8, 9, 30, 31, 32])?)?;
        // tgt_in = <s> 7 8 9 … : positions 0..=3 see only <s>,7,8,9.
        assert!(
            max_abs_diff(&a.narrow(1, 0, 4)?, &b.narrow(1, 0, 4)?)? < 1e-6,
            "{placement:?}"
        );
        assert!(max_abs_diff(&a.narrow(1, 4, 2)?, &b.narrow(1, 4, 2)?)? > 1e-4);
    }
    Ok(())
}

#[test]
fn padded_target_positions_get_no_loss() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    let (_, m) = model(NormPlacement::Pre)?;
    let ex = vec![
        Seq2SeqExample {
            src: vec![4, 5],
            tgt: vec![7, 8],
        },
        Seq2SeqExample {
            src: vec![9, 10],
            tgt: vec![11, 12, 13, 14],
        },
    ];
    let both = seq2seq_batch(&ex, PAD, BOS, &test_device())?;
    let loss_both = m.loss(&both)?.to_scalar::<f32>()?;
    // The mean over real tokens: 2 tokens of example 0 and 4 of example 1.
    let l0 = m
        .loss(&seq2seq_batch(&ex[..1], PAD, BOS, &test_device())?)?
        .to_scalar::<f32>()?;
    let l1 = m
        .loss(&seq2seq_batch(&ex[1..], PAD, BOS, &test_device())?)?
        .to_scalar::<f32>()?;
    let want = (2.0 * l0 + 4.0 * l1) / 6.0;
    assert!((loss_both - want).abs() < 1e-5, "{loss_both} vs {want}");
    Ok(())
}

#[test]
fn bad_inputs_give_clear_errors() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    let (_, m) = model(NormPlacement::Pre)?;
    let long = Tensor::zeros((1, 13), DType::U32, &test_device())?;
    let err = m
        .encode(&long, &Tensor::ones((1, 13), DType::U8, &test_device())?)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("longer than the model's maximum length 12"),
        "{err}"
    );
    let empty = [Seq2SeqExample {
        src: vec![],
        tgt: vec![1],
    }];
    assert!(seq2seq_batch(&empty, PAD, BOS, &test_device()).is_err());
    assert!(m.generate(&[], BOS, 3, 0.0, 0).is_err());
    assert!(Preset::by_name("huge")
        .unwrap_err()
        .to_string()
        .contains("unknown preset 'huge'"));
    let mut bad = small(NormPlacement::Pre);
    bad.n_heads = 3;
    assert!(
        Transformer::new(VarBuilder::zeros(DType::F32, &test_device()), bad)
            .err()
            .unwrap()
            .to_string()
            .contains("must divide")
    );
    Ok(())
}

fn train(
    varmap: &VarMap,
    steps: usize,
    lr: f64,
    loss_of: impl Fn(usize) -> anyhow::Result<Tensor>,
) -> anyhow::Result<Vec<f64>> {
    let schedule = ScheduleConfig {
        max_lr: lr,
        min_lr: lr,
        warmup_steps: 0,
        total_steps: steps,
        clip_norm: Some(1.0),
    };
    let mut trainer = Trainer::new(
        varmap,
        AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
        schedule,
    )?;
    (0..steps)
        .map(|s| Ok(trainer.step(&loss_of(s)?)?.loss))
        .collect()
}

#[test]
fn tiny_transformer_overfits_a_tiny_batch() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    shared::params::set_seed(3);
    let (varmap, m) = model(NormPlacement::Pre)?;
    let ex = vec![
        Seq2SeqExample {
            src: vec![5, 6, 7],
            tgt: vec![7, 6, 5, 2],
        },
        Seq2SeqExample {
            src: vec![9, 8, 30, 31],
            tgt: vec![31, 30, 8, 9, 2],
        },
    ];
    let batch = seq2seq_batch(&ex, PAD, BOS, &test_device())?;
    let losses = train(&varmap, 150, 1e-2, |_| Ok(m.loss(&batch)?))?;
    assert!(losses[0] > 3.0, "initial loss {}", losses[0]);
    assert!(
        *losses.last().unwrap() < 0.05,
        "final loss {}",
        losses.last().unwrap()
    );
    // Greedy decoding reproduces the memorised target.
    assert_eq!(m.generate(&[5, 6, 7], BOS, 4, 0.0, 0)?, vec![7, 6, 5, 2]);
    Ok(())
}

/// The generated small corpus as 12 → 8 continuation pairs, batched 8 at a time per step.
struct TinyPairs {
    pairs: Vec<Seq2SeqExample>,
    pad: u32,
    bos: u32,
    vocab: usize,
}

impl TinyPairs {
    fn load() -> anyhow::Result<Self> {
        let data = shared::tokenizer::load_corpus(shared::tokenizer::Corpus::Tiny, None, 300)?;
        Ok(Self {
            pairs: continuation_pairs(&data.train, 12, 8)?,
            pad: data.tokenizer.special(shared::tokenizer::PAD)?,
            bos: data.tokenizer.special(shared::tokenizer::BOS)?,
            vocab: data.tokenizer.vocab_size(),
        })
    }

    fn batch(&self, step: usize) -> anyhow::Result<shared::batching::Seq2SeqBatch> {
        seq2seq_batch(
            &batch_for_step(&self.pairs, 8, step, 1),
            self.pad,
            self.bos,
            &test_device(),
        )
    }
}

#[test]
fn training_on_the_small_corpus_lowers_the_loss_for_both_models() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    let tiny = TinyPairs::load()?;
    let vocab = tiny.vocab;
    let batch = |s: usize| tiny.batch(s);
    shared::params::set_seed(1);
    let varmap = VarMap::new();
    let t = Transformer::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &test_device()),
        TransformerConfig {
            vocab_size: vocab,
            ..small(NormPlacement::Pre)
        },
    )?;
    let losses = train(&varmap, 40, 3e-3, |s| Ok(t.loss(&batch(s)?)?))?;
    let (first, last) = (
        losses[..5].iter().sum::<f64>() / 5.0,
        losses[35..].iter().sum::<f64>() / 5.0,
    );
    assert!(last < first - 1.0, "transformer: {first} → {last}");
    let varmap = VarMap::new();
    let l = LstmSeq2Seq::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &test_device()),
        LstmConfig {
            vocab_size: vocab,
            d_embed: 16,
            hidden: 32,
            n_layers: 1,
        },
    )?;
    let losses = train(&varmap, 40, 1e-2, |s| Ok(l.loss(&batch(s)?)?))?;
    let (first, last) = (
        losses[..5].iter().sum::<f64>() / 5.0,
        losses[35..].iter().sum::<f64>() / 5.0,
    );
    assert!(last < first - 0.5, "lstm: {first} → {last}");
    Ok(())
}

#[test]
fn checkpoint_resume_reproduces_the_next_step_loss() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    let dir = std::env::temp_dir().join(format!("t0805-resume-{}", std::process::id()));
    let ex: Vec<Seq2SeqExample> = (0..16)
        .map(|i| Seq2SeqExample {
            src: vec![2 + i % 7, 3, 4 + i % 5],
            tgt: vec![5 + i % 3, 6, 7],
        })
        .collect();
    let batch = |s: usize| seq2seq_batch(&batch_for_step(&ex, 4, s, 9), PAD, BOS, &test_device());
    let schedule = ScheduleConfig {
        max_lr: 3e-3,
        min_lr: 1e-4,
        warmup_steps: 2,
        total_steps: 10,
        clip_norm: Some(1.0),
    };
    // Run A: 5 steps, checkpoint, 1 more step.
    shared::params::set_seed(11);
    let (varmap, m) = model(NormPlacement::Pre)?;
    let mut trainer = Trainer::new(&varmap, AdamWConfig::default(), schedule.clone())?;
    for s in 0..5 {
        trainer.step(&m.loss(&batch(s)?)?)?;
    }
    trainer.save_checkpoint(
        &varmap,
        &dir,
        &serde_json::to_value(small(NormPlacement::Pre))?,
    )?;
    let next_a = trainer.step(&m.loss(&batch(5)?)?)?;
    // Run B: a fresh model (different init) resumed from the checkpoint.
    shared::params::set_seed(99);
    let (mut varmap_b, m_b) = model(NormPlacement::Pre)?;
    let mut trainer_b = Trainer::new(&varmap_b, AdamWConfig::default(), schedule)?;
    trainer_b.load_checkpoint(&mut varmap_b, &dir)?;
    assert_eq!(trainer_b.step, 5);
    let next_b = trainer_b.step(&m_b.loss(&batch(5)?)?)?;
    assert_eq!(next_a.loss, next_b.loss);
    assert_eq!(next_a.lr, next_b.lr);
    let after_a = m.loss(&batch(6)?)?.to_scalar::<f32>()?;
    let after_b = m_b.loss(&batch(6)?)?.to_scalar::<f32>()?;
    assert_eq!(after_a, after_b, "parameters after the resumed step differ");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Our LSTM layer (raw parameters, input projection hoisted out of the time loop) against
/// candle-nn's `LSTM` given the same weights: same hidden states at every step, same final state,
/// with the composed and the fused cell.
#[test]
fn lstm_layer_equals_candle_nn_lstm() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    use candle_nn::rnn::{LSTMConfig, LSTMState, RNN};
    use shared::kernels::OpImpl;
    use t0805_full_transformer::lstm::LstmLayer;
    use t0805_full_transformer::lstm_cell::LstmState;
    let dev = candle_core::Device::Cpu;
    let (batch, len, d_in, hidden) = (3, 6, 5, 4);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let mut ours = LstmLayer::new(vb, d_in, hidden)?;
    let b_ih = Tensor::randn(0f64, 0.5, 4 * hidden, &dev)?;
    let b_hh = Tensor::randn(0f64, 0.5, 4 * hidden, &dev)?;
    ours.b_ih = b_ih.clone();
    ours.b_hh = b_hh.clone();
    let tensors = std::collections::HashMap::from([
        ("weight_ih_l0".to_string(), ours.w_ih.clone()),
        ("weight_hh_l0".to_string(), ours.w_hh.clone()),
        ("bias_ih_l0".to_string(), b_ih),
        ("bias_hh_l0".to_string(), b_hh),
    ]);
    let reference = candle_nn::lstm(
        d_in,
        hidden,
        LSTMConfig::default(),
        VarBuilder::from_tensors(tensors, DType::F64, &dev),
    )?;
    let x = Tensor::randn(0f64, 1.0, (batch, len, d_in), &dev)?;
    let h0 = Tensor::randn(0f64, 1.0, (batch, hidden), &dev)?;
    let c0 = Tensor::randn(0f64, 1.0, (batch, hidden), &dev)?;
    let states = reference.seq_init(
        &x,
        &LSTMState {
            h: h0.clone(),
            c: c0.clone(),
        },
    )?;
    let expected = reference.states_to_tensor(&states)?;
    let last = states.last().expect("steps");
    for cell in [OpImpl::Composed, OpImpl::Fused] {
        let init = LstmState {
            h: h0.clone(),
            c: c0.clone(),
        };
        let (out, fin) = ours.forward(&x.transpose(0, 1)?.contiguous()?, Some(&init), cell)?;
        let out = out.transpose(0, 1)?; // (batch, len, hidden), as candle-nn's
        assert!(max_abs_diff(&out, &expected)? < 1e-12, "{cell:?}: outputs");
        assert!(max_abs_diff(&fin.h, last.h())? < 1e-12, "{cell:?}: final h");
        assert!(max_abs_diff(&fin.c, last.c())? < 1e-12, "{cell:?}: final c");
        let stepped = ours.step(&x.narrow(1, 0, 1)?.squeeze(1)?, &init, cell)?;
        assert!(
            max_abs_diff(&stepped.h, &states[0].h)? < 1e-12,
            "{cell:?}: one step"
        );
    }
    Ok(())
}

/// Backpropagation through time written out (`Fused`) gives autograd's gradients (`Composed`)
/// for every parameter and for the initial state, in f64.
#[test]
fn lstm_bptt_by_hand_equals_autograd() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    use candle_core::Var;
    use shared::kernels::OpImpl;
    use t0805_full_transformer::lstm::LstmLayer;
    use t0805_full_transformer::lstm_cell::LstmState;
    let dev = candle_core::Device::Cpu;
    let (batch, len, d_in, hidden) = (3, 7, 5, 4);
    let varmap = VarMap::new();
    let layer = LstmLayer::new(
        VarBuilder::from_varmap(&varmap, DType::F64, &dev),
        d_in,
        hidden,
    )?;
    let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (len, batch, d_in), &dev)?)?;
    let h0 = Var::from_tensor(&Tensor::randn(0f64, 1.0, (batch, hidden), &dev)?)?;
    let c0 = Var::from_tensor(&Tensor::randn(0f64, 1.0, (batch, hidden), &dev)?)?;
    // Uneven weights on every output and on the final state, so that all paths carry gradient.
    let w_out = Tensor::randn(0f64, 1.0, (len, batch, hidden), &dev)?;
    let w_c = Tensor::randn(0f64, 1.0, (batch, hidden), &dev)?;
    let mut grads = vec![];
    for cell in [OpImpl::Composed, OpImpl::Fused] {
        let init = LstmState {
            h: h0.as_tensor().clone(),
            c: c0.as_tensor().clone(),
        };
        let (out, last) = layer.forward(x.as_tensor(), Some(&init), cell)?;
        let loss = ((out * &w_out)?.sum_all()? + (last.c * &w_c)?.sum_all()?)?;
        let g = loss.backward()?;
        let mut all = vec![];
        for t in [
            x.as_tensor(),
            h0.as_tensor(),
            c0.as_tensor(),
            &layer.w_ih,
            &layer.w_hh,
            &layer.b_ih,
            &layer.b_hh,
        ] {
            all.push(g.get(t).expect("every input has a gradient").clone());
        }
        grads.push((loss.to_scalar::<f64>()?, all));
    }
    let ((l_auto, g_auto), (l_hand, g_hand)) = (&grads[0], &grads[1]);
    assert!((l_auto - l_hand).abs() < 1e-12, "loss {l_auto} vs {l_hand}");
    for (k, (a, b)) in g_auto.iter().zip(g_hand).enumerate() {
        let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        assert!(d < 1e-12, "gradient {k}: differs by {d}");
    }
    Ok(())
}

/// Mixed precision (bf16 activations over f32 parameters, gradients and AdamW): both contenders
/// compute in bf16 — their logits are bf16 — while the parameters stay f32, and 30 training steps
/// track the same steps in f32 (same initial values, same batches) within 2 %.
#[test]
fn mixed_precision_tracks_f32_for_both_models() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    let tiny = TinyPairs::load()?;
    let vocab = tiny.vocab;
    let batch = |s: usize| tiny.batch(s);
    let transformer = |compute: DType| -> anyhow::Result<(VarMap, Transformer)> {
        shared::params::set_seed(7);
        let varmap = VarMap::new();
        let cfg = TransformerConfig {
            vocab_size: vocab,
            ..small(NormPlacement::Pre)
        };
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &test_device());
        Ok((
            varmap,
            Transformer::new(vb, cfg)?.with_compute_dtype(compute),
        ))
    };
    let lstm = |compute: DType| -> anyhow::Result<(VarMap, LstmSeq2Seq)> {
        shared::params::set_seed(7);
        let varmap = VarMap::new();
        let cfg = LstmConfig {
            vocab_size: vocab,
            d_embed: 16,
            hidden: 32,
            n_layers: 2,
        };
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &test_device());
        Ok((
            varmap,
            LstmSeq2Seq::new(vb, cfg)?.with_compute_dtype(compute),
        ))
    };
    let close = |name: &str, f32_losses: &[f64], mixed: &[f64]| {
        for (s, (a, b)) in f32_losses.iter().zip(mixed).enumerate() {
            assert!(
                (a - b).abs() <= 0.02 * a.abs(),
                "{name}, step {s}: f32 loss {a}, mixed {b}"
            );
        }
        assert!(
            mixed[29] < mixed[0] - 0.3,
            "{name} mixed did not learn: {mixed:?}"
        );
    };

    let (vm, t) = transformer(DType::F32)?;
    let reference = train(&vm, 30, 3e-3, |s| Ok(t.loss(&batch(s)?)?))?;
    let (vm, t) = transformer(DType::BF16)?;
    assert_eq!(t.forward(&batch(0)?)?.dtype(), DType::BF16);
    let mixed = train(&vm, 30, 3e-3, |s| Ok(t.loss(&batch(s)?)?))?;
    assert!(vm.all_vars().iter().all(|v| v.dtype() == DType::F32));
    close("transformer", &reference, &mixed);

    let (vm, l) = lstm(DType::F32)?;
    let reference = train(&vm, 30, 1e-2, |s| Ok(l.loss(&batch(s)?)?))?;
    for cell in [
        shared::kernels::OpImpl::Fused,
        shared::kernels::OpImpl::Composed,
    ] {
        let (vm, l) = lstm(DType::BF16)?;
        let l = l.with_cell(cell);
        assert_eq!(l.forward(&batch(0)?)?.dtype(), DType::BF16);
        let mixed = train(&vm, 30, 1e-2, |s| Ok(l.loss(&batch(s)?)?))?;
        assert!(vm.all_vars().iter().all(|v| v.dtype() == DType::F32));
        close(&format!("lstm ({cell:?} cell)"), &reference, &mixed);
        // Generation runs the one-step path in bf16 too.
        assert_eq!(l.generate(&[5, 6, 7], tiny.bos, 4, 0.0, 0)?.len(), 4);
    }
    let (_, t) = transformer(DType::BF16)?;
    assert_eq!(t.generate(&[5, 6, 7], tiny.bos, 4, 0.0, 0)?.len(), 4);
    Ok(())
}

/// Mixed precision as the main job runs it: each contender built on bf16 copies of f32 master
/// weights (`copies_for`, `Trainer::for_params`) trains as the same contender casting every f32
/// weight where it is used, from the same initial weights on the same batches: the same losses,
/// masters that end where the cast path's parameters end, and copies that are their masters
/// rounded to bf16. To rounding, not bit for bit: where a weight is used twice its gradient is a
/// sum, in bf16 with master weights and in f32 when casting (the Transformer's token embedding,
/// looked up for the source and the target; the LSTM's two biases, added before the cast), so
/// losses agree within 3·10⁻⁴ and weights within 10⁻³ after four steps of lr 3·10⁻³.
#[test]
fn master_weights_train_both_contenders_as_casting_every_weight() -> anyhow::Result<()> {
    let _init = shared::params::init_turn();
    use shared::train::{compute_copies, copies_for};
    use t0805_full_transformer::main_job::model::{Model, NAMES};
    let tiny = TinyPairs::load()?;
    let dev = test_device();
    let p = Preset {
        name: "test",
        vocab: tiny.vocab,
        src_len: 12,
        tgt_len: 8,
        d_model: 16,
        n_heads: 2,
        n_layers: 1,
        lstm_hidden: 24,
        lstm_layers: 1,
        batch: 8,
        steps: 4,
        lr: 3e-3,
    };
    let parts = t0804_transformer_block::parts(shared::kernels::Kernels::composed());
    let build = |name: &str, varmap: &VarMap, dtype: DType| {
        let vb = VarBuilder::from_varmap(varmap, dtype, &dev);
        let how = (
            &parts as &dyn t0804_transformer_block::Parts,
            shared::kernels::OpImpl::Fused,
            DType::BF16,
        );
        Model::new(name, vb, &p, tiny.vocab, how)
    };
    let schedule = ScheduleConfig {
        max_lr: p.lr,
        min_lr: p.lr / 10.0,
        warmup_steps: 1,
        total_steps: p.steps,
        clip_norm: Some(0.5),
    };
    let flat = |v: &candle_core::Var| -> Result<Vec<f32>> {
        v.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1()
    };
    for name in NAMES {
        shared::params::set_seed(5);
        let cast_params = VarMap::new();
        let cast = build(name, &cast_params, DType::F32)?;
        let masters = compute_copies(&cast_params, DType::F32)?;
        let copies = copies_for(&masters, DType::BF16)?.expect("f32 masters get bf16 copies");
        let master = build(name, &copies, DType::BF16)?;
        let mut a = Trainer::new(&cast_params, AdamWConfig::default(), schedule.clone())?;
        let mut b = Trainer::for_params(
            &masters,
            Some(&copies),
            AdamWConfig::default(),
            schedule.clone(),
        )?;
        for step in 0..p.steps {
            let batch = tiny.batch(step)?;
            let la = a.step(&cast.loss(&batch)?)?.loss;
            let lb = b.step(&master.loss(&batch)?)?.loss;
            assert!(
                (la - lb).abs() <= 3e-4 * la.abs(),
                "{name}, step {step}: loss {la} casting, {lb} with master weights"
            );
        }
        let named = shared::params::named_vars;
        for ((param, x), (_, m)) in named(&cast_params).iter().zip(named(&masters)) {
            assert_eq!(m.dtype(), DType::F32);
            let (x, m) = (flat(x)?, flat(&m)?);
            if !param.ends_with("k_proj_bias") {
                // The key bias has no gradient in exact arithmetic (softmax ignores a constant
                // added to a whole row of scores): AdamW turns its rounding noise into ±lr steps.
                let worst = x
                    .iter()
                    .zip(&m)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(
                    worst <= 1e-3,
                    "{name}: master '{param}' is {worst} from the cast path"
                );
            }
        }
        for ((param, c), (_, m)) in named(&copies).iter().zip(named(&masters)) {
            let rounded = candle_core::Var::from_tensor(&m.as_tensor().to_dtype(DType::BF16)?)?;
            assert_eq!(c.dtype(), DType::BF16);
            assert_eq!(
                flat(c)?,
                flat(&rounded)?,
                "{name}: copy '{param}' is not its master rounded"
            );
        }
    }
    Ok(())
}

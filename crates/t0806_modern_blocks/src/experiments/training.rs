//! One training run of the recipe comparison, through the one training loop ([`shared::fit`]):
//! AdamW with warm-up and cosine decay, optional gradient clipping, validation every few steps,
//! and a divergence recorded instead of raised (the high-learning-rate runs compare exactly that).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use shared::batching::{LmBatch, LmBatcher};
use shared::cli::CommonArgs;
use shared::fit::{fit, FitSpec, Task};
use shared::params::count_params;
use shared::tokenizer::TokenizedWikiText;
use shared::train::{AdamWConfig, ScheduleConfig, Trainer};
use shared::wikitext::{Variant, Verify, WikiText2};
use std::time::Instant;
use t0804_transformer_block::DecoderOnlyLm;

/// WikiText-2 (or the tiny corpus with `--quick`) as BPE ids of a `vocab`-token tokenizer.
pub fn load_tokens(common: &CommonArgs, vocab: usize) -> Result<TokenizedWikiText> {
    let data = if common.quick {
        let dir = std::env::temp_dir().join("module08_tiny_wikitext");
        shared::corpus::write_tiny_wikitext(&dir)?;
        WikiText2::load_from_dir(&dir, Variant::Raw, Verify::No)?
    } else {
        WikiText2::load(common.data_dir.as_deref(), Variant::Raw)?
    };
    let t = Instant::now();
    let tok = TokenizedWikiText::prepare(&data, vocab, &shared::cache_dir())?;
    println!(
        "   BPE vocab {vocab}: train {} / valid {} tokens ({:.1}s)",
        tok.train.len(),
        tok.valid.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(tok)
}

/// What every run trains and validates on: random training windows `(batch, ctx)` drawn by
/// `batcher`, and fixed validation batches.
pub struct TrainData<'a> {
    pub train: &'a [u32],
    pub valid: Vec<LmBatch>,
    pub batcher: LmBatcher,
    pub device: Device,
}

impl TrainData<'_> {
    fn tokens_per_step(&self) -> usize {
        self.batcher.batch_size * self.batcher.seq_len
    }
}

/// The budget of one run: steps, peak learning rate (cosine to a tenth of it after a 10 %
/// warm-up), gradient clipping, and how often to validate.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub steps: usize,
    pub lr: f64,
    pub clip: Option<f64>,
    pub eval_every: usize,
}

impl Budget {
    fn schedule(&self) -> ScheduleConfig {
        ScheduleConfig {
            max_lr: self.lr,
            min_lr: self.lr / 10.0,
            warmup_steps: self.steps / 10,
            total_steps: self.steps,
            clip_norm: self.clip,
        }
    }
}

/// The record of one run: curves `(step, loss)`, the last validation loss after training began
/// (NaN when there is none), training tokens/s (forward + backward + AdamW, evaluation excluded)
/// and where it diverged, if it did.
pub struct RunResult {
    pub name: String,
    pub params: usize,
    pub val_curve: Vec<(f64, f64)>,
    pub train_curve: Vec<(f64, f64)>,
    pub final_val: f64,
    pub tokens_per_s: f64,
    pub diverged_at: Option<usize>,
}

/// Mean validation loss (nats/token) of `lm` over `batches`.
pub fn evaluate(lm: &DecoderOnlyLm, batches: &[LmBatch]) -> Result<f64> {
    let mut total = 0.0;
    for b in batches {
        total += lm
            .loss(&b.x, &b.y)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()? as f64;
    }
    Ok(total / batches.len() as f64)
}

/// The language-modelling task of one model: step `s` trains on the batcher's batch `s`.
struct LmTask<'a> {
    lm: &'a DecoderOnlyLm,
    data: &'a TrainData<'a>,
}

impl Task for LmTask<'_> {
    fn train_loss(&mut self, step: usize) -> Result<(Tensor, usize)> {
        let d = self.data;
        let b = d.batcher.batch(d.train, step as u64, &d.device)?;
        Ok((self.lm.loss(&b.x, &b.y)?, d.tokens_per_step()))
    }

    fn valid_loss(&mut self) -> Result<f64> {
        evaluate(self.lm, &self.data.valid)
    }
}

/// Trains `lm` (parameters in `varmap`) for `budget.steps` steps; a non-finite loss or gradient
/// ends the run and is recorded in `diverged_at`.
pub fn train(
    name: &str,
    varmap: &VarMap,
    lm: &DecoderOnlyLm,
    data: &TrainData,
    budget: &Budget,
) -> Result<RunResult> {
    let mut trainer = Trainer::new(varmap, AdamWConfig::default(), budget.schedule())?;
    let spec = FitSpec {
        label: name.to_string(),
        eval_every: budget.eval_every,
        patience: None,
    };
    let curve = fit(&mut trainer, &mut LmTask { lm, data }, &spec, None)?;
    let val_curve: Vec<(f64, f64)> = curve
        .valid
        .iter()
        .map(|&(step, loss, _)| (step as f64, loss))
        .collect();
    let after_start = val_curve.iter().rev().find(|p| p.0 > 0.0);
    Ok(RunResult {
        name: name.to_string(),
        params: count_params(varmap),
        final_val: after_start.map_or(f64::NAN, |p| p.1),
        train_curve: curve.train.iter().map(|t| (t.0 as f64, t.1)).collect(),
        val_curve,
        tokens_per_s: curve.tokens_per_s,
        diverged_at: curve.diverged_at,
    })
}

/// Moving average of the last `k` points (fewer at the start).
pub fn smooth(points: &[(f64, f64)], k: usize) -> Vec<(f64, f64)> {
    (0..points.len())
        .map(|i| {
            let w = &points[i.saturating_sub(k - 1)..=i];
            let mean = w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64;
            (points[i].0, mean)
        })
        .collect()
}

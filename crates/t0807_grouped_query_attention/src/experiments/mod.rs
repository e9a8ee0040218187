//! The experiments of 8-07, one module each, and what they share: the run's shape and budget
//! ([`Lab`]), how a variant is named, built and trained.

pub mod decode_speed;
pub mod kv_cache;
pub mod quality;
pub mod uptraining;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use shared::kernels::Kernels;
use shared::tokenizer::TokenizedWikiText;
use shared::train::{
    evaluate_lm, train_lm, AdamWConfig, LmCurve, LmTrainSpec, ScheduleConfig, Trainer,
};
use std::path::PathBuf;
use t0804_transformer_block::{init_lm, DecoderOnlyLm, LmConfig, LmShape};
use t0807_grouped_query_attention::grouped;

/// The run: model shape, kernels, device, training budget.
pub struct Lab {
    pub shape: LmShape,
    pub kernels: Kernels,
    pub device: Device,
    pub dtype: DType,
    pub out_dir: PathBuf,
    pub seed: u64,
    pub quick: bool,
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per training window.
    pub ctx: usize,
    /// Training steps per variant.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
}

impl Lab {
    /// Rung 2 with `n_kv` K/V heads: 8-06's modern LM (RMSNorm, SwiGLU, no biases, learned
    /// positions) whose K and V projections are `(n_kv·d_head, d_model)`.
    pub fn config(&self, n_kv: usize) -> LmConfig {
        grouped(
            t0806_modern_blocks::modern(LmConfig::gpt2(self.shape)),
            n_kv,
        )
    }

    /// A fresh model of [`Self::config`], initialised from the run's seed (every variant starts
    /// from the same random stream).
    pub fn init(&self, n_kv: usize) -> Result<(VarMap, DecoderOnlyLm)> {
        shared::params::set_seed(self.seed);
        let parts = t0806_modern_blocks::parts(self.kernels);
        Ok(init_lm(
            &self.config(n_kv),
            &parts,
            self.dtype,
            &self.device,
        )?)
    }

    /// `d_model / n_heads`.
    pub fn d_head(&self) -> usize {
        self.shape.d_model / self.shape.n_heads
    }

    /// Validation windows per evaluation.
    fn eval_batches(&self) -> usize {
        if self.quick {
            2
        } else {
            8
        }
    }

    /// Trains `lm` (parameters in `varmap`) for `budget.steps` steps (cosine schedule from
    /// `budget.lr`, warm-up 10 %, clip 1) through `shared::train::train_lm` on windows drawn with
    /// `budget.seed`; evaluates 6 times on the validation split.
    pub fn train(
        &self,
        label: &str,
        (varmap, lm): (&VarMap, &DecoderOnlyLm),
        data: &TokenizedWikiText,
        budget: TrainBudget,
    ) -> Result<LmCurve> {
        let TrainBudget { steps, lr, seed } = budget;
        let schedule = ScheduleConfig {
            max_lr: lr,
            min_lr: lr / 10.0,
            warmup_steps: steps / 10,
            total_steps: steps,
            clip_norm: Some(1.0),
        };
        let mut trainer = Trainer::new(varmap, AdamWConfig::default(), schedule)?;
        let spec = LmTrainSpec {
            label: label.to_string(),
            steps,
            batch_size: self.batch,
            seq_len: self.ctx,
            eval_every: (steps / 6).max(1),
            eval_batches: self.eval_batches(),
            seed,
            patience: None,
        };
        let loss_fn = |x: &Tensor, y: &Tensor| lm.loss(x, y);
        train_lm(
            &mut trainer,
            &data.train,
            &data.valid,
            &spec,
            &self.device,
            &loss_fn,
        )
    }

    /// Mean validation loss (nats/token) of `lm` on the evaluation windows.
    pub fn evaluate(&self, lm: &DecoderOnlyLm, data: &TokenizedWikiText) -> Result<f64> {
        let loss_fn = |x: &Tensor, y: &Tensor| lm.loss(x, y);
        let n = self.eval_batches();
        evaluate_lm(&data.valid, self.batch, self.ctx, n, &self.device, &loss_fn)
    }
}

/// The K/V head counts compared: `n_heads` (MHA), then those of `candidates` below `n_heads`
/// that divide it (GQA), down to 1 (MQA).
pub fn kv_variants(n_heads: usize, candidates: &[usize]) -> Vec<usize> {
    let mut kvs = vec![n_heads];
    kvs.extend(
        candidates
            .iter()
            .filter(|&&k| k < n_heads && n_heads.is_multiple_of(k)),
    );
    kvs
}

/// `MHA` (all K/V heads), `MQA` (one) or `GQA-k`.
pub fn variant_name(n_kv: usize, n_heads: usize) -> String {
    match n_kv {
        k if k == n_heads => "MHA".to_string(),
        1 => "MQA".to_string(),
        k => format!("GQA-{k}"),
    }
}

/// A validation curve as `(step, loss)` points.
pub fn valid_points(curve: &LmCurve) -> Vec<(f64, f64)> {
    curve.valid.iter().map(|v| (v.0 as f64, v.1)).collect()
}

/// How long, how fast and on which batches a model trains.
#[derive(Debug, Clone, Copy)]
pub struct TrainBudget {
    pub steps: usize,
    pub lr: f64,
    /// Seed of the training windows.
    pub seed: u64,
}

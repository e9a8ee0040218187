//! Choosing a position scheme by configuration: [`PositionScheme`] names it, [`Positions`] holds
//! its parameters and applies it — to the input (absolute schemes) or to the attention scores
//! (relative bias).

use crate::{
    frequencies, sinusoidal_with_base, LearnedPositions, RelativeBiasConfig, RelativePositionBias,
    DEFAULT_BASE,
};
use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;

/// Which position information a model gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionScheme {
    /// No position information: the model sees a bag of tokens (with a causal mask, only the mask
    /// itself leaks order).
    None,
    /// Fixed sines and cosines added to the token embeddings ([`crate::sinusoidal`]).
    Sinusoidal,
    /// A trained `(max_len, d_model)` table added to the token embeddings ([`LearnedPositions`]).
    Learned,
    /// A trained per-head bias of the offset `j − i` added to the scores ([`RelativePositionBias`]).
    RelativeBias,
}

impl PositionScheme {
    pub const ALL: [PositionScheme; 4] = [
        Self::None,
        Self::Sinusoidal,
        Self::Learned,
        Self::RelativeBias,
    ];

    /// The name used on command lines and in `results.json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Sinusoidal => "sinusoidal",
            Self::Learned => "learned",
            Self::RelativeBias => "relative_bias",
        }
    }

    /// Absolute schemes add a vector to each token's embedding.
    pub fn is_absolute(self) -> bool {
        matches!(self, Self::Sinusoidal | Self::Learned)
    }

    /// Defined at every position (everything but a learned table).
    pub fn any_length(self) -> bool {
        !matches!(self, Self::Learned)
    }
}

impl std::fmt::Display for PositionScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for PositionScheme {
    type Err = candle_core::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "none" | "nope" => Self::None,
            "sinusoidal" | "sin" => Self::Sinusoidal,
            "learned" | "learnt" => Self::Learned,
            "relative_bias" | "relative" | "t5" => Self::RelativeBias,
            other => bail!(
                "unknown position scheme '{other}': use none, sinusoidal, learned or relative_bias"
            ),
        })
    }
}

/// Everything needed to build any scheme; fields a scheme does not use are ignored.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PositionConfig {
    pub scheme: PositionScheme,
    pub d_model: usize,
    /// Heads of the attention layers (relative bias: one bias per head).
    pub n_heads: usize,
    /// Rows of the learned table.
    pub max_len: usize,
    /// Sinusoidal base (10000).
    pub base: f64,
    /// Relative bias buckets (32), distance of the last bucket (128), and directionality.
    pub n_buckets: usize,
    pub max_distance: usize,
    pub bidirectional: bool,
}

impl PositionConfig {
    /// Defaults: base 10000; T5's 32 buckets up to distance 128, bidirectional (a causal decoder
    /// may set `bidirectional = false` to spend every bucket on the past).
    pub fn new(scheme: PositionScheme, d_model: usize, n_heads: usize, max_len: usize) -> Self {
        Self {
            scheme,
            d_model,
            n_heads,
            max_len,
            base: DEFAULT_BASE,
            n_buckets: 32,
            max_distance: 128,
            bidirectional: true,
        }
    }

    pub fn relative(&self) -> RelativeBiasConfig {
        RelativeBiasConfig {
            n_heads: self.n_heads,
            n_buckets: self.n_buckets,
            max_distance: self.max_distance,
            bidirectional: self.bidirectional,
        }
    }
}

/// A built position scheme.
#[derive(Debug, Clone)]
pub enum Positions {
    None,
    Sinusoidal { d_model: usize, base: f64 },
    Learned(LearnedPositions),
    RelativeBias(RelativePositionBias),
}

impl Positions {
    /// Builds the scheme of `cfg`; its parameters (if any) are created through `vb` under the
    /// names `position_embeddings` (learned) or `relative_attention_bias` (relative).
    pub fn new(vb: VarBuilder, cfg: &PositionConfig) -> Result<Self> {
        Ok(match cfg.scheme {
            PositionScheme::None => Self::None,
            PositionScheme::Sinusoidal => {
                frequencies(cfg.d_model, cfg.base)?; // validates d_model and base now
                Self::Sinusoidal {
                    d_model: cfg.d_model,
                    base: cfg.base,
                }
            }
            PositionScheme::Learned => {
                Self::Learned(LearnedPositions::new(vb, cfg.max_len, cfg.d_model)?)
            }
            PositionScheme::RelativeBias => {
                Self::RelativeBias(RelativePositionBias::new(vb, cfg.relative())?)
            }
        })
    }

    pub fn scheme(&self) -> PositionScheme {
        match self {
            Self::None => PositionScheme::None,
            Self::Sinusoidal { .. } => PositionScheme::Sinusoidal,
            Self::Learned(_) => PositionScheme::Learned,
            Self::RelativeBias(_) => PositionScheme::RelativeBias,
        }
    }

    /// The vectors to add to the token embeddings at positions `offset … offset + seq_len − 1`,
    /// `(seq_len, d_model)`, or `None` for schemes that do not touch the input. Learned positions
    /// beyond the table are an error naming the position.
    pub fn input_encoding(
        &self,
        seq_len: usize,
        offset: usize,
        device: &candle_core::Device,
    ) -> Result<Option<Tensor>> {
        match self {
            Self::Sinusoidal { d_model, base } => Ok(Some(sinusoidal_with_base(
                seq_len, *d_model, offset, *base, device,
            )?)),
            Self::Learned(l) => Ok(Some(l.forward(seq_len, offset)?)),
            Self::None | Self::RelativeBias(_) => Ok(None),
        }
    }

    /// `x (batch, seq, d_model)` plus its position vectors (unchanged for non-absolute schemes);
    /// `offset` is the position of `x`'s first token.
    pub fn add_to_input(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, seq, _) = x.dims3()?;
        match self.input_encoding(seq, offset, x.device())? {
            Some(pe) => x.broadcast_add(&pe.to_dtype(x.dtype())?),
            None => Ok(x.clone()),
        }
    }

    /// The additive attention-score bias `(n_heads, n_q, n_k)` (queries end-aligned with the
    /// keys), or `None` for schemes that do not touch the scores.
    pub fn attention_bias(&self, n_q: usize, n_k: usize) -> Result<Option<Tensor>> {
        match self {
            Self::RelativeBias(r) => Ok(Some(r.forward(n_q, n_k)?)),
            _ => Ok(None),
        }
    }
}

/// A scheme as a position plug of 8-02's attention component: the relative bias adds its scores;
/// the absolute schemes act on the embeddings instead ([`Positions::add_to_input`]) and add none.
impl t0802_multi_head_attention::PositionPlug for Positions {
    fn score_bias(&self, n_q: usize, n_k: usize) -> Result<Option<Tensor>> {
        self.attention_bias(n_q, n_k)
    }
}

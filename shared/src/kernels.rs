//! How each op *runs*, chosen per run and never stored in a model's config.
//!
//! A model's config says what the model **is** (sizes, norm, feed-forward, positions); the
//! [`Kernels`] value says how its ops are **executed**: composed tensor ops that a learner can
//! read line by line, or fused custom ops (one kernel per op, forward and backward) that compute
//! the same values faster. Every choice gives the same parameters and, up to rounding, the same
//! numbers, so a checkpoint trained with one loads with any other.
//!
//! Each field is interpreted by the topic that teaches the op: `norm`, `swiglu`, `gelu` and
//! `softmax` by 8-06 (RMSNorm and LayerNorm, the SwiGLU gate, bias + GELU, naive attention's causal
//! softmax), `rope` by 8-08,
//! `attention` by 8-09 (FlashAttention), `heads` and `embedding` by `shared` itself. A topic
//! that is asked for a kernel it cannot provide yet says which topic brings it.
//!
//! Defaults: [`Kernels::for_device`] gives the fastest correct choice for training, every fused
//! op plus FlashAttention, on CUDA and on the CPU alike (each op's CPU loops are vectorised and
//! spread over the cores, [`crate::cpu`]); 8-10's decoding commands use naive attention on the
//! CPU instead (`t0810_kv_cache::decoding_kernels`). Binaries take `--kernels composed|fused`
//! and per-op overrides; the composed ops are the ones a learner reads line by line.

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// Composed tensor ops, or one fused custom op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum OpImpl {
    Composed,
    Fused,
}

/// Which kernel computes `softmax(Q·Kᵀ/√d + mask)·V`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum AttentionImpl {
    /// Materialise the `(n_q, n_k)` scores (8-01), softmax composed or fused (`Kernels::softmax`).
    Naive,
    /// FlashAttention (8-09): tiles, online softmax, no score matrix in memory.
    Flash,
}

/// Which FlashAttention kernels run on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum FlashKernels {
    /// The fastest family for the dtype, head size and card (warpgroup MMA on Hopper, `mma.sync`
    /// tensor cores, register tiles, or fp32 FMA).
    Auto,
    /// The `mma.sync` tensor-core kernels even on a Hopper card (the kernels every card since
    /// Ampere runs; for side-by-side measurements).
    MmaSync,
    /// Always the simple fp32-FMA kernels (for side-by-side measurements).
    Simple,
    /// On a Hopper card, the warpgroup-MMA kernels wherever one exists for the call (bf16/f16,
    /// d_head 64 or 128; the backward at d_head 64), whatever its length: past the length
    /// thresholds `Auto` keeps (for side-by-side measurements and tests). Elsewhere as `Auto`.
    WarpgroupMma,
}

/// How heads are split and merged (`(b, n, h, d) ↔ (b, h, n, d)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum HeadCopy {
    /// One op that moves whole `d_head` rows ([`crate::heads::swap_axes_1_2`]).
    RowSwap,
    /// Candle's `transpose(1, 2).contiguous()` (an element-wise strided copy).
    Transpose,
}

/// How token ids are looked up in the embedding table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Lookup {
    /// [`crate::embedding::embedding`]: a gather whose backward is one scatter-add.
    Gather,
    /// Candle's `index_select` (its backward builds a one-hot matmul on some backends).
    IndexSelect,
}

/// `OpImpl::Composed`, the serde default of a field newer than some saved results.
fn composed() -> OpImpl {
    OpImpl::Composed
}

/// The execution choice of every op of the course's models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kernels {
    pub norm: OpImpl,
    pub swiglu: OpImpl,
    /// Bias + GELU of the GPT-2-style MLP (absent in older `results.json`: composed).
    #[serde(default = "composed")]
    pub gelu: OpImpl,
    pub softmax: OpImpl,
    pub rope: OpImpl,
    pub attention: AttentionImpl,
    pub flash: FlashKernels,
    pub heads: HeadCopy,
    pub embedding: Lookup,
}

impl Default for Kernels {
    fn default() -> Self {
        Self::composed()
    }
}

impl Kernels {
    /// Every op composed from tensor ops; naive attention.
    pub const fn composed() -> Self {
        Self {
            norm: OpImpl::Composed,
            swiglu: OpImpl::Composed,
            gelu: OpImpl::Composed,
            softmax: OpImpl::Composed,
            rope: OpImpl::Composed,
            attention: AttentionImpl::Naive,
            flash: FlashKernels::Auto,
            heads: HeadCopy::RowSwap,
            embedding: Lookup::Gather,
        }
    }

    /// Every op fused, and FlashAttention.
    pub const fn fused() -> Self {
        Self {
            norm: OpImpl::Fused,
            swiglu: OpImpl::Fused,
            gelu: OpImpl::Fused,
            softmax: OpImpl::Fused,
            rope: OpImpl::Fused,
            attention: AttentionImpl::Flash,
            ..Self::composed()
        }
    }

    /// The default of a run on `device`: every fused op and FlashAttention (the fastest on the
    /// GPU and on the CPU; the device stays a parameter so that a backend can differ).
    pub fn for_device(_device: &Device) -> Self {
        Self::fused()
    }

    /// The same choice with another attention kernel.
    pub const fn with_attention(self, attention: AttentionImpl) -> Self {
        Self { attention, ..self }
    }

    /// A short label for logs and `results.json`, e.g. `norm=fused swiglu=fused … attention=flash`.
    pub fn describe(&self) -> String {
        let s = serde_json::to_value(self).unwrap_or_default();
        match s.as_object() {
            Some(m) => m
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?").to_lowercase()))
                .collect::<Vec<_>>()
                .join(" "),
            None => String::new(),
        }
    }
}

/// The command-line form of a [`Kernels`] choice, flattened into every binary's arguments:
/// `--kernels composed|fused` picks the base and `--norm/--swiglu/--gelu/--softmax/--rope fused|composed`,
/// `--attention naive|flash`, `--flash-kernels auto|mma-sync|simple`, `--head-copy row-swap|transpose` and
/// `--embedding gather|index-select` override one op each. They are global: they may follow a
/// subcommand (`t0810_kv_cache train-bench --flash-kernels mma-sync`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KernelArgs {
    /// Base choice for every op (default: every fused op + FlashAttention, on the CPU and CUDA).
    #[arg(long, value_enum, global = true)]
    pub kernels: Option<KernelBase>,
    /// RMSNorm and LayerNorm (8-06).
    #[arg(long, value_enum, global = true)]
    pub norm: Option<OpImpl>,
    /// The SwiGLU gate (8-06).
    #[arg(long, value_enum, global = true)]
    pub swiglu: Option<OpImpl>,
    /// Bias + GELU of the GPT-2-style MLP (8-06).
    #[arg(long, value_enum, global = true)]
    pub gelu: Option<OpImpl>,
    /// Naive attention's scale + causal mask + softmax (8-06).
    #[arg(long, value_enum, global = true)]
    pub softmax: Option<OpImpl>,
    /// The RoPE rotation (8-08).
    #[arg(long, value_enum, global = true)]
    pub rope: Option<OpImpl>,
    /// Naive attention or FlashAttention (8-09).
    #[arg(long, value_enum, global = true)]
    pub attention: Option<AttentionImpl>,
    /// Which FlashAttention kernels run on CUDA.
    #[arg(long, value_enum, global = true)]
    pub flash_kernels: Option<FlashKernels>,
    /// How heads are split and merged (`--head-copy`: `--heads` is a model size in most binaries).
    #[arg(id = "head_copy", long = "head-copy", value_enum, global = true)]
    pub heads: Option<HeadCopy>,
    /// How embeddings are looked up.
    #[arg(long, value_enum, global = true)]
    pub embedding: Option<Lookup>,
}

/// `--kernels` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelBase {
    Composed,
    Fused,
}

impl KernelArgs {
    /// The choice for `device`, starting from `default` when `--kernels` is absent; each topic
    /// passes its own default (the fastest it can build on that device).
    pub fn resolve(&self, default: Kernels) -> Kernels {
        let mut k = match self.kernels {
            Some(KernelBase::Composed) => Kernels::composed(),
            Some(KernelBase::Fused) => Kernels::fused(),
            None => default,
        };
        let set = |slot: &mut OpImpl, v: Option<OpImpl>| {
            if let Some(v) = v {
                *slot = v;
            }
        };
        set(&mut k.norm, self.norm);
        set(&mut k.swiglu, self.swiglu);
        set(&mut k.gelu, self.gelu);
        set(&mut k.softmax, self.softmax);
        set(&mut k.rope, self.rope);
        k.attention = self.attention.unwrap_or(k.attention);
        k.flash = self.flash_kernels.unwrap_or(k.flash);
        k.heads = self.heads.unwrap_or(k.heads);
        k.embedding = self.embedding.unwrap_or(k.embedding);
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_per_device_and_overrides() {
        assert_eq!(Kernels::for_device(&Device::Cpu), Kernels::fused());
        let args = KernelArgs {
            kernels: Some(KernelBase::Fused),
            attention: Some(AttentionImpl::Naive),
            rope: Some(OpImpl::Composed),
            ..Default::default()
        };
        let k = args.resolve(Kernels::composed());
        assert_eq!(k.norm, OpImpl::Fused);
        assert_eq!(k.rope, OpImpl::Composed);
        assert_eq!(k.attention, AttentionImpl::Naive);
        assert_eq!(
            KernelArgs::default().resolve(Kernels::fused()),
            Kernels::fused()
        );
        let d = Kernels::fused().describe();
        assert!(
            d.contains("norm=fused") && d.contains("attention=flash"),
            "{d}"
        );
    }
}

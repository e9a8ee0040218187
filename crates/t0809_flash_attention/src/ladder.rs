//! FlashAttention on the ladder: rung 4 = the LLaMA recipe of 8-08 with FlashAttention as the
//! attention component's kernel. Same config, same parameters, same values: only how attention
//! runs changes (and the `(n_q, n_k)` score matrix never exists).

use crate::{default_softmax_scale, flash_attention_padded, flash_attention_with};
use candle_core::{bail, Device, Result, Tensor};
use shared::kernels::{AttentionImpl, FlashKernels, Kernels};
use std::sync::Arc;
use t0802_multi_head_attention::{repeat_kv, AttentionKernel, AttnMask};
use t0804_transformer_block::{LmConfig, Parts};
use t0808_rope::RopeParts;

/// FlashAttention as 8-02's attention kernel. Grouped K/V heads are repeated to one per query
/// head (the op takes equal head counts); key padding (8-05's batches) runs as per-sequence key
/// lengths, causal or not; explicit masks and score biases have no flash form and are refused
/// with an error that says so.
#[derive(Debug, Clone, Copy)]
pub struct FlashAttentionKernel {
    pub kernels: FlashKernels,
}

impl AttentionKernel for FlashAttentionKernel {
    fn name(&self) -> &'static str {
        "flash"
    }

    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: AttnMask<'_>,
        score_bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        if score_bias.is_some() {
            bail!("FlashAttention takes no score bias (relative positions): use naive attention");
        }
        let (causal, padding) = match mask {
            AttnMask::None => (false, None),
            AttnMask::Causal => (true, None),
            AttnMask::Padding { keys, causal } if keys.is_full() => (causal, None),
            AttnMask::Padding { keys, .. } if keys.n_keys() != k.dim(2)? => {
                bail!(
                    "FlashAttention: key padding for {} keys, but {} keys were given",
                    keys.n_keys(),
                    k.dim(2)?
                )
            }
            AttnMask::Padding { keys, causal } => (causal, Some(keys)),
            AttnMask::Explicit(_) => {
                bail!("FlashAttention takes no mask, the causal mask or key padding, not an explicit mask: use naive attention")
            }
            AttnMask::KeysUpTo(_) => {
                bail!("FlashAttention takes its key lengths on the host, not a key index on the device (a static cache): use naive attention")
            }
        };
        let g = t0802_multi_head_attention::group_size(q, k)?;
        let (k, v) = (repeat_kv(k, g)?, repeat_kv(v, g)?);
        let scale = default_softmax_scale(q.dim(3)?);
        match padding {
            None => flash_attention_with(q, &k, &v, scale, causal, self.kernels),
            Some(keys) => {
                flash_attention_padded(q, &k, &v, scale, causal, self.kernels, keys.lengths())
            }
        }
    }
}

/// The fastest kernels of the whole ladder on `device`: every fused op and FlashAttention, on
/// the CPU and on CUDA.
pub fn fastest_kernels(device: &Device) -> Kernels {
    Kernels::for_device(device)
}

/// Rung 4's parts: 8-08's, plus FlashAttention as the attention kernel.
#[derive(Debug, Clone, Copy)]
pub struct FlashParts {
    pub below: RopeParts,
}

/// This topic's parts with the run's kernels.
pub fn parts(kernels: Kernels) -> FlashParts {
    FlashParts {
        below: t0808_rope::parts(kernels),
    }
}

impl Parts for FlashParts {
    fn below(&self) -> Option<&dyn Parts> {
        Some(&self.below)
    }

    fn attention_kernel(&self, cfg: &LmConfig) -> Result<Arc<dyn AttentionKernel>> {
        let k = self.kernels();
        match k.attention {
            AttentionImpl::Flash => Ok(Arc::new(FlashAttentionKernel { kernels: k.flash })),
            AttentionImpl::Naive => self.below.attention_kernel(cfg),
        }
    }
}

//! # 8-03 · Positional encoding: sinusoidal, learned, relative
//!
//! ## Why attention needs to be told where tokens are
//! Self-attention treats its input as a *set*. Permute the rows of `X (seq, d_model)` with a
//! permutation matrix `P` and every score, weight and output is permuted the same way:
//!
//! ```text
//! Attention(P·X) = softmax(P·Q·Kᵀ·Pᵀ/√d)·P·V = P·softmax(Q·Kᵀ/√d)·V = P·Attention(X)
//! ```
//!
//! (softmax acts row-wise, so it commutes with permuting rows and columns together). A model
//! made of such layers cannot tell "dog bites man" from "man bites dog": the output at a token
//! depends on the token and on the *multiset* of the others, never on their order. Position must
//! be injected. Three families, all in this crate:
//!
//! | scheme | where it enters | parameters | beyond the training length |
//! |---|---|---|---|
//! | [`sinusoidal`] (Vaswani et al., 2017) | added to the token embeddings | none | defined, but unseen vectors |
//! | [`LearnedPositions`] (BERT, GPT-2) | added to the token embeddings | `(max_len, d_model)` | **undefined**: the table ends |
//! | [`RelativePositionBias`] (T5; Shaw et al. 2018) | added to the attention scores | `(n_heads, n_buckets)` | defined: depends on `j − i` only |
//!
//! ## Sinusoidal encoding
//! Dimension pairs `(2i, 2i+1)` hold a sine and a cosine of the position at angular frequency
//! `ωᵢ = base^(−2i/d_model)` (`base = 10000`), so wavelengths run geometrically from `2π` to
//! `base·2π`:
//!
//! ```text
//! PE(pos, 2i)   = sin(pos·ωᵢ)         PE(pos, 2i+1) = cos(pos·ωᵢ)
//! ```
//!
//! Fast pairs tell neighbouring positions apart, slow pairs tell far-apart regions apart; the
//! whole vector is a unique signature of the position. Shifting by `k` is a *rotation* of every
//! pair by the angle `k·ωᵢ`, independent of `pos` ([`shift_matrix`]):
//!
//! ```text
//! [sin, cos]((pos+k)·ωᵢ) = [[cos kωᵢ, sin kωᵢ], [−sin kωᵢ, cos kωᵢ]] · [sin, cos](pos·ωᵢ)
//! ```
//!
//! so a linear map (an attention projection) can learn to look "k tokens back", and the dot
//! product `PE(p)·PE(q) = Σᵢ cos((p−q)·ωᵢ)` depends on the offset `p − q` only.
//!
//! ## Learned and relative positions
//! Learned embeddings are a trained `(max_len, d_model)` table whose row `pos` is added to the
//! token at `pos`: flexible, but there is no row `max_len` ([`LearnedPositions::forward`] says
//! so instead of reading out of bounds). Relative schemes drop absolute positions altogether and
//! add a learned scalar `b_h(bucket(j − i))` to the score of query `i` and key `j` in head `h`
//! ([`RelativePositionBias`]). The bias enters 8-02's attention component as a position plug
//! ([`t0802_multi_head_attention::PositionPlug`]): the component asks it for `B` and hands it to
//! the kernel ([`attention_with_bias`], 8-01), so no attention is written again here.
//!
//! [`PositionScheme`] and [`Positions`] let later crates (the transformer stack of 8-04) pick one
//! of these by configuration.

mod learned;
mod relative;
mod scheme;
mod sinusoidal;

pub use learned::{LearnedPositions, LEARNED_INIT_STD};
pub use relative::{
    relative_bucket_matrix, relative_position_bucket, RelativeBiasConfig, RelativePositionBias,
};
pub use scheme::{PositionConfig, PositionScheme, Positions};
pub use sinusoidal::{
    frequencies, shift_matrix, sinusoidal, sinusoidal_at, sinusoidal_with_base, DEFAULT_BASE,
};
pub use t0801_self_attention::attention_with_bias;

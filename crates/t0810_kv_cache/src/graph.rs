//! Greedy decoding whose step is captured once into a **CUDA graph** and replayed.
//!
//! A decode step of a small model is a hundred-odd tiny kernels; launched one by one from the
//! host, the launches take longer than the GPU's work. A CUDA graph records a stream's launches
//! once and replays them all with one call. A replay repeats every kernel with the *same
//! arguments*, so the step must not change any host value between tokens:
//!
//! ```text
//! the input token      read from `tokens (batch, 1)`, which the step itself overwrites
//! the position         the static cache's device counter (RoPE row, cache slot, last key)
//! the shapes           attention always spans the cache's max_seq slots, masked to 0 ..= pos
//! the output           argmax on the device, scattered into `history[:, pos]`
//! ```
//!
//! [`GreedyDecoder`] runs that step eagerly on any device (the CPU tests check it against the
//! host-position cache); on CUDA, [`GreedyDecoder::capture`] records it after one real warm-up
//! step and every later [`GreedyDecoder::step`] is one graph launch.

use crate::cache::KvStore;
use crate::static_cache::StaticKvCache;
use candle_core::{bail, DType, Device, Result, Tensor};
use t0804_transformer_block::DecoderOnlyLm;

#[cfg(feature = "cuda")]
type Captured = candle_core::cuda_backend::cudarc::driver::CudaGraph;
#[cfg(not(feature = "cuda"))]
type Captured = std::convert::Infallible;

/// Prepares `device` for capture: turns off cudarc's per-tensor event tracking, with which
/// every launch waits on events recorded outside the capture (an error inside one). Call it
/// before creating the model; it affects the tensors created after it. A no-op on the CPU.
pub fn prepare_for_graphs(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        // SAFETY: the events synchronise several streams; Candle runs every op of a device on
        // its one stream, so stream order alone keeps each tensor's uses in order.
        unsafe { dev.disable_event_tracking() };
    }
    let _ = device;
    Ok(())
}

/// The greedy next tokens `(batch, 1)` `u32` of the last position of `logits (batch, t, vocab)`
/// (the first of equal maxima; [`crate::argmax::argmax_last`]).
pub fn greedy_next(logits: &Tensor) -> Result<Tensor> {
    let (_, t, _) = logits.dims3()?;
    if t == 0 {
        bail!("greedy_next: logits of no position");
    }
    crate::argmax::argmax_last(&logits.narrow(1, t - 1, 1)?)
}

/// The nodes of a captured decode step, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GraphNodes {
    pub kernels: usize,
    pub copies: usize,
    pub memsets: usize,
    pub allocs: usize,
    pub frees: usize,
    pub other: usize,
}

/// Greedy decoding of a batch with a [`StaticKvCache`]: a prefill, then single-token steps that
/// read everything that changes from the device, eager or replayed from a CUDA graph.
pub struct GreedyDecoder<'a> {
    lm: &'a DecoderOnlyLm,
    cache: StaticKvCache,
    /// `(batch, 1)` `u32`: the next step's input, which the step overwrites with its output.
    tokens: Tensor,
    /// `(batch, max_seq + 1)` `u32`: `history[:, p]` is the token at position `p`.
    history: Tensor,
    prompt_len: usize,
    graph: Option<Captured>,
}

impl<'a> GreedyDecoder<'a> {
    /// A decoder for `batch` sequences of up to `max_seq` positions (at most the model's
    /// context), its cache in `dtype`.
    pub fn new(lm: &'a DecoderOnlyLm, batch: usize, max_seq: usize, dtype: DType) -> Result<Self> {
        let shape = crate::decode::lm_cache_shape(lm, batch, max_seq);
        let dev = lm.token_embedding.device();
        Ok(Self {
            lm,
            cache: StaticKvCache::new(shape, dtype, dev)?,
            tokens: Tensor::zeros((batch, 1), DType::U32, dev)?,
            history: Tensor::zeros((batch, shape.max_seq + 1), DType::U32, dev)?,
            prompt_len: 0,
            graph: None,
        })
    }

    /// Runs `prompt (batch, n)` through the model (forgetting any earlier sequence) and puts its
    /// greedy next token in place for the first step.
    pub fn prefill(&mut self, prompt: &Tensor) -> Result<()> {
        let (batch, n) = prompt.dims2()?;
        if batch != self.cache.shape.batch || n == 0 {
            bail!(
                "GreedyDecoder: prompt {:?} for a decoder of batch {} (at least one token each)",
                prompt.dims(),
                self.cache.shape.batch
            );
        }
        let prompt = prompt.to_dtype(DType::U32)?.contiguous()?;
        self.prompt_len = 0; // no step until this prefill succeeds
        self.cache.reset()?;
        let next = greedy_next(&self.lm.forward_cached(&prompt, &mut self.cache)?)?;
        self.history.slice_set(&prompt, 1, 0)?;
        self.history.slice_set(&next, 1, n)?;
        self.tokens.slice_set(&next, 0, 0)?;
        self.prompt_len = n;
        Ok(())
    }

    /// Tokens in the cache (prompt and steps so far).
    pub fn seq_len(&self) -> usize {
        self.cache.seq_len()
    }

    /// Steps still possible before the cache is full.
    pub fn steps_left(&self) -> usize {
        self.cache.shape.max_seq - self.cache.seq_len()
    }

    /// Whether [`Self::step`] replays a CUDA graph.
    pub fn is_captured(&self) -> bool {
        self.graph.is_some()
    }

    /// One decode step: the input token in, its successor out (in `tokens` and `history`).
    pub fn step(&mut self) -> Result<()> {
        if self.prompt_len == 0 {
            bail!("GreedyDecoder: prefill a prompt before stepping");
        }
        if self.steps_left() == 0 {
            bail!(
                "KV cache full: {} tokens fill its max_seq",
                self.cache.seq_len()
            );
        }
        match &self.graph {
            Some(graph) => {
                launch(graph)?;
                // The replayed kernels advanced the device position; the host mirror follows.
                let len = self.cache.seq_len() + 1;
                self.cache.set_host_len(len);
                Ok(())
            }
            None => self.record_step(),
        }
    }

    /// The step's operations, all reading the position from the device.
    fn record_step(&mut self) -> Result<()> {
        let logits = self.lm.forward_cached(&self.tokens, &mut self.cache)?; // (batch, 1, vocab)
        let next = greedy_next(&logits)?; // (batch, 1)
        let batch = self.cache.shape.batch;
        let at = self
            .cache
            .position() // advanced: the new token's position
            .reshape((1, 1))?
            .broadcast_as((batch, 1))?
            .contiguous()?;
        self.history.scatter_set(&at, &next, 1)?;
        self.tokens.slice_set(&next, 0, 0)
    }

    /// Records one step into a CUDA graph that every later [`Self::step`] replays. Runs one
    /// real step first (uncaptured): it loads the kernels, sizes cuBLAS's workspace and fills
    /// Candle's cache of kernel-parameter uploads, which a capture may not make. Needs a prefill,
    /// room for two steps, and [`prepare_for_graphs`] before the model was created.
    #[cfg(feature = "cuda")]
    pub fn capture(&mut self) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        use candle_core::cuda_backend::WrapErr;
        let Device::Cuda(dev) = self.tokens.device().clone() else {
            bail!("CUDA graphs need a CUDA device");
        };
        if dev.is_event_tracking() {
            bail!("GreedyDecoder::capture: call prepare_for_graphs(device) before creating the model (cudarc's event tracking cannot be captured)");
        }
        if self.steps_left() < 2 {
            bail!("GreedyDecoder::capture: needs a prefill and room for two steps (one runs while capturing)");
        }
        self.graph = None;
        let _params = dev.enable_cuda_graph_htod_cache();
        self.step()?; // warm-up, for real
        let len = self.cache.seq_len();
        let stream = dev.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .w()?;
        let recorded = self.record_step();
        self.cache.clear_step(); // nothing allocated inside the capture may outlive it
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        self.cache.set_host_len(len); // recorded, not run
        recorded?;
        let graph = graph
            .w()?
            .ok_or_else(|| candle_core::Error::Msg("CUDA graph capture recorded nothing".into()))?;
        graph.upload().w()?;
        self.graph = Some(graph);
        Ok(())
    }

    /// What the captured step is made of (`None` before a capture): kernels, copies (Candle's
    /// kernel-parameter uploads served from its device cache), memsets, and the allocation and
    /// free nodes of the temporaries.
    #[cfg(feature = "cuda")]
    pub fn graph_nodes(&self) -> Result<Option<GraphNodes>> {
        use candle_core::cuda_backend::cudarc::driver::sys::{self, CUgraphNodeType as T};
        use candle_core::cuda_backend::WrapErr;
        let Some(graph) = &self.graph else {
            return Ok(None);
        };
        let mut n = 0usize;
        // SAFETY: the graph is alive (owned by `self`); the first call only counts.
        unsafe { sys::cuGraphGetNodes(graph.cu_graph(), std::ptr::null_mut(), &mut n) }
            .result()
            .w()?;
        let mut nodes = vec![std::ptr::null_mut(); n];
        unsafe { sys::cuGraphGetNodes(graph.cu_graph(), nodes.as_mut_ptr(), &mut n) }
            .result()
            .w()?;
        let mut count = GraphNodes::default();
        for node in nodes {
            let mut kind = T::CU_GRAPH_NODE_TYPE_EMPTY;
            unsafe { sys::cuGraphNodeGetType(node, &mut kind) }
                .result()
                .w()?;
            match kind {
                T::CU_GRAPH_NODE_TYPE_KERNEL => count.kernels += 1,
                T::CU_GRAPH_NODE_TYPE_MEMCPY => count.copies += 1,
                T::CU_GRAPH_NODE_TYPE_MEMSET => count.memsets += 1,
                T::CU_GRAPH_NODE_TYPE_MEM_ALLOC => count.allocs += 1,
                T::CU_GRAPH_NODE_TYPE_MEM_FREE => count.frees += 1,
                _ => count.other += 1,
            }
        }
        Ok(Some(count))
    }

    /// Without the `cuda` feature nothing is captured.
    #[cfg(not(feature = "cuda"))]
    pub fn graph_nodes(&self) -> Result<Option<GraphNodes>> {
        Ok(None)
    }

    /// Without the `cuda` feature there is nothing to capture.
    #[cfg(not(feature = "cuda"))]
    pub fn capture(&mut self) -> Result<()> {
        bail!("CUDA graphs need the `cuda` feature and a CUDA device")
    }

    /// The token each sequence feeds the next step (the newest one produced), read to the host.
    pub fn next_tokens(&self) -> Result<Vec<u32>> {
        self.tokens.flatten_all()?.to_vec1()
    }

    /// Every sequence's tokens so far, prompt included: `(batch, seq_len + 1)` read to the host.
    pub fn sequences(&self) -> Result<Vec<Vec<u32>>> {
        self.history
            .narrow(1, 0, self.cache.seq_len() + 1)?
            .to_vec2()
    }

    /// The generated tokens of every sequence (after the prompt).
    pub fn generated(&self) -> Result<Vec<Vec<u32>>> {
        let n = self.prompt_len;
        Ok(self
            .sequences()?
            .into_iter()
            .map(|s| s[n..].to_vec())
            .collect())
    }
}

/// One replay of a captured step.
#[cfg(feature = "cuda")]
fn launch(graph: &Captured) -> Result<()> {
    use candle_core::cuda_backend::WrapErr;
    graph.launch().w()
}

#[cfg(not(feature = "cuda"))]
fn launch(graph: &Captured) -> Result<()> {
    match *graph {}
}

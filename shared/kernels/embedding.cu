// Embedding lookup and its gradient, for Candle (shared::embedding).
//
//   forward   out[i, :]   = table[ids[i], :]                 ids (n,), table (vocab, d), out (n, d)
//   backward  dtable[v, :] = Σ_{i : ids[i] = v} dout[i, :]   a scatter-add into (vocab, d)
//
// The forward is a gather: one block per output row (grid-stride), the threads across the row.
// The backward is the reason these kernels exist. Candle's `index_add` (the backward of
// `index_select`) gives one thread to each of the d columns and walks the n ids one after the
// other, so a (64 × 256)-token batch with d = 512 runs 512 threads through 16,384 dependent
// steps. Here every (token, column) pair is its own thread and the rows are added with atomics,
// in fp32 (a bf16/f16 gradient is accumulated in an fp32 buffer and rounded once by
// embedding_cast_*). Atomics make the order of the additions vary between runs: the gradient
// of a token that occurs many times is not bitwise reproducible, its value is (to fp32 rounding).
//
// An id outside [0, vocab) reads and writes nothing: its output row is zero and it adds no
// gradient (the CPU path reports it as an error instead).
//
// Build: nvcc --ptx -arch=compute_90 (build.rs).

#include "common.cuh"

template <typename T>
__device__ void gather(const T *table, const uint32_t *ids, T *out, int64_t n, int64_t d, int64_t vocab) {
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const uint32_t id = ids[row];
    const bool ok = id < vocab;
    const T *src = table + (ok ? id : 0) * d;
    T *dst = out + row * d;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dst[c] = ok ? src[c] : T(0.0f);
  }
}

// dacc[ids[i], c] += dout[i, c], one thread per (i, c); A = the accumulator type.
template <typename T, typename A>
__device__ void scatter_add(const T *dout, const uint32_t *ids, A *dacc, int64_t n, int64_t d, int64_t vocab) {
  GRID_STRIDE(k, n * d) {
    const int64_t row = k / d, c = k - row * d;
    const uint32_t id = ids[row];
    if (id < vocab) atomicAdd(dacc + id * d + c, (A)to_f(dout[k]));
  }
}

#define EMBEDDING_KERNELS(T, A, NAME)                                                                  \
  extern "C" __global__ void embedding_fwd_##NAME(const T *table, const uint32_t *ids, T *out,       \
                                                  int64_t n, int64_t d, int64_t vocab) {              \
    gather<T>(table, ids, out, n, d, vocab);                                                           \
  }                                                                                                    \
  extern "C" __global__ void embedding_bwd_##NAME(const T *dout, const uint32_t *ids, A *dacc,       \
                                                  int64_t n, int64_t d, int64_t vocab) {              \
    scatter_add<T, A>(dout, ids, dacc, n, d, vocab);                                                   \
  }

EMBEDDING_KERNELS(float, float, f32)
EMBEDDING_KERNELS(double, double, f64)
EMBEDDING_KERNELS(__nv_bfloat16, float, bf16)
EMBEDDING_KERNELS(__half, float, f16)

// The fp32 accumulator of a bf16/f16 gradient, rounded once.
template <typename T>
__device__ void cast_from_f32(const float *acc, T *out, int64_t count) {
  GRID_STRIDE(k, count) store(acc[k], out + k);
}
extern "C" __global__ void embedding_cast_bf16(const float *acc, __nv_bfloat16 *out, int64_t count) {
  cast_from_f32<__nv_bfloat16>(acc, out, count);
}
extern "C" __global__ void embedding_cast_f16(const float *acc, __half *out, int64_t count) {
  cast_from_f32<__half>(acc, out, count);
}

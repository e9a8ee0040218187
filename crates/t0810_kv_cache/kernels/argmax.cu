// Greedy decoding's argmax over the vocabulary, one block per row, for Candle (topic 8-10).
//
//   out[r] = the smallest j with x[r, j] = max_k x[r, k]       (NaN scores are skipped; a row of
//                                                               NaN only gives 0)
//
// x: rows of n contiguous scores; out: one u32 per row. 1024 threads stride over the row keeping
// their best (value, index), then warps and the block reduce with shuffles: one pass over the
// row, two __syncthreads. Candle's argmax computes a strided index per element and reduces in
// shared memory, which at a vocabulary of 10,000 and one row took 16 µs on an H100; this is the
// kernel that replaces it in the captured decode step.
//
// Build: nvcc --ptx -arch=compute_90 (build.rs).

#include "common.cuh"

#define THREADS 1024

// The better of two candidates: the larger value, the smaller index on ties.
__device__ __forceinline__ void keep_best(float &v, uint32_t &i, float ov, uint32_t oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

template <typename T>
__device__ void argmax_rows(const T *x, uint32_t *out, int64_t n) {
  const T *row = x + (int64_t)blockIdx.x * n;
  float best = -INFINITY;
  uint32_t at = 0xFFFFFFFFu;
  for (int64_t j = threadIdx.x; j < n; j += THREADS) {
    const float v = to_f(row[j]);
    if (v > best || (at == 0xFFFFFFFFu && v == best)) {  // NaN compares false: skipped
      best = v;
      at = (uint32_t)j;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    keep_best(best, at, __shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, at, o));
  }
  __shared__ float warp_best[THREADS / 32];
  __shared__ uint32_t warp_at[THREADS / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_best[warp] = best;
    warp_at[warp] = at;
  }
  __syncthreads();
  if (warp == 0) {
    best = warp_best[lane];
    at = warp_at[lane];
    for (int o = 16; o > 0; o >>= 1) {
      keep_best(best, at, __shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, at, o));
    }
    if (lane == 0) out[blockIdx.x] = at == 0xFFFFFFFFu ? 0u : at;
  }
}

#define ARGMAX_KERNEL(T, NAME)                                                            \
  extern "C" __global__ void argmax_rows_##NAME(const T *x, uint32_t *out, int64_t n) { \
    argmax_rows<T>(x, out, n);                                                          \
  }

ARGMAX_KERNEL(float, f32)
ARGMAX_KERNEL(__nv_bfloat16, bf16)
ARGMAX_KERNEL(__half, f16)

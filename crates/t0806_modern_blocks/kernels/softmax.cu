// The scaled, causally masked softmax of attention scores as one op, forward and backward, for
// Candle (topic 8-06's fused naive attention).
//
//   forward   y[r, j]  = exp(s·x[r, j] − m_r) / l_r   for j ≤ last(r), 0 after it
//             m_r = max_{j ≤ last(r)} s·x[r, j],  l_r = Σ_{j ≤ last(r)} exp(s·x[r, j] − m_r)
//   backward  dx[r, j] = s·y[r, j]·(g[r, j] − Σ_k g[r, k]·y[r, k])
//
// x, y, g: `rows` rows of `n_k` scores, contiguous. Row r is query (r mod n_q), the queries being
// the last n_q of the n_k positions: last(r) = (r mod n_q) + n_k − n_q (n_k − 1 when not causal).
// One warp per row: the forward reads the allowed scores twice (an online max and sum, then the
// outputs), the backward reads y and g twice (the dot product, then dx); the masked tail is
// written as zeros without being read. f32 arithmetic, one rounding per stored value.
//
// Build: nvcc --ptx -arch=compute_90 (build.rs).

#include "common.cuh"

#define WARPS_PER_BLOCK 8

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The last key row r may attend to.
__device__ __forceinline__ int64_t last_key(int64_t r, int64_t n_q, int64_t n_k, int causal) {
  return causal ? (r % n_q) + n_k - n_q : n_k - 1;
}

// `last_slot`, when not null, points at a key index on the device that no row sees past (8-10's
// static cache: its write position, read here so that a captured CUDA graph replays any position).
template <typename T>
__device__ void forward(const T *x, T *y, int64_t rows, int64_t n_q, int64_t n_k, float scale,
                        int causal, const uint32_t *last_slot) {
  const int lane = threadIdx.x % 32;
  const int64_t r = (int64_t)blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32;
  if (r >= rows) return;
  const T *xr = x + r * n_k;
  T *yr = y + r * n_k;
  int64_t last = last_key(r, n_q, n_k, causal);
  if (last_slot != nullptr && (int64_t)*last_slot < last) last = (int64_t)*last_slot;
  // Online max and sum over this lane's keys (m = −∞ until the first one).
  float m = -INFINITY, l = 0.0f;
  for (int64_t j = lane; j <= last; j += 32) {
    const float v = scale * to_f(xr[j]);
    if (v > m) {
      l = l * expf(m - v) + 1.0f;
      m = v;
    } else if (v != -INFINITY) {  // a −∞ score adds nothing (and −∞ − −∞ would be NaN)
      l += expf(v - m);
    }
  }
  // Combine the lanes: rescale every partial sum to the row maximum.
  const float row_max = warp_max(m);
  // (a lane that saw no key has l = 0; one that saw a NaN has l = NaN, which must reach the sum)
  const float row_sum = warp_sum(l == 0.0f ? 0.0f : l * expf(m - row_max));
  const float inv = 1.0f / row_sum;
  for (int64_t j = lane; j < n_k; j += 32) {
    store(j <= last ? expf(scale * to_f(xr[j]) - row_max) * inv : 0.0f, yr + j);
  }
}

template <typename T>
__device__ void backward(const T *y, const T *g, T *dx, int64_t rows, int64_t n_q, int64_t n_k,
                         float scale, int causal) {
  const int lane = threadIdx.x % 32;
  const int64_t r = (int64_t)blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32;
  if (r >= rows) return;
  const T *yr = y + r * n_k, *gr = g + r * n_k;
  T *dr = dx + r * n_k;
  const int64_t last = last_key(r, n_q, n_k, causal);
  float dot = 0.0f;
  for (int64_t j = lane; j <= last; j += 32) dot += to_f(yr[j]) * to_f(gr[j]);
  dot = warp_sum(dot);
  for (int64_t j = lane; j < n_k; j += 32) {
    store(j <= last ? scale * to_f(yr[j]) * (to_f(gr[j]) - dot) : 0.0f, dr + j);
  }
}

#define SOFTMAX_KERNELS(T, NAME)                                                                    \
  extern "C" __global__ void causal_softmax_fwd_##NAME(const T *x, T *y, int64_t rows, int64_t n_q, \
                                                       int64_t n_k, float scale, int causal,        \
                                                       const uint32_t *last_slot) {                 \
    forward<T>(x, y, rows, n_q, n_k, scale, causal, last_slot);                                     \
  }                                                                                                 \
  extern "C" __global__ void causal_softmax_bwd_##NAME(const T *y, const T *g, T *dx, int64_t rows, \
                                                       int64_t n_q, int64_t n_k, float scale,       \
                                                       int causal) {                                \
    backward<T>(y, g, dx, rows, n_q, n_k, scale, causal);                                           \
  }

SOFTMAX_KERNELS(float, f32)
SOFTMAX_KERNELS(__nv_bfloat16, bf16)
SOFTMAX_KERNELS(__half, f16)

// The SwiGLU gate h = SiLU(a) ⊙ b as one op, forward and backward, for Candle (topic 8-06).
//
//   forward   h  = a·σ(a)·b                                   σ(a) = 1 / (1 + e^(−a))
//   backward  da = g·b·σ(a)·(1 + a·(1 − σ(a)))                d SiLU/da = σ(a) + a·σ(a)·(1 − σ(a))
//             db = g·a·σ(a)
//
// a, b, g, h (n elements) contiguous; the backward writes [da | db] (2n) into one buffer (a custom
// op has one output). f32 arithmetic, one rounding per stored value. Grid-stride loops.
//
// Build: nvcc --ptx -arch=compute_90 (build.rs).

#include "common.cuh"

__device__ __forceinline__ float sigmoid(float a) { return 1.0f / (1.0f + expf(-a)); }

// Each thread takes 16 bytes of each operand at a time (load16/store16) when every pointer is
// 16-byte aligned; the remainder (everything, for unaligned views) one element at a time.
template <typename T>
__device__ void forward(const T *a, const T *b, T *h, int64_t n) {
  constexpr int N = Pack<T>::N;
  const int64_t packs = (aligned16(a) && aligned16(b) && aligned16(h)) ? n / N : 0;
  GRID_STRIDE(p, packs) {
    float x[N], y[N], o[N];
    load16(a + p * N, x);
    load16(b + p * N, y);
#pragma unroll
    for (int k = 0; k < N; ++k) o[k] = x[k] * sigmoid(x[k]) * y[k];
    store16(o, h + p * N);
  }
  GRID_STRIDE(j, n - packs * N) {
    const int64_t i = packs * N + j;
    const float x = to_f(a[i]);
    store(x * sigmoid(x) * to_f(b[i]), h + i);
  }
}

template <typename T>
__device__ void backward(const T *a, const T *b, const T *g, T *dab, int64_t n) {
  constexpr int N = Pack<T>::N;
  const bool vec = aligned16(a) && aligned16(b) && aligned16(g) && aligned16(dab) && aligned16(dab + n);
  const int64_t packs = vec ? n / N : 0;
  GRID_STRIDE(p, packs) {
    float x[N], y[N], gi[N], da[N], db[N];
    load16(a + p * N, x);
    load16(b + p * N, y);
    load16(g + p * N, gi);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float s = sigmoid(x[k]);
      da[k] = gi[k] * y[k] * s * (1.0f + x[k] * (1.0f - s));
      db[k] = gi[k] * x[k] * s;
    }
    store16(da, dab + p * N);
    store16(db, dab + n + p * N);
  }
  GRID_STRIDE(j, n - packs * N) {
    const int64_t i = packs * N + j;
    const float x = to_f(a[i]), s = sigmoid(x), gi = to_f(g[i]);
    store(gi * to_f(b[i]) * s * (1.0f + x * (1.0f - s)), dab + i);
    store(gi * x * s, dab + n + i);
  }
}

#define SWIGLU_KERNELS(T, NAME)                                                                        \
  extern "C" __global__ void swiglu_fwd_##NAME(const T *a, const T *b, T *h, int64_t n) {            \
    forward<T>(a, b, h, n);                                                                            \
  }                                                                                                    \
  extern "C" __global__ void swiglu_bwd_##NAME(const T *a, const T *b, const T *g, T *dab, int64_t n) { \
    backward<T>(a, b, g, dab, n);                                                                      \
  }

SWIGLU_KERNELS(float, f32)
SWIGLU_KERNELS(__nv_bfloat16, bf16)
SWIGLU_KERNELS(__half, f16)

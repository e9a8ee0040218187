// Bias + GELU (GPT-2's tanh approximation) as one op, forward and backward, for Candle (8-06).
//
//   forward   y  = GELU(h + b)            GELU(x)  = ½·x·(1 + tanh u),  u = √(2/π)·(x + 0.044715·x³)
//   backward  dh = g·GELU′(h + b)         GELU′(x) = ½·(1 + tanh u) + ½·x·(1 − tanh²u)·√(2/π)·(1 + 3·0.044715·x²)
//
// h, g, y, dh: n contiguous elements, rows of `cols`; b: cols elements (element i adds b[i % cols]).
// The bias gradient (column sums of dh) is one GEMV on the Rust side. f32 arithmetic, one rounding
// per stored value. Grid-stride loops.
//
// Build: nvcc --ptx -arch=compute_90 (build.rs).

#include "common.cuh"

__device__ __forceinline__ float tanh_u(float x) {
  return tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x));
}

__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.0f + tanh_u(x)); }

__device__ __forceinline__ float gelu_slope(float x) {
  const float t = tanh_u(x);
  const float du = 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
  return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
}

template <typename T>
__device__ void forward(const T *h, const T *b, T *y, int64_t n, int64_t cols) {
  GRID_STRIDE(i, n) { store(gelu(to_f(h[i]) + to_f(b[i % cols])), y + i); }
}

template <typename T>
__device__ void backward(const T *h, const T *b, const T *g, T *dh, int64_t n, int64_t cols) {
  GRID_STRIDE(i, n) { store(to_f(g[i]) * gelu_slope(to_f(h[i]) + to_f(b[i % cols])), dh + i); }
}

#define GELU_KERNELS(T, NAME)                                                                          \
  extern "C" __global__ void bias_gelu_fwd_##NAME(const T *h, const T *b, T *y, int64_t n,            \
                                                  int64_t cols) {                                     \
    forward<T>(h, b, y, n, cols);                                                                      \
  }                                                                                                    \
  extern "C" __global__ void bias_gelu_bwd_##NAME(const T *h, const T *b, const T *g, T *dh,          \
                                                  int64_t n, int64_t cols) {                          \
    backward<T>(h, b, g, dh, n, cols);                                                                 \
  }

GELU_KERNELS(float, f32)
GELU_KERNELS(__nv_bfloat16, bf16)
GELU_KERNELS(__half, f16)

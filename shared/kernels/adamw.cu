// AdamW in place, for Candle (shared::adamw). Three element-wise kernels per parameter tensor
// instead of a dozen composed ops, and no new allocation:
//
//   adamw_moment   m ← β·m + (1 − β)·(s·g)          (first moment; s = gradient-clipping scale)
//                  v ← β·v + (1 − β)·(s·g)²         (second moment, square = 1)
//   adamw_update   θ ← θ·(1 − lr·λ) − lr · (m / c₁) / (√(v / c₂) + ε)      c₁,₂ = bias corrections
//
// Arithmetic in f32 (f64 for f64 tensors), one rounding per stored value. Grid-stride loops.
//
// Build: nvcc --ptx -arch=compute_90 (build.rs).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ double to_f(double x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ void store(float v, float *o) { *o = v; }
__device__ __forceinline__ void store(double v, double *o) { *o = v; }
__device__ __forceinline__ void store(float v, __nv_bfloat16 *o) { *o = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float v, __half *o) { *o = __float2half_rn(v); }

#define GRID_STRIDE(i, n) \
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

template <typename T, typename A>
__device__ void moment(T *m, const T *g, int64_t n, A beta, A scale, int square) {
  GRID_STRIDE(i, n) {
    A gi = scale * to_f(g[i]);
    if (square) gi = gi * gi;
    store(beta * to_f(m[i]) + (A(1) - beta) * gi, m + i);
  }
}

template <typename T, typename A>
__device__ void update(T *theta, const T *m, const T *v, int64_t n, A lr, A decay, A eps, A bc1, A bc2) {
  GRID_STRIDE(i, n) {
    const A step = (to_f(m[i]) / bc1) / (sqrt(to_f(v[i]) / bc2) + eps);
    store(to_f(theta[i]) * (A(1) - lr * decay) - lr * step, theta + i);
  }
}

#define ADAMW_KERNELS(T, A, NAME)                                                                        \
  extern "C" __global__ void adamw_moment_##NAME(T *m, const T *g, int64_t n, A beta, A scale,         \
                                                 int square) {                                          \
    moment<T, A>(m, g, n, beta, scale, square);                                                          \
  }                                                                                                      \
  extern "C" __global__ void adamw_update_##NAME(T *theta, const T *m, const T *v, int64_t n, A lr,    \
                                                 A decay, A eps, A bc1, A bc2) {                        \
    update<T, A>(theta, m, v, n, lr, decay, eps, bc1, bc2);                                             \
  }

ADAMW_KERNELS(float, float, f32)
ADAMW_KERNELS(double, double, f64)
ADAMW_KERNELS(__nv_bfloat16, float, bf16)
ADAMW_KERNELS(__half, float, f16)

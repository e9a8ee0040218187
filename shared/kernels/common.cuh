// Helpers every Module 08 kernel uses (shared/kernels, t0806, t0808): loads and stores in
// f32 arithmetic for each storage type, and the grid-stride loop. `build_kernels.rs` puts this
// folder on nvcc's include path.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// A stored value as the f32 (f64 for double) the arithmetic uses.
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ double to_f(double x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

// An f32 (f64) result rounded once to the storage type.
__device__ __forceinline__ void store(float v, float *o) { *o = v; }
__device__ __forceinline__ void store(double v, double *o) { *o = v; }
__device__ __forceinline__ void store(float v, __nv_bfloat16 *o) { *o = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float v, __half *o) { *o = __float2half_rn(v); }

// for (i = this thread's first index; i < n; i += every thread of the grid)
#define GRID_STRIDE(i, n) \
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

// ---- 16-byte vector access ----------------------------------------------------------------------
// An element-wise kernel that loads and stores one 2-byte value per thread leaves most of the
// memory system's width unused; loading 16 bytes at a time (8 bf16/f16 or 4 f32 values) is what
// lets such a kernel approach the card's bandwidth. The vector path needs every pointer 16-byte
// aligned (Candle's buffers are; views at an offset may not be): kernels check with aligned16 and
// fall back to one element at a time.

// Values of T in 16 bytes.
template <typename T>
struct Pack {
  static constexpr int N = 16 / sizeof(T);
};

__device__ __forceinline__ bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// N values at p (16-byte aligned) as f32.
template <typename T, int N = Pack<T>::N>
__device__ __forceinline__ void load16(const T *p, float (&out)[N]) {
  const uint4 raw = *reinterpret_cast<const uint4 *>(p);
  const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_f(e[k]);
}

// N f32 values rounded once to T and stored at p (16-byte aligned) in one 16-byte store.
template <typename T, int N = Pack<T>::N>
__device__ __forceinline__ void store16(const float (&v)[N], T *p) {
  uint4 raw;
  T *e = reinterpret_cast<T *>(&raw);
#pragma unroll
  for (int k = 0; k < N; ++k) store(v[k], e + k);
  *reinterpret_cast<uint4 *>(p) = raw;
}

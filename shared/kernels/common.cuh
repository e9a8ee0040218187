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

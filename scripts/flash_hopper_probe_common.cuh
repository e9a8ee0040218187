// Helpers shared by the standalone Hopper probes (scripts/flash_hopper_probe.cu, the forward, and
// scripts/flash_hopper_bwd_probe.cu, the backward): CUDA error checks, the TMA tensor maps the
// kernels take (built as src/cuda.rs builds them) and the fp32 forward reference. Include after
// the kernel file.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>

#define CHECK(x)                                                                        \
  do {                                                                                  \
    cudaError_t e = (x);                                                                \
    if (e != cudaSuccess) {                                                             \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      exit(1);                                                                          \
    }                                                                                   \
  } while (0)

typedef __nv_bfloat16 bf16;

// A 3-D map over (d, n, bh) bf16 with boxes of 64 columns x rows x 1, 128-byte swizzle.
static hopper::TensorMap make_map(const bf16* base, int d, int n, int bh, int rows) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  if (!encode) {
    cudaDriverEntryPointQueryResult q;
    CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", (void**)&encode, cudaEnableDefault, &q));
  }
  hopper::TensorMap m;
  cuuint64_t dims[3] = {(cuuint64_t)d, (cuuint64_t)n, (cuuint64_t)bh};
  cuuint64_t strides[2] = {(cuuint64_t)d * 2, (cuuint64_t)n * d * 2};
  cuuint32_t box[3] = {64, (cuuint32_t)rows, 1};
  cuuint32_t es[3] = {1, 1, 1};
  CUresult r = encode((CUtensorMap*)&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, (void*)base, dims, strides, box, es,
                      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    fprintf(stderr, "cuTensorMapEncodeTiled failed: %d\n", (int)r);
    exit(1);
  }
  return m;
}

// The reference: one thread per query row, fp32, two passes (max, then sum and output).
__global__ void reference_fwd(const bf16* Q, const bf16* K, const bf16* V, float* O, float* L, int n_q, int n_k, int d,
                              float scale, int causal, const int* kv_len) {
  const int bh = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n_q) return;
  const int n_kr = kv_len ? min(n_k, kv_len[bh]) : n_k;
  const bf16* q = Q + ((size_t)bh * n_q + i) * d;
  auto score = [&](int j) {
    const bf16* k = K + ((size_t)bh * n_k + j) * d;
    float s = 0.f;
    for (int c = 0; c < d; ++c) s += __bfloat162float(q[c]) * __bfloat162float(k[c]);
    return s * scale;
  };
  auto visible = [&](int j) { return j < n_kr && !(causal && j > i + n_k - n_q); };
  float m = -INFINITY;
  for (int j = 0; j < n_k; ++j)
    if (visible(j)) m = fmaxf(m, score(j));
  float l = 0.f, o[128] = {0.f};
  for (int j = 0; j < n_k; ++j) {
    if (!visible(j)) continue;
    const float p = expf(score(j) - m);
    l += p;
    for (int c = 0; c < d; ++c) o[c] += p * __bfloat162float(V[((size_t)bh * n_k + j) * d + c]);
  }
  for (int c = 0; c < d; ++c) O[((size_t)bh * n_q + i) * d + c] = l > 0.f ? o[c] / l : 0.f;
  L[(size_t)bh * n_q + i] = l > 0.f ? m + logf(l) : -INFINITY;
}

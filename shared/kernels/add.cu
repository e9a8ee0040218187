// out = a + b over n contiguous elements, 16 bytes per thread and step where the three buffers are
// aligned (the remainder, or everything, one element at a time), for Candle (shared::add). f32
// arithmetic, one rounding per stored value: the same values as Candle's own addition.
//
// Build: nvcc --ptx -arch=compute_90 (build.rs).

#include "common.cuh"

template <typename T>
__device__ void add(const T *a, const T *b, T *out, int64_t n) {
  constexpr int N = Pack<T>::N;
  const int64_t packs = (aligned16(a) && aligned16(b) && aligned16(out)) ? n / N : 0;
  GRID_STRIDE(p, packs) {
    float x[N], y[N];
    load16(a + p * N, x);
    load16(b + p * N, y);
#pragma unroll
    for (int k = 0; k < N; ++k) x[k] += y[k];
    store16(x, out + p * N);
  }
  GRID_STRIDE(j, n - packs * N) {
    const int64_t i = packs * N + j;
    store(to_f(a[i]) + to_f(b[i]), out + i);
  }
}

#define ADD_KERNEL(T, NAME)                                                                  \
  extern "C" __global__ void add_##NAME(const T *a, const T *b, T *out, int64_t n) { add<T>(a, b, out, n); }

ADD_KERNEL(float, f32)
ADD_KERNEL(__nv_bfloat16, bf16)
ADD_KERNEL(__half, f16)

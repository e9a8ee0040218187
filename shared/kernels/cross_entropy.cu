// Fused cross-entropy over a vocabulary, for Candle (shared::cross_entropy).
//
//   forward   nll[i] = lse_i − x[i, t_i],   lse_i = m_i + ln Σ_j exp(x[i, j] − m_i),  m_i = max_j x[i, j]
//   backward  dx[i, j] = (exp(x[i, j] − lse_i) − [j = t_i]) · g[i],       lse_i = nll[i] + x[i, t_i]
//
// x (rows, vocab) in f32/bf16/f16, t (rows,) u32, nll and g (rows,) f32. One block per row
// (grid-stride), reading the row 16 bytes at a time where it is aligned. The forward makes one pass over the row with an online max/sum (each thread
// keeps (m, s) and rescales s when m grows; the block merges the pairs the same way), so the
// logits are read once; the backward reads the row once more and writes the gradient once: no
// (rows, vocab) f32 copy, no intermediate. All arithmetic in f32. The backward needs no second
// reduction: lse is recovered from the forward's output.
//
// A target outside [0, vocab) gives nll = NaN (the training loop's NaN guard then stops) and a
// zero gradient row.
//
// Build: nvcc --ptx -arch=compute_90 (build.rs).

#include "common.cuh"

// Merge (m, s) with (m2, s2): both are "max and sum of exp(x − max)" of disjoint parts.
__device__ __forceinline__ void merge(float &m, float &s, float m2, float s2) {
  if (m2 > m) {
    s = s * __expf(m - m2) + s2;
    m = m2;
  } else if (m2 > -INFINITY) {
    s += s2 * __expf(m2 - m);
  }
}

// Block-wide merge of every thread's (m, s); the result is valid in every thread.
__device__ void block_merge(float &m, float &s) {
  __shared__ float sm[32], ss[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    merge(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // the shared arrays may still be read from the previous row
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  m = lane < warps ? sm[lane] : -INFINITY;
  s = lane < warps ? ss[lane] : 0.0f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    merge(m, s, m2, s2);
  }
}

// Folds one logit into a thread's (m, s). A NaN logit makes s NaN; the block merge may still
// drop a thread whose whole share is NaN or −inf (its m stays −inf), so a NaN logit is not sure
// to make the loss NaN, but it does make the backward's gradients NaN (and the step gate then
// skips the step).
__device__ __forceinline__ void fold(float &m, float &s, float v) {
  if (v > m) {
    s = s * __expf(m - v) + 1.0f;
    m = v;
  } else if (v > -INFINITY || v != v) {
    s += __expf(v - m);
  }
}

// Folds N logits at once: their max first (one rescale of s at most), then their exps.
template <int N>
__device__ __forceinline__ void fold_pack(float &m, float &s, const float (&v)[N]) {
  float pm = v[0];
#pragma unroll
  for (int k = 1; k < N; ++k) pm = fmaxf(pm, v[k]);
  if (pm > m) {
    s *= __expf(m - pm);
    m = pm;
  }
  // A −inf logit adds nothing (also while m is still −inf); fmaxf skips NaN, the sum keeps it.
#pragma unroll
  for (int k = 0; k < N; ++k) s += v[k] == -INFINITY ? 0.0f : __expf(v[k] - m);
}

// The logits of a row are read 16 bytes at a time when the row is 16-byte aligned (load16;
// vocab · sizeof(T) a multiple of 16, as 10,000 bf16 are), else one at a time.
template <typename T>
__device__ void forward(const T *x, const uint32_t *t, float *nll, int64_t rows, int64_t vocab) {
  constexpr int N = Pack<T>::N;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T *row = x + r * vocab;
    float m = -INFINITY, s = 0.0f;
    const int64_t packs = aligned16(row) ? vocab / N : 0;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      float v[N];
      load16(row + p * N, v);
      fold_pack(m, s, v);
    }
    for (int64_t j = packs * N + threadIdx.x; j < vocab; j += blockDim.x) fold(m, s, to_f(row[j]));
    block_merge(m, s);
    if (threadIdx.x == 0) {
      const uint32_t target = t[r];
      nll[r] = target < vocab ? m + logf(s) - to_f(row[target]) : NAN;
    }
  }
}

template <typename T>
__device__ void backward(const T *x, const uint32_t *t, const float *nll, const float *g, T *dx, int64_t rows,
                         int64_t vocab) {
  constexpr int N = Pack<T>::N;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T *row = x + r * vocab;
    T *drow = dx + r * vocab;
    const uint32_t target = t[r];
    const bool ok = target < vocab;
    const float lse = ok ? nll[r] + to_f(row[target]) : 0.0f;
    const float gr = ok ? g[r] : 0.0f;
    const int64_t packs = (aligned16(row) && aligned16(drow)) ? vocab / N : 0;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      float v[N];
      load16(row + p * N, v);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float prob = __expf(v[k] - lse);
        v[k] = ok ? (prob - (p * N + k == target ? 1.0f : 0.0f)) * gr : 0.0f;
      }
      store16(v, drow + p * N);
    }
    for (int64_t j = packs * N + threadIdx.x; j < vocab; j += blockDim.x) {
      const float p = __expf(to_f(row[j]) - lse);
      store(ok ? (p - (j == target ? 1.0f : 0.0f)) * gr : 0.0f, drow + j);
    }
  }
}

#define CE_KERNELS(T, NAME)                                                                            \
  extern "C" __global__ void cross_entropy_fwd_##NAME(const T *x, const uint32_t *t, float *nll,     \
                                                      int64_t rows, int64_t vocab) {                  \
    forward<T>(x, t, nll, rows, vocab);                                                                \
  }                                                                                                    \
  extern "C" __global__ void cross_entropy_bwd_##NAME(const T *x, const uint32_t *t, const float *nll, \
                                                      const float *g, T *dx, int64_t rows,            \
                                                      int64_t vocab) {                                \
    backward<T>(x, t, nll, g, dx, rows, vocab);                                                        \
  }

CE_KERNELS(float, f32)
CE_KERNELS(__nv_bfloat16, bf16)
CE_KERNELS(__half, f16)

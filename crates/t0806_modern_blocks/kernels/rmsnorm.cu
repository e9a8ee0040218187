// Fused RMSNorm, forward and backward, for Candle (topic 8-06).
//
//   y  = x · r ⊙ g,               r = 1 / sqrt(mean(x²) + eps)            (per row)
//   dx = r · (dy ⊙ g) − x · r³ · mean(dy ⊙ g ⊙ x)
//   dg = Σ_rows dy ⊙ x · r
//
// Layout: x, y, dy, dx (rows, d) contiguous; g, dg (d). Types f32, bf16, f16; every sum and
// every product is computed in fp32, the result rounded once to the storage type (the same
// contract as the composed version: "computed in f32 and cast back").
//
// One warp per row: the row's two passes (sum of squares, then scale) stay inside the warp, so
// the only synchronisation is a shuffle reduction. Each lane moves V elements (16 bytes) per
// load when d and the start offsets allow it (the *_v4 / *_v8 kernels), else one (*_v1).
//
// The backward recomputes r (the row is read anyway for mean(dy⊙g⊙x)), so the forward saves
// nothing. dg is a reduction over *rows*: each block accumulates the rows it handles into a
// d-float array in shared memory (shared-memory atomics: every warp adds a different row into
// the same columns; stored transposed, column p·V + i at i·(d/V) + p, so that the 32 lanes of
// a warp hit 32 consecutive words: no bank conflicts), writes it as one row of `partial (n_blocks, d)` f32, and
// rmsnorm_dg_reduce_* sums the partial rows column by column. The backward grid is therefore
// capped at (#SMs × resident blocks per SM): few partial rows, one wave.
// (The order of the shared-memory atomics varies from run to run: dg is not bitwise
// deterministic; dx and y are.)
//
// Build: nvcc --ptx -arch=compute_90 (build.rs).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to_f(float x) { return x; }
  static __device__ __forceinline__ float from_f(float x) { return x; }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
};

// V consecutive elements moved as one (16-byte for V = 16 / sizeof(T)) load or store.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

__device__ __forceinline__ float warp_sum(float s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Forward: one warp per row, rows strided over the grid.
// ---------------------------------------------------------------------------------------------
template <typename T, int V>
__device__ __forceinline__ void rmsnorm_fwd(const T* __restrict__ x, const T* __restrict__ g,
                                            T* __restrict__ y, int rows, int d, float eps) {
  typedef Pack<T, V> P;
  const int warps = blockDim.x >> 5;
  const int lane = threadIdx.x & 31;
  const int packs = d / V;
  const P* gp = reinterpret_cast<const P*>(g);
  for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += gridDim.x * warps) {
    const P* xp = reinterpret_cast<const P*>(x + (size_t)row * d);
    P* yp = reinterpret_cast<P*>(y + (size_t)row * d);
    float ss = 0.f;
    for (int p = lane; p < packs; p += 32) {
      const P a = xp[p];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float f = Cvt<T>::to_f(a.v[i]);
        ss = fmaf(f, f, ss);
      }
    }
    ss = warp_sum(ss);
    const float r = 1.0f / sqrtf(ss / (float)d + eps);  // IEEE sqrt and division
    for (int p = lane; p < packs; p += 32) {             // second read: L1/L2 hits
      const P a = xp[p];
      const P w = gp[p];
      P out;
#pragma unroll
      for (int i = 0; i < V; ++i) out.v[i] = Cvt<T>::from_f(Cvt<T>::to_f(a.v[i]) * r * Cvt<T>::to_f(w.v[i]));
      yp[p] = out;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward with the residual add in front: h = x + a (rounded to T, as a separate addition rounds
// it), y = RMSNorm(h) ⊙ g. Reads x and the branch a, writes h and y: one pass instead of the
// addition's (read x, a, write h) and the norm's (read h, write y). The second sweep recomputes h
// from x and a (cache hits) rather than reading it back. With the same vector width V as the
// separate norm (16-byte aligned rows), each lane sums the same elements in the same order: y is
// the separate path's bit for bit.
// ---------------------------------------------------------------------------------------------
// x + a rounded to T, as a float.
template <typename T>
__device__ __forceinline__ float add_rounded(T x, T a) {
  return Cvt<T>::to_f(Cvt<T>::from_f(Cvt<T>::to_f(x) + Cvt<T>::to_f(a)));
}

template <typename T, int V>
__device__ __forceinline__ void add_rmsnorm_fwd(const T* __restrict__ x, const T* __restrict__ a,
                                                const T* __restrict__ g, T* __restrict__ h,
                                                T* __restrict__ y, int rows, int d, float eps) {
  typedef Pack<T, V> P;
  const int warps = blockDim.x >> 5;
  const int lane = threadIdx.x & 31;
  const int packs = d / V;
  const P* gp = reinterpret_cast<const P*>(g);
  for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += gridDim.x * warps) {
    const P* xp = reinterpret_cast<const P*>(x + (size_t)row * d);
    const P* ap = reinterpret_cast<const P*>(a + (size_t)row * d);
    P* hp = reinterpret_cast<P*>(h + (size_t)row * d);
    P* yp = reinterpret_cast<P*>(y + (size_t)row * d);
    float ss = 0.f;
    for (int p = lane; p < packs; p += 32) {
      const P px = xp[p], pa = ap[p];
      P sum;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float f = add_rounded<T>(px.v[i], pa.v[i]);
        sum.v[i] = Cvt<T>::from_f(f);  // exact: f is already a T value
        ss = fmaf(f, f, ss);
      }
      hp[p] = sum;
    }
    ss = warp_sum(ss);
    const float r = 1.0f / sqrtf(ss / (float)d + eps);  // IEEE sqrt and division
    for (int p = lane; p < packs; p += 32) {
      const P px = xp[p], pa = ap[p];
      const P w = gp[p];
      P out;
#pragma unroll
      for (int i = 0; i < V; ++i)
        out.v[i] = Cvt<T>::from_f(add_rounded<T>(px.v[i], pa.v[i]) * r * Cvt<T>::to_f(w.v[i]));
      yp[p] = out;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, part 1: dx per row (one warp per row) and each block's partial dg.
// Dynamic shared memory: d floats.
// ---------------------------------------------------------------------------------------------
template <typename T, int V>
__device__ __forceinline__ void rmsnorm_bwd(const T* __restrict__ x, const T* __restrict__ g,
                                            const T* __restrict__ dy, T* __restrict__ dx,
                                            float* __restrict__ partial, int rows, int d, float eps) {
  typedef Pack<T, V> P;
  extern __shared__ float dg_s[];
  for (int j = threadIdx.x; j < d; j += blockDim.x) dg_s[j] = 0.f;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  const int lane = threadIdx.x & 31;
  const int packs = d / V;
  const P* gp = reinterpret_cast<const P*>(g);
  for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += gridDim.x * warps) {
    const P* xp = reinterpret_cast<const P*>(x + (size_t)row * d);
    const P* dyp = reinterpret_cast<const P*>(dy + (size_t)row * d);
    P* dxp = reinterpret_cast<P*>(dx + (size_t)row * d);
    // Pass 1: Σ x² and Σ dy·g·x.
    float ss = 0.f, dot = 0.f;
    for (int p = lane; p < packs; p += 32) {
      const P a = xp[p], w = gp[p], e = dyp[p];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float xf = Cvt<T>::to_f(a.v[i]);
        ss = fmaf(xf, xf, ss);
        dot = fmaf(Cvt<T>::to_f(e.v[i]) * Cvt<T>::to_f(w.v[i]), xf, dot);
      }
    }
    ss = warp_sum(ss);
    dot = warp_sum(dot);
    const float r = 1.0f / sqrtf(ss / (float)d + eps);
    const float c = r * r * r * dot / (float)d;  // dx = r·dy·g − c·x
    // Pass 2: dx, and dy·x·r into the block's dg.
    for (int p = lane; p < packs; p += 32) {
      const P a = xp[p], w = gp[p], e = dyp[p];
      P out;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float xf = Cvt<T>::to_f(a.v[i]);
        const float ef = Cvt<T>::to_f(e.v[i]);
        out.v[i] = Cvt<T>::from_f(r * ef * Cvt<T>::to_f(w.v[i]) - c * xf);
        atomicAdd(&dg_s[i * packs + p], ef * xf * r);  // column p·V + i, stored transposed
      }
      dxp[p] = out;
    }
  }
  __syncthreads();
  float* mine = partial + (size_t)blockIdx.x * d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) mine[j] = dg_s[(j % V) * packs + j / V];
}

// ---------------------------------------------------------------------------------------------
// Backward, part 2: dg[j] = Σ_b partial[b, j]. Block (32, 8): 32 columns, 8 strided row groups
// summed in registers, then across the 8 groups in shared memory.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void rmsnorm_dg_reduce(const float* __restrict__ partial, T* __restrict__ dg,
                                                  int n_parts, int d) {
  __shared__ float acc[8][33];
  const int j = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (j < d)
    for (int b = threadIdx.y; b < n_parts; b += 8) s += partial[(size_t)b * d + j];
  acc[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && j < d) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) t += acc[k][threadIdx.x];
    dg[j] = Cvt<T>::from_f(t);
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points: rmsnorm_{fwd,bwd}_{f32,bf16,f16}_v{1,V}, add_rmsnorm_fwd_{f32,bf16,f16}_v{1,V},
// rmsnorm_dg_reduce_{f32,bf16,f16}.
// ---------------------------------------------------------------------------------------------
#define RMSNORM_KERNELS(T, NAME, V)                                                                \
  extern "C" __global__ void rmsnorm_fwd_##NAME##_v1(const T* x, const T* g, T* y, int rows, int d, \
                                                     float eps) {                                  \
    rmsnorm_fwd<T, 1>(x, g, y, rows, d, eps);                                                      \
  }                                                                                                \
  extern "C" __global__ void rmsnorm_fwd_##NAME##_v##V(const T* x, const T* g, T* y, int rows,     \
                                                       int d, float eps) {                         \
    rmsnorm_fwd<T, V>(x, g, y, rows, d, eps);                                                      \
  }                                                                                                \
  extern "C" __global__ void add_rmsnorm_fwd_##NAME##_v1(const T* x, const T* a, const T* g, T* h,  \
                                                         T* y, int rows, int d, float eps) {       \
    add_rmsnorm_fwd<T, 1>(x, a, g, h, y, rows, d, eps);                                            \
  }                                                                                                \
  extern "C" __global__ void add_rmsnorm_fwd_##NAME##_v##V(const T* x, const T* a, const T* g,     \
                                                           T* h, T* y, int rows, int d,            \
                                                           float eps) {                            \
    add_rmsnorm_fwd<T, V>(x, a, g, h, y, rows, d, eps);                                            \
  }                                                                                                \
  extern "C" __global__ void rmsnorm_bwd_##NAME##_v1(const T* x, const T* g, const T* dy, T* dx,   \
                                                     float* partial, int rows, int d, float eps) { \
    rmsnorm_bwd<T, 1>(x, g, dy, dx, partial, rows, d, eps);                                        \
  }                                                                                                \
  extern "C" __global__ void rmsnorm_bwd_##NAME##_v##V(const T* x, const T* g, const T* dy, T* dx, \
                                                       float* partial, int rows, int d,            \
                                                       float eps) {                                \
    rmsnorm_bwd<T, V>(x, g, dy, dx, partial, rows, d, eps);                                        \
  }                                                                                                \
  extern "C" __global__ void rmsnorm_dg_reduce_##NAME(const float* partial, T* dg, int n_parts,     \
                                                      int d) {                                     \
    rmsnorm_dg_reduce<T>(partial, dg, n_parts, d);                                                 \
  }

RMSNORM_KERNELS(float, f32, 4)
RMSNORM_KERNELS(__nv_bfloat16, bf16, 8)
RMSNORM_KERNELS(__half, f16, 8)

// =============================================================================================
// Fused LayerNorm (8-04's norm, fused here beside RMSNorm): the same one-warp-per-row layout,
// one more reduction (the mean) and a bias.
//
//   y  = x̂ ⊙ g + b,               x̂ = (x − μ)·r,  r = 1 / sqrt(mean((x − μ)²) + eps)
//   dx = r · (dy⊙g − mean(dy⊙g) − x̂ · mean(dy⊙g⊙x̂))
//   dg = Σ_rows dy ⊙ x̂,           db = Σ_rows dy
//
// The backward's partial rows are 2d wide, [dg | db] (shared memory 2d floats, each half stored
// transposed as above), summed by rmsnorm_dg_reduce over width 2d into the packed [dg | db] tail.
// =============================================================================================

// μ and r of one row (three passes would read the row three times; the row is in L1 after the
// first): the two-pass mean and variance, as the composed LayerNorm computes them.
template <typename T, int V>
__device__ __forceinline__ void row_mean_rstd(const Pack<T, V>* xp, int packs, int lane, int d, float eps,
                                              float& mean, float& r) {
  float s = 0.f;
  for (int p = lane; p < packs; p += 32) {
    const Pack<T, V> a = xp[p];
#pragma unroll
    for (int i = 0; i < V; ++i) s += Cvt<T>::to_f(a.v[i]);
  }
  mean = warp_sum(s) / (float)d;
  float ss = 0.f;
  for (int p = lane; p < packs; p += 32) {
    const Pack<T, V> a = xp[p];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float c = Cvt<T>::to_f(a.v[i]) - mean;
      ss = fmaf(c, c, ss);
    }
  }
  r = 1.0f / sqrtf(warp_sum(ss) / (float)d + eps);
}

template <typename T, int V>
__device__ __forceinline__ void layernorm_fwd(const T* __restrict__ x, const T* __restrict__ g,
                                              const T* __restrict__ b, T* __restrict__ y, int rows, int d,
                                              float eps) {
  typedef Pack<T, V> P;
  const int warps = blockDim.x >> 5;
  const int lane = threadIdx.x & 31;
  const int packs = d / V;
  const P* gp = reinterpret_cast<const P*>(g);
  const P* bp = reinterpret_cast<const P*>(b);
  for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += gridDim.x * warps) {
    const P* xp = reinterpret_cast<const P*>(x + (size_t)row * d);
    P* yp = reinterpret_cast<P*>(y + (size_t)row * d);
    float mean, r;
    row_mean_rstd<T, V>(xp, packs, lane, d, eps, mean, r);
    for (int p = lane; p < packs; p += 32) {
      const P a = xp[p], w = gp[p], c = bp[p];
      P out;
#pragma unroll
      for (int i = 0; i < V; ++i)
        out.v[i] = Cvt<T>::from_f((Cvt<T>::to_f(a.v[i]) - mean) * r * Cvt<T>::to_f(w.v[i]) + Cvt<T>::to_f(c.v[i]));
      yp[p] = out;
    }
  }
}

// Dynamic shared memory: 2d floats ([dg | db], each half transposed).
template <typename T, int V>
__device__ __forceinline__ void layernorm_bwd(const T* __restrict__ x, const T* __restrict__ g,
                                              const T* __restrict__ dy, T* __restrict__ dx,
                                              float* __restrict__ partial, int rows, int d, float eps) {
  typedef Pack<T, V> P;
  extern __shared__ float s_mem[];
  float* dg_s = s_mem;
  float* db_s = s_mem + d;
  for (int j = threadIdx.x; j < 2 * d; j += blockDim.x) s_mem[j] = 0.f;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  const int lane = threadIdx.x & 31;
  const int packs = d / V;
  const P* gp = reinterpret_cast<const P*>(g);
  for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += gridDim.x * warps) {
    const P* xp = reinterpret_cast<const P*>(x + (size_t)row * d);
    const P* dyp = reinterpret_cast<const P*>(dy + (size_t)row * d);
    P* dxp = reinterpret_cast<P*>(dx + (size_t)row * d);
    float mean, r;
    row_mean_rstd<T, V>(xp, packs, lane, d, eps, mean, r);
    // Σ dy·g and Σ dy·g·x̂.
    float sum_dg = 0.f, dot = 0.f;
    for (int p = lane; p < packs; p += 32) {
      const P a = xp[p], w = gp[p], e = dyp[p];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float eg = Cvt<T>::to_f(e.v[i]) * Cvt<T>::to_f(w.v[i]);
        sum_dg += eg;
        dot = fmaf(eg, (Cvt<T>::to_f(a.v[i]) - mean) * r, dot);
      }
    }
    const float m1 = warp_sum(sum_dg) / (float)d;
    const float m2 = warp_sum(dot) / (float)d;
    for (int p = lane; p < packs; p += 32) {
      const P a = xp[p], w = gp[p], e = dyp[p];
      P out;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float xh = (Cvt<T>::to_f(a.v[i]) - mean) * r;
        const float ef = Cvt<T>::to_f(e.v[i]);
        out.v[i] = Cvt<T>::from_f(r * (ef * Cvt<T>::to_f(w.v[i]) - m1 - xh * m2));
        atomicAdd(&dg_s[i * packs + p], ef * xh);
        atomicAdd(&db_s[i * packs + p], ef);
      }
      dxp[p] = out;
    }
  }
  __syncthreads();
  float* mine = partial + (size_t)blockIdx.x * 2 * d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    mine[j] = dg_s[(j % V) * packs + j / V];
    mine[d + j] = db_s[(j % V) * packs + j / V];
  }
}

#define LAYERNORM_KERNELS(T, NAME, V)                                                                     \
  extern "C" __global__ void layernorm_fwd_##NAME##_v1(const T* x, const T* g, const T* b, T* y, int rows, \
                                                       int d, float eps) {                                \
    layernorm_fwd<T, 1>(x, g, b, y, rows, d, eps);                                                        \
  }                                                                                                       \
  extern "C" __global__ void layernorm_fwd_##NAME##_v##V(const T* x, const T* g, const T* b, T* y,        \
                                                         int rows, int d, float eps) {                    \
    layernorm_fwd<T, V>(x, g, b, y, rows, d, eps);                                                        \
  }                                                                                                       \
  extern "C" __global__ void layernorm_bwd_##NAME##_v1(const T* x, const T* g, const T* dy, T* dx,        \
                                                       float* partial, int rows, int d, float eps) {      \
    layernorm_bwd<T, 1>(x, g, dy, dx, partial, rows, d, eps);                                             \
  }                                                                                                       \
  extern "C" __global__ void layernorm_bwd_##NAME##_v##V(const T* x, const T* g, const T* dy, T* dx,      \
                                                         float* partial, int rows, int d, float eps) {    \
    layernorm_bwd<T, V>(x, g, dy, dx, partial, rows, d, eps);                                             \
  }

LAYERNORM_KERNELS(float, f32, 4)
LAYERNORM_KERNELS(__nv_bfloat16, bf16, 8)
LAYERNORM_KERNELS(__half, f16, 8)

// FlashAttention forward and backward for Candle (topic 8-09).
//
// Layout: q (bh, n_q, d), k (bh, n_k, d), v (bh, n_k, d), o (bh, n_q, d), all contiguous;
// lse (bh, n_q) f32 holds the natural-log row log-sum-exp L = ln sum_j exp(s_ij).
// Causal masks are end-aligned: query i sees key j iff j <= i + (n_k - n_q).
// Key padding: kv_len (bh,) int, or null. Head bh has kv_len[bh] real keys; keys from there on
// are padding (seen by no query; loaded as zeros; their dK, dV written as 0). The causal offset
// stays n_k - n_q. Every kernel takes it as its last argument.
//
// Three families of kernels:
//   *_tc_{bf16,f16}_d{32,64,128}: tensor cores (mma.sync m16n8k16, fp32 accumulators), tiles in
//       shared memory filled with 16-byte cp.async (XOR-swizzled, conflict-free for ldmatrix).
//   *_tiled_f32_d{32,64}:        fp32 FMA, register-tiled (a 4x4 block of scores per thread);
//       f32 inputs with 16-byte-aligned rows.
//   *_simple_{f32,bf16,f16}:     fp32 FMA, one score per thread at a time, any d <= 128; the rest.
// Scores are handled in the log2 domain: x = s * scale * log2(e), p = exp2(x - m).
//
// Build: nvcc --ptx -arch=compute_90 (build.rs). See notes/flash-attention.md for versions.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define LOG2E_F 1.4426950408889634f
#define LN2_F 0.6931471805599453f

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// ---------------------------------------------------------------------------------------------
// PTX helpers
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes = 0 writes zeros (rows past the end).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool pred) {
  const int n = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Four 8x8 b16 matrices; lane l supplies the address of row (l % 8) of matrix (l / 8).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// dst[0] += a, dst[1] += b in one 8-byte reduction (sm_90), dst 8-byte aligned.
__device__ __forceinline__ void red_add_v2(float* dst, float a, float b) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(a), "f"(b) : "memory");
}

// Per-type conversions and the tensor-core instruction.
template <typename T>
struct Ops;

template <>
struct Ops<float> {
  static __device__ __forceinline__ float to_f(float x) { return x; }
  static __device__ __forceinline__ float from_f(float x) { return x; }
};

template <>
struct Ops<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
  // Two floats -> one register of two bf16 (the first in the low half).
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  // d += a * b  (16x8 += 16x16 * 16x8), fp32 accumulators.
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Ops<__half> {
  static __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Element offset of (row, col) in a [rows][D] shared tile whose 16-byte chunks are XOR-swizzled
// by the row: the 8 rows an ldmatrix reads land in 8 different bank groups.
//   D >= 64: a row spans 8+ chunks; chunk c of row r goes to slot c ^ (r % 8).
//   D == 32: a row is 4 chunks (64 bytes), two rows share a 128-byte bank line; chunk c of row r
//            goes to slot c ^ ((r / 2) % 4), so rows r..r+7 use the two halves x four slots.
template <int D>
__device__ __forceinline__ int swz(int row, int col) {
  static_assert(D == 32 || D % 64 == 0, "tile rows of 32 or a multiple of 64 elements");
  const int key = D >= 64 ? (row & 7) : ((row >> 1) & 3);
  return row * D + ((((col >> 3) ^ key)) << 3) + (col & 7);
}

// Rows [row0, row0 + ROWS) of a (n_rows, D) matrix into a swizzled shared tile, 16 bytes per
// thread per step, consecutive threads on consecutive chunks (coalesced); rows >= n_rows -> 0.
template <typename T, int D, int ROWS, int NT>
__device__ __forceinline__ void load_tile(T* s, const T* g, int row0, int n_rows, int tid) {
  constexpr int CH = D / 8;
  constexpr int STEPS = (ROWS * CH + NT - 1) / NT;
#pragma unroll
  for (int it = 0; it < STEPS; ++it) {
    const int idx = it * NT + tid;
    if (ROWS * CH % NT == 0 || idx < ROWS * CH) {
      const int r = idx / CH, c = idx % CH;
      const int gr = row0 + r;
      const bool ok = gr < n_rows;
      const T* src = g + (size_t)(ok ? gr : 0) * D + c * 8;
      cp_async16(smem_u32(s + swz<D>(r, c * 8)), src, ok);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward, tensor cores. One CTA = BR = 16*NW query rows of one (batch, head); warp w owns rows
// 16w..16w+15 (Q fragments stay in registers). Key tiles of BC = 64: S = Q K^T (mma), online
// softmax on the accumulators, O += P V (P reused from the accumulators as the A operand).
// Pipeline: V_j loads while S_j is computed; K_{j+1} loads while P_j V_j is computed.
// ---------------------------------------------------------------------------------------------
template <typename T, int D, int NW>
__device__ __forceinline__ void fwd_tc(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
                                       T* __restrict__ O, float* __restrict__ LSE, int n_q, int n_k,
                                       float scale_log2, int causal, const int* __restrict__ kv_len) {
  constexpr int BR = 16 * NW, BC = 64, NT = 32 * NW;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BR * D;
  T* sV = sK + BC * D;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates
  const int bh = blockIdx.y;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;  // longest causal blocks first
  const int offset = n_k - n_q;                       // causal: j <= i + offset (>= 0 then)
  const int n_kr = kv_len ? min(n_k, kv_len[bh]) : n_k;  // real keys: the rest is padding
  const T* Qh = Q + (size_t)bh * n_q * D;
  const T* Kh = K + (size_t)bh * n_k * D;
  const T* Vh = V + (size_t)bh * n_k * D;

  // Causal: keys past the last row's diagonal are never loaded (whole tiles skipped).
  const int kv_end = causal ? min(n_kr, q0 + BR + offset) : n_kr;
  const int n_tiles = (kv_end + BC - 1) / BC;

  load_tile<T, D, BR, NT>(sQ, Qh, q0, n_q, tid);
  load_tile<T, D, BC, NT>(sK, Kh, 0, n_kr, tid);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  uint32_t qf[D / 16][4];  // A fragments of this warp's 16 query rows
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ldmatrix_x4(qf[kk], smem_u32(sQ + swz<D>(warp * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8)));

  float oacc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) oacc[i][0] = oacc[i][1] = oacc[i][2] = oacc[i][3] = 0.f;
  float m_r[2] = {neg_inf(), neg_inf()};  // running max of rows g and g+8 (raw scores)
  float l_r[2] = {0.f, 0.f};              // running sum, partial over this thread's columns
  const int row_w0 = q0 + warp * 16;

  for (int j = 0; j < n_tiles; ++j) {
    const int k0 = j * BC;
    load_tile<T, D, BC, NT>(sV, Vh, k0, n_kr, tid);
    cp_async_commit();

    // S = Q K^T for this warp: 16 x 64
    float s[BC / 8][4];
#pragma unroll
    for (int i = 0; i < BC / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nn = 0; nn < BC / 16; ++nn) {
        uint32_t b[4];
        ldmatrix_x4(b, smem_u32(sK + swz<D>(nn * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 16 + (((lane >> 3) & 1) << 3))));
        Ops<T>::mma(s[2 * nn], qf[kk], b[0], b[1]);
        Ops<T>::mma(s[2 * nn + 1], qf[kk], b[2], b[3]);
      }
    }

    // Mask keys past the end and above the diagonal (raw scores: the scale is applied below,
    // inside the exponent, as one FFMA per element).
    const bool need_mask = (k0 + BC > n_kr) || (causal && (k0 + BC - 1 > row_w0 + offset));
    if (need_mask) {
#pragma unroll
      for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = k0 + n * 8 + 2 * t + (e & 1);
          const int row = row_w0 + g + ((e >> 1) << 3);
          if (col >= n_kr || (causal && col > row + offset)) s[n][e] = neg_inf();
        }
      }
    }

    // Online softmax: new max (raw units; scale > 0 keeps the order), rescale factor,
    // probabilities p = exp2(s·scale·log2e − m·scale·log2e) in place, running sums.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_r[r];
#pragma unroll
      for (int n = 0; n < BC / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_use = (mx == neg_inf()) ? 0.f : mx * scale_log2;  // a row with nothing visible yet
      const float alpha = exp2f(fmaf(m_r[r], scale_log2, -m_use));
      m_r[r] = mx;
      float rs = 0.f;
#pragma unroll
      for (int n = 0; n < BC / 8; ++n) {
        const float p0 = exp2f(fmaf(s[n][2 * r], scale_log2, -m_use));
        const float p1 = exp2f(fmaf(s[n][2 * r + 1], scale_log2, -m_use));
        s[n][2 * r] = p0;
        s[n][2 * r + 1] = p1;
        rs += p0 + p1;
      }
      l_r[r] = l_r[r] * alpha + rs;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        oacc[dn][2 * r] *= alpha;
        oacc[dn][2 * r + 1] *= alpha;
      }
    }

    cp_async_wait<0>();  // V_j has landed
    __syncthreads();     // ... for every thread; and every warp is done with sK
    if (j + 1 < n_tiles) {
      load_tile<T, D, BC, NT>(sK, Kh, k0 + BC, n_kr, tid);
      cp_async_commit();
    }

    // O += P V: P (16 x 64) from the score accumulators, V (64 x D) through ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      const uint32_t a[4] = {Ops<T>::pack2(s[2 * kk][0], s[2 * kk][1]), Ops<T>::pack2(s[2 * kk][2], s[2 * kk][3]),
                             Ops<T>::pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Ops<T>::pack2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, smem_u32(sV + swz<D>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), dn * 16 + ((lane >> 4) << 3))));
        Ops<T>::mma(oacc[2 * dn], a, b[0], b[1]);
        Ops<T>::mma(oacc[2 * dn + 1], a, b[2], b[3]);
      }
    }
    cp_async_wait<0>();  // K_{j+1} has landed
    __syncthreads();     // ... for every thread; and every warp is done with sV
  }

  // Epilogue: O = acc / l (staged through shared memory for 16-byte stores), L = m + log2 l.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_r[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    l_r[r] = l;
    inv[r] = l > 0.f ? 1.f / l : 0.f;
  }
  T* sO = sQ;  // Q lives in registers now
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + g + 8 * r;
      *reinterpret_cast<uint32_t*>(sO + swz<D>(row, dn * 8 + 2 * t)) =
          Ops<T>::pack2(oacc[dn][2 * r] * inv[r], oacc[dn][2 * r + 1] * inv[r]);
    }
  }
  if (t == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row_w0 + g + 8 * r;
      if (row < n_q) LSE[(size_t)bh * n_q + row] = (m_r[r] == neg_inf()) ? neg_inf() : (m_r[r] * scale_log2 + log2f(l_r[r])) * LN2_F;
    }
  }
  __syncthreads();
  constexpr int CH = D / 8;
#pragma unroll
  for (int it = 0; it < BR * CH / NT; ++it) {
    const int idx = it * NT + tid;
    const int r = idx / CH, c = idx % CH;
    const int gr = q0 + r;
    if (gr < n_q)
      *reinterpret_cast<uint4*>(O + ((size_t)bh * n_q + gr) * D + c * 8) = *reinterpret_cast<const uint4*>(sO + swz<D>(r, c * 8));
  }
}

#define FWD_TC(NAME, T, D, NW)                                                                           \
  extern "C" __global__ void __launch_bounds__(32 * NW) NAME(const T* Q, const T* K, const T* V, T* O, \
                                                             float* LSE, int n_q, int n_k, int d,      \
                                                             float scale_log2, int causal, const int* kv_len) {          \
    fwd_tc<T, D, NW>(Q, K, V, O, LSE, n_q, n_k, scale_log2, causal, kv_len);                                  \
  }
FWD_TC(flash_fwd_tc_bf16_d32, __nv_bfloat16, 32, 4)
FWD_TC(flash_fwd_tc_bf16_d64, __nv_bfloat16, 64, 4)
FWD_TC(flash_fwd_tc_bf16_d128, __nv_bfloat16, 128, 4)
FWD_TC(flash_fwd_tc_f16_d32, __half, 32, 4)
FWD_TC(flash_fwd_tc_f16_d64, __half, 64, 4)
FWD_TC(flash_fwd_tc_f16_d128, __half, 128, 4)

// ---------------------------------------------------------------------------------------------
// Backward, tensor cores (FlashAttention-2). One CTA = BC = 16*NW keys of one (batch, head); warp
// w owns keys 16w..16w+15 and their dK, dV accumulators (registers). Loop over query tiles of BR:
//   S^T = K Q^T, P^T = exp2(S^T*scale*log2e - L*log2e), dP^T = V dO^T, dS^T = P^T (dP^T - D),
//   dV += P^T dO, dK += dS^T Q, and dQ += dS K (through shared memory, atomics to an f32 buffer).
// The next query tile's loads overlap the dQ product.
// ---------------------------------------------------------------------------------------------
template <typename T, int D, int BR, int NW>
__device__ __forceinline__ void bwd_tc(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
                                       const T* __restrict__ dO, const float* __restrict__ LSE,
                                       const float* __restrict__ Dsum, float* __restrict__ dQacc, T* __restrict__ dK,
                                       T* __restrict__ dV, int n_q, int n_k, float scale, float scale_log2,
                                       int causal, const int* __restrict__ kv_len) {
  constexpr int BC = 16 * NW, NT = 32 * NW;
  constexpr int SDS = BR + 8;  // padded row of the dS^T tile (conflict-free ldmatrix.trans)
  constexpr int MT = BR / 16;  // m16 tiles of the dQ block
  static_assert(NW % MT == 0, "warps must split the dQ block evenly");
  constexpr int NPART = NW / MT, DP = D / NPART;  // dQ columns per warp
  static_assert(DP % 16 == 0, "each warp's dQ columns must be whole 16-column ldmatrix tiles");
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + BC * D;
  T* sQ = sV + BC * D;
  T* sdO = sQ + BR * D;
  T* sdS = sdO + BR * D;
  float* sL = reinterpret_cast<float*>(sdS + BC * SDS);
  float* sD = sL + BR;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int bh = blockIdx.y;
  const int k0 = blockIdx.x * BC;
  const int offset = n_k - n_q;
  const int n_kr = kv_len ? min(n_k, kv_len[bh]) : n_k;  // real keys: dK = dV = 0 beyond
  const T* Qh = Q + (size_t)bh * n_q * D;
  const T* Kh = K + (size_t)bh * n_k * D;
  const T* Vh = V + (size_t)bh * n_k * D;
  const T* dOh = dO + (size_t)bh * n_q * D;
  const float* Lh = LSE + (size_t)bh * n_q;
  const float* Dh = Dsum + (size_t)bh * n_q;
  float* dQh = dQacc + (size_t)bh * n_q * D;

  // Causal: queries before k0 - offset see none of these keys.
  const int i_first = causal ? max(0, k0 - offset) : 0;
  const int qb_first = i_first / BR;
  const int n_qb = (n_q + BR - 1) / BR;

  auto load_q_tile = [&](int qb) {
    const int i0 = qb * BR;
    load_tile<T, D, BR, NT>(sQ, Qh, i0, n_q, tid);
    load_tile<T, D, BR, NT>(sdO, dOh, i0, n_q, tid);
    for (int i = tid; i < BR; i += NT) {
      const bool ok = i0 + i < n_q;
      cp_async4(smem_u32(sL + i), Lh + (ok ? i0 + i : 0), ok);
      cp_async4(smem_u32(sD + i), Dh + (ok ? i0 + i : 0), ok);
    }
  };

  load_tile<T, D, BC, NT>(sK, Kh, k0, n_kr, tid);
  load_tile<T, D, BC, NT>(sV, Vh, k0, n_kr, tid);
  if (qb_first < n_qb) load_q_tile(qb_first);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  const int key_w0 = k0 + warp * 16;

  for (int qb = qb_first; qb < n_qb; ++qb) {
    const int i0 = qb * BR;
    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys: 16 x BR each.
    float st[BR / 8][4], dpt[BR / 8][4];
#pragma unroll
    for (int i = 0; i < BR / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[4], av[4];
      const int arow = warp * 16 + (lane & 15), acol = kk * 16 + (lane >> 4) * 8;
      ldmatrix_x4(ak, smem_u32(sK + swz<D>(arow, acol)));
      ldmatrix_x4(av, smem_u32(sV + swz<D>(arow, acol)));
#pragma unroll
      for (int nn = 0; nn < BR / 16; ++nn) {
        const int brow = nn * 16 + (lane & 7) + ((lane >> 4) << 3), bcol = kk * 16 + (((lane >> 3) & 1) << 3);
        uint32_t b[4];
        ldmatrix_x4(b, smem_u32(sQ + swz<D>(brow, bcol)));
        Ops<T>::mma(st[2 * nn], ak, b[0], b[1]);
        Ops<T>::mma(st[2 * nn + 1], ak, b[2], b[3]);
        ldmatrix_x4(b, smem_u32(sdO + swz<D>(brow, bcol)));
        Ops<T>::mma(dpt[2 * nn], av, b[0], b[1]);
        Ops<T>::mma(dpt[2 * nn + 1], av, b[2], b[3]);
      }
    }

    // P^T (recomputed from L) and dS^T = P^T (dP^T - D), masked where the pair does not exist.
    const bool need_mask = (i0 + BR > n_q) || (k0 + BC > n_kr) || (causal && (key_w0 + 15 > i0 + offset));
#pragma unroll
    for (int n = 0; n < BR / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = n * 8 + 2 * t + (e & 1);
        float p = exp2f(st[n][e] * scale_log2 - sL[qi] * LOG2E_F);
        if (need_mask) {
          const int key = key_w0 + g + ((e >> 1) << 3);
          const int q = i0 + qi;
          if (q >= n_q || key >= n_kr || (causal && key > q + offset)) p = 0.f;
        }
        st[n][e] = p;
        dpt[n][e] = p * (dpt[n][e] - sD[qi]);
      }
    }

    // dV += P^T dO and dK += dS^T Q: A from registers, B = dO / Q tiles through ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < BR / 16; ++kk) {
      const uint32_t ap[4] = {Ops<T>::pack2(st[2 * kk][0], st[2 * kk][1]), Ops<T>::pack2(st[2 * kk][2], st[2 * kk][3]),
                              Ops<T>::pack2(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                              Ops<T>::pack2(st[2 * kk + 1][2], st[2 * kk + 1][3])};
      const uint32_t ad[4] = {Ops<T>::pack2(dpt[2 * kk][0], dpt[2 * kk][1]), Ops<T>::pack2(dpt[2 * kk][2], dpt[2 * kk][3]),
                              Ops<T>::pack2(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                              Ops<T>::pack2(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        const int brow = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), bcol = dn * 16 + ((lane >> 4) << 3);
        uint32_t b[4];
        ldmatrix_x4_trans(b, smem_u32(sdO + swz<D>(brow, bcol)));
        Ops<T>::mma(dv[2 * dn], ap, b[0], b[1]);
        Ops<T>::mma(dv[2 * dn + 1], ap, b[2], b[3]);
        ldmatrix_x4_trans(b, smem_u32(sQ + swz<D>(brow, bcol)));
        Ops<T>::mma(dk[2 * dn], ad, b[0], b[1]);
        Ops<T>::mma(dk[2 * dn + 1], ad, b[2], b[3]);
      }
    }

    // dS^T -> shared memory [key][query] for the dQ product.
#pragma unroll
    for (int n = 0; n < BR / 8; ++n)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g + 8 * r) * SDS + n * 8 + 2 * t) =
            Ops<T>::pack2(dpt[n][2 * r], dpt[n][2 * r + 1]);
    __syncthreads();  // dS^T complete; every warp done with sQ, sdO, sL, sD

    if (qb + 1 < n_qb) {
      load_q_tile(qb + 1);
      cp_async_commit();
    }

    // dQ_i += dS K (BR x D): warp -> (m16 tile mt, DP columns); A = dS via ldmatrix.trans of dS^T.
    {
      const int mt = warp % MT, part = warp / MT;
      float dq[DP / 8][4];
#pragma unroll
      for (int i = 0; i < DP / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BC / 16; ++kk) {
        uint32_t a[4];
        ldmatrix_x4_trans(a, smem_u32(sdS + (kk * 16 + (lane & 7) + ((lane >> 4) << 3)) * SDS + mt * 16 + (((lane >> 3) & 1) << 3)));
#pragma unroll
        for (int dn = 0; dn < DP / 16; ++dn) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, smem_u32(sK + swz<D>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), part * DP + dn * 16 + ((lane >> 4) << 3))));
          Ops<T>::mma(dq[2 * dn], a, b[0], b[1]);
          Ops<T>::mma(dq[2 * dn + 1], a, b[2], b[3]);
        }
      }
#pragma unroll
      for (int dn = 0; dn < DP / 8; ++dn) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int q = i0 + mt * 16 + g + 8 * r;
          if (q < n_q) {
            red_add_v2(dQh + (size_t)q * D + part * DP + dn * 8 + 2 * t, dq[dn][2 * r], dq[dn][2 * r + 1]);
          }
        }
      }
    }
    cp_async_wait<0>();  // next Q, dO, L, D tiles have landed
    __syncthreads();     // ... for every thread; and every warp is done with sdS
  }

  // Epilogue: dK = scale * dS^T Q, dV = P^T dO, for the keys that exist.
  T* dKh = dK + (size_t)bh * n_k * D;
  T* dVh = dV + (size_t)bh * n_k * D;
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = key_w0 + g + 8 * r;
      if (key < n_k) {
        const size_t off = (size_t)key * D + dn * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(dKh + off) = Ops<T>::pack2(dk[dn][2 * r] * scale, dk[dn][2 * r + 1] * scale);
        *reinterpret_cast<uint32_t*>(dVh + off) = Ops<T>::pack2(dv[dn][2 * r], dv[dn][2 * r + 1]);
      }
    }
  }
}

#define BWD_TC(NAME, T, D, BR, NW)                                                                          \
  extern "C" __global__ void __launch_bounds__(32 * NW) NAME(                                               \
      const T* Q, const T* K, const T* V, const T* dO, const float* LSE, const float* Dsum, float* dQacc, \
      T* dK, T* dV, int n_q, int n_k, int d, float scale, float scale_log2, int causal, const int* kv_len) {                 \
    bwd_tc<T, D, BR, NW>(Q, K, V, dO, LSE, Dsum, dQacc, dK, dV, n_q, n_k, scale, scale_log2, causal, kv_len);     \
  }
BWD_TC(flash_bwd_tc_bf16_d32, __nv_bfloat16, 32, 64, 8)
BWD_TC(flash_bwd_tc_bf16_d64, __nv_bfloat16, 64, 64, 8)
BWD_TC(flash_bwd_tc_bf16_d128, __nv_bfloat16, 128, 32, 8)
BWD_TC(flash_bwd_tc_f16_d32, __half, 32, 64, 8)
BWD_TC(flash_bwd_tc_f16_d64, __half, 64, 64, 8)
BWD_TC(flash_bwd_tc_f16_d128, __half, 128, 32, 8)

// ---------------------------------------------------------------------------------------------
// Simple fp32-FMA kernels, any d <= 128 (f32 with other head sizes or misaligned rows, and low
// precision with other head sizes).
// Forward: CTA = 32 query rows x 8 threads per row; key tiles of 32 in padded shared memory.
// ---------------------------------------------------------------------------------------------
#define S_BR 32
#define S_BC 32
#define S_NT 256
#define S_DMAX 128
#define S_SP (S_DMAX + 1)  // padded row: the 8 threads of a row read 8 different banks

template <typename T>
__device__ __forceinline__ void fwd_simple(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
                                           T* __restrict__ O, float* __restrict__ LSE, int n_q, int n_k, int d,
                                           float scale_log2, int causal, const int* __restrict__ kv_len) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* sQ = reinterpret_cast<float*>(smem);
  float* sK = sQ + S_BR * S_SP;
  float* sV = sK + S_BC * S_SP;
  float* sP = sV + S_BC * S_SP;  // [S_BR][S_BC + 1]

  const int tid = threadIdx.x, r = tid >> 3, sub = tid & 7;
  const int bh = blockIdx.y;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * S_BR;
  const int offset = n_k - n_q;
  const int n_kr = kv_len ? min(n_k, kv_len[bh]) : n_k;
  const int row = q0 + r;
  const T* Qh = Q + (size_t)bh * n_q * d;
  const T* Kh = K + (size_t)bh * n_k * d;
  const T* Vh = V + (size_t)bh * n_k * d;

  for (int idx = tid; idx < S_BR * d; idx += S_NT) {
    const int rr = idx / d, c = idx % d;
    sQ[rr * S_SP + c] = (q0 + rr < n_q) ? Ops<T>::to_f(Qh[(size_t)(q0 + rr) * d + c]) : 0.f;
  }
  const int kv_end = causal ? min(n_kr, q0 + S_BR + offset) : n_kr;
  const int n_tiles = (kv_end + S_BC - 1) / S_BC;

  float o[S_DMAX / 8];
#pragma unroll
  for (int v = 0; v < S_DMAX / 8; ++v) o[v] = 0.f;
  float m = neg_inf(), l = 0.f;

  for (int j = 0; j < n_tiles; ++j) {
    const int k0 = j * S_BC;
    __syncthreads();  // previous tile fully used (and sQ written, first time)
    for (int idx = tid; idx < S_BC * d; idx += S_NT) {
      const int kr = idx / d, c = idx % d;
      const bool ok = k0 + kr < n_kr;
      sK[kr * S_SP + c] = ok ? Ops<T>::to_f(Kh[(size_t)(k0 + kr) * d + c]) : 0.f;
      sV[kr * S_SP + c] = ok ? Ops<T>::to_f(Vh[(size_t)(k0 + kr) * d + c]) : 0.f;
    }
    __syncthreads();

    float s[S_BC / 8];
    float mx = m;
#pragma unroll
    for (int u = 0; u < S_BC / 8; ++u) {
      const int kl = sub + 8 * u, key = k0 + kl;
      float acc = 0.f;
      for (int c = 0; c < d; ++c) acc = fmaf(sQ[r * S_SP + c], sK[kl * S_SP + c], acc);
      const bool ok = key < n_kr && !(causal && key > row + offset);
      s[u] = ok ? acc * scale_log2 : neg_inf();
      mx = fmaxf(mx, s[u]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
    const float m_use = (mx == neg_inf()) ? 0.f : mx;
    const float alpha = exp2f(m - m_use);
    m = mx;
    float ps = 0.f;
#pragma unroll
    for (int u = 0; u < S_BC / 8; ++u) {
      const float p = exp2f(s[u] - m_use);
      sP[r * (S_BC + 1) + sub + 8 * u] = p;
      ps += p;
    }
    l = l * alpha + ps;
    __syncwarp();
#pragma unroll
    for (int v = 0; v < S_DMAX / 8; ++v) {
      const int c = sub + 8 * v;
      if (c < d) {
        float acc = o[v] * alpha;
        for (int kl = 0; kl < S_BC; ++kl) acc = fmaf(sP[r * (S_BC + 1) + kl], sV[kl * S_SP + c], acc);
        o[v] = acc;
      }
    }
  }

  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  l += __shfl_xor_sync(0xffffffffu, l, 4);
  if (row < n_q) {
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int v = 0; v < S_DMAX / 8; ++v) {
      const int c = sub + 8 * v;
      if (c < d) O[((size_t)bh * n_q + row) * d + c] = Ops<T>::from_f(o[v] * inv);
    }
    if (sub == 0) LSE[(size_t)bh * n_q + row] = (m == neg_inf()) ? neg_inf() : (m + log2f(l)) * LN2_F;
  }
}

// Backward: CTA = 32 keys x 8 threads per key; query tiles of 32.
template <typename T>
__device__ __forceinline__ void bwd_simple(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
                                           const T* __restrict__ dO, const float* __restrict__ LSE,
                                           const float* __restrict__ Dsum, float* __restrict__ dQacc,
                                           T* __restrict__ dK, T* __restrict__ dV, int n_q, int n_k, int d,
                                           float scale, float scale_log2, int causal, const int* __restrict__ kv_len) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* sK = reinterpret_cast<float*>(smem);
  float* sV = sK + S_BC * S_SP;
  float* sQ = sV + S_BC * S_SP;
  float* sdO = sQ + S_BR * S_SP;
  float* sP = sdO + S_BR * S_SP;   // [key][query], S_BR + 1 wide
  float* sdS = sP + S_BC * (S_BR + 1);
  float* sL = sdS + S_BC * (S_BR + 1);
  float* sD = sL + S_BR;

  const int tid = threadIdx.x, jl = tid >> 3, sub = tid & 7;
  const int bh = blockIdx.y;
  const int k0 = blockIdx.x * S_BC;
  const int offset = n_k - n_q;
  const int n_kr = kv_len ? min(n_k, kv_len[bh]) : n_k;
  const int key = k0 + jl;
  const T* Qh = Q + (size_t)bh * n_q * d;
  const T* Kh = K + (size_t)bh * n_k * d;
  const T* Vh = V + (size_t)bh * n_k * d;
  const T* dOh = dO + (size_t)bh * n_q * d;

  for (int idx = tid; idx < S_BC * d; idx += S_NT) {
    const int kr = idx / d, c = idx % d;
    const bool ok = k0 + kr < n_kr;
    sK[kr * S_SP + c] = ok ? Ops<T>::to_f(Kh[(size_t)(k0 + kr) * d + c]) : 0.f;
    sV[kr * S_SP + c] = ok ? Ops<T>::to_f(Vh[(size_t)(k0 + kr) * d + c]) : 0.f;
  }
  const int i_first = causal ? max(0, k0 - offset) : 0;
  float dk[S_DMAX / 8], dv[S_DMAX / 8];
#pragma unroll
  for (int v = 0; v < S_DMAX / 8; ++v) dk[v] = dv[v] = 0.f;

  for (int i0 = (i_first / S_BR) * S_BR; i0 < n_q; i0 += S_BR) {
    __syncthreads();
    for (int idx = tid; idx < S_BR * d; idx += S_NT) {
      const int qr = idx / d, c = idx % d;
      const bool ok = i0 + qr < n_q;
      sQ[qr * S_SP + c] = ok ? Ops<T>::to_f(Qh[(size_t)(i0 + qr) * d + c]) : 0.f;
      sdO[qr * S_SP + c] = ok ? Ops<T>::to_f(dOh[(size_t)(i0 + qr) * d + c]) : 0.f;
    }
    for (int i = tid; i < S_BR; i += S_NT) {
      const bool ok = i0 + i < n_q;
      sL[i] = ok ? LSE[(size_t)bh * n_q + i0 + i] : 0.f;
      sD[i] = ok ? Dsum[(size_t)bh * n_q + i0 + i] : 0.f;
    }
    __syncthreads();

#pragma unroll
    for (int u = 0; u < S_BR / 8; ++u) {
      const int il = sub + 8 * u, q = i0 + il;
      float s = 0.f, dp = 0.f;
      for (int c = 0; c < d; ++c) {
        s = fmaf(sK[jl * S_SP + c], sQ[il * S_SP + c], s);
        dp = fmaf(sV[jl * S_SP + c], sdO[il * S_SP + c], dp);
      }
      const bool ok = q < n_q && key < n_kr && !(causal && key > q + offset);
      const float p = ok ? exp2f(s * scale_log2 - sL[il] * LOG2E_F) : 0.f;
      sP[jl * (S_BR + 1) + il] = p;
      sdS[jl * (S_BR + 1) + il] = p * (dp - sD[il]);
    }
    __syncthreads();

#pragma unroll
    for (int v = 0; v < S_DMAX / 8; ++v) {
      const int c = sub + 8 * v;
      if (c < d) {
        float av = dv[v], ak = dk[v];
        for (int il = 0; il < S_BR; ++il) {
          av = fmaf(sP[jl * (S_BR + 1) + il], sdO[il * S_SP + c], av);
          ak = fmaf(sdS[jl * (S_BR + 1) + il], sQ[il * S_SP + c], ak);
        }
        dv[v] = av;
        dk[v] = ak;
      }
    }
    // dQ: thread (query il = tid / 8, sub) sums over this CTA's keys.
    const int il = tid >> 3, q = i0 + il;
    if (q < n_q) {
#pragma unroll
      for (int v = 0; v < S_DMAX / 8; ++v) {
        const int c = sub + 8 * v;
        if (c < d) {
          float acc = 0.f;
          for (int kl = 0; kl < S_BC; ++kl) acc = fmaf(sdS[kl * (S_BR + 1) + il], sK[kl * S_SP + c], acc);
          atomicAdd(dQacc + ((size_t)bh * n_q + q) * d + c, acc);
        }
      }
    }
  }

  if (key < n_k) {
#pragma unroll
    for (int v = 0; v < S_DMAX / 8; ++v) {
      const int c = sub + 8 * v;
      if (c < d) {
        dK[((size_t)bh * n_k + key) * d + c] = Ops<T>::from_f(dk[v] * scale);
        dV[((size_t)bh * n_k + key) * d + c] = Ops<T>::from_f(dv[v]);
      }
    }
  }
}

// The backward's two passes around its main kernel, memory-bound: each reads or writes every
// element once, so they use 16-byte accesses wherever the rows allow.

// D = rowsum(dO ∘ O): 8 lanes per row (4 rows per warp, 32 per block of 256 threads). Eight
// consecutive lanes read consecutive 16-byte chunks of one row when the rows are 16-bit with
// d % 8 == 0 and both inputs 16-byte aligned, consecutive elements otherwise; either way a warp
// reads a contiguous stretch. Three shuffles sum a row's lanes.
template <typename T>
__device__ __forceinline__ void row_dots(const T* dO, const T* O, float* Dsum, int rows, int d) {
  const int sub = threadIdx.x & 7, row = blockIdx.x * (blockDim.x >> 3) + (threadIdx.x >> 3);
  float acc = 0.f;
  if (row < rows) {
    const T* a = dO + (size_t)row * d;
    const T* b = O + (size_t)row * d;
    const bool chunks =
        sizeof(T) == 2 && d % 8 == 0 && ((reinterpret_cast<uintptr_t>(dO) | reinterpret_cast<uintptr_t>(O)) & 15) == 0;
    if (chunks) {
      for (int c = 8 * sub; c < d; c += 64) {
        const uint4 x = *reinterpret_cast<const uint4*>(a + c), y = *reinterpret_cast<const uint4*>(b + c);
        const T* xs = reinterpret_cast<const T*>(&x);
        const T* ys = reinterpret_cast<const T*>(&y);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc = fmaf(Ops<T>::to_f(xs[e]), Ops<T>::to_f(ys[e]), acc);
      }
    } else {
      for (int c = sub; c < d; c += 8) acc = fmaf(Ops<T>::to_f(a[c]), Ops<T>::to_f(b[c]), acc);
    }
  }
#pragma unroll
  for (int s = 4; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (row < rows && sub == 0) Dsum[row] = acc;
}

// dQ = scale · dQacc converted to T: four elements per thread and step (one 16-byte load, one
// 4·sizeof(T)-byte store) when both buffers allow it, the remainder one by one.
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};
template <typename T>
__device__ __forceinline__ void scale_dq(const float* dQacc, T* dQ, unsigned long long n, float scale) {
  const size_t step = (size_t)gridDim.x * blockDim.x, first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const bool quads =
      (reinterpret_cast<uintptr_t>(dQacc) & 15) == 0 && (reinterpret_cast<uintptr_t>(dQ) % sizeof(Quad<T>)) == 0;
  const size_t n4 = quads ? n / 4 : 0;
  for (size_t i = first; i < n4; i += step) {
    const float4 a = reinterpret_cast<const float4*>(dQacc)[i];
    Quad<T> q;
    q.v[0] = Ops<T>::from_f(a.x * scale);
    q.v[1] = Ops<T>::from_f(a.y * scale);
    q.v[2] = Ops<T>::from_f(a.z * scale);
    q.v[3] = Ops<T>::from_f(a.w * scale);
    reinterpret_cast<Quad<T>*>(dQ)[i] = q;
  }
  for (size_t i = 4 * n4 + first; i < n; i += step) dQ[i] = Ops<T>::from_f(dQacc[i] * scale);
}

#define SIMPLE(SUFFIX, T)                                                                                   \
  extern "C" __global__ void __launch_bounds__(S_NT) flash_fwd_simple_##SUFFIX(                             \
      const T* Q, const T* K, const T* V, T* O, float* LSE, int n_q, int n_k, int d, float scale_log2,      \
      int causal, const int* kv_len) {                                                                                         \
    fwd_simple<T>(Q, K, V, O, LSE, n_q, n_k, d, scale_log2, causal, kv_len);                                        \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(S_NT) flash_bwd_simple_##SUFFIX(                             \
      const T* Q, const T* K, const T* V, const T* dO, const float* LSE, const float* Dsum, float* dQacc, \
      T* dK, T* dV, int n_q, int n_k, int d, float scale, float scale_log2, int causal, const int* kv_len) {                 \
    bwd_simple<T>(Q, K, V, dO, LSE, Dsum, dQacc, dK, dV, n_q, n_k, d, scale, scale_log2, causal, kv_len);          \
  }                                                                                                         \
  extern "C" __global__ void flash_bwd_dot_##SUFFIX(const T* dO, const T* O, float* Dsum, int rows, int d) { \
    row_dots<T>(dO, O, Dsum, rows, d);                                                                      \
  }                                                                                                         \
  extern "C" __global__ void flash_bwd_dq_##SUFFIX(const float* dQacc, T* dQ, unsigned long long n, float scale) { \
    scale_dq<T>(dQacc, dQ, n, scale);                                                                       \
  }
SIMPLE(f32, float)
SIMPLE(bf16, __nv_bfloat16)
SIMPLE(f16, __half)

// ---------------------------------------------------------------------------------------------
// Register-tiled fp32-FMA kernels for f32 inputs with d = 32 or 64 (16-byte-aligned rows).
//
// The simple kernels above give each thread one score at a time and read both operands of every
// FMA from shared memory: two loads per FMA, ~6 TFLOP/s. Here a CTA of 256 threads (16 × 16:
// ty = tid / 16, tx = tid % 16) works on 64 × 64 tiles and each thread on a 4 × 4 block of them:
// for the scores two 16-byte loads feed 16 FMAs, and the products with V, dO, Q and K read the
// thread's d/16 columns as one 8- or 16-byte load. Rows in shared memory are padded
// to D + 4 floats (64 + 4 for the score tiles), so eight consecutive rows read as float4 hit
// eight different groups of four banks.
//
// Forward: thread (ty, tx) owns query rows 4·ty + i and the keys tx + 16·j of each key tile
// (i, j < 4) for the scores, then output columns tx·(D/16) … of its four rows. The 16 threads of
// a row are one half-warp: row maxima and sums are shuffles.
// Backward: CTA = 64 keys, query tiles of 64. Thread (ty, tx) owns keys 4·ty + i for Sᵀ, dPᵀ, dV and
// dK (queries tx + 16·j, columns tx·(D/16) …), then queries 4·ty + i for its dQ contribution
// (atomics into the f32 accumulator, as the other kernels).
// ---------------------------------------------------------------------------------------------
#define R_TILE 64
#define R_NT 256

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}
// C consecutive floats of a padded shared-memory row (C = 2 or 4) as one 8- or 16-byte load.
template <int C>
__device__ __forceinline__ void ld_cols(float (&x)[C], const float* p) {
  if constexpr (C == 4) {
    const float4 v = ld4(p);
    x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
  } else {
    static_assert(C == 2, "d = 32 or 64");
    const float2 v = *reinterpret_cast<const float2*>(p);
    x[0] = v.x, x[1] = v.y;
  }
}
__device__ __forceinline__ float half_warp_max(float v) {
  for (int o = 1; o < 16; o <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float half_warp_sum(float v) {
  for (int o = 1; o < 16; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// acc = A·Bᵀ for the thread's 4 × 4 block: rows 4·ty + i of A against rows tx + 16·j of B, both
// [64][D + 4] in shared memory, over the D columns; two 16-byte loads feed 16 FMAs.
template <int D>
__device__ __forceinline__ void dot_4x4(float (&acc)[4][4], const float* A, const float* B, int ty, int tx) {
  constexpr int SP = D + 4;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
#pragma unroll
  for (int k = 0; k < D; k += 4) {
    float4 a[4], b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = ld4(A + (4 * ty + i) * SP + k);
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = ld4(B + (tx + 16 * j) * SP + k);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = dot4(a[i], b[j], acc[i][j]);
  }
}

// rows row0 … row0+63 of a (n, D) matrix into shared memory [64][D + 4]; rows ≥ n are zeros.
template <int D>
__device__ __forceinline__ void load_tile(float* dst, const float* __restrict__ src, int row0, int n) {
  constexpr int V = D / 4;  // float4 per row
  for (int idx = threadIdx.x; idx < R_TILE * V; idx += R_NT) {
    const int r = idx / V, c = idx % V;
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row0 + r < n) x = ld4(src + (size_t)(row0 + r) * D + 4 * c);
    *reinterpret_cast<float4*>(dst + r * (D + 4) + 4 * c) = x;
  }
}

template <int D>
__device__ __forceinline__ void fwd_tiled(const float* __restrict__ Q, const float* __restrict__ K,
                                          const float* __restrict__ V, float* __restrict__ O,
                                          float* __restrict__ LSE, int n_q, int n_k, float scale_log2,
                                          int causal, const int* __restrict__ kv_len) {
  constexpr int SP = D + 4, PP = R_TILE + 4, C = D / 16;
  extern __shared__ __align__(128) unsigned char smem[];
  float* sQ = reinterpret_cast<float*>(smem);
  float* sK = sQ + R_TILE * SP;
  float* sV = sK + R_TILE * SP;
  float* sP = sV + R_TILE * SP;  // [query][key]

  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int bh = blockIdx.y;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * R_TILE;  // the longest causal rows first
  const int offset = n_k - n_q;
  const int n_kr = kv_len ? min(n_k, kv_len[bh]) : n_k;
  const float* Qh = Q + (size_t)bh * n_q * D;
  const float* Kh = K + (size_t)bh * n_k * D;
  const float* Vh = V + (size_t)bh * n_k * D;

  load_tile<D>(sQ, Qh, q0, n_q);
  const int kv_end = causal ? min(n_kr, q0 + R_TILE + offset) : n_kr;
  const int n_tiles = (kv_end + R_TILE - 1) / R_TILE;

  float o[4][C], m[4], l[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = neg_inf();
    l[i] = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) o[i][c] = 0.f;
  }

  for (int t = 0; t < n_tiles; ++t) {
    const int k0 = t * R_TILE;
    __syncthreads();  // the previous tile is used up (and sQ is written, the first time)
    load_tile<D>(sK, Kh, k0, n_kr);
    load_tile<D>(sV, Vh, k0, n_kr);
    __syncthreads();

    // S = Q·Kᵀ for rows 4ty+i, keys tx+16j
    float s[4][4];
    dot_4x4<D>(s, sQ, sK, ty, tx);

    // online softmax, row by row (the row's 64 keys are on the 16 threads of this half-warp)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = q0 + 4 * ty + i;
      float mx = m[i];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = k0 + tx + 16 * j;
        const bool ok = key < n_kr && !(causal && key > row + offset);
        s[i][j] = ok ? s[i][j] * scale_log2 : neg_inf();
        mx = fmaxf(mx, s[i][j]);
      }
      mx = half_warp_max(mx);
      const float m_use = (mx == neg_inf()) ? 0.f : mx;
      const float alpha = exp2f(m[i] - m_use);
      m[i] = mx;
      float ps = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float p = exp2f(s[i][j] - m_use);
        sP[(4 * ty + i) * PP + tx + 16 * j] = p;
        ps += p;
      }
      l[i] = l[i] * alpha + ps;
#pragma unroll
      for (int c = 0; c < C; ++c) o[i][c] *= alpha;
    }
    __syncwarp();  // sP rows are written and read by the same half-warp

    // O += P·V for rows 4ty+i, columns tx·C + c
#pragma unroll 4
    for (int kk = 0; kk < R_TILE; kk += 4) {
      float4 p[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) p[i] = ld4(sP + (4 * ty + i) * PP + kk);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        float v[C];
        ld_cols<C>(v, sV + (kk + u) * SP + tx * C);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float pu = u == 0 ? p[i].x : u == 1 ? p[i].y : u == 2 ? p[i].z : p[i].w;
#pragma unroll
          for (int c = 0; c < C; ++c) o[i][c] = fmaf(pu, v[c], o[i][c]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = q0 + 4 * ty + i;
    const float li = half_warp_sum(l[i]);
    if (row < n_q) {
      const float inv = li > 0.f ? 1.f / li : 0.f;
#pragma unroll
      for (int c = 0; c < C; ++c) O[((size_t)bh * n_q + row) * D + tx * C + c] = o[i][c] * inv;
      if (tx == 0) LSE[(size_t)bh * n_q + row] = (m[i] == neg_inf()) ? neg_inf() : (m[i] + log2f(li)) * LN2_F;
    }
  }
}

template <int D>
__device__ __forceinline__ void bwd_tiled(const float* __restrict__ Q, const float* __restrict__ K,
                                          const float* __restrict__ V, const float* __restrict__ dO,
                                          const float* __restrict__ LSE, const float* __restrict__ Dsum,
                                          float* __restrict__ dQacc, float* __restrict__ dK,
                                          float* __restrict__ dV, int n_q, int n_k, float scale,
                                          float scale_log2, int causal, const int* __restrict__ kv_len) {
  constexpr int SP = D + 4, PP = R_TILE + 4, C = D / 16;
  extern __shared__ __align__(128) unsigned char smem[];
  float* sK = reinterpret_cast<float*>(smem);
  float* sV = sK + R_TILE * SP;
  float* sQ = sV + R_TILE * SP;
  float* sdO = sQ + R_TILE * SP;
  float* sP = sdO + R_TILE * SP;  // [key][query]
  float* sdS = sP + R_TILE * PP;  // [key][query]
  float* sL = sdS + R_TILE * PP;
  float* sD = sL + R_TILE;

  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int bh = blockIdx.y;
  const int k0 = blockIdx.x * R_TILE;
  const int offset = n_k - n_q;
  const int n_kr = kv_len ? min(n_k, kv_len[bh]) : n_k;
  const float* Qh = Q + (size_t)bh * n_q * D;
  const float* dOh = dO + (size_t)bh * n_q * D;
  load_tile<D>(sK, K + (size_t)bh * n_k * D, k0, n_kr);
  load_tile<D>(sV, V + (size_t)bh * n_k * D, k0, n_kr);

  float dk[4][C], dv[4][C];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int c = 0; c < C; ++c) dk[i][c] = dv[i][c] = 0.f;

  const int i_first = causal ? max(0, k0 - offset) : 0;
  for (int i0 = (i_first / R_TILE) * R_TILE; i0 < n_q; i0 += R_TILE) {
    __syncthreads();  // the previous query tile is used up (sK, sV written, the first time)
    load_tile<D>(sQ, Qh, i0, n_q);
    load_tile<D>(sdO, dOh, i0, n_q);
    for (int r = tid; r < R_TILE; r += R_NT) {
      const bool ok = i0 + r < n_q;
      sL[r] = ok ? LSE[(size_t)bh * n_q + i0 + r] : 0.f;
      sD[r] = ok ? Dsum[(size_t)bh * n_q + i0 + r] : 0.f;
    }
    __syncthreads();

    // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for keys 4ty+i, queries tx+16j
    float s[4][4], dp[4][4];
    dot_4x4<D>(s, sK, sQ, ty, tx);
    dot_4x4<D>(dp, sV, sdO, ty, tx);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = k0 + 4 * ty + i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int ql = tx + 16 * j, q = i0 + ql;
        const bool ok = q < n_q && key < n_kr && !(causal && key > q + offset);
        const float p = ok ? exp2f(s[i][j] * scale_log2 - sL[ql] * LOG2E_F) : 0.f;
        sP[(4 * ty + i) * PP + ql] = p;
        sdS[(4 * ty + i) * PP + ql] = p * (dp[i][j] - sD[ql]);
      }
    }
    __syncthreads();

    // dV += P·dO and dK += dS·Q for keys 4ty+i, columns tx·C + c
#pragma unroll 4
    for (int qq = 0; qq < R_TILE; qq += 4) {
      float4 p[4], ds[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        p[i] = ld4(sP + (4 * ty + i) * PP + qq);
        ds[i] = ld4(sdS + (4 * ty + i) * PP + qq);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        float g[C], x[C];
        ld_cols<C>(g, sdO + (qq + u) * SP + tx * C);
        ld_cols<C>(x, sQ + (qq + u) * SP + tx * C);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float pu = u == 0 ? p[i].x : u == 1 ? p[i].y : u == 2 ? p[i].z : p[i].w;
          const float du = u == 0 ? ds[i].x : u == 1 ? ds[i].y : u == 2 ? ds[i].z : ds[i].w;
#pragma unroll
          for (int c = 0; c < C; ++c) {
            dv[i][c] = fmaf(pu, g[c], dv[i][c]);
            dk[i][c] = fmaf(du, x[c], dk[i][c]);
          }
        }
      }
    }

    // dQ += dS·K for queries 4ty+i, columns tx·C + c (this CTA's keys only)
    float dq[4][C];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int c = 0; c < C; ++c) dq[i][c] = 0.f;
#pragma unroll 4
    for (int kk = 0; kk < R_TILE; ++kk) {
      const float4 d4 = ld4(sdS + kk * PP + 4 * ty);  // dS[key kk][queries 4ty … 4ty+3]
      float kv[C];
      ld_cols<C>(kv, sK + kk * SP + tx * C);
#pragma unroll
      for (int c = 0; c < C; ++c) {
        dq[0][c] = fmaf(d4.x, kv[c], dq[0][c]);
        dq[1][c] = fmaf(d4.y, kv[c], dq[1][c]);
        dq[2][c] = fmaf(d4.z, kv[c], dq[2][c]);
        dq[3][c] = fmaf(d4.w, kv[c], dq[3][c]);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int q = i0 + 4 * ty + i;
      if (q < n_q) {
#pragma unroll
        for (int c = 0; c < C; ++c) atomicAdd(dQacc + ((size_t)bh * n_q + q) * D + tx * C + c, dq[i][c]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int key = k0 + 4 * ty + i;
    if (key < n_k) {
#pragma unroll
      for (int c = 0; c < C; ++c) {
        dK[((size_t)bh * n_k + key) * D + tx * C + c] = dk[i][c] * scale;
        dV[((size_t)bh * n_k + key) * D + tx * C + c] = dv[i][c];
      }
    }
  }
}

#define TILED(D)                                                                                            \
  extern "C" __global__ void __launch_bounds__(R_NT) flash_fwd_tiled_f32_d##D(                              \
      const float* Q, const float* K, const float* V, float* O, float* LSE, int n_q, int n_k, int d,       \
      float scale_log2, int causal, const int* kv_len) {                                                                       \
    fwd_tiled<D>(Q, K, V, O, LSE, n_q, n_k, scale_log2, causal, kv_len);                                            \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(R_NT, 2) flash_bwd_tiled_f32_d##D(                              \
      const float* Q, const float* K, const float* V, const float* dO, const float* LSE, const float* Dsum, \
      float* dQacc, float* dK, float* dV, int n_q, int n_k, int d, float scale, float scale_log2,          \
      int causal, const int* kv_len) {                                                                                         \
    bwd_tiled<D>(Q, K, V, dO, LSE, Dsum, dQacc, dK, dV, n_q, n_k, scale, scale_log2, causal, kv_len);              \
  }
TILED(32)
TILED(64)

// FlashAttention forward for Hopper (sm_90a): warpgroup MMA (`wgmma`) reading its operands
// straight from shared memory (topic 8-09, issue "FlashAttention for Hopper").
//
// Same contract as the forward kernels of flash_attn.cu: q (bh, n_q, d), k and v (bh, n_k, d),
// o (bh, n_q, d), all contiguous; lse (bh, n_q) f32 = natural-log row log-sum-exp; end-aligned
// causal mask (query i sees key j iff j <= i + n_k - n_q); kv_len (bh,) int or null (keys from
// kv_len[bh] on are padding). bf16/f16 inputs, d 64 or 128, fp32 accumulators.
//
// What changes against the mma.sync kernel:
//   * A warpgroup (4 warps, 128 threads) issues one `wgmma.mma_async` for a whole 64 × N × 16
//     product; the tensor cores read Q, K and V from shared memory through 64-bit matrix
//     descriptors instead of each warp loading fragments with ldmatrix. S = Q·Kᵀ is one wgmma per
//     16 columns of d (N = the key tile), O += P·V one wgmma per 16 keys (N = d) with P from
//     registers: the score accumulators of S, rounded to 16 bits, are already laid out as the A
//     operand.
//   * Shared tiles use the layout wgmma expects, "128-byte swizzle": a tile of ROWS × D is D/64
//     panels of ROWS rows × 64 elements (128 bytes); the 16-byte chunk c of row r sits at slot
//     c ^ (r % 8). Each panel starts on a 1024-byte boundary, where the pattern repeats.
//   * Q·Kᵀ reads both operands K-major (d contiguous). P·V reads V as it lies in memory, d
//     contiguous, which for B = V (keys × d) is N-major: the `imm-trans-b = 1` form.
//
// One CTA = NWG warpgroups; warpgroup w owns query rows 64w..64w+63 of the CTA's BR = 64·NWG.
// Key tiles of BC, double-buffered: K_{j+1} loads (cp.async) while S_j and its softmax run,
// V_{j+1} while P_j·V_j runs.
//
// Build: nvcc --ptx -arch=compute_90a (build.rs); the kernels need an sm_90 card.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace hopper {

constexpr float LN2 = 0.6931471805599453f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; pred = false writes zeros (rows past the end).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Shared-memory writes of this thread (generic proxy) visible to wgmma (async proxy).
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// wgmma bookkeeping: order register writes before the next wgmma, close a group of issued
// wgmmas, wait until at most N groups are in flight.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving reads or writes of registers that an in-flight wgmma owns
// across this point.
template <int NCH>
__device__ __forceinline__ void pin(float (&a)[NCH][4]) {
#pragma unroll
  for (int i = 0; i < NCH; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(a[i][e])::"memory");
}
template <int NCH>
__device__ __forceinline__ void pin(uint32_t (&a)[NCH][4]) {
#pragma unroll
  for (int i = 0; i < NCH; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[i][e])::"memory");
}

// Element offset of (row, col) in a ROWS-row tile in the 128-byte-swizzle panel layout.
template <int ROWS>
__device__ __forceinline__ int panel_offset(int row, int col) {
  return (col >> 6) * (ROWS * 64) + row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7);
}

// Matrix descriptor of a 128-byte-swizzled operand at shared address `addr`: bits 0-13 the
// address, 16-29 the leading-dimension byte offset, 32-45 the stride-dimension byte offset (all
// in 16-byte units), bits 62-63 = 1 (128-byte swizzle).
//   K-major (Q and K): stride = 1024 bytes from one group of 8 rows to the next; leading unused.
//   N-major (V):       leading = bytes from one 64-column panel to the next, stride = 1024 bytes
//                      from one group of 8 keys to the next.
__device__ __forceinline__ uint64_t descriptor(uint32_t addr, uint32_t leading, uint32_t stride) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)((leading & 0x3FFFF) >> 4) << 16) |
         ((uint64_t)((stride & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// The accumulator registers of one thread for an N-column wgmma: N/8 chunks of 4 floats. Chunk i,
// element e holds row 16·(warp in the warpgroup) + lane/4 + 8·(e/2), column 8i + 2·(lane%4) + e%2
// — the same places as mma.sync m16n8's accumulators, so the softmax code is unchanged.
#define ACC_32                                                                                                \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define ACC_64                                                                                                \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "   \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define F4(a, i) "+f"(a[i][0]), "+f"(a[i][1]), "+f"(a[i][2]), "+f"(a[i][3])
#define F_32(a) F4(a, 0), F4(a, 1), F4(a, 2), F4(a, 3), F4(a, 4), F4(a, 5), F4(a, 6), F4(a, 7)
#define F_64(a) \
  F_32(a), F4(a, 8), F4(a, 9), F4(a, 10), F4(a, 11), F4(a, 12), F4(a, 13), F4(a, 14), F4(a, 15)

// d (64 × N) = A·B (+ d when accumulate): A and B from shared memory, both K-major.
// d (64 × N) = A·B (+ d when accumulate): A from registers (4 × 2 halves per thread, mma.sync's
// A layout), B from shared memory N-major.
#define WGMMA_OPS(TY)                                                                                          \
  static __device__ __forceinline__ void ss(float (&d)[8][4], uint64_t a, uint64_t b, int accumulate) {              \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                  \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " ACC_32 ", %32, %33, p, 1, 1, 0, 0;\n}\n" \
                 : F_32(d)                                                                                     \
                 : "l"(a), "l"(b), "r"(accumulate));                                                          \
  }                                                                                                            \
  static __device__ __forceinline__ void ss(float (&d)[16][4], uint64_t a, uint64_t b, int accumulate) {             \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                  \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " ACC_64 ", %64, %65, p, 1, 1, 0, 0;\n}\n" \
                 : F_64(d)                                                                                     \
                 : "l"(a), "l"(b), "r"(accumulate));                                                          \
  }                                                                                                            \
  static __device__ __forceinline__ void rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t b) {                  \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                  \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " ACC_32                            \
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                              \
                 : F_32(d)                                                                                     \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));                               \
  }                                                                                                            \
  static __device__ __forceinline__ void rs(float (&d)[16][4], const uint32_t (&a)[4], uint64_t b) {                 \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                  \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " ACC_64                           \
                 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                              \
                 : F_64(d)                                                                                     \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));                               \
  }

template <typename T>
struct Ops;

template <>
struct Ops<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  WGMMA_OPS("bf16")
};

template <>
struct Ops<__half> {
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  WGMMA_OPS("f16")
};

// Rows [row0, row0 + ROWS) of a (n_rows, D) matrix into a panel-layout tile, 16 bytes per thread
// per step, consecutive threads on consecutive chunks of a row (coalesced); rows >= n_rows -> 0.
template <typename T, int D, int ROWS, int NT>
__device__ __forceinline__ void load_panels(T* s, const T* g, int row0, int n_rows, int tid) {
  constexpr int CH = D / 8;
  static_assert(ROWS * CH % NT == 0, "whole steps");
#pragma unroll
  for (int it = 0; it < ROWS * CH / NT; ++it) {
    const int idx = it * NT + tid;
    const int r = idx / CH, c = idx % CH;
    const int gr = row0 + r;
    const bool ok = gr < n_rows;
    cp_async16(smem_u32(s + panel_offset<ROWS>(r, c * 8)), g + (size_t)(ok ? gr : 0) * D + c * 8, ok);
  }
}

// Shared memory of one CTA in bytes: Q, two K tiles, two V tiles, and 1024 bytes of alignment.
template <typename T, int D, int BC, int NWG>
constexpr int fwd_smem_bytes() {
  return (64 * NWG * D + 4 * BC * D) * (int)sizeof(T) + 1024;
}

// Masks scores of keys past the end and above the diagonal (rows of this thread: row_w0 + g and
// row_w0 + g + 8; columns k0 + 8n + 2t + {0, 1}).
template <int BC>
__device__ __forceinline__ void mask_tile(float (&s)[BC / 8][4], int k0, int row_w0, int g, int t, int n_kr,
                                          int causal, int offset) {
  if (!((k0 + BC > n_kr) || (causal && (k0 + BC - 1 > row_w0 + offset)))) return;
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

// Online softmax of one tile, in place: s becomes p = exp2(s·scale·log2e − m·scale·log2e) with m
// the new running max of its row (a row's scores sit in the 4 threads of a quad); l is rescaled
// and gains this tile's row sums; alpha[r] is the factor O must be rescaled by.
template <int BC>
__device__ __forceinline__ void softmax_tile(float (&s)[BC / 8][4], float (&m_r)[2], float (&l_r)[2],
                                             float (&alpha)[2], float scale_log2) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = m_r[r];
#pragma unroll
    for (int n = 0; n < BC / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_use = (mx == neg_inf()) ? 0.f : mx * scale_log2;  // nothing visible yet
    alpha[r] = exp2f(fmaf(m_r[r], scale_log2, -m_use));
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
    l_r[r] = l_r[r] * alpha[r] + rs;
  }
}

// P in 16 bits, laid out as wgmma's register A operand (mma.sync's A layout): 16 keys per step.
template <typename T, int BC>
__device__ __forceinline__ void pack_p(uint32_t (&p)[BC / 16][4], const float (&s)[BC / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < BC / 16; ++kk) {
    p[kk][0] = Ops<T>::pack2(s[2 * kk][0], s[2 * kk][1]);
    p[kk][1] = Ops<T>::pack2(s[2 * kk][2], s[2 * kk][3]);
    p[kk][2] = Ops<T>::pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    p[kk][3] = Ops<T>::pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

// Issues S = Q Kᵀ for one key tile (not waited for): one wgmma per 16 columns of d, both operands
// K-major; 32 bytes further per step inside a panel, the next panel after 64 columns.
template <typename T, int D, int BC, int BR>
__device__ __forceinline__ void issue_scores(float (&s)[BC / 8][4], uint32_t q_base, uint32_t k_tile) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t in_panel = (kk & 3) * 32;
    const uint64_t a = descriptor(q_base + (kk >> 2) * BR * 128 + in_panel, 16, 1024);
    const uint64_t b = descriptor(k_tile + (kk >> 2) * BC * 128 + in_panel, 16, 1024);
    Ops<T>::ss(s, a, b, kk > 0);
  }
}

// Issues O += P V for one key tile (not waited for): V N-major, 16 keys (two groups of 8 rows,
// 2048 bytes) per step; its two 64-column panels (d 128) BC·128 bytes apart.
template <typename T, int D, int BC>
__device__ __forceinline__ void issue_pv(float (&o)[D / 8][4], const uint32_t (&p)[BC / 16][4], uint32_t v_tile) {
#pragma unroll
  for (int kk = 0; kk < BC / 16; ++kk) Ops<T>::rs(o, p[kk], descriptor(v_tile + kk * 16 * 128, BC * 128, 1024));
}

// The forward. Pipeline (FlashAttention-3's intra-warpgroup overlap): iteration j issues S_j =
// Q K_jᵀ and O += P_{j-1} V_{j-1} together, waits for S_j only, and computes S_j's softmax while
// the tensor cores still work on P_{j-1} V_{j-1}; only then does it wait for O, rescale it, and
// round P_j. K_{j+1} and V_j load during the whole iteration; one barrier per iteration.
template <typename T, int D, int BC, int NWG>
__device__ __forceinline__ void fwd_wgmma(const T* __restrict__ Q, const T* __restrict__ K,
                                          const T* __restrict__ V, T* __restrict__ O, float* __restrict__ LSE,
                                          int n_q, int n_k, float scale_log2, int causal,
                                          const int* __restrict__ kv_len) {
  constexpr int BR = 64 * NWG, NT = 128 * NWG, TILE_BYTES = BC * D * (int)sizeof(T);
  static_assert(D == 64 || D == 128, "d 64 or 128");
  static_assert(BC == 64 || BC == 128, "key tiles of 64 or 128");
  extern __shared__ unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023));
  T* sK = sQ + BR * D;      // two buffers of BC × D
  T* sV = sK + 2 * BC * D;  // two buffers of BC × D

  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int bh = blockIdx.y;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;  // longest causal blocks first
  const int offset = n_k - n_q;
  const int n_kr = kv_len ? min(n_k, kv_len[bh]) : n_k;
  const T* Qh = Q + (size_t)bh * n_q * D;
  const T* Kh = K + (size_t)bh * n_k * D;
  const T* Vh = V + (size_t)bh * n_k * D;

  // Causal: keys past the last row's diagonal are never loaded (whole tiles skipped).
  const int kv_end = causal ? min(n_kr, q0 + BR + offset) : n_kr;
  const int n_tiles = max(1, (kv_end + BC - 1) / BC);  // tile 0 is always run (all masked if empty)

  const uint32_t q_base = smem_u32(sQ) + wg * 64 * 128;  // this warpgroup's 64 rows of each panel
  const uint32_t k_base = smem_u32(sK), v_base = smem_u32(sV);
  const int row_w0 = q0 + wg * 64 + warp * 16;

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_r[2] = {neg_inf(), neg_inf()};  // running max of rows g and g+8 (raw scores)
  float l_r[2] = {0.f, 0.f};              // running sum over this thread's columns
  float alpha[2];
  float s[BC / 8][4];
  uint32_t p[BC / 16][4];

  // Tile 0: Q and K_0, then S_0 and its softmax while K_1 and V_0 load.
  load_panels<T, D, BR, NT>(sQ, Qh, q0, n_q, tid);
  load_panels<T, D, BC, NT>(sK, Kh, 0, n_kr, tid);
  cp_async_commit();
  cp_async_wait<0>();
  fence_async_shared();
  __syncthreads();
  if (n_tiles > 1) load_panels<T, D, BC, NT>(sK + BC * D, Kh, BC, n_kr, tid);
  load_panels<T, D, BC, NT>(sV, Vh, 0, n_kr, tid);
  cp_async_commit();
  wgmma_fence();
  issue_scores<T, D, BC, BR>(s, q_base, k_base);
  wgmma_commit();
  wgmma_wait<0>();
  pin(s);
  mask_tile<BC>(s, 0, row_w0, g, t, n_kr, causal, offset);
  softmax_tile<BC>(s, m_r, l_r, alpha, scale_log2);
  pack_p<T, BC>(p, s);

  for (int j = 1; j < n_tiles; ++j) {
    const int k0 = j * BC, buf = j & 1;
    cp_async_wait<0>();  // K_j and V_{j-1}
    fence_async_shared();
    __syncthreads();  // ... for every thread; every warpgroup is done with K_{j-1} and V_{j-2}
    if (j + 1 < n_tiles) load_panels<T, D, BC, NT>(sK + (buf ^ 1) * BC * D, Kh, k0 + BC, n_kr, tid);
    load_panels<T, D, BC, NT>(sV + buf * BC * D, Vh, k0, n_kr, tid);
    cp_async_commit();

    wgmma_fence();
    issue_scores<T, D, BC, BR>(s, q_base, k_base + buf * TILE_BYTES);
    wgmma_commit();
    issue_pv<T, D, BC>(o, p, v_base + (buf ^ 1) * TILE_BYTES);
    wgmma_commit();

    wgmma_wait<1>();  // S_j (P_{j-1} V_{j-1} may still run)
    pin(s);
    mask_tile<BC>(s, k0, row_w0, g, t, n_kr, causal, offset);
    softmax_tile<BC>(s, m_r, l_r, alpha, scale_log2);

    wgmma_wait<0>();  // O and the registers of P_{j-1} are free again
    pin(o);
    pin(p);
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      o[dn][0] *= alpha[0];
      o[dn][1] *= alpha[0];
      o[dn][2] *= alpha[1];
      o[dn][3] *= alpha[1];
    }
    pack_p<T, BC>(p, s);
  }

  // The last tile's O += P V.
  cp_async_wait<0>();
  fence_async_shared();
  __syncthreads();
  wgmma_fence();
  issue_pv<T, D, BC>(o, p, v_base + ((n_tiles - 1) & 1) * TILE_BYTES);
  wgmma_commit();
  wgmma_wait<0>();
  pin(o);
  pin(p);

  // Epilogue: O = acc / l staged through this warpgroup's rows of sQ (16-byte stores), L = m + ln l.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_r[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    l_r[r] = l;
    inv[r] = l > 0.f ? 1.f / l : 0.f;
  }
  __syncthreads();  // every wgmma that read sQ is done
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = wg * 64 + warp * 16 + g + 8 * r;
      *reinterpret_cast<uint32_t*>(sQ + panel_offset<BR>(row, dn * 8 + 2 * t)) =
          Ops<T>::pack2(o[dn][2 * r] * inv[r], o[dn][2 * r + 1] * inv[r]);
    }
  }
  if (t == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row_w0 + g + 8 * r;
      if (row < n_q)
        LSE[(size_t)bh * n_q + row] =
            (m_r[r] == neg_inf()) ? neg_inf() : (m_r[r] * scale_log2 + log2f(l_r[r])) * LN2;
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
      *reinterpret_cast<uint4*>(O + ((size_t)bh * n_q + gr) * D + c * 8) =
          *reinterpret_cast<const uint4*>(sQ + panel_offset<BR>(r, c * 8));
  }
}

}  // namespace hopper

// The kernels: flash_fwd_wgmma_{bf16,f16}_d{64,128}, two warpgroups (128 queries) per CTA, one CTA
// per SM. Key tiles of 64 at d 64 and of 128 at d 128: the fastest of the variants timed by
// scripts/flash_hopper_probe.cu on an H100 (d 64: 64 keys beat 128 by 1.1x; d 128: 128 beat 64 by
// 1.04x; one warpgroup per CTA with two or three CTAs per SM was slower at both).
#define FWD_WGMMA(NAME, T, D, BC, NWG, MIN_CTAS)                                                            \
  extern "C" __global__ void __launch_bounds__(128 * NWG, MIN_CTAS)                                         \
      NAME(const T* Q, const T* K, const T* V, T* O, float* LSE, int n_q, int n_k, int d, float scale_log2, \
           int causal, const int* kv_len) {                                                                 \
    hopper::fwd_wgmma<T, D, BC, NWG>(Q, K, V, O, LSE, n_q, n_k, scale_log2, causal, kv_len);                \
  }
FWD_WGMMA(flash_fwd_wgmma_bf16_d64, __nv_bfloat16, 64, 64, 2, 1)
FWD_WGMMA(flash_fwd_wgmma_bf16_d128, __nv_bfloat16, 128, 128, 2, 1)
FWD_WGMMA(flash_fwd_wgmma_f16_d64, __half, 64, 64, 2, 1)
FWD_WGMMA(flash_fwd_wgmma_f16_d128, __half, 128, 128, 2, 1)

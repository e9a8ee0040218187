// FlashAttention for Hopper (sm_90a), forward and backward: warpgroup MMA (`wgmma`) reading its
// operands from shared memory, the tensor-memory accelerator (TMA) filling it, and warp
// specialisation (topic 8-09).
//
// Same contract as the forward kernels of flash_attn.cu: q (bh, n_q, d), k and v (bh, n_k, d),
// o (bh, n_q, d), all contiguous; lse (bh, n_q) f32 = natural-log row log-sum-exp; end-aligned
// causal mask (query i sees key j iff j <= i + n_k - n_q); kv_len (bh,) int or null (keys from
// kv_len[bh] on are padding). bf16/f16 inputs, d 64 or 128, fp32 accumulators. Q, K and V come
// as TMA tensor maps (built by src/cuda.rs), O and L as pointers. One difference: the TMA copies
// whole tiles of the tensor, so key rows from kv_len[bh] to n_k are read as they are in memory,
// not as zeros; their probabilities are exactly 0, but a NaN or Inf there reaches O and dQ
// (0 · NaN).
// At d 64 and d 128 from 1,024 keys the backward runs here too (flash_bwd_wgmma_*_d64 and _d128:
// the same machinery, keys per CTA, queries streamed; the contract of flash_attn.cu's mma.sync
// backward); otherwise the backward is flash_attn.cu's.
//
// What changes against the mma.sync kernel:
//   * A warpgroup (4 warps, 128 threads) issues one `wgmma.mma_async` for a whole 64 × N × 16
//     product; the tensor cores read Q, K and V from shared memory through 64-bit matrix
//     descriptors instead of each warp loading fragments with ldmatrix. S = Q·Kᵀ is one wgmma per
//     16 columns of d (N = the key tile), O += P·V one wgmma per 16 keys (N = d) with P from
//     registers: the score accumulators of S, rounded to 16 bits, are already laid out as the A
//     operand. Both are asynchronous: a warpgroup computes S_j's softmax while the tensor cores
//     still run P_{j-1}·V_{j-1}.
//   * Shared tiles use the layout wgmma expects, "128-byte swizzle": a tile of ROWS × D is D/64
//     panels of ROWS rows × 64 elements (128 bytes); the 16-byte chunk c of row r sits at slot
//     c ^ (r % 8). Each panel starts on a 1024-byte boundary, where the pattern repeats. Q·Kᵀ
//     reads both operands K-major (d contiguous); P·V reads V as it lies in memory, d contiguous,
//     which for B = V (keys × d) is N-major: the `imm-trans-b = 1` form.
//   * The TMA copies a whole panel (64 columns × ROWS rows of one head) with one instruction,
//     swizzling on the way and writing zeros past the head's last row; completion is counted in
//     bytes on an mbarrier.
//   * Warp specialisation: warpgroup 0 is the producer (one thread issues every TMA copy, its
//     registers handed to the others with setmaxnreg); warpgroups 1 to NC are consumers (NC = 2,
//     or 3 at d 64 on long calls), each owning 64 query rows (in the backward: 64 keys). K and V
//     tiles go through rings of NS stages, each with a "full" barrier (the producer's bytes have
//     landed) and an "empty" one (every consumer is done with it). No barrier of the whole CTA
//     remains in the loop.
//   * Turns (the d 64 forwards): the consumers issue their products one after another, round robin
//     on named barriers (take_turn / pass_turn), so that each one's softmax runs under the
//     others' products.
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

// A descriptor `bytes` further on in shared memory (a multiple of 16). The address is the
// descriptor's low field and no shared address reaches its 256 KiB limit, so the step is one add
// of a constant to a descriptor built once per operand, not a descriptor rebuilt per step.
__device__ __forceinline__ uint64_t advance(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }
// A K-major operand of ROWS-row panels: 16 columns of d per step.
template <int ROWS>
__device__ __forceinline__ uint64_t k_major(uint32_t base, int kk) {
  return advance(descriptor(base, 16, 1024), (kk >> 2) * ROWS * 128 + (kk & 3) * 32);
}
// An MN-major operand whose reduction runs over its ROWS rows: 16 rows per step, 64-column panels
// ROWS·128 bytes apart.
template <int ROWS>
__device__ __forceinline__ uint64_t mn_major(uint32_t base, int kk) {
  return advance(descriptor(base, ROWS * 128, 1024), kk * 16 * 128);
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
  for (int kk = 0; kk < D / 16; ++kk) Ops<T>::ss(s, k_major<BR>(q_base, kk), k_major<BC>(k_tile, kk), kk > 0);
}

// Issues O += P V for one key tile (not waited for): V N-major, 16 keys (two groups of 8 rows,
// 2048 bytes) per step; its two 64-column panels (d 128) BC·128 bytes apart.
template <typename T, int D, int BC>
__device__ __forceinline__ void issue_pv(float (&o)[D / 8][4], const uint32_t (&p)[BC / 16][4], uint32_t v_tile) {
#pragma unroll
  for (int kk = 0; kk < BC / 16; ++kk) Ops<T>::rs(o, p[kk], mn_major<BC>(v_tile, kk));
}

// The register file (64K per SM, one CTA) shared out with setmaxnreg: two consumers take 240 per
// thread and leave the producer 24; three take 160 and leave it 32 (128 · 32 + 384 · 160 = 64K).
template <int NC>
__device__ __forceinline__ void producer_registers() {
  if constexpr (NC == 2) asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
  else asm volatile("setmaxnreg.dec.sync.aligned.u32 32;\n");
}
template <int NC>
__device__ __forceinline__ void consumer_registers() {
  static_assert(NC == 2 || NC == 3, "two or three consumer warpgroups");
  if constexpr (NC == 2) asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
  else asm volatile("setmaxnreg.inc.sync.aligned.u32 160;\n");
}

// Waits for the 128 threads of consumer warpgroup c (named barrier 1 + c; 0 is __syncthreads).
__device__ __forceinline__ void consumer_sync(int c) { asm volatile("bar.sync %0, 128;\n" ::"r"(1 + c) : "memory"); }

// Turns at the tensor cores for NC consumer warpgroups, round robin (named barriers 4 + c, 256
// threads: consumer c waits, the one before it arrives; ids 1..3 are consumer_sync's). Consumer c
// waits for its turn (take_turn), issues its products, then hands the turn on (pass_turn): the
// consumers' bursts of products alternate, so that while one consumer's products run the others
// compute their softmaxes, instead of all issuing at once and then all leaving the tensor cores
// idle through their softmaxes. The last consumer hands the first its first turn before any is
// taken, and keeps its last, so that every arrival meets a wait.
__device__ __forceinline__ void take_turn(int c) { asm volatile("bar.sync %0, 256;\n" ::"r"(4 + c) : "memory"); }
template <int NC>
__device__ __forceinline__ void pass_turn(int c) {
  asm volatile("bar.arrive %0, 256;\n" ::"r"(c + 1 == NC ? 4 : 5 + c) : "memory");
}

// The warpgroup of this thread, read from lane 0 so that the compiler knows it is the same in
// the whole warp: the shared addresses derived from it then stay in uniform registers, where
// wgmma takes its descriptors, instead of being moved there before every product.
__device__ __forceinline__ int warpgroup_index() { return __shfl_sync(0xffffffff, (int)threadIdx.x >> 7, 0); }

// Which query block of which head a forward CTA computes. The grid is (query blocks of one head,
// batch·heads), and CTAs start in the order of blockIdx.x + gridDim.x·blockIdx.y. With
// `heads_fastest` that linear index is read with the head varying fastest: block b of every head
// starts before block b + 1 of any, so under the causal mask the blocks with the most key tiles
// (block 0 is the last query block) all start first and the lightest end the grid, and the last
// wave is short; read head by head, the heaviest blocks of the last heads start late and run
// alone at the end. Measured on an H100 (reports/gpu-runs/h100-2026-12-07-c, call2/ against
// call1/): the d 64 causal forward 1.09× as fast at 4,096 queries and 1.06× at 16,384. The same
// order cost the d 128 and the unmasked calls up to 0.89× (heads no longer share L2 as well), and
// with hundreds of heads and few blocks each (1,024 keys, the backward probe) it was slower
// still, so the forward takes it only at d 64 with the causal mask from 4,096 queries, where it
// was measured to pay.
struct GridPlace {
  int block, bh;
};
__device__ __forceinline__ GridPlace grid_place(bool heads_fastest) {
  if (!heads_fastest) return {(int)blockIdx.x, (int)blockIdx.y};
  const unsigned linear = blockIdx.y * gridDim.x + blockIdx.x;
  return {(int)(linear / gridDim.y), (int)(linear % gridDim.y)};
}

// ---- TMA copies and mbarriers -------------------------------------------------------------
// An mbarrier is a 64-bit word in shared memory that completes a phase when its expected number
// of arrivals (and, with expect_tx, of bytes written by the TMA) has come; waiting on parity P
// returns once the phase of parity P has completed.

// A CUtensorMap (cuda.h), opaque: 128 bytes, 64-byte aligned, passed by value.
struct alignas(64) TensorMap {
  unsigned long long opaque[16];
};

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}
// One box of a 3-D tensor map (coordinates: column, row, head) into shared memory; completion
// counted in bytes on `bar`.
__device__ __forceinline__ void tma_load_3d(void* dst, const TensorMap* map, int c0, int c1, int c2, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar))
      : "memory");
}
// Rows [row0, row0 + ROWS) of head bh, all D columns, as D/64 boxes of 64 columns: the panels.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void tma_tile(T* s, const TensorMap* map, int row0, int bh, uint64_t* bar) {
#pragma unroll
  for (int p = 0; p < D / 64; ++p) tma_load_3d(s + p * ROWS * 64, map, p * 64, row0, bh, bar);
}

// Shared memory of one CTA in bytes: Q (64 rows per consumer warpgroup, NC of them), NS K and NS V
// tiles, 1024 bytes to align them, and the mbarriers (Q full; K and V full and empty per stage).
template <typename T, int D, int BC, int NS, int NC>
constexpr int fwd_smem_bytes() {
  return (64 * NC * D + 2 * NS * BC * D) * (int)sizeof(T) + 1024 + 8 * (1 + 4 * NS);
}

// The forward's shared memory: Q (64·NC rows), NS K and NS V tiles, each panel 1024-byte aligned,
// then the mbarriers (Q full; K and V full and empty per stage). Sizes: fwd_smem_bytes.
template <typename T, int D, int BC, int NS, int NC>
struct FwdShared {
  T *q, *k, *v;
  uint64_t *q_full, *k_full, *k_empty, *v_full, *v_empty;
  __device__ __forceinline__ explicit FwdShared(unsigned char* raw) {
    q = reinterpret_cast<T*>(raw + ((1024 - (smem_u32(raw) & 1023)) & 1023));
    k = q + 64 * NC * D;  // NS stages of BC × D
    v = k + NS * BC * D;  // NS stages of BC × D
    q_full = reinterpret_cast<uint64_t*>(v + NS * BC * D);
    k_full = q_full + 1;
    k_empty = k_full + NS;
    v_full = k_empty + NS;
    v_empty = v_full + NS;
  }
  // Full barriers wait for the producer's one arrival (and the bytes), empty ones for all 128·NC
  // consumer threads.
  __device__ __forceinline__ void init_barriers() const {
    mbar_init(q_full, 1);
    for (int s = 0; s < NS; ++s) {
      mbar_init(k_full + s, 1);
      mbar_init(v_full + s, 1);
      mbar_init(k_empty + s, 128 * NC);
      mbar_init(v_empty + s, 128 * NC);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
};

// A producer's claim on fill number j of a ring stage: wait until every consumer has released
// the stage's previous fill (none to wait for in the first NS), then announce the bytes coming.
template <int NS>
__device__ __forceinline__ void claim_stage(uint64_t* full, uint64_t* empty, int j, uint32_t bytes) {
  if (j >= NS) mbar_wait(empty, ((j / NS) & 1) ^ 1);
  mbar_expect_tx(full, bytes);
}

// The forward's producer (one thread): Q once, then K_j and V_j into stage j % NS of their rings.
template <typename T, int D, int BC, int NS, int NC>
__device__ __forceinline__ void fwd_producer(const FwdShared<T, D, BC, NS, NC>& sh, const TensorMap* tmQ,
                                             const TensorMap* tmK, const TensorMap* tmV, int q0, int bh,
                                             int n_tiles) {
  constexpr int TILE = BC * D, TILE_BYTES = TILE * (int)sizeof(T);
  mbar_expect_tx(sh.q_full, 64 * NC * D * sizeof(T));
  tma_tile<T, D, 64 * NC>(sh.q, tmQ, q0, bh, sh.q_full);
  for (int j = 0; j < n_tiles; ++j) {
    const int s = j % NS;
    claim_stage<NS>(sh.k_full + s, sh.k_empty + s, j, TILE_BYTES);
    tma_tile<T, D, BC>(sh.k + s * TILE, tmK, j * BC, bh, sh.k_full + s);
    claim_stage<NS>(sh.v_full + s, sh.v_empty + s, j, TILE_BYTES);
    tma_tile<T, D, BC>(sh.v + s * TILE, tmV, j * BC, bh, sh.v_full + s);
  }
}

// The forward's epilogue for consumer c: O = acc / l staged through this warpgroup's rows of sQ
// (only it read them) and written with 16-byte stores, rows before n_q; L = m + ln l per row.
template <typename T, int D, int BR>
__device__ __forceinline__ void store_o_and_lse(T* sQ, T* O, float* LSE, const float (&o)[D / 8][4],
                                                const float (&m_r)[2], float (&l_r)[2], float scale_log2, int bh,
                                                int q0, int row_w0, int n_q, int c, int ctid, int warp, int g,
                                                int t) {
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_r[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    l_r[r] = l;
    inv[r] = l > 0.f ? 1.f / l : 0.f;
  }
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = c * 64 + warp * 16 + g + 8 * r;
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
  consumer_sync(c);  // this warpgroup's rows are staged
  constexpr int CH = D / 8;
#pragma unroll
  for (int it = 0; it < 64 * CH / 128; ++it) {
    const int idx = it * 128 + (ctid & 127);
    const int r = c * 64 + idx / CH, col = idx % CH;
    const int gr = q0 + r;
    if (gr < n_q)
      *reinterpret_cast<uint4*>(O + ((size_t)bh * n_q + gr) * D + col * 8) =
          *reinterpret_cast<const uint4*>(sQ + panel_offset<BR>(r, col * 8));
  }
}

// The forward, with NC consumer warpgroups of 64 query rows each (BR = 64·NC queries per CTA) and
// the registers split between them and the producer (producer_registers, consumer_registers).
// The producer loads Q once and then K_j, V_j into stage j % NS as soon as every consumer has
// released that stage. Each consumer: S_0 and its softmax; then for every further tile j,
// S_j = Q K_jᵀ and O += P_{j-1} V_{j-1} issued together, S_j's softmax while the second
// still runs, then O rescaled and P_j rounded (FlashAttention-3's intra-warpgroup overlap); at
// the end the last P V, O / l and L = m + ln l. With TURNS the consumers also take turns at the
// tensor cores (take_turn / pass_turn; FlashAttention-3's ping-pong between warpgroups, here
// round robin): each issues its products only after the one before it has issued its own.
template <typename T, int D, int BC, int NS, int NC, bool TURNS = false>
__device__ __forceinline__ void fwd_wgmma(const TensorMap* tmQ, const TensorMap* tmK, const TensorMap* tmV,
                                             T* __restrict__ O, float* __restrict__ LSE, int n_q, int n_k,
                                             float scale_log2, int causal, const int* __restrict__ kv_len) {
  constexpr int BR = 64 * NC, TILE = BC * D, TILE_BYTES = TILE * (int)sizeof(T);
  extern __shared__ unsigned char smem_raw[];
  const FwdShared<T, D, BC, NS, NC> sh(smem_raw);

  const int tid = threadIdx.x, wg = warpgroup_index();
  const auto [block, bh] = grid_place(causal && D == 64 && n_q >= 4096);
  const int q0 = (gridDim.x - 1 - block) * BR;  // block 0: the last query rows, the most keys
  const int offset = n_k - n_q;
  const int n_kr = kv_len ? min(n_k, kv_len[bh]) : n_k;
  const int kv_end = causal ? min(n_kr, q0 + BR + offset) : n_kr;
  const int n_tiles = max(1, (kv_end + BC - 1) / BC);

  if (tid == 0) sh.init_barriers();
  __syncthreads();

  if (wg == 0) {
    // Producer: one thread issues every load; the others of the warpgroup have nothing to do.
    producer_registers<NC>();
    if (tid == 0) fwd_producer<T, D, BC, NS, NC>(sh, tmQ, tmK, tmV, q0, bh, n_tiles);
    return;
  }
  consumer_registers<NC>();

  // Consumers: warpgroup c = wg - 1 owns query rows 64c..64c+63.
  const int c = wg - 1, ctid = tid - 128, warp = (ctid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const uint32_t q_base = smem_u32(sh.q) + c * 64 * 128;
  const uint32_t k_base = smem_u32(sh.k), v_base = smem_u32(sh.v);
  const int row_w0 = q0 + c * 64 + warp * 16;

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_r[2] = {neg_inf(), neg_inf()};
  float l_r[2] = {0.f, 0.f};
  float alpha[2];
  float s[BC / 8][4];
  uint32_t p[BC / 16][4];

  mbar_wait(sh.q_full, 0);
  mbar_wait(sh.k_full, 0);
  if constexpr (TURNS) {
    if (c == NC - 1) pass_turn<NC>(c);  // consumer 0 takes the first turn
    take_turn(c);
  }
  wgmma_fence();
  issue_scores<T, D, BC, BR>(s, q_base, k_base);
  wgmma_commit();
  if constexpr (TURNS) pass_turn<NC>(c);
  wgmma_wait<0>();
  pin(s);
  mbar_arrive(sh.k_empty);
  mask_tile<BC>(s, 0, row_w0, g, t, n_kr, causal, offset);
  softmax_tile<BC>(s, m_r, l_r, alpha, scale_log2);
  pack_p<T, BC>(p, s);

  for (int j = 1; j < n_tiles; ++j) {
    const int sj = j % NS, sp = (j - 1) % NS;
    mbar_wait(sh.k_full + sj, (j / NS) & 1);
    if constexpr (TURNS) {  // V_{j-1} in too before the turn, so that no one holds it waiting for data
      mbar_wait(sh.v_full + sp, ((j - 1) / NS) & 1);
      take_turn(c);
    }
    wgmma_fence();
    issue_scores<T, D, BC, BR>(s, q_base, k_base + sj * TILE_BYTES);
    wgmma_commit();
    mbar_wait(sh.v_full + sp, ((j - 1) / NS) & 1);
    issue_pv<T, D, BC>(o, p, v_base + sp * TILE_BYTES);
    wgmma_commit();
    if constexpr (TURNS) pass_turn<NC>(c);

    wgmma_wait<1>();
    pin(s);
    mbar_arrive(sh.k_empty + sj);
    mask_tile<BC>(s, j * BC, row_w0, g, t, n_kr, causal, offset);
    softmax_tile<BC>(s, m_r, l_r, alpha, scale_log2);

    wgmma_wait<0>();
    pin(o);
    pin(p);
    mbar_arrive(sh.v_empty + sp);
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      o[dn][0] *= alpha[0];
      o[dn][1] *= alpha[0];
      o[dn][2] *= alpha[1];
      o[dn][3] *= alpha[1];
    }
    pack_p<T, BC>(p, s);
  }
  {
    const int sp = (n_tiles - 1) % NS;
    mbar_wait(sh.v_full + sp, ((n_tiles - 1) / NS) & 1);
    if constexpr (TURNS) take_turn(c);
    wgmma_fence();
    issue_pv<T, D, BC>(o, p, v_base + sp * TILE_BYTES);
    wgmma_commit();
    if (TURNS && c != NC - 1) pass_turn<NC>(c);  // the last consumer keeps its last turn
    wgmma_wait<0>();
    pin(o);
    pin(p);
    mbar_arrive(sh.v_empty + sp);
  }

  store_o_and_lse<T, D, BR>(sh.q, O, LSE, o, m_r, l_r, scale_log2, bh, q0, row_w0, n_q, c, ctid, warp, g, t);
}

// ---- Backward (d 64) -------------------------------------------------------------------------
// d (64 × N) = A·B, A from shared memory M-major (imm-trans-a = 1), B N-major (imm-trans-b = 1).
#define WGMMA_TT(TY)                                                                                          \
  static __device__ __forceinline__ void ss_tt(float (&d)[8][4], uint64_t a, uint64_t b, int accumulate) {    \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                  \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " ACC_32 ", %32, %33, p, 1, 1, 1, 1;\n}\n" \
                 : F_32(d)                                                                                     \
                 : "l"(a), "l"(b), "r"(accumulate));                                                          \
  }
template <typename T>
struct OpsT;
template <>
struct OpsT<__nv_bfloat16> {
  WGMMA_TT("bf16")
};
template <>
struct OpsT<__half> {
  WGMMA_TT("f16")
};

// At d 128 each consumer stages only its 64 columns of dQ (see bwd128_wgmma), rows padded to 68
// floats so that the 8 rows a warp's stores touch at once fall in different banks (16-byte
// aligned rows).
constexpr int DQ_STRIDE = 68;

// Shared memory of the backward: K and V (128 keys), NS stages of Q and dO (64 queries), two
// buffers of dSᵀ (128 keys × 64 queries), each consumer's f32 dQ tile (64 × D; at d 128 64 ×
// DQ_STRIDE), alignment, and the mbarriers (K/V full; Q/dO full and empty per stage; dSᵀ full and
// empty per buffer). At d 128 also a Pᵀ buffer (128 keys × 64 queries): 216,136 bytes at NS = 2
// (NS = 3 would exceed the 227 KiB a CTA may have). The dQ tiles serve the staged paths (both
// kernels as launched); the d 64 variant DQ_RED = true adds dQ from registers and leaves them
// unused.
template <typename T, int D, int NS>
constexpr int bwd_smem_bytes() {
  constexpr bool d128 = D == 128;
  return (2 * 128 * D + 2 * NS * 64 * D + (d128 ? 3 : 2) * 128 * 64) * (int)sizeof(T) +
         2 * 64 * (d128 ? DQ_STRIDE : D) * 4 + 1024 + 8 * (1 + 2 * NS + 4);
}

// Issues Sᵀ = K_c Q_iᵀ and dPᵀ = V_c dO_iᵀ (64 keys × BR queries each; not waited for).
template <typename T, int D, int BC, int BR>
__device__ __forceinline__ void issue_s_dp(float (&st)[BR / 8][4], float (&dpt)[BR / 8][4], uint32_t k_c, uint32_t v_c,
                                           uint32_t q_s, uint32_t do_s) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) Ops<T>::ss(st, k_major<BC>(k_c, kk), k_major<BR>(q_s, kk), kk > 0);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) Ops<T>::ss(dpt, k_major<BC>(v_c, kk), k_major<BR>(do_s, kk), kk > 0);
  wgmma_commit();
}

// Issues dV += Pᵀ dO_i and dK += dSᵀ Q_i (Pᵀ, dSᵀ from registers; dO_i, Q_i read N-major); not
// waited for.
template <typename T, int D, int BR>
__device__ __forceinline__ void issue_dv_dk(float (&dv)[D / 8][4], float (&dk)[D / 8][4],
                                            const uint32_t (&pa)[BR / 16][4], const uint32_t (&da)[BR / 16][4],
                                            uint32_t do_s, uint32_t q_s) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < BR / 16; ++kk) Ops<T>::rs(dv, pa[kk], mn_major<BR>(do_s, kk));
#pragma unroll
  for (int kk = 0; kk < BR / 16; ++kk) Ops<T>::rs(dk, da[kk], mn_major<BR>(q_s, kk));
  wgmma_commit();
}

// Issues dQ_i = dS_i K over the CTA's BC keys (dSᵀ read M-major from shared memory, K N-major);
// not waited for.
template <typename T, int D, int BC>
__device__ __forceinline__ void issue_dq(float (&dq)[D / 8][4], uint32_t ds_b, uint32_t k_all) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < BC / 16; ++kk) OpsT<T>::ss_tt(dq, mn_major<BC>(ds_b, kk), mn_major<BC>(k_all, kk), kk > 0);
  wgmma_commit();
}

// The backward's shared memory: K and V (128 keys), NS stages of Q and dO (64 queries), at d 128
// a Pᵀ buffer (128 keys × 64 queries), two buffers of dSᵀ (128 keys × 64 queries), each
// consumer's f32 dQ staging (64 rows of DQ_ROW floats), then the mbarriers: K/V full; Q/dO full
// and empty per stage; per dSᵀ buffer "full" (one arrival per consumer: both halves are in) and
// "empty" (at d 64 the owner's 128 threads, at d 128 both consumers' 256: the dQ products that
// read the buffer are done). Sizes: bwd_smem_bytes.
template <typename T, int D, int NS>
struct BwdShared {
  static constexpr bool D128 = D == 128;
  static constexpr int DQ_ROW = D128 ? DQ_STRIDE : D;  // a consumer's dQ staging row, in floats
  T *k, *v, *q, *d_o, *pt, *ds;
  float* dq;
  uint64_t *kv_full, *q_full, *q_empty, *ds_full, *ds_empty;
  __device__ __forceinline__ explicit BwdShared(unsigned char* raw) {
    k = reinterpret_cast<T*>(raw + ((1024 - (smem_u32(raw) & 1023)) & 1023));
    v = k + 128 * D;
    q = v + 128 * D;                        // NS stages of 64 × D
    d_o = q + NS * 64 * D;                  // NS stages of 64 × D
    pt = d_o + NS * 64 * D;                 // d 128: 128 keys × 64 queries
    ds = pt + (D128 ? 128 * 64 : 0);        // 2 buffers of 128 keys × 64 queries
    dq = reinterpret_cast<float*>(ds + 2 * 128 * 64);
    kv_full = reinterpret_cast<uint64_t*>(dq + 2 * 64 * DQ_ROW);
    q_full = kv_full + 1;
    q_empty = q_full + NS;
    ds_full = q_empty + NS;
    ds_empty = ds_full + 2;
  }
  __device__ __forceinline__ void init_barriers() const {
    mbar_init(kv_full, 1);
    for (int s = 0; s < NS; ++s) {
      mbar_init(q_full + s, 1);
      mbar_init(q_empty + s, 256);
    }
    for (int b = 0; b < 2; ++b) {
      mbar_init(ds_full + b, 2);
      mbar_init(ds_empty + b, D128 ? 256 : 128);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
};

// The backward's producer (one thread): this CTA's K and V once, then Q_i and dO_i of query tiles
// qb_first.. into stage j % NS of their ring.
template <typename T, int D, int NS>
__device__ __forceinline__ void bwd_producer(const BwdShared<T, D, NS>& sh, const TensorMap* tmQ,
                                             const TensorMap* tmK, const TensorMap* tmV, const TensorMap* tmdO,
                                             int k0, int bh, int qb_first, int n_qb) {
  constexpr int BC = 128, BR = 64, QT = BR * D;
  mbar_expect_tx(sh.kv_full, 2 * BC * D * sizeof(T));
  tma_tile<T, D, BC>(sh.k, tmK, k0, bh, sh.kv_full);
  tma_tile<T, D, BC>(sh.v, tmV, k0, bh, sh.kv_full);
  for (int qb = qb_first, j = 0; qb < n_qb; ++qb, ++j) {
    const int s = j % NS;
    claim_stage<NS>(sh.q_full + s, sh.q_empty + s, j, 2 * QT * sizeof(T));
    tma_tile<T, D, BR>(sh.q + s * QT, tmQ, qb * BR, bh, sh.q_full + s);
    tma_tile<T, D, BR>(sh.d_o + s * QT, tmdO, qb * BR, bh, sh.q_full + s);
  }
}

// The CTA's part of the backward: head bh, keys k0..k0 + BC − 1, the keys before n_kr real (the
// rest padding), and the query tiles qb_first..n_qb − 1 that can see them (causal: from the
// diagonal on; end-aligned, query i sees key j iff j <= i + offset).
struct BwdBlock {
  int bh, k0, offset, n_kr, qb_first, n_qb;
};
template <int BC, int BR>
__device__ __forceinline__ BwdBlock bwd_block(int n_q, int n_k, int causal, const int* kv_len) {
  const int bh = blockIdx.y, k0 = blockIdx.x * BC, offset = n_k - n_q;
  return {bh, k0, offset, kv_len ? min(n_k, kv_len[bh]) : n_k, causal ? max(0, k0 - offset) / BR : 0,
          (n_q + BR - 1) / BR};
}

// The start of both backwards: the barriers initialised, then warpgroup 0 gives its registers to
// the consumers (setmaxnreg) and its first thread runs the producer. True in the producer's
// warpgroup, which returns; the consumers go on with 240 registers each.
template <typename T, int D, int NS>
__device__ __forceinline__ bool bwd_start_producer(const BwdShared<T, D, NS>& sh, const TensorMap* tmQ,
                                                   const TensorMap* tmK, const TensorMap* tmV,
                                                   const TensorMap* tmdO, int tid, int wg, int k0, int bh, int qb_first,
                                                   int n_qb) {
  if (tid == 0) sh.init_barriers();
  __syncthreads();
  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (tid == 0) bwd_producer<T, D, NS>(sh, tmQ, tmK, tmV, tmdO, k0, bh, qb_first, n_qb);
    return true;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
  return false;
}

// Whether a (key, query) pair of this warp's 16 keys and the tile from query i0 may not exist (past
// an end, padding, above the causal diagonal): only such tiles pay for the mask's tests.
template <int BR>
__device__ __forceinline__ bool tile_needs_mask(int key_w0, int i0, int n_q, int n_kr, int causal, int offset) {
  return (i0 + BR > n_q) || (key_w0 + 16 > n_kr) || (causal && (key_w0 + 15 > i0 + offset));
}

// L (in log2 units) and D = rowsum(dO∘O) of this thread's query columns 8n + 2t + {0, 1} of the
// tile from query i0 (0 past the end). A whole tile whose pairs of columns are 8-byte aligned
// (`pairs`: both buffers' bases 8-byte aligned, n_q even) reads each pair with one 8-byte load and
// no bounds test.
template <int BR>
__device__ __forceinline__ void load_row_stats(float (&lq)[BR / 8][2], float (&d_row)[BR / 8][2],
                                               const float* Lh, const float* Dh, int i0, int n_q, int t,
                                               bool pairs) {
  if (pairs && i0 + BR <= n_q) {
#pragma unroll
    for (int n = 0; n < BR / 8; ++n) {
      const int q = i0 + n * 8 + 2 * t;
      const float2 l = __ldg(reinterpret_cast<const float2*>(Lh + q));
      const float2 dr = __ldg(reinterpret_cast<const float2*>(Dh + q));
      lq[n][0] = l.x * 1.4426950408889634f;
      lq[n][1] = l.y * 1.4426950408889634f;
      d_row[n][0] = dr.x;
      d_row[n][1] = dr.y;
    }
    return;
  }
#pragma unroll
  for (int n = 0; n < BR / 8; ++n)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int q = i0 + n * 8 + 2 * t + e;
      lq[n][e] = q < n_q ? Lh[q] * 1.4426950408889634f : 0.f;
      d_row[n][e] = q < n_q ? Dh[q] : 0.f;
    }
}

// Pᵀ = exp2(Sᵀ·scale·log2e − L·log2e) and dSᵀ = Pᵀ∘(dPᵀ − D) in place of Sᵀ and dPᵀ; with MASK,
// zero where the (key, query) pair does not exist (past an end, padding, above the causal
// diagonal). Rows of this thread: keys key_w0 + g (+ 8); columns: queries i0 + 8n + 2t + {0, 1}.
template <int BR, bool MASK>
__device__ __forceinline__ void probabilities(float (&st)[BR / 8][4], float (&dpt)[BR / 8][4],
                                              const float (&lq)[BR / 8][2], const float (&d_row)[BR / 8][2],
                                              float scale_log2, int key_w0, int i0, int g, int t, int n_q,
                                              int n_kr, int causal, int offset) {
#pragma unroll
  for (int n = 0; n < BR / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int qi = n * 8 + 2 * t + (e & 1);
      float p = exp2f(fmaf(st[n][e], scale_log2, -lq[n][e & 1]));
      float ds = p * (dpt[n][e] - d_row[n][e & 1]);
      if constexpr (MASK) {
        const int key = key_w0 + g + ((e >> 1) << 3), q = i0 + qi;
        if (q >= n_q || key >= n_kr || (causal && key > q + offset)) p = ds = 0.f;
      }
      st[n][e] = p;
      dpt[n][e] = ds;
    }
  }
}

// Where, in a buffer of 128 key rows × 64 queries (dSᵀ, Pᵀ), lane `lane` of a warp stores its row
// for stmatrix (stage_ds), in bytes from the buffer's start: lane l names row l % 8 of 8 × 8 block
// l / 8, block m holding keys +8·(m % 2) and the 8 queries of chunk m / 2 (of the pair a step of
// 16 covers).
__device__ __forceinline__ uint32_t stmatrix_lane_offset(int c, int warp, int lane) {
  const int m = lane >> 3, rr = lane & 7;
  const int row = c * 64 + warp * 16 + 8 * (m & 1) + rr;  // row % 8 == rr
  return row * 128 + (((m >> 1) ^ rr) << 4);
}

// Four 8 × 8 blocks of 16-bit values into shared memory, one register of each per thread (row
// lane / 4, columns 2·(lane % 4) and + 1: the accumulators' layout), each lane giving the
// address of one block row (stmatrix_lane_offset).
__device__ __forceinline__ void stmatrix_x4(uint32_t lane_addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(lane_addr), "r"(r[0]),
               "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// This consumer's 64 key rows of dSᵀ into a shared buffer (16 bits), for dQ = dS·K. The packed A
// operand of dK's product already holds, per 16 queries, the four 8 × 8 blocks one
// `stmatrix .x4` stores (rows g and g + 8, queries 2t and 2t + 1 of each): four stores per thread.
// In the 128-byte swizzle chunk 2kk + m / 2 of row r sits at slot (2kk + m / 2) ^ (r % 8), which
// is the lane's slot for kk = 0 with 2kk xor-ed in: the address `lane_addr ^ (kk << 5)` (rows are
// 128-byte aligned).
template <int BR>
__device__ __forceinline__ void stage_ds(uint32_t lane_addr, const uint32_t (&da)[BR / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < BR / 16; ++kk) stmatrix_x4(lane_addr ^ (kk << 5), da[kk]);
}

// The d 64 backward's dQ path: dQ_i (f32, 64 queries × D, over this CTA's keys) into the
// consumer's shared buffer, then one bulk reduce-add of the tile's rows (those before n_q) into
// the f32 dQ buffer by the TMA unit, which runs on while the warps go on. The buffer is rewritten
// only once the previous one has been read. (The staging stores of 256-byte rows put a warp's 8
// rows on the same banks, a 4-way conflict; still faster than red_dq, below.)
template <int D, int BR>
__device__ __forceinline__ void send_dq(float* my_dq, const float (&dq)[D / 8][4], float* dQh, int i0, int n_q,
                                        int c, int ctid, int warp, int g, int t) {
  if (ctid == 0) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
  consumer_sync(c);
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + g + 8 * r;
      *reinterpret_cast<float2*>(my_dq + row * D + dn * 8 + 2 * t) = make_float2(dq[dn][2 * r], dq[dn][2 * r + 1]);
    }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  consumer_sync(c);
  if (ctid == 0) {
    const int rows = min(BR, n_q - i0);
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
                 "cp.async.bulk.commit_group;\n" ::"l"(dQh + (size_t)i0 * D),
                 "r"(smem_u32(my_dq)), "r"(rows * D * 4)
                 : "memory");
  }
}

// dQ_i's 64 columns of this consumer (f32, 64 queries; at d 128 one half of the row) added into
// the f32 dQ buffer straight from the accumulators, rows before n_q: one vector reduction in L2
// (red.global.add.v2.f32) per pair of columns, fire and forget. `dQh` is the head's buffer at the
// consumer's first column, ROW floats from one row to the next. No shared staging, no barrier.
// The d 64 variant DQ_RED = true: with dQ one tile late (bwd_wgmma) it runs at 0.97–1.00× the
// staged bulk reduce-add of send_dq (H100, reports/gpu-runs/h100-2026-12-07-d); at d 128, in
// place of send_dq_half, it measured 0.96–0.99× (reports/gpu-runs/h100-2026-12-07).
template <int ROW>
__device__ __forceinline__ void red_dq(const float (&dq)[8][4], float* dQh, int i0, int n_q, int warp, int g, int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = i0 + warp * 16 + g + 8 * r;
    if (row >= n_q) continue;
    float* dst = dQh + (size_t)row * ROW + 2 * t;
#pragma unroll
    for (int dn = 0; dn < 8; ++dn)
      asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst + dn * 8), "f"(dq[dn][2 * r]),
                   "f"(dq[dn][2 * r + 1])
                   : "memory");
  }
}

// dQ_i out while the next products run: reductions in L2 (DQ_RED, red_dq), or staged for the
// TMA unit's bulk reduce-add (send_dq).
template <int D, int BR, bool DQ_RED>
__device__ __forceinline__ void send_dq_tile(float* my_dq, const float (&dq)[D / 8][4], float* dQh, int i0, int n_q,
                                             int c, int ctid, int warp, int g, int t) {
  if constexpr (DQ_RED)
    red_dq<D>(dq, dQh, i0, n_q, warp, g, t);
  else
    send_dq<D, BR>(my_dq, dq, dQh, i0, n_q, c, ctid, warp, g, t);
}

// dK = scale · dSᵀ Q and dV = Pᵀ dO of this thread's keys (key_w0 + g, + 8), those before n_k.
template <typename T, int D>
__device__ __forceinline__ void store_dk_dv(T* dKh, T* dVh, const float (&dk)[D / 8][4], const float (&dv)[D / 8][4],
                                            float scale, int key_w0, int n_k, int g, int t) {
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
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

// The backward (FlashAttention-2's order, warp-specialised like the forward). CTA = 128 keys of
// one (batch, head); consumer c owns keys 64c..64c+63 with their dK, dV accumulators. The producer
// loads K and V once, then Q_i and dO_i of each query tile (64 rows) into an NS-stage ring. Per
// tile j each consumer computes Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (64 × 64), Pᵀ = exp(Sᵀ − L),
// dSᵀ = Pᵀ∘(dPᵀ − D) (the mask's tests only on tiles that need them), writes its dSᵀ rows to
// shared buffer j % 2 (stmatrix, from the packed operand) and issues dV += Pᵀ dO and
// dK += dSᵀ Q (Pᵀ and dSᵀ from registers). The tile's owner, consumer j % 2, computes the whole
// dQ_i = dS_i K over the 128 keys from both halves one tile later, behind its next dV and dK,
// stages it in its shared buffer and has the TMA unit add it into the f32 dQ buffer (send_dq, one
// bulk reduce-add; DQ_RED: reductions in L2 from the registers, red_dq): one 64 × d reduce per
// tile and CTA, the two consumers alternating as owner. One tile late, the other half has long
// been in, so neither consumer waits for the other's softmax of the same tile.
// The next tile's Sᵀ and dPᵀ are queued behind this tile's products before any of them is waited
// for, and its L and D loaded while they run; the queue empties only at the top of the loop,
// where the softmax of the next tile needs them.
template <typename T, int D, int NS, bool DQ_RED = false>
__device__ __forceinline__ void bwd_wgmma(const TensorMap* tmQ, const TensorMap* tmK, const TensorMap* tmV,
                                          const TensorMap* tmdO, const float* __restrict__ LSE,
                                          const float* __restrict__ Dsum, float* __restrict__ dQacc,
                                          T* __restrict__ dK, T* __restrict__ dV, int n_q, int n_k, float scale,
                                          float scale_log2, int causal, const int* __restrict__ kv_len) {
  constexpr int BC = 128, BR = 64, QT = BR * D;
  extern __shared__ unsigned char smem_raw[];
  const BwdShared<T, D, NS> sh(smem_raw);

  const int tid = threadIdx.x, wg = warpgroup_index();
  const auto [bh, k0, offset, n_kr, qb_first, n_qb] = bwd_block<BC, BR>(n_q, n_k, causal, kv_len);
  if (bwd_start_producer<T, D, NS>(sh, tmQ, tmK, tmV, tmdO, tid, wg, k0, bh, qb_first, n_qb)) return;
  const int c = wg - 1, ctid = tid & 127, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int key_w0 = k0 + c * 64 + warp * 16;  // this warp's 16 keys
  const uint32_t k_all = smem_u32(sh.k), k_c = k_all + c * 64 * 128, v_c = smem_u32(sh.v) + c * 64 * 128;
  const float* Lh = LSE + (size_t)bh * n_q;
  const float* Dh = Dsum + (size_t)bh * n_q;
  float* dQh = dQacc + (size_t)bh * n_q * D;
  const bool pairs = ((reinterpret_cast<uintptr_t>(Lh) | reinterpret_cast<uintptr_t>(Dh)) & 7) == 0;
  const uint32_t ds_lane = smem_u32(sh.ds) + stmatrix_lane_offset(c, warp, lane);

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  // Sᵀ, dPᵀ and the row statistics of the tile about to be processed: each loaded an iteration
  // ahead, so that its latency hides behind the tile before.
  float st[BR / 8][4], dpt[BR / 8][4], lq[BR / 8][2], d_row[BR / 8][2];
  mbar_wait(sh.kv_full, 0);
  if (qb_first < n_qb) {
    load_row_stats<BR>(lq, d_row, Lh, Dh, qb_first * BR, n_q, t, pairs);
    mbar_wait(sh.q_full, 0);
    issue_s_dp<T, D, BC, BR>(st, dpt, k_c, v_c, smem_u32(sh.q), smem_u32(sh.d_o));
  }
  for (int qb = qb_first, j = 0; qb < n_qb; ++qb, ++j) {
    const int s = j % NS, i0 = qb * BR, b = j & 1;
    const uint32_t q_s = smem_u32(sh.q + s * QT), do_s = smem_u32(sh.d_o + s * QT);
    wgmma_wait<0>();
    pin(st);
    pin(dpt);
    pin(dv);
    pin(dk);

    if (tile_needs_mask<BR>(key_w0, i0, n_q, n_kr, causal, offset))
      probabilities<BR, true>(st, dpt, lq, d_row, scale_log2, key_w0, i0, g, t, n_q, n_kr, causal, offset);
    else
      probabilities<BR, false>(st, dpt, lq, d_row, scale_log2, key_w0, i0, g, t, n_q, n_kr, causal, offset);
    uint32_t pa[BR / 16][4], da[BR / 16][4];
    pack_p<T, BR>(pa, st);
    pack_p<T, BR>(da, dpt);

    // This consumer's dSᵀ rows into buffer b, once the owner's product of tile j − 2 has read it;
    // then dV += Pᵀ dO_i and dK += dSᵀ Q_i.
    if (j >= 2) mbar_wait(sh.ds_empty + b, ((j >> 1) - 1) & 1);
    stage_ds<BR>(ds_lane + b * BC * BR * (int)sizeof(T), da);
    issue_dv_dk<T, D, BR>(dv, dk, pa, da, do_s, q_s);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    consumer_sync(c);
    if (ctid == 0) mbar_arrive(sh.ds_full + b);

    // dQ of the tile before, by its owner (consumer (j − 1) % 2): the other consumer's half of
    // it came in during that tile, so this wait rarely stalls, and neither consumer waits here
    // for the other's softmax of this tile.
    float dq[D / 8][4];
    const bool dq_due = j >= 1 && (b ^ 1) == c;
    if (dq_due) {
      mbar_wait(sh.ds_full + (b ^ 1), ((j - 1) >> 1) & 1);
      issue_dq<T, D, BC>(dq, smem_u32(sh.ds + (b ^ 1) * BC * BR), k_all);
    }

    // The next tile's products queue behind this tile's. After the last tile the same products
    // run on K and V alone (their result is dropped), so that every iteration starts with them in
    // flight: one shape of pipeline for the compiler.
    if (qb + 1 < n_qb) {
      const int s1 = (j + 1) % NS;
      mbar_wait(sh.q_full + s1, ((j + 1) / NS) & 1);
      issue_s_dp<T, D, BC, BR>(st, dpt, k_c, v_c, smem_u32(sh.q + s1 * QT), smem_u32(sh.d_o + s1 * QT));
    } else {
      issue_s_dp<T, D, BC, BR>(st, dpt, k_c, v_c, k_c, v_c);
    }
    wgmma_wait<1>();  // all but the next tile's products
    pin(dv);
    pin(dk);
    pin(pa);
    pin(da);
    mbar_arrive(sh.q_empty + s);  // Q_i and dO_i are free
    if (qb + 1 < n_qb) load_row_stats<BR>(lq, d_row, Lh, Dh, i0 + BR, n_q, t, pairs);
    if (dq_due) {
      pin(dq);
      mbar_arrive(sh.ds_empty + (b ^ 1));
      send_dq_tile<D, BR, DQ_RED>(sh.dq + c * BR * D, dq, dQh, i0 - BR, n_q, c, ctid, warp, g, t);
    }
  }

  wgmma_wait<0>();  // the dropped products of the last iteration
  // The last tile's dQ, by its owner.
  const int last = n_qb - 1 - qb_first;
  if (last >= 0 && (last & 1) == c) {
    float dq[D / 8][4];
    mbar_wait(sh.ds_full + (last & 1), (last >> 1) & 1);
    issue_dq<T, D, BC>(dq, smem_u32(sh.ds + (last & 1) * BC * BR), k_all);
    wgmma_wait<0>();
    pin(dq);
    send_dq_tile<D, BR, DQ_RED>(sh.dq + c * BR * D, dq, dQh, (n_qb - 1) * BR, n_q, c, ctid, warp, g, t);
  }
  if (ctid == 0) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");

  store_dk_dv<T, D>(dK + (size_t)bh * n_k * D, dV + (size_t)bh * n_k * D, dk, dv, scale, key_w0, n_k, g, t);
}

// ---- Backward (d 128) ------------------------------------------------------------------------
// The d 64 kernel cannot simply be instantiated at d 128: per consumer thread its f32
// accumulators are dK and dV (64 keys × 128: 64 registers each), Sᵀ and dPᵀ (64 × 64: 32 each),
// the owner's dQ (64 queries × 128: 64) and the packed Pᵀ, dSᵀ register operands (16 each):
// about 290 registers against the 240 setmaxnreg gives, so it spills. This organisation (the one
// FlashAttention-3 uses at d 128) needs about 225:
//   * Pᵀ and dSᵀ go to shared memory (this consumer's 64 key rows of each), and dV += Pᵀ dO,
//     dK += dSᵀ Q read them from there (both operands from shared memory): no register operands
//     held while those products run;
//   * every tile, each consumer computes half of dQ_i = dS_i K, its 64 columns of d (64 × 64: 32
//     registers), from both consumers' halves of dSᵀ, stages it in shared memory and sends it
//     by 64 row-wise bulk reduce-adds (send_dq_half: its columns are not contiguous in the
//     (n_q, 128) dQ buffer; adding it from the registers with red_dq instead was no faster);
//   * a tile's Sᵀ and dPᵀ are issued at the top of its own iteration and waited for at once
//     (queued behind the tile before, as at d 64, they spill), so a consumer's tensor-core work
//     overlaps only the other consumer's softmax.
// The rest is the d 64 kernel's: 128 keys per CTA, consumer c owns keys 64c..64c+63, query tiles
// of 64 in a 2-stage ring. FlashKernels::Auto runs it from HOPPER_BACKWARD_MIN_KEYS keys
// (src/lib.rs, hopper_backward_with); scripts/flash_hopper_bwd_probe.cu checks and times it.

// d (64 × 128) += A·B: A from shared memory K-major, B from shared memory N-major
// (imm-trans-b = 1).
#define WGMMA_SS_TB(TY)                                                                                           \
  static __device__ __forceinline__ void ss_tb(float (&d)[16][4], uint64_t a, uint64_t b) {                        \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                      \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " ACC_64 ", %64, %65, p, 1, 1, 0, 1;\n}\n" \
                 : F_64(d)                                                                                         \
                 : "l"(a), "l"(b), "r"(1));                                                                       \
  }
// d (64 × 64) = A·B, overwriting d (scale-d 0): its old values are outputs only, so the compiler
// may reuse their registers until this product is issued. Both K-major (ss0), or both MN-major
// (ss_tt0: imm-trans-a = imm-trans-b = 1).
#define F4W(a, i) "=f"(a[i][0]), "=f"(a[i][1]), "=f"(a[i][2]), "=f"(a[i][3])
#define FW_32(a) F4W(a, 0), F4W(a, 1), F4W(a, 2), F4W(a, 3), F4W(a, 4), F4W(a, 5), F4W(a, 6), F4W(a, 7)
#define WGMMA_FIRST(TY)                                                                                         \
  static __device__ __forceinline__ void ss0(float (&d)[8][4], uint64_t a, uint64_t b) {                        \
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " ACC_32 ", %32, %33, 0, 1, 1, 0, 0;\n" \
                 : FW_32(d)                                                                                     \
                 : "l"(a), "l"(b));                                                                            \
  }                                                                                                             \
  static __device__ __forceinline__ void ss_tt0(float (&d)[8][4], uint64_t a, uint64_t b) {                     \
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " ACC_32 ", %32, %33, 0, 1, 1, 1, 1;\n" \
                 : FW_32(d)                                                                                     \
                 : "l"(a), "l"(b));                                                                            \
  }
template <typename T>
struct OpsB;
template <>
struct OpsB<__nv_bfloat16> {
  WGMMA_SS_TB("bf16")
  WGMMA_FIRST("bf16")
};
template <>
struct OpsB<__half> {
  WGMMA_SS_TB("f16")
  WGMMA_FIRST("f16")
};

// issue_s_dp and issue_dq of the d 64 kernel with a first step that overwrites the accumulators.
template <typename T, int D, int BC, int BR>
__device__ __forceinline__ void issue_s_dp0(float (&st)[BR / 8][4], float (&dpt)[BR / 8][4], uint32_t k_c,
                                            uint32_t v_c, uint32_t q_s, uint32_t do_s) {
  wgmma_fence();
  OpsB<T>::ss0(st, k_major<BC>(k_c, 0), k_major<BR>(q_s, 0));
#pragma unroll
  for (int kk = 1; kk < D / 16; ++kk) Ops<T>::ss(st, k_major<BC>(k_c, kk), k_major<BR>(q_s, kk), 1);
  OpsB<T>::ss0(dpt, k_major<BC>(v_c, 0), k_major<BR>(do_s, 0));
#pragma unroll
  for (int kk = 1; kk < D / 16; ++kk) Ops<T>::ss(dpt, k_major<BC>(v_c, kk), k_major<BR>(do_s, kk), 1);
  wgmma_commit();
}
template <typename T, int BC>
__device__ __forceinline__ void issue_dq0(float (&dq)[8][4], uint32_t ds_b, uint32_t k_half) {
  wgmma_fence();
  OpsB<T>::ss_tt0(dq, mn_major<BC>(ds_b, 0), mn_major<BC>(k_half, 0));
#pragma unroll
  for (int kk = 1; kk < BC / 16; ++kk) OpsT<T>::ss_tt(dq, mn_major<BC>(ds_b, kk), mn_major<BC>(k_half, kk), 1);
  wgmma_commit();
}

// The d 128 backward's dQ path: this consumer's half of dQ_i (f32, 64 queries × its 64 columns)
// into its shared buffer (rows DQ_STRIDE floats apart), then one bulk reduce-add per query row
// (256 bytes, issued by the thread of that row) into the f32 dQ buffer (row stride 128). Each
// issuing thread waits for its previous copy to have read the buffer first.
template <int BR>
__device__ __forceinline__ void send_dq_half(float* my_dq, const float (&dq)[8][4], float* dQh, int i0, int n_q,
                                             int c, int ctid, int warp, int g, int t) {
  const int rows = min(BR, n_q - i0);
  if (ctid < BR) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
  consumer_sync(c);
  // 32-bit shared addresses: one base register, the rest immediate offsets.
  const uint32_t base = smem_u32(my_dq) + ((warp * 16 + g) * DQ_STRIDE + 2 * t) * 4;
#pragma unroll
  for (int dn = 0; dn < 8; ++dn)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(base + (8 * r * DQ_STRIDE + dn * 8) * 4),
                   "f"(dq[dn][2 * r]), "f"(dq[dn][2 * r + 1])
                   : "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  consumer_sync(c);
  if (ctid < rows) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
                 "cp.async.bulk.commit_group;\n" ::"l"(dQh + (size_t)(i0 + ctid) * 128 + c * 64),
                 "r"(smem_u32(my_dq + ctid * DQ_STRIDE)), "r"(256)
                 : "memory");
  }
}

// Pᵀ and dSᵀ of this tile straight into shared memory, 16 queries at a time: probabilities(),
// pack_p() and stage_ds() of the d 64 kernel fused, with L (log2 units) and D read as they are
// needed (without MASK one 8-byte load per pair of columns: the caller takes the masked path for
// rows not 8-byte aligned, as load_row_stats does for them). `pt_lane` and
// `ds_lane` are this lane's stmatrix addresses in the two buffers (stmatrix_lane_offset). The compiler
// barrier after each step keeps it from hoisting the reads of L and D for the whole tile
// (32 registers) ahead of the arithmetic.
template <typename T, int BR, bool MASK>
__device__ __forceinline__ void stage_p_ds(uint32_t pt_lane, uint32_t ds_lane, const float (&st)[BR / 8][4],
                                           const float (&dpt)[BR / 8][4], const float* Lh, const float* Dh,
                                           float scale_log2, int key_w0, int i0, int g, int t, int n_q,
                                           int n_kr, int causal, int offset) {
#pragma unroll
  for (int kk = 0; kk < BR / 16; ++kk) {
    uint32_t pa[4], da[4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = 2 * kk + h, q0 = i0 + n * 8 + 2 * t;
      float lq[2], dr[2];
      if constexpr (!MASK) {
        const float2 l = __ldg(reinterpret_cast<const float2*>(Lh + q0));
        const float2 d2 = __ldg(reinterpret_cast<const float2*>(Dh + q0));
        lq[0] = l.x, lq[1] = l.y, dr[0] = d2.x, dr[1] = d2.y;
      } else {
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
          const bool in = q0 + e2 < n_q;
          lq[e2] = in ? __ldg(Lh + q0 + e2) : 0.f;
          dr[e2] = in ? __ldg(Dh + q0 + e2) : 0.f;
        }
      }
      float p[4], ds[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int e2 = e & 1;
        p[e] = exp2f(fmaf(st[n][e], scale_log2, -lq[e2] * 1.4426950408889634f));
        ds[e] = p[e] * (dpt[n][e] - dr[e2]);
        if constexpr (MASK) {
          const int key = key_w0 + g + 8 * (e >> 1), q = q0 + e2;
          if (q >= n_q || key >= n_kr || (causal && key > q + offset)) p[e] = ds[e] = 0.f;
        }
      }
      // mma.sync's A layout (pack_p): registers h·2 + r hold row g + 8r of chunk n.
      pa[2 * h] = Ops<T>::pack2(p[0], p[1]);
      pa[2 * h + 1] = Ops<T>::pack2(p[2], p[3]);
      da[2 * h] = Ops<T>::pack2(ds[0], ds[1]);
      da[2 * h + 1] = Ops<T>::pack2(ds[2], ds[3]);
    }
    stmatrix_x4(pt_lane ^ (kk << 5), pa);
    stmatrix_x4(ds_lane ^ (kk << 5), da);
  }
}

template <typename T, int NS>
__device__ __forceinline__ void bwd128_wgmma(const TensorMap* tmQ, const TensorMap* tmK, const TensorMap* tmV,
                                             const TensorMap* tmdO, const float* __restrict__ LSE,
                                             const float* __restrict__ Dsum, float* __restrict__ dQacc,
                                             T* __restrict__ dK, T* __restrict__ dV, int n_q, int n_k, float scale,
                                             float scale_log2, int causal, const int* __restrict__ kv_len) {
  constexpr int D = 128, BC = 128, BR = 64, QT = BR * D;
  extern __shared__ unsigned char smem_raw[];
  const BwdShared<T, D, NS> sh(smem_raw);

  const int tid = threadIdx.x, wg = warpgroup_index();
  const auto [bh, k0, offset, n_kr, qb_first, n_qb] = bwd_block<BC, BR>(n_q, n_k, causal, kv_len);
  if (bwd_start_producer<T, D, NS>(sh, tmQ, tmK, tmV, tmdO, tid, wg, k0, bh, qb_first, n_qb)) return;
  const int c = wg - 1, ctid = tid & 127, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int key_w0 = k0 + c * 64 + warp * 16;  // this warp's 16 keys
  const uint32_t k_all = smem_u32(sh.k), k_c = k_all + c * 64 * 128, v_c = smem_u32(sh.v) + c * 64 * 128;
  const uint32_t pt_c = smem_u32(sh.pt) + c * 64 * 128;  // this consumer's 64 key rows of Pᵀ
  const uint32_t k_half = k_all + c * BC * 128;          // K's 64-column panel c: dQ's columns
  const float* Lh = LSE + (size_t)bh * n_q;
  const float* Dh = Dsum + (size_t)bh * n_q;
  float* dQh = dQacc + (size_t)bh * n_q * D;
  const bool pairs = ((reinterpret_cast<uintptr_t>(Lh) | reinterpret_cast<uintptr_t>(Dh)) & 7) == 0;
  const uint32_t lane_off = stmatrix_lane_offset(c, warp, lane);

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  float st[BR / 8][4], dpt[BR / 8][4];
  mbar_wait(sh.kv_full, 0);
  for (int qb = qb_first, j = 0; qb < n_qb; ++qb, ++j) {
    const int s = j % NS, i0 = qb * BR, b = j & 1;
    const uint32_t q_s = smem_u32(sh.q + s * QT), do_s = smem_u32(sh.d_o + s * QT);
    T* ds_b = sh.ds + b * BC * BR;
    const uint32_t ds_c = smem_u32(ds_b) + c * 64 * 128;  // this consumer's rows of dSᵀ
    mbar_wait(sh.q_full + s, (j / NS) & 1);
    issue_s_dp0<T, D, BC, BR>(st, dpt, k_c, v_c, q_s, do_s);
    wgmma_wait<0>();
    pin(st);
    pin(dpt);
    pin(dv);
    pin(dk);

    // Pᵀ over this consumer's rows (its dV product of the tile before has finished), dSᵀ into
    // buffer b once both consumers' dQ products of tile j − 2 have read it.
    if (j >= 2) mbar_wait(sh.ds_empty + b, ((j >> 1) - 1) & 1);
    const uint32_t pt_lane = smem_u32(sh.pt) + lane_off, ds_lane = smem_u32(ds_b) + lane_off;
    if (!pairs || tile_needs_mask<BR>(key_w0, i0, n_q, n_kr, causal, offset))
      stage_p_ds<T, BR, true>(pt_lane, ds_lane, st, dpt, Lh, Dh, scale_log2, key_w0, i0, g, t, n_q, n_kr, causal,
                              offset);
    else
      stage_p_ds<T, BR, false>(pt_lane, ds_lane, st, dpt, Lh, Dh, scale_log2, key_w0, i0, g, t, n_q, n_kr, causal,
                               offset);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    consumer_sync(c);
    if (ctid == 0) mbar_arrive(sh.ds_full + b);

    // dV += Pᵀ dO_i and dK += dSᵀ Q_i, both operands from shared memory.
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BR / 16; ++kk) OpsB<T>::ss_tb(dv, k_major<BC>(pt_c, kk), mn_major<BR>(do_s, kk));
#pragma unroll
    for (int kk = 0; kk < BR / 16; ++kk) OpsB<T>::ss_tb(dk, k_major<BC>(ds_c, kk), mn_major<BR>(q_s, kk));
    wgmma_commit();

    // This consumer's 64 columns of dQ_i = dS_i K, once the other consumer's half of dSᵀ is in.
    float dq[8][4];
    mbar_wait(sh.ds_full + b, (j >> 1) & 1);
    issue_dq0<T, BC>(dq, smem_u32(ds_b), k_half);

    wgmma_wait<0>();
    pin(dv);
    pin(dk);
    pin(dq);
    mbar_arrive(sh.q_empty + s);   // Q_i and dO_i are free
    mbar_arrive(sh.ds_empty + b);  // this consumer's dQ product has read buffer b
    send_dq_half<BR>(sh.dq + c * BR * DQ_STRIDE, dq, dQh, i0, n_q, c, ctid, warp, g, t);
  }

  if (ctid < BR) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");

  store_dk_dv<T, D>(dK + (size_t)bh * n_k * D, dV + (size_t)bh * n_k * D, dk, dv, scale, key_w0, n_k, g, t);
}

}  // namespace hopper

// The kernels (the fastest of the variants scripts/flash_hopper_probe.cu times on an H100), one
// CTA per SM, key tiles of 128:
//   flash_fwd_wgmma_{bf16,f16}_d{64,128}: 384 threads (a producer and two consumer warpgroups),
//     128 queries per CTA, rings of 2 stages;
//   flash_fwd_wgmma3_{bf16,f16}_d64: 512 threads (a producer and three consumers), 192 queries per
//     CTA, rings of 3 stages: more consumers to hide each one's softmax behind the others' MMAs,
//     which pays at d 64, where the softmax is a larger share of a tile's work; it runs from
//     2,048 queries on (src/lib.rs, hopper_forward_consumers).
// At d 64 the consumers take turns at the tensor cores (TURNS). On an H100 (the probe,
// reports/gpu-runs/h100-2026-12-07-d/call2) turns ran 1.03–1.08× the same kernel without them
// with three consumers, and with two 1.09× at 1,024 queries (where d 64 takes two consumers),
// falling to 0.98× at 16,384; at d 128 0.96–1.02×, so d 128 takes no turns.
#define FWD_WGMMA(NAME, T, D, BC, NS, NC, TURNS)                                                          \
  extern "C" __global__ void __launch_bounds__(128 * (NC + 1), 1)                                          \
      NAME(const __grid_constant__ hopper::TensorMap tmQ, const __grid_constant__ hopper::TensorMap tmK,    \
           const __grid_constant__ hopper::TensorMap tmV, T* O, float* LSE, int n_q, int n_k, int d,         \
           float scale_log2, int causal, const int* kv_len) {                                               \
    hopper::fwd_wgmma<T, D, BC, NS, NC, TURNS>(&tmQ, &tmK, &tmV, O, LSE, n_q, n_k, scale_log2, causal,   \
                                               kv_len);                                                    \
  }
FWD_WGMMA(flash_fwd_wgmma_bf16_d64, __nv_bfloat16, 64, 128, 2, 2, true)
FWD_WGMMA(flash_fwd_wgmma_bf16_d128, __nv_bfloat16, 128, 128, 2, 2, false)
FWD_WGMMA(flash_fwd_wgmma_f16_d64, __half, 64, 128, 2, 2, true)
FWD_WGMMA(flash_fwd_wgmma_f16_d128, __half, 128, 128, 2, 2, false)
FWD_WGMMA(flash_fwd_wgmma3_bf16_d64, __nv_bfloat16, 64, 128, 3, 3, true)
FWD_WGMMA(flash_fwd_wgmma3_f16_d64, __half, 64, 128, 3, 3, true)

// The backward: flash_bwd_wgmma_{bf16,f16}_d64; 384 threads (a producer and two consumer
// warpgroups), 128 keys per CTA, query tiles of 64 in rings of 2 stages. (At d 128 this kernel's
// accumulators spill: d 128 has the organisation of bwd128_wgmma, below.)
#define BWD_WGMMA(NAME, T, D, NS)                                                                           \
  extern "C" __global__ void __launch_bounds__(384, 1) NAME(                                               \
      const __grid_constant__ hopper::TensorMap tmQ, const __grid_constant__ hopper::TensorMap tmK,        \
      const __grid_constant__ hopper::TensorMap tmV, const __grid_constant__ hopper::TensorMap tmdO,       \
      const float* LSE, const float* Dsum, float* dQacc, T* dK, T* dV, int n_q, int n_k, int d, float scale, \
      float scale_log2, int causal, const int* kv_len) {                                                    \
    hopper::bwd_wgmma<T, D, NS>(&tmQ, &tmK, &tmV, &tmdO, LSE, Dsum, dQacc, dK, dV, n_q, n_k, scale,         \
                                scale_log2, causal, kv_len);                                                \
  }
BWD_WGMMA(flash_bwd_wgmma_bf16_d64, __nv_bfloat16, 64, 2)
BWD_WGMMA(flash_bwd_wgmma_f16_d64, __half, 64, 2)

// The d 128 backward: flash_bwd_wgmma_{bf16,f16}_d128; 384 threads, 128 keys per CTA, query tiles
// of 64 in rings of 2 stages (3 would exceed the 227 KiB a CTA may have).
#define BWD128_WGMMA(NAME, T, NS)                                                                           \
  static_assert(hopper::bwd_smem_bytes<T, 128, NS>() <= 232448, "more shared memory than a CTA may have"); \
  extern "C" __global__ void __launch_bounds__(384, 1) NAME(                                               \
      const __grid_constant__ hopper::TensorMap tmQ, const __grid_constant__ hopper::TensorMap tmK,        \
      const __grid_constant__ hopper::TensorMap tmV, const __grid_constant__ hopper::TensorMap tmdO,       \
      const float* LSE, const float* Dsum, float* dQacc, T* dK, T* dV, int n_q, int n_k, int d, float scale, \
      float scale_log2, int causal, const int* kv_len) {                                                    \
    hopper::bwd128_wgmma<T, NS>(&tmQ, &tmK, &tmV, &tmdO, LSE, Dsum, dQacc, dK, dV, n_q, n_k, scale,         \
                                scale_log2, causal, kv_len);                                                \
  }
BWD128_WGMMA(flash_bwd_wgmma_bf16_d128, __nv_bfloat16, 2)
BWD128_WGMMA(flash_bwd_wgmma_f16_d128, __half, 2)

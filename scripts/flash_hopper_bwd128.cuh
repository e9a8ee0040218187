// A d 128 Hopper backward under development (scripts/flash_hopper_bwd_probe.cu checks and times
// it; not yet in kernels/flash_attn_hopper.cu, where d 128 runs the mma.sync backward). Include
// after the kernel file.
//
// Why the d 64 kernel cannot simply be instantiated at d 128: per consumer thread its f32
// accumulators are dK and dV (64 keys × 128: 64 registers each), Sᵀ and dPᵀ (64 × 64: 32 each),
// the owner's dQ (64 queries × 128: 64) and the packed Pᵀ, dSᵀ register operands (16 each):
// about 290 registers against the 240 setmaxnreg gives, so it spills. This organisation (the one
// FlashAttention-3 uses at d 128) needs about 225:
//   * Pᵀ and dSᵀ go to shared memory (this consumer's 64 key rows of each), and dV += Pᵀ dO,
//     dK += dSᵀ Q read them from there (both operands from shared memory): no register operands
//     held while those products run;
//   * every tile, each consumer computes half of dQ_i = dS_i K, its 64 columns of d (64 × 64: 32
//     registers), from both consumers' halves of dSᵀ, and sends it by 64 row-wise bulk
//     reduce-adds (256 bytes each; its columns are not contiguous in the (n_q, 128) dQ buffer).
// The rest is the d 64 kernel's: 128 keys per CTA, consumer c owns keys 64c..64c+63, query tiles
// of 64 in an NS-stage ring. One difference: a tile's Sᵀ and dPᵀ are issued at the top of its own
// iteration and waited for at once (the d 64 kernel queues them behind the tile before; here that
// spills), so a consumer's tensor-core work overlaps only the other consumer's softmax.

namespace hopper {

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

// Row stride (floats) of a consumer's f32 dQ half in shared memory: 64 columns padded to 68, so
// that the 8 rows a warp's stores touch at once fall in different banks (16-byte aligned rows).
constexpr int DQ_STRIDE = 68;

// Shared memory: K and V (128 keys × 128), NS stages of Q and dO (64 × 128), Pᵀ (128 keys × 64
// queries), two buffers of dSᵀ (128 × 64), each consumer's f32 half of dQ (64 × DQ_STRIDE),
// alignment, and the mbarriers (K/V full; Q/dO full and empty per stage; dSᵀ full and empty per
// buffer). 216,136 bytes at NS = 2; NS = 3 would exceed the 227 KiB a CTA may have.
template <typename T, int NS>
constexpr int bwd128_smem_bytes() {
  return (2 * 128 * 128 + 2 * NS * 64 * 128 + 3 * 128 * 64) * (int)sizeof(T) + 2 * 64 * DQ_STRIDE * 4 + 1024 +
         8 * (1 + 2 * NS + 4);
}

template <typename T, int NS>
struct Bwd128Shared {
  static constexpr int D = 128;
  T *k, *v, *q, *d_o, *pt, *ds;
  float* dq;
  uint64_t *kv_full, *q_full, *q_empty, *ds_full, *ds_empty;
  __device__ __forceinline__ explicit Bwd128Shared(unsigned char* raw) {
    k = reinterpret_cast<T*>(raw + ((1024 - (smem_u32(raw) & 1023)) & 1023));
    v = k + 128 * D;
    q = v + 128 * D;         // NS stages of 64 × D
    d_o = q + NS * 64 * D;   // NS stages of 64 × D
    pt = d_o + NS * 64 * D;  // 128 keys × 64 queries
    ds = pt + 128 * 64;      // 2 buffers of 128 keys × 64 queries
    dq = reinterpret_cast<float*>(ds + 2 * 128 * 64);
    kv_full = reinterpret_cast<uint64_t*>(dq + 2 * 64 * DQ_STRIDE);
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
      mbar_init(ds_full + b, 2);     // one arrival per consumer: its half is in
      mbar_init(ds_empty + b, 256);  // every consumer thread: its dQ product has read both halves
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
};

// This consumer's half of dQ_i (f32, 64 queries × its 64 columns) into its shared buffer (rows
// DQ_STRIDE floats apart), then
// one bulk reduce-add per query row (256 bytes, by thread `row`) into the f32 dQ buffer (row
// stride 128). Each issuing thread waits for its previous copy to have read the buffer first.
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

// Pᵀ and dSᵀ of this tile straight into shared memory, 8 queries at a time: probabilities() and
// stage_ds() of the d 64 kernel fused, with L (log2 units) and D read as they are needed. The
// compiler barrier after each group of 8 queries keeps it from hoisting the reads of L and D for
// the whole tile (32 registers) ahead of the arithmetic.
template <typename T, int BC, int BR>
__device__ __forceinline__ void stage_p_ds(T* sPt, T* sdSt, const float (&st)[BR / 8][4], const float (&dpt)[BR / 8][4],
                                           const float* Lh, const float* Dh, float scale_log2, int c, int warp,
                                           int key_w0, int i0, int g, int t, int n_q, int n_kr, int causal,
                                           int offset) {
  const bool need_mask = (i0 + BR > n_q) || (key_w0 + 16 > n_kr) || (causal && (key_w0 + 15 > i0 + offset));
#pragma unroll
  for (int n = 0; n < BR / 8; ++n) {
    float p[4], ds[4];
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const int q = i0 + n * 8 + 2 * t + e2;
      const float lq = q < n_q ? __ldg(Lh + q) * 1.4426950408889634f : 0.f;
      const float dr = q < n_q ? __ldg(Dh + q) : 0.f;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int e = 2 * r + e2;
        p[e] = exp2f(fmaf(st[n][e], scale_log2, -lq));
        ds[e] = p[e] * (dpt[n][e] - dr);
        if (need_mask) {
          const int key = key_w0 + g + 8 * r;
          if (q >= n_q || key >= n_kr || (causal && key > q + offset)) p[e] = ds[e] = 0.f;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int off = panel_offset<BC>(c * 64 + warp * 16 + g + 8 * r, n * 8 + 2 * t);
      *reinterpret_cast<uint32_t*>(sPt + off) = Ops<T>::pack2(p[2 * r], p[2 * r + 1]);
      *reinterpret_cast<uint32_t*>(sdSt + off) = Ops<T>::pack2(ds[2 * r], ds[2 * r + 1]);
    }
    asm volatile("" ::: "memory");
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
  const Bwd128Shared<T, NS> sh(smem_raw);

  const int tid = threadIdx.x, wg = tid >> 7;
  const int bh = blockIdx.y, k0 = blockIdx.x * BC;
  const int offset = n_k - n_q;
  const int n_kr = kv_len ? min(n_k, kv_len[bh]) : n_k;
  const int qb_first = causal ? max(0, k0 - offset) / BR : 0;
  const int n_qb = (n_q + BR - 1) / BR;

  if (tid == 0) sh.init_barriers();
  __syncthreads();

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (tid == 0) {
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
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");

  const int c = wg - 1, ctid = tid & 127, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int key_w0 = k0 + c * 64 + warp * 16;  // this warp's 16 keys
  const uint32_t k_all = smem_u32(sh.k), k_c = k_all + c * 64 * 128, v_c = smem_u32(sh.v) + c * 64 * 128;
  const uint32_t pt_c = smem_u32(sh.pt) + c * 64 * 128;  // this consumer's 64 key rows of Pᵀ
  const uint32_t k_half = k_all + c * BC * 128;          // K's 64-column panel c: dQ's columns
  const float* Lh = LSE + (size_t)bh * n_q;
  const float* Dh = Dsum + (size_t)bh * n_q;
  float* dQh = dQacc + (size_t)bh * n_q * D;

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
    stage_p_ds<T, BC, BR>(sh.pt, ds_b, st, dpt, Lh, Dh, scale_log2, c, warp, key_w0, i0, g, t, n_q, n_kr, causal,
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

#define BWD128_WGMMA(NAME, T, NS)                                                                           \
  static_assert(hopper::bwd128_smem_bytes<T, NS>() <= 232448, "more shared memory than a CTA may have"); \
  extern "C" __global__ void __launch_bounds__(384, 1) NAME(                                               \
      const __grid_constant__ hopper::TensorMap tmQ, const __grid_constant__ hopper::TensorMap tmK,        \
      const __grid_constant__ hopper::TensorMap tmV, const __grid_constant__ hopper::TensorMap tmdO,       \
      const float* LSE, const float* Dsum, float* dQacc, T* dK, T* dV, int n_q, int n_k, int d, float scale, \
      float scale_log2, int causal, const int* kv_len) {                                                    \
    hopper::bwd128_wgmma<T, NS>(&tmQ, &tmK, &tmV, &tmdO, LSE, Dsum, dQacc, dK, dV, n_q, n_k, scale,         \
                                scale_log2, causal, kv_len);                                                \
  }

namespace hopper {

// d (64 × N) = A·B, A from shared memory M-major (imm-trans-a = 1), B N-major (imm-trans-b = 1).
#define WGMMA_TT(TY)                                                                                          \
  static __device__ __forceinline__ void ss_tt(float (&d)[8][4], uint64_t a, uint64_t b, int accumulate) {    \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                  \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " ACC_32 ", %32, %33, p, 1, 1, 1, 1;\n}\n" \
                 : F_32(d)                                                                                     \
                 : "l"(a), "l"(b), "r"(accumulate));                                                          \
  }                                                                                                            \
  static __device__ __forceinline__ void ss_tt(float (&d)[16][4], uint64_t a, uint64_t b, int accumulate) {   \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                  \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " ACC_64 ", %64, %65, p, 1, 1, 1, 1;\n}\n" \
                 : F_64(d)                                                                                     \
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

__device__ __forceinline__ void red_add_v2(float* dst, float a, float b) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(a), "f"(b) : "memory");
}

// Shared memory of the backward: K and V (128 keys), NS stages of Q and dO (64 queries), dSᵀ
// (128 keys × 64 queries), alignment, mbarriers (K/V full; Q/dO full and empty per stage).
template <typename T, int D, int NS>
constexpr int bwd_smem_bytes() {
  return (2 * 128 * D + 2 * NS * 64 * D + 128 * 64) * (int)sizeof(T) + 2 * 64 * D * 4 + 1024 + 8 * (1 + 2 * NS);
}

// A K-major operand of ROWS-row panels: 16 columns of d per step.
template <int ROWS>
__device__ __forceinline__ uint64_t k_major(uint32_t base, int kk) {
  return descriptor(base + (kk >> 2) * ROWS * 128 + (kk & 3) * 32, 16, 1024);
}
// An MN-major operand whose reduction runs over its ROWS rows: 16 rows per step, 64-column panels
// ROWS·128 bytes apart.
template <int ROWS>
__device__ __forceinline__ uint64_t mn_major(uint32_t base, int kk) {
  return descriptor(base + kk * 16 * 128, ROWS * 128, 1024);
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

// The backward (FlashAttention-2's order, warp-specialised like the forward). CTA = 128 keys of
// one (batch, head); consumer c owns keys 64c..64c+63 with their dK, dV accumulators. The producer
// loads K and V once, then Q_i and dO_i of each query tile (64 rows) into an NS-stage ring. Per tile
// each consumer computes Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (64 × 64), Pᵀ = exp(Sᵀ − L), dSᵀ = Pᵀ∘(dPᵀ − D),
// then dV += Pᵀ dO and dK += dSᵀ Q (Pᵀ and dSᵀ from registers) and its share of dQ_i = dS K over
// its 64 keys (dSᵀ through shared memory, read M-major), added into the f32 dQ buffer with atomics.
template <typename T, int D, int NS>
__device__ __forceinline__ void bwd_wgmma(const TensorMap* tmQ, const TensorMap* tmK, const TensorMap* tmV,
                                          const TensorMap* tmdO, const float* __restrict__ LSE,
                                          const float* __restrict__ Dsum, float* __restrict__ dQacc,
                                          T* __restrict__ dK, T* __restrict__ dV, int n_q, int n_k, float scale,
                                          float scale_log2, int causal, const int* __restrict__ kv_len) {
  constexpr int BC = 128, BR = 64, QT = BR * D;
  extern __shared__ unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023));
  T* sV = sK + BC * D;
  T* sQ = sV + BC * D;        // NS stages of BR × D
  T* sdO = sQ + NS * QT;      // NS stages of BR × D
  T* sdS = sdO + NS * QT;     // BC keys × BR queries
  float* sdQ = reinterpret_cast<float*>(sdS + BC * BR);  // per consumer: 64 queries × D, f32
  uint64_t* bars = reinterpret_cast<uint64_t*>(sdQ + 2 * 64 * D);
  uint64_t* kv_full = bars;
  uint64_t* q_full = bars + 1;
  uint64_t* q_empty = q_full + NS;

  const int tid = threadIdx.x, wg = tid >> 7;
  const int bh = blockIdx.y, k0 = blockIdx.x * BC;
  const int offset = n_k - n_q;
  const int n_kr = kv_len ? min(n_k, kv_len[bh]) : n_k;
  const int qb_first = causal ? max(0, k0 - offset) / BR : 0;
  const int n_qb = (n_q + BR - 1) / BR;

  if (tid == 0) {
    mbar_init(kv_full, 1);
    for (int s = 0; s < NS; ++s) {
      mbar_init(q_full + s, 1);
      mbar_init(q_empty + s, 256);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (tid == 0) {
      mbar_expect_tx(kv_full, 2 * BC * D * sizeof(T));
      tma_tile<T, D, BC>(sK, tmK, k0, bh, kv_full);
      tma_tile<T, D, BC>(sV, tmV, k0, bh, kv_full);
      for (int qb = qb_first, j = 0; qb < n_qb; ++qb, ++j) {
        const int s = j % NS;
        if (j >= NS) mbar_wait(q_empty + s, ((j / NS) & 1) ^ 1);
        mbar_expect_tx(q_full + s, 2 * QT * sizeof(T));
        tma_tile<T, D, BR>(sQ + s * QT, tmQ, qb * BR, bh, q_full + s);
        tma_tile<T, D, BR>(sdO + s * QT, tmdO, qb * BR, bh, q_full + s);
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");

  const int c = wg - 1, ctid = tid & 127, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int key_w0 = k0 + c * 64 + warp * 16;  // this warp's 16 keys
  const uint32_t k_c = smem_u32(sK) + c * 64 * 128, v_c = smem_u32(sV) + c * 64 * 128;
  const uint32_t ds_c = smem_u32(sdS) + c * 64 * 128;
  const float* Lh = LSE + (size_t)bh * n_q;
  const float* Dh = Dsum + (size_t)bh * n_q;
  float* dQh = dQacc + (size_t)bh * n_q * D;

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  float st[BR / 8][4], dpt[BR / 8][4];
  mbar_wait(kv_full, 0);
  if (qb_first < n_qb) {
    mbar_wait(q_full, 0);
    issue_s_dp<T, D, BC, BR>(st, dpt, k_c, v_c, smem_u32(sQ), smem_u32(sdO));
  }
  for (int qb = qb_first, j = 0; qb < n_qb; ++qb, ++j) {
    const int s = j % NS, i0 = qb * BR;
    const uint32_t q_s = smem_u32(sQ + s * QT), do_s = smem_u32(sdO + s * QT);
    // L and D of this thread's query columns 8n + 2t + {0, 1}.
    float lq[BR / 8][2], dq_[BR / 8][2];
#pragma unroll
    for (int n = 0; n < BR / 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int q = i0 + n * 8 + 2 * t + e;
        lq[n][e] = q < n_q ? Lh[q] * 1.4426950408889634f : 0.f;
        dq_[n][e] = q < n_q ? Dh[q] : 0.f;
      }
    wgmma_wait<0>();
    pin(st);
    pin(dpt);

    // Pᵀ and dSᵀ, zero where the (key, query) pair does not exist.
    const bool need_mask = (i0 + BR > n_q) || (key_w0 + 16 > n_kr) || (causal && (key_w0 + 15 > i0 + offset));
#pragma unroll
    for (int n = 0; n < BR / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = n * 8 + 2 * t + (e & 1);
        float p = exp2f(fmaf(st[n][e], scale_log2, -lq[n][e & 1]));
        float ds = p * (dpt[n][e] - dq_[n][e & 1]);
        if (need_mask) {
          const int key = key_w0 + g + ((e >> 1) << 3), q = i0 + qi;
          if (q >= n_q || key >= n_kr || (causal && key > q + offset)) p = ds = 0.f;
        }
        st[n][e] = p;
        dpt[n][e] = ds;
      }
    }
    uint32_t pa[BR / 16][4], da[BR / 16][4];
    pack_p<T, BR>(pa, st);
    pack_p<T, BR>(da, dpt);
    // dSᵀ into shared memory (this consumer's 64 key rows), for dQ; every warp of the consumer is
    // past the previous tile's dQ product before it is overwritten.
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + c) : "memory");
#pragma unroll
    for (int n = 0; n < BR / 8; ++n)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = c * 64 + warp * 16 + g + 8 * r;
        *reinterpret_cast<uint32_t*>(sdS + panel_offset<BC>(row, n * 8 + 2 * t)) =
            Ops<T>::pack2(dpt[n][2 * r], dpt[n][2 * r + 1]);
      }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + c) : "memory");

    // dV += Pᵀ dO_i, dK += dSᵀ Q_i (B N-major), dQ_i(c) = dS_c K_c (A = dSᵀ read M-major).
    float dqc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) dqc[i][0] = dqc[i][1] = dqc[i][2] = dqc[i][3] = 0.f;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BR / 16; ++kk) Ops<T>::rs(dv, pa[kk], mn_major<BR>(do_s, kk));
#pragma unroll
    for (int kk = 0; kk < BR / 16; ++kk) Ops<T>::rs(dk, da[kk], mn_major<BR>(q_s, kk));
#pragma unroll
    for (int kk = 0; kk < 64 / 16; ++kk) OpsT<T>::ss_tt(dqc, mn_major<BC>(ds_c, kk), mn_major<BC>(k_c, kk), kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    pin(dv);
    pin(dk);
    pin(dqc);
    pin(pa);
    pin(da);
    mbar_arrive(q_empty + s);  // Q_i and dO_i are free

    // The next tile's products run while this tile's dQ goes out. After the last tile the same
    // products run on K and V alone (their result is dropped), so that every iteration starts
    // with them in flight: one shape of pipeline for the compiler.
    if (qb + 1 < n_qb) {
      const int s1 = (j + 1) % NS;
      mbar_wait(q_full + s1, ((j + 1) / NS) & 1);
      issue_s_dp<T, D, BC, BR>(st, dpt, k_c, v_c, smem_u32(sQ + s1 * QT), smem_u32(sdO + s1 * QT));
    } else {
      issue_s_dp<T, D, BC, BR>(st, dpt, k_c, v_c, k_c, v_c);
    }

    // dQ_i(c) into this consumer's f32 buffer, then one bulk reduce-add of the tile's rows into
    // the dQ buffer by the TMA unit (cp.reduce.async.bulk), which runs on while we go on.
    float* my_dq = sdQ + c * 64 * D;
    if (ctid == 0) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");  // the previous one has read it
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + c) : "memory");
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = warp * 16 + g + 8 * r;
        *reinterpret_cast<float2*>(my_dq + row * D + dn * 8 + 2 * t) = make_float2(dqc[dn][2 * r], dqc[dn][2 * r + 1]);
      }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + c) : "memory");
    if (ctid == 0) {
      const int rows = min(BR, n_q - i0);
      asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
                   "cp.async.bulk.commit_group;\n" ::"l"(dQh + (size_t)i0 * D),
                   "r"(smem_u32(my_dq)), "r"(rows * D * 4)
                   : "memory");
    }
  }

  wgmma_wait<0>();  // the dropped products of the last iteration
  if (ctid == 0) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");

  // dK = scale · dSᵀ Q, dV = Pᵀ dO for the keys that exist in the tensor.
  T* dKh = dK + (size_t)bh * n_k * D;
  T* dVh = dV + (size_t)bh * n_k * D;
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

}  // namespace hopper

#define BWD_WGMMA(NAME, T, D, NS)                                                                           \
  extern "C" __global__ void __launch_bounds__(384, 1) NAME(                                               \
      const __grid_constant__ hopper::TensorMap tmQ, const __grid_constant__ hopper::TensorMap tmK,        \
      const __grid_constant__ hopper::TensorMap tmV, const __grid_constant__ hopper::TensorMap tmdO,       \
      const float* LSE, const float* Dsum, float* dQacc, T* dK, T* dV, int n_q, int n_k, int d, float scale, \
      float scale_log2, int causal, const int* kv_len) {                                                    \
    hopper::bwd_wgmma<T, D, NS>(&tmQ, &tmK, &tmV, &tmdO, LSE, Dsum, dQacc, dK, dV, n_q, n_k, scale,         \
                                scale_log2, causal, kv_len);                                                \
  }

// Swapping axes 1 and 2 of a contiguous 4-D tensor (shared::heads): the head split
// (batch, seq, heads, d_head) → (batch, heads, seq, d_head) of attention, and the merge back.
//
//   out[a, c, b, :] = in[a, b, c, :]          in (A, B, C, R) → out (A, C, B, R), both contiguous
//
// Nothing is computed: each row of R units moves as a whole, so the kernel copies raw bytes in the
// widest unit U (16, 8, 4 or 2 bytes: every float dtype has at least 2) that divides a row and
// both buffers' alignment — a
// (…, 32)-element bf16 row is four 16-byte loads instead of 32 two-byte ones. One thread per unit
// of the output: writes are coalesced, reads come in runs of R units. 32-bit index arithmetic
// when it cannot overflow (integer division is the cost here), 64-bit otherwise.
//
// Build: nvcc --ptx -arch=compute_90 (build.rs).

#include "common.cuh"

template <typename U, typename I>
__device__ void swap12(const U *in, U *out, I B, I C, I R, I n) {
  for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (I)gridDim.x * blockDim.x) {
    // i = ((a·C + c)·B + b)·R + r, an index of the output
    const I r = i % R;
    I t = i / R;
    const I b = t % B;
    t /= B;
    const I c = t % C;
    const I a = t / C;
    out[i] = in[((a * B + b) * C + c) * R + r];
  }
}

// One kernel per unit; 32-bit indices when the last index plus one grid stride still fits.
#define SWAP12_KERNEL(U, NAME)                                                                        \
  extern "C" __global__ void swap12_##NAME(const U *in, U *out, int64_t B, int64_t C, int64_t R,     \
                                           int64_t n) {                                               \
    if (n + (int64_t)gridDim.x * blockDim.x <= INT32_MAX) {                                           \
      swap12<U, int>(in, out, (int)B, (int)C, (int)R, (int)n);                                        \
    } else {                                                                                          \
      swap12<U, int64_t>(in, out, B, C, R, n);                                                        \
    }                                                                                                 \
  }

SWAP12_KERNEL(uint4, u128)
SWAP12_KERNEL(uint2, u64)
SWAP12_KERNEL(unsigned int, u32)
SWAP12_KERNEL(unsigned short, u16)

// hopper.cu — Hopper's warpgroup tensor-core instructions (wgmma, sm_90a) and the kernels
// built on them.
//
// wgmma needs the architecture-specific target compute_90a, which a compute-capability 9.0
// device (H100, H200) compiles every kernel file for; this file holds only wgmma kernels, so
// every other device leaves it out (`sources::arch_for`), and compiled for any other target
// (CI compiles every file for sm_80–90) each kernel here is a trap. The emulator runs the same kernels through
// chingu_emu::wgmma_* (cuda_emu.h documents the layouts and the timing it emulates).
//
// The wgmma wrappers themselves (chingu::wgmma_rs, wgmma_ss, wgmma_desc, …) are in
// common.cuh, for the attention kernels too.
//
// `wgmma_tile_*` are probes, not training kernels: one warpgroup computes D[64×N] =
// A[64×K]·B[K×N] through wgmma with B — and, where asked, A — staged in shared memory in one
// of the ISA's canonical layouts (`layout`, below). The GPU tests compare them with the CPU's
// product on the emulator and on an H100 or H200, so the descriptor and layout reading that
// the emulator and these wrappers share is checked on the hardware before any attention
// kernel depends on it.
#include "common.cuh"

namespace {

// The layouts a probe stages B [K×N] in (`layout`), as byte offsets in the staged tile
// (1024-byte aligned, so the swizzle of an offset is the swizzle of its address):
//   0 K-major, 128-byte swizzle: B's N columns as rows of K; 64 k a 128-byte row, 8 rows an
//     atom (1024 B), 16-byte chunk c of row r at chunk c ^ (r % 8); K past 64 in further
//     panels of N × 128 bytes. Descriptor: start at the k-step's panel + (k % 64)·2, SBO 1024.
//   1 MN-major, 128-byte swizzle: B's K rows, 64 n a 128-byte row, 8 rows an atom, swizzled
//     alike; N past 64 in further panels of K × 128 bytes (LBO), groups of 8 rows 1024 B
//     apart (SBO). Descriptor: start + k-step·2048.
//   2 K-major, no swizzle: 8 × 8 core matrices (8 rows of 16 bytes, 128 bytes in a row),
//     (n/8, k/8) at (n/8)·K·16 + (k/8)·128: LBO 128, SBO K·16.
//   3 MN-major, no swizzle: core matrices of 8 k rows × 8 n, (n/8, k/8) at (n/8)·K·16 +
//     (k/8)·128: LBO 128, SBO K·16.
// A, staged when `a_in_smem`, is K-major with the 128-byte swizzle (layout 0 with rows m).
constexpr int LAYOUTS = 4;

#ifdef CHINGU_WGMMA
__device__ __forceinline__ unsigned swizzle128(unsigned off) {
    return off ^ (((off >> 7) & 7u) << 4);
}

/// Byte offset of element (row k, column n) of B [K×N] staged in `layout`.
template <int N, int K>
__device__ __forceinline__ unsigned staged_offset(int layout, unsigned k, unsigned n) {
    switch (layout) {
    case 0:
        return swizzle128((k / 64) * N * 128 + (n / 8) * 1024 + (n % 8) * 128 + (k % 64) * 2);
    case 1:
        return swizzle128((n / 64) * K * 128 + (k / 8) * 1024 + (k % 8) * 128 + (n % 64) * 2);
    case 2:
        return (n / 8) * K * 16 + (k / 8) * 128 + (n % 8) * 16 + (k % 8) * 2;
    default:
        return (n / 8) * K * 16 + (k / 8) * 128 + (k % 8) * 16 + (n % 8) * 2;
    }
}

/// B's descriptor for k-step `s` (k = 16s..16s+15) in `layout`.
template <int N, int K>
__device__ __forceinline__ unsigned long long staged_desc(const unsigned char* tile, int layout,
                                                          int s) {
    using namespace chingu;
    const int k0 = 16 * s;
    switch (layout) {
    case 0:
        return wgmma_desc(tile + (k0 / 64) * N * 128 + (k0 % 64) * 2, 16, 1024,
                          WGMMA_SWIZZLE_128B);
    case 1:
        return wgmma_desc(tile + s * 2048, K * 128, 1024, WGMMA_SWIZZLE_128B);
    default:
        return wgmma_desc(tile + s * 256, 128, K * 16, WGMMA_NO_SWIZZLE);
    }
}

/// The mainloop of `wgmma_tile` for one layout and A source (a template, so each path keeps
/// its accumulators in the same registers from the first wgmma to the wait).
template <int N, int K, int LAYOUT, bool A_IN_SMEM>
__device__ __forceinline__ void wgmma_tile_loop(float (&acc)[N / 2],
                                                unsigned (&frag)[K / 16][4],
                                                const unsigned char* tile_a,
                                                const unsigned char* tile_b) {
    using namespace chingu;
    constexpr int TRANS_B = LAYOUT == 1 || LAYOUT == 3;
    unsigned (&flat)[4 * (K / 16)] = reinterpret_cast<unsigned (&)[4 * (K / 16)]>(frag);
    wgmma_fence_operands(acc);
    wgmma_fence_operands(flat);
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < K / 16; ++s) {
        const unsigned long long b_desc = staged_desc<N, K>(tile_b, LAYOUT, s);
        if constexpr (A_IN_SMEM) {
            const int k0 = 16 * s;
            const unsigned long long a_desc = wgmma_desc(
                tile_a + (k0 / 64) * 64 * 128 + (k0 % 64) * 2, 16, 1024, WGMMA_SWIZZLE_128B);
            wgmma_ss<N, TRANS_B>(acc, a_desc, b_desc, s > 0);
        } else {
            wgmma_rs<N, TRANS_B>(acc, frag[s], b_desc, s > 0);
        }
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(acc);
    wgmma_fence_operands(flat);  // A's registers were the products' until now
}

#endif  // CHINGU_WGMMA

/// D [64×N] fp32 = A [64×K] · B [K×N] (fp16, row-major) through wgmma, one warpgroup (128
/// threads), one block; dynamic shared memory K·N·2 (+ 64·K·2 with `a_in_smem`) + 1024.
template <int N, int K>
__device__ __forceinline__ void wgmma_tile(float* d, const __half* a, const __half* b,
                                           int layout, int a_in_smem) {
    if (blockDim.x != 128 || layout < 0 || layout >= LAYOUTS) __trap();
#ifdef CHINGU_WGMMA
    using namespace chingu;
    CHINGU_DYNAMIC_SMEM(unsigned char, raw);
    const unsigned pad = (1024u - shared_offset(raw) % 1024u) % 1024u;
    unsigned char* tile_b = raw + pad;
    unsigned char* tile_a = tile_b + K * N * 2;  // a multiple of 1024 bytes
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    for (int i = tid; i < K * N; i += 128) {
        const int k = i / N, n = i % N;
        *reinterpret_cast<__half*>(tile_b + staged_offset<N, K>(layout, k, n)) = b[i];
    }
    if (a_in_smem)
        for (int i = tid; i < 64 * K; i += 128) {
            const int m = i / K, k = i % K;
            *reinterpret_cast<__half*>(tile_a + staged_offset<64, K>(0, k, m)) = a[i];
        }
    fence_proxy_async_shared();
    __syncthreads();
    // Every k-step's A fragment loaded first: a wgmma owns its registers until the wait.
    unsigned frag[K / 16][4];
    const __half* rows = a + (16 * warp + g) * K;
#pragma unroll
    for (int s = 0; s < K / 16; ++s) {
        const int k = 16 * s + 2 * t;
        frag[s][0] = pack_halves(rows[k], rows[k + 1]);
        frag[s][1] = pack_halves(rows[8 * K + k], rows[8 * K + k + 1]);
        frag[s][2] = pack_halves(rows[k + 8], rows[k + 9]);
        frag[s][3] = pack_halves(rows[8 * K + k + 8], rows[8 * K + k + 9]);
    }
    float acc[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) acc[i] = 0.0f;
    switch (layout * 2 + (a_in_smem != 0)) {
    case 0: wgmma_tile_loop<N, K, 0, false>(acc, frag, tile_a, tile_b); break;
    case 1: wgmma_tile_loop<N, K, 0, true>(acc, frag, tile_a, tile_b); break;
    case 2: wgmma_tile_loop<N, K, 1, false>(acc, frag, tile_a, tile_b); break;
    case 3: wgmma_tile_loop<N, K, 1, true>(acc, frag, tile_a, tile_b); break;
    case 4: wgmma_tile_loop<N, K, 2, false>(acc, frag, tile_a, tile_b); break;
    case 5: wgmma_tile_loop<N, K, 2, true>(acc, frag, tile_a, tile_b); break;
    case 6: wgmma_tile_loop<N, K, 3, false>(acc, frag, tile_a, tile_b); break;
    default: wgmma_tile_loop<N, K, 3, true>(acc, frag, tile_a, tile_b); break;
    }
    float* out = d + (16 * warp + g) * N;
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
        const int c = 8 * j + 2 * t;
        out[c] = acc[4 * j];
        out[c + 1] = acc[4 * j + 1];
        out[8 * N + c] = acc[4 * j + 2];
        out[8 * N + c + 1] = acc[4 * j + 3];
    }
#else
    (void)d, (void)a, (void)b, (void)a_in_smem;
    __trap();
#endif
}

}  // namespace

/// The probes (see the file comment): N 64 over K 192 (three K-major panels), N 192 over K
/// 64 (three MN-major panels).
extern "C" __global__ void __launch_bounds__(128)
    wgmma_tile_n64_k192_f16(float* d, const __half* a, const __half* b, int layout, int a_in_smem) {
    wgmma_tile<64, 192>(d, a, b, layout, a_in_smem);
}

extern "C" __global__ void __launch_bounds__(128)
    wgmma_tile_n192_k64_f16(float* d, const __half* a, const __half* b, int layout, int a_in_smem) {
    wgmma_tile<192, 64>(d, a, b, layout, a_in_smem);
}

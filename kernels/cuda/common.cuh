// common.cuh — included first by every kernel file in kernels/cuda/.
//
// Selects the real CUDA headers (NVRTC, at run time and in CI) or our CPU emulation layer
// (g++, CHINGU_EMU defined: kernels/cuda/emu/cuda_emu.h), and holds the small device helpers
// the kernels share: warp and block reductions and the SplitMix64 mix used by dropout.
//
// Conventions for every kernel in this directory:
// - `extern "C"` names `{op}_{dtype}`; sizes are `int` (launchers check they fit).
// - Activations, weights in compute and activation gradients are fp16 (`__half`); every sum,
//   product chain and reduction is done in fp32 (double where a reduction must be exact
//   enough to be order-insensitive at fp32, e.g. the global gradient norm).
// - Parameter gradients are fp32 and accumulated (`+=`), as in the CPU backend; master
//   weights and AdamW moments are fp32.
// - No float atomics on any path whose result is kept: every reduction has a fixed order,
//   so a kernel gives the same bits on every run.
// - When compiled for the emulator, this header must stay the only local include: the CUDA
//   runtime inlines it textually into each kernel file before handing it to NVRTC.
#pragma once

#ifdef CHINGU_EMU
#include "emu/cuda_emu.h"
#else
#include <cuda_fp16.h>
#include <mma.h>
#define CHINGU_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace chingu {

constexpr unsigned FULL_MASK = 0xffffffffu;

/// d = a·b + c for one 16×8×16 tile on the tensor cores (fp16 in, fp32 accumulate): the PTX
/// instruction mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32, a warp collective, with
/// the ISA's documented register layout (g = lane / 4, t = lane % 4; a register holds two
/// halves, the lower-indexed element in its low 16 bits):
///   a[0] = A(g, 2t..2t+1), a[1] = A(g+8, 2t..), a[2] = A(g, 2t+8..), a[3] = A(g+8, 2t+8..);
///   b[0] = B(2t..2t+1, g), b[1] = B(2t+8..2t+9, g);
///   c[0], c[1] = C(g, 2t), C(g, 2t+1); c[2], c[3] = C(g+8, 2t), C(g+8, 2t+1).
/// The emulator implements the same layout (cuda_emu.h), so kernels may rely on it.
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4],
                                          const unsigned (&b)[2], const float (&c)[4]) {
#ifdef CHINGU_EMU
    chingu_emu::mma_m16n8k16(d, a, b, c);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

/// Two halves as one register, `lo` in the low 16 bits.
__device__ __forceinline__ unsigned pack_halves(__half lo, __half hi) {
    return (unsigned)__half_as_ushort(lo) | ((unsigned)__half_as_ushort(hi) << 16);
}

/// Two floats rounded to fp16 as one register, `lo` in the low 16 bits.
__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
    return pack_halves(__float2half_rn(lo), __float2half_rn(hi));
}

/// The two adjacent halves at `p` (4-byte aligned) as one register: one 32-bit load.
__device__ __forceinline__ unsigned load_pair(const __half* p) {
#ifdef CHINGU_EMU
    if (reinterpret_cast<unsigned long long>(p) & 3ull) __trap();  // a GPU would fault
    return pack_halves(p[0], p[1]);
#else
    return *reinterpret_cast<const unsigned*>(p);
#endif
}

/// ldmatrix (a warp collective; every lane of the warp calls it with its own row): four 8 × 8
/// matrices of halves from shared memory, matrix i's 8 rows at the addresses lanes 8i..8i + 7
/// give (16-byte aligned). Lane (g = lane/4, t = lane%4) receives, in r[i], matrix i's row g,
/// columns 2t and 2t + 1 (low half first) — an mma_16816 fragment register.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const __half* row) {
#ifdef CHINGU_EMU
    if (reinterpret_cast<unsigned long long>(row) & 15ull) __trap();  // a GPU would fault
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const unsigned long long mine = reinterpret_cast<unsigned long long>(row);
    for (int i = 0; i < 4; ++i) {
        const __half* src =
            reinterpret_cast<const __half*>(__shfl_sync(0xffffffffu, mine, 8 * i + g));
        r[i] = pack_halves(src[2 * t], src[2 * t + 1]);
    }
#else
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#endif
}

/// ldmatrix with .trans: as `ldmatrix_x4`, but lane (g, t) receives matrix i's column g, rows
/// 2t and 2t + 1 (low half first): the B fragment of a row-major [k][n] tile.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const __half* row) {
#ifdef CHINGU_EMU
    if (reinterpret_cast<unsigned long long>(row) & 15ull) __trap();  // a GPU would fault
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const unsigned long long mine = reinterpret_cast<unsigned long long>(row);
    for (int i = 0; i < 4; ++i) {
        const __half* r0 =
            reinterpret_cast<const __half*>(__shfl_sync(0xffffffffu, mine, 8 * i + 2 * t));
        const __half* r1 =
            reinterpret_cast<const __half*>(__shfl_sync(0xffffffffu, mine, 8 * i + 2 * t + 1));
        r[i] = pack_halves(r0[g], r1[g]);
    }
#else
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#endif
}

#ifdef CHINGU_EMU
namespace emu_async {
/// One 16-byte copy a thread queued with cp_async16 (zeros where `src` is null).
struct Copy {
    unsigned char* dst;
    const unsigned char* src;
};
/// A thread's copies: committed groups, oldest first, and the group still open.
struct Queue {
    std::vector<std::vector<Copy>> committed;
    std::vector<Copy> open;
};
/// Per thread of the running block (blocks run one at a time, launches one at a time),
/// emptied when a new block starts: a kernel waits for all its groups before it ends, but a
/// launch the emulator abandoned on an error leaves copies into memory since freed.
inline std::vector<Queue>& queues() {
    static std::vector<Queue> q(1024);
    static uint64_t block = 0;
    if (block != chingu_emu::detail::g_block_serial) {
        block = chingu_emu::detail::g_block_serial;
        for (Queue& each : q) {
            each.committed.clear();
            each.open.clear();
        }
    }
    return q;
}
inline Queue& mine() {
    const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    return queues()[tid];
}
}  // namespace emu_async
#endif

/// cp.async (sm_80+): queues a 16-byte copy from global to shared memory (both 16-byte
/// aligned), or 16 zero bytes where `valid` is false (nothing is read then). The copy may land
/// any time from now until `cp_async_wait` returns, and other threads see it after a barrier
/// that follows that wait. The emulator takes the two extremes: in order, at the wait (a read
/// before the wait sees the old bytes); under a shuffled schedule, at once (overwriting a tile
/// other warps may still read, where a barrier before the copy is missing). A compared launch
/// runs both, so either mistake changes the result.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#ifdef CHINGU_EMU
    const unsigned long long addresses =
        reinterpret_cast<unsigned long long>(smem) | reinterpret_cast<unsigned long long>(gmem);
    if (addresses & 15ull) __trap();  // a GPU would fault
    const emu_async::Copy copy{static_cast<unsigned char*>(smem),
                               valid ? static_cast<const unsigned char*>(gmem) : nullptr};
    if (chingu_emu::schedule_seed() != 0) {
        if (copy.src) std::memcpy(copy.dst, copy.src, 16);
        else std::memset(copy.dst, 0, 16);
        return;
    }
    emu_async::mine().open.push_back(copy);
#else
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem),
                 "r"(valid ? 16 : 0)
                 : "memory");
#endif
}

/// Closes this thread's group of queued copies (cp.async.commit_group).
__device__ __forceinline__ void cp_async_commit() {
#ifdef CHINGU_EMU
    emu_async::Queue& q = emu_async::mine();
    q.committed.push_back(std::move(q.open));
    q.open.clear();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

/// Waits until at most `PENDING` of this thread's committed groups are still in flight
/// (cp.async.wait_group): the older ones have landed.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
#ifdef CHINGU_EMU
    emu_async::Queue& q = emu_async::mine();
    while (q.committed.size() > static_cast<size_t>(PENDING)) {
        for (const emu_async::Copy& c : q.committed.front()) {
            if (c.src) std::memcpy(c.dst, c.src, 16);
            else std::memset(c.dst, 0, 16);
        }
        q.committed.erase(q.committed.begin());
    }
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#endif
}

/// Eight adjacent halves at `p` (16-byte aligned) as floats: one 128-bit load.
__device__ __forceinline__ void load_half8(float (&v)[8], const __half* p) {
#ifdef CHINGU_EMU
    if (reinterpret_cast<unsigned long long>(p) & 15ull) __trap();  // a GPU would fault
    for (int i = 0; i < 8; ++i) v[i] = __half2float(p[i]);
#else
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = __half2float(__ushort_as_half((unsigned short)(words[i] & 0xffffu)));
        v[2 * i + 1] = __half2float(__ushort_as_half((unsigned short)(words[i] >> 16)));
    }
#endif
}

/// Eight adjacent floats at `p` (16-byte aligned): two 128-bit loads.
__device__ __forceinline__ void load_float8(float (&v)[8], const float* p) {
#ifdef CHINGU_EMU
    if (reinterpret_cast<unsigned long long>(p) & 15ull) __trap();  // a GPU would fault
    for (int i = 0; i < 8; ++i) v[i] = p[i];
#else
    const float4 lo = *reinterpret_cast<const float4*>(p);
    const float4 hi = *reinterpret_cast<const float4*>(p + 4);
    v[0] = lo.x;
    v[1] = lo.y;
    v[2] = lo.z;
    v[3] = lo.w;
    v[4] = hi.x;
    v[5] = hi.y;
    v[6] = hi.z;
    v[7] = hi.w;
#endif
}

/// Eight adjacent halves, still packed two a word: four registers instead of eight floats'.
struct Half8 {
    unsigned words[4];
};

/// Eight adjacent halves at `p` (16-byte aligned), packed: one 128-bit load.
__device__ __forceinline__ Half8 load_half8_packed(const __half* p) {
    Half8 h;
#ifdef CHINGU_EMU
    if (reinterpret_cast<unsigned long long>(p) & 15ull) __trap();  // a GPU would fault
    for (int i = 0; i < 4; ++i)
        h.words[i] = (unsigned)__half_as_ushort(p[2 * i]) |
                     ((unsigned)__half_as_ushort(p[2 * i + 1]) << 16);
#else
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    h.words[0] = raw.x;
    h.words[1] = raw.y;
    h.words[2] = raw.z;
    h.words[3] = raw.w;
#endif
    return h;
}

/// The eight floats of a packed load.
__device__ __forceinline__ void unpack_half8(float (&v)[8], const Half8& h) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = __half2float(__ushort_as_half((unsigned short)(h.words[i] & 0xffffu)));
        v[2 * i + 1] = __half2float(__ushort_as_half((unsigned short)(h.words[i] >> 16)));
    }
}

/// Eight floats rounded to fp16 (nearest even) at `p` (16-byte aligned): one 128-bit store.
__device__ __forceinline__ void store_half8(__half* p, const float (&v)[8]) {
#ifdef CHINGU_EMU
    if (reinterpret_cast<unsigned long long>(p) & 15ull) __trap();  // a GPU would fault
    for (int i = 0; i < 8; ++i) p[i] = __float2half_rn(v[i]);
#else
    uint4 raw;
    raw.x = pack_half2(v[0], v[1]);
    raw.y = pack_half2(v[2], v[3]);
    raw.z = pack_half2(v[4], v[5]);
    raw.w = pack_half2(v[6], v[7]);
    *reinterpret_cast<uint4*>(p) = raw;
#endif
}

/// -inf without <math.h> (NVRTC has no INFINITY macro).
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

/// log2(e): exp(x) = exp2(x·LOG2E), the form every softmax here takes (see exp2_approx).
inline constexpr float LOG2E = 1.4426950408889634f;

/// 2^x on the special-function unit (`ex2.approx.ftz.f32`): one MUFU.EX2, where exp2f without
/// fast math wraps it in a subnormal-range fix-up (a compare, two multiplies, predicate
/// logic; NVRTC 13.0, sm_90). Results below 2^−126 are flushed to 0 and 2^−inf = 0, so a masked score (−inf)
/// needs no test. Relative error about 2^−22 (PTX ISA), as exp2f's 2 ulp; inputs that small
/// only ever weigh a softmax term against a row sum of at least 1. The emulator computes
/// exp2f and flushes what would be subnormal.
__device__ __forceinline__ float exp2_approx(float x) {
#ifdef CHINGU_EMU
    const float r = exp2f(x);
    return r < 1.17549435e-38f ? 0.0f : r;  // FLT_MIN: flush to zero as the GPU does
#else
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#endif
}

/// Sum over the 32 lanes of a full warp; every lane gets the total. The butterfly order is
/// fixed, so the result is the same on every run.
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ double warp_sum(double v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

/// Sum over a 1-D block whose size is a multiple of 32 (at most 1024); every thread gets the
/// total. `scratch` is 32 floats of shared memory; the call ends with a barrier, so the
/// caller may reuse `scratch` right after.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = lane < warps ? scratch[lane] : 0.0f;
    total = warp_sum(total);
    __syncthreads();
    return total;
}

__device__ __forceinline__ double block_sum(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double total = lane < warps ? scratch[lane] : 0.0;
    total = warp_sum(total);
    __syncthreads();
    return total;
}

/// Maximum over a 1-D block (see `block_sum`).
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = lane < warps ? scratch[lane] : neg_inf();
    total = warp_max(total);
    __syncthreads();
    return total;
}

/// Multi-tensor launches: tensor t owns blocks [first_t, first_t + blocks_t) of the grid, with
/// `first` the descriptor field at `first_field` of each `fields`-wide u64 descriptor.
/// Returns the t whose range holds blockIdx.x (binary search; ranges ascend with t).
__device__ __forceinline__ int tensor_of_block(const unsigned long long* desc, int tensors,
                                               int fields, int first_field) {
    int lo = 0, hi = tensors - 1;
    const unsigned long long b = blockIdx.x;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (desc[(long long)mid * fields + first_field] <= b) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/// SplitMix64's finaliser, bit for bit as `kernels/src/rng.rs::mix`.
__device__ __forceinline__ unsigned long long splitmix_mix(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/// Dropout of the eight elements i..i + 7 (flat indices into their buffer) in `v`: each kept
/// and scaled (rounded to fp16) or zero, by dropout.cu's mask (element j kept when
/// mix(base + (j + 1)·γ) ≥ threshold). Shared by the dropout kernels and the LayerNorm kernels
/// that fuse a dropout, so each fused kernel gives the unfused pair's bits.
__device__ __forceinline__ void dropped8(float (&v)[8], long long i, unsigned long long base,
                                         unsigned long long threshold, float keep_scale) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const unsigned long long h =
            splitmix_mix(base + (unsigned long long)(i + e + 1) * 0x9e3779b97f4a7c15ull);
        v[e] = h >= threshold ? __half2float(__float2half_rn(v[e] * keep_scale)) : 0.0f;
    }
}

}  // namespace chingu

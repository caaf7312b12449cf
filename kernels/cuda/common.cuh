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
            reinterpret_cast<const __half*>(__shfl_sync(FULL_MASK, mine, 8 * i + g));
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
            reinterpret_cast<const __half*>(__shfl_sync(FULL_MASK, mine, 8 * i + 2 * t));
        const __half* r1 =
            reinterpret_cast<const __half*>(__shfl_sync(FULL_MASK, mine, 8 * i + 2 * t + 1));
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

/// The hash that decides dropout for elements 4·group .. 4·group + 3 (16 bits each, element
/// 4·group + e from bit 16·e): `cpu::dropout_hash`, bit for bit.
__device__ __forceinline__ unsigned long long dropout_hash(unsigned long long base,
                                                           long long group) {
    return splitmix_mix(base + (unsigned long long)(group + 1) * 0x9e3779b97f4a7c15ull);
}

/// Element e (0..3) of a group's 16-bit mask values in its `dropout_hash`: the element is kept
/// when the value is ≥ the threshold. The one place the mask's bits are read.
__device__ __forceinline__ bool dropout_keeps(unsigned long long hash, int e,
                                              unsigned long long threshold) {
    return ((hash >> (16 * e)) & 0xffffull) >= threshold;
}

/// Dropout of the eight elements i..i + 7 (flat indices into their buffer, i a multiple of 8)
/// in `v`: each kept and scaled (rounded to fp16) or zero, by dropout.cu's mask (element j
/// kept when its 16-bit value ≥ threshold): two hashes for the eight. Shared by the dropout
/// kernels and the LayerNorm kernels that fuse a dropout, so each fused kernel gives the
/// unfused pair's bits.
__device__ __forceinline__ void dropped8(float (&v)[8], long long i, unsigned long long base,
                                         unsigned long long threshold, float keep_scale) {
#ifdef CHINGU_EMU
    if (i % 8 != 0) __trap();  // the lanes below assume whole groups
#endif
    const unsigned long long hash[2] = {dropout_hash(base, i / 4), dropout_hash(base, i / 4 + 1)};
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        v[e] = dropout_keeps(hash[e / 4], e % 4, threshold)
                   ? __half2float(__float2half_rn(v[e] * keep_scale))
                   : 0.0f;
    }
}

// ---------------------------------------------------------------------------------------
// Hopper's warpgroup MMA (wgmma, PTX ISA 8.0, target sm_90a only). A device of compute
// capability 9.0 compiles every kernel file for compute_90a (`sources::arch_for`), where
// CHINGU_WGMMA is defined; for any other target these wrappers trap, so a kernel using them
// must be launched on a Hopper GPU only (`ops` checks). The emulator implements them
// (cuda_emu.h: the layouts, the descriptors, and a product completing at its wait);
// kernels/cuda/hopper.cu's probes check that reading on an H100.
// ---------------------------------------------------------------------------------------
#if defined(CHINGU_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CHINGU_WGMMA 1
#endif

/// The swizzle of a wgmma operand in shared memory (matrix descriptor bits 62–63).
enum WgmmaSwizzle : unsigned { WGMMA_NO_SWIZZLE = 0, WGMMA_SWIZZLE_128B = 1 };

/// `p`'s offset in the block's shared memory window (what descriptors hold); the emulator's
/// window is the block's dynamic shared memory.
__device__ __forceinline__ unsigned shared_offset(const void* p) {
#ifdef CHINGU_EMU
    return static_cast<unsigned>(static_cast<const unsigned char*>(p) -
                                 static_cast<const unsigned char*>(
                                     chingu_emu::detail::dynamic_smem_ptr()));
#else
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
#endif
}

/// A shared-memory matrix descriptor: start address, leading- and stride-dimension byte
/// offsets (LBO, SBO; multiples of 16), swizzle; base offset 0 (swizzle atoms aligned).
__device__ __forceinline__ unsigned long long wgmma_desc(const void* smem, unsigned lbo,
                                                         unsigned sbo, WgmmaSwizzle swizzle) {
    return (unsigned long long)((shared_offset(smem) >> 4) & 0x3fffu) |
           ((unsigned long long)((lbo >> 4) & 0x3fffu) << 16) |
           ((unsigned long long)((sbo >> 4) & 0x3fffu) << 32) |
           ((unsigned long long)swizzle << 62);
}

#if defined(CHINGU_WGMMA) && !defined(CHINGU_EMU)
// GENERATED by kernels/cuda/tools/gen_wgmma.py (one wrapper per N and A source): edit that.
template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[32], const unsigned (&a)[4],
                                                unsigned long long b_desc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17,"
        "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
          "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
          "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(accumulate), "n"(TRANS_B)
        : "memory");
}

template <int TRANS_B>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], unsigned long long a_desc,
                                                unsigned long long b_desc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17,"
        "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, 0, %35;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
          "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
          "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a_desc), "l"(b_desc), "r"(accumulate), "n"(TRANS_B)
        : "memory");
}

template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[64], const unsigned (&a)[4],
                                                unsigned long long b_desc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17,"
        "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33,"
        "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49,"
        "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
          "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
          "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),
          "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
          "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
          "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),
          "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(accumulate), "n"(TRANS_B)
        : "memory");
}

template <int TRANS_B>
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], unsigned long long a_desc,
                                                unsigned long long b_desc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17,"
        "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33,"
        "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49,"
        "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, %67;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
          "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
          "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),
          "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
          "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
          "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),
          "+f"(d[62]), "+f"(d[63])
        : "l"(a_desc), "l"(b_desc), "r"(accumulate), "n"(TRANS_B)
        : "memory");
}

template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs_n192(float (&d)[96], const unsigned (&a)[4],
                                                unsigned long long b_desc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %101, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n192k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17,"
        "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33,"
        "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49,"
        "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65,"
        "%66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81,"
        "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, "
        "{%96, %97, %98, %99}, %100, p, 1, 1, %102;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
          "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
          "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),
          "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
          "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
          "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),
          "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]),
          "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]),
          "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]),
          "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]),
          "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(accumulate), "n"(TRANS_B)
        : "memory");
}

template <int TRANS_B>
__device__ __forceinline__ void wgmma_ss_n192(float (&d)[96], unsigned long long a_desc,
                                                unsigned long long b_desc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n192k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17,"
        "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33,"
        "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49,"
        "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65,"
        "%66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81,"
        "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, "
        "%96, %97, p, 1, 1, 0, %99;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
          "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
          "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),
          "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
          "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
          "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),
          "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]),
          "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]),
          "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]),
          "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]),
          "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
        : "l"(a_desc), "l"(b_desc), "r"(accumulate), "n"(TRANS_B)
        : "memory");
}

template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs_n256(float (&d)[128], const unsigned (&a)[4],
                                                unsigned long long b_desc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17,"
        "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33,"
        "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49,"
        "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65,"
        "%66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81,"
        "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97,"
        "%98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111,"
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124,"
        "%125, %126, %127}, "
        "{%128, %129, %130, %131}, %132, p, 1, 1, %134;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
          "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
          "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),
          "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
          "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
          "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),
          "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]),
          "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]),
          "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]),
          "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]),
          "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]),
          "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
          "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
          "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),
          "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(accumulate), "n"(TRANS_B)
        : "memory");
}

template <int TRANS_B>
__device__ __forceinline__ void wgmma_ss_n256(float (&d)[128], unsigned long long a_desc,
                                                unsigned long long b_desc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17,"
        "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33,"
        "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49,"
        "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65,"
        "%66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81,"
        "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97,"
        "%98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111,"
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124,"
        "%125, %126, %127}, "
        "%128, %129, p, 1, 1, 0, %131;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
          "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
          "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),
          "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
          "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
          "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),
          "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]),
          "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]),
          "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]),
          "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]),
          "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]),
          "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
          "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
          "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),
          "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(a_desc), "l"(b_desc), "r"(accumulate), "n"(TRANS_B)
        : "memory");
}
// END GENERATED
#endif

/// wgmma.fence: orders this thread's earlier register writes (accumulators, A fragments)
/// before the wgmma that reads them.
__device__ __forceinline__ void wgmma_fence() {
#if defined(CHINGU_WGMMA) && !defined(CHINGU_EMU)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

/// Pins registers a wgmma reads or writes (accumulators, A fragments) across its issue,
/// fence and wait: an empty asm reading and writing each, so the compiler neither moves their
/// other uses across nor reuses A's registers before the wait completes the product (what
/// CUTLASS's warpgroup_fence_operand does). Call it before `wgmma_fence` and after
/// `wgmma_wait`.
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[N]) {
#if defined(CHINGU_WGMMA) && !defined(CHINGU_EMU)
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
    (void)d;
#endif
}

template <int N>
__device__ __forceinline__ void wgmma_fence_operands(unsigned (&a)[N]) {
#if defined(CHINGU_WGMMA) && !defined(CHINGU_EMU)
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(a[i])::"memory");
#else
    (void)a;
#endif
}

/// fence.proxy.async.shared::cta: makes this thread's ordinary shared-memory stores visible
/// to the tensor cores' reads (before the barrier that precedes the wgmma).
__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(CHINGU_WGMMA) && !defined(CHINGU_EMU)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

/// wgmma.commit_group: this thread's wgmmas issued since the last commit become one group.
__device__ __forceinline__ void wgmma_commit() {
#ifdef CHINGU_EMU
    chingu_emu::wgmma_commit();
#elif defined(CHINGU_WGMMA)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

/// wgmma.wait_group PENDING: all but the newest PENDING groups are complete (their D
/// written, their A registers and shared memory free to change).
template <int PENDING>
__device__ __forceinline__ void wgmma_wait() {
#ifdef CHINGU_EMU
    chingu_emu::wgmma_wait(PENDING);
#elif defined(CHINGU_WGMMA)
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
#endif
}

/// D[64×N] = A·B (+ D when `accumulate`), A [64×16] from registers (this warp's 16 rows, in
/// mma_16816's A layout), B [16×N] from shared memory (`b_desc`; TRANS_B 0: K-major, 1:
/// MN-major). Asynchronous: D, `a` and B's shared memory belong to the wgmma until a
/// `wgmma_wait` completes its group.
template <int N, int TRANS_B>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const unsigned (&a)[4],
                                         unsigned long long b_desc, bool accumulate) {
    static_assert(N == 64 || N == 128 || N == 192 || N == 256, "no wrapper for this N");
#ifdef CHINGU_EMU
    chingu_emu::wgmma_mma(d, a, 0, b_desc, N, TRANS_B != 0, accumulate);
#elif defined(CHINGU_WGMMA)
    if constexpr (N == 64) wgmma_rs_n64<TRANS_B>(d, a, b_desc, accumulate);
    else if constexpr (N == 128) wgmma_rs_n128<TRANS_B>(d, a, b_desc, accumulate);
    else if constexpr (N == 192) wgmma_rs_n192<TRANS_B>(d, a, b_desc, accumulate);
    else wgmma_rs_n256<TRANS_B>(d, a, b_desc, accumulate);
#else
    __trap();
#endif
}

/// As `wgmma_rs`, A [64×16] from shared memory too (`a_desc`, K-major).
template <int N, int TRANS_B>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], unsigned long long a_desc,
                                         unsigned long long b_desc, bool accumulate) {
    static_assert(N == 64 || N == 128 || N == 192 || N == 256, "no wrapper for this N");
#ifdef CHINGU_EMU
    chingu_emu::wgmma_mma(d, nullptr, a_desc, b_desc, N, TRANS_B != 0, accumulate);
#elif defined(CHINGU_WGMMA)
    if constexpr (N == 64) wgmma_ss_n64<TRANS_B>(d, a_desc, b_desc, accumulate);
    else if constexpr (N == 128) wgmma_ss_n128<TRANS_B>(d, a_desc, b_desc, accumulate);
    else if constexpr (N == 192) wgmma_ss_n192<TRANS_B>(d, a_desc, b_desc, accumulate);
    else wgmma_ss_n256<TRANS_B>(d, a_desc, b_desc, accumulate);
#else
    __trap();
#endif
}


}  // namespace chingu

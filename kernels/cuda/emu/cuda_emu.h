// cuda_emu.h — run CUDA kernel sources on the CPU, with CUDA semantics (chingu).
//
// WHAT IT IS
//   A self-contained C++17 header (g++ 12, Linux, x86-64 or any glibc target with
//   <ucontext.h>) that lets ordinary `.cu` kernel sources compile as C++ and execute on
//   the CPU, in the spirit of Numba's CUDA simulator. It is used in CI to run every
//   hand-written kernel against a CPU reference. Correctness and clear failure messages
//   come first; speed second (a launch of 64 blocks x 256 threads takes milliseconds).
//   Kernel sources reach it through common.cuh when CHINGU_EMU is defined; compile them
//   with `g++ -std=c++17 -x c++ -DCHINGU_EMU -Wno-unknown-pragmas` (`#pragma unroll`).
//   Under -fsanitize=address every fiber switch is annotated for ASan, and an ASan report
//   raised inside a kernel is preceded by a line naming kernel/block/thread.
//
// EXECUTION MODEL
//   * chingu_emu::launch(name, kernel, grid, block, dynamic_smem_bytes, args...) runs the
//     whole grid and returns when it is done (launches are synchronous; there are no
//     streams). Blocks run one after another in x-fastest order. The threads of a block
//     run as cooperative fibers (ucontext), each on its own CHINGU_EMU_STACK_BYTES stack
//     with a PROT_NONE guard region below it (an overflow is reported by name, not as a
//     bare SIGSEGV). A fiber runs until it blocks in a barrier / warp collective or
//     returns; the next runnable fiber is then resumed (FIFO). The schedule depends only on
//     the kernel and its inputs, so results are deterministic run to run.
//   * Shuffled schedules (SCHEDULES below): with a nonzero chingu_emu::schedule_seed() the
//     blocks run in a seeded random order and, whenever a thread blocks, a seeded random
//     runnable thread runs next, so a data race shows up as a result that changes with the
//     seed.
//   * All launches in the process are serialized by one global mutex (callers may be on
//     many OS threads, e.g. Rust's test harness); a launch runs on the calling OS thread.
//   * __syncthreads() is a real barrier over the block's threads. Strict mode (default,
//     chingu_emu::config().strict_exit): every thread of a block must execute the same
//     sequence of __syncthreads() calls, at the same call sites, before it returns; a
//     thread that exits while another thread has reached a __syncthreads() it never
//     reached is reported as a divergent barrier (CUDA: undefined behaviour). With
//     strict_exit = false, exited threads count as arrived (what Volta+ hardware does) and
//     warp collectives silently drop exited lanes. Arrivals at two different call sites
//     for the same barrier are always an error. If no fiber can run while some have not
//     finished, the launch fails with a report of what every stuck thread waits on.
//   * Warp = 32 consecutive linear thread ids (linear = x + y*Dx + z*Dx*Dy); a last
//     partial warp has fewer lanes. Warp collectives (__shfl*_sync, votes, __syncwarp,
//     __reduce_*_sync, WMMA) rendezvous the non-exited lanes named in `mask`; the calling
//     lane must be in its mask, all participants must pass the same mask (else they
//     deadlock, which is reported) and call the same kind of collective. Lanes named in
//     a mask that do not exist in the block (a partial warp) are ignored. A shuffle that
//     reads a lane which does not take part returns a poison value (all bits 1: NaN for
//     float/half, -1 for ints). One rendezvous per collective: each lane deposits its
//     value in a per-lane slot, and the lane that completes the rendezvous computes every
//     participant's result.
//   * Errors inside a kernel (deadlock, divergent barrier, bad mask, failed assert(),
//     __trap(), WMMA misuse, C++ exception) abandon the launch and make launch() throw
//     chingu_emu::launch_error whose what() names the kernel, the launch configuration,
//     the block and the thread(s); try_launch() returns the message instead. An uncaught
//     launch_error aborts the process with that message. The emulator stays usable
//     afterwards (the failed launch's fibers are abandoned, not unwound: destructors of
//     objects in their frames do not run).
//
// MEMORY
//   * "Device" memory is ordinary host memory: pass host pointers as kernel arguments.
//     chingu_emu::device_alloc(bytes) gives 256-byte aligned memory filled with 0xFF
//     (like cudaMalloc's alignment; poison like uninitialised memory); device_free().
//   * `__shared__` is `static`: a static shared array is shared by the threads of the
//     block; it keeps its contents from the previous block/launch (zero on first use), so
//     reading static shared memory a block never wrote is NOT detected. Declare
//     `__shared__` only for variables inside functions or at namespace scope.
//   * Dynamic shared memory: CHINGU_DYNAMIC_SMEM(type, name) inside the kernel (or device
//     function) body gives `type* const name`, pointing at a per-launch buffer of exactly
//     the size given at launch, 128-byte aligned, refilled with 0xFF bytes at the start of
//     every block (reads of never-written shared memory give NaN / -1).
//   * Atomics are plain read-modify-writes (all fibers run on one OS thread and switch
//     only at barriers); __threadfence*() are no-ops. Data races are not detected by
//     watching accesses; a shuffled schedule exposes them (SCHEDULES).
//
// SCHEDULES
//   chingu_emu::schedule_seed() is a per-OS-thread setting read at the start of each launch
//   made from that thread. 0 (the default) is the in-order schedule above. Any other value
//   is a seed: the grid's blocks run in a random permutation, and each time a thread blocks
//   (barrier, warp collective, return) the next thread is drawn at random from the runnable
//   ones. A thread still runs without interruption from one barrier or collective to the
//   next, so what a schedule changes is which thread's stretch comes first: a read of
//   another thread's write with no barrier (or __syncwarp) between them, a block that reads
//   what another block of the same launch writes, or static __shared__ memory read before
//   it is written in a block. A correct kernel gives the same bits under every seed; the
//   same seed gives the same schedule. Callers compare an in-order run with a shuffled one
//   (the Rust emulated device does this on every launch of the GPU tests).
//
// SUPPORTED
//   __global__ __device__ __host__ __forceinline__ __constant__ __launch_bounds__ __align__,
//   dim3/uint3/int2..4/uint2..4/float2..4/double2 + make_*, threadIdx blockIdx blockDim
//   gridDim warpSize; __syncthreads, __syncthreads_count/_and/_or, __syncwarp,
//   __shfl_sync/_up/_down/_xor (any trivially copyable T up to 16 bytes; width 1..32),
//   __ballot_sync __any_sync __all_sync __activemask, __reduce_{add,min,max}_sync
//   (int/unsigned), __reduce_{and,or,xor}_sync; atomicAdd/Sub/Max/Min/CAS/Exch/And/Or/Xor/
//   Inc/Dec on the usual types (atomicAdd also float, double, __half); CUDA-only math
//   intrinsics (__expf, rsqrtf, __fdividef, __saturatef, __float_as_uint, __umulhi,
//   __popc, __clz, ...) — the fast-math intrinsics are computed with the accurate libm
//   function, not with the GPU's approximation; min/max; __ldg, __ldcg; printf; assert (names
//   launch/block/thread; keep <cassert> out of kernel sources or include it before
//   common.cuh); __half/__half2 bit-exact (see below); nvcuda::wmma for m16n16k16 with
//   __half A/B and float or __half accumulators; chingu_emu::mma_m16n8k16, the PTX
//   instruction mma.sync.m16n8k16.row.col.f32.f16.f16.f32 with its documented register
//   layout (kernels reach it through chingu::mma_16816 in common.cuh, inline PTX on a GPU);
//   chingu_emu::wgmma_mma/commit/wait, Hopper's wgmma.mma_async m64nNk16 f32 += f16·f16 with
//   A from registers or shared memory, B from shared memory through the ISA's matrix
//   descriptors (every swizzle mode), completed at the wait (kernels/cuda/hopper.cu wraps it).
//
// __half
//   Bit-exact IEEE binary16: conversions round to nearest even (subnormals, overflow to
//   inf); every arithmetic op rounds its exact result once (via float, which is exact
//   enough for + - * / sqrt; __hfma via double). Any NaN result is the GPU's canonical NaN
//   0x7fff. hexp/hlog/... are glibc's float function rounded to half (the GPU's
//   approximations may differ by an ulp). Implicit conversions mirror cuda_fp16.h:
//   `__half h = 1.0f; float f = h;` work; mixed `__half op float` is ambiguous there and
//   here.
//
// WMMA
//   fragment<Use,16,16,16,T,Layout> has public x[num_elements] (8 per lane). Fragment
//   element order is OURS: lane l holds elements [8l, 8l+8) of the 16x16 tile in
//   row-major logical order (A: row m, col k; B: row k, col n). Kernels must treat it as
//   opaque (only position-independent elementwise ops on x[]). A freshly declared
//   fragment is filled with NaN. load/store/mma are warp collectives: all 32 lanes of a
//   full warp must call them with warp-uniform pointer/ldm/layout; the pointer must be
//   32-byte aligned and ldm a multiple of 16 bytes, as on the GPU (config().
//   check_wmma_alignment). mma_sync: d = a*b + c, products exact, the sum over k in float
//   in increasing k starting from c; a __half d is rounded once at the end.
//
// NOT SUPPORTED
//   <<<>>> launch syntax (host code calls chingu_emu::launch / CHINGU_EMU_LAUNCH), streams,
//   events, the CUDA runtime API, cooperative groups, inline PTX / asm, dynamic
//   parallelism (a launch from a kernel is an error), __match_*_sync, texture/surface
//   memory, cudaMemcpyToSymbol, bfloat16, WMMA shapes other than 16x16x16, tf32/int8
//   WMMA, clock(), %laneid. __CUDA_ARCH__ and __CUDACC__ are not defined.
//   __activemask() returns all non-exited lanes of the warp (the emulator has no notion
//   of convergence).

#ifndef CHINGU_KERNELS_CUDA_EMU_H
#define CHINGU_KERNELS_CUDA_EMU_H

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <math.h>

#include <cassert>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CHINGU_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CHINGU_EMU_ASAN 1
#endif
#endif
#ifdef CHINGU_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Per-fiber stack size (bytes). Kernels keep small per-thread state; raise this if a
// kernel needs large local arrays (an overflow is reported with kernel/block/thread).
#ifndef CHINGU_EMU_STACK_BYTES
#ifdef CHINGU_EMU_ASAN
#define CHINGU_EMU_STACK_BYTES (256 * 1024)
#else
#define CHINGU_EMU_STACK_BYTES (64 * 1024)
#endif
#endif

// Kernel sources use `#pragma unroll [n]`, which g++ does not know (-Wunknown-pragmas is
// in -Wall). This silences it for the rest of the translation unit with g++ >= 13; g++ 12
// ignores diagnostic pragmas for preprocessor warnings in C++ (GCC PR 53431), so build
// emulated kernels with -Wno-unknown-pragmas there.
#pragma GCC diagnostic ignored "-Wunknown-pragmas"

// ---------------------------------------------------------------------------------------
// Qualifiers
// ---------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __constant__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
// __restrict__ is a g++ keyword already.

// ---------------------------------------------------------------------------------------
// Vector types, dim3
// ---------------------------------------------------------------------------------------
struct uint3 { unsigned int x, y, z; };
struct int3 { int x, y, z; };
struct float3 { float x, y, z; };
struct alignas(8) int2 { int x, y; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };

inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline int3 make_int3(int x, int y, int z) { return int3{x, y, z}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float3 make_float3(float x, float y, float z) { return float3{x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline double2 make_double2(double x, double y) { return double2{x, y}; }

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// ---------------------------------------------------------------------------------------
// __half, __half2 (bit-exact binary16)
// ---------------------------------------------------------------------------------------
namespace chingu_emu {
namespace detail {

inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint64_t double_bits(double d) { uint64_t u; std::memcpy(&u, &d, 8); return u; }

constexpr unsigned short kHalfCanonicalNaN = 0x7fff;

// float -> binary16, round to nearest even.
inline unsigned short float_to_half_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return a > 0x7f800000u ? kHalfCanonicalNaN : static_cast<unsigned short>(sign | 0x7c00u);
  if (a >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520 -> inf
  if (a >= 0x38800000u) {                                                   // >= 2^-14: normal
    const uint32_t r = a + 0x0fffu + ((a >> 13) & 1u);
    return static_cast<unsigned short>(sign | ((r - 0x38000000u) >> 13));
  }
  if (a <= 0x33000000u) return static_cast<unsigned short>(sign);           // <= 2^-25 -> 0
  const uint32_t e = a >> 23;                                               // 102..112
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;                                          // 14..24
  uint32_t m = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  if (rem > halfway || (rem == halfway && (m & 1u))) ++m;
  return static_cast<unsigned short>(sign | m);
}

// double -> binary16, round to nearest even (single rounding).
inline unsigned short double_to_half_bits(double d) {
  const uint64_t u = double_bits(d);
  const uint32_t sign = static_cast<uint32_t>(u >> 48) & 0x8000u;
  const uint64_t a = u & 0x7fffffffffffffffull;
  if (a >= 0x7ff0000000000000ull) return a > 0x7ff0000000000000ull ? kHalfCanonicalNaN : static_cast<unsigned short>(sign | 0x7c00u);
  if (a >= 0x40effe0000000000ull) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520
  if (a >= 0x3f10000000000000ull) {                                                    // >= 2^-14
    const uint64_t r = a + ((1ull << 41) - 1u) + ((a >> 42) & 1u);
    return static_cast<unsigned short>(sign | static_cast<uint32_t>((r - (1008ull << 52)) >> 42));
  }
  if (a <= 0x3e60000000000000ull) return static_cast<unsigned short>(sign);            // <= 2^-25
  const uint32_t e = static_cast<uint32_t>(a >> 52);                                   // 998..1008
  const uint64_t mant = (a & ((1ull << 52) - 1u)) | (1ull << 52);
  const uint32_t shift = 1051u - e;                                                    // 43..53
  uint64_t m = mant >> shift;
  const uint64_t rem = mant & ((1ull << shift) - 1u);
  const uint64_t halfway = 1ull << (shift - 1u);
  if (rem > halfway || (rem == halfway && (m & 1u))) ++m;
  return static_cast<unsigned short>(sign | static_cast<uint32_t>(m));
}

// binary16 -> float, exact.
inline float half_bits_to_float(unsigned short h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  uint32_t u;
  if (e == 0x1fu) {
    u = sign | 0x7f800000u | (m << 13);
  } else if (e != 0) {
    u = sign | ((e + 112u) << 23) | (m << 13);
  } else if (m == 0) {
    u = sign;
  } else {
    e = 113u;
    while (!(m & 0x400u)) { m <<= 1; --e; }
    u = sign | (e << 23) | ((m & 0x3ffu) << 13);
  }
  return bits_float(u);
}

}  // namespace detail
}  // namespace chingu_emu

struct __half_raw { unsigned short x; };
struct __half2_raw { unsigned short x, y; };

struct __half {
  unsigned short __x;
  __half() = default;
  constexpr __half(const __half_raw& r) : __x(r.x) {}
  __half(float f) : __x(chingu_emu::detail::float_to_half_bits(f)) {}
  __half(double d) : __x(chingu_emu::detail::double_to_half_bits(d)) {}
  __half(short v) : __x(chingu_emu::detail::double_to_half_bits(v)) {}
  __half(unsigned short v) : __x(chingu_emu::detail::double_to_half_bits(v)) {}
  __half(int v) : __x(chingu_emu::detail::double_to_half_bits(v)) {}
  __half(unsigned int v) : __x(chingu_emu::detail::double_to_half_bits(v)) {}
  __half(long long v) : __x(chingu_emu::detail::double_to_half_bits(static_cast<double>(v))) {}
  __half(unsigned long long v) : __x(chingu_emu::detail::double_to_half_bits(static_cast<double>(v))) {}
  __half& operator=(const __half_raw& r) { __x = r.x; return *this; }
  operator float() const { return chingu_emu::detail::half_bits_to_float(__x); }
  operator __half_raw() const { return __half_raw{__x}; }
};
static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half layout");
static_assert(std::is_trivially_copyable<__half>::value && std::is_trivially_default_constructible<__half>::value, "__half must be trivial");

struct alignas(4) __half2 {
  __half x, y;
  __half2() = default;
  constexpr __half2(const __half& a, const __half& b) : x(a), y(b) {}
  constexpr __half2(const __half2_raw& r) : x(__half_raw{r.x}), y(__half_raw{r.y}) {}
  operator __half2_raw() const { return __half2_raw{x.__x, y.__x}; }
};
static_assert(sizeof(__half2) == 4, "__half2 layout");

typedef __half half;
typedef __half2 half2;

inline __half __float2half(float f) { return __half_raw{chingu_emu::detail::float_to_half_bits(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline __half __double2half(double d) { return __half_raw{chingu_emu::detail::double_to_half_bits(d)}; }
inline __half __int2half_rn(int i) { return __double2half(i); }
inline __half __uint2half_rn(unsigned i) { return __double2half(i); }
inline float __half2float(__half h) { return chingu_emu::detail::half_bits_to_float(h.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return static_cast<short>(h.__x); }
inline __half __ushort_as_half(unsigned short u) { return __half_raw{u}; }
inline __half __short_as_half(short s) { return __half_raw{static_cast<unsigned short>(s)}; }
inline int __half2int_rn(__half h) { return static_cast<int>(std::nearbyint(__half2float(h))); }
inline int __half2int_rz(__half h) { return static_cast<int>(__half2float(h)); }

inline __half __hadd(__half a, __half b) { return __float2half(__half2float(a) + __half2float(b)); }
inline __half __hsub(__half a, __half b) { return __float2half(__half2float(a) - __half2float(b)); }
inline __half __hmul(__half a, __half b) { return __float2half(__half2float(a) * __half2float(b)); }
inline __half __hdiv(__half a, __half b) { return __float2half(__half2float(a) / __half2float(b)); }
inline __half __hneg(__half a) { return __half_raw{static_cast<unsigned short>(a.__x ^ 0x8000u)}; }
inline __half __habs(__half a) { return __half_raw{static_cast<unsigned short>(a.__x & 0x7fffu)}; }
inline __half __hfma(__half a, __half b, __half c) {
  // a*b is exact in double and a*b + c of a finite result spans < 53 bits, so this is
  // the exactly rounded fused result.
  return __double2half(static_cast<double>(__half2float(a)) * static_cast<double>(__half2float(b)) +
                       static_cast<double>(__half2float(c)));
}
inline bool __hisnan(__half a) { return (a.__x & 0x7fffu) > 0x7c00u; }
inline int __hisinf(__half a) { return (a.__x & 0x7fffu) == 0x7c00u ? ((a.__x & 0x8000u) ? -1 : 1) : 0; }
inline bool __heq(__half a, __half b) { return __half2float(a) == __half2float(b); }
inline bool __hne(__half a, __half b) { return !__hisnan(a) && !__hisnan(b) && __half2float(a) != __half2float(b); }
inline bool __hlt(__half a, __half b) { return __half2float(a) < __half2float(b); }
inline bool __hle(__half a, __half b) { return __half2float(a) <= __half2float(b); }
inline bool __hgt(__half a, __half b) { return __half2float(a) > __half2float(b); }
inline bool __hge(__half a, __half b) { return __half2float(a) >= __half2float(b); }
inline __half __hmax(__half a, __half b) {
  if (__hisnan(a) && __hisnan(b)) return __half_raw{chingu_emu::detail::kHalfCanonicalNaN};
  return __float2half(std::fmax(__half2float(a), __half2float(b)));
}
inline __half __hmin(__half a, __half b) {
  if (__hisnan(a) && __hisnan(b)) return __half_raw{chingu_emu::detail::kHalfCanonicalNaN};
  return __float2half(std::fmin(__half2float(a), __half2float(b)));
}
inline __half hsqrt(__half a) { return __float2half(std::sqrt(__half2float(a))); }
inline __half hrsqrt(__half a) { return __double2half(1.0 / std::sqrt(static_cast<double>(__half2float(a)))); }
inline __half hrcp(__half a) { return __float2half(1.0f / __half2float(a)); }
inline __half hexp(__half a) { return __float2half(std::exp(__half2float(a))); }
inline __half hlog(__half a) { return __float2half(std::log(__half2float(a))); }
inline __half htanh(__half a) { return __float2half(std::tanh(__half2float(a))); }

inline __half operator+(const __half& a, const __half& b) { return __hadd(a, b); }
inline __half operator-(const __half& a, const __half& b) { return __hsub(a, b); }
inline __half operator*(const __half& a, const __half& b) { return __hmul(a, b); }
inline __half operator/(const __half& a, const __half& b) { return __hdiv(a, b); }
inline __half& operator+=(__half& a, const __half& b) { a = __hadd(a, b); return a; }
inline __half& operator-=(__half& a, const __half& b) { a = __hsub(a, b); return a; }
inline __half& operator*=(__half& a, const __half& b) { a = __hmul(a, b); return a; }
inline __half& operator/=(__half& a, const __half& b) { a = __hdiv(a, b); return a; }
inline __half operator+(const __half& a) { return a; }
inline __half operator-(const __half& a) { return __hneg(a); }
inline __half& operator++(__half& a) { a = __hadd(a, __half_raw{0x3c00}); return a; }
inline __half& operator--(__half& a) { a = __hsub(a, __half_raw{0x3c00}); return a; }
inline __half operator++(__half& a, int) { __half o = a; ++a; return o; }
inline __half operator--(__half& a, int) { __half o = a; --a; return o; }
inline bool operator==(const __half& a, const __half& b) { return __heq(a, b); }
inline bool operator!=(const __half& a, const __half& b) { return __hne(a, b); }
inline bool operator<(const __half& a, const __half& b) { return __hlt(a, b); }
inline bool operator<=(const __half& a, const __half& b) { return __hle(a, b); }
inline bool operator>(const __half& a, const __half& b) { return __hgt(a, b); }
inline bool operator>=(const __half& a, const __half& b) { return __hge(a, b); }

inline __half2 make_half2(__half a, __half b) { return __half2(a, b); }
inline __half2 __halves2half2(__half a, __half b) { return __half2(a, b); }
inline __half2 __half2half2(__half a) { return __half2(a, a); }
inline __half2 __float2half2_rn(float f) { return __half2(__float2half(f), __float2half(f)); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2(__float2half(a), __float2half(b)); }
inline __half2 __float22half2_rn(float2 f) { return __half2(__float2half(f.x), __float2half(f.y)); }
inline float2 __half22float2(__half2 h) { return make_float2(__half2float(h.x), __half2float(h.y)); }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline __half2 __lows2half2(__half2 a, __half2 b) { return __half2(a.x, b.x); }
inline __half2 __highs2half2(__half2 a, __half2 b) { return __half2(a.y, b.y); }
inline __half2 __hadd2(__half2 a, __half2 b) { return __half2(__hadd(a.x, b.x), __hadd(a.y, b.y)); }
inline __half2 __hsub2(__half2 a, __half2 b) { return __half2(__hsub(a.x, b.x), __hsub(a.y, b.y)); }
inline __half2 __hmul2(__half2 a, __half2 b) { return __half2(__hmul(a.x, b.x), __hmul(a.y, b.y)); }
inline __half2 __h2div(__half2 a, __half2 b) { return __half2(__hdiv(a.x, b.x), __hdiv(a.y, b.y)); }
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) { return __half2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)); }
inline __half2 __hneg2(__half2 a) { return __half2(__hneg(a.x), __hneg(a.y)); }
inline __half2 __habs2(__half2 a) { return __half2(__habs(a.x), __habs(a.y)); }
inline __half2 __hmax2(__half2 a, __half2 b) { return __half2(__hmax(a.x, b.x), __hmax(a.y, b.y)); }
inline __half2 __hmin2(__half2 a, __half2 b) { return __half2(__hmin(a.x, b.x), __hmin(a.y, b.y)); }
inline __half2 operator+(const __half2& a, const __half2& b) { return __hadd2(a, b); }
inline __half2 operator-(const __half2& a, const __half2& b) { return __hsub2(a, b); }
inline __half2 operator*(const __half2& a, const __half2& b) { return __hmul2(a, b); }
inline __half2 operator/(const __half2& a, const __half2& b) { return __h2div(a, b); }
inline __half2& operator+=(__half2& a, const __half2& b) { a = __hadd2(a, b); return a; }
inline __half2& operator-=(__half2& a, const __half2& b) { a = __hsub2(a, b); return a; }
inline __half2& operator*=(__half2& a, const __half2& b) { a = __hmul2(a, b); return a; }
inline __half2& operator/=(__half2& a, const __half2& b) { a = __h2div(a, b); return a; }
inline __half2 operator-(const __half2& a) { return __hneg2(a); }

// ---------------------------------------------------------------------------------------
// Math and bit intrinsics
// ---------------------------------------------------------------------------------------
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __fdividef(float a, float b) { return a / b; }
// glibc >= 2.41 declares the C23 rsqrt family itself (correctly rounded); use it there.
#if !(defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 41)))
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
#endif
inline float __frsqrt_rn(float x) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(x))); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }  // NaN -> 0
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(std::ceil(x)); }
inline unsigned __float2uint_rn(float x) { return static_cast<unsigned>(std::nearbyint(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }

inline unsigned int __float_as_uint(float f) { return chingu_emu::detail::float_bits(f); }
inline float __uint_as_float(unsigned int u) { return chingu_emu::detail::bits_float(u); }
inline int __float_as_int(float f) { return static_cast<int>(chingu_emu::detail::float_bits(f)); }
inline float __int_as_float(int i) { return chingu_emu::detail::bits_float(static_cast<uint32_t>(i)); }
inline long long __double_as_longlong(double d) { return static_cast<long long>(chingu_emu::detail::double_bits(d)); }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }

inline unsigned int __umulhi(unsigned int a, unsigned int b) { return static_cast<unsigned int>((static_cast<uint64_t>(a) * b) >> 32); }
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<int64_t>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline long long __mul64hi(long long a, long long b) { return static_cast<long long>((static_cast<__int128>(a) * b) >> 64); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}

// CUDA's overloaded min/max: any two arithmetic types, result in their common type
// (int with unsigned -> unsigned, as in CUDA); floating point uses fmin/fmax.
template <class A, class B, std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value, int> = 0>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value) return std::fmin(static_cast<C>(a), static_cast<C>(b));
  else return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}
template <class A, class B, std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value, int> = 0>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value) return std::fmax(static_cast<C>(a), static_cast<C>(b));
  else return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}

// ---------------------------------------------------------------------------------------
// Atomics (fibers of a launch run on one OS thread and switch only at barriers, so a
// plain read-modify-write is atomic). Each returns the old value.
// ---------------------------------------------------------------------------------------
inline int atomicAdd(int* p, int v) { int o = *p; *p = static_cast<int>(static_cast<unsigned>(o) + static_cast<unsigned>(v)); return o; }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { unsigned o = *p; *p = o + v; return o; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { unsigned long long o = *p; *p = o + v; return o; }
inline float atomicAdd(float* p, float v) { float o = *p; *p = o + v; return o; }
inline double atomicAdd(double* p, double v) { double o = *p; *p = o + v; return o; }
inline __half atomicAdd(__half* p, __half v) { __half o = *p; *p = __hadd(o, v); return o; }
inline __half2 atomicAdd(__half2* p, __half2 v) { __half2 o = *p; *p = __hadd2(o, v); return o; }
inline int atomicSub(int* p, int v) { int o = *p; *p = static_cast<int>(static_cast<unsigned>(o) - static_cast<unsigned>(v)); return o; }
inline unsigned int atomicSub(unsigned int* p, unsigned int v) { unsigned o = *p; *p = o - v; return o; }
inline int atomicMax(int* p, int v) { int o = *p; if (v > o) *p = v; return o; }
inline unsigned int atomicMax(unsigned int* p, unsigned int v) { unsigned o = *p; if (v > o) *p = v; return o; }
inline long long atomicMax(long long* p, long long v) { long long o = *p; if (v > o) *p = v; return o; }
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) { unsigned long long o = *p; if (v > o) *p = v; return o; }
inline int atomicMin(int* p, int v) { int o = *p; if (v < o) *p = v; return o; }
inline unsigned int atomicMin(unsigned int* p, unsigned int v) { unsigned o = *p; if (v < o) *p = v; return o; }
inline long long atomicMin(long long* p, long long v) { long long o = *p; if (v < o) *p = v; return o; }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) { unsigned long long o = *p; if (v < o) *p = v; return o; }
inline int atomicCAS(int* p, int cmp, int v) { int o = *p; if (o == cmp) *p = v; return o; }
inline unsigned int atomicCAS(unsigned int* p, unsigned int cmp, unsigned int v) { unsigned o = *p; if (o == cmp) *p = v; return o; }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long cmp, unsigned long long v) { unsigned long long o = *p; if (o == cmp) *p = v; return o; }
inline unsigned short atomicCAS(unsigned short* p, unsigned short cmp, unsigned short v) { unsigned short o = *p; if (o == cmp) *p = v; return o; }
inline int atomicExch(int* p, int v) { int o = *p; *p = v; return o; }
inline unsigned int atomicExch(unsigned int* p, unsigned int v) { unsigned o = *p; *p = v; return o; }
inline unsigned long long atomicExch(unsigned long long* p, unsigned long long v) { unsigned long long o = *p; *p = v; return o; }
inline float atomicExch(float* p, float v) { float o = *p; *p = v; return o; }
inline int atomicAnd(int* p, int v) { int o = *p; *p = o & v; return o; }
inline unsigned int atomicAnd(unsigned int* p, unsigned int v) { unsigned o = *p; *p = o & v; return o; }
inline int atomicOr(int* p, int v) { int o = *p; *p = o | v; return o; }
inline unsigned int atomicOr(unsigned int* p, unsigned int v) { unsigned o = *p; *p = o | v; return o; }
inline int atomicXor(int* p, int v) { int o = *p; *p = o ^ v; return o; }
inline unsigned int atomicXor(unsigned int* p, unsigned int v) { unsigned o = *p; *p = o ^ v; return o; }
inline unsigned int atomicInc(unsigned int* p, unsigned int v) { unsigned o = *p; *p = (o >= v) ? 0u : o + 1u; return o; }
inline unsigned int atomicDec(unsigned int* p, unsigned int v) { unsigned o = *p; *p = (o == 0u || o > v) ? v : o - 1u; return o; }

// ---------------------------------------------------------------------------------------
// Runtime: launch state, fibers, scheduler
// ---------------------------------------------------------------------------------------
namespace chingu_emu {

class launch_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Config {
  // See the header comment: true = every thread must execute the same __syncthreads()
  // sequence and warp-collective masks must not name exited lanes.
  bool strict_exit = true;
  // WMMA pointers must be 32-byte aligned and ldm a multiple of 16 bytes (as on the GPU).
  bool check_wmma_alignment = true;
};
// Process-wide settings, read at the start of each launch (set them between launches).
inline Config& config() {
  static Config c;
  return c;
}

// The thread schedule of the launches made from the calling OS thread: 0 = in order, any
// other value = the seed of a shuffled schedule (see SCHEDULES). Per OS thread, so test
// threads that launch concurrently cannot change each other's schedule.
inline uint64_t& schedule_seed() {
  static thread_local uint64_t seed = 0;
  return seed;
}

constexpr size_t kFiberStackBytes = CHINGU_EMU_STACK_BYTES;
constexpr size_t kGuardBytes = 64 * 1024;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxDynamicSmemBytes = 227 * 1024;  // H100 opt-in maximum per block

// Device-like allocation: 256-byte aligned (like cudaMalloc), filled with 0xFF.
inline void* device_alloc(size_t bytes) {
  void* p = ::operator new(bytes ? bytes : 1, std::align_val_t(256));
  std::memset(p, 0xff, bytes);
  return p;
}
inline void device_free(void* p) {
  if (p) ::operator delete(p, std::align_val_t(256));
}

namespace detail {

inline std::string strf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline std::string strf(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  int n = std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (n < 0) return std::string("<format error>");
  if (static_cast<size_t>(n) < sizeof buf) return std::string(buf, static_cast<size_t>(n));
  std::string s(static_cast<size_t>(n) + 1, '\0');
  va_start(ap, fmt);
  std::vsnprintf(&s[0], s.size(), fmt, ap);
  va_end(ap);
  s.resize(static_cast<size_t>(n));
  return s;
}

enum class FState : uint8_t { Runnable, WaitBlock, WaitWarp, Done };

struct Fiber {
  ucontext_t uc;
  char* stack;  // lowest usable address
  uint3 tid;
  unsigned linear, warp, lane;
  FState state;
  unsigned nbar;          // __syncthreads() calls this thread has arrived at
  const char* wait_file;  // site of the current wait
  unsigned wait_line;
  int wait_group;         // warp group index while WaitWarp
  void* asan_fake;
};

struct Warp;
using ReleaseFn = void (*)(Warp&, uint32_t participants);

// Per-lane exchange slot for warp collectives. A lane writes `in` (and src/aux/p) before
// arriving; the lane that completes the rendezvous runs the release function, which
// fills every participant's `out`. A lane's slots are only rewritten by that lane at its
// next collective, after it has read `out`, so one rendezvous per collective suffices.
struct LaneSlot {
  alignas(16) unsigned char in[16];
  alignas(16) unsigned char out[16];
  int src;
  unsigned aux[2];
  const void* p[4];
};

struct WarpGroup {
  bool used;
  uint32_t mask;
  uint32_t arrived;
  ReleaseFn release;
  const char* what;
  const char* file;
  unsigned line;
};

struct Warp {
  unsigned index;
  unsigned first_linear;
  uint32_t exist;   // lanes that exist in the block
  uint32_t exited;  // lanes that returned
  LaneSlot lane[32];
  WarpGroup groups[32];
};

struct BlockBarrier {
  unsigned arrived;
  const char* file;
  unsigned line;
  unsigned first_linear;  // first thread that arrived at the current barrier
  unsigned count;         // predicate count (for __syncthreads_count/and/or)
  unsigned result_count;  // values published at release
  unsigned result_n;
  unsigned max_nbar;      // largest nbar of any thread, and who / where
  unsigned max_linear;
  const char* max_file;
  unsigned max_line;
  unsigned min_exit_nbar;  // smallest nbar of an exited thread, and who
  unsigned min_exit_linear;
};

// SplitMix64: the shuffled schedule's generator (the same one the Rust side uses).
struct ScheduleRng {
  uint64_t state = 0;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n) for n > 0 (the modulo bias is irrelevant for a schedule).
  unsigned below(unsigned n) { return static_cast<unsigned>(next() % n); }
};

struct RunQueue {
  std::vector<unsigned> buf;
  unsigned head = 0, count = 0;
  ScheduleRng* shuffle = nullptr;  // set: pop() takes a random queued thread, not the oldest
  void reset(unsigned cap) { buf.assign(cap, 0u); head = count = 0; }
  void push(unsigned v) { buf[(head + count) % buf.size()] = v; ++count; }
  int pop() {
    if (!count) return -1;
    if (shuffle && count > 1) {
      const size_t pick = (head + shuffle->below(count)) % buf.size();
      std::swap(buf[pick], buf[head]);
    }
    unsigned v = buf[head];
    head = static_cast<unsigned>((head + 1) % buf.size());
    --count;
    return static_cast<int>(v);
  }
};

struct Launch {
  const char* name;
  dim3 grid, block;
  size_t smem_bytes;
  void (*invoke)(void*);
  void* invoke_ctx;
  Config cfg;
  unsigned nthreads;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  RunQueue queue;
  ScheduleRng rng;  // drives the shuffled schedule (unused in order)
  unsigned char* smem;
  uint3 block_idx;
  unsigned live;  // threads of the current block that have not returned
  BlockBarrier bar;
  ucontext_t sched_uc;
  bool aborted;
  std::string error;
  void* sched_fake;
  const void* sched_bottom;
  size_t sched_size;
  bool from_sched;
};

inline Launch* g_launch = nullptr;
inline Fiber* g_cur = nullptr;
// Counts the blocks run in this process (one at a time): per-block state kept outside the
// emulator (common.cuh's cp.async queues) starts afresh when it changes.
inline uint64_t g_block_serial = 0;
inline uint3 g_threadIdx{0, 0, 0};
inline uint3 g_blockIdx{0, 0, 0};
inline dim3 g_blockDim{1, 1, 1};
inline dim3 g_gridDim{1, 1, 1};
inline thread_local bool tl_in_launch = false;

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Small fixed-size names (no heap): they are built as temporaries in fibers that may be
// abandoned by fail(), whose frames are never unwound.
struct Name {
  char s[80];
  const char* c_str() const { return s; }
};

inline Name dim_str(dim3 d) {
  Name n;
  std::snprintf(n.s, sizeof n.s, "(%u,%u,%u)", d.x, d.y, d.z);
  return n;
}

inline std::string launch_str(const Launch& L) {
  return strf("kernel '%s' <<<grid %s, block %s, dynamic smem %zu B>>>", L.name, dim_str(L.grid).c_str(),
              dim_str(L.block).c_str(), L.smem_bytes);
}

inline Name thread_str(const Fiber& f) {
  Name n;
  std::snprintf(n.s, sizeof n.s, "thread (%u,%u,%u) [warp %u lane %u]", f.tid.x, f.tid.y, f.tid.z, f.warp, f.lane);
  return n;
}

inline void transfer(Fiber* from, Fiber* to, bool exiting);

[[noreturn]] inline void outside_kernel(const char* what) {
  std::fprintf(stderr, "chingu_emu: %s used outside a kernel launch\n", what);
  std::abort();
}

// Abandon the launch with an error attributed to the current thread. The fiber's frames
// are never unwound, so `msg` is moved from (leaving no heap memory behind in them).
[[noreturn]] inline void fail(std::string&& msg) {
  Launch* L = g_launch;
  Fiber* f = g_cur;
  if (!L || !f) {
    std::fprintf(stderr, "chingu_emu: %s\n", msg.c_str());
    std::abort();
  }
  {
    std::string m(std::move(msg));
    L->error = launch_str(*L) + ": block " + dim_str(L->block_idx).c_str() + ", " + thread_str(*f).c_str() + ": " + m;
  }
  L->aborted = true;
  transfer(f, nullptr, false);
  std::abort();  // never resumed
}
[[noreturn]] inline void fail(const char* msg) { fail(std::string(msg)); }

inline Fiber& cur_fiber(const char* what) {
  if (!g_cur) outside_kernel(what);
  return *g_cur;
}

#ifdef CHINGU_EMU_ASAN
inline void asan_after_switch(void* fake) {
  Launch& L = *g_launch;
  const void* bottom = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(fake, &bottom, &size);
  if (L.from_sched) {
    L.sched_bottom = bottom;
    L.sched_size = size;
  }
}
#endif

// Switch from `from` (nullptr = scheduler) to `to` (nullptr = scheduler).
inline void transfer(Fiber* from, Fiber* to, bool exiting) {
  Launch& L = *g_launch;
  g_cur = to;
  if (to) g_threadIdx = to->tid;
  L.from_sched = (from == nullptr);
  ucontext_t* from_uc = from ? &from->uc : &L.sched_uc;
  ucontext_t* to_uc = to ? &to->uc : &L.sched_uc;
#ifdef CHINGU_EMU_ASAN
  void** fake = from ? (exiting ? nullptr : &from->asan_fake) : &L.sched_fake;
  __sanitizer_start_switch_fiber(fake, to ? static_cast<const void*>(to->stack) : L.sched_bottom,
                                 to ? kFiberStackBytes : L.sched_size);
#else
  (void)exiting;
#endif
  if (swapcontext(from_uc, to_uc) != 0) {
    std::fprintf(stderr, "chingu_emu: swapcontext failed\n");
    std::abort();
  }
#ifdef CHINGU_EMU_ASAN
  asan_after_switch(from ? from->asan_fake : L.sched_fake);
#endif
}

// The current fiber stops running (it waits or has exited): resume the next runnable
// fiber, or the scheduler when there is none.
inline void switch_away(Fiber* self, bool exiting) {
  Launch& L = *g_launch;
  int next = L.queue.pop();
  transfer(self, next >= 0 ? &L.fibers[static_cast<size_t>(next)] : nullptr, exiting);
}

inline void make_runnable(Launch& L, Fiber& f) {
  f.state = FState::Runnable;
  L.queue.push(f.linear);
}

inline bool same_site(const char* f1, unsigned l1, const char* f2, unsigned l2) {
  return l1 == l2 && (f1 == f2 || (f1 && f2 && std::strcmp(f1, f2) == 0));
}

// --- block barrier ---------------------------------------------------------------------

inline void release_block_barrier(Launch& L) {
  BlockBarrier& B = L.bar;
  B.result_count = B.count;
  B.result_n = B.arrived;
  B.arrived = 0;
  B.count = 0;
  B.file = nullptr;
  for (Fiber& f : L.fibers)
    if (f.state == FState::WaitBlock) make_runnable(L, f);
}

// Returns the number of arrived threads whose predicate was non-zero; *n = participants.
inline unsigned syncthreads_impl(int pred, const char* what, const char* file, unsigned line, unsigned* n = nullptr) {
  Fiber& f = cur_fiber(what);
  Launch& L = *g_launch;
  BlockBarrier& B = L.bar;
  ++f.nbar;
  if (f.nbar > B.max_nbar) {
    B.max_nbar = f.nbar;
    B.max_linear = f.linear;
    B.max_file = file;
    B.max_line = line;
  }
  if (L.cfg.strict_exit && f.nbar > B.min_exit_nbar)
    fail(strf("%s at %s:%u is this thread's call #%u, but %s already returned after %u __syncthreads() call(s): "
              "all threads of a block must execute the same __syncthreads() calls (divergent barrier; "
              "set chingu_emu::config().strict_exit = false to let exited threads count as arrived)",
              what, file, line, f.nbar, thread_str(L.fibers[B.min_exit_linear]).c_str(), B.min_exit_nbar));
  if (B.arrived == 0) {
    B.file = file;
    B.line = line;
    B.first_linear = f.linear;
  } else if (!same_site(B.file, B.line, file, line)) {
    fail(strf("divergent %s: this thread is at %s:%u but %s waits for the same barrier at %s:%u", what, file, line,
              thread_str(L.fibers[B.first_linear]).c_str(), B.file, B.line));
  }
  ++B.arrived;
  if (pred) ++B.count;
  if (B.arrived == L.live) {
    release_block_barrier(L);
  } else {
    f.state = FState::WaitBlock;
    f.wait_file = file;
    f.wait_line = line;
    switch_away(&f, false);
  }
  if (n) *n = B.result_n;
  return B.result_count;
}

// --- warp collectives ------------------------------------------------------------------

inline void complete_group(Launch& L, Warp& w, WarpGroup& g) {
  uint32_t part = g.arrived;
  g.used = false;
  g.release(w, part);
  Fiber* self = g_cur;
  for (unsigned l = 0; l < 32; ++l) {
    if (!((part >> l) & 1u)) continue;
    Fiber& f = L.fibers[w.first_linear + l];
    if (&f != self) make_runnable(L, f);
  }
}

inline void warp_collective(uint32_t mask, ReleaseFn rel, const char* what, const char* file, unsigned line) {
  Fiber& f = cur_fiber(what);
  Launch& L = *g_launch;
  Warp& w = L.warps[f.warp];
  const uint32_t bit = 1u << f.lane;
  if (!(mask & bit))
    fail(strf("%s at %s:%u: mask 0x%08x does not include the calling lane %u", what, file, line, mask, f.lane));
  if (L.cfg.strict_exit && (mask & w.exited))
    fail(strf("%s at %s:%u: mask 0x%08x names lanes 0x%08x that have already returned (strict_exit)", what, file,
              line, mask, mask & w.exited));
  // Groups with different (even overlapping) masks may be pending at once: lanes that
  // are ahead may already wait in a full-warp collective while others still finish a
  // collective of a sub-group. Lanes passing inconsistent masks end up in a deadlock,
  // which is reported with every group's mask and missing lanes. At most 32 groups are
  // pending (each holds at least one blocked lane).
  WarpGroup* g = nullptr;
  for (WarpGroup& h : w.groups)
    if (h.used && h.mask == mask) {
      g = &h;
      break;
    }
  if (!g) {
    for (WarpGroup& h : w.groups)
      if (!h.used) {
        g = &h;
        break;
      }
    g->used = true;
    g->mask = mask;
    g->arrived = 0;
    g->release = rel;
    g->what = what;
    g->file = file;
    g->line = line;
  } else if (g->release != rel) {
    fail(strf("%s at %s:%u, but lanes 0x%08x with the same mask 0x%08x wait in %s at %s:%u: divergent warp collective",
              what, file, line, g->arrived, mask, g->what, g->file, g->line));
  }
  g->arrived |= bit;
  const uint32_t need = mask & w.exist & ~w.exited;
  if ((g->arrived & need) == need) {
    complete_group(L, w, *g);
  } else {
    f.state = FState::WaitWarp;
    f.wait_file = file;
    f.wait_line = line;
    f.wait_group = static_cast<int>(g - w.groups);
    switch_away(&f, false);
  }
}

inline void release_nop(Warp&, uint32_t) {}

inline void release_shfl(Warp& w, uint32_t part) {
  for (unsigned i = 0; i < 32; ++i) {
    if (!((part >> i) & 1u)) continue;
    LaneSlot& d = w.lane[i];
    const int s = d.src;
    if (s >= 0 && s < 32 && ((part >> s) & 1u)) {
      if (w.lane[s].aux[0] != d.aux[0])
        fail(strf("shuffle between values of different sizes (%u and %u bytes) in warp %u", d.aux[0], w.lane[s].aux[0],
                  w.index));
      std::memcpy(d.out, w.lane[s].in, d.aux[0]);
    } else {
      std::memset(d.out, 0xff, d.aux[0]);  // source lane not taking part: poison
    }
  }
}

inline void release_vote(Warp& w, uint32_t part) {
  uint32_t ballot = 0;
  for (unsigned i = 0; i < 32; ++i)
    if (((part >> i) & 1u) && w.lane[i].aux[0]) ballot |= 1u << i;
  for (unsigned i = 0; i < 32; ++i) {
    if (!((part >> i) & 1u)) continue;
    const uint32_t r[2] = {ballot, part};
    std::memcpy(w.lane[i].out, r, sizeof r);
  }
}

template <class T, int Op>  // 0 add, 1 min, 2 max, 3 and, 4 or, 5 xor
inline void release_reduce(Warp& w, uint32_t part) {
  bool first = true;
  T acc{};
  for (unsigned i = 0; i < 32; ++i) {
    if (!((part >> i) & 1u)) continue;
    T v;
    std::memcpy(&v, w.lane[i].in, sizeof v);
    if (first) {
      acc = v;
      first = false;
    } else if (Op == 0) {
      acc = static_cast<T>(static_cast<unsigned>(acc) + static_cast<unsigned>(v));
    } else if (Op == 1) {
      acc = v < acc ? v : acc;
    } else if (Op == 2) {
      acc = v > acc ? v : acc;
    } else if (Op == 3) {
      acc = acc & v;
    } else if (Op == 4) {
      acc = acc | v;
    } else {
      acc = acc ^ v;
    }
  }
  for (unsigned i = 0; i < 32; ++i)
    if ((part >> i) & 1u) std::memcpy(w.lane[i].out, &acc, sizeof acc);
}

inline LaneSlot& my_slot(const char* what) {
  Fiber& f = cur_fiber(what);
  return g_launch->warps[f.warp].lane[f.lane];
}

inline int check_width(int width, const char* what, const char* file, unsigned line) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail(strf("%s at %s:%u: width %d is not a power of two in [1, 32]", what, file, line, width));
  return width;
}

template <class T>
inline T shfl_impl(unsigned mask, const T& var, int src, const char* what, const char* file, unsigned line) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "warp shuffle of a type that is not trivially copyable or larger than 16 bytes");
  LaneSlot& s = my_slot(what);
  std::memcpy(s.in, &var, sizeof(T));
  s.src = src;
  s.aux[0] = sizeof(T);
  warp_collective(mask, &release_shfl, what, file, line);
  T r;
  std::memcpy(&r, s.out, sizeof(T));
  return r;
}

inline uint32_t vote_impl(unsigned mask, int pred, const char* what, const char* file, unsigned line, uint32_t* part) {
  LaneSlot& s = my_slot(what);
  s.aux[0] = pred != 0;
  warp_collective(mask, &release_vote, what, file, line);
  uint32_t r[2];
  std::memcpy(r, s.out, sizeof r);
  if (part) *part = r[1];
  return r[0];
}

template <class T, int Op>
inline T reduce_impl(unsigned mask, T v, const char* what, const char* file, unsigned line) {
  LaneSlot& s = my_slot(what);
  std::memcpy(s.in, &v, sizeof v);
  warp_collective(mask, &release_reduce<T, Op>, what, file, line);
  T r;
  std::memcpy(&r, s.out, sizeof r);
  return r;
}

// --- thread exit -----------------------------------------------------------------------

inline void on_thread_exit(Fiber& f) {
  Launch& L = *g_launch;
  BlockBarrier& B = L.bar;
  Warp& w = L.warps[f.warp];
  const uint32_t bit = 1u << f.lane;
  if (L.cfg.strict_exit && f.nbar < B.max_nbar)
    fail(strf("returns after %u __syncthreads() call(s), but %s has reached __syncthreads() call #%u at %s:%u: all "
              "threads of a block must execute the same __syncthreads() calls (divergent barrier; set "
              "chingu_emu::config().strict_exit = false to let exited threads count as arrived)",
              f.nbar, thread_str(L.fibers[B.max_linear]).c_str(), B.max_nbar, B.max_file, B.max_line));
  if (L.cfg.strict_exit) {
    for (WarpGroup& g : w.groups)
      if (g.used && (g.mask & bit))
        fail(strf("returns while lanes 0x%08x of its warp wait in %s(mask=0x%08x) at %s:%u, whose mask names it",
                  g.arrived, g.what, g.mask, g.file, g.line));
  }
  f.state = FState::Done;
  --L.live;
  w.exited |= bit;
  if (f.nbar < B.min_exit_nbar) {
    B.min_exit_nbar = f.nbar;
    B.min_exit_linear = f.linear;
  }
  if (B.arrived > 0 && B.arrived == L.live) release_block_barrier(L);
  const uint32_t alive = w.exist & ~w.exited;
  for (WarpGroup& g : w.groups) {
    if (!g.used) continue;
    const uint32_t need = g.mask & alive;
    if ((g.arrived & need) == need) complete_group(L, w, g);
  }
}

inline void fiber_entry() {
#ifdef CHINGU_EMU_ASAN
  asan_after_switch(nullptr);
#endif
  Launch& L = *g_launch;
  Fiber* f = g_cur;
  std::string exc;
  bool threw = false;
  try {
    L.invoke(L.invoke_ctx);
  } catch (const std::exception& e) {
    threw = true;
    exc = e.what();
  } catch (...) {
    threw = true;
    exc = "(not a std::exception)";
  }
  if (threw) {
    exc.insert(0, "kernel threw a C++ exception: ");
    fail(std::move(exc));
  }
  on_thread_exit(*f);
  switch_away(f, true);
  std::abort();  // a finished fiber is never resumed
}

// --- diagnostics -----------------------------------------------------------------------

inline std::string describe_wait(const Launch& L, const Fiber& f) {
  switch (f.state) {
    case FState::WaitBlock:
      return strf("waiting in __syncthreads() at %s:%u (call #%u; %u of %u unfinished threads arrived)", f.wait_file,
                  f.wait_line, f.nbar, L.bar.arrived, L.live);
    case FState::WaitWarp: {
      const Warp& w = L.warps[f.warp];
      const WarpGroup& g = w.groups[f.wait_group];
      const uint32_t need = g.mask & w.exist & ~w.exited;
      return strf("waiting in %s(mask=0x%08x) at %s:%u in warp %u (arrived lanes 0x%08x, missing lanes 0x%08x)",
                  g.what, g.mask, f.wait_file, f.wait_line, f.warp, g.arrived, need & ~g.arrived);
    }
    case FState::Runnable:
      return "runnable (emulator bug: not queued)";
    case FState::Done:
      return "finished";
  }
  return "?";
}

inline std::string deadlock_report(const Launch& L) {
  std::string s = launch_str(L) + ": block " + dim_str(L.block_idx).c_str() +
                  strf(": deadlock: no thread can make progress; %u of %u threads have not finished:\n", L.live,
                       L.nthreads);
  unsigned lines = 0;
  size_t i = 0;
  while (i < L.fibers.size()) {
    if (L.fibers[i].state == FState::Done) {
      ++i;
      continue;
    }
    std::string d = describe_wait(L, L.fibers[i]);
    size_t j = i + 1;
    while (j < L.fibers.size() && L.fibers[j].state != FState::Done && describe_wait(L, L.fibers[j]) == d) ++j;
    const Fiber& a = L.fibers[i];
    const Fiber& b = L.fibers[j - 1];
    if (++lines > 40) {
      s += "  ...\n";
      break;
    }
    if (j - i == 1)
      s += strf("  thread (%u,%u,%u): ", a.tid.x, a.tid.y, a.tid.z) + d + "\n";
    else
      s += strf("  threads (%u,%u,%u)..(%u,%u,%u) [%zu threads]: ", a.tid.x, a.tid.y, a.tid.z, b.tid.x, b.tid.y,
                b.tid.z, j - i) +
           d + "\n";
    i = j;
  }
  if (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

// --- fiber stacks, guard pages, SIGSEGV reporting ----------------------------------------

struct StackPool {
  char* base = nullptr;
  size_t guard = 0, stack = 0, slot = 0, total = 0;
};
inline StackPool& stack_pool() {
  static StackPool p;
  return p;
}

inline void ensure_stacks() {
  StackPool& p = stack_pool();
  if (p.base) return;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  p.guard = (kGuardBytes + page - 1) / page * page;
  p.stack = (kFiberStackBytes + page - 1) / page * page;
  p.slot = p.guard + p.stack;
  p.total = p.slot * kMaxThreadsPerBlock;
  void* m = mmap(nullptr, p.total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) throw launch_error("chingu_emu: cannot mmap fiber stacks");
  char* base = static_cast<char*>(m);
  for (unsigned i = 0; i < kMaxThreadsPerBlock; ++i) {
    if (mprotect(base + i * p.slot, p.guard, PROT_NONE) != 0) {
      munmap(m, p.total);
      throw launch_error("chingu_emu: cannot mprotect fiber stack guard");
    }
  }
  p.base = base;
}

inline struct sigaction& old_segv_action() {
  static struct sigaction a;
  return a;
}

inline void segv_handler(int sig, siginfo_t* si, void* uctx) {
  const StackPool& p = stack_pool();
  const char* a = static_cast<const char*>(si ? si->si_addr : nullptr);
  if (p.base && a >= p.base && a < p.base + p.total && static_cast<size_t>(a - p.base) % p.slot < p.guard) {
    char buf[768];
    const Launch* L = g_launch;
    const Fiber* f = g_cur;
    int n = std::snprintf(buf, sizeof buf,
                          "chingu_emu: fiber stack overflow (stack %zu bytes, CHINGU_EMU_STACK_BYTES) in kernel '%s', "
                          "block (%u,%u,%u), thread (%u,%u,%u): reduce per-thread local arrays/recursion or build "
                          "with a larger -DCHINGU_EMU_STACK_BYTES\n",
                          p.stack, L ? L->name : "?", L ? L->block_idx.x : 0u, L ? L->block_idx.y : 0u,
                          L ? L->block_idx.z : 0u, f ? f->tid.x : 0u, f ? f->tid.y : 0u, f ? f->tid.z : 0u);
    if (n > 0) {
      ssize_t w = write(2, buf, static_cast<size_t>(n) < sizeof buf ? static_cast<size_t>(n) : sizeof buf - 1);
      (void)w;
    }
    signal(SIGABRT, SIG_DFL);
    std::abort();
  }
  const struct sigaction& o = old_segv_action();
  if ((o.sa_flags & SA_SIGINFO) && o.sa_sigaction) {
    o.sa_sigaction(sig, si, uctx);
    return;
  }
  if (!(o.sa_flags & SA_SIGINFO) && o.sa_handler != SIG_DFL && o.sa_handler != SIG_IGN) {
    o.sa_handler(sig);
    return;
  }
  signal(sig, SIG_DFL);  // return and re-fault: default action
}

inline void ensure_segv_handler() {
  static bool installed = false;
  if (installed) return;
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = &segv_handler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  if (sigaction(SIGSEGV, &sa, &old_segv_action()) == 0) installed = true;
}

// A SIGSEGV from a guard page needs an alternate signal stack; install one for the
// duration of the launch if the calling thread has none.
struct AltStackGuard {
  bool installed = false;
  AltStackGuard() {
    stack_t cur;
    if (sigaltstack(nullptr, &cur) != 0 || !(cur.ss_flags & SS_DISABLE)) return;
    static thread_local std::unique_ptr<char[]> mem;
    const size_t sz = 64 * 1024;
    if (!mem) mem.reset(new char[sz]);
    stack_t ss;
    ss.ss_sp = mem.get();
    ss.ss_size = sz;
    ss.ss_flags = 0;
    installed = sigaltstack(&ss, nullptr) == 0;
  }
  ~AltStackGuard() {
    if (!installed) return;
    stack_t ss;
    std::memset(&ss, 0, sizeof ss);
    ss.ss_flags = SS_DISABLE;
    sigaltstack(&ss, nullptr);
  }
  AltStackGuard(const AltStackGuard&) = delete;
  AltStackGuard& operator=(const AltStackGuard&) = delete;
};

// --- the launch ------------------------------------------------------------------------

// Defined with the emulated wgmma below: what a thread of the block that just ran left of its
// wgmma products (issued but not committed, or committed but not waited for), empty if
// nothing — a kernel must wait for every product before it ends.
inline std::string wgmma_left_pending();

inline void run_block(Launch& L) {
  const unsigned N = L.nthreads;
  g_blockIdx = L.block_idx;
  ++g_block_serial;
  if (L.smem_bytes) std::memset(L.smem, 0xff, L.smem_bytes);
  for (Warp& w : L.warps) {
    w.exited = 0;
    for (WarpGroup& g : w.groups) g.used = false;
  }
  std::memset(&L.bar, 0, sizeof L.bar);
  L.bar.min_exit_nbar = ~0u;
  L.live = N;
  L.queue.reset(N);
  for (unsigned i = 0; i < N; ++i) {
    Fiber& f = L.fibers[i];
    f.state = FState::Runnable;
    f.nbar = 0;
    f.wait_file = nullptr;
    f.wait_line = 0;
    f.wait_group = -1;
    f.asan_fake = nullptr;
    f.uc.uc_link = nullptr;
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = kFiberStackBytes;
    f.uc.uc_stack.ss_flags = 0;
    makecontext(&f.uc, &fiber_entry, 0);
    // glibc's swapcontext never reads uc_stack again; clearing it stops ASan's
    // swapcontext interceptor from re-clearing the whole stack's shadow on every switch.
    f.uc.uc_stack.ss_sp = nullptr;
    f.uc.uc_stack.ss_size = 0;
    L.queue.push(i);
  }
  const int first = L.queue.pop();
  transfer(nullptr, &L.fibers[static_cast<size_t>(first)], false);
  g_cur = nullptr;
  if (L.aborted) return;
  if (L.live > 0) {
    L.error = deadlock_report(L);
    L.aborted = true;
    return;
  }
  const std::string pending = wgmma_left_pending();
  if (!pending.empty()) {
    L.error = launch_str(L) + ": block " + dim_str(L.block_idx).c_str() + ": " + pending;
    L.aborted = true;
  }
}

struct LaunchScope {
  LaunchScope() { tl_in_launch = true; }
  ~LaunchScope() {
    tl_in_launch = false;
    g_launch = nullptr;
    g_cur = nullptr;
    g_threadIdx = uint3{0, 0, 0};
    g_blockIdx = uint3{0, 0, 0};
  }
  LaunchScope(const LaunchScope&) = delete;
  LaunchScope& operator=(const LaunchScope&) = delete;
};

// getcontext() is "returns twice"; keep it out of run_launch (-Wclobbered). The saved
// point is never resumed: makecontext() always retargets the context before use.
__attribute__((noinline)) inline bool init_context(ucontext_t* uc) { return getcontext(uc) == 0; }

struct SmemDeleter {
  void operator()(unsigned char* p) const { ::operator delete(p, std::align_val_t(128)); }
};

inline void run_launch(const char* name, dim3 grid, dim3 block, size_t smem, void (*invoke)(void*), void* ctx) {
  if (!name) name = "?";
  auto bad = [&](const std::string& why) {
    return launch_error(strf("chingu_emu::launch: kernel '%s' <<<grid %s, block %s, dynamic smem %zu B>>>: ", name,
                             dim_str(grid).c_str(), dim_str(block).c_str(), smem) +
                        why);
  };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw bad("invalid configuration: a grid dimension is 0");
  if (block.x == 0 || block.y == 0 || block.z == 0) throw bad("invalid configuration: a block dimension is 0");
  if (grid.x > 0x7fffffffu || grid.y > 65535u || grid.z > 65535u)
    throw bad("invalid configuration: grid exceeds (2^31-1, 65535, 65535)");
  if (block.x > 1024u || block.y > 1024u || block.z > 64u)
    throw bad("invalid configuration: block dimensions exceed (1024, 1024, 64)");
  const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
  if (nthreads > kMaxThreadsPerBlock)
    throw bad(strf("invalid configuration: %llu threads per block (max %u)", nthreads, kMaxThreadsPerBlock));
  if (smem > kMaxDynamicSmemBytes)
    throw bad(strf("dynamic shared memory %zu B exceeds the %zu B per-block maximum", smem, kMaxDynamicSmemBytes));
  if (tl_in_launch) throw bad("launch from inside a kernel (dynamic parallelism) is not supported");

  std::lock_guard<std::mutex> lock(launch_mutex());
  ensure_stacks();
  ensure_segv_handler();
  AltStackGuard alt;
  LaunchScope scope;

  std::unique_ptr<Launch> Lp(new Launch());
  Launch& L = *Lp;
  L.name = name;
  L.grid = grid;
  L.block = block;
  L.smem_bytes = smem;
  L.invoke = invoke;
  L.invoke_ctx = ctx;
  L.cfg = config();
  const uint64_t seed = schedule_seed();
  L.rng.state = seed;
  L.queue.shuffle = seed ? &L.rng : nullptr;
  L.nthreads = static_cast<unsigned>(nthreads);
  L.aborted = false;
  L.sched_fake = nullptr;
  L.sched_bottom = nullptr;
  L.sched_size = 0;
  L.from_sched = false;
  std::unique_ptr<unsigned char, SmemDeleter> smem_buf(
      static_cast<unsigned char*>(::operator new(smem, std::align_val_t(128))));
  L.smem = smem_buf.get();

  const StackPool& pool = stack_pool();
  L.fibers.resize(L.nthreads);
  for (unsigned i = 0; i < L.nthreads; ++i) {
    Fiber& f = L.fibers[i];
    std::memset(static_cast<void*>(&f), 0, sizeof f);
    if (!init_context(&f.uc)) throw bad("getcontext failed");
    f.stack = pool.base + i * pool.slot + pool.guard;
#ifdef CHINGU_EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(f.stack, pool.stack);
#endif
    f.tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    f.linear = i;
    f.warp = i / 32;
    f.lane = i % 32;
  }
  const unsigned nwarps = (L.nthreads + 31) / 32;
  L.warps.resize(nwarps);
  for (unsigned wi = 0; wi < nwarps; ++wi) {
    Warp& w = L.warps[wi];
    std::memset(static_cast<void*>(&w), 0, sizeof w);
    w.index = wi;
    w.first_linear = wi * 32;
    const unsigned lanes = L.nthreads - wi * 32 >= 32 ? 32 : L.nthreads - wi * 32;
    w.exist = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  }

  g_launch = &L;
  g_blockDim = block;
  g_gridDim = grid;
  const unsigned long long nblocks = 1ull * grid.x * grid.y * grid.z;
  if (seed && nblocks > (1ull << 26))
    throw bad("a shuffled schedule takes at most 2^26 blocks (its permutation is held in memory)");
  std::vector<uint32_t> order;
  if (seed) {
    // Fisher-Yates over the linear block indices (x fastest).
    order.resize(static_cast<size_t>(nblocks));
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<uint32_t>(i);
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[L.rng.below(static_cast<unsigned>(i))]);
  }
  for (unsigned long long b = 0; b < nblocks; ++b) {
    const unsigned long long linear = seed ? order[static_cast<size_t>(b)] : b;
    L.block_idx = uint3{static_cast<unsigned>(linear % grid.x), static_cast<unsigned>((linear / grid.x) % grid.y),
                        static_cast<unsigned>(linear / (1ull * grid.x * grid.y))};
    run_block(L);
    if (L.aborted) throw launch_error(L.error);
  }
}

template <class Fn, class Tup, size_t... I>
inline void call_kernel(Fn fn, Tup& t, std::index_sequence<I...>) {
  fn(std::get<I>(t)...);  // each thread gets its own copy of the parameters
}

template <class Fn, class Tup>
struct KernelCall {
  Fn fn;
  Tup params;
  static void invoke(void* p) {
    KernelCall* c = static_cast<KernelCall*>(p);
    call_kernel(c->fn, c->params, std::make_index_sequence<std::tuple_size<Tup>::value>{});
  }
};

[[noreturn]] inline void assert_fail(const char* expr, const char* file, unsigned line, const char* func) {
  if (g_cur) fail(strf("device-side assert failed: %s (%s:%u, in %s)", expr, file, line, func));
  std::fprintf(stderr, "%s:%u: %s: Assertion `%s' failed.\n", file, line, func, expr);
  std::abort();
}

template <class T> struct type_identity { using type = T; };

}  // namespace detail

// Run kernel over the whole grid; returns when done. Throws chingu_emu::launch_error
// (what() = full diagnostic) on an invalid configuration or any error inside the kernel.
template <class... P, class... A>
inline void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_smem_bytes,
                   A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "chingu_emu::launch: wrong number of kernel arguments");
  if (!kernel) throw launch_error(std::string("chingu_emu::launch: kernel '") + (name ? name : "?") + "' is null");
  using Tup = std::tuple<std::remove_cv_t<std::remove_reference_t<P>>...>;
  using Call = detail::KernelCall<void (*)(P...), Tup>;
  Call call{kernel, Tup(std::forward<A>(args)...)};
  detail::run_launch(name, grid, block, dynamic_smem_bytes, &Call::invoke, &call);
}

// Same, but returns "" on success or the diagnostic (for extern "C" glue).
template <class... P, class... A>
inline std::string try_launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block,
                              size_t dynamic_smem_bytes, A&&... args) {
  try {
    launch(name, kernel, grid, block, dynamic_smem_bytes, std::forward<A>(args)...);
  } catch (const launch_error& e) {
    return e.what();
  }
  return std::string();
}

}  // namespace chingu_emu

#ifdef CHINGU_EMU_ASAN
// AddressSanitizer calls this when it reports an error: say which kernel thread it was in.
extern "C" inline __attribute__((used)) void __asan_on_error() {
  const chingu_emu::detail::Launch* L = chingu_emu::detail::g_launch;
  const chingu_emu::detail::Fiber* f = chingu_emu::detail::g_cur;
  if (!L || !f) return;
  char buf[512];
  int n = std::snprintf(buf, sizeof buf, "chingu_emu: the AddressSanitizer error was raised in kernel '%s', block (%u,%u,%u), thread (%u,%u,%u)\n",
                        L->name, L->block_idx.x, L->block_idx.y, L->block_idx.z, f->tid.x, f->tid.y, f->tid.z);
  if (n > 0) {
    ssize_t w = write(2, buf, static_cast<size_t>(n) < sizeof buf ? static_cast<size_t>(n) : sizeof buf - 1);
    (void)w;
  }
}
#endif

#define CHINGU_EMU_LAUNCH(kernel, grid, block, smem, ...) \
  ::chingu_emu::launch(#kernel, kernel, grid, block, smem, ##__VA_ARGS__)

// ---------------------------------------------------------------------------------------
// Built-in variables and intrinsics seen by kernels
// ---------------------------------------------------------------------------------------
inline const uint3& threadIdx = ::chingu_emu::detail::g_threadIdx;
inline const uint3& blockIdx = ::chingu_emu::detail::g_blockIdx;
inline const dim3& blockDim = ::chingu_emu::detail::g_blockDim;
inline const dim3& gridDim = ::chingu_emu::detail::g_gridDim;
inline constexpr int warpSize = 32;

#define CHINGU_DYNAMIC_SMEM(type, name) \
  type* const name = reinterpret_cast<type*>(::chingu_emu::detail::dynamic_smem_ptr())

namespace chingu_emu {
namespace detail {
inline void* dynamic_smem_ptr() {
  if (!g_cur) outside_kernel("CHINGU_DYNAMIC_SMEM");
  return g_launch->smem;
}
}  // namespace detail
}  // namespace chingu_emu

inline void __syncthreads(const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) {
  ::chingu_emu::detail::syncthreads_impl(1, "__syncthreads()", file, line);
}
inline int __syncthreads_count(int pred, const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) {
  return static_cast<int>(::chingu_emu::detail::syncthreads_impl(pred, "__syncthreads_count()", file, line));
}
inline int __syncthreads_and(int pred, const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) {
  unsigned n = 0;
  unsigned c = ::chingu_emu::detail::syncthreads_impl(pred, "__syncthreads_and()", file, line, &n);
  return c == n;
}
inline int __syncthreads_or(int pred, const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) {
  return ::chingu_emu::detail::syncthreads_impl(pred, "__syncthreads_or()", file, line) != 0;
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       unsigned line = __builtin_LINE()) {
  ::chingu_emu::detail::warp_collective(mask, &::chingu_emu::detail::release_nop, "__syncwarp", file, line);
}
[[noreturn]] inline void __trap() { ::chingu_emu::detail::fail("__trap() called"); }

inline unsigned __activemask() {
  const ::chingu_emu::detail::Fiber& f = ::chingu_emu::detail::cur_fiber("__activemask");
  const ::chingu_emu::detail::Warp& w = ::chingu_emu::detail::g_launch->warps[f.warp];
  return w.exist & ~w.exited;
}

template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, const char* file = __builtin_FILE(),
                     unsigned line = __builtin_LINE()) {
  using namespace ::chingu_emu::detail;
  const int w = check_width(width, "__shfl_sync", file, line);
  const int lane = static_cast<int>(cur_fiber("__shfl_sync").lane);
  const int src = (lane & ~(w - 1)) + (srcLane & (w - 1));
  return shfl_impl<T>(mask, var, src, "__shfl_sync", file, line);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) {
  using namespace ::chingu_emu::detail;
  const int w = check_width(width, "__shfl_up_sync", file, line);
  const int lane = static_cast<int>(cur_fiber("__shfl_up_sync").lane);
  const long long s = static_cast<long long>(lane & (w - 1)) - static_cast<long long>(delta);
  const int src = s < 0 ? lane : lane - static_cast<int>(delta);
  return shfl_impl<T>(mask, var, src, "__shfl_up_sync", file, line);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) {
  using namespace ::chingu_emu::detail;
  const int w = check_width(width, "__shfl_down_sync", file, line);
  const int lane = static_cast<int>(cur_fiber("__shfl_down_sync").lane);
  const long long s = static_cast<long long>(lane & (w - 1)) + static_cast<long long>(delta);
  const int src = s >= w ? lane : lane + static_cast<int>(delta);
  return shfl_impl<T>(mask, var, src, "__shfl_down_sync", file, line);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                         const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) {
  using namespace ::chingu_emu::detail;
  const int w = check_width(width, "__shfl_xor_sync", file, line);
  const int lane = static_cast<int>(cur_fiber("__shfl_xor_sync").lane);
  const int j = lane ^ (laneMask & 31);
  // A lane may read from its own or an earlier width-group, never a later one.
  const int src = j >= (lane & ~(w - 1)) + w ? lane : j;
  return shfl_impl<T>(mask, var, src, "__shfl_xor_sync", file, line);
}

inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              unsigned line = __builtin_LINE()) {
  return ::chingu_emu::detail::vote_impl(mask, pred, "__ballot_sync", file, line, nullptr);
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) {
  return ::chingu_emu::detail::vote_impl(mask, pred, "__any_sync", file, line, nullptr) != 0;
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) {
  uint32_t part = 0;
  uint32_t b = ::chingu_emu::detail::vote_impl(mask, pred, "__all_sync", file, line, &part);
  return b == part;
}

#define CHINGU_EMU_REDUCE(NAME, T, OP)                                                                    \
  inline T NAME(unsigned mask, T v, const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) { \
    return ::chingu_emu::detail::reduce_impl<T, OP>(mask, v, #NAME, file, line);                           \
  }
CHINGU_EMU_REDUCE(__reduce_add_sync, unsigned, 0)
CHINGU_EMU_REDUCE(__reduce_add_sync, int, 0)
CHINGU_EMU_REDUCE(__reduce_min_sync, unsigned, 1)
CHINGU_EMU_REDUCE(__reduce_min_sync, int, 1)
CHINGU_EMU_REDUCE(__reduce_max_sync, unsigned, 2)
CHINGU_EMU_REDUCE(__reduce_max_sync, int, 2)
CHINGU_EMU_REDUCE(__reduce_and_sync, unsigned, 3)
CHINGU_EMU_REDUCE(__reduce_or_sync, unsigned, 4)
CHINGU_EMU_REDUCE(__reduce_xor_sync, unsigned, 5)
#undef CHINGU_EMU_REDUCE

// assert() inside kernels reports launch/block/thread (a later #include <cassert>
// re-installs the libc version, which still aborts, without those details).
#undef assert
#ifdef NDEBUG
#define assert(e) (static_cast<void>(0))
#else
#define assert(e) \
  (static_cast<bool>(e) ? static_cast<void>(0) : ::chingu_emu::detail::assert_fail(#e, __FILE__, __LINE__, __PRETTY_FUNCTION__))
#endif

// ---------------------------------------------------------------------------------------
// WMMA (m16n16k16). Fragment element order is the emulator's own: lane l holds elements
// [8l, 8l+8) of the tile in row-major logical order. Treat it as opaque.
// ---------------------------------------------------------------------------------------
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int m, int n, int k, class T, class Layout = void>
class fragment {
  static_assert(m == 16 && n == 16 && k == 16, "chingu_emu WMMA: only the m16n16k16 shape is emulated");
  static_assert(std::is_same<Use, matrix_a>::value || std::is_same<Use, matrix_b>::value ||
                    std::is_same<Use, accumulator>::value,
                "chingu_emu WMMA: Use must be matrix_a, matrix_b or accumulator");
  static_assert(std::is_same<Use, accumulator>::value || std::is_same<T, __half>::value,
                "chingu_emu WMMA: matrix_a/matrix_b fragments must hold __half");
  static_assert(!std::is_same<Use, accumulator>::value || std::is_same<T, float>::value || std::is_same<T, __half>::value,
                "chingu_emu WMMA: accumulator fragments must hold float or __half");
  static_assert(std::is_same<Use, accumulator>::value
                    ? std::is_same<Layout, void>::value
                    : (std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value),
                "chingu_emu WMMA: matrix_a/matrix_b need row_major or col_major; accumulator takes no layout");

 public:
  static constexpr int num_elements = 8;
  using element_type = T;
  T x[num_elements];
  fragment() { std::memset(static_cast<void*>(x), 0xff, sizeof x); }  // NaN until filled/loaded
};

}  // namespace wmma
}  // namespace nvcuda

namespace chingu_emu {
namespace detail {

template <class T>
inline void wmma_check_args(const char* what, const void* p, unsigned ldm, const char* file, unsigned line) {
  if (!g_launch->cfg.check_wmma_alignment) return;
  if (reinterpret_cast<uintptr_t>(p) % 32u != 0)
    fail(strf("%s at %s:%u: pointer %p is not 32-byte (256-bit) aligned, as WMMA requires", what, file, line, p));
  if (ldm % (16u / sizeof(T)) != 0)
    fail(strf("%s at %s:%u: ldm %u is not a multiple of %zu elements (16 bytes), as WMMA requires", what, file, line,
              ldm, 16u / sizeof(T)));
}

inline void wmma_require_full_warp(const char* what, const char* file, unsigned line) {
  const Fiber& f = cur_fiber(what);
  const Warp& w = g_launch->warps[f.warp];
  if (w.exist != 0xffffffffu)
    fail(strf("%s at %s:%u: WMMA needs a full warp of 32 threads, but warp %u of this %u-thread block has only %d",
              what, file, line, f.warp, g_launch->nthreads, __builtin_popcount(w.exist)));
}

inline void wmma_require_all_lanes(uint32_t part, const char* what) {
  if (part != 0xffffffffu)
    fail(strf("%s: only lanes 0x%08x of the warp took part (lanes exited); WMMA needs all 32", what, part));
}

// Load (Store=false) or store (Store=true) all 32 lanes' fragments. p[0] = fragment x,
// p[1] = memory, aux[0] = ldm, aux[1] = 1 for column-major memory.
template <class T, bool Store>
inline void release_wmma_mem(Warp& w, uint32_t part) {
  const char* what = Store ? "wmma::store_matrix_sync" : "wmma::load_matrix_sync";
  wmma_require_all_lanes(part, what);
  const LaneSlot& s0 = w.lane[0];
  for (unsigned l = 1; l < 32; ++l) {
    const LaneSlot& s = w.lane[l];
    if (s.p[1] != s0.p[1] || s.aux[0] != s0.aux[0] || s.aux[1] != s0.aux[1])
      fail(strf("%s: lane %u passed (ptr %p, ldm %u, %s) but lane 0 passed (ptr %p, ldm %u, %s); arguments must be "
                "warp-uniform",
                what, l, s.p[1], s.aux[0], s.aux[1] ? "col-major" : "row-major", s0.p[1], s0.aux[0],
                s0.aux[1] ? "col-major" : "row-major"));
  }
  const size_t ldm = s0.aux[0];
  const bool col = s0.aux[1] != 0;
  for (unsigned l = 0; l < 32; ++l) {
    for (unsigned i = 0; i < 8; ++i) {
      const unsigned e = 8 * l + i, r = e / 16, c = e % 16;
      const size_t off = col ? c * ldm + r : r * ldm + c;
      if (Store) {
        const T* frag = static_cast<const T*>(w.lane[l].p[0]);
        static_cast<T*>(const_cast<void*>(s0.p[1]))[off] = frag[i];
      } else {
        T* frag = static_cast<T*>(const_cast<void*>(w.lane[l].p[0]));
        frag[i] = static_cast<const T*>(s0.p[1])[off];
      }
    }
  }
}

template <class T, bool Store>
inline void wmma_mem(const void* frag_x, const void* mem, unsigned ldm, bool col, const char* what, const char* file,
                     unsigned line) {
  wmma_require_full_warp(what, file, line);
  wmma_check_args<T>(what, mem, ldm, file, line);
  LaneSlot& s = my_slot(what);
  s.p[0] = frag_x;
  s.p[1] = mem;
  s.aux[0] = ldm;
  s.aux[1] = col ? 1u : 0u;
  warp_collective(0xffffffffu, &release_wmma_mem<T, Store>, what, file, line);
}

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline void from_float(float& d, float v) { d = v; }
inline void from_float(__half& d, float v) { d = __float2half(v); }

// p[0..3] = a.x, b.x, c.x, d.x
template <class TC, class TD>
inline void release_wmma_mma(Warp& w, uint32_t part) {
  wmma_require_all_lanes(part, "wmma::mma_sync");
  float A[256], B[256], C[256];
  for (unsigned l = 0; l < 32; ++l) {
    const __half* a = static_cast<const __half*>(w.lane[l].p[0]);
    const __half* b = static_cast<const __half*>(w.lane[l].p[1]);
    const TC* c = static_cast<const TC*>(w.lane[l].p[2]);
    for (unsigned i = 0; i < 8; ++i) {
      A[8 * l + i] = __half2float(a[i]);
      B[8 * l + i] = __half2float(b[i]);
      C[8 * l + i] = to_float(c[i]);
    }
  }
  float D[256];
  for (unsigned r = 0; r < 16; ++r)
    for (unsigned c = 0; c < 16; ++c) {
      float acc = C[r * 16 + c];
      for (unsigned k = 0; k < 16; ++k) acc += A[r * 16 + k] * B[k * 16 + c];  // products exact in float
      D[r * 16 + c] = acc;
    }
  for (unsigned l = 0; l < 32; ++l) {
    TD* d = static_cast<TD*>(const_cast<void*>(w.lane[l].p[3]));
    for (unsigned i = 0; i < 8; ++i) from_float(d[i], D[8 * l + i]);
  }
}

template <class Layout> constexpr bool is_col_major() { return std::is_same<Layout, nvcuda::wmma::col_major>::value; }

// PTX mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 with the PTX ISA's documented
// fragment layout (unlike WMMA's, which is opaque). g = lane / 4, t = lane % 4; each 32-bit
// register holds two halves, the lower-indexed element in the low 16 bits.
//   A (16×16, 4 registers): a[0] = (row g, cols 2t, 2t+1), a[1] = (g + 8, 2t..),
//                           a[2] = (g, 2t + 8..), a[3] = (g + 8, 2t + 8..)
//   B (16×8, 2 registers):  b[0] = (rows 2t, 2t+1, col g), b[1] = (rows 2t + 8, 2t + 9, col g)
//   C, D (16×8, 4 floats):  [0], [1] = (row g, cols 2t, 2t+1); [2], [3] = (row g + 8, ...)
// p[0..3] = a, b, c, d of each lane.
inline float half_bits_to_float(uint32_t reg, unsigned hi) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(hi ? reg >> 16 : reg & 0xffffu)));
}

inline void release_mma_m16n8k16(Warp& w, uint32_t part) {
  if (part != 0xffffffffu)
    fail(strf("mma_m16n8k16: only lanes 0x%08x of the warp took part (lanes exited); it needs all 32", part));
  float A[16][16], B[16][8], C[16][8];
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned g = l / 4, t = l % 4;
    const uint32_t* a = static_cast<const uint32_t*>(w.lane[l].p[0]);
    const uint32_t* b = static_cast<const uint32_t*>(w.lane[l].p[1]);
    const float* c = static_cast<const float*>(w.lane[l].p[2]);
    for (unsigned h = 0; h < 2; ++h) {
      A[g][2 * t + h] = half_bits_to_float(a[0], h);
      A[g + 8][2 * t + h] = half_bits_to_float(a[1], h);
      A[g][2 * t + 8 + h] = half_bits_to_float(a[2], h);
      A[g + 8][2 * t + 8 + h] = half_bits_to_float(a[3], h);
      B[2 * t + h][g] = half_bits_to_float(b[0], h);
      B[2 * t + 8 + h][g] = half_bits_to_float(b[1], h);
      C[g][2 * t + h] = c[h];
      C[g + 8][2 * t + h] = c[2 + h];
    }
  }
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned g = l / 4, t = l % 4;
    float* d = static_cast<float*>(const_cast<void*>(w.lane[l].p[3]));
    for (unsigned e = 0; e < 4; ++e) {
      const unsigned r = g + 8 * (e / 2), col = 2 * t + e % 2;
      float acc = C[r][col];
      for (unsigned k = 0; k < 16; ++k) acc += A[r][k] * B[k][col];  // products exact in float
      d[e] = acc;
    }
  }
}

}  // namespace detail

// d = a·b + c for one m16n8k16 tile (see release_mma_m16n8k16 for the layout); a warp
// collective over all 32 lanes. d may alias c: the release reads every lane's inputs before
// it writes any result.
inline void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c,
                         const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) {
  using namespace detail;
  wmma_require_full_warp("mma_m16n8k16", file, line);
  LaneSlot& s = my_slot("mma_m16n8k16");
  s.p[0] = a;
  s.p[1] = b;
  s.p[2] = c;
  s.p[3] = d;
  warp_collective(0xffffffffu, &release_mma_m16n8k16, "mma_m16n8k16", file, line);
}

// --- wgmma: Hopper's warpgroup MMA (sm_90a) ---------------------------------------------
// PTX wgmma.mma_async.sync.aligned.m64nNk16.f32.f16.f16 (D[64×N] (+)= A[64×16]·B[16×N]),
// A from registers or from a shared-memory matrix descriptor, B from a descriptor; then
// wgmma.commit_group and wgmma.wait_group. A warpgroup is 4 consecutive warps from a warp
// index divisible by 4; warp w of it owns rows 16w..16w+15 of A and D, so each warp's part
// is computed on its own, as a warp collective. Register layouts (g = lane / 4, t = lane % 4):
//   A (4 registers, as mma_m16n8k16's): a[0] = (row g, k 2t..2t+1), a[1] = (g + 8, 2t..),
//     a[2] = (g, 2t + 8..), a[3] = (g + 8, 2t + 8..), the lower-indexed half low;
//   D (N/2 floats): d[4j + e] = (row g + 8·(e / 2), column 8j + 2t + e % 2), j < N/8.
// Descriptor (64 bits): start address >> 4 in bits 0–13, leading-dimension byte offset
// (LBO) >> 4 in 16–29, stride-dimension byte offset (SBO) >> 4 in 32–45, base offset in
// 49–51 (only 0 is emulated: swizzle atoms aligned to their size), swizzle in 62–63 (0 none,
// 1 128-byte, 2 64-byte, 3 32-byte). Addresses are offsets into the block's dynamic shared
// memory (chingu::shared_offset). Element (mn, k) of an operand (mn the row of A or the
// column of B), byte offset before the swizzle:
//   K-major, no swizzle:   start + (mn/8)·SBO + (mn%8)·16 + (k/8)·LBO + (k%8)·2
//   MN-major, no swizzle:  start + (mn/8)·SBO + (mn%8)·2 + (k/8)·LBO + (k%8)·16
//   K-major, W-byte swizzle (W = 128, 64, 32): start + (mn/8)·SBO + (mn%8)·W + k·2 (LBO
//     unused: one instruction's 16 k lie in one row)
//   MN-major, W-byte swizzle: start + (mn/(W/2))·LBO + (mn%(W/2))·2 + (k/8)·SBO + (k%8)·W
// and the swizzle XORs the 16-byte chunk index (bits 4–6) with bits 7–9 of the offset (3, 2
// or 1 bits for 128, 64, 32 bytes). This is the ISA's canonical layouts as we read them
// (CUTLASS's GMMA descriptors describe the same); kernels/cuda/hopper.cu's probe checks the
// reading on an H100 before any kernel depends on it.
// Timing: the emulator computes a product at the wait that completes its group, reading A's
// registers, shared memory and D then; so a kernel that changes any of them between the
// issue and that wait, or reads D before it, gets a wrong result here as it may on a GPU.
namespace detail {
struct WgmmaOp {
  float* d;           // this thread's N/2 accumulators
  const uint32_t* a;  // its 4 A registers, or null: A from a_desc
  uint64_t a_desc, b_desc;
  unsigned n;
  bool trans_b, accumulate;
  const char* file;
  unsigned line;
};
struct WgmmaQueue {
  std::vector<std::vector<WgmmaOp>> committed;
  std::vector<WgmmaOp> open;
};
// What a warp's wait completes, as the other warps of its warpgroup must have issued it too
// (wgmma is the warpgroup's instruction: a warp that skips or reorders one hangs a GPU).
struct WgmmaSig {
  unsigned n;
  bool trans_b, accumulate, a_from_regs;
  uint64_t a_desc, b_desc;
  bool operator==(const WgmmaSig& o) const {
    return n == o.n && trans_b == o.trans_b && accumulate == o.accumulate && a_from_regs == o.a_from_regs &&
           (a_from_regs || a_desc == o.a_desc) && b_desc == o.b_desc;
  }
};
// The running block's wgmma state (blocks run one at a time), started afresh when a block
// first issues one; `block` says which block it belongs to: each thread's queue, and for the
// warpgroup check each warpgroup's products at each wait (as the first warp to reach it
// recorded them) and each warp's count of waits.
struct WgmmaBlock {
  uint64_t block = 0;
  std::vector<WgmmaQueue> threads = std::vector<WgmmaQueue>(1024);
  std::vector<std::vector<std::vector<WgmmaSig>>> group_waits = decltype(group_waits)(8);
  std::vector<size_t> warp_waits = std::vector<size_t>(32);
};
// `fresh`: start it afresh if it belongs to an earlier block.
inline WgmmaBlock& wgmma_block(bool fresh = true) {
  static WgmmaBlock b;
  if (fresh && b.block != g_block_serial) {
    b.block = g_block_serial;
    for (WgmmaQueue& q : b.threads) {
      q.committed.clear();
      q.open.clear();
    }
    for (auto& waits : b.group_waits) waits.clear();
    for (size_t& n : b.warp_waits) n = 0;
  }
  return b;
}
inline WgmmaQueue& my_wgmma_queue() {
  const unsigned tid = g_threadIdx.x + g_blockDim.x * (g_threadIdx.y + g_blockDim.y * g_threadIdx.z);
  return wgmma_block().threads[tid];
}

// The half at element (mn, k) of the operand `desc` describes (see above).
inline float wgmma_element(uint64_t desc, unsigned mn, unsigned k, bool mn_major, const WgmmaOp& op) {
  const size_t start = (desc & 0x3fffu) << 4, lbo = ((desc >> 16) & 0x3fffu) << 4,
               sbo = ((desc >> 32) & 0x3fffu) << 4;
  const unsigned base_offset = (desc >> 49) & 7u, mode = static_cast<unsigned>(desc >> 62);
  if (base_offset)
    fail(strf("wgmma at %s:%u: descriptor base offset %u is not emulated (align swizzle atoms)", op.file,
              op.line, base_offset));
  size_t off;
  if (mode == 0) {
    off = mn_major ? start + (mn / 8) * sbo + (mn % 8) * 2 + (k / 8) * lbo + (k % 8) * 16
                   : start + (mn / 8) * sbo + (mn % 8) * 16 + (k / 8) * lbo + (k % 8) * 2;
  } else {
    const size_t width = mode == 1 ? 128 : mode == 2 ? 64 : 32;
    if (mn_major) {
      const size_t per_row = width / 2;
      off = start + (mn / per_row) * lbo + (mn % per_row) * 2 + (k / 8) * sbo + (k % 8) * width;
    } else {
      if (start % width + 32 > width)
        fail(strf("wgmma at %s:%u: a K-major swizzled operand's 16 k cross its %zu-byte row (start %zu)",
                  op.file, op.line, width, start));
      off = start + (mn / 8) * sbo + (mn % 8) * width + k * 2;
    }
    const size_t bits = mode == 1 ? 7 : mode == 2 ? 3 : 1;
    off ^= ((off >> 7) & bits) << 4;
  }
  if (off + 2 > g_launch->smem_bytes)
    fail(strf("wgmma at %s:%u: element (%u, %u) at shared offset %zu, past the block's %zu bytes", op.file,
              op.line, mn, k, off, g_launch->smem_bytes));
  __half h;
  std::memcpy(&h, g_launch->smem + off, 2);
  return __half2float(h);
}

// Checks warp `warp`'s next wait against what the first of its warpgroup to reach that wait
// recorded.
inline void check_warpgroup_wait(unsigned warp, const std::vector<WgmmaOp>& done, const char* file,
                                 unsigned line) {
  WgmmaBlock& b = wgmma_block();
  std::vector<WgmmaSig> sig;
  for (const WgmmaOp& op : done) sig.push_back(WgmmaSig{op.n, op.trans_b, op.accumulate, op.a != nullptr, op.a_desc, op.b_desc});
  std::vector<std::vector<WgmmaSig>>& log = b.group_waits[warp / 4];
  const size_t i = b.warp_waits[warp]++;
  if (i == log.size()) {
    log.push_back(std::move(sig));
  } else if (!(log[i] == sig)) {
    fail(strf("wgmma.wait_group at %s:%u: warp %u completes %zu products unlike another warp of its warpgroup "
              "at the same wait (%zu): every warp of a warpgroup must issue the same wgmmas",
              file, line, warp, sig.size(), log[i].size()));
  }
}

// p[0] of each lane: the std::vector<WgmmaOp> of products its wait completes, in issue order.
inline void release_wgmma_wait(Warp& w, uint32_t part) {
  if (part != 0xffffffffu)
    fail(strf("wgmma wait: only lanes 0x%08x of the warp took part; it needs all 32", part));
  const std::vector<WgmmaOp>* ops[32];
  for (unsigned l = 0; l < 32; ++l) ops[l] = static_cast<const std::vector<WgmmaOp>*>(w.lane[l].p[0]);
  for (unsigned l = 1; l < 32; ++l)
    if (ops[l]->size() != ops[0]->size())
      fail(strf("wgmma wait: lane %u completes %zu products, lane 0 %zu (the warp must issue alike)", l,
                ops[l]->size(), ops[0]->size()));
  const unsigned rank = w.index % 4;  // the warp's rows of the warpgroup's 64
  for (size_t i = 0; i < ops[0]->size(); ++i) {
    const WgmmaOp& o = (*ops[0])[i];
    for (unsigned l = 1; l < 32; ++l) {
      const WgmmaOp& x = (*ops[l])[i];
      if (x.n != o.n || x.trans_b != o.trans_b || x.accumulate != o.accumulate || x.b_desc != o.b_desc ||
          (x.a == nullptr) != (o.a == nullptr) || (!o.a && x.a_desc != o.a_desc))
        fail(strf("wgmma at %s:%u: lane %u's shape, descriptors or scale differ from lane 0's", o.file, o.line,
                  l));
    }
    float A[16][16];
    for (unsigned l = 0; l < 32; ++l) {
      const unsigned g = l / 4, t = l % 4;
      for (unsigned h = 0; h < 2; ++h) {
        if (o.a) {
          const uint32_t* a = (*ops[l])[i].a;
          A[g][2 * t + h] = half_bits_to_float(a[0], h);
          A[g + 8][2 * t + h] = half_bits_to_float(a[1], h);
          A[g][2 * t + 8 + h] = half_bits_to_float(a[2], h);
          A[g + 8][2 * t + 8 + h] = half_bits_to_float(a[3], h);
        }
      }
    }
    if (!o.a)
      for (unsigned r = 0; r < 16; ++r)
        for (unsigned k = 0; k < 16; ++k) A[r][k] = wgmma_element(o.a_desc, 16 * rank + r, k, false, o);
    std::vector<float> B(16 * o.n);
    for (unsigned k = 0; k < 16; ++k)
      for (unsigned c = 0; c < o.n; ++c) B[k * o.n + c] = wgmma_element(o.b_desc, c, k, o.trans_b, o);
    for (unsigned l = 0; l < 32; ++l) {
      const unsigned g = l / 4, t = l % 4;
      float* d = (*ops[l])[i].d;
      for (unsigned j = 0; j < o.n / 8; ++j)
        for (unsigned e = 0; e < 4; ++e) {
          const unsigned r = g + 8 * (e / 2), c = 8 * j + 2 * t + e % 2;
          float acc = o.accumulate ? d[4 * j + e] : 0.0f;
          for (unsigned k = 0; k < 16; ++k) acc += A[r][k] * B[k * o.n + c];  // products exact in float
          d[4 * j + e] = acc;
        }
    }
  }
}
}  // namespace detail

namespace detail {
inline std::string wgmma_left_pending() {
  const WgmmaBlock& all = wgmma_block(false);
  if (all.block != g_block_serial) return {};  // this block issued no wgmma
  for (size_t t = 0; t < all.threads.size(); ++t) {
    const WgmmaQueue& q = all.threads[t];
    const WgmmaOp* first = nullptr;
    size_t waiting = 0;
    for (const std::vector<WgmmaOp>& group : q.committed) {
      waiting += group.size();
      if (!first && !group.empty()) first = &group.front();
    }
    if (!first && !q.open.empty()) first = &q.open.front();
    if (first)  // (empty groups left pending do nothing)
      return strf("thread %zu ended with %zu wgmma products not waited for and %zu not committed (the first "
                  "issued at %s:%u): a kernel must wait for every product before it ends",
                  t, waiting, q.open.size(), first->file, first->line);
  }
  return {};
}
}  // namespace detail

// One wgmma.mma_async (see above): queued in this thread's open group; `a` null when A comes
// from `a_desc`. Every thread of the warpgroup issues it alike.
inline void wgmma_mma(float* d, const uint32_t* a, uint64_t a_desc, uint64_t b_desc, unsigned n, bool trans_b,
                      bool accumulate, const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) {
  using namespace detail;
  wmma_require_full_warp("wgmma.mma_async", file, line);
  if (n % 8 != 0 || n < 8 || n > 256) fail(strf("wgmma at %s:%u: N = %u is not a multiple of 8 in [8, 256]", file, line, n));
  if (g_blockDim.x * g_blockDim.y * g_blockDim.z % 128 != 0)
    fail(strf("wgmma at %s:%u: the block's %u threads are not whole warpgroups of 128", file, line,
              g_blockDim.x * g_blockDim.y * g_blockDim.z));
  my_wgmma_queue().open.push_back(WgmmaOp{d, a, a_desc, b_desc, n, trans_b, accumulate, file, line});
}

// wgmma.commit_group: this thread's queued products become one group.
inline void wgmma_commit() {
  detail::WgmmaQueue& q = detail::my_wgmma_queue();
  q.committed.push_back(std::move(q.open));
  q.open.clear();
}

// wgmma.wait_group N: every committed group but the newest `pending` completes, in order.
inline void wgmma_wait(unsigned pending, const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) {
  using namespace detail;
  wmma_require_full_warp("wgmma.wait_group", file, line);
  WgmmaQueue& q = my_wgmma_queue();
  std::vector<WgmmaOp> done;
  while (q.committed.size() > pending) {
    for (const WgmmaOp& op : q.committed.front()) done.push_back(op);
    q.committed.erase(q.committed.begin());
  }
  LaneSlot& s = my_slot("wgmma.wait_group");
  s.p[0] = &done;
  const Fiber& f = cur_fiber("wgmma.wait_group");
  if (f.lane == 0) check_warpgroup_wait(f.warp, done, file, line);
  warp_collective(0xffffffffu, &release_wgmma_wait, "wgmma.wait_group", file, line);
}

}  // namespace chingu_emu

namespace nvcuda {
namespace wmma {

template <class Use, int m, int n, int k, class T, class Layout>
inline void fill_fragment(fragment<Use, m, n, k, T, Layout>& a,
                          const typename ::chingu_emu::detail::type_identity<T>::type& v) {
  for (int i = 0; i < a.num_elements; ++i) a.x[i] = v;
}

template <class Use, class Layout,
          std::enable_if_t<std::is_same<Use, matrix_a>::value || std::is_same<Use, matrix_b>::value, int> = 0>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, __half, Layout>& a, const __half* p, unsigned ldm,
                             const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) {
  ::chingu_emu::detail::wmma_mem<__half, false>(a.x, p, ldm, ::chingu_emu::detail::is_col_major<Layout>(),
                                                "wmma::load_matrix_sync", file, line);
}

template <class T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& a, const T* p, unsigned ldm, layout_t layout,
                             const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) {
  ::chingu_emu::detail::wmma_mem<T, false>(a.x, p, ldm, layout == mem_col_major, "wmma::load_matrix_sync", file,
                                           line);
}

template <class T>
inline void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& a, unsigned ldm, layout_t layout,
                              const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) {
  ::chingu_emu::detail::wmma_mem<T, true>(a.x, p, ldm, layout == mem_col_major, "wmma::store_matrix_sync", file,
                                          line);
}

template <class TD, class TC, class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, TD>& d, const fragment<matrix_a, 16, 16, 16, __half, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, __half, LB>& b,
                     const fragment<accumulator, 16, 16, 16, TC>& c, bool satf = false,
                     const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) {
  using namespace ::chingu_emu::detail;
  if (satf) fail(strf("wmma::mma_sync at %s:%u: satf=true is not emulated", file, line));
  wmma_require_full_warp("wmma::mma_sync", file, line);
  LaneSlot& s = my_slot("wmma::mma_sync");
  s.p[0] = a.x;
  s.p[1] = b.x;
  s.p[2] = c.x;
  s.p[3] = d.x;
  warp_collective(0xffffffffu, &release_wmma_mma<TC, TD>, "wmma::mma_sync", file, line);
}

}  // namespace wmma
}  // namespace nvcuda

#endif  // CHINGU_KERNELS_CUDA_EMU_H

// Self-test of cuda_emu.h (the CPU CUDA emulator). Build and run (from the repo root):
//   g++ -std=c++17 -O1 -Wall -Wextra -Werror -Wno-unknown-pragmas -pthread -o /tmp/chingu_emu_selftest kernels/cuda/emu/selftest.cpp
//   /tmp/chingu_emu_selftest
// Also under sanitizers:
//   g++ -std=c++17 -O1 -g -Wall -Wextra -Werror -Wno-unknown-pragmas -pthread -fsanitize=address,undefined
//       -fno-sanitize-recover=undefined -o /tmp/chingu_emu_selftest_san kernels/cuda/emu/selftest.cpp
//   /tmp/chingu_emu_selftest_san
// Prints one line per check; exits 1 if any check fails.

#define CHINGU_EMU 1
#include "cuda_emu.h"
// The kernels' shared helpers, for ldmatrix (built on the emulator's shuffles) with mma
// (their `#pragma unroll`s are NVRTC's: build with -Wno-unknown-pragmas, as the kernels are).
#include "../common.cuh"

#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <functional>
#include <random>
#include <thread>

namespace {

int g_pass = 0, g_fail = 0;
const char* g_schedule_note = "";  // appended to every check's name (the schedule it ran under)

void check(bool ok, const char* name, const std::string& detail = std::string()) {
  std::printf("[%s] %s%s%s%s\n", ok ? "PASS" : "FAIL", name, g_schedule_note, detail.empty() ? "" : ": ",
              detail.c_str());
  std::fflush(stdout);
  (ok ? g_pass : g_fail) += 1;
}

bool contains(const std::string& s, const char* sub) { return s.find(sub) != std::string::npos; }

// ---------------------------------------------------------------------------------------
// __half against g++'s _Float16
// ---------------------------------------------------------------------------------------
uint16_t f16_bits(_Float16 h) { uint16_t u; std::memcpy(&u, &h, 2); return u; }
_Float16 bits_f16(uint16_t u) { _Float16 h; std::memcpy(&h, &u, 2); return h; }
bool is_nan16(uint16_t u) { return (u & 0x7fffu) > 0x7c00u; }
bool same16(uint16_t a, uint16_t b) { return (is_nan16(a) || is_nan16(b)) ? (is_nan16(a) && is_nan16(b)) : a == b; }
uint32_t fbits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
float bitsf(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

struct Mismatch {
  uint64_t count = 0, total = 0;
  std::string first;
  void add(bool ok, const std::string& what) {
    ++total;
    if (!ok && count++ == 0) first = what;
  }
  std::string detail() const {
    return count ? strfmt("%" PRIu64 "/%" PRIu64 " mismatches, first: %s", count, total, first.c_str())
                 : strfmt("%" PRIu64 " values", total);
  }
  static std::string strfmt(const char* fmt, ...) __attribute__((format(printf, 1, 2))) {
    char buf[400];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
  }
};

void check_f2h(Mismatch& m, float f) {
  uint16_t ours = __half_as_ushort(__float2half(f));
  uint16_t ref = f16_bits(static_cast<_Float16>(f));
  if (!same16(ours, ref) || __half_as_ushort(__float2half_rn(f)) != ours)
    m.add(false, Mismatch::strfmt("f=%a (0x%08x): ours 0x%04x ref 0x%04x", static_cast<double>(f), fbits(f), ours, ref));
  else
    m.add(true, "");
}

void test_half_conversions() {
  {
    Mismatch m;
    for (uint32_t u = 0; u < 65536; ++u) {
      float ours = __half2float(__ushort_as_half(static_cast<uint16_t>(u)));
      float ref = static_cast<float>(bits_f16(static_cast<uint16_t>(u)));
      bool ok = (std::isnan(ours) || std::isnan(ref)) ? (std::isnan(ours) && std::isnan(ref)) : fbits(ours) == fbits(ref);
      m.add(ok, Mismatch::strfmt("h=0x%04x: ours %a ref %a", u, static_cast<double>(ours), static_cast<double>(ref)));
    }
    check(m.count == 0, "__half2float == (float)_Float16 for all 2^16 patterns", m.detail());
  }
  {
    Mismatch m;
    for (uint32_t u = 0; u < 65536; ++u) {
      float f = __half2float(__ushort_as_half(static_cast<uint16_t>(u)));
      uint16_t back = __half_as_ushort(__float2half(f));
      m.add(same16(back, static_cast<uint16_t>(u)), Mismatch::strfmt("h=0x%04x -> 0x%04x", u, back));
      check_f2h(m, f);
    }
    check(m.count == 0, "__float2half(__half2float(h)) == h and == _Float16 for all 2^16 patterns", m.detail());
  }
  {
    // Every halfway point between adjacent halves (both signs), and its float neighbours.
    Mismatch m;
    for (uint32_t u = 0; u < 0x7c00; ++u) {
      float lo = __half2float(__ushort_as_half(static_cast<uint16_t>(u)));
      float hi = u == 0x7bff ? 65536.0f : __half2float(__ushort_as_half(static_cast<uint16_t>(u + 1)));
      float mid = (lo + hi) * 0.5f;  // exact: 12 significant bits
      for (float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY)}) {
        check_f2h(m, f);
        check_f2h(m, -f);
      }
    }
    check(m.count == 0, "__float2half at/around every halfway point (incl. subnormal, overflow)", m.detail());
  }
  {
    bool ok = __half_as_ushort(__float2half(65520.0f)) == 0x7c00 &&
              __half_as_ushort(__float2half(std::nextafter(65520.0f, 0.0f))) == 0x7bff &&
              __half_as_ushort(__float2half(-65520.0f)) == 0xfc00 &&
              __half_as_ushort(__float2half(65504.0f)) == 0x7bff &&
              __half_as_ushort(__float2half(INFINITY)) == 0x7c00 && __hisnan(__float2half(NAN)) &&
              __half_as_ushort(__float2half(5.9604645e-8f)) == 0x0001 &&     // 2^-24
              __half_as_ushort(__float2half(2.98023224e-8f)) == 0x0000 &&    // 2^-25: tie to even -> 0
              __half_as_ushort(__float2half(-2.98023225e-8f * 1.0000001f)) == 0x8001 &&
              __half_as_ushort(__float2half(-0.0f)) == 0x8000;
    check(ok, "__float2half special values (65520->inf, 65519.99->65504, 2^-25 ties to 0, -0)");
  }
  {
    // All floats of several binades: around the subnormal/normal boundary, below the
    // smallest subnormal, around 1, and at the top of the range.
    Mismatch m;
    for (int e : {-26, -25, -24, -15, -14, -1, 15}) {
      for (uint32_t mant = 0; mant < (1u << 23); ++mant) check_f2h(m, bitsf((static_cast<uint32_t>(e + 127) << 23) | mant));
    }
    check(m.count == 0, "__float2half for every float in binades 2^-26,-25,-24,-15,-14,-1,15", m.detail());
  }
  {
    Mismatch m;
    std::mt19937 rng(12345);
    for (int i = 0; i < 4000000; ++i) check_f2h(m, bitsf(static_cast<uint32_t>(rng())));
    check(m.count == 0, "__float2half on 4M random float bit patterns", m.detail());
  }
  {
    Mismatch m;
    std::mt19937_64 rng(777);
    for (int i = 0; i < 2000000; ++i) {
      double d;
      if (i & 1) {
        // random double with exponent in [-30, 17]
        uint64_t u = (rng() & 0x800fffffffffffffull) | (static_cast<uint64_t>(1023 - 30 + rng() % 48) << 52);
        std::memcpy(&d, &u, 8);
      } else {
        // a halfway point between two halves, nudged by a few double ulps
        uint16_t h = static_cast<uint16_t>(rng() % 0x7bff);
        double mid = (static_cast<double>(__half2float(__ushort_as_half(h))) +
                      static_cast<double>(__half2float(__ushort_as_half(static_cast<uint16_t>(h + 1))))) * 0.5;
        int nudge = static_cast<int>(rng() % 5) - 2;
        d = mid;
        for (int k = 0; k < (nudge < 0 ? -nudge : nudge); ++k) d = std::nextafter(d, nudge < 0 ? 0.0 : INFINITY);
        if (rng() & 1) d = -d;
      }
      uint16_t ours = __half_as_ushort(__double2half(d));
      uint16_t ref = f16_bits(static_cast<_Float16>(d));
      m.add(same16(ours, ref), Mismatch::strfmt("d=%a: ours 0x%04x ref 0x%04x", d, ours, ref));
    }
    check(m.count == 0, "__double2half on 2M doubles (random, halfway points +-ulps)", m.detail());
  }
}

void test_half_arith() {
  std::mt19937 rng(4242);
  Mismatch add, sub, mul, div, fma;
  for (int i = 0; i < 2000000; ++i) {
    uint16_t ua = static_cast<uint16_t>(rng()), ub = static_cast<uint16_t>(rng()), uc = static_cast<uint16_t>(rng());
    if (i & 1) {  // also many values of similar magnitude (cancellation, small results)
      ub = static_cast<uint16_t>((ua & 0xfc00u) ^ (rng() & 0x87ffu));
    }
    __half a = __ushort_as_half(ua), b = __ushort_as_half(ub), c = __ushort_as_half(uc);
    _Float16 fa = bits_f16(ua), fb = bits_f16(ub), fc = bits_f16(uc);
    _Float16 r;
    r = fa + fb;
    add.add(same16(__half_as_ushort(__hadd(a, b)), f16_bits(r)) && same16(__half_as_ushort(a + b), f16_bits(r)),
            Mismatch::strfmt("0x%04x+0x%04x", ua, ub));
    r = fa - fb;
    sub.add(same16(__half_as_ushort(__hsub(a, b)), f16_bits(r)) && same16(__half_as_ushort(a - b), f16_bits(r)),
            Mismatch::strfmt("0x%04x-0x%04x", ua, ub));
    r = fa * fb;
    mul.add(same16(__half_as_ushort(__hmul(a, b)), f16_bits(r)) && same16(__half_as_ushort(a * b), f16_bits(r)),
            Mismatch::strfmt("0x%04x*0x%04x", ua, ub));
    r = fa / fb;
    div.add(same16(__half_as_ushort(__hdiv(a, b)), f16_bits(r)) && same16(__half_as_ushort(a / b), f16_bits(r)),
            Mismatch::strfmt("0x%04x/0x%04x", ua, ub));
    long double exact = static_cast<long double>(fa) * static_cast<long double>(fb) + static_cast<long double>(fc);
    _Float16 rf = static_cast<_Float16>(exact);
    fma.add(same16(__half_as_ushort(__hfma(a, b, c)), f16_bits(rf)), Mismatch::strfmt("fma(0x%04x,0x%04x,0x%04x)", ua, ub, uc));
  }
  check(add.count == 0, "__hadd / operator+ == _Float16 on 2M random pairs", add.detail());
  check(sub.count == 0, "__hsub / operator- == _Float16 on 2M random pairs", sub.detail());
  check(mul.count == 0, "__hmul / operator* == _Float16 on 2M random pairs", mul.detail());
  check(div.count == 0, "__hdiv / operator/ == _Float16 on 2M random pairs", div.detail());
  check(fma.count == 0, "__hfma == long-double fma rounded once to _Float16 on 2M random triples", fma.detail());

  __half h = 1.0f;  // implicit conversions as in cuda_fp16.h
  float f = h;
  __half three = 3;
  __half sum = h + three;
  sum += __float2half(0.5f);
  __half2 p = __floats2half2_rn(1.5f, -2.25f);
  __half2 q = __hmul2(__hadd2(p, p), __half2half2(__float2half(0.5f)));
  float2 pf = __half22float2(q);
  bool ok = f == 1.0f && static_cast<float>(sum) == 4.5f && __low2float(q) == 1.5f && __high2float(q) == -2.25f &&
            pf.x == 1.5f && pf.y == -2.25f && __hgt(three, h) && __hlt(h, three) && __heq(h, __float2half(1.0f)) &&
            __hisinf(__float2half(-1e6f)) == -1 && __hisnan(__hdiv(__float2half(0.0f), __float2half(0.0f))) &&
            __half_as_ushort(__hneg(h)) == 0xbc00 && (h < three) && -three == __float2half(-3.0f) &&
            static_cast<float>(__float22half2_rn(make_float2(0.25f, 8.0f)).y) == 8.0f;
  check(ok, "__half implicit conversions, comparisons, __half2 helpers");
}

// ---------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------

__global__ void block_sum(const float* __restrict__ in, float* __restrict__ out, int n) {
  __shared__ float s[256];
  const unsigned t = threadIdx.x;
  const unsigned i = blockIdx.x * blockDim.x + t;
  s[t] = i < static_cast<unsigned>(n) ? in[i] : 0.0f;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

__global__ void warp_ops(const int* in, int* xor_sum, int* down_sum, unsigned* ballot, int* any_odd, int* all_pos,
                         unsigned* active, float* fsum, __half* hmax) {
  const unsigned t = threadIdx.x;
  const unsigned lane = t % 32;
  const int v = in[t];
  int a = v;
  for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
  xor_sum[t] = a;
  int b = v;
  for (unsigned o = 16; o > 0; o >>= 1) b += __shfl_down_sync(0xffffffffu, b, o);
  if (lane == 0) down_sum[t / 32] = b;
  ballot[t] = __ballot_sync(0xffffffffu, v & 1);
  any_odd[t] = __any_sync(0xffffffffu, v & 1);
  all_pos[t] = __all_sync(0xffffffffu, v > 0);
  active[t] = __activemask();
  float f = static_cast<float>(v) * 0.5f;
  for (int o = 16; o > 0; o >>= 1) f += __shfl_xor_sync(0xffffffffu, f, o);
  fsum[t] = f;
  __half h = __int2half_rn(v);
  for (int o = 16; o > 0; o >>= 1) h = __hmax(h, __shfl_xor_sync(0xffffffffu, h, o));
  hmax[t] = h;
}

// Width and out-of-range semantics; run on one full warp.
__global__ void shfl_semantics(int* out) {
  const int lane = static_cast<int>(threadIdx.x);
  const int v = 100 + lane;
  out[0 * 32 + lane] = __shfl_sync(0xffffffffu, v, 3, 8);        // lane (lane & ~7) + 3
  out[1 * 32 + lane] = __shfl_up_sync(0xffffffffu, v, 2, 8);     // lane-2 within group of 8, else own
  out[2 * 32 + lane] = __shfl_down_sync(0xffffffffu, v, 3, 16);  // lane+3 within group of 16, else own
  out[3 * 32 + lane] = __shfl_xor_sync(0xffffffffu, v, 8, 8);    // later group -> own; earlier -> read
  out[4 * 32 + lane] = __shfl_sync(0xffffffffu, v, -1);          // srcLane mod 32 = 31
  out[5 * 32 + lane] = __shfl_down_sync(0xffffffffu, v, 40);     // delta >= width: own value
  if (lane < 16) out[6 * 32 + lane] = __shfl_xor_sync(0x0000ffffu, v, 1);  // two disjoint groups at once
  else out[6 * 32 + lane] = __shfl_xor_sync(0xffff0000u, v, 2);
  out[7 * 32 + lane] = static_cast<int>(__reduce_add_sync(0xffffffffu, static_cast<unsigned>(lane)));
  out[8 * 32 + lane] = __reduce_max_sync(0xffffffffu, lane * 3 - 40);
  __syncwarp();
}

// Partial warp: lanes beyond the block do not exist.
__global__ void partial_warp(unsigned* ballot, int* all1, unsigned* active, int* down16, int* up1) {
  const unsigned t = threadIdx.x;
  const unsigned lane = t % 32;
  ballot[t] = __ballot_sync(0xffffffffu, lane & 1);
  all1[t] = __all_sync(0xffffffffu, 1);
  active[t] = __activemask();
  down16[t] = __shfl_down_sync(0xffffffffu, static_cast<int>(t), 16);  // source may not exist: poison (-1)
  up1[t] = __shfl_up_sync(0xffffffffu, static_cast<int>(t), 1);
}

__global__ void dyn_smem(float* out, int n, unsigned* misaligned) {
  CHINGU_DYNAMIC_SMEM(float, sm);
  CHINGU_DYNAMIC_SMEM(double, smd);  // aliases the same buffer, as in CUDA
  const unsigned t = threadIdx.x;
  if (t == 0 && (reinterpret_cast<uintptr_t>(sm) % 16 != 0 || static_cast<void*>(smd) != static_cast<void*>(sm)))
    atomicAdd(misaligned, 1u);
  sm[t] = static_cast<float>(t * 2 + blockIdx.x);
  __syncthreads();
  out[blockIdx.x * n + t] = sm[(t + 1) % static_cast<unsigned>(n)];
  if (t == 0) out[gridDim.x * n + blockIdx.x] = sm[n];  // never written in this block: poison
  __syncthreads();
  if (t == 0) sm[n] = 42.0f;  // must not leak into the next block
}

__global__ void indices(unsigned* out) {
  const unsigned bl = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned tl = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned g = bl * (blockDim.x * blockDim.y * blockDim.z) + tl;
  unsigned* o = out + 6 * g;
  o[0] = threadIdx.x; o[1] = threadIdx.y; o[2] = threadIdx.z;
  o[3] = blockIdx.x; o[4] = blockIdx.y; o[5] = blockIdx.z;
}

// C[M x N] = A[M x K] * B[K x N] (+ C0), one warp per 16x16 output tile (tiles stacked in M).
template <bool BColMajor>
__global__ void wmma_gemm_f32(const __half* A, const __half* B, const float* C0, float* C, float* Ct, int M, int N,
                              int K) {
  using namespace nvcuda;
  const int tile_m = static_cast<int>(threadIdx.x / 32) + static_cast<int>(blockIdx.x) * 2;
  if (tile_m * 16 >= M) return;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  if (C0) wmma::load_matrix_sync(acc, C0 + tile_m * 16 * N, N, wmma::mem_row_major);
  else wmma::fill_fragment(acc, 0.0f);
  for (int k0 = 0; k0 < K; k0 += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
    wmma::load_matrix_sync(a, A + tile_m * 16 * K + k0, K);
    if (BColMajor) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;  // B[k][n] at B[n*K + k]
      wmma::load_matrix_sync(b, B + k0, K);
      wmma::mma_sync(acc, a, b, acc);
    } else {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> b;
      wmma::load_matrix_sync(b, B + k0 * N, N);
      wmma::mma_sync(acc, a, b, acc);
    }
  }
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= 1.0f;  // position-independent elementwise op
  wmma::store_matrix_sync(C + tile_m * 16 * N, acc, N, wmma::mem_row_major);
  wmma::store_matrix_sync(Ct + tile_m * 16, acc, M, wmma::mem_col_major);
}

__global__ void wmma_gemm_f16acc(const __half* A, const __half* B, __half* C, int N, int K) {
  using namespace nvcuda;
  const int tile_m = static_cast<int>(threadIdx.x / 32);
  wmma::fragment<wmma::accumulator, 16, 16, 16, __half> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int k0 = 0; k0 < K; k0 += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> b;
    wmma::load_matrix_sync(a, A + tile_m * 16 * K + k0, K);
    wmma::load_matrix_sync(b, B + k0 * N, N);
    wmma::mma_sync(acc, a, b, acc);
  }
  wmma::store_matrix_sync(C + tile_m * 16 * N, acc, N, wmma::mem_row_major);
}

__global__ void wmma_load_store(const __half* A, float* C, int offset) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::load_matrix_sync(a, A + offset, 16);  // offset 1 (2 bytes): not 32-byte aligned
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
  wmma::fill_fragment(c, 0.0f);
  wmma::store_matrix_sync(C, c, 16, wmma::mem_row_major);
}

__global__ void atomics(float* fsum, int* isum, unsigned* umax, int* imin, unsigned* cas_count,
                        unsigned long long* ull, double* dsum, int* old_seen) {
  const unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(fsum, 1.0f);
  int old = atomicAdd(isum, static_cast<int>(g));
  if (g == 0) *old_seen = old;
  atomicMax(umax, g);
  atomicMin(imin, -static_cast<int>(g));
  unsigned cur = *cas_count, assumed;
  do {
    assumed = cur;
    cur = atomicCAS(cas_count, assumed, assumed + 1);
  } while (cur != assumed);
  atomicAdd(ull, 1ull);
  atomicAdd(dsum, 0.25);
}

__global__ void sync_count(int* out) {
  const int t = static_cast<int>(threadIdx.x);
  int c = __syncthreads_count(t % 3 == 0);
  int a = __syncthreads_and(t >= 0);
  int o = __syncthreads_or(t == 77);
  int z = __syncthreads_or(0);
  if (t == 5) { out[0] = c; out[1] = a; out[2] = o; out[3] = z; }
}

__global__ void math_kernel(float* out, unsigned* uout, int* iout, unsigned long long* llout) {
  const float x = 0.5f;
  out[0] = __expf(x) - expf(x);
  out[1] = __logf(2.0f) - logf(2.0f);
  out[2] = rsqrtf(4.0f);
  out[3] = tanhf(0.0f);
  out[4] = fmaxf(1.0f, 2.0f) + fminf(1.0f, 2.0f) + fabsf(-3.0f);
  out[5] = __fdividef(1.0f, 4.0f);
  out[6] = sqrtf(9.0f);
  out[7] = __uint_as_float(0x40000000u);
  out[8] = __int_as_float(__float_as_int(-1.5f));
  out[9] = max(1.5f, 2);
  out[10] = __saturatef(1.5f) + __saturatef(NAN);
  iout[0] = isinf(INFINITY) + isnan(NAN) + isfinite(1.0f) + isfinite(INFINITY);
  iout[1] = min(3, 5);
  iout[2] = max(3, -5);
  iout[3] = __popc(0xffu) + __clz(1) + __ffs(8);
  uout[0] = __float_as_uint(1.0f);
  uout[1] = min(-1, 2u);  // int with unsigned -> unsigned, as in CUDA
  uout[2] = __umulhi(0x80000000u, 4u);
  llout[0] = __umul64hi(1ull << 63, 4ull);
  llout[1] = static_cast<unsigned long long>(max(7ll, 9u));
}

__global__ void trivial(unsigned* out) { out[blockIdx.x * blockDim.x + threadIdx.x] = threadIdx.x; }

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void divergent_sites(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 2;
}

__global__ void real_deadlock(int* out) {
  if (threadIdx.x < 16) __syncthreads();
  else __syncwarp();
  out[threadIdx.x] = 3;
}

__global__ void bad_mask(int* out) { out[threadIdx.x] = __shfl_sync(0x1u, static_cast<int>(threadIdx.x), 0); }

__global__ void asserting(int* out) {
  assert(threadIdx.x != 5);
  out[threadIdx.x] = 4;
}

__device__ int deep(int d) {
  volatile char buf[1024];
  buf[0] = static_cast<char>(d);
  buf[1023] = 1;
  if (d == 0) return buf[0];
  return deep(d - 1) + buf[1023];
}
__global__ void overflow(int* out) { out[threadIdx.x] = deep(1000000); }

#ifdef CHINGU_EMU_ASAN
__global__ void sum_oob(const float* in, float* out) { out[threadIdx.x] = in[threadIdx.x] + in[threadIdx.x + 1]; }
#endif

void noop_kernel_for_nesting(int*) {}
__global__ void nested_launch(int* out) {
  chingu_emu::launch("inner", noop_kernel_for_nesting, dim3(1), dim3(1), 0, out);
}

__global__ void say_hello() {
  if (threadIdx.x == 0 && blockIdx.x == 1) std::printf("    (kernel printf: hello from block %u thread %u)\n", blockIdx.x, threadIdx.x);
}

// Each thread publishes its id + 1, then reads its right neighbour's: with the barrier the
// result is the same under every schedule; without it, it depends on who ran first.
__global__ void neighbour_read(int* out, bool barrier) {
  CHINGU_DYNAMIC_SMEM(int, slots);
  const unsigned t = threadIdx.x;
  slots[t] = static_cast<int>(t) + 1;
  if (barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + t] = slots[(t + 1) % blockDim.x];
}

// The same inside one warp, with or without __syncwarp.
__global__ void lane_neighbour_read(int* out, bool barrier) {
  CHINGU_DYNAMIC_SMEM(int, slots);
  const unsigned t = threadIdx.x;
  slots[t] = static_cast<int>(t) + 1;
  if (barrier) __syncwarp();
  out[t] = slots[t ^ 1u];
}

// The order in which blocks ran: each takes the next ticket.
__global__ void block_tickets(unsigned* counter, unsigned* ticket) {
  if (threadIdx.x == 0) ticket[blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z)] = atomicAdd(counter, 1u);
}

// ---------------------------------------------------------------------------------------
// Kernel tests
// ---------------------------------------------------------------------------------------

bool run_block_sum(int blocks, int tail, unsigned seed) {
  const int n = blocks * 256 - tail;
  std::vector<float> in(static_cast<size_t>(n)), out(static_cast<size_t>(blocks), -1.0f);
  for (int i = 0; i < n; ++i) in[static_cast<size_t>(i)] = static_cast<float>(static_cast<int>((static_cast<unsigned>(i) * 2654435761u + seed) % 17u) - 8);
  chingu_emu::launch("block_sum", block_sum, dim3(static_cast<unsigned>(blocks)), dim3(256), 0, in.data(), out.data(), n);
  for (int b = 0; b < blocks; ++b) {
    float ref = 0.0f;
    for (int i = b * 256; i < std::min(n, (b + 1) * 256); ++i) ref += in[static_cast<size_t>(i)];
    if (out[static_cast<size_t>(b)] != ref) return false;
  }
  return true;
}

void test_block_reduce() {
  check(run_block_sum(300, 77, 1), "block reduction: __shared__ + __syncthreads, 300 blocks x 256 threads");
}

void test_warp_ops(unsigned nthreads) {
  std::vector<int> in(nthreads);
  for (unsigned i = 0; i < nthreads; ++i) in[i] = static_cast<int>((i * 7919u) % 23u) + 1;
  std::vector<int> xs(nthreads), ds(nthreads / 32), anyv(nthreads), allv(nthreads);
  std::vector<unsigned> bal(nthreads), act(nthreads);
  std::vector<float> fs(nthreads);
  std::vector<__half> hm(nthreads);
  chingu_emu::launch("warp_ops", warp_ops, dim3(1), dim3(nthreads), 0, in.data(), xs.data(), ds.data(), bal.data(),
                     anyv.data(), allv.data(), act.data(), fs.data(), hm.data());
  bool ok_xor = true, ok_down = true, ok_ballot = true, ok_f = true, ok_h = true;
  for (unsigned w = 0; w < nthreads / 32; ++w) {
    int sum = 0, mx = 0;
    unsigned b = 0;
    for (unsigned l = 0; l < 32; ++l) {
      sum += in[w * 32 + l];
      mx = std::max(mx, in[w * 32 + l]);
      if (in[w * 32 + l] & 1) b |= 1u << l;
    }
    if (ds[w] != sum) ok_down = false;
    for (unsigned l = 0; l < 32; ++l) {
      const unsigned t = w * 32 + l;
      if (xs[t] != sum) ok_xor = false;
      if (bal[t] != b || anyv[t] != (b != 0) || allv[t] != 1 || act[t] != 0xffffffffu) ok_ballot = false;
      if (fs[t] != static_cast<float>(sum) * 0.5f) ok_f = false;
      if (static_cast<float>(hm[t]) != static_cast<float>(mx)) ok_h = false;
    }
  }
  const std::string sfx = " (" + std::to_string(nthreads) + " threads)";
  check(ok_xor, ("warp reduction with __shfl_xor_sync (int)" + sfx).c_str());
  check(ok_down, ("warp reduction with __shfl_down_sync (int)" + sfx).c_str());
  check(ok_ballot, ("__ballot_sync / __any_sync / __all_sync / __activemask" + sfx).c_str());
  check(ok_f && ok_h, ("__shfl_xor_sync of float and __half" + sfx).c_str());
}

void test_shfl_semantics() {
  std::vector<int> out(9 * 32, 0);
  chingu_emu::launch("shfl_semantics", shfl_semantics, dim3(1), dim3(32), 0, out.data());
  bool ok = true;
  std::string bad;
  for (int l = 0; l < 32; ++l) {
    const int exp[9] = {
        100 + (l & ~7) + 3,
        (l & 7) >= 2 ? 100 + l - 2 : 100 + l,
        (l & 15) + 3 < 16 ? 100 + l + 3 : 100 + l,
        (l ^ 8) >= (l & ~7) + 8 ? 100 + l : 100 + (l ^ 8),
        131,
        100 + l,
        l < 16 ? 100 + (l ^ 1) : 100 + (l ^ 2),
        496,
        31 * 3 - 40,
    };
    for (int k = 0; k < 9; ++k)
      if (out[static_cast<size_t>(k * 32 + l)] != exp[k]) {
        if (ok) bad = "case " + std::to_string(k) + " lane " + std::to_string(l) + ": got " + std::to_string(out[static_cast<size_t>(k * 32 + l)]) + " want " + std::to_string(exp[k]);
        ok = false;
      }
  }
  check(ok, "shuffle width / out-of-range / disjoint-mask semantics, __reduce_*_sync", bad);
}

void test_partial_warp() {
  const unsigned n = 40;
  std::vector<unsigned> bal(n), act(n);
  std::vector<int> all1(n), down16(n), up1(n);
  chingu_emu::launch("partial_warp", partial_warp, dim3(1), dim3(n), 0, bal.data(), all1.data(), act.data(),
                     down16.data(), up1.data());
  bool ok = true;
  for (unsigned t = 0; t < n; ++t) {
    const bool w1 = t >= 32;
    const unsigned l = t % 32;
    if (bal[t] != (w1 ? 0xaau : 0xaaaaaaaau) || all1[t] != 1 || act[t] != (w1 ? 0xffu : 0xffffffffu)) ok = false;
    // down by 16: warp 0 lanes 0..15 read lane+16; lanes 16..31 keep their own; warp 1 lanes 0..7
    // read lanes 16..23, which do not exist -> poison (-1).
    const int want_down = w1 ? -1 : (l < 16 ? static_cast<int>(t + 16) : static_cast<int>(t));
    const int want_up = l == 0 ? static_cast<int>(t) : static_cast<int>(t - 1);
    if (down16[t] != want_down || up1[t] != want_up) ok = false;
  }
  check(ok, "partial last warp (40 threads): ballot/all/activemask, shfl from missing lanes = poison");
}

void test_dyn_smem() {
  const int n = 64, blocks = 3;
  std::vector<float> out(static_cast<size_t>(blocks * n + blocks), 0.0f);
  unsigned misaligned = 0;
  chingu_emu::launch("dyn_smem", dyn_smem, dim3(blocks), dim3(n), static_cast<size_t>(n + 1) * sizeof(float),
                     out.data(), n, &misaligned);
  bool ok = misaligned == 0;
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < n; ++t)
      if (out[static_cast<size_t>(b * n + t)] != static_cast<float>(((t + 1) % n) * 2 + b)) ok = false;
  check(ok, "dynamic shared memory via CHINGU_DYNAMIC_SMEM (16-byte aligned, shared by the block)");
  bool poison = true;
  for (int b = 0; b < blocks; ++b) poison = poison && std::isnan(out[static_cast<size_t>(blocks * n + b)]);
  check(poison, "unwritten dynamic shared memory reads NaN in every block (re-poisoned per block)");
}

void test_indices() {
  bool ok = true;
  for (dim3 block : {dim3(16, 8, 1), dim3(4, 4, 2)}) {
    const dim3 grid(3, 2, 4);
    const unsigned nt = block.x * block.y * block.z, nb = grid.x * grid.y * grid.z;
    std::vector<unsigned> out(static_cast<size_t>(6) * nt * nb, 0xdeadu);
    chingu_emu::launch("indices", indices, grid, block, 0, out.data());
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx)
          for (unsigned tz = 0; tz < block.z; ++tz)
            for (unsigned ty = 0; ty < block.y; ++ty)
              for (unsigned tx = 0; tx < block.x; ++tx) {
                const unsigned bl = bx + grid.x * (by + grid.y * bz);
                const unsigned g = bl * nt + tx + block.x * (ty + block.y * tz);
                const unsigned* o = &out[static_cast<size_t>(6) * g];
                if (o[0] != tx || o[1] != ty || o[2] != tz || o[3] != bx || o[4] != by || o[5] != bz) ok = false;
              }
  }
  check(ok, "threadIdx/blockIdx components: blocks 16x8x1 and 4x4x2 over grid 3x2x4");
}

float hval(std::mt19937& rng) { return static_cast<float>(static_cast<int>(rng() % 2001) - 1000) / 256.0f; }

template <class T>
T* dev(size_t n) { return static_cast<T*>(chingu_emu::device_alloc(n * sizeof(T))); }


// One m16n8k16 product through chingu_emu::mma_m16n8k16, each lane packing its registers
// from row-major A [16x16] and B [16x8] by the PTX ISA's table (g = lane/4, t = lane%4) and
// writing its four results to D [16x8] at the positions that table gives.
__global__ void mma_16816_probe(const __half* A, const __half* B, const float* C, float* D) {
  const unsigned lane = threadIdx.x & 31, g = lane / 4, t = lane % 4;
  auto pack = [](__half lo, __half hi) {
    return static_cast<uint32_t>(__half_as_ushort(lo)) | (static_cast<uint32_t>(__half_as_ushort(hi)) << 16);
  };
  const uint32_t a[4] = {pack(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]),
                         pack(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]),
                         pack(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]),
                         pack(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9])};
  const uint32_t b[2] = {pack(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]),
                         pack(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g])};
  float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
  chingu_emu::mma_m16n8k16(c, a, b, c);  // d aliases c, as kernels accumulate
  D[g * 8 + 2 * t] = c[0];
  D[g * 8 + 2 * t + 1] = c[1];
  D[(g + 8) * 8 + 2 * t] = c[2];
  D[(g + 8) * 8 + 2 * t + 1] = c[3];
}

// ldmatrix feeding mma_16816, as the register-resident attention kernels use them: A (16 x 16,
// row-major) through ldmatrix_x4; B two ways — from a row-major [k][n] tile (16 x 16: two
// n-tiles) through ldmatrix_x4_trans, and from the rows of Bt = B^T ([n][k], 16 x 16: two
// n-tiles of 8 rows) through ldmatrix_x4. Tiles sit in shared memory with rows 24 halves
// apart (the kernels' padding), so rows are 16-byte aligned but not adjacent.
__global__ void ldmatrix_mma_probe(const __half* A, const __half* B, const __half* Bt, float* D, float* Dt) {
  constexpr int LD = 24;
  __shared__ __align__(16) __half as[16 * LD], bs[16 * LD], bts[16 * LD];
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < 256; i += 32) {
    as[(i / 16) * LD + i % 16] = A[i];
    bs[(i / 16) * LD + i % 16] = B[i];
    bts[(i / 16) * LD + i % 16] = Bt[i];
  }
  __syncwarp();
  const int g = lane >> 2, t = lane & 3;
  unsigned a[4], b[4], bt[4];
  chingu::ldmatrix_x4(a, as + (lane & 15) * LD + 8 * (lane >> 4));
  chingu::ldmatrix_x4_trans(b, bs + (lane & 15) * LD + 8 * (lane >> 4));
  chingu::ldmatrix_x4(bt, bts + ((lane & 7) + 8 * (lane >> 4)) * LD + 8 * ((lane >> 3) & 1));
  for (int n = 0; n < 2; ++n) {
    const unsigned bn[2] = {b[2 * n], b[2 * n + 1]}, btn[2] = {bt[2 * n], bt[2 * n + 1]};
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f}, dt[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    chingu::mma_16816(d, a, bn, d);
    chingu::mma_16816(dt, a, btn, dt);
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e >> 1), col = 8 * n + 2 * t + (e & 1);
      D[row * 16 + col] = d[e];
      Dt[row * 16 + col] = dt[e];
    }
  }
}

void test_ldmatrix() {
  std::mt19937 rng(11);
  __half* A = dev<__half>(256);
  __half* B = dev<__half>(256);
  __half* Bt = dev<__half>(256);
  float* D = dev<float>(256);
  float* Dt = dev<float>(256);
  for (int i = 0; i < 256; ++i) A[i] = __float2half(hval(rng));
  for (int i = 0; i < 256; ++i) B[i] = __float2half(hval(rng));
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n) Bt[n * 16 + k] = B[k * 16 + n];
  std::fill(D, D + 256, -1.0f);
  std::fill(Dt, Dt + 256, -1.0f);
  chingu_emu::launch("ldmatrix_mma_probe", ldmatrix_mma_probe, dim3(1), dim3(32), 0, A, B, Bt, D, Dt);
  bool ok = true, ok_t = true;
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float acc = 0.0f;
      for (int k = 0; k < 16; ++k) acc += __half2float(A[r * 16 + k]) * __half2float(B[k * 16 + n]);
      // Every product of two fp16 values is exact in fp32 and the sums are small: the same bits
      // in any order is not promised, so allow an fp32 rounding per term.
      const float tol = 16 * 6e-8f * 16.0f;
      if (std::fabs(D[r * 16 + n] - acc) > tol) ok = false;
      if (std::fabs(Dt[r * 16 + n] - acc) > tol) ok_t = false;
    }
  check(ok, "ldmatrix x4 (A) and x4.trans (B from a row-major [k][n] tile) feed mma: D = A*B");
  check(ok_t, "ldmatrix x4 of B^T's rows (two n-tiles) feeds mma: D = A*B");
}

void test_mma_16816() {
  std::mt19937 rng(7);
  __half* A = dev<__half>(16 * 16);
  __half* B = dev<__half>(16 * 8);
  float* C = dev<float>(16 * 8);
  float* D = dev<float>(16 * 8);
  for (int i = 0; i < 256; ++i) A[i] = __float2half(hval(rng));
  for (int i = 0; i < 128; ++i) B[i] = __float2half(hval(rng));
  for (int i = 0; i < 128; ++i) C[i] = hval(rng);
  std::fill(D, D + 128, -1.0f);
  chingu_emu::launch("mma_16816_probe", mma_16816_probe, dim3(1), dim3(32), 0, A, B, C, D);
  bool ok = true;
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 8; ++n) {
      float acc = C[r * 8 + n];
      for (int k = 0; k < 16; ++k) acc += __half2float(A[r * 16 + k]) * __half2float(B[k * 8 + n]);
      if (D[r * 8 + n] != acc) ok = false;
    }
  check(ok, "mma m16n8k16 (PTX register layout): D = A*B + C at every documented position");
  const std::string e = chingu_emu::try_launch("mma_16816_probe", mma_16816_probe, dim3(1), dim3(16), 0, A, B, C, D);
  check(e.find("full warp") != std::string::npos, "mma m16n8k16 in a 16-thread block is an error", e);
}

void test_wmma() {
  const int M = 32, K = 48, N = 16;
  std::mt19937 rng(99);
  __half* A = dev<__half>(M * K);
  __half* B = dev<__half>(K * N);
  __half* Bc = dev<__half>(K * N);
  float* C0 = dev<float>(M * N);
  float* C = dev<float>(M * N);
  float* Ct = dev<float>(M * N);
  for (int i = 0; i < M * K; ++i) A[i] = __float2half(hval(rng));
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < N; ++n) {
      B[k * N + n] = __float2half(hval(rng));
      Bc[n * K + k] = B[k * N + n];
    }
  for (int i = 0; i < M * N; ++i) C0[i] = hval(rng);
  auto ref = [&](int m, int n, bool with_c0) {
    float acc = with_c0 ? C0[m * N + n] : 0.0f;
    for (int k = 0; k < K; ++k) acc += __half2float(A[m * K + k]) * __half2float(B[k * N + n]);
    return acc;
  };
  for (int variant = 0; variant < 3; ++variant) {
    const bool bcol = variant == 1, with_c0 = variant == 2;
    std::fill(C, C + M * N, -1.0f);
    if (bcol)
      chingu_emu::launch("wmma_gemm_f32<true>", wmma_gemm_f32<true>, dim3(1), dim3(64), 0, A, Bc,
                         static_cast<const float*>(nullptr), C, Ct, M, N, K);
    else
      chingu_emu::launch("wmma_gemm_f32<false>", wmma_gemm_f32<false>, dim3(1), dim3(64), 0, A, B,
                         with_c0 ? C0 : nullptr, C, Ct, M, N, K);
    double worst = 0.0;
    bool ok = true;
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        const float r = ref(m, n, with_c0);
        const double rel = std::fabs(static_cast<double>(C[m * N + n]) - r) / std::max(1.0, std::fabs(static_cast<double>(r)));
        worst = std::max(worst, rel);
        if (!(rel <= 1e-6) || Ct[n * M + m] != C[m * N + n]) ok = false;
      }
    const char* names[3] = {"WMMA 32x48 * 48x16, B row_major, float accumulator (vs naive float, 1e-6 rel)",
                            "WMMA 32x48 * 48x16, B col_major, float accumulator (vs naive float, 1e-6 rel)",
                            "WMMA with accumulator loaded from memory (C0 + A*B), mem_col_major store"};
    check(ok, names[variant], "max rel err " + std::to_string(worst));
  }
  {
    __half* Ch = dev<__half>(M * N);
    chingu_emu::launch("wmma_gemm_f16acc", wmma_gemm_f16acc, dim3(1), dim3(64), 0, A, B, Ch, N, K);
    bool exact = true;
    double worst = 0.0;  // |emulated - float reference| / sum_k |a*b|
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        // emulated semantics: each mma_sync sums its 16 products in float onto c, rounds once to half
        __half acc = __float2half(0.0f);
        for (int k0 = 0; k0 < K; k0 += 16) {
          float s = __half2float(acc);
          for (int k = k0; k < k0 + 16; ++k) s += __half2float(A[m * K + k]) * __half2float(B[k * N + n]);
          acc = __float2half(s);
        }
        if (__half_as_ushort(acc) != __half_as_ushort(Ch[m * N + n])) exact = false;
        const float r = ref(m, n, false);
        double scale = 1.0;
        for (int k = 0; k < K; ++k) scale += std::fabs(static_cast<double>(__half2float(A[m * K + k])) * __half2float(B[k * N + n]));
        worst = std::max(worst, std::fabs(static_cast<double>(__half2float(Ch[m * N + n])) - r) / scale);
      }
    check(exact && worst < 2e-3, "WMMA __half accumulator (bit-exact vs per-mma rounding; close to float ref)",
          std::string(exact ? "bit-exact" : "NOT bit-exact") + ", max err vs float ref / sum|a*b| " + std::to_string(worst));
    chingu_emu::device_free(Ch);
  }
  {
    std::string e = chingu_emu::try_launch("wmma_load_store", wmma_load_store, dim3(1), dim3(32), 0,
                                           static_cast<const __half*>(A), C, 1);
    check(contains(e, "not 32-byte") && contains(e, "wmma::load_matrix_sync"), "WMMA misaligned pointer is reported",
          e.substr(0, 300));
    e = chingu_emu::try_launch("wmma_load_store", wmma_load_store, dim3(1), dim3(48), 0,
                               static_cast<const __half*>(A), C, 0);
    check(contains(e, "needs a full warp") && contains(e, "warp 1 of this 48-thread block has only 16"),
          "WMMA in a partial warp is reported", e.substr(0, 300));
  }
  chingu_emu::device_free(A);
  chingu_emu::device_free(B);
  chingu_emu::device_free(Bc);
  chingu_emu::device_free(C0);
  chingu_emu::device_free(C);
  chingu_emu::device_free(Ct);
}

void test_atomics() {
  float fsum = 0.0f;
  int isum = 0, imin = 0, old_seen = -1;
  unsigned umax = 0, cas_count = 0;
  unsigned long long ull = 0;
  double dsum = 0.0;
  chingu_emu::launch("atomics", atomics, dim3(64), dim3(256), 0, &fsum, &isum, &umax, &imin, &cas_count, &ull, &dsum,
                     &old_seen);
  const int n = 64 * 256;
  bool ok = fsum == static_cast<float>(n) && isum == n * (n - 1) / 2 && umax == static_cast<unsigned>(n - 1) &&
            imin == -(n - 1) && cas_count == static_cast<unsigned>(n) && ull == static_cast<unsigned long long>(n) &&
            dsum == 0.25 * n && old_seen == 0;
  check(ok, "atomicAdd(float,int,ull,double)/atomicMax/atomicMin/atomicCAS loop from 64x256 threads");
}

void test_math() {
  std::vector<float> out(11, -7.0f);
  std::vector<unsigned> uout(3);
  std::vector<int> iout(4);
  std::vector<unsigned long long> llout(2);
  chingu_emu::launch("math_kernel", math_kernel, dim3(1), dim3(1), 0, out.data(), uout.data(), iout.data(), llout.data());
  const bool ok = out[0] == 0.0f && out[1] == 0.0f && out[2] == 0.5f && out[3] == 0.0f && out[4] == 6.0f &&
                  out[5] == 0.25f && out[6] == 3.0f && out[7] == 2.0f && out[8] == -1.5f && out[9] == 2.0f &&
                  out[10] == 1.0f && iout[0] == 3 && iout[1] == 3 && iout[2] == 3 && iout[3] == 8 + 31 + 4 &&
                  uout[0] == 0x3f800000u && uout[1] == 2u && uout[2] == 2u && llout[0] == 2ull && llout[1] == 9ull;
  check(ok, "math/bit intrinsics (__expf, rsqrtf, __fdividef, isinf/isnan/isfinite, __float_as_uint, min/max, __umulhi, ...)");
}

void test_sync_count() {
  std::vector<int> out(4, -1);
  chingu_emu::launch("sync_count", sync_count, dim3(2), dim3(100), 0, out.data());
  check(out[0] == 34 && out[1] == 1 && out[2] == 1 && out[3] == 0, "__syncthreads_count / _and / _or");
}

// Run fn in a forked child; capture its stderr and wait status.
struct Child {
  int status = 0;
  std::string err;
};
Child run_child(const std::function<void()>& fn) {
  std::fflush(stdout);
  std::fflush(stderr);
  int fds[2];
  Child r;
  if (pipe(fds) != 0) return r;
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    dup2(fds[1], 2);
    alarm(30);  // a hang would be a failure, not a stuck test
    fn();
    std::fflush(stderr);
    _exit(0);
  }
  close(fds[1]);
  char buf[4096];
  ssize_t k;
  while ((k = read(fds[0], buf, sizeof buf)) > 0) r.err.append(buf, static_cast<size_t>(k));
  close(fds[0]);
  waitpid(pid, &r.status, 0);
  return r;
}

void test_errors() {
  std::vector<int> out(64, 0);
  {
    // The brief's case: a __syncthreads() only some threads reach; the launch is not caught,
    // so the child must abort with the diagnostic instead of hanging.
    Child c = run_child([&] { CHINGU_EMU_LAUNCH(divergent_barrier, dim3(2), dim3(64), 0, out.data()); });
    const bool aborted = WIFSIGNALED(c.status) && WTERMSIG(c.status) == SIGABRT;
    const bool clear = contains(c.err, "divergent_barrier") && contains(c.err, "block (0,0,0)") &&
                       contains(c.err, "__syncthreads()") && contains(c.err, "selftest.cpp");
    check(aborted && clear, "divergent __syncthreads (if tid<16) in a 64-thread block aborts a child with a clear error",
          c.err.substr(0, 400));
  }
  {
    std::string e = chingu_emu::try_launch("divergent_barrier", divergent_barrier, dim3(1), dim3(64), 0, out.data());
    check(contains(e, "__syncthreads"), "same error is catchable in-process (try_launch)", e.substr(0, 200));
    chingu_emu::config().strict_exit = false;
    e = chingu_emu::try_launch("divergent_barrier", divergent_barrier, dim3(1), dim3(64), 0, out.data());
    bool ok = e.empty() && out[63] == 1;
    e = chingu_emu::try_launch("real_deadlock", real_deadlock, dim3(1), dim3(64), 0, out.data());
    chingu_emu::config().strict_exit = true;
    check(ok, "with strict_exit=false, exited threads count as arrived (Volta+ behaviour)");
    check(contains(e, "deadlock") && contains(e, "threads (0,0,0)..(15,0,0) [16 threads]: waiting in __syncthreads()") &&
              contains(e, "threads (16,0,0)..(31,0,0) [16 threads]: waiting in __syncwarp(mask=0xffffffff)") &&
              contains(e, "missing lanes 0x0000ffff"),
          "deadlock report lists what each stuck thread waits on", "\n" + e);
  }
  {
    Child c = run_child([&] {
      chingu_emu::config().strict_exit = false;
      CHINGU_EMU_LAUNCH(real_deadlock, dim3(1), dim3(64), 0, out.data());
    });
    check(WIFSIGNALED(c.status) && contains(c.err, "deadlock: no thread can make progress"),
          "uncaught deadlock aborts a child process (no hang)");
  }
  {
    std::string e = chingu_emu::try_launch("divergent_sites", divergent_sites, dim3(1), dim3(64), 0, out.data());
    check(contains(e, "divergent __syncthreads()") && contains(e, "waits for the same barrier"),
          "__syncthreads at two different call sites is reported", e.substr(0, 300));
  }
  {
    std::string e = chingu_emu::try_launch("bad_mask", bad_mask, dim3(1), dim3(32), 0, out.data());
    check(contains(e, "does not include the calling lane 1") && contains(e, "thread (1,0,0)"),
          "shuffle mask without the calling lane is reported", e.substr(0, 300));
  }
  {
    std::string e = chingu_emu::try_launch("asserting", asserting, dim3(3), dim3(8), 0, out.data());
    check(contains(e, "device-side assert failed: threadIdx.x != 5") && contains(e, "block (0,0,0)") &&
              contains(e, "thread (5,0,0)"),
          "assert() in a kernel names launch/block/thread", e.substr(0, 300));
  }
  {
    std::string e = chingu_emu::try_launch("nested_launch", nested_launch, dim3(1), dim3(1), 0, out.data());
    check(contains(e, "dynamic parallelism"), "a launch from inside a kernel is reported", e.substr(0, 200));
  }
  {
    std::string e1 = chingu_emu::try_launch("trivial", trivial, dim3(1), dim3(2048), 0, static_cast<unsigned*>(nullptr));
    std::string e2 = chingu_emu::try_launch("trivial", trivial, dim3(0), dim3(32), 0, static_cast<unsigned*>(nullptr));
    std::string e3 = chingu_emu::try_launch("trivial", trivial, dim3(1), dim3(32, 32, 2), 0, static_cast<unsigned*>(nullptr));
    std::string e4 = chingu_emu::try_launch("trivial", trivial, dim3(1), dim3(32), 300000, static_cast<unsigned*>(nullptr));
    bool threw = false;
    try {
      chingu_emu::launch("trivial", trivial, dim3(1), dim3(513, 2), 0, static_cast<unsigned*>(nullptr));
    } catch (const chingu_emu::launch_error& ex) {
      threw = contains(ex.what(), "1026 threads per block (max 1024)");
    }
    check(contains(e1, "block dimensions exceed") && contains(e2, "grid dimension is 0") &&
              contains(e3, "2048 threads per block") && contains(e4, "dynamic shared memory") && threw,
          "invalid launch configurations are rejected with a clear launch_error",
          e1 + "\n  " + e2 + "\n  " + e3 + "\n  " + e4);
  }
  {
    Child c = run_child([&] { CHINGU_EMU_LAUNCH(overflow, dim3(1), dim3(4), 0, out.data()); });
    check(WIFSIGNALED(c.status) && contains(c.err, "fiber stack overflow") && contains(c.err, "'overflow'"),
          "fiber stack overflow hits the guard page and is reported", c.err.substr(0, 300));
  }
#ifdef CHINGU_EMU_ASAN
  {
    // Out-of-bounds reads inside a kernel are caught by ASan, which also names the thread.
    Child c = run_child([&] {
      std::vector<float> small(8, 1.0f);
      float* p = small.data();
      chingu_emu::launch("oob_read", sum_oob, dim3(1), dim3(8), 0, static_cast<const float*>(p), p);
    });
    check(!(WIFEXITED(c.status) && WEXITSTATUS(c.status) == 0) && contains(c.err, "heap-buffer-overflow") &&
              contains(c.err, "kernel 'oob_read', block (0,0,0), thread (7,0,0)"),
          "[asan] out-of-bounds read in a kernel is reported with kernel/block/thread");
  }
#endif
  // The emulator keeps working after all of the above.
  check(run_block_sum(5, 3, 7), "launches still work after failed launches");
}

void test_concurrency() {
  std::vector<std::thread> th;
  std::vector<int> ok(4, 1);
  for (int i = 0; i < 4; ++i)
    th.emplace_back([i, &ok] {
      for (int r = 0; r < 10; ++r)
        if (!run_block_sum(8 + i, i * 5, static_cast<unsigned>(i * 100 + r))) ok[static_cast<size_t>(i)] = 0;
    });
  for (auto& t : th) t.join();
  check(ok[0] && ok[1] && ok[2] && ok[3], "launches from 4 OS threads at once are serialized and correct");
}

void test_timing() {
  std::vector<unsigned> out(1024u * 256u);
  CHINGU_EMU_LAUNCH(say_hello, dim3(2), dim3(32), 0);
  auto t0 = std::chrono::steady_clock::now();
  CHINGU_EMU_LAUNCH(trivial, dim3(1024), dim3(256), 0, out.data());
  auto t1 = std::chrono::steady_clock::now();
  bool ok = true;
  for (size_t i = 0; i < out.size(); ++i) ok = ok && out[i] == i % 256;
  const double s = std::chrono::duration<double>(t1 - t0).count();
  check(ok, "timing: trivial kernel, 1024 blocks x 256 threads", std::to_string(s * 1e3) + " ms");
  std::vector<float> in(64 * 256, 1.0f), sums(64);
  t0 = std::chrono::steady_clock::now();
  chingu_emu::launch("block_sum", block_sum, dim3(64), dim3(256), 0, in.data(), sums.data(), 64 * 256);
  t1 = std::chrono::steady_clock::now();
  std::printf("       block reduction 64 x 256 (9 __syncthreads each): %.2f ms\n",
              std::chrono::duration<double>(t1 - t0).count() * 1e3);
  std::vector<int> in96(256, 1), xs(256), ds(8), anyv(256), allv(256);
  std::vector<unsigned> bal(256), act(256);
  std::vector<float> fs(256);
  std::vector<__half> hm(256);
  t0 = std::chrono::steady_clock::now();
  chingu_emu::launch("warp_ops", warp_ops, dim3(64), dim3(256), 0, in96.data(), xs.data(), ds.data(), bal.data(),
                     anyv.data(), allv.data(), act.data(), fs.data(), hm.data());
  t1 = std::chrono::steady_clock::now();
  std::printf("       warp_ops 64 x 256 (28 warp collectives each): %.2f ms\n",
              std::chrono::duration<double>(t1 - t0).count() * 1e3);
}

// Runs `launch` with the calling thread's schedule set to `seed`, then back in order (also
// when the launch throws).
template <class F>
void with_seed(uint64_t seed, F&& launch) {
  struct Restore {
    ~Restore() { chingu_emu::schedule_seed() = 0; }
  } restore;
  chingu_emu::schedule_seed() = seed;
  launch();
}

void test_schedules() {
  const unsigned n = 256;
  auto neighbours = [&](uint64_t seed, bool barrier) {
    std::vector<int> out(2 * n);
    with_seed(seed, [&] {
      chingu_emu::launch("neighbour_read", neighbour_read, dim3(2), dim3(n), n * sizeof(int), out.data(), barrier);
    });
    return out;
  };
  // In order, thread t reads slot t+1 before thread t+1 wrote it (poison, -1); the last
  // thread reads slot 0, written long before.
  std::vector<int> in_order = neighbours(0, false);
  bool ok = true;
  for (unsigned b = 0; b < 2; ++b)
    for (unsigned t = 0; t < n; ++t) ok = ok && in_order[b * n + t] == (t + 1 < n ? -1 : 1);
  check(ok, "in order, a read of a neighbour's write with no barrier sees the unwritten slot");
  int seeds_differing = 0;
  bool same_seed_same = true, barrier_stable = true;
  std::vector<int> want(2 * n);
  for (unsigned i = 0; i < 2 * n; ++i) want[i] = static_cast<int>((i % n + 1) % n) + 1;
  barrier_stable = neighbours(0, true) == want;
  for (uint64_t seed = 1; seed <= 8; ++seed) {
    std::vector<int> racy = neighbours(seed, false);
    seeds_differing += racy != in_order;
    same_seed_same = same_seed_same && racy == neighbours(seed, false);
    barrier_stable = barrier_stable && neighbours(seed, true) == want;
  }
  check(seeds_differing == 8, "every shuffled schedule changes the racy result",
        std::to_string(seeds_differing) + " of 8 seeds");
  check(same_seed_same, "a seed gives the same schedule every time");
  check(barrier_stable, "with the __syncthreads, in order and 8 shuffled schedules agree");

  auto lanes = [&](uint64_t seed, bool barrier) {
    std::vector<int> out(64);
    with_seed(seed, [&] {
      chingu_emu::launch("lane_neighbour_read", lane_neighbour_read, dim3(1), dim3(64), 64 * sizeof(int), out.data(),
                         barrier);
    });
    return out;
  };
  std::vector<int> lanes_in_order = lanes(0, false);
  int lane_seeds_differing = 0;
  bool lanes_stable = true;
  for (uint64_t seed = 1; seed <= 8; ++seed) {
    lane_seeds_differing += lanes(seed, false) != lanes_in_order;
    lanes_stable = lanes_stable && lanes(seed, true) == lanes(0, true);
  }
  check(lane_seeds_differing > 0 && lanes_stable,
        "within a warp: no __syncwarp differs under shuffled schedules, with it none does",
        std::to_string(lane_seeds_differing) + " of 8 seeds differ without it");

  auto tickets = [&](uint64_t seed) {
    unsigned counter = 0;
    std::vector<unsigned> ticket(5 * 3 * 2);
    with_seed(seed, [&] {
      chingu_emu::launch("block_tickets", block_tickets, dim3(5, 3, 2), dim3(32), 0, &counter, ticket.data());
    });
    return ticket;
  };
  std::vector<unsigned> identity(30);
  for (unsigned i = 0; i < 30; ++i) identity[i] = i;
  std::vector<unsigned> shuffled = tickets(0x5eed), sorted = shuffled;
  std::sort(sorted.begin(), sorted.end());
  check(tickets(0) == identity && sorted == identity && shuffled != identity && tickets(0x5eed) == shuffled &&
            tickets(0x5eee) != shuffled,
        "blocks run x-fastest in order, in a seeded permutation (every block once) when shuffled");
}

// The kernel checks whose results do not depend on which thread runs first. (Not
// test_atomics: it checks that thread 0 took the first ticket, which only the in-order
// schedule promises.)
void test_schedule_independent_kernels() {
  test_block_reduce();
  test_warp_ops(96);
  test_shfl_semantics();
  test_partial_warp();
  test_dyn_smem();
  test_indices();
  test_wmma();
  test_mma_16816();
  test_sync_count();
}

// The same checks under a shuffled schedule: a correct kernel's result must not change.
void test_under_shuffled_schedule() {
  chingu_emu::schedule_seed() = 0x9e3779b9;
  g_schedule_note = " [shuffled schedule]";
  test_schedule_independent_kernels();
  g_schedule_note = "";
  chingu_emu::schedule_seed() = 0;
}

}  // namespace

int main() {
  std::printf("chingu CUDA emulator self-test (fiber stack %zu B)\n", chingu_emu::kFiberStackBytes);
  test_half_conversions();
  test_half_arith();
  test_schedule_independent_kernels();
  test_warp_ops(32);
  test_ldmatrix();
  test_atomics();
  test_math();
  test_errors();
  test_concurrency();
  test_schedules();
  test_under_shuffled_schedule();
  test_timing();
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail == 0 ? 0 : 1;
}

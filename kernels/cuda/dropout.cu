// dropout.cu — inverted dropout in place over `n` fp16 elements.
//
// Element i is kept when its 16-bit value — bits 16·(i mod 4) up of mix(base + (i/4 + 1)·γ) —
// is ≥ threshold, where `base` is derived on the host from (seed, step, site) exactly as the
// CPU backend does (`cpu::dropout_keeps`) and `threshold` = round(p·2^16). The mask is thus a
// pure function of the key and the index: the CPU and the GPU drop the same elements, forward
// and backward (the same call on the gradient) agree, and nothing depends on the launch
// configuration. (SplitMix64 rather than Philox: one 64-bit mix for four elements, and
// bit-identical to the CPU reference. One mix an element, as before, was most of the integer
// work of the LayerNorm kernels that fuse a dropout.)
// `add_dropped_f16` and `dropped_copy_f16` fuse the mask with the op around it in the model
// (the residual add forward, the copy of the gradient backward): one pass instead of two.
#include "common.cuh"

/// Element i of x after dropout: kept and scaled, or zero, rounded to fp16 (the tail's
/// elements; `dropped8` gives the same values eight at a time).
__device__ __forceinline__ __half dropped(const __half* x, int i, unsigned long long base,
                                          unsigned long long threshold, float keep_scale) {
    return chingu::dropout_keeps(chingu::dropout_hash(base, i / 4), i % 4, threshold)
               ? __float2half_rn(__half2float(x[i]) * keep_scale)
               : __float2half_rn(0.0f);
}

// The kernels take eight elements a thread (128-bit loads and stores; every buffer starts
// 16-byte aligned, which the launchers check), the last n % 8 one a thread. GPU run 20: with
// one element a thread, add_dropped_f16 and dropped_copy_f16 took ~50 µs a call for
// seed-768's 18,432 × 768 (~1.6 TB/s), 3.1 ms a step.

/// The element of the last n % 8 (past the groups of eight) this thread takes, or −1.
__device__ __forceinline__ int tail_element(int n) {
    const long long i = (long long)(n / 8) * 8 + blockIdx.x * blockDim.x + threadIdx.x;
    return i < n ? (int)i : -1;
}

/// out = dropout(x) over n elements (out may be x: each element is read, then written, by the
/// same thread).
__device__ __forceinline__ void copy_dropped(__half* out, const __half* x, unsigned long long base,
                                             unsigned long long threshold, float keep_scale,
                                             int n) {
    for (int g = blockIdx.x * blockDim.x + threadIdx.x; g < n / 8; g += gridDim.x * blockDim.x) {
        float v[8];
        chingu::load_half8(v, x + 8 * g);
        chingu::dropped8(v, 8 * g, base, threshold, keep_scale);
        chingu::store_half8(out + 8 * g, v);
    }
    const int i = tail_element(n);
    if (i >= 0) out[i] = dropped(x, i, base, threshold, keep_scale);
}

extern "C" __global__ void dropout_f16(__half* buf, unsigned long long base,
                                       unsigned long long threshold, float keep_scale, int n) {
    copy_dropped(buf, buf, base, threshold, keep_scale, n);
}

extern "C" __global__ void add_dropped_f16(__half* x, const __half* residual,
                                           unsigned long long base, unsigned long long threshold,
                                           float keep_scale, int n) {
    for (int g = blockIdx.x * blockDim.x + threadIdx.x; g < n / 8; g += gridDim.x * blockDim.x) {
        float v[8], r[8];
        chingu::load_half8(v, x + 8 * g);
        chingu::load_half8(r, residual + 8 * g);
        chingu::dropped8(v, 8 * g, base, threshold, keep_scale);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = r[e] + v[e];
        chingu::store_half8(x + 8 * g, v);
    }
    const int i = tail_element(n);
    if (i >= 0)
        x[i] = __float2half_rn(__half2float(residual[i]) +
                               __half2float(dropped(x, i, base, threshold, keep_scale)));
}

extern "C" __global__ void dropped_copy_f16(__half* out, const __half* x, unsigned long long base,
                                            unsigned long long threshold, float keep_scale,
                                            int n) {
    copy_dropped(out, x, base, threshold, keep_scale, n);
}

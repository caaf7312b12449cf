// dropout.cu — inverted dropout in place over `n` fp16 elements.
//
// Element i is kept when mix(base + (i + 1)·γ) ≥ threshold, where `base` is derived on the
// host from (seed, step, site) exactly as the CPU backend does (`cpu::dropout_keeps`) and
// `threshold` = p·2^64. The mask is thus a pure function of the key and the index: the CPU
// and the GPU drop the same elements, forward and backward (the same call on the gradient)
// agree, and nothing depends on the launch configuration. (SplitMix64 rather than Philox:
// one 64-bit mix per element, and bit-identical to the CPU reference.)
// `add_dropped_f16` and `dropped_copy_f16` fuse the mask with the op around it in the model
// (the residual add forward, the copy of the gradient backward): one pass instead of two.
#include "common.cuh"

/// Element i of x after dropout: kept and scaled, or zero (rounded to fp16 as dropout_f16
/// stores it, so the fused kernels below equal dropout_f16 followed by their other op).
__device__ __forceinline__ __half dropped(const __half* x, int i, unsigned long long base,
                                          unsigned long long threshold, float keep_scale) {
    const unsigned long long h =
        chingu::splitmix_mix(base + (unsigned long long)(i + 1) * 0x9e3779b97f4a7c15ull);
    return h >= threshold ? __float2half_rn(__half2float(x[i]) * keep_scale)
                          : __float2half_rn(0.0f);
}

extern "C" __global__ void dropout_f16(__half* buf, unsigned long long base,
                                       unsigned long long threshold, float keep_scale, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        buf[i] = dropped(buf, i, base, threshold, keep_scale);
}

/// x = residual + dropout(x) in place: the residual add after a sublayer in one pass (bit
/// for bit dropout_f16 on x, then add_assign_f16 of residual: fp32 addition commutes).
extern "C" __global__ void add_dropped_f16(__half* x, const __half* residual,
                                           unsigned long long base, unsigned long long threshold,
                                           float keep_scale, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        x[i] = __float2half_rn(__half2float(residual[i]) +
                               __half2float(dropped(x, i, base, threshold, keep_scale)));
}

/// out = dropout(x): a sublayer's output gradient in one pass (instead of a copy, then
/// dropout_f16 in place).
extern "C" __global__ void dropped_copy_f16(__half* out, const __half* x, unsigned long long base,
                                            unsigned long long threshold, float keep_scale,
                                            int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        out[i] = dropped(x, i, base, threshold, keep_scale);
}

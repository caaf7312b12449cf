// dropout.cu — inverted dropout in place over `n` fp16 elements.
//
// Element i is kept when mix(base + (i + 1)·γ) ≥ threshold, where `base` is derived on the
// host from (seed, step, site) exactly as the CPU backend does (`cpu::dropout_keeps`) and
// `threshold` = p·2^64. The mask is thus a pure function of the key and the index: the CPU
// and the GPU drop the same elements, forward and backward (the same call on the gradient)
// agree, and nothing depends on the launch configuration. (SplitMix64 rather than Philox:
// one 64-bit mix per element, and bit-identical to the CPU reference.)
#include "common.cuh"

extern "C" __global__ void dropout_f16(__half* buf, unsigned long long base,
                                       unsigned long long threshold, float keep_scale, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const unsigned long long h =
            chingu::splitmix_mix(base + (unsigned long long)(i + 1) * 0x9e3779b97f4a7c15ull);
        buf[i] = h >= threshold ? __float2half_rn(__half2float(buf[i]) * keep_scale)
                                : __float2half_rn(0.0f);
    }
}

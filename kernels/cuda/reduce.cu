// reduce.cu — deterministic reductions over gradients, and loss-scale unscaling.
//
// Global gradient norm, two passes with a fixed shape: `sum_squares_multi_f32` lets each
// block sum x[i]² over its tensor's fixed grid-stride indices (in double, tree order fixed
// by the block size) into its own partial slot, every tensor in one launch with a block
// count fixed by its length; `sum_final_f64` sums the partials in order in one block. So the
// norm depends on nothing but the data.
// `column_sum_f32` adds the column sums of a [count, width] fp32 matrix (row stride `stride`)
// into one or two outputs, in a fixed order: the second pass of the bias and LayerNorm
// parameter gradients, whose first passes write per-chunk partial sums.
// `unscale_f32` multiplies fp32 gradients by 1/scale and raises `*overflow` (an int, only
// ever set to 1, so concurrent writers agree) when any result is inf or NaN;
// `check_finite_f16` only checks.
#include "common.cuh"

/// First pass over many fp32 tensors in one launch. desc holds 4 u64 per tensor: address, n,
/// first block, blocks. Block first + j of tensor t sums x[i]² (in double) over
/// i = j·blockDim + tid, stepping by blocks·blockDim — its tensor's own grid-stride share —
/// and writes slot first + j: the partials depend on each tensor's length alone, however
/// tensors are grouped into launches.
extern "C" __global__ void sum_squares_multi_f32(double* partials,
                                                 const unsigned long long* desc, int tensors) {
    __shared__ double scratch[32];
    const int t = chingu::tensor_of_block(desc, tensors, 4, 2);
    const float* x = reinterpret_cast<const float*>(desc[t * 4]);
    const int n = (int)desc[t * 4 + 1];
    const int first = (int)desc[t * 4 + 2], blocks = (int)desc[t * 4 + 3];
    const int j = blockIdx.x - first;
    double s = 0.0;
    for (long long i = (long long)j * blockDim.x + threadIdx.x; i < n;
         i += (long long)blocks * blockDim.x) {
        const double v = (double)x[i];
        s += v * v;
    }
    s = chingu::block_sum(s, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

/// out[0] = Σ partials[0..count) in a fixed order (one block).
extern "C" __global__ void sum_final_f64(double* out, const double* partials, int count) {
    __shared__ double scratch[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) s += partials[i];
    s = chingu::block_sum(s, scratch);
    if (threadIdx.x == 0) out[0] = s;
}

/// Σ_k in[k·stride + c] over k < count, for c < width, added to out_lo[c] for c < split and
/// to out_hi[c − split] beyond (so the LayerNorm partials' dγ and dβ halves take one launch).
/// Block (32 columns, 32 groups): group g sums k = g, g + 32, … in order, then the 32 group
/// sums are added in group order.
extern "C" __global__ void column_sum_f32(float* out_lo, float* out_hi, const float* in,
                                          int count, int width, int split, int stride) {
    __shared__ float part[32][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const int g = threadIdx.y;
    float s = 0.0f;
    if (c < width)
        for (int k = g; k < count; k += 32) s += in[(long long)k * stride + c];
    part[g][threadIdx.x] = s;
    __syncthreads();
    if (g == 0 && c < width) {
        float total = 0.0f;
        for (int j = 0; j < 32; ++j) total += part[j][threadIdx.x];
        if (c < split)
            out_lo[c] += total;
        else
            out_hi[c - split] += total;
    }
}

extern "C" __global__ void unscale_f32(float* grad, int* overflow, float inv_scale, int n) {
    bool bad = false;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float v = grad[i] * inv_scale;
        bad |= !isfinite(v);
        grad[i] = v;
    }
    if (bad) *overflow = 1;
}

extern "C" __global__ void check_finite_f16(int* overflow, const __half* x, int n) {
    bool bad = false;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        bad |= !isfinite(__half2float(x[i]));
    if (bad) *overflow = 1;
}

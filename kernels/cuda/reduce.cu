// reduce.cu — deterministic reductions over gradients, and loss-scale unscaling.
//
// Global gradient norm, two passes with a fixed shape: `sum_squares_partial_{f32,f16}` lets
// block b of a launch sum x[i]² over its fixed grid-stride indices (in double, tree order
// fixed by the block size) into partials[b]; `sum_final_f64` sums `count` partials in order
// in one block. The host launches the first pass with a fixed grid for every tensor
// (writing into consecutive slots of one partials buffer) and the second once, so the norm
// depends on nothing but the data.
// `unscale_f32` multiplies fp32 gradients by 1/scale and raises `*overflow` (an int, only
// ever set to 1, so concurrent writers agree) when any result is inf or NaN;
// `check_finite_f16` only checks.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void sum_squares_partial(double* partials, const T* x, int n) {
    __shared__ double scratch[32];
    double s = 0.0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const double v = (double)(float)x[i];
        s += v * v;
    }
    s = chingu::block_sum(s, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

extern "C" __global__ void sum_squares_partial_f32(double* partials, const float* x, int n) {
    sum_squares_partial(partials, x, n);
}

extern "C" __global__ void sum_squares_partial_f16(double* partials, const __half* x, int n) {
    sum_squares_partial(partials, x, n);
}

/// out[0] = Σ partials[0..count) in a fixed order (one block).
extern "C" __global__ void sum_final_f64(double* out, const double* partials, int count) {
    __shared__ double scratch[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) s += partials[i];
    s = chingu::block_sum(s, scratch);
    if (threadIdx.x == 0) out[0] = s;
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

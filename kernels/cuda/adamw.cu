// adamw.cu — one AdamW step on fp32 master weights, refreshing their fp16 compute copy.
//
// g = grad·grad_scale (loss-scale removal and clipping, folded in)
// m = β1·m + (1 − β1)·g;  v = β2·v + (1 − β2)·g²
// p = p·(1 − lr·wd) − lr·(m / c1) / (sqrt(v / c2) + eps)       c1, c2: bias corrections
// (decoupled decay first, PyTorch's order; the same expression order as the CPU backend).
// param, grad, m, v fp32 [n]; param_half fp16 [n] (may be null when there is no fp16 copy).
// `adamw_multi_f32` updates every parameter tensor in one launch (one descriptor per tensor).

#include "common.cuh"

__device__ __forceinline__ void adamw_range(float* param, __half* param_half, const float* grad,
                                            float* m, float* v, float lr, float beta1,
                                            float beta2, float eps, float weight_decay, float c1,
                                            float c2, float grad_scale, int n, int start,
                                            int stride) {
    const float decay = 1.0f - lr * weight_decay;
    // 64-bit index: i + stride must not overflow for n near INT_MAX.
    for (long long i = start; i < n; i += stride) {
        const float g = grad[i] * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float p = param[i] * decay - lr * (mi / c1) / (sqrtf(vi / c2) + eps);
        param[i] = p;
        if (param_half) param_half[i] = __float2half_rn(p);
    }
}

/// desc holds 9 u64 per tensor: param, param_half (0: none), grad, m, v addresses, n, first
/// block, blocks, and the weight decay's f32 bits. Every element gets exactly `adamw_f32`'s
/// arithmetic, so the result does not depend on how tensors are grouped into launches.
extern "C" __global__ void adamw_multi_f32(const unsigned long long* desc, int tensors,
                                           float lr, float beta1, float beta2, float eps,
                                           float c1, float c2, float grad_scale) {
    const int t = chingu::tensor_of_block(desc, tensors, 9, 6);
    const unsigned long long* d = desc + (long long)t * 9;
    const int first = (int)d[6], blocks = (int)d[7];
    adamw_range(reinterpret_cast<float*>(d[0]), reinterpret_cast<__half*>(d[1]),
                reinterpret_cast<const float*>(d[2]), reinterpret_cast<float*>(d[3]),
                reinterpret_cast<float*>(d[4]), lr, beta1, beta2, eps,
                __uint_as_float((unsigned)d[8]), c1, c2, grad_scale, (int)d[5],
                (blockIdx.x - first) * blockDim.x + threadIdx.x, blocks * blockDim.x);
}

extern "C" __global__ void adamw_f32(float* param, __half* param_half, const float* grad,
                                     float* m, float* v, float lr, float beta1, float beta2,
                                     float eps, float weight_decay, float c1, float c2,
                                     float grad_scale, int n) {
    adamw_range(param, param_half, grad, m, v, lr, beta1, beta2, eps, weight_decay, c1, c2,
                grad_scale, n, blockIdx.x * blockDim.x + threadIdx.x, gridDim.x * blockDim.x);
}

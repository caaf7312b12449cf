// adamw.cu — one AdamW step on fp32 master weights, refreshing their fp16 compute copy.
//
// g = grad·grad_scale (loss-scale removal and clipping, folded in)
// m = β1·m + (1 − β1)·g;  v = β2·v + (1 − β2)·g²
// p = p·(1 − lr·wd) − lr·(m / c1) / (sqrt(v / c2) + eps)       c1, c2: bias corrections
// (decoupled decay first, PyTorch's order; the same expression order as the CPU backend).
// param, grad, m, v fp32 [n]; param_half fp16 [n] (may be null when there is no fp16 copy).
#include "common.cuh"

extern "C" __global__ void adamw_f32(float* param, __half* param_half, const float* grad,
                                     float* m, float* v, float lr, float beta1, float beta2,
                                     float eps, float weight_decay, float c1, float c2,
                                     float grad_scale, int n) {
    const float decay = 1.0f - lr * weight_decay;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
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

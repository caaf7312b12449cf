// adamw.cu — one AdamW step on fp32 master weights, refreshing their fp16 compute copy.
//
// g = grad·grad_scale (loss-scale removal and clipping, folded in)
// m = β1·m + (1 − β1)·g;  v = β2·v + (1 − β2)·g²
// p = p·(1 − lr·wd) − lr·(m / c1) / (sqrt(v / c2) + eps)       c1, c2: bias corrections
// (decoupled decay first, PyTorch's order). The CPU backend's operations in its order, each
// rounded alone: the result equals the CPU's bit for bit.
// param, grad, m, v fp32 [n]; param_half fp16 [n] (may be null when there is no fp16 copy).
// `adamw_multi_f32` updates every parameter tensor in one launch (one descriptor per tensor).

#include "common.cuh"

/// One element's update, in place. Every operation is an explicitly rounded intrinsic, so no
/// multiply-add is contracted: the compiler would otherwise fuse differently wherever this is
/// inlined (GPU run 22 saw v differ by one ulp between `adamw_f32` and the vector path of
/// `adamw_multi_f32`). Unfused, in the CPU backend's order, the update equals the CPU's bit for
/// bit, so a step's optimizer does not depend on the launch, the grouping or the device.
__device__ __forceinline__ void adamw_element(float& p, float& m, float& v, float grad,
                                              float lr, float beta1, float beta2, float eps,
                                              float decay, float c1, float c2, float grad_scale) {
    const float g = __fmul_rn(grad, grad_scale);
    m = __fadd_rn(__fmul_rn(beta1, m), __fmul_rn(__fsub_rn(1.0f, beta1), g));
    v = __fadd_rn(__fmul_rn(beta2, v), __fmul_rn(__fmul_rn(__fsub_rn(1.0f, beta2), g), g));
    const float step = __fdiv_rn(__fmul_rn(lr, __fdiv_rn(m, c1)),
                                 __fadd_rn(__fsqrt_rn(__fdiv_rn(v, c2)), eps));
    p = __fsub_rn(__fmul_rn(p, decay), step);
}

/// 1 − lr·weight_decay, unfused like the CPU backend's.
__device__ __forceinline__ float adamw_decay(float lr, float weight_decay) {
    return __fsub_rn(1.0f, __fmul_rn(lr, weight_decay));
}

__device__ __forceinline__ void adamw_range(float* param, __half* param_half, const float* grad,
                                            float* m, float* v, float lr, float beta1,
                                            float beta2, float eps, float weight_decay, float c1,
                                            float c2, float grad_scale, int n, int start,
                                            int stride) {
    const float decay = adamw_decay(lr, weight_decay);
    // 64-bit index: i + stride must not overflow for n near INT_MAX.
    for (long long i = start; i < n; i += stride) {
        float p = param[i], mi = m[i], vi = v[i];
        adamw_element(p, mi, vi, grad[i], lr, beta1, beta2, eps, decay, c1, c2, grad_scale);
        m[i] = mi;
        v[i] = vi;
        param[i] = p;
        if (param_half) param_half[i] = __float2half_rn(p);
    }
}

namespace chingu {
namespace adamw {

/// Four adjacent floats at `p` (16-byte aligned): one 128-bit access.
__device__ __forceinline__ float4 load4(const float* p) {
#ifdef CHINGU_EMU
    if (reinterpret_cast<unsigned long long>(p) & 15ull) __trap();  // a GPU would fault
#endif
    return *reinterpret_cast<const float4*>(p);
}

__device__ __forceinline__ void store4(float* p, float4 v) {
#ifdef CHINGU_EMU
    if (reinterpret_cast<unsigned long long>(p) & 15ull) __trap();
#endif
    *reinterpret_cast<float4*>(p) = v;
}

/// Four floats rounded to fp16 at `p` (8-byte aligned): one 64-bit store.
__device__ __forceinline__ void store_half4(__half* p, float4 v) {
#ifdef CHINGU_EMU
    if (reinterpret_cast<unsigned long long>(p) & 7ull) __trap();
#endif
    *reinterpret_cast<uint2*>(p) = make_uint2(pack_half2(v.x, v.y), pack_half2(v.z, v.w));
}

/// Element `e` of a float4 (0–3).
__device__ __forceinline__ float& lane_of(float4& v, int e) {
    return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w;
}

}  // namespace adamw
}  // namespace chingu

/// Vectors (4 floats) a thread of `adamw_multi_f32` updates: its loads all in flight at once.
#define CHINGU_ADAMW_VECTORS 4

/// desc holds 9 u64 per tensor: param, param_half (0: none), grad, m, v addresses, n, first
/// block, blocks, and the weight decay's f32 bits. Block b of a tensor updates its elements
/// [b·E, (b + 1)·E), E = 16·blockDim.x (ops.rs's ADAMW_BLOCK_ELEMENTS): thread t the vectors
/// t, t + blockDim.x, … of that range, 4 floats each, every load of the thread issued before
/// any arithmetic (128-bit accesses; GPU run 21 timed the one-element-a-thread version at ~2.5
/// TB/s, its blocks each searching the table for 256 elements); a tensor whose buffers are not
/// 16-byte aligned (8 for the fp16 copy), and the last n mod 4 elements, element by element.
/// Every element gets exactly `adamw_f32`'s arithmetic, so the result does not depend on how
/// tensors are grouped into launches or elements into vectors.
extern "C" __global__ void adamw_multi_f32(const unsigned long long* desc, int tensors,
                                           float lr, float beta1, float beta2, float eps,
                                           float c1, float c2, float grad_scale) {
    using namespace chingu::adamw;
    const int t = chingu::tensor_of_block(desc, tensors, 9, 6);
    const unsigned long long* d = desc + (long long)t * 9;
    float* const param = reinterpret_cast<float*>(d[0]);
    __half* const param_half = reinterpret_cast<__half*>(d[1]);
    const float* const grad = reinterpret_cast<const float*>(d[2]);
    float* const m = reinterpret_cast<float*>(d[3]);
    float* const v = reinterpret_cast<float*>(d[4]);
    const long long n = (long long)d[5];
    const float weight_decay = __uint_as_float((unsigned)d[8]);
    const long long per_block = 4LL * CHINGU_ADAMW_VECTORS * blockDim.x;
    const long long start = (long long)(blockIdx.x - (unsigned)d[6]) * per_block;
    const long long end = min(start + per_block, n);
    const bool aligned = ((d[0] | d[2] | d[3] | d[4]) & 15ull) == 0 && (d[1] & 7ull) == 0;
    if (!aligned) {
        adamw_range(param, param_half, grad, m, v, lr, beta1, beta2, eps, weight_decay, c1, c2,
                    grad_scale, (int)end, (int)start + threadIdx.x, blockDim.x);
        return;
    }
    const float decay = adamw_decay(lr, weight_decay);
    float4 p4[CHINGU_ADAMW_VECTORS], g4[CHINGU_ADAMW_VECTORS], m4[CHINGU_ADAMW_VECTORS],
        v4[CHINGU_ADAMW_VECTORS];
#pragma unroll
    for (int k = 0; k < CHINGU_ADAMW_VECTORS; ++k) {
        const long long i = start + 4LL * (threadIdx.x + (long long)k * blockDim.x);
        if (i + 4 <= end) {
            p4[k] = load4(param + i);
            g4[k] = load4(grad + i);
            m4[k] = load4(m + i);
            v4[k] = load4(v + i);
        }
    }
#pragma unroll
    for (int k = 0; k < CHINGU_ADAMW_VECTORS; ++k) {
        const long long i = start + 4LL * (threadIdx.x + (long long)k * blockDim.x);
        if (i + 4 <= end) {
#pragma unroll
            for (int e = 0; e < 4; ++e)
                adamw_element(lane_of(p4[k], e), lane_of(m4[k], e), lane_of(v4[k], e),
                              lane_of(g4[k], e), lr, beta1, beta2, eps, decay, c1, c2,
                              grad_scale);
            store4(m + i, m4[k]);
            store4(v + i, v4[k]);
            store4(param + i, p4[k]);
            if (param_half) store_half4(param_half + i, p4[k]);
        }
    }
    // The last n mod 4 elements (in the tensor's last block), one a thread.
    const long long tail = start + (end - start) / 4 * 4;
    if (tail + threadIdx.x < end)
        adamw_range(param, param_half, grad, m, v, lr, beta1, beta2, eps, weight_decay, c1, c2,
                    grad_scale, (int)end, (int)(tail + threadIdx.x), blockDim.x);
}

extern "C" __global__ void adamw_f32(float* param, __half* param_half, const float* grad,
                                     float* m, float* v, float lr, float beta1, float beta2,
                                     float eps, float weight_decay, float c1, float c2,
                                     float grad_scale, int n) {
    adamw_range(param, param_half, grad, m, v, lr, beta1, beta2, eps, weight_decay, c1, c2,
                grad_scale, n, blockIdx.x * blockDim.x + threadIdx.x, gridDim.x * blockDim.x);
}

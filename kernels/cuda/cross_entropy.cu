// cross_entropy.cu — fused softmax cross-entropy with label smoothing ε and ignored rows.
//
// For each row n of logits [N, V] (fp16) with target t = targets[n] ≠ ignore:
//   loss_n = logsumexp(x) − (1 − ε)·x_t − ε·mean_c(x_c)        (PyTorch's definition)
//   d_logits[n, c] = grad_scale·(softmax(x)_c − ε/V − (1 − ε)·[c = t])
// where grad_scale = loss_scale / counted_rows (the host knows both). Ignored rows get loss 0
// and a zero gradient. One block per row: a max pass, a pass for Σexp and Σx, and a pass
// writing the gradient; probabilities are never stored. row_loss [N] is fp32 (unscaled); the
// host sums it in row order (N is a few thousand at most), so the loss is deterministic.
// `cross_entropy_vec_f16` does the same for rows that fit in registers (see there): one
// 128-bit read of the row instead of three scalar ones.
#include "common.cuh"

/// exp(v − max) for a logit v ≤ max: one rounding of v − max (none when v is near max), one
/// by log2 e, and a MUFU.EX2 (`chingu::exp2_approx`), where expf is about ten instructions — a
/// row of 16,000 logits takes two of these each. Terms below 2^−126 of the row's largest
/// (which is 1) flush to 0.
__device__ __forceinline__ float exp_below_max(float v, float max) {
    return chingu::exp2_approx((v - max) * chingu::LOG2E);
}

/// A counted row's loss from its max, Σexp(x − max), target logit and Σx (PyTorch's label
/// smoothing; both kernels end with it).
__device__ __forceinline__ float smoothed_row_loss(float max, float sum_exp, float target_logit,
                                                   float sum_x, float smoothing, int vocab) {
    const float lse = max + logf(sum_exp);
    return lse - (1.0f - smoothing) * target_logit - smoothing * (sum_x / vocab);
}

extern "C" __global__ void cross_entropy_f16(__half* d_logits, float* row_loss,
                                             const __half* logits, const int* targets,
                                             int rows, int vocab, int ignore, float smoothing,
                                             float grad_scale) {
    __shared__ float scratch[32];
    const int n = blockIdx.x;
    if (n >= rows) return;
    const __half* x = logits + (long long)n * vocab;
    __half* g = d_logits + (long long)n * vocab;
    const int t = targets[n];
    if (t == ignore) {
        for (int c = threadIdx.x; c < vocab; c += blockDim.x) g[c] = __float2half_rn(0.0f);
        if (threadIdx.x == 0) row_loss[n] = 0.0f;
        return;
    }
    float m = chingu::neg_inf();
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) m = fmaxf(m, __half2float(x[c]));
    const float max = chingu::block_max(m, scratch);
    float se = 0.0f, sx = 0.0f;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float v = __half2float(x[c]);
        se += exp_below_max(v, max);
        sx += v;
    }
    const float sum_exp = chingu::block_sum(se, scratch);
    const float sum_x = chingu::block_sum(sx, scratch);
    const float inv_sum = 1.0f / sum_exp, off = smoothing / vocab;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        float p = exp_below_max(__half2float(x[c]), max) * inv_sum - off;
        if (c == t) p -= 1.0f - smoothing;
        g[c] = __float2half_rn(p * grad_scale);
    }
    if (threadIdx.x == 0)
        row_loss[n] = smoothed_row_loss(max, sum_exp, __half2float(x[t]), sum_x, smoothing, vocab);
}

/// Vectors of 8 halves a thread of `cross_entropy_vec_f16` holds at most.
constexpr int CE_MAX_VECTORS = 8;
/// Its block size at most (the launcher's choice; __launch_bounds__ keeps registers in budget).
constexpr int CE_VEC_THREADS = 512;

/// `cross_entropy_f16` for vocab a multiple of 8, at most CE_MAX_VECTORS·8·blockDim.x, and
/// 16-byte aligned logits and gradients. Thread i holds vectors i, i + blockDim.x, … of its
/// row in registers, packed (four registers a vector): one 128-bit load each, the max, the
/// block sums, then exp(x − max) again for the gradient (the same value as in the sum), and
/// one 128-bit store each. Packed and ~8 vectors a thread, blocks take ~60 registers a thread
/// and several fit an SM (GPU run 20: unpacked, 98 registers, 512 threads, one block an SM,
/// 880 µs for 18,432 × 16,000 — half the memory's speed). Sums go in a fixed order (each
/// thread's elements in order, then `block_sum`), so it is deterministic.
extern "C" __global__ void __launch_bounds__(CE_VEC_THREADS)
    cross_entropy_vec_f16(__half* d_logits, float* row_loss, const __half* logits,
                          const int* targets, int rows, int vocab, int ignore, float smoothing,
                          float grad_scale) {
    __shared__ float scratch[32];
    const int n = blockIdx.x;
    if (n >= rows) return;
    const __half* x = logits + (long long)n * vocab;
    __half* g = d_logits + (long long)n * vocab;
    const int t = targets[n], vectors = vocab / 8;
    if (t == ignore) {
        const float zeros[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (int j = threadIdx.x; j < vectors; j += blockDim.x) chingu::store_half8(g + 8 * j, zeros);
        if (threadIdx.x == 0) row_loss[n] = 0.0f;
        return;
    }
    chingu::Half8 packed[CE_MAX_VECTORS];
#pragma unroll
    for (int k = 0; k < CE_MAX_VECTORS; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < vectors) packed[k] = chingu::load_half8_packed(x + 8 * j);
    }
    float m = chingu::neg_inf();
#pragma unroll
    for (int k = 0; k < CE_MAX_VECTORS; ++k) {
        if ((int)(threadIdx.x + k * blockDim.x) < vectors) {
            float v[8];
            chingu::unpack_half8(v, packed[k]);
#pragma unroll
            for (int i = 0; i < 8; ++i) m = fmaxf(m, v[i]);
        }
    }
    const float max = chingu::block_max(m, scratch);
    float se = 0.0f, sx = 0.0f;
#pragma unroll
    for (int k = 0; k < CE_MAX_VECTORS; ++k) {
        if ((int)(threadIdx.x + k * blockDim.x) < vectors) {
            float v[8];
            chingu::unpack_half8(v, packed[k]);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                sx += v[i];
                se += exp_below_max(v[i], max);
            }
        }
    }
    const float sum_exp = chingu::block_sum(se, scratch);
    const float sum_x = chingu::block_sum(sx, scratch);
    const float inv_sum = 1.0f / sum_exp, off = smoothing / vocab;
#pragma unroll
    for (int k = 0; k < CE_MAX_VECTORS; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < vectors) {
            float v[8];
            chingu::unpack_half8(v, packed[k]);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                float p = exp_below_max(v[i], max) * inv_sum - off;
                if (8 * j + i == t) p -= 1.0f - smoothing;
                v[i] = p * grad_scale;
            }
            chingu::store_half8(g + 8 * j, v);
        }
    }
    if (threadIdx.x == 0)
        row_loss[n] = smoothed_row_loss(max, sum_exp, __half2float(x[t]), sum_x, smoothing, vocab);
}

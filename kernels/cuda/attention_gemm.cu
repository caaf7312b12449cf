// attention_gemm.cu — the pointwise parts of attention through cuBLASLt products (the default
// for heads wider than 64 over long sequences; `kernels/src/gpu/ops/attention_gemm.rs` runs
// the products).
//
// The same function as attention.cu's fused kernels (masks from key lengths, causal with a
// query offset, out, lse), with the scores materialised: S = Q·Kᵀ (fp16 or fp32, see below)
// and O = P·V are
// cuBLASLt products, one per head batched over batch rows, reading and writing each head's
// columns of the [B·T, H·Dh] tensors in place. The kernels here do the rest:
//   attention_softmax_f16: one warp per score row (b, h, i), lanes along the keys (the row
//     read three times: max, sum, P — the later reads from cache; GPU run 21 timed a version
//     holding rows of up to 1,024 keys in registers, read once, at 80 registers a thread:
//     2.53 ms a seed-768 step against this kernel's 2.22 on an H200): visible keys
//     j < key_len[b] (and j ≤ q_offset + i when causal); P = exp(scale·s − lse) rounded to
//     fp16, 0 where invisible; lse = the row's log-sum-exp of scale·s (natural log; −inf and
//     P = 0 for a row that sees no key), written at lse[(b·H + h)·Tq + i] as the fused
//     kernels do.
//   attention_scores_backward_f16: from S and dP = dO·Vᵀ (fp16 or fp32), P again from lse, then
//     dS = P·(dP − delta)·scale (delta[b, h, i] = Σ dO·O, attention_backward_delta_f16),
//     both rounded to fp16 for the products dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q.
//   attention_scores_backward_saved_f16: dS from the P the forward saved (fp16, 0 where
//     invisible) instead of S: no S = Q·Kᵀ product again, 8 bytes of traffic a score instead
//     of 12. P enters dS rounded to fp16 here, at fp32 in the kernel above, so the two paths'
//     gradients differ in their last bits (both as close to the CPU backend's).
// P and dS are rounded to fp16 before their products, as in the fused kernels; S and dP are
// stored in fp16 (the `_half_scores_` kernels, the default: half the bytes of the products
// that write them and of the kernels that read them, at the precision of PyTorch's eager
// attention under autocast and of Megatron's fused softmax: fp16 scores, fp32 arithmetic on
// them) or in fp32 (`CHINGU_ATTN_SCORES=f32`: FlashAttention's precision; the same code over
// float scores). The softmax and the saved-P backward go along a row 8 keys a lane at a time (128-bit
// loads and stores: every row starts 16-byte aligned), the row's last partial group key by
// key. Score rows are processed in chunks of consecutive whole (batch row, head) blocks
// (`first_bh`: the chunk's first), so the scratch stays bounded; nothing depends on the
// chunking.
// Shapes: S, dP, P, dS [chunk·Tq, Tk] with rows `ld` elements apart (Tk rounded up to 8, so
// every row starts 16-byte aligned for cuBLASLt; the gap is never read; row r =
// (bh − first_bh)·Tq + i); lse, delta [B·H·Tq].
// Causal bands (`band` > 0; causal self-attention, Tq = Tk, no query offset): the products
// cover query rows in bands of `band`, band k's rows only the keys j < (k + 1)·band, the only
// ones they can see; the rest of the block's scores is never computed. These kernels then read
// and write row i only up to that bound (`band_keys`), so P and dS are defined, zero where
// masked, wherever a product reads them, and nothing reads past. `band` 0: every key.
#include "common.cuh"

using chingu::LOG2E;

/// Keys of row i the band products compute (see the file comment).
__device__ __forceinline__ int band_keys(int i, int k_len, int band) {
    return band > 0 ? min(k_len, (i / band + 1) * band) : k_len;
}

/// Keys row (bh, i) sees: j < this count.
__device__ __forceinline__ int visible_keys(const int* key_len, int bh, int i, int heads,
                                            int k_len, int causal, int q_offset) {
    int visible = min(key_len[bh / heads], k_len);
    if (causal) visible = min(visible, q_offset + i + 1);
    return visible;
}

namespace chingu {
namespace scores {

/// A stored score as a float: S and dP are fp32, or fp16 with `CHINGU_ATTN_SCORES=f16`.
__device__ __forceinline__ float value(float x) { return x; }
__device__ __forceinline__ float value(__half x) { return __half2float(x); }

/// Eight adjacent stored scores at `p` (16-byte aligned) as floats.
__device__ __forceinline__ void load8(float (&v)[8], const float* p) { load_float8(v, p); }
__device__ __forceinline__ void load8(float (&v)[8], const __half* p) { load_half8(v, p); }

}  // namespace scores
}  // namespace chingu

/// One warp per score row of the chunk: P and lse from S (see the file comment); S of type T.
template <typename T>
__device__ __forceinline__ void softmax_rows(__half* p, float* lse, const T* s,
                                             const int* key_len, int rows, int q_len, int k_len,
                                             int ld, int heads, int causal, int q_offset,
                                             float scale, int first_bh, int band) {
    using chingu::scores::load8;
    using chingu::scores::value;
    const int lane = threadIdx.x & 31;
    const long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;  // warp-uniform
    const int bh = first_bh + (int)(r / q_len), i = (int)(r % q_len);
    const int visible = visible_keys(key_len, bh, i, heads, k_len, causal, q_offset);
    const T* sr = s + r * ld;
    __half* pr = p + r * ld;
    // Lane `lane` takes keys 8·lane.. 8·lane + 7, then 256 further on, and so on.
    float m = chingu::neg_inf();
    for (int j = 8 * lane; j < visible; j += 256) {
        float v[8];
        if (j + 8 <= visible) {
            load8(v, sr + j);
        } else {
            for (int e = 0; e < 8; ++e)
                v[e] = j + e < visible ? value(sr[j + e]) : chingu::neg_inf();
        }
        for (int e = 0; e < 8; ++e) m = fmaxf(m, v[e] * scale);
    }
    m = chingu::warp_max(m);
    // exp(x·scale − c) as exp2(x·scale·log2 e − c·log2 e): an FFMA and a MUFU.EX2, where expf
    // is about ten instructions — as many as the row's memory traffic takes time for.
    const float sc2 = scale * LOG2E, m2 = visible > 0 ? m * LOG2E : 0.0f;
    float l = 0.0f;
    for (int j = 8 * lane; j < visible; j += 256) {
        float v[8];
        if (j + 8 <= visible) {
            load8(v, sr + j);
            for (int e = 0; e < 8; ++e) l += chingu::exp2_approx(fmaf(v[e], sc2, -m2));
        } else {
            for (int e = 0; j + e < visible; ++e)
                l += chingu::exp2_approx(fmaf(value(sr[j + e]), sc2, -m2));
        }
    }
    l = chingu::warp_sum(l);
    // A row that sees no key: P = 0, lse = −inf (as the fused kernels).
    const float row_lse = visible > 0 ? m + logf(l) : chingu::neg_inf();
    const float lse2 = visible > 0 ? row_lse * LOG2E : 0.0f;
    const int cols = band_keys(i, k_len, band);
    for (int j = 8 * lane; j < cols; j += 256) {
        float v[8];
        if (j + 8 <= visible) {
            load8(v, sr + j);
            for (int e = 0; e < 8; ++e) v[e] = chingu::exp2_approx(fmaf(v[e], sc2, -lse2));
        } else {
            for (int e = 0; e < 8; ++e)
                v[e] = j + e < visible ? chingu::exp2_approx(fmaf(value(sr[j + e]), sc2, -lse2))
                                       : 0.0f;
        }
        if (j + 8 <= cols) {
            chingu::store_half8(pr + j, v);
        } else {
            // A fixed count, so `v` stays in registers (indexed by an unrolled loop).
#pragma unroll
            for (int e = 0; e < 8; ++e)
                if (j + e < cols) pr[j + e] = __float2half_rn(v[e]);
        }
    }
    if (lane == 0) lse[(long long)bh * q_len + i] = row_lse;
}

#define CHINGU_SOFTMAX_PARAMS(T)                                                            \
    __half *p, float *lse, const T *s, const int *key_len, int rows, int q_len, int k_len,    \
        int ld, int heads, int causal, int q_offset, float scale, int first_bh, int band
#define CHINGU_SOFTMAX_ARGS \
    p, lse, s, key_len, rows, q_len, k_len, ld, heads, causal, q_offset, scale, first_bh, band

extern "C" __global__ void attention_softmax_f16(CHINGU_SOFTMAX_PARAMS(float)) {
    softmax_rows(CHINGU_SOFTMAX_ARGS);
}
/// The same from fp16 scores (`CHINGU_ATTN_SCORES=f16`).
extern "C" __global__ void attention_softmax_half_scores_f16(CHINGU_SOFTMAX_PARAMS(__half)) {
    softmax_rows(CHINGU_SOFTMAX_ARGS);
}

/// P and dS for the backward products: one warp per score row of the chunk (its statistics
/// read once), lanes along the keys; S and dP of type T.
template <typename T>
__device__ __forceinline__ void scores_backward_rows(
    __half* p, __half* ds, const T* s, const T* dp, const float* lse, const float* delta,
    const int* key_len, int rows, int q_len, int k_len, int ld, int heads, int causal,
    int q_offset, float scale, int first_bh, int band) {
    using chingu::scores::value;
    const int lane = threadIdx.x & 31;
    const long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;  // warp-uniform
    const int bh = first_bh + (int)(r / q_len), i = (int)(r % q_len);
    const long long stat = (long long)bh * q_len + i;
    const int visible = visible_keys(key_len, bh, i, heads, k_len, causal, q_offset);
    const float row_lse = lse[stat], row_delta = delta[stat];
    // As the softmax: exp2 of a pre-scaled score (0 where j ≥ visible, so lse = −inf never
    // reaches the subtraction).
    const float sc2 = scale * LOG2E, lse2 = visible > 0 ? row_lse * LOG2E : 0.0f;
    const long long base = r * ld;
    const int cols = band_keys(i, k_len, band);
    for (int j = lane; j < cols; j += 32) {
        const float pj =
            j < visible ? chingu::exp2_approx(fmaf(value(s[base + j]), sc2, -lse2)) : 0.0f;
        p[base + j] = __float2half_rn(pj);
        ds[base + j] = __float2half_rn(pj * (value(dp[base + j]) - row_delta) * scale);
    }
}

#define CHINGU_SCORES_BACKWARD_PARAMS(T)                                                    \
    __half *p, __half *ds, const T *s, const T *dp, const float *lse, const float *delta,     \
        const int *key_len, int rows, int q_len, int k_len, int ld, int heads, int causal,    \
        int q_offset, float scale, int first_bh, int band
#define CHINGU_SCORES_BACKWARD_ARGS                                                          \
    p, ds, s, dp, lse, delta, key_len, rows, q_len, k_len, ld, heads, causal, q_offset, scale, \
        first_bh, band

extern "C" __global__ void attention_scores_backward_f16(CHINGU_SCORES_BACKWARD_PARAMS(float)) {
    scores_backward_rows(CHINGU_SCORES_BACKWARD_ARGS);
}
/// The same from fp16 S and dP (`CHINGU_ATTN_SCORES=f16`).
extern "C" __global__ void attention_scores_backward_half_scores_f16(
    CHINGU_SCORES_BACKWARD_PARAMS(__half)) {
    scores_backward_rows(CHINGU_SCORES_BACKWARD_ARGS);
}

/// dS from the P the forward saved (see the file comment): one warp per score row of the
/// chunk, lanes along the keys; dP of type T. `p` and `ds` start at the chunk's first row, as
/// `dp` does.
template <typename T>
__device__ __forceinline__ void scores_backward_saved_rows(__half* ds, const __half* p,
                                                           const T* dp, const float* delta,
                                                           int rows, int q_len, int k_len,
                                                           int ld, float scale, int first_bh,
                                                           int band) {
    using chingu::scores::load8;
    using chingu::scores::value;
    const int lane = threadIdx.x & 31;
    const long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;  // warp-uniform
    // Row r of the chunk is (first_bh + r / q_len, r % q_len): statistic first_bh·Tq + r.
    const float row_delta = delta[(long long)first_bh * q_len + r];
    const long long base = r * ld;
    // P is 0 past the visible keys, so dS is too: no mask to rebuild.
    const int cols = band_keys((int)(r % q_len), k_len, band);
    const __half* pr = p + base;
    const T* dpr = dp + base;
    __half* dsr = ds + base;
    for (int j = 8 * lane; j < cols; j += 256) {
        if (j + 8 <= cols) {
            float pv[8], dv[8];
            chingu::load_half8(pv, pr + j);
            load8(dv, dpr + j);
            for (int e = 0; e < 8; ++e) pv[e] = pv[e] * (dv[e] - row_delta) * scale;
            chingu::store_half8(dsr + j, pv);
        } else {
            for (int e = 0; j + e < cols; ++e)
                dsr[j + e] =
                    __float2half_rn(__half2float(pr[j + e]) * (value(dpr[j + e]) - row_delta) * scale);
        }
    }
}

#define CHINGU_SCORES_BACKWARD_SAVED_PARAMS(T)                                               \
    __half *ds, const __half *p, const T *dp, const float *delta, int rows, int q_len,         \
        int k_len, int ld, float scale, int first_bh, int band
#define CHINGU_SCORES_BACKWARD_SAVED_ARGS \
    ds, p, dp, delta, rows, q_len, k_len, ld, scale, first_bh, band

extern "C" __global__ void attention_scores_backward_saved_f16(
    CHINGU_SCORES_BACKWARD_SAVED_PARAMS(float)) {
    scores_backward_saved_rows(CHINGU_SCORES_BACKWARD_SAVED_ARGS);
}
/// The same from fp16 dP (`CHINGU_ATTN_SCORES=f16`).
extern "C" __global__ void attention_scores_backward_saved_half_scores_f16(
    CHINGU_SCORES_BACKWARD_SAVED_PARAMS(__half)) {
    scores_backward_saved_rows(CHINGU_SCORES_BACKWARD_SAVED_ARGS);
}

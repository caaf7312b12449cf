// layernorm.cu — LayerNorm over rows of width D (eps 1e-5), fp16 in and out, fp32 statistics.
//
// forward:  y = (x − mean)·rstd·γ + β; saves mean and rstd [N] (fp32) for backward.
//           One block per row; mean first, then the variance from (x − mean)² (two passes
//           over the row, as the CPU backend, so no cancellation for rows with a large mean).
// backward: dx += rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) with dx̂ = dy·γ (dx is fp16 and
//           accumulated, as the CPU backend's); dγ += Σ dy·x̂ and dβ += Σ dy (fp32).
//           Deterministic without atomics: each worker (a warp, or a block for the widest
//           rows) handles rows [w·R, (w+1)·R) in order and writes its partial dγ, dβ to
//           `partials` [workers, 2, D].
//           Rows up to 1,024 wide: one warp per row, lane l owns columns l, l + 32, … with its
//           dγ, dβ partials in registers (`layernorm_backward_w{256,512,1024}_f16`), so a row
//           costs two warp reductions and no barrier. Wider rows: one block per R rows
//           (`layernorm_backward_f16`, partials in shared memory).
//           `column_sum_f32` (reduce.cu) then adds the partials over workers in a fixed order
//           into dγ and dβ (one launch for both).
// Vector kernels (`_vec{1,2,3,4}`): rows whose width is a multiple of 8, at most 256·VECS,
//           with every row 16-byte aligned, are one warp each, forward and backward: lane l
//           owns the 8-column vectors at 256·k + 8·l, every access is one 128-bit load or
//           store, and the row stays in registers between its sweeps (forward: x for the
//           mean, the variance and y; backward: dy, x and dx, packed), so each element is
//           read from memory once. The backward's workers are blocks: a block's warps add
//           their dγ, dβ sums in shared memory in warp order, one partial a block. The
//           launcher picks them when they apply; the scalar kernels above them take every
//           other shape.
// Shapes: x, y, dy, dx [N, D]; γ, β [D] fp16; dγ, dβ [D] fp32; block size a multiple of 32.
#include "common.cuh"

extern "C" __global__ void layernorm_forward_f16(__half* y, float* mean_out, float* rstd_out,
                                                 const __half* x, const __half* gamma,
                                                 const __half* beta, int rows, int width) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const __half* xr = x + (long long)row * width;
    float s = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) s += __half2float(xr[i]);
    const float mean = chingu::block_sum(s, scratch) / width;
    float q = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const float d = __half2float(xr[i]) - mean;
        q += d * d;
    }
    const float var = chingu::block_sum(q, scratch) / width;
    const float rstd = rsqrtf(var + 1e-5f);
    __half* yr = y + (long long)row * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const float xhat = (__half2float(xr[i]) - mean) * rstd;
        yr[i] = __float2half_rn(xhat * __half2float(gamma[i]) + __half2float(beta[i]));
    }
    if (threadIdx.x == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

/// One element's part of its row's backward sums: Σ dx̂ and Σ dx̂·x̂ (for dx), dγ and dβ.
__device__ __forceinline__ void layernorm_backward_sums(float g, float x, float gamma, float m,
                                                        float rs, float& s1, float& s2,
                                                        float& dgamma, float& dbeta) {
    const float xhat = (x - m) * rs;
    const float dxhat = g * gamma;
    s1 += dxhat;
    s2 += dxhat * xhat;
    dgamma += g * xhat;
    dbeta += g;
}

/// dx += rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) for one element (fp16, accumulated).
__device__ __forceinline__ void layernorm_backward_dx(__half* dx, float g, float x, float gamma,
                                                      float m, float rs, float mean_dxhat,
                                                      float mean_dxhat_xhat) {
    const float xhat = (x - m) * rs;
    const float dxhat = g * gamma;
    const float d = rs * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
    *dx = __float2half_rn(__half2float(*dx) + d);
}

/// Warp-per-row backward for rows of width ≤ 32·COLS (see the file comment); a warp past the
/// last row chunk returns at once.
template <int COLS>
__device__ __forceinline__ void layernorm_backward_warp_rows(
    __half* dx, float* partials, const __half* dy, const __half* x, const float* mean,
    const float* rstd, const __half* gamma, int rows, int width, int rows_per_warp) {
    const int lane = threadIdx.x & 31;
    const int warp = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int first = warp * rows_per_warp;
    if (first >= rows) return;
    const int last = min(first + rows_per_warp, rows);
    // Only the dγ, dβ partials live in registers; the second sweep over a row re-reads dy, x
    // and γ, which the first left in L1.
    float dgamma[COLS], dbeta[COLS];
#pragma unroll
    for (int k = 0; k < COLS; ++k) {
        dgamma[k] = 0.0f;
        dbeta[k] = 0.0f;
    }
    for (int row = first; row < last; ++row) {
        const long long off = (long long)row * width;
        const float m = mean[row], rs = rstd[row];
        float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
        for (int k = 0; k < COLS; ++k) {
            const int i = lane + 32 * k;
            if (i < width)
                layernorm_backward_sums(__half2float(dy[off + i]), __half2float(x[off + i]),
                                        __half2float(gamma[i]), m, rs, s1, s2, dgamma[k],
                                        dbeta[k]);
        }
        const float mean_dxhat = chingu::warp_sum(s1) / width;
        const float mean_dxhat_xhat = chingu::warp_sum(s2) / width;
#pragma unroll
        for (int k = 0; k < COLS; ++k) {
            const int i = lane + 32 * k;
            if (i < width)
                layernorm_backward_dx(dx + off + i, __half2float(dy[off + i]),
                                      __half2float(x[off + i]), __half2float(gamma[i]), m, rs,
                                      mean_dxhat, mean_dxhat_xhat);
        }
    }
    float* out = partials + (long long)warp * 2 * width;
#pragma unroll
    for (int k = 0; k < COLS; ++k) {
        const int i = lane + 32 * k;
        if (i < width) {
            out[i] = dgamma[k];
            out[width + i] = dbeta[k];
        }
    }
}

extern "C" __global__ void layernorm_backward_w256_f16(
    __half* dx, float* partials, const __half* dy, const __half* x, const float* mean,
    const float* rstd, const __half* gamma, int rows, int width, int rows_per_warp) {
    layernorm_backward_warp_rows<8>(dx, partials, dy, x, mean, rstd, gamma, rows, width,
                                        rows_per_warp);
}

extern "C" __global__ void layernorm_backward_w512_f16(
    __half* dx, float* partials, const __half* dy, const __half* x, const float* mean,
    const float* rstd, const __half* gamma, int rows, int width, int rows_per_warp) {
    layernorm_backward_warp_rows<16>(dx, partials, dy, x, mean, rstd, gamma, rows, width,
                                        rows_per_warp);
}

extern "C" __global__ void layernorm_backward_w1024_f16(
    __half* dx, float* partials, const __half* dy, const __half* x, const float* mean,
    const float* rstd, const __half* gamma, int rows, int width, int rows_per_warp) {
    layernorm_backward_warp_rows<32>(dx, partials, dy, x, mean, rstd, gamma, rows, width,
                                        rows_per_warp);
}

/// Block-per-chunk backward for rows wider than 1,024. Dynamic shared memory: 2·D floats
/// (this block's dγ and dβ partials).
extern "C" __global__ void layernorm_backward_f16(__half* dx, float* partials, const __half* dy,
                                                  const __half* x, const float* mean,
                                                  const float* rstd, const __half* gamma,
                                                  int rows, int width, int rows_per_block) {
    CHINGU_DYNAMIC_SMEM(float, acc);
    __shared__ float scratch[32];
    float* dgamma = acc;
    float* dbeta = acc + width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        dgamma[i] = 0.0f;
        dbeta[i] = 0.0f;
    }
    const int first = blockIdx.x * rows_per_block;
    const int last = min(first + rows_per_block, rows);
    for (int row = first; row < last; ++row) {
        const long long off = (long long)row * width;
        const float m = mean[row], rs = rstd[row];
        float s1 = 0.0f, s2 = 0.0f;
        // Each thread owns the columns i ≡ threadIdx.x (mod blockDim), so its dγ/dβ entries
        // are touched by it alone and need no barrier between rows.
        for (int i = threadIdx.x; i < width; i += blockDim.x)
            layernorm_backward_sums(__half2float(dy[off + i]), __half2float(x[off + i]),
                                    __half2float(gamma[i]), m, rs, s1, s2, dgamma[i], dbeta[i]);
        const float mean_dxhat = chingu::block_sum(s1, scratch) / width;
        const float mean_dxhat_xhat = chingu::block_sum(s2, scratch) / width;
        for (int i = threadIdx.x; i < width; i += blockDim.x)
            layernorm_backward_dx(dx + off + i, __half2float(dy[off + i]),
                                  __half2float(x[off + i]), __half2float(gamma[i]), m, rs,
                                  mean_dxhat, mean_dxhat_xhat);
    }
    float* out = partials + (long long)blockIdx.x * 2 * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        out[i] = dgamma[i];
        out[width + i] = dbeta[i];
    }
}

// ---------------------------------------------------------------------------------------------
// Vector kernels: one warp per row, 8 columns per access (see the file comment).
// ---------------------------------------------------------------------------------------------

/// Forward for one row per warp, width ≤ 256·VECS and a multiple of 8. ADD: the row is first
/// made x = residual + dropout(x) (threshold 0: no dropout) and written over x (`sum_out`, the
/// same buffer), as add_dropped_f16 (or add_assign_f16) would write it, then normalised from
/// those fp16 values: the pair's bits in one pass (the model's residual add and the next
/// block's LayerNorm).
template <int VECS, bool ADD>
__device__ __forceinline__ void layernorm_forward_vec_row(
    __half* y, float* mean_out, float* rstd_out, const __half* x, const __half* gamma,
    const __half* beta, int rows, int width, __half* sum_out = nullptr,
    const __half* residual = nullptr, unsigned long long base = 0,
    unsigned long long threshold = 0, float keep_scale = 1.0f) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // warp-uniform
    const long long off = (long long)row * width;
    float v[VECS][8];
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < VECS; ++k) {
        const int i = 256 * k + 8 * lane;
        if (i < width) {
            chingu::load_half8(v[k], x + off + i);
            if (ADD) {
                float r[8];
                chingu::load_half8(r, residual + off + i);
                if (threshold != 0) chingu::dropped8(v[k], off + i, base, threshold, keep_scale);
#pragma unroll
                for (int e = 0; e < 8; ++e) v[k][e] = __half2float(__float2half_rn(r[e] + v[k][e]));
                chingu::store_half8(sum_out + off + i, v[k]);
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) s += v[k][e];
        }
    }
    const float mean = chingu::warp_sum(s) / width;
    float q = 0.0f;
#pragma unroll
    for (int k = 0; k < VECS; ++k) {
        if (256 * k + 8 * lane < width) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float d = v[k][e] - mean;
                q += d * d;
            }
        }
    }
    const float rstd = rsqrtf(chingu::warp_sum(q) / width + 1e-5f);
#pragma unroll
    for (int k = 0; k < VECS; ++k) {
        const int i = 256 * k + 8 * lane;
        if (i < width) {
            float g[8], b[8], out[8];
            chingu::load_half8(g, gamma + i);
            chingu::load_half8(b, beta + i);
#pragma unroll
            for (int e = 0; e < 8; ++e) out[e] = (v[k][e] - mean) * rstd * g[e] + b[e];
            chingu::store_half8(y + off + i, out);
        }
    }
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

/// Backward for rows [w·R, (w+1)·R) of warp w (R = `rows_per_warp`; a warp past the last row
/// takes none), width ≤ 256·VECS and a multiple of 8. Each warp sums its rows' dγ, dβ in
/// registers; the block's warps' sums are then added in shared memory in warp order, and the
/// block writes one partial row pair at partials[blockIdx.x] ([blocks, 2, D]): a fixed order,
/// and a block's worth fewer partials to write and add up than one per warp.
template <int VECS, bool DROPPED>
__device__ __forceinline__ void layernorm_backward_vec_rows(
    __half* dx, float* partials, const __half* dy, const __half* x, const float* mean,
    const float* rstd, const __half* gamma, int rows, int width, int rows_per_warp,
    __half* d_dropped = nullptr, unsigned long long base = 0, unsigned long long threshold = 0,
    float keep_scale = 1.0f) {
    __shared__ __align__(16) float warp_sums[8 * 256 * VECS];  // a row of `width` a warp
    const int lane = threadIdx.x & 31;
    const int warp_in_block = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int warp = blockIdx.x * warps + warp_in_block;
    const long long first = (long long)warp * rows_per_warp;
    const long long last = min(first + rows_per_warp, (long long)rows);
    float dgamma[VECS][8], dbeta[VECS][8];
#pragma unroll
    for (int k = 0; k < VECS; ++k)
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            dgamma[k][e] = 0.0f;
            dbeta[k][e] = 0.0f;
        }
    for (long long row = first; row < last; ++row) {
        const long long off = row * width;
        const float m = mean[row], rs = rstd[row];
        // The row's dy, x and dx stay in registers, packed, for the second sweep, all loaded
        // before the row's sums: one trip to memory a row (GPU run 18: two trips took 99 µs a
        // call for seed-768); packed, so 256-thread blocks fit two to an SM (run 20: unpacked,
        // 141 registers, one block an SM, 88 µs a call). γ is re-read (L1).
        chingu::Half8 dy_row[VECS], x_row[VECS], dx_row[VECS];
        float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
        for (int k = 0; k < VECS; ++k) {
            const int i = 256 * k + 8 * lane;
            if (i < width) {
                dy_row[k] = chingu::load_half8_packed(dy + off + i);
                x_row[k] = chingu::load_half8_packed(x + off + i);
                dx_row[k] = chingu::load_half8_packed(dx + off + i);
            }
        }
#pragma unroll
        for (int k = 0; k < VECS; ++k) {
            const int i = 256 * k + 8 * lane;
            if (i < width) {
                float g[8], xhat[8], gm[8];
                chingu::unpack_half8(g, dy_row[k]);
                chingu::unpack_half8(xhat, x_row[k]);
                chingu::load_half8(gm, gamma + i);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    xhat[e] = (xhat[e] - m) * rs;
                    const float dxhat = g[e] * gm[e];
                    s1 += dxhat;
                    s2 += dxhat * xhat[e];
                    dgamma[k][e] += g[e] * xhat[e];
                    dbeta[k][e] += g[e];
                }
            }
        }
        const float mean_dxhat = chingu::warp_sum(s1) / width;
        const float mean_dxhat_xhat = chingu::warp_sum(s2) / width;
#pragma unroll
        for (int k = 0; k < VECS; ++k) {
            const int i = 256 * k + 8 * lane;
            if (i < width) {
                float g[8], xhat[8], gm[8], d[8];
                chingu::unpack_half8(g, dy_row[k]);
                chingu::unpack_half8(xhat, x_row[k]);
                chingu::load_half8(gm, gamma + i);
                chingu::unpack_half8(d, dx_row[k]);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const float xh = (xhat[e] - m) * rs;
                    d[e] += rs * (g[e] * gm[e] - mean_dxhat - xh * mean_dxhat_xhat);
                }
                chingu::store_half8(dx + off + i, d);
                if (DROPPED) {
                    // dropout(dx) as dropped_copy_f16 makes it from the fp16 dx just stored.
#pragma unroll
                    for (int e = 0; e < 8; ++e) d[e] = __half2float(__float2half_rn(d[e]));
                    if (threshold != 0) chingu::dropped8(d, off + i, base, threshold, keep_scale);
                    chingu::store_half8(d_dropped + off + i, d);
                }
            }
        }
    }
    // The block's partials, dγ then dβ: every warp stores its sums in its own row of
    // `warp_sums` at once, then each thread adds up one column's rows in warp order from 0.0f
    // (the order, and so the bits, of the serial version, where warp after warp added its sums
    // into one row between barriers: GPU run 21 timed this kernel at ~1.8 TB/s, ~60 µs a
    // seed-768 call, that chain of 8 one-warp steps taking about as long as a block's rows).
    if (warps > 8) __trap();  // warp_sums holds 8 rows (the launcher's 256 threads)
#pragma unroll
    for (int which = 0; which < 2; ++which) {
        if (which == 1) __syncthreads();  // every thread is done reading dγ's rows
        float* mine = warp_sums + warp_in_block * width;
#pragma unroll
        for (int k = 0; k < VECS; ++k) {
            const int i = 256 * k + 8 * lane;
            if (i < width) {
                const float(&sums)[8] = which == 0 ? dgamma[k] : dbeta[k];
                reinterpret_cast<float4*>(mine + i)[0] =
                    make_float4(sums[0], sums[1], sums[2], sums[3]);
                reinterpret_cast<float4*>(mine + i)[1] =
                    make_float4(sums[4], sums[5], sums[6], sums[7]);
            }
        }
        __syncthreads();
        float* out = partials + ((long long)blockIdx.x * 2 + which) * width;
        for (int c = threadIdx.x; c < width; c += blockDim.x) {
            float total = 0.0f;
            for (int w = 0; w < warps; ++w) total += warp_sums[w * width + c];
            out[c] = total;
        }
    }
}

extern "C" __global__ void layernorm_forward_vec1_f16(__half* y, float* mean_out,
                                                    float* rstd_out, const __half* x,
                                                    const __half* gamma, const __half* beta,
                                                    int rows, int width) {
    layernorm_forward_vec_row<1, false>(y, mean_out, rstd_out, x, gamma, beta, rows, width);
}

extern "C" __global__ void __launch_bounds__(256, 2) layernorm_backward_vec1_f16(
    __half* dx, float* partials, const __half* dy, const __half* x, const float* mean,
    const float* rstd, const __half* gamma, int rows, int width, int rows_per_warp) {
    layernorm_backward_vec_rows<1, false>(dx, partials, dy, x, mean, rstd, gamma, rows, width,
                                   rows_per_warp);
}

extern "C" __global__ void layernorm_forward_vec2_f16(__half* y, float* mean_out,
                                                    float* rstd_out, const __half* x,
                                                    const __half* gamma, const __half* beta,
                                                    int rows, int width) {
    layernorm_forward_vec_row<2, false>(y, mean_out, rstd_out, x, gamma, beta, rows, width);
}

extern "C" __global__ void __launch_bounds__(256, 2) layernorm_backward_vec2_f16(
    __half* dx, float* partials, const __half* dy, const __half* x, const float* mean,
    const float* rstd, const __half* gamma, int rows, int width, int rows_per_warp) {
    layernorm_backward_vec_rows<2, false>(dx, partials, dy, x, mean, rstd, gamma, rows, width,
                                   rows_per_warp);
}

extern "C" __global__ void layernorm_forward_vec3_f16(__half* y, float* mean_out,
                                                    float* rstd_out, const __half* x,
                                                    const __half* gamma, const __half* beta,
                                                    int rows, int width) {
    layernorm_forward_vec_row<3, false>(y, mean_out, rstd_out, x, gamma, beta, rows, width);
}

extern "C" __global__ void __launch_bounds__(256, 2) layernorm_backward_vec3_f16(
    __half* dx, float* partials, const __half* dy, const __half* x, const float* mean,
    const float* rstd, const __half* gamma, int rows, int width, int rows_per_warp) {
    layernorm_backward_vec_rows<3, false>(dx, partials, dy, x, mean, rstd, gamma, rows, width,
                                   rows_per_warp);
}

extern "C" __global__ void layernorm_forward_vec4_f16(__half* y, float* mean_out,
                                                    float* rstd_out, const __half* x,
                                                    const __half* gamma, const __half* beta,
                                                    int rows, int width) {
    layernorm_forward_vec_row<4, false>(y, mean_out, rstd_out, x, gamma, beta, rows, width);
}

// No register bound here: at two blocks an SM (128 registers) it spills 40–48 bytes a thread
// (NVRTC 13.0, sm_80–90): rows 769–1,024 wide keep one 256-thread block an SM (153 registers).
extern "C" __global__ void layernorm_backward_vec4_f16(
    __half* dx, float* partials, const __half* dy, const __half* x, const float* mean,
    const float* rstd, const __half* gamma, int rows, int width, int rows_per_warp) {
    layernorm_backward_vec_rows<4, false>(dx, partials, dy, x, mean, rstd, gamma, rows, width,
                                   rows_per_warp);
}

// ---------------------------------------------------------------------------------------------
// The same kernels with the dropout around them fused in (the model's residual stream, pre-norm):
// forward, x = residual + dropout(x) written back, then its LayerNorm (add_dropped_f16 then
// layernorm_forward_vec*); backward, after dx, dropout(dx) into d_dropped (layernorm_backward_vec*
// then dropped_copy_f16, with the earlier block's key). Threshold 0: no dropout (a plain add, a
// copy). One pass over the rows instead of two; the same bits as the pairs.
// ---------------------------------------------------------------------------------------------
#define CHINGU_LN_ADD_PARAMS                                                                  \
    __half *y, float *mean_out, float *rstd_out, __half *x, const __half *residual,           \
        const __half *gamma, const __half *beta, int rows, int width, unsigned long long base, \
        unsigned long long threshold, float keep_scale
#define CHINGU_LN_ADD_ARGS                                                                 \
    y, mean_out, rstd_out, x, gamma, beta, rows, width, x, residual, base, threshold, \
        keep_scale
#define CHINGU_LN_DROPPED_PARAMS                                                              \
    __half *dx, float *partials, const __half *dy, const __half *x, const float *mean,         \
        const float *rstd, const __half *gamma, int rows, int width, int rows_per_warp,        \
        __half *d_dropped, unsigned long long base, unsigned long long threshold,               \
        float keep_scale
#define CHINGU_LN_DROPPED_ARGS                                                               \
    dx, partials, dy, x, mean, rstd, gamma, rows, width, rows_per_warp, d_dropped, base,      \
        threshold, keep_scale

extern "C" __global__ void layernorm_forward_add_dropped_vec1_f16(CHINGU_LN_ADD_PARAMS) {
    layernorm_forward_vec_row<1, true>(CHINGU_LN_ADD_ARGS);
}
extern "C" __global__ void layernorm_forward_add_dropped_vec2_f16(CHINGU_LN_ADD_PARAMS) {
    layernorm_forward_vec_row<2, true>(CHINGU_LN_ADD_ARGS);
}
extern "C" __global__ void layernorm_forward_add_dropped_vec3_f16(CHINGU_LN_ADD_PARAMS) {
    layernorm_forward_vec_row<3, true>(CHINGU_LN_ADD_ARGS);
}
extern "C" __global__ void layernorm_forward_add_dropped_vec4_f16(CHINGU_LN_ADD_PARAMS) {
    layernorm_forward_vec_row<4, true>(CHINGU_LN_ADD_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    layernorm_backward_dropped_vec1_f16(CHINGU_LN_DROPPED_PARAMS) {
    layernorm_backward_vec_rows<1, true>(CHINGU_LN_DROPPED_ARGS);
}
extern "C" __global__ void __launch_bounds__(256, 2)
    layernorm_backward_dropped_vec2_f16(CHINGU_LN_DROPPED_PARAMS) {
    layernorm_backward_vec_rows<2, true>(CHINGU_LN_DROPPED_ARGS);
}
extern "C" __global__ void __launch_bounds__(256, 2)
    layernorm_backward_dropped_vec3_f16(CHINGU_LN_DROPPED_PARAMS) {
    layernorm_backward_vec_rows<3, true>(CHINGU_LN_DROPPED_ARGS);
}
extern "C" __global__ void layernorm_backward_dropped_vec4_f16(CHINGU_LN_DROPPED_PARAMS) {
    layernorm_backward_vec_rows<4, true>(CHINGU_LN_DROPPED_ARGS);
}

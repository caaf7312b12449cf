// attention.cu — fused multi-head scaled-dot-product attention (flash style), fp16 in and out,
// fp32 softmax statistics, tensor cores through WMMA (16×16×16 half fragments, float
// accumulators). No sequence×sequence matrix ever reaches device memory, and the masks are
// computed from lengths, never materialised.
//
// Shapes (B batch rows, H heads, Dh head width, D = H·Dh): q, out, d_out, dq [B·Tq, D];
// k, v, dk, dv [B·Tk, D]; head h is columns h·Dh..(h+1)·Dh; lse, delta [B, H, Tq] fp32;
// key_len [B] int, already clamped to Tk by the launcher. Query i of batch row b sees key j
// when j < key_len[b] and, if causal, j ≤ q_offset + i. Scale s = 1/sqrt(Dh).
//
// forward:  out = softmax(s·Q·Kᵀ + mask)·V per (b, h); one block per (query tile, h, b)
//           walks the visible key tiles with an online softmax (running max m and sum l per
//           query row; the output accumulator is rescaled by exp(m_old − m_new)), and writes
//           lse = m + log(l). A query row with no visible key gets out = 0 (as the CPU
//           backend) and lse = −inf.
// backward: deterministic, no atomics; P is recomputed as exp(s·Q·Kᵀ − lse) (0 where masked).
//           delta: Dᵢ = Σ_d dO·O (fp32), one warp per (row, head).
//           dkdv:  one block per (key tile, h, b) walking query tiles:
//                  dV = Σ Pᵀ·dO, dK = s·Σ dSᵀ·Q with dS = P∘(dP − D), dP = dO·Vᵀ.
//           dq:    one block per (query tile, h, b) walking key tiles: dQ = s·Σ dS·K.
//           dq, dk, dv are overwritten; keys j ≥ key_len get dk = dv = 0.
//
// Invariants: Dh is a multiple of 16 and at most 256 (the launcher checks); Tq and Tk are
// arbitrary (tiles are padded with zeros in shared memory and the padding is masked). Blocks
// are 128 threads (4 warps). Tiles are 16 rows; shared tiles of fp16 rows have a leading
// dimension of Dh + 8 (`ld`), and the dynamic shared memory per block is
//   forward:           160·ld + 4608 bytes  (≤ 46 848 for Dh 256)
//   dkdv and dq:       128·ld + 9216 bytes  (≤ 43 008 for Dh 256)
// (`ops.rs` computes the same sizes). Score tiles are computed by the 4 warps splitting the
// Dh reduction into 4 partial 16×16 tiles, summed in a fixed order by the threads, so the
// fragment element order (opaque) is never relied on: only load/store/fill/mma, and
// position-independent scaling of accumulator elements.
#include "common.cuh"

namespace chingu {
namespace attn {

constexpr int TILE = 16;
constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;
/// Dh/16 ≤ 16 column tiles over 4 warps.
constexpr int COL_TILES_PER_WARP = 4;

using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half,
                                     nvcuda::wmma::row_major>;
using FragAT = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half,
                                      nvcuda::wmma::col_major>;
using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __half,
                                     nvcuda::wmma::row_major>;
using FragBT = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __half,
                                      nvcuda::wmma::col_major>;
using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

/// Rows [row0, row0 + 16) of one head (`src` points at row 0, column h·Dh) into a 16 × Dh
/// shared tile with leading dimension ld; rows ≥ valid are zero.
__device__ __forceinline__ void load_tile(__half* tile, const __half* src, int row0, int valid,
                                          int width, int head_dim, int ld) {
    for (int e = threadIdx.x; e < TILE * head_dim; e += THREADS) {
        const int r = e / head_dim, c = e - r * head_dim;
        const int row = row0 + r;
        tile[r * ld + c] =
            row < valid ? src[(long long)row * width + c] : __float2half_rn(0.0f);
    }
}

/// part[warp] (16 × 16 fp32) = Σ over this warp's k-steps (kk ≡ warp mod 4) of
/// a[:, kk] · b[:, kk]ᵀ, with a and b 16 × Dh row-major shared tiles: b is read as a
/// column-major matrix_b, so the four partials sum to a·bᵀ.
__device__ __forceinline__ void partial_abt(float* part, const __half* a, const __half* b,
                                            int head_dim, int ld) {
    const int warp = threadIdx.x >> 5;
    FragC acc;
    nvcuda::wmma::fill_fragment(acc, 0.0f);
    for (int kk = warp; kk < head_dim / 16; kk += WARPS) {
        FragA fa;
        FragBT fb;
        nvcuda::wmma::load_matrix_sync(fa, a + kk * 16, ld);
        nvcuda::wmma::load_matrix_sync(fb, b + kk * 16, ld);
        nvcuda::wmma::mma_sync(acc, fa, fb, acc);
    }
    nvcuda::wmma::store_matrix_sync(part + warp * 256, acc, 16, nvcuda::wmma::mem_row_major);
}

/// The four partials of element e, summed in a fixed order.
__device__ __forceinline__ float sum_partials(const float* part, int e) {
    return ((part[e] + part[256 + e]) + part[512 + e]) + part[768 + e];
}

/// Max / sum over the 8 consecutive lanes that share a query row (xor butterfly: every lane
/// of the group gets the same bits).
__device__ __forceinline__ float group8_max(float v) {
    for (int o = 4; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ float group8_sum(float v) {
    for (int o = 4; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ bool visible(int i, int j, int q_len, int kl, int causal,
                                        int q_offset) {
    return i < q_len && j < kl && (!causal || j <= q_offset + i);
}

/// Keys [0, limit) that some query of the tile starting at q0 may see.
__device__ __forceinline__ int key_limit(int q0, int q_len, int kl, int causal, int q_offset) {
    int limit = kl;
    if (causal) limit = min(limit, q_offset + min(q0 + TILE, q_len));
    return limit;
}

/// Backward, one 16 × 16 (query tile q0, key tile k0) block: from the score and dP partials,
/// P = exp(s·S − lse) (0 where masked) and dS = P·(dP − D), both stored fp16 row-major
/// (query rows) in ps / dss (ps may be null). Thread (r, g) handles row r, columns 2g, 2g+1.
__device__ __forceinline__ void probs_and_dscores(__half* ps, __half* dss, const float* spart,
                                                  const float* dppart, int q0, int k0,
                                                  float lse_i, float delta_i, float scale,
                                                  int q_len, int kl, int causal, int q_offset) {
    const int r = threadIdx.x >> 3, g = threadIdx.x & 7;
    for (int c = 2 * g; c < 2 * g + 2; ++c) {
        const int e = r * TILE + c;
        float p = 0.0f, ds = 0.0f;
        if (visible(q0 + r, k0 + c, q_len, kl, causal, q_offset)) {
            p = expf(sum_partials(spart, e) * scale - lse_i);
            ds = p * (sum_partials(dppart, e) - delta_i);
        }
        if (ps) ps[e] = __float2half_rn(p);
        dss[e] = __float2half_rn(ds);
    }
}

}  // namespace attn
}  // namespace chingu

/// Grid (ceil(Tq/16), H, B), 128 threads, 160·ld + 4608 bytes of dynamic shared memory.
extern "C" __global__ void attention_forward_f16(__half* out, float* lse, const __half* q,
                                                 const __half* k, const __half* v,
                                                 const int* key_len, int batch, int q_len,
                                                 int k_len, int heads, int head_dim,
                                                 int causal, int q_offset) {
    using namespace chingu::attn;
    namespace wmma = nvcuda::wmma;
    CHINGU_DYNAMIC_SMEM(float4, smem);
    const int ld = head_dim + 8;
    __half* qs = reinterpret_cast<__half*>(smem);
    __half* ks = qs + TILE * ld;
    __half* vs = ks + TILE * ld;
    __half* ps = vs + TILE * ld;                             // 16 × 16
    float* os = reinterpret_cast<float*>(ps + TILE * TILE);  // 16 × ld output accumulator
    float* part = os + TILE * ld;                            // WARPS × 16 × 16

    const int q0 = blockIdx.x * TILE, h = blockIdx.y, b = blockIdx.z;
    if (b >= batch) return;
    const int width = heads * head_dim;
    const long long q_base = (long long)b * q_len * width + (long long)h * head_dim;
    const long long k_base = (long long)b * k_len * width + (long long)h * head_dim;
    const int kl = key_len[b];
    const int limit = key_limit(q0, q_len, kl, causal, q_offset);
    const float scale = 1.0f / sqrtf((float)head_dim);
    const int warp = threadIdx.x >> 5;
    // Thread (r, g) owns query row r: columns 2g, 2g+1 of a score tile and columns
    // g, g+8, … of the output accumulator.
    const int r = threadIdx.x >> 3, g = threadIdx.x & 7;
    const int i = q0 + r;

    load_tile(qs, q + q_base, q0, q_len, width, head_dim, ld);
    for (int c = g; c < ld; c += 8) os[r * ld + c] = 0.0f;
    float m = chingu::neg_inf(), l = 0.0f;
    __syncthreads();

    for (int k0 = 0; k0 < limit; k0 += TILE) {
        load_tile(ks, k + k_base, k0, kl, width, head_dim, ld);
        load_tile(vs, v + k_base, k0, kl, width, head_dim, ld);
        __syncthreads();
        partial_abt(part, qs, ks, head_dim, ld);
        __syncthreads();

        float s[2];
        float tile_max = chingu::neg_inf();
        for (int c = 0; c < 2; ++c) {
            const int col = 2 * g + c;
            const float x = sum_partials(part, r * TILE + col) * scale;
            s[c] = visible(i, k0 + col, q_len, kl, causal, q_offset) ? x : chingu::neg_inf();
            tile_max = fmaxf(tile_max, s[c]);
        }
        const float m_new = fmaxf(m, group8_max(tile_max));
        float alpha = 1.0f, p[2] = {0.0f, 0.0f};
        if (m_new != chingu::neg_inf()) {
            alpha = expf(m - m_new);  // 0 while m is still −inf
            for (int c = 0; c < 2; ++c) p[c] = expf(s[c] - m_new);
        }
        l = l * alpha + group8_sum(p[0] + p[1]);
        m = m_new;
        for (int c = 0; c < 2; ++c) ps[r * TILE + 2 * g + c] = __float2half_rn(p[c]);
        for (int c = g; c < head_dim; c += 8) os[r * ld + c] *= alpha;
        __syncthreads();

        // O += P·V, warp w on output column tiles w, w+4, …
        for (int n = warp; n < head_dim / 16; n += WARPS) {
            FragC acc;
            FragA fp;
            FragB fv;
            wmma::load_matrix_sync(acc, os + n * 16, ld, wmma::mem_row_major);
            wmma::load_matrix_sync(fp, ps, TILE);
            wmma::load_matrix_sync(fv, vs + n * 16, ld);
            wmma::mma_sync(acc, fp, fv, acc);
            wmma::store_matrix_sync(os + n * 16, acc, ld, wmma::mem_row_major);
        }
        __syncthreads();
    }

    if (i < q_len) {
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        __half* o = out + q_base + (long long)i * width;
        for (int c = g; c < head_dim; c += 8) o[c] = __float2half_rn(os[r * ld + c] * inv);
        if (g == 0)
            lse[((long long)b * heads + h) * q_len + i] =
                l > 0.0f ? m + logf(l) : chingu::neg_inf();
    }
}

/// delta[b, h, i] = Σ_d d_out·out over head h of row b·Tq + i. One warp per (row, head):
/// grid ceil(B·Tq·H / 4), 128 threads.
extern "C" __global__ void attention_backward_delta_f16(float* delta, const __half* d_out,
                                                        const __half* out, int batch,
                                                        int q_len, int heads, int head_dim) {
    const int lane = threadIdx.x & 31;
    const long long item = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (item >= (long long)batch * q_len * heads) return;  // whole warps leave together
    const long long row = item / heads;
    const int h = (int)(item - row * heads);
    const long long base = row * heads * head_dim + (long long)h * head_dim;
    float s = 0.0f;
    for (int c = lane; c < head_dim; c += 32)
        s += __half2float(d_out[base + c]) * __half2float(out[base + c]);
    s = chingu::warp_sum(s);
    if (lane == 0) {
        const long long b = row / q_len, i = row - b * q_len;
        delta[(b * heads + h) * q_len + i] = s;
    }
}

/// Grid (ceil(Tk/16), H, B), 128 threads, 128·ld + 9216 bytes of dynamic shared memory.
extern "C" __global__ void attention_backward_dkdv_f16(
    __half* dk, __half* dv, const __half* d_out, const __half* q, const __half* k,
    const __half* v, const float* lse, const float* delta, const int* key_len, int batch,
    int q_len, int k_len, int heads, int head_dim, int causal, int q_offset) {
    using namespace chingu::attn;
    namespace wmma = nvcuda::wmma;
    CHINGU_DYNAMIC_SMEM(float4, smem);
    const int ld = head_dim + 8;
    __half* ks = reinterpret_cast<__half*>(smem);
    __half* vs = ks + TILE * ld;
    __half* qs = vs + TILE * ld;
    __half* dos = qs + TILE * ld;
    float* spart = reinterpret_cast<float*>(dos + TILE * ld);  // WARPS × 16 × 16
    float* dppart = spart + WARPS * 256;                        // WARPS × 16 × 16
    __half* ps = reinterpret_cast<__half*>(dppart + WARPS * 256);
    __half* dss = ps + TILE * TILE;

    const int k0 = blockIdx.x * TILE, h = blockIdx.y, b = blockIdx.z;
    if (b >= batch) return;
    const int width = heads * head_dim;
    const long long q_base = (long long)b * q_len * width + (long long)h * head_dim;
    const long long k_base = (long long)b * k_len * width + (long long)h * head_dim;
    const long long stat_base = ((long long)b * heads + h) * q_len;
    const int kl = key_len[b];
    const float scale = 1.0f / sqrtf((float)head_dim);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = threadIdx.x >> 3;
    const int col_tiles = head_dim / 16;

    // Query tiles that can see some key of this tile: none when the whole tile is past
    // key_len; with a causal mask, from the first query i with k0 ≤ q_offset + i.
    int q_begin = 0;
    if (k0 >= kl) q_begin = q_len;
    else if (causal && k0 > q_offset) q_begin = (k0 - q_offset) / TILE * TILE;

    load_tile(ks, k + k_base, k0, kl, width, head_dim, ld);
    load_tile(vs, v + k_base, k0, kl, width, head_dim, ld);

    FragC dk_acc[COL_TILES_PER_WARP], dv_acc[COL_TILES_PER_WARP];
    for (int t = 0; t < COL_TILES_PER_WARP; ++t) {
        wmma::fill_fragment(dk_acc[t], 0.0f);
        wmma::fill_fragment(dv_acc[t], 0.0f);
    }

    for (int q0 = q_begin; q0 < q_len; q0 += TILE) {
        load_tile(qs, q + q_base, q0, q_len, width, head_dim, ld);
        load_tile(dos, d_out + q_base, q0, q_len, width, head_dim, ld);
        const int i = q0 + r;
        const float lse_i = i < q_len ? lse[stat_base + i] : 0.0f;
        const float delta_i = i < q_len ? delta[stat_base + i] : 0.0f;
        __syncthreads();
        partial_abt(spart, qs, ks, head_dim, ld);
        partial_abt(dppart, dos, vs, head_dim, ld);
        __syncthreads();
        probs_and_dscores(ps, dss, spart, dppart, q0, k0, lse_i, delta_i, scale, q_len, kl,
                          causal, q_offset);
        __syncthreads();
        // dV += Pᵀ·dO and dK += dSᵀ·Q on column tiles warp, warp+4, …; Pᵀ and dSᵀ are the
        // row-major P and dS read as column-major matrix_a.
        FragAT fp, fds;
        wmma::load_matrix_sync(fp, ps, TILE);
        wmma::load_matrix_sync(fds, dss, TILE);
        for (int t = 0; t < COL_TILES_PER_WARP; ++t) {
            const int n = warp + WARPS * t;
            if (n >= col_tiles) break;
            FragB fb;
            wmma::load_matrix_sync(fb, dos + n * 16, ld);
            wmma::mma_sync(dv_acc[t], fp, fb, dv_acc[t]);
            wmma::load_matrix_sync(fb, qs + n * 16, ld);
            wmma::mma_sync(dk_acc[t], fds, fb, dk_acc[t]);
        }
        __syncthreads();
    }

    // Each warp stages its tiles through its own 16 × 16 slice of spart (free now).
    float* stage = spart + warp * 256;
    for (int t = 0; t < COL_TILES_PER_WARP; ++t) {
        const int n = warp + WARPS * t;
        if (n >= col_tiles) break;
        for (int e = 0; e < dk_acc[t].num_elements; ++e) dk_acc[t].x[e] *= scale;
        for (int which = 0; which < 2; ++which) {
            wmma::store_matrix_sync(stage, which == 0 ? dk_acc[t] : dv_acc[t], TILE,
                                    wmma::mem_row_major);
            __syncwarp();
            __half* dst = (which == 0 ? dk : dv) + k_base + n * 16;
            for (int e = lane; e < TILE * TILE; e += 32) {
                const int row = e >> 4, j = k0 + row;
                if (j < k_len)
                    dst[(long long)j * width + (e & 15)] =
                        __float2half_rn(j < kl ? stage[e] : 0.0f);
            }
            __syncwarp();
        }
    }
}

/// Grid (ceil(Tq/16), H, B), 128 threads, 128·ld + 9216 bytes of dynamic shared memory.
extern "C" __global__ void attention_backward_dq_f16(
    __half* dq, const __half* d_out, const __half* q, const __half* k, const __half* v,
    const float* lse, const float* delta, const int* key_len, int batch, int q_len, int k_len,
    int heads, int head_dim, int causal, int q_offset) {
    using namespace chingu::attn;
    namespace wmma = nvcuda::wmma;
    CHINGU_DYNAMIC_SMEM(float4, smem);
    const int ld = head_dim + 8;
    __half* ks = reinterpret_cast<__half*>(smem);
    __half* vs = ks + TILE * ld;
    __half* qs = vs + TILE * ld;
    __half* dos = qs + TILE * ld;
    float* spart = reinterpret_cast<float*>(dos + TILE * ld);
    float* dppart = spart + WARPS * 256;
    __half* dss = reinterpret_cast<__half*>(dppart + WARPS * 256) + TILE * TILE;

    const int q0 = blockIdx.x * TILE, h = blockIdx.y, b = blockIdx.z;
    if (b >= batch) return;
    const int width = heads * head_dim;
    const long long q_base = (long long)b * q_len * width + (long long)h * head_dim;
    const long long k_base = (long long)b * k_len * width + (long long)h * head_dim;
    const long long stat_base = ((long long)b * heads + h) * q_len;
    const int kl = key_len[b];
    const int limit = key_limit(q0, q_len, kl, causal, q_offset);
    const float scale = 1.0f / sqrtf((float)head_dim);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = threadIdx.x >> 3;
    const int col_tiles = head_dim / 16;

    load_tile(qs, q + q_base, q0, q_len, width, head_dim, ld);
    load_tile(dos, d_out + q_base, q0, q_len, width, head_dim, ld);
    const int i = q0 + r;
    const float lse_i = i < q_len ? lse[stat_base + i] : 0.0f;
    const float delta_i = i < q_len ? delta[stat_base + i] : 0.0f;

    FragC dq_acc[COL_TILES_PER_WARP];
    for (int t = 0; t < COL_TILES_PER_WARP; ++t) wmma::fill_fragment(dq_acc[t], 0.0f);

    for (int k0 = 0; k0 < limit; k0 += TILE) {
        load_tile(ks, k + k_base, k0, kl, width, head_dim, ld);
        load_tile(vs, v + k_base, k0, kl, width, head_dim, ld);
        __syncthreads();
        partial_abt(spart, qs, ks, head_dim, ld);
        partial_abt(dppart, dos, vs, head_dim, ld);
        __syncthreads();
        probs_and_dscores(nullptr, dss, spart, dppart, q0, k0, lse_i, delta_i, scale, q_len,
                          kl, causal, q_offset);
        __syncthreads();
        // dQ += dS·K on column tiles warp, warp+4, …
        FragA fds;
        wmma::load_matrix_sync(fds, dss, TILE);
        for (int t = 0; t < COL_TILES_PER_WARP; ++t) {
            const int n = warp + WARPS * t;
            if (n >= col_tiles) break;
            FragB fk;
            wmma::load_matrix_sync(fk, ks + n * 16, ld);
            wmma::mma_sync(dq_acc[t], fds, fk, dq_acc[t]);
        }
        __syncthreads();
    }

    float* stage = spart + warp * 256;
    for (int t = 0; t < COL_TILES_PER_WARP; ++t) {
        const int n = warp + WARPS * t;
        if (n >= col_tiles) break;
        for (int e = 0; e < dq_acc[t].num_elements; ++e) dq_acc[t].x[e] *= scale;
        wmma::store_matrix_sync(stage, dq_acc[t], TILE, wmma::mem_row_major);
        __syncwarp();
        __half* dst = dq + q_base + n * 16;
        for (int e = lane; e < TILE * TILE; e += 32) {
            const int row = q0 + (e >> 4);
            if (row < q_len) dst[(long long)row * width + (e & 15)] = __float2half_rn(stage[e]);
        }
        __syncwarp();
    }
}

// attention.cu — fused multi-head scaled-dot-product attention (flash style), fp16 in and out,
// fp32 softmax statistics, tensor cores through WMMA (16×16×16 half fragments, float
// accumulators); at the end of the file, the same three kernels (forward, dQ, dK/dV) keeping
// the scores in registers through mma.sync's documented fragments (the default at heads up to
// 64 wide).
// No sequence×sequence matrix ever reaches device memory, and the masks are computed from
// lengths, never materialised.
//
// Shapes (B batch rows, H heads, Dh head width, D = H·Dh): q, out, d_out, dq [B·Tq, D];
// k, v, dk, dv [B·Tk, D]; head h is columns h·Dh..(h+1)·Dh; lse, delta [B, H, Tq] fp32;
// key_len [B] int, already clamped to Tk by the launcher. Query i of batch row b sees key j
// when j < key_len[b] and, if causal, j ≤ q_offset + i. Scale s = 1/sqrt(Dh). Exponentials
// are taken base 2 on scores pre-multiplied by s·log2(e) (the same function; lse is stored in
// natural-log units).
//
// forward:  out = softmax(s·Q·Kᵀ + mask)·V per (b, h); one block per (query tile, h, b)
//           walks the visible key tiles with an online softmax (running max m and sum l per
//           query row; the output accumulator is rescaled by exp(m_old − m_new)), and writes
//           lse = m + log(l). A query row with no visible key gets out = 0 (as the CPU
//           backend) and lse = −inf.
// backward: deterministic, no atomics; P is recomputed as exp(s·Q·Kᵀ − lse) (0 where masked).
//           delta: Dᵢ = Σ_d dO·O (fp32), a group of lanes per (row, head), 8 columns a lane.
//           dkdv:  one block per (key tile, h, b) walking query tiles:
//                  dV = Σ Pᵀ·dO, dK = s·Σ dSᵀ·Q with dS = P∘(dP − D), dP = dO·Vᵀ.
//           dq:    one block per (query tile, h, b) walking key tiles: dQ = s·Σ dS·K.
//           dq, dk, dv are overwritten; keys j ≥ key_len get dk = dv = 0.
//
// Tiling. A block is W warps (blockDim.x = 32·W, W ∈ {1, 2, 4, 8}); warp w owns 16 rows of the
// block's "own" dimension end to end (queries for forward and dq, keys for dkdv): its score
// tile row-block, its softmax state, its accumulators. The block walks the other dimension in
// tiles of T rows (T ∈ {16, 32}, the kernels' last argument), loaded once per block into
// shared memory with 16-byte cp.async copies (rows past the valid length are zero), so the
// only block-wide barriers are the two around each shared tile load; everything between is
// per warp (__syncwarp). Tiles entirely above the causal diagonal or past key_len are
// skipped (per block for the loads, per warp for the arithmetic). The launcher picks, by Dh,
// the first (W, T) of (8,32) (dK/dV always, dQ for Dh > 64: measured faster on an H200),
// (4,32), (4,16), (2,32), (2,16), (1,32), (1,16) whose shared memory fits what the device
// opted the kernel in to (`Device::max_dynamic_shared`: 99 KiB on sm_86/89 and on the
// emulator, 163/227 KiB on sm_80/90, else 48 KiB). Forward: (4,32) up to Dh 256 with the
// opt-in. dK/dV: (8,32) for Dh 64 at 99 KiB, for Dh 192 at 163 KiB; else (4,32), and Dh 256
// at 99 KiB (4,16). At 48 KiB: forward (4,32)/(4,16), backward (2,32)/(2,16) for Dh ≥ 128.
//
// Per warp and tile: the 16 × T score tile (and dP tile in the backward) is computed with
// WMMA into float fragments and stored into the warp's own float region (leading dimension
// T + 4); lanes 2r and 2r+1 then do row r's elementwise work (mask, exp, row max / sum by a
// pair shuffle) and write P or dS as fp16 for the next products — in the backward in place
// over the float rows they came from (leading dimension 2·(T + 4) halves), after a
// __syncwarp once both lanes of the row hold their values in registers. Accumulators (O, dQ,
// dK, dV) stay in registers as fragments, CT column tiles (16·CT columns) per pass, CT a
// template parameter with one kernel per value (names end in _c<CT>_f16): forward and dQ
// take the whole head in one pass (CT = Dh/16 rounded up to 4, 8, 12 or 16), so the scores
// are computed once per tile; dK/dV holds two accumulators per column, one pass up to Dh
// 64; wider heads take separate passes over the queries, dV alone (scores only) then dK
// alone (scores and dP), each recomputing the scores (bit-identical in every pass). The
// forward rescales O row-wise by alpha = exp(m_old − m_new) through a "row index"
// accumulator fragment, loaded once from a 16 × 16 tile holding each element's row number:
// element e of any accumulator fragment belongs to row rowf.x[e], and alpha of that row is
// read from column T of the warp's float region. So the fragment element order (opaque) is never relied on:
// only load/store/fill/mma and elementwise work on x[] keyed by a fragment of the same type.
//
// Shared memory (bytes; ld = Dh + 8 halves for every fp16 tile; `ops.rs` computes the same):
//   forward:      2·ld·(16W + 2T)            Q (16W rows), K and V (T rows each)
//                 + W·16·(T + 4)·4           per-warp scores (float; column T: alpha, 1/l)
//                 + W·16·(T + 8)·2           per-warp P (fp16)
//   dkdv and dq:  2·ld·(32W + 2T)            own K,V (dkdv) or Q,dO (dq): 16W rows each;
//                                            the walked Q,dO or K,V: T rows each
//                 + W·32·(T + 4)·4           per-warp scores and dP (float; fp16 in place)
//                 + 2·T·4                    lse·log2(e) and delta of the query tile (dkdv)
// e.g. Dh 64, W 4, T 32: forward 32 768, backward 46 336.
//
// Invariants: Dh is a multiple of 16 and at most 256 (the launcher checks), so every fp16
// row (D·2 bytes) and head offset (h·Dh·2) is a multiple of 32 bytes and a row is Dh/8
// 16-byte chunks; cp.async copies (and vector stores of results) are used when the base
// pointer is 16-byte aligned (scalar otherwise). Tq and Tk are arbitrary: padded rows are
// zero in shared memory and masked (forward, dq) or have lse = +inf, i.e. P = 0 (dkdv).
// Every WMMA pointer is 32-byte aligned and every ldm a multiple of 16 bytes (region sizes
// are multiples of 32 bytes).
// Reductions have a fixed order (pair shuffles, mma in k order, tiles in index order).
#include "common.cuh"

namespace chingu {
namespace attn {

/// 16-row sub-tiles of a walked tile (T ≤ 32).
constexpr int MAX_SUB = 2;
/// Walked-tile columns a lane handles (T/2 ≤ 16).
constexpr int MAX_LANE_COLS = 16;
using chingu::LOG2E;
constexpr float LN2 = 0.6931471805599453f;

using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half,
                                     nvcuda::wmma::row_major>;
using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __half,
                                     nvcuda::wmma::row_major>;
using FragBT = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __half,
                                      nvcuda::wmma::col_major>;
using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

/// 8 floats to 8 halves at 16-byte aligned dst.
__device__ __forceinline__ void store8_aligned(__half* dst, const float* src) {
#ifdef CHINGU_EMU
    if (!aligned16(dst)) __trap();  // a GPU would fault
    for (int c = 0; c < 8; ++c) dst[c] = __float2half_rn(src[c]);
#else
    uint4 u;
    __half2* h = reinterpret_cast<__half2*>(&u);
    for (int c = 0; c < 4; ++c) h[c] = __floats2half2_rn(src[2 * c], src[2 * c + 1]);
    *reinterpret_cast<uint4*>(dst) = u;
#endif
}

/// 8 floats to 8 halves at dst (one 16-byte store when dst is aligned).
__device__ __forceinline__ void store8(__half* dst, const float* src) {
    if (aligned16(dst)) {
        store8_aligned(dst, src);
    } else {
        for (int c = 0; c < 8; ++c) dst[c] = __float2half_rn(src[c]);
    }
}

/// Rows [row0, row0 + rows) of one head (`src` points at row 0, column h·Dh; rows are
/// `width` halves apart) into a rows × Dh shared tile with leading dimension ld, one half at a
/// time (for rows not 16-byte aligned, which cp.async cannot copy); rows ≥ valid are zero. The
/// whole block takes part.
__device__ __forceinline__ void load_rows_scalar(__half* tile, const __half* src, int row0,
                                                 int rows, int valid, int width, int head_dim,
                                                 int ld) {
    for (int e = threadIdx.x; e < rows * head_dim; e += blockDim.x) {
        const int r = e / head_dim, c = e - r * head_dim;
        const int row = row0 + r;
        tile[r * ld + c] = row < valid ? src[(long long)row * width + c] : __float2half_rn(0.0f);
    }
}

/// Rows [row0, row0 + rows) of one head into a shared tile, as `load_rows_scalar`, through
/// cp.async where the rows are 16-byte aligned (width·2 and h·Dh·2 are multiples of 32, so all
/// are when `src` is; zeros for rows past `valid` too): queued, landed by the caller's
/// `cp_async_wait` and seen by every thread after the barrier that follows; unaligned rows are
/// loaded at once (plain stores, seen after that same barrier).
__device__ __forceinline__ void load_rows_async(__half* tile, const __half* src, int row0,
                                                int rows, int valid, int width, int head_dim,
                                                int ld) {
    if (!aligned16(src)) {
        load_rows_scalar(tile, src, row0, rows, valid, width, head_dim, ld);
        return;
    }
    const int chunks = head_dim >> 3;
    for (int e = threadIdx.x; e < rows * chunks; e += blockDim.x) {
        const int r = e / chunks, c = (e - r * chunks) << 3;
        const int row = row0 + r;
        const bool live = row < valid;
        chingu::cp_async16(tile + r * ld + c, live ? src + (long long)row * width + c : src, live);
    }
}

/// `load_rows_async` of the same rows of one or two tensors (`b` null for one), every
/// copy in flight at once, then waited for (in a plain loop of loads and shared-memory stores,
/// each store waits for its load, unless the compiler batches them); a barrier must follow
/// before any other thread reads them. Only where no other copies are in flight: it waits for
/// every group.
__device__ __forceinline__ void load_rows_now(__half* tile_a, const __half* a, __half* tile_b,
                                              const __half* b, int row0, int rows, int valid,
                                              int width, int head_dim, int ld) {
    load_rows_async(tile_a, a, row0, rows, valid, width, head_dim, ld);
    if (b) load_rows_async(tile_b, b, row0, rows, valid, width, head_dim, ld);
    chingu::cp_async_commit();
    chingu::cp_async_wait<0>();
}

/// The register-resident kernels' shared tiles have CT column tiles whatever the head's width:
/// rows LD = 16·CT + 8 halves apart, known at compile time, so tile addresses fold into
/// constants and every column-tile loop runs to CT without a test (the machine code of a
/// runtime bound was a branch around every product and an integer division in every copy).
/// Columns [Dh, 16·CT) are zeroed once (`zero_padding`) and never copied into, so products
/// over them add zeros and are not stored. The instance is the narrowest CT ≥ Dh/16 (ops.rs).
template <int CT>
struct Tile {
    static constexpr int LD = 16 * CT + 8;  // halves between rows
    static constexpr int CHUNKS = 2 * CT;   // 16-byte chunks of a full row
};

/// `load_rows_async` for a register-resident kernel's tile: the head's Dh/8 chunks of each row
/// (rows LD apart); the row and chunk of a copy come from a division by a constant.
template <int CT>
__device__ __forceinline__ void load_head_rows(__half* tile, const __half* src, int row0,
                                               int rows, int valid, int width, int head_dim) {
    constexpr int LD = Tile<CT>::LD, CHUNKS = Tile<CT>::CHUNKS;
    if (!aligned16(src)) {
        load_rows_scalar(tile, src, row0, rows, valid, width, head_dim, LD);
        return;
    }
    const int chunks = head_dim >> 3;
    // Copy e = threadIdx.x + i·blockDim is chunk c of row r; stepping (r, c) by blockDim's
    // (rows, chunks) with a carry costs an add or two a copy, where e / CHUNKS took ~10
    // instructions and the row's 64-bit offset as many again.
    const int step_r = blockDim.x / CHUNKS, step_c = blockDim.x - step_r * CHUNKS;
    int r = threadIdx.x / CHUNKS, c = threadIdx.x - r * CHUNKS;
    // Offset of row row0 + r, chunk c from src; a pointer is formed only for a live row.
    long long offset = (long long)(row0 + r) * width + 8 * c;
    const long long step_offset = (long long)step_r * width + 8 * step_c;
    while (r < rows) {
        const bool live = row0 + r < valid;
        // Padding columns (c ≥ chunks) are zeroed once, never copied.
        if (c < chunks)
            chingu::cp_async16(tile + r * LD + 8 * c, live ? src + offset : src, live);
        r += step_r;
        c += step_c;
        offset += step_offset;
        if (c >= CHUNKS) {
            c -= CHUNKS;
            ++r;
            offset += width - 8 * CHUNKS;
        }
    }
}

/// Zeroes columns [head_dim, 16·CT) of `rows` rows of shared tiles (rows LD apart; nothing
/// when the head is 16·CT wide). Plain stores, seen by every thread after the next barrier;
/// the tile loads never write these columns, so they stay zero for the whole block.
template <int CT>
__device__ __forceinline__ void zero_padding(__half* tiles, int rows, int head_dim) {
    constexpr int LD = Tile<CT>::LD;
    const int chunks = (16 * CT - head_dim) >> 3;  // head_dim is a multiple of 16
    for (int e = threadIdx.x; e < rows * chunks; e += blockDim.x) {
        const int r = e / chunks, c = head_dim + 8 * (e - r * chunks);
        *reinterpret_cast<uint4*>(tiles + r * LD + c) = make_uint4(0u, 0u, 0u, 0u);
    }
}

/// Two stages (see "Two stages" below): queues the two walked tiles (K and V, or Q and dO) of
/// rows `row0`.. into `stage` (the second `rows` after the first) where `queue` says so, and
/// commits the group (empty otherwise, so every step counts one group).
template <int CT>
__device__ __forceinline__ void queue_stage(__half* stage, bool queue, const __half* a,
                                            const __half* b, int row0, int rows, int valid,
                                            int width, int head_dim) {
    if (queue) {
        load_head_rows<CT>(stage, a, row0, rows, valid, width, head_dim);
        load_head_rows<CT>(stage + rows * Tile<CT>::LD, b, row0, rows, valid, width, head_dim);
    }
    chingu::cp_async_commit();
}

/// A walked step's two tiles (K and V, or Q and dO) of rows `row0`.. in shared memory, the
/// second `rows` after the first; returns the first. One stage: loaded now into `stage0`. Two
/// (see "Two stages" below): the next step's queued into the other stage where `more`, then
/// this step's, queued a step earlier, waited for in `stage0` or `stage1` by `it`'s parity.
/// Either way a barrier must follow before any thread reads them.
template <int CT, int STAGES>
__device__ __forceinline__ __half* walked_tiles(__half* stage0, __half* stage1, int it, bool more,
                                                const __half* a, const __half* b, int row0,
                                                int rows, int valid, int width, int head_dim) {
    if (STAGES == 2) {
        __half* const now = (it & 1) ? stage1 : stage0;
        queue_stage<CT>((it & 1) ? stage0 : stage1, more, a, b, row0 + rows, rows, valid, width,
                        head_dim);
        chingu::cp_async_wait<1>();
        return now;
    }
    queue_stage<CT>(stage0, true, a, b, row0, rows, valid, width, head_dim);
    chingu::cp_async_wait<0>();
    return stage0;
}

/// The "row index" fragment: element e of any accumulator fragment lies in row rowf.x[e].
/// Built through the warp's own float scratch (16 × 16, leading dimension lds).
__device__ __forceinline__ void row_index_fragment(FragC& rowf, float* scratch, int lds) {
    const int lane = threadIdx.x & 31;
    for (int e = lane; e < 256; e += 32) scratch[(e >> 4) * lds + (e & 15)] = (float)(e >> 4);
    __syncwarp();
    nvcuda::wmma::load_matrix_sync(rowf, scratch, lds, nvcuda::wmma::mem_row_major);
    __syncwarp();
}

/// Writes accumulator `acc` (16 × 16) to rows row0..row0+16 of `dst` (pointing at the tile's
/// first column; rows `width` halves apart) through the warp's float scratch: lane (r, hh)
/// writes row r, columns hh·8..hh·8+8, when row0 + r < rows; rows ≥ zero_from get zeros.
__device__ __forceinline__ void write_tile(__half* dst, const FragC& acc, float* scratch,
                                          int lds, int row0, int rows, int zero_from,
                                          int width) {
    const int lane = threadIdx.x & 31, r = lane >> 1, hh = lane & 1;
    nvcuda::wmma::store_matrix_sync(scratch, acc, lds, nvcuda::wmma::mem_row_major);
    __syncwarp();
    const int row = row0 + r;
    if (row < rows) {
        float vals[8];
        for (int c = 0; c < 8; ++c) vals[c] = row < zero_from ? scratch[r * lds + hh * 8 + c] : 0.0f;
        store8(dst + (long long)row * width + hh * 8, vals);
    }
    __syncwarp();
}

/// n floats (n a multiple of 4, at most MAX_LANE_COLS) from 16-byte aligned shared memory.
__device__ __forceinline__ void read_floats(float* dst, const float* src, int n) {
    for (int c = 0; c < MAX_LANE_COLS; c += 4) {
        if (c >= n) break;
#ifdef CHINGU_EMU
        if (!aligned16(src + c)) __trap();  // a GPU would fault
#endif
        const float4 f = *reinterpret_cast<const float4*>(src + c);
        dst[c] = f.x;
        dst[c + 1] = f.y;
        dst[c + 2] = f.z;
        dst[c + 3] = f.w;
    }
}

/// n floats (n a multiple of 8, at most MAX_LANE_COLS) to fp16 at 16-byte aligned dst.
__device__ __forceinline__ void write_halves(__half* dst, const float* src, int n) {
    for (int c = 0; c < MAX_LANE_COLS; c += 8) {
        if (c >= n) break;
        store8_aligned(dst + c, src + c);
    }
}

__device__ __forceinline__ bool sees(int i, int j, int kl, int causal, int q_offset) {
    return j < kl && (!causal || j <= q_offset + i);
}

/// For kernels that own query rows and walk keys: keys [0, block) are visible to some query of
/// the block's rows [q0, q0 + rows), keys [0, warp) to some of the warp's [wq0, wq0 + 16)
/// (0 for a warp wholly past q_len).
struct KeyLimits {
    int block, warp;
};

__device__ __forceinline__ KeyLimits key_limits(int kl, int causal, int q_offset, int q_len,
                                                int q0, int rows, int wq0) {
    KeyLimits lim{kl, kl};
    if (causal) {
        lim.block = min(kl, q_offset + min(q0 + rows, q_len));
        lim.warp = min(kl, q_offset + min(wq0 + 16, q_len));
    }
    if (wq0 >= q_len) lim.warp = 0;
    return lim;
}

/// For kernels that own keys and walk queries in tiles of `tile`: the first tile (`block`)
/// with a query that sees a key of the block's [k0, …) — none when the block is past
/// key_len; with a causal mask, the tile of the first query i with k0 ≤ q_offset + i — and
/// the first query (`warp`) that sees one of the warp's keys [wk0, wk0 + 16); q_len when
/// none does.
struct QueryStart {
    int block, warp;
};

__device__ __forceinline__ QueryStart query_start(int kl, int causal, int q_offset, int q_len,
                                                  int k0, int wk0, int tile) {
    QueryStart start{0, 0};
    if (k0 >= kl) start.block = q_len;
    else if (causal && k0 > q_offset) start.block = (k0 - q_offset) / tile * tile;
    if (wk0 >= kl) start.warp = q_len;
    else if (causal && wk0 > q_offset) start.warp = wk0 - q_offset;
    return start;
}

/// Query i's log-sum-exp in log2 units and its D (dO·O) for the backward: +inf and 0 for a
/// padding row (i ≥ q_len) or a row without a visible key (lse −inf), so that P = 0 there.
__device__ __forceinline__ void query_stats(const float* lse, const float* delta, long long base,
                                            int i, int q_len, float& lse2, float& d) {
    const float ls = i < q_len ? lse[base + i] : chingu::neg_inf();
    lse2 = ls != chingu::neg_inf() ? ls * LOG2E : pos_inf();
    d = i < q_len ? delta[base + i] : 0.0f;
}

/// query_stats of queries [q0, q0 + tile) into shared `lse_s` and `delta_s` (whole block).
__device__ __forceinline__ void stage_query_stats(float* lse_s, float* delta_s, const float* lse,
                                                  const float* delta, long long base, int q0,
                                                  int tile, int q_len) {
    for (int c = threadIdx.x; c < tile; c += blockDim.x)
        query_stats(lse, delta, base, q0 + c, q_len, lse_s[c], delta_s[c]);
}

/// Where one (batch b, head h) block's data lives: the element offsets of its first query row
/// and first key row in the `[batch·len, heads·head_dim]` tensors (rows `width` apart), of its
/// per-query statistics (lse, D), its number of visible keys, and the softmax scale in log2
/// units (for exp2) and plain.
struct Head {
    long long q_base, k_base, stat_base;
    int width, kl;
    float sc, scale;
};

__device__ __forceinline__ Head head_of(const int* key_len, int b, int h, int heads, int head_dim,
                                        int q_len, int k_len) {
    Head hd;
    hd.width = heads * head_dim;
    hd.q_base = (long long)b * q_len * hd.width + (long long)h * head_dim;
    hd.k_base = (long long)b * k_len * hd.width + (long long)h * head_dim;
    hd.stat_base = ((long long)b * heads + h) * q_len;
    hd.kl = key_len[b];
    hd.sc = LOG2E / sqrtf((float)head_dim);
    hd.scale = 1.0f / sqrtf((float)head_dim);
    return hd;
}

}  // namespace attn
}  // namespace chingu

#define CHINGU_ATTN_FORWARD_PARAMS                                                          \
    __half *out, float *lse, const __half *q, const __half *k, const __half *v,               \
        const int *key_len, int batch, int q_len, int k_len, int heads, int head_dim,       \
        int causal, int q_offset, int tile
#define CHINGU_ATTN_FORWARD_ARGS \
    out, lse, q, k, v, key_len, batch, q_len, k_len, heads, head_dim, causal, q_offset, tile

/// The forward body; CT = output column tiles (16 columns each) a warp accumulates per pass.
template <int CT>
__device__ __forceinline__ void attention_forward(CHINGU_ATTN_FORWARD_PARAMS) {
    using namespace chingu::attn;
    namespace wmma = nvcuda::wmma;
    CHINGU_DYNAMIC_SMEM(float4, smem);
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rows = 16 * warps;
    const int ld = head_dim + 8, lds = tile + 4, ldp = tile + 8;
    __half* qs = reinterpret_cast<__half*>(smem);
    __half* ks = qs + rows * ld;
    __half* vs = ks + tile * ld;
    float* sbase = reinterpret_cast<float*>(vs + tile * ld);
    float* sw = sbase + warp * 16 * lds;  // this warp's scores, 16 × lds
    __half* pw = reinterpret_cast<__half*>(sbase + warps * 16 * lds) + warp * 16 * ldp;

    const int q0 = blockIdx.x * rows, h = blockIdx.y, b = blockIdx.z;
    if (b >= batch) return;
    const Head hd = head_of(key_len, b, h, heads, head_dim, q_len, k_len);
    const int wq0 = q0 + 16 * warp;
    // Lanes 2r and 2r+1 own query row r of the warp: columns [hh·T/2, (hh+1)·T/2) of a tile.
    const int r = lane >> 1, hh = lane & 1, i = wq0 + r;
    const int half_cols = tile >> 1, cbeg = hh * half_cols;
    const int nsub = tile >> 4, col_tiles = head_dim >> 4;
    const KeyLimits lim = key_limits(hd.kl, causal, q_offset, q_len, q0, rows, wq0);
    float* srow = sw + r * lds;
    __half* prow = pw + r * ldp;

    load_rows_now(qs, q + hd.q_base, nullptr, nullptr, q0, rows, q_len, hd.width, head_dim, ld);
    FragC rowf;
    row_index_fragment(rowf, sw, lds);

    for (int c0 = 0; c0 < col_tiles; c0 += CT) {
        FragC o[CT];
        for (int t = 0; t < CT; ++t) wmma::fill_fragment(o[t], 0.0f);
        float m = chingu::neg_inf(), l = 0.0f;  // log2 units

        for (int k0 = 0; k0 < lim.block; k0 += tile) {
            __syncthreads();  // every warp is done with the previous K/V tile
            load_rows_now(ks, k + hd.k_base, vs, v + hd.k_base, k0, tile, hd.kl, hd.width,
                          head_dim, ld);
            __syncthreads();
            if (k0 >= lim.warp) continue;  // warp-uniform: nothing visible to this warp

            // S = Q·Kᵀ for the warp's 16 rows × T keys.
            FragC s[MAX_SUB];
            for (int kf = 0; kf < MAX_SUB; ++kf) wmma::fill_fragment(s[kf], 0.0f);
            for (int d = 0; d < col_tiles; ++d) {
                FragA fq;
                wmma::load_matrix_sync(fq, qs + 16 * warp * ld + 16 * d, ld);
                for (int kf = 0; kf < MAX_SUB; ++kf) {
                    if (kf >= nsub) break;
                    FragBT fk;
                    wmma::load_matrix_sync(fk, ks + 16 * kf * ld + 16 * d, ld);
                    wmma::mma_sync(s[kf], fq, fk, s[kf]);
                }
            }
            for (int kf = 0; kf < MAX_SUB; ++kf) {
                if (kf >= nsub) break;
                wmma::store_matrix_sync(sw + 16 * kf, s[kf], lds, wmma::mem_row_major);
            }
            __syncwarp();

            // Online softmax of row r (two lanes, fixed pair order).
            const bool masked = k0 + tile > hd.kl || (causal && k0 + tile - 1 > q_offset + wq0);
            float mx = chingu::neg_inf();
            for (int c8 = 0; c8 < MAX_LANE_COLS; c8 += 8) {
                if (c8 >= half_cols) break;
                float x[8];
                read_floats(x, srow + cbeg + c8, 8);
                for (int e = 0; e < 8; ++e)
                    if (!masked || sees(i, k0 + cbeg + c8 + e, hd.kl, causal, q_offset))
                        mx = fmaxf(mx, x[e]);
            }
            mx = fmaxf(mx, __shfl_xor_sync(chingu::FULL_MASK, mx, 1));
            const float m_new = fmaxf(m, mx * hd.sc);
            float alpha = 1.0f, sum = 0.0f;
            // 0 while m is −inf
            if (m_new != chingu::neg_inf()) alpha = chingu::exp2_approx(m - m_new);
            for (int c8 = 0; c8 < MAX_LANE_COLS; c8 += 8) {
                if (c8 >= half_cols) break;
                float x[8];
                read_floats(x, srow + cbeg + c8, 8);
                for (int e = 0; e < 8; ++e) {
                    float p = 0.0f;
                    if (m_new != chingu::neg_inf() &&
                        (!masked || sees(i, k0 + cbeg + c8 + e, hd.kl, causal, q_offset)))
                        p = chingu::exp2_approx(fmaf(x[e], hd.sc, -m_new));
                    x[e] = p;
                    sum += p;
                }
                store8_aligned(prow + cbeg + c8, x);
            }
            sum += __shfl_xor_sync(chingu::FULL_MASK, sum, 1);
            l = l * alpha + sum;
            m = m_new;
            if (hh == 0) srow[tile] = alpha;
            __syncwarp();

            // O = alpha·O + P·V.
            for (int e = 0; e < rowf.num_elements; ++e) {
                const float a = sw[(int)rowf.x[e] * lds + tile];
                for (int t = 0; t < CT; ++t) o[t].x[e] *= a;
            }
            for (int kf = 0; kf < MAX_SUB; ++kf) {
                if (kf >= nsub) break;
                FragA fp;
                wmma::load_matrix_sync(fp, pw + 16 * kf, ldp);
                for (int t = 0; t < CT; ++t) {
                    const int n = c0 + t;
                    if (n >= col_tiles) break;
                    FragB fv;
                    wmma::load_matrix_sync(fv, vs + 16 * kf * ld + 16 * n, ld);
                    wmma::mma_sync(o[t], fp, fv, o[t]);
                }
            }
        }

        // out = O / l (0 for a row with no visible key), through the warp's scratch.
        __syncwarp();
        if (hh == 0) srow[tile] = l > 0.0f ? 1.0f / l : 0.0f;
        __syncwarp();
        for (int e = 0; e < rowf.num_elements; ++e) {
            const float a = sw[(int)rowf.x[e] * lds + tile];
            for (int t = 0; t < CT; ++t) o[t].x[e] *= a;
        }
        for (int t = 0; t < CT; ++t) {
            const int n = c0 + t;
            if (n >= col_tiles) break;
            write_tile(out + hd.q_base + 16 * n, o[t], sw, lds, wq0, q_len, q_len, hd.width);
        }
        if (c0 == 0 && hh == 0 && i < q_len)
            lse[((long long)b * heads + h) * q_len + i] =
                l > 0.0f ? m * LN2 + logf(l) : chingu::neg_inf();
    }
}

/// Lanes a (row, head) item of attention_backward_delta_f16 takes: one per 8 columns of the
/// head, rounded up to a power of two (head_dim a multiple of 16, at most 256: 2 to 32).
__device__ __forceinline__ int delta_group(int head_dim) {
    int group = 1;
    while (group < head_dim / 8) group <<= 1;
    return group;
}

/// (Row, head) items a lane group of attention_backward_delta_f16 takes, their loads all
/// issued before any arithmetic (ops.rs sizes the grid by it).
#define CHINGU_DELTA_ITEMS 4

/// delta[b, h, i] = Σ_d d_out·out over head h of row b·Tq + i. A group of `delta_group` lanes
/// per (row, head), each lane 8 columns (two 128-bit loads; every head's columns start
/// 16-byte aligned), summed within the group by shuffles: 32 / group items a warp at a time,
/// CHINGU_DELTA_ITEMS times over with every load first (GPU run 20: a warp an item and 16-bit
/// loads took 30 µs a call for seed-768, ~1.9 TB/s; run 22, one item a group: 26–30 µs).
extern "C" __global__ void attention_backward_delta_f16(float* delta, const __half* d_out,
                                                        const __half* out, int batch,
                                                        int q_len, int heads, int head_dim) {
    const int lane = threadIdx.x & 31, group = delta_group(head_dim);
    const long long warp = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int vector = lane % group;
    const long long items = (long long)batch * q_len * heads;
    // The warp's items: (32 / group) at a time, CHINGU_DELTA_ITEMS times over.
    const long long per_pass = 32 / group;
    const long long first = warp * per_pass * CHINGU_DELTA_ITEMS + lane / group;
    // Held packed (4 registers a vector) until used.
    chingu::Half8 g[CHINGU_DELTA_ITEMS], o[CHINGU_DELTA_ITEMS];
#pragma unroll
    for (int k = 0; k < CHINGU_DELTA_ITEMS; ++k) {
        const long long item = first + k * per_pass;
        if (item < items && vector < head_dim / 8) {
            // Item (row, h) starts at (row·H + h)·Dh = item·Dh.
            const long long at = item * head_dim + 8 * vector;
            g[k] = chingu::load_half8_packed(d_out + at);
            o[k] = chingu::load_half8_packed(out + at);
        }
    }
#pragma unroll
    for (int k = 0; k < CHINGU_DELTA_ITEMS; ++k) {
        const long long item = first + k * per_pass;
        float s = 0.0f;
        if (item < items && vector < head_dim / 8) {
            float gv[8], ov[8];
            chingu::unpack_half8(gv, g[k]);
            chingu::unpack_half8(ov, o[k]);
#pragma unroll
            for (int e = 0; e < 8; ++e) s += gv[e] * ov[e];
        }
        // Every lane takes part in the shuffles (items past the end add zeros).
        for (int offset = group / 2; offset > 0; offset >>= 1)
            s += __shfl_xor_sync(chingu::FULL_MASK, s, offset);
        if (vector == 0 && item < items) {
            const long long row = item / heads;
            const int h = (int)(item - row * heads);
            const long long b = row / q_len, i = row - b * q_len;
            delta[(b * heads + h) * q_len + i] = s;
        }
    }
}

#define CHINGU_ATTN_DKDV_PARAMS                                                             \
    __half *dk, __half *dv, const __half *d_out, const __half *q, const __half *k,            \
        const __half *v, const float *lse, const float *delta, const int *key_len, int batch, \
        int q_len, int k_len, int heads, int head_dim, int causal, int q_offset, int tile
#define CHINGU_ATTN_DKDV_ARGS                                                               \
    dk, dv, d_out, q, k, v, lse, delta, key_len, batch, q_len, k_len, heads, head_dim, causal, \
        q_offset, tile

/// Which gradients a dK/dV body accumulates (bits).
constexpr int GRAD_DV = 1, GRAD_DK = 2;

/// The dK/dV body; CT = column tiles of each wanted gradient a warp accumulates per pass.
/// GRADS = GRAD_DV | GRAD_DK: both (scores and dP once per tile for the two); wide heads,
/// whose two accumulators would not fit in registers, run a GRAD_DV body (scores only) and
/// then a GRAD_DK body (scores and dP). Compile-time, so each body is straight-line code.
template <int CT, int GRADS>
__device__ __forceinline__ void attention_backward_dkdv(CHINGU_ATTN_DKDV_PARAMS) {
    using namespace chingu::attn;
    namespace wmma = nvcuda::wmma;
    CHINGU_DYNAMIC_SMEM(float4, smem);
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rows = 16 * warps;
    const int ld = head_dim + 8, lds = tile + 4, ldh = 2 * lds;
    __half* ks = reinterpret_cast<__half*>(smem);
    __half* vs = ks + rows * ld;
    __half* qs = vs + rows * ld;
    __half* dos = qs + tile * ld;
    float* fbase = reinterpret_cast<float*>(dos + tile * ld);
    float* sw = fbase + warp * 32 * lds;  // Sᵀ (16 keys × T queries), then Pᵀ in fp16
    float* dpw = sw + 16 * lds;           // dPᵀ, then dSᵀ in fp16
    float* lse_s = fbase + warps * 32 * lds;
    float* delta_s = lse_s + tile;

    const int k0 = blockIdx.x * rows, h = blockIdx.y, b = blockIdx.z;
    if (b >= batch) return;
    const Head hd = head_of(key_len, b, h, heads, head_dim, q_len, k_len);
    const int wk0 = k0 + 16 * warp;
    // Lanes 2r and 2r+1 own key row r of the warp: columns [hh·T/2, (hh+1)·T/2) of a tile.
    const int r = lane >> 1, hh = lane & 1, j = wk0 + r;
    const int half_cols = tile >> 1, cbeg = hh * half_cols;
    const int nsub = tile >> 4, col_tiles = head_dim >> 4;

    const QueryStart start = query_start(hd.kl, causal, q_offset, q_len, k0, wk0, tile);

    load_rows_now(ks, k + hd.k_base, vs, v + hd.k_base, k0, rows, hd.kl, hd.width, head_dim, ld);
    float* srow = sw + r * lds;
    float* dprow = dpw + r * lds;
    __half* prow = reinterpret_cast<__half*>(sw) + r * ldh;
    __half* dsrow = reinterpret_cast<__half*>(dpw) + r * ldh;

    // Accumulator 0 is dV when wanted; accumulator ACCS − 1 is dK when wanted.
    constexpr bool want_dv = (GRADS & GRAD_DV) != 0, want_dk = (GRADS & GRAD_DK) != 0;
    constexpr int ACCS = want_dv && want_dk ? 2 : 1;
    for (int c0 = 0; c0 < col_tiles; c0 += CT) {
        FragC acc[ACCS][CT];
        for (int a = 0; a < ACCS; ++a)
            for (int t = 0; t < CT; ++t) wmma::fill_fragment(acc[a][t], 0.0f);

        for (int q0 = start.block; q0 < q_len; q0 += tile) {
            __syncthreads();  // every warp is done with the previous Q/dO tile
            load_rows_now(qs, q + hd.q_base, dos, d_out + hd.q_base, q0, tile, q_len, hd.width,
                          head_dim, ld);
            stage_query_stats(lse_s, delta_s, lse, delta, hd.stat_base, q0, tile, q_len);
            __syncthreads();
            if (q0 + tile <= start.warp) continue;  // warp-uniform: no query sees its keys

            // Sᵀ = K·Qᵀ and (for dK) dPᵀ = V·dOᵀ for the warp's 16 keys × T queries.
            FragC s[MAX_SUB], dp[MAX_SUB];
            for (int kf = 0; kf < MAX_SUB; ++kf) {
                wmma::fill_fragment(s[kf], 0.0f);
                wmma::fill_fragment(dp[kf], 0.0f);
            }
            for (int d = 0; d < col_tiles; ++d) {
                FragA fk, fv;
                wmma::load_matrix_sync(fk, ks + 16 * warp * ld + 16 * d, ld);
                if (want_dk) wmma::load_matrix_sync(fv, vs + 16 * warp * ld + 16 * d, ld);
                for (int kf = 0; kf < MAX_SUB; ++kf) {
                    if (kf >= nsub) break;
                    FragBT fb;
                    wmma::load_matrix_sync(fb, qs + 16 * kf * ld + 16 * d, ld);
                    wmma::mma_sync(s[kf], fk, fb, s[kf]);
                    if (!want_dk) continue;
                    wmma::load_matrix_sync(fb, dos + 16 * kf * ld + 16 * d, ld);
                    wmma::mma_sync(dp[kf], fv, fb, dp[kf]);
                }
            }
            for (int kf = 0; kf < MAX_SUB; ++kf) {
                if (kf >= nsub) break;
                wmma::store_matrix_sync(sw + 16 * kf, s[kf], lds, wmma::mem_row_major);
                if (want_dk)
                    wmma::store_matrix_sync(dpw + 16 * kf, dp[kf], lds, wmma::mem_row_major);
            }
            __syncwarp();

            // Pᵀ = exp(s·S − lse) (0 where masked), dSᵀ = Pᵀ∘(dPᵀ − D) (for dK), written in
            // fp16 over the float rows once both lanes of the row have read them.
            const bool masked = wk0 + 16 > hd.kl || (causal && wk0 + 15 > q_offset + q0);
            float p[MAX_LANE_COLS], ds[MAX_LANE_COLS], st[MAX_LANE_COLS];
            read_floats(p, srow + cbeg, half_cols);
            read_floats(st, lse_s + cbeg, half_cols);
            for (int jj = 0; jj < MAX_LANE_COLS; ++jj) {
                if (jj >= half_cols) break;
                p[jj] = chingu::exp2_approx(fmaf(p[jj], hd.sc, -st[jj]));
                if (masked && !sees(q0 + cbeg + jj, j, hd.kl, causal, q_offset)) p[jj] = 0.0f;
            }
            if (want_dk) {
                read_floats(ds, dprow + cbeg, half_cols);
                read_floats(st, delta_s + cbeg, half_cols);
                for (int jj = 0; jj < MAX_LANE_COLS; ++jj) {
                    if (jj >= half_cols) break;
                    ds[jj] = p[jj] * (ds[jj] - st[jj]);
                }
            }
            __syncwarp();
            write_halves(prow + cbeg, p, half_cols);
            if (want_dk) write_halves(dsrow + cbeg, ds, half_cols);
            __syncwarp();

            // dV += Pᵀ·dO, dK += dSᵀ·Q.
            for (int kf = 0; kf < MAX_SUB; ++kf) {
                if (kf >= nsub) break;
                FragA fp, fds;
                if (want_dv)
                    wmma::load_matrix_sync(fp, reinterpret_cast<__half*>(sw) + 16 * kf, ldh);
                if (want_dk)
                    wmma::load_matrix_sync(fds, reinterpret_cast<__half*>(dpw) + 16 * kf, ldh);
                for (int t = 0; t < CT; ++t) {
                    const int n = c0 + t;
                    if (n >= col_tiles) break;
                    FragB fb;
                    if (want_dv) {
                        wmma::load_matrix_sync(fb, dos + 16 * kf * ld + 16 * n, ld);
                        wmma::mma_sync(acc[0][t], fp, fb, acc[0][t]);
                    }
                    if (want_dk) {
                        wmma::load_matrix_sync(fb, qs + 16 * kf * ld + 16 * n, ld);
                        wmma::mma_sync(acc[ACCS - 1][t], fds, fb, acc[ACCS - 1][t]);
                    }
                }
            }
        }

        // Keys j < k_len are written; those ≥ key_len get zeros.
        __syncwarp();
        for (int t = 0; t < CT; ++t) {
            const int n = c0 + t;
            if (n >= col_tiles) break;
            if (want_dk) {
                for (int e = 0; e < acc[ACCS - 1][t].num_elements; ++e)
                    acc[ACCS - 1][t].x[e] *= hd.scale;
                write_tile(dk + hd.k_base + 16 * n, acc[ACCS - 1][t], sw, lds, wk0, k_len, hd.kl,
                           hd.width);
            }
            if (want_dv)
                write_tile(dv + hd.k_base + 16 * n, acc[0][t], sw, lds, wk0, k_len, hd.kl, hd.width);
        }
    }
}

#define CHINGU_ATTN_DQ_PARAMS                                                                \
    __half *dq, const __half *d_out, const __half *q, const __half *k, const __half *v,        \
        const float *lse, const float *delta, const int *key_len, int batch, int q_len,        \
        int k_len, int heads, int head_dim, int causal, int q_offset, int tile
#define CHINGU_ATTN_DQ_ARGS                                                                  \
    dq, d_out, q, k, v, lse, delta, key_len, batch, q_len, k_len, heads, head_dim, causal,     \
        q_offset, tile

/// The dQ body; CT = dQ column tiles a warp accumulates per pass.
template <int CT>
__device__ __forceinline__ void attention_backward_dq(CHINGU_ATTN_DQ_PARAMS) {
    using namespace chingu::attn;
    namespace wmma = nvcuda::wmma;
    CHINGU_DYNAMIC_SMEM(float4, smem);
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rows = 16 * warps;
    const int ld = head_dim + 8, lds = tile + 4, ldh = 2 * lds;
    __half* qs = reinterpret_cast<__half*>(smem);
    __half* dos = qs + rows * ld;
    __half* ks = dos + rows * ld;
    __half* vs = ks + tile * ld;
    float* fbase = reinterpret_cast<float*>(vs + tile * ld);
    float* sw = fbase + warp * 32 * lds;  // S (16 queries × T keys), then dS in fp16
    float* dpw = sw + 16 * lds;           // dP

    const int q0 = blockIdx.x * rows, h = blockIdx.y, b = blockIdx.z;
    if (b >= batch) return;
    const Head hd = head_of(key_len, b, h, heads, head_dim, q_len, k_len);
    const int wq0 = q0 + 16 * warp;
    // Lanes 2r and 2r+1 own query row r of the warp: columns [hh·T/2, (hh+1)·T/2) of a tile.
    const int r = lane >> 1, hh = lane & 1, i = wq0 + r;
    const int half_cols = tile >> 1, cbeg = hh * half_cols;
    const int nsub = tile >> 4, col_tiles = head_dim >> 4;
    const KeyLimits lim = key_limits(hd.kl, causal, q_offset, q_len, q0, rows, wq0);
    float lse_i, delta_i;
    query_stats(lse, delta, hd.stat_base, i, q_len, lse_i, delta_i);

    load_rows_now(qs, q + hd.q_base, dos, d_out + hd.q_base, q0, rows, q_len, hd.width, head_dim,
                  ld);
    const float* srow = sw + r * lds;
    const float* dprow = dpw + r * lds;
    __half* dsrow = reinterpret_cast<__half*>(sw) + r * ldh;

    for (int c0 = 0; c0 < col_tiles; c0 += CT) {
        FragC dq_acc[CT];
        for (int t = 0; t < CT; ++t) wmma::fill_fragment(dq_acc[t], 0.0f);

        for (int k0 = 0; k0 < lim.block; k0 += tile) {
            __syncthreads();  // every warp is done with the previous K/V tile
            load_rows_now(ks, k + hd.k_base, vs, v + hd.k_base, k0, tile, hd.kl, hd.width,
                          head_dim, ld);
            __syncthreads();
            if (k0 >= lim.warp) continue;  // warp-uniform: nothing visible to this warp

            // S = Q·Kᵀ and dP = dO·Vᵀ for the warp's 16 queries × T keys.
            FragC s[MAX_SUB], dp[MAX_SUB];
            for (int kf = 0; kf < MAX_SUB; ++kf) {
                wmma::fill_fragment(s[kf], 0.0f);
                wmma::fill_fragment(dp[kf], 0.0f);
            }
            for (int d = 0; d < col_tiles; ++d) {
                FragA fq, fdo;
                wmma::load_matrix_sync(fq, qs + 16 * warp * ld + 16 * d, ld);
                wmma::load_matrix_sync(fdo, dos + 16 * warp * ld + 16 * d, ld);
                for (int kf = 0; kf < MAX_SUB; ++kf) {
                    if (kf >= nsub) break;
                    FragBT fb;
                    wmma::load_matrix_sync(fb, ks + 16 * kf * ld + 16 * d, ld);
                    wmma::mma_sync(s[kf], fq, fb, s[kf]);
                    wmma::load_matrix_sync(fb, vs + 16 * kf * ld + 16 * d, ld);
                    wmma::mma_sync(dp[kf], fdo, fb, dp[kf]);
                }
            }
            for (int kf = 0; kf < MAX_SUB; ++kf) {
                if (kf >= nsub) break;
                wmma::store_matrix_sync(sw + 16 * kf, s[kf], lds, wmma::mem_row_major);
                wmma::store_matrix_sync(dpw + 16 * kf, dp[kf], lds, wmma::mem_row_major);
            }
            __syncwarp();

            // dS = P∘(dP − D) with P = exp(s·S − lse) (0 where masked), in fp16 over S.
            const bool masked = k0 + tile > hd.kl || (causal && k0 + tile - 1 > q_offset + wq0);
            float p[MAX_LANE_COLS], dpv[MAX_LANE_COLS];
            read_floats(p, srow + cbeg, half_cols);
            read_floats(dpv, dprow + cbeg, half_cols);
            for (int jj = 0; jj < MAX_LANE_COLS; ++jj) {
                if (jj >= half_cols) break;
                p[jj] = chingu::exp2_approx(fmaf(p[jj], hd.sc, -lse_i));
                if (masked && !sees(i, k0 + cbeg + jj, hd.kl, causal, q_offset)) p[jj] = 0.0f;
                p[jj] *= dpv[jj] - delta_i;
            }
            __syncwarp();
            write_halves(dsrow + cbeg, p, half_cols);
            __syncwarp();

            // dQ += dS·K.
            for (int kf = 0; kf < MAX_SUB; ++kf) {
                if (kf >= nsub) break;
                FragA fds;
                wmma::load_matrix_sync(fds, reinterpret_cast<__half*>(sw) + 16 * kf, ldh);
                for (int t = 0; t < CT; ++t) {
                    const int n = c0 + t;
                    if (n >= col_tiles) break;
                    FragB fk;
                    wmma::load_matrix_sync(fk, ks + 16 * kf * ld + 16 * n, ld);
                    wmma::mma_sync(dq_acc[t], fds, fk, dq_acc[t]);
                }
            }
        }

        __syncwarp();
        for (int t = 0; t < CT; ++t) {
            const int n = c0 + t;
            if (n >= col_tiles) break;
            for (int e = 0; e < dq_acc[t].num_elements; ++e) dq_acc[t].x[e] *= hd.scale;
            write_tile(dq + hd.q_base + 16 * n, dq_acc[t], sw, lds, wq0, q_len, q_len, hd.width);
        }
    }
}

// The kernels: one instance per accumulator width. Forward and dQ hold a whole head row of up
// to 16·CT columns (CT 4, 8, 12, 16: Dh ≤ 64, 128, 192, 256 in one pass, so the scores are
// computed once). dK/dV holds two accumulators per column tile, which fits the registers
// for CT 4 (Dh ≤ 64); wider heads take the split instances, dV then dK (CT 8: Dh ≤ 128 in
// one pass each, 256 in two; CT 12: Dh 144–192). A two-gradient CT 8 and a split CT 16
// spill on sm_80/86/89. Grids: (ceil(Tq/16W), H, B) for forward and dQ, (ceil(Tk/16W), H,
// B) for dK/dV; 32·W threads; `tile` = T rows per walked tile; shared memory as above.
extern "C" __global__ void attention_forward_c4_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward<4>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_c8_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward<8>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_c12_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward<12>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_c16_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward<16>(CHINGU_ATTN_FORWARD_ARGS);
}
/// dV then dK, each in one pass over the queries (a barrier between: both bodies load the
/// block's K and V rows into the same shared tiles).
template <int CT>
__device__ __forceinline__ void attention_backward_dkdv_split(CHINGU_ATTN_DKDV_PARAMS) {
    attention_backward_dkdv<CT, GRAD_DV>(CHINGU_ATTN_DKDV_ARGS);
    __syncthreads();
    attention_backward_dkdv<CT, GRAD_DK>(CHINGU_ATTN_DKDV_ARGS);
}

extern "C" __global__ void attention_backward_dkdv_c4_f16(CHINGU_ATTN_DKDV_PARAMS) {
    attention_backward_dkdv<4, GRAD_DV | GRAD_DK>(CHINGU_ATTN_DKDV_ARGS);
}
extern "C" __global__ void attention_backward_dkdv_split_c8_f16(CHINGU_ATTN_DKDV_PARAMS) {
    attention_backward_dkdv_split<8>(CHINGU_ATTN_DKDV_ARGS);
}
extern "C" __global__ void attention_backward_dkdv_split_c12_f16(CHINGU_ATTN_DKDV_PARAMS) {
    attention_backward_dkdv_split<12>(CHINGU_ATTN_DKDV_ARGS);
}
extern "C" __global__ void attention_backward_dq_c4_f16(CHINGU_ATTN_DQ_PARAMS) {
    attention_backward_dq<4>(CHINGU_ATTN_DQ_ARGS);
}
extern "C" __global__ void attention_backward_dq_c8_f16(CHINGU_ATTN_DQ_PARAMS) {
    attention_backward_dq<8>(CHINGU_ATTN_DQ_ARGS);
}
extern "C" __global__ void attention_backward_dq_c12_f16(CHINGU_ATTN_DQ_PARAMS) {
    attention_backward_dq<12>(CHINGU_ATTN_DQ_ARGS);
}
extern "C" __global__ void attention_backward_dq_c16_f16(CHINGU_ATTN_DQ_PARAMS) {
    attention_backward_dq<16>(CHINGU_ATTN_DQ_ARGS);
}

// ---------------------------------------------------------------------------------------------
// Forward with the scores in registers (the default for heads up to 64 wide; CHINGU_ATTN=mma).
//
// The same function as attention_forward (same masks, out, lse), but through mma_16816
// (common.cuh), whose register layout is documented, so nothing goes through shared memory
// but the K and V tiles: warp w owns 16 query rows; lane (g = lane/4, t = lane%4) holds rows
// g and g + 8 of every fragment. Per walked tile of BC keys:
//   S = Q·Kᵀ: BC/8 accumulators s[j] (keys 8j..8j+7), A = the warp's Q fragments, loaded
//     once into registers (qf[d], dims 16d..16d+15), B = K rows straight from shared memory
//     (b[0] = K(key 8j+g, dims 16d+2t..+1), b[1] = the same 8 dims further), two key
//     tiles' fragments a load (ldmatrix .x4);
//   online softmax on the accumulators: each lane has 2·BC/4 of its two rows' scores; row
//     max and sum are the lane's then the quad's (shuffles over lanes t = 0..3, fixed order);
//     O is rescaled per row in registers;
//   O += P·V: P's accumulators are, element for element, the A fragments of the next product
//     (s[2kk], s[2kk+1] → a[0..3] for keys 16kk..16kk+15), rounded to fp16; B = V (b[0] =
//     V(keys 16kk+2t, +1; dim 8n+g)) for each of the 2·Dh/16 n-tiles of O, two n-tiles a
//     load (ldmatrix .x4 .trans, which transposes 8 × 8 blocks on the way).
// Every fragment read from shared memory is an ldmatrix (common.cuh: four 8 × 8 blocks an
// instruction, rows LD = 16·CT + 8 halves apart, so the 8 rows of a block fall in distinct
// banks). The tile width 16·CT is fixed per instance ("Tile" above), so addresses are
// constants and the column-tile loops have no runtime bound; the exponentials are one
// MUFU.EX2 each (chingu::exp2_approx); a tile's masks are applied in a branch only the tiles
// reaching past key_len or the diagonal take. `bench/sass_loops.py` counts what that leaves.
// Two stages (STAGES = 2: the `_c<CT>s2_` kernels, chosen where they cost no occupancy,
// `ops.rs`; `CHINGU_ATTN_PIPELINE` forces): the walked tiles (K/V here and in dQ, Q/dO in
// dK/dV) live in two stages of shared memory, and while one tile is used the next one's
// copies fly (cp.async, common.cuh), so its loads hide behind the products. Per walked tile:
// a barrier (every warp is done with the other stage), the next tile queued into it and
// committed, a wait for this tile's group, a barrier (every thread's copies landed), the
// products. Before the loop: the block's own rows (Q here; Q and dO, or K and V, in the
// backward) in one group, the first walked tile in the next, and a wait for the first group
// only, so the first tile's copies fly on while the own rows are read.
// Then out = O / l and lse = m·ln 2 + log l, written by the lanes that hold them.
// Block: 4 warps (64 query rows), or 8 (128, where BC = 64; ops.rs picks); shared memory
// 2·STAGES·BC·LD halves: K and V tiles per stage (Q is staged once through the stage the
// first tile does not use, so 16·warps ≤ 2·BC). CT = Dh/16 rounded up to 2, 4, 8, 12 or 16
// with BC = 64 keys per tile, BC = 32 for CT 16 (registers: Q 4·CT, S BC/2, O 8·CT floats
// per lane); CT 16 has no two-stage instance (sm_90 spills at 255 registers).
// ---------------------------------------------------------------------------------------------
namespace chingu {
namespace attn {

// Fragments for mma_16816 from accumulators and, through ldmatrix, from shared-memory tiles
// (g = lane/4, t = lane%4; the layout is common.cuh's).

/// A = two m16n8 accumulators side by side (columns 0–7, 8–15), rounded to fp16: an
/// accumulator's elements sit where A's do, so scores feed the next product unmoved.
__device__ __forceinline__ void a_from_accumulators(unsigned (&a)[4], const float (&lo)[4],
                                                    const float (&hi)[4]) {
    a[0] = pack_half2(lo[0], lo[1]);
    a[1] = pack_half2(lo[2], lo[3]);
    a[2] = pack_half2(hi[0], hi[1]);
    a[3] = pack_half2(hi[2], hi[3]);
}

/// This lane's row address for `ldmatrix_x4` of the A fragment of the 16 × 16 block at `p`
/// (a row-major tile, rows `ld` apart): matrices (rows 0–7, cols 0–7), (8–15, 0–7),
/// (0–7, 8–15), (8–15, 8–15), so r[0..3] are a[0..3]. The same address, through
/// `ldmatrix_x4_trans`, gives the B fragments of two n-tiles of a row-major [k][n] tile at `p`
/// (keys 0–15, columns 0–7 then 8–15): r[0], r[1] for columns 0–7 and r[2], r[3] for 8–15.
__device__ __forceinline__ const __half* block16_lane(const __half* p, int ld, int lane) {
    return p + (lane & 15) * ld + 8 * (lane >> 4);
}

/// This lane's row address for `ldmatrix_x4` of the B fragments of two n-tiles of Kᵀ from K
/// rows at `p` (rows 0–7 then 8–15 of the tile, columns 0–15 of the 16 summed): r[0], r[1]
/// for rows 0–7, r[2], r[3] for rows 8–15.
__device__ __forceinline__ const __half* transposed_pair_lane(const __half* p, int ld, int lane) {
    return p + ((lane & 7) + 8 * (lane >> 4)) * ld + 8 * ((lane >> 3) & 1);
}

/// Stores an m16n8 accumulator (this lane's rows r0 = g and r1 = g + 8 of the warp, columns
/// col and col + 1) times a per-row factor into a row-major fp16 matrix (`base` = row 0,
/// rows `width` apart); rows at or past `rows` are skipped.
__device__ __forceinline__ void store_accumulator(__half* base, int width, int rows, int r0,
                                                  int r1, int col, const float (&acc)[4],
                                                  float f0, float f1) {
    if (r0 < rows) {
        __half* dst = base + (long long)r0 * width + col;
        dst[0] = __float2half_rn(acc[0] * f0);
        dst[1] = __float2half_rn(acc[1] * f0);
    }
    if (r1 < rows) {
        __half* dst = base + (long long)r1 * width + col;
        dst[0] = __float2half_rn(acc[2] * f1);
        dst[1] = __float2half_rn(acc[3] * f1);
    }
}

/// Sets to −inf the scores, in a tile of keys k0.., that this lane's query rows i0 (elements
/// 0, 1 of each accumulator) and i1 (elements 2, 3) cannot see. Only for a tile that reaches
/// past key_len or the diagonal (`masked`, warp-uniform): a branch around the whole loop,
/// which the compiler otherwise turns into selects on every score of every tile.
template <int NT>
__device__ __forceinline__ void mask_scores(float (&s)[NT][4], bool masked, int k0, int t,
                                            int i0, int i1, int kl, int causal, int q_offset) {
    if (!masked) return;
    for (int j = 0; j < NT; ++j)
        for (int e = 0; e < 4; ++e) {
            const int key = k0 + 8 * j + 2 * t + (e & 1);
            if (!sees(e < 2 ? i0 : i1, key, kl, causal, q_offset)) s[j][e] = chingu::neg_inf();
        }
}

/// One walked tile's online-softmax step on a warp's scores of keys k0.. (the m16n8
/// accumulators s, this lane's query rows i0 and i1): the masks, the rows' new maxima (the
/// lane's, then the quad's), P = exp2(s·sc − base) in place, the running maxima m and this
/// lane's share of the sums l, and O rescaled by alpha where some row's maximum moved. The
/// register-resident forward and the wgmma forward share it (their accumulators have one
/// layout).
template <int NT, int OT>
__device__ __forceinline__ void softmax_step(float (&s)[NT][4], float (&o)[OT][4], float& m0,
                                             float& m1, float& l0, float& l1, bool masked,
                                             int k0, int t, int i0, int i1, const Head& hd,
                                             int causal, int q_offset) {
    // Masks, then the rows' maxima: the lane's, then the quad's.
    mask_scores(s, masked, k0, t, i0, i1, hd.kl, causal, q_offset);
    float mx0 = chingu::neg_inf(), mx1 = chingu::neg_inf();
    for (int j = 0; j < NT; ++j) {
        mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
        mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(chingu::FULL_MASK, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(chingu::FULL_MASK, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(chingu::FULL_MASK, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(chingu::FULL_MASK, mx1, 2));
    const float n0 = fmaxf(m0, mx0 * hd.sc), n1 = fmaxf(m1, mx1 * hd.sc);
    // The exponents' bases: the new maxima, or 0 while a row has seen no key (all its
    // scores −inf), so that a masked score's exp2(−inf) is 0 with no test and nothing is
    // ever −inf − (−inf). alpha = exp2(m_old − base): 0 while m_old is −inf.
    const float base0 = n0 == chingu::neg_inf() ? 0.0f : n0;
    const float base1 = n1 == chingu::neg_inf() ? 0.0f : n1;
    const float a0 = chingu::exp2_approx(m0 - base0), a1 = chingu::exp2_approx(m1 - base1);
    float sum0 = 0.0f, sum1 = 0.0f;
    for (int j = 0; j < NT; ++j) {
        for (int e = 0; e < 4; ++e)
            s[j][e] = chingu::exp2_approx(fmaf(s[j][e], hd.sc, -(e < 2 ? base0 : base1)));
        sum0 += s[j][0] + s[j][1];
        sum1 += s[j][2] + s[j][3];
    }
    l0 = l0 * a0 + sum0;
    l1 = l1 * a1 + sum1;
    m0 = n0;
    m1 = n1;
    // O's rescale only where some row's maximum moved (alpha ≠ 1): after the first tiles it
    // rarely does, and multiplying by exactly 1 changes nothing, so skipping it keeps the
    // bits (warp-uniform vote; 4·OT multiplies a lane).
    if (__any_sync(chingu::FULL_MASK, a0 != 1.0f || a1 != 1.0f)) {
        for (int n = 0; n < OT; ++n) {
            o[n][0] *= a0;
            o[n][1] *= a0;
            o[n][2] *= a1;
            o[n][3] *= a1;
        }
    }
}

/// The end of a forward: the rows' sums over the quad (fixed order), then out = O / l (0 for
/// a row that saw no key) for the head's columns, and lse = m·ln 2 + log l, written by the
/// lanes that hold them.
template <int OT>
__device__ __forceinline__ void finish_forward(const float (&o)[OT][4], float m0, float m1,
                                               float l0, float l1, __half* out, float* lse,
                                               const Head& hd, int q_len, int i0, int i1,
                                               int t, int head_dim) {
    l0 += __shfl_xor_sync(chingu::FULL_MASK, l0, 1);
    l0 += __shfl_xor_sync(chingu::FULL_MASK, l0, 2);
    l1 += __shfl_xor_sync(chingu::FULL_MASK, l1, 1);
    l1 += __shfl_xor_sync(chingu::FULL_MASK, l1, 2);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    const int col_tiles = head_dim >> 4;
    for (int n = 0; n < OT; ++n) {
        if (n >= 2 * col_tiles) break;
        store_accumulator(out + hd.q_base, hd.width, q_len, i0, i1, 8 * n + 2 * t, o[n], inv0,
                          inv1);
    }
    if (t == 0) {
        if (i0 < q_len) lse[hd.stat_base + i0] = l0 > 0.0f ? m0 * LN2 + logf(l0) : chingu::neg_inf();
        if (i1 < q_len) lse[hd.stat_base + i1] = l1 > 0.0f ? m1 * LN2 + logf(l1) : chingu::neg_inf();
    }
}

}  // namespace attn
}  // namespace chingu

template <int CT, int BC, int STAGES>
__device__ __forceinline__ void attention_forward_mma(CHINGU_ATTN_FORWARD_PARAMS) {
    using namespace chingu::attn;
    CHINGU_DYNAMIC_SMEM(float4, smem);
    constexpr int NT = BC / 8;  // S accumulators (8 keys each)
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int rows = 16 * warps;
    if (rows > 2 * BC) __trap();  // Q is staged in one stage's K and V tiles (ops.rs checks)
    constexpr int ld = Tile<CT>::LD;
    // Stage st's K tile at stage(st), its V tile BC rows further (see "Two stages" above).
    __half* const tiles = reinterpret_cast<__half*>(smem);
    const auto stage = [&](int st) { return tiles + st * 2 * BC * ld; };
    __half* ks = stage(0);
    __half* vs = ks + BC * ld;
    // Q staged once, before the first K/V tile: in the stage that tile does not use.
    __half* qs = stage(STAGES - 1);

    const int q0 = blockIdx.x * rows, h = blockIdx.y, b = blockIdx.z;
    if (b >= batch) return;
    if (head_dim > 16 * CT || (head_dim & 15)) __trap();  // the instance's tiles hold the head
    const Head hd = head_of(key_len, b, h, heads, head_dim, q_len, k_len);
    const int wq0 = q0 + 16 * warp;
    const KeyLimits lim = key_limits(hd.kl, causal, q_offset, q_len, q0, rows, wq0);
    const int i0 = wq0 + g, i1 = wq0 + g + 8;  // this lane's two query rows

    // Q's copies (one group), then the first K/V tile's (two stages: the next group), which fly
    // on while Q's A fragments are read.
    zero_padding<CT>(tiles, STAGES * 2 * BC, head_dim);
    load_head_rows<CT>(qs, q + hd.q_base, q0, rows, q_len, hd.width, head_dim);
    chingu::cp_async_commit();
    if (STAGES == 2)
        queue_stage<CT>(ks, lim.block > 0, k + hd.k_base, v + hd.k_base, 0, BC, hd.kl,
                        hd.width, head_dim);
    chingu::cp_async_wait<STAGES - 1>();
    __syncthreads();
    unsigned qf[CT][4];
    for (int d = 0; d < CT; ++d)
        chingu::ldmatrix_x4(qf[d], block16_lane(qs + 16 * warp * ld + 16 * d, ld, lane));

    float o[2 * CT][4];
    for (int n = 0; n < 2 * CT; ++n)
        for (int e = 0; e < 4; ++e) o[n][e] = 0.0f;
    // Running max (log2 units, quad-uniform) and this lane's share of the running sum.
    float m0 = chingu::neg_inf(), m1 = chingu::neg_inf(), l0 = 0.0f, l1 = 0.0f;

    for (int k0 = 0, it = 0; k0 < lim.block; k0 += BC, ++it) {
        __syncthreads();  // every warp is done with Q (first tile) or the previous K/V tile
        ks = walked_tiles<CT, STAGES>(stage(0), stage(1), it, k0 + BC < lim.block,
                                      k + hd.k_base, v + hd.k_base, k0, BC, hd.kl, hd.width,
                                      head_dim);
        vs = ks + BC * ld;
        __syncthreads();
        if (k0 >= lim.warp) continue;  // warp-uniform: nothing visible to this warp

        float s[NT][4];
        for (int j = 0; j < NT; ++j)
            for (int e = 0; e < 4; ++e) s[j][e] = 0.0f;
        for (int d = 0; d < CT; ++d) {
            for (int j = 0; j < NT; j += 2) {
                unsigned bk[4];
                chingu::ldmatrix_x4(bk, transposed_pair_lane(ks + 8 * j * ld + 16 * d, ld, lane));
                const unsigned b0[2] = {bk[0], bk[1]}, b1[2] = {bk[2], bk[3]};
                chingu::mma_16816(s[j], qf[d], b0, s[j]);
                chingu::mma_16816(s[j + 1], qf[d], b1, s[j + 1]);
            }
        }

        const bool masked = k0 + BC > hd.kl || (causal && k0 + BC - 1 > q_offset + wq0);
        softmax_step(s, o, m0, m1, l0, l1, masked, k0, t, i0, i1, hd, causal, q_offset);

        // O += P·V, 16 keys per product; V's B fragments two n-tiles a load.
        for (int kk = 0; kk < NT / 2; ++kk) {
            unsigned pa[4];
            a_from_accumulators(pa, s[2 * kk], s[2 * kk + 1]);
            const __half* vr = block16_lane(vs + 16 * kk * ld, ld, lane);
            for (int n = 0; n < 2 * CT; n += 2) {
                unsigned bv[4];
                chingu::ldmatrix_x4_trans(bv, vr + 8 * n);
                const unsigned b0[2] = {bv[0], bv[1]}, b1[2] = {bv[2], bv[3]};
                chingu::mma_16816(o[n], pa, b0, o[n]);
                chingu::mma_16816(o[n + 1], pa, b1, o[n + 1]);
            }
        }
    }

    if (STAGES == 2) chingu::cp_async_wait<0>();  // (the last group is empty: nothing in flight)
    finish_forward(o, m0, m1, l0, l1, out, lse, hd, q_len, i0, i1, t, head_dim);
}

extern "C" __global__ void attention_forward_mma_c2_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward_mma<2, 64, 1>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_mma_c2s2_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward_mma<2, 64, 2>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_mma_c4_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward_mma<4, 64, 1>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_mma_c4s2_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward_mma<4, 64, 2>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_mma_c8_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward_mma<8, 64, 1>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_mma_c8s2_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward_mma<8, 64, 2>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_mma_c12_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward_mma<12, 64, 1>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_mma_c12s2_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward_mma<12, 64, 2>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_mma_c16_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward_mma<16, 32, 1>(CHINGU_ATTN_FORWARD_ARGS);
}

// ---------------------------------------------------------------------------------------------
// Forward through Hopper's warpgroup MMA (wgmma; a compute_90a build, so H100 and H200 only:
// elsewhere a trap, and `ops.rs` never launches it there). Opt-in (CHINGU_ATTN=wgmma) until
// a GPU run has timed it.
//
// The register-resident forward's algorithm — same masks, online softmax (softmax_step), out
// and lse (finish_forward) — with each product issued by a warpgroup (4 warps, 64 query
// rows; warp w of it owns rows 16w.. as before) to the tensor cores, its B operand (and for
// S its A too) read by them straight from shared memory:
//   S = Q·Kᵀ: wgmma m64n64k16 ×CT (16 dims a step), A = Q and B = K from their tiles, both
//     K-major; the 32 accumulators a lane are laid out as the MMA kernel's s[8][4];
//   O += P·V: wgmma m64n(16·CT)k16 ×4 (16 keys a step), A = P from registers (the S
//     accumulators rounded to fp16, a_from_accumulators), B = V from its tile read MN-major
//     (the transpose is the descriptor's, not an instruction's); 8·CT accumulators a lane,
//     laid out as o[2·CT][4].
// Tiles: Q (the block's rows), then per stage K and V (64 keys each); every tile is the
// head's 64-column panels of 128-byte rows with the 128-byte swizzle (16-byte chunk c of row
// r at chunk c ^ (r % 8), `swizzled_chunk`), the layouts kernels/cuda/hopper.cu's probes
// check, from a 1024-byte boundary; columns [Dh, 16·CT) and rows past the valid lengths are
// copied as zeros. Copies are 16-byte cp.async (a chunk moves whole), made visible to the
// tensor cores by fence.proxy.async before the barrier. Each group of products completes at
// a wait before its results are read (the softmax does not yet overlap the products).
// Block: 1 or 2 warpgroups (64 or 128 query rows), one stage or two (the next K/V tile's
// copies in flight while one is used), as ops.rs picks; shared memory 1024 + 32·CT·(rows +
// 128·STAGES) bytes. CT = 4, 8, 12 or 16 (N of the P·V product: 64–256).
// ---------------------------------------------------------------------------------------------
namespace chingu {
namespace attn {

/// Byte offset of 16-byte chunk `c` (columns 8c..8c+7) of row `r` in a tile of `rows` rows
/// laid out as 64-column panels of 128-byte rows with the 128-byte swizzle.
__device__ __forceinline__ unsigned swizzled_chunk(int r, int c, int rows) {
    return (unsigned)((c >> 3) * rows * 128 + (r >> 3) * 1024 + (r & 7) * 128 +
                      (((c & 7) ^ (r & 7)) << 4));
}

/// Rows [row0, row0 + rows) of one head (rows `width` apart from `src`, 16-byte aligned) into
/// a swizzled tile, 16·CT columns: cp.async copies, zeros for rows past `valid` and columns
/// past `head_dim`. The caller commits, waits, fences and synchronises.
template <int CT>
__device__ __forceinline__ void load_rows_swizzled(unsigned char* tile, const __half* src,
                                                   int row0, int rows, int valid, int width,
                                                   int head_dim) {
    constexpr int CHUNKS = 2 * CT;
    const int chunks = head_dim >> 3;
    for (int e = threadIdx.x; e < rows * CHUNKS; e += blockDim.x) {
        const int r = e / CHUNKS, c = e - r * CHUNKS;
        const bool live = row0 + r < valid && c < chunks;
        chingu::cp_async16(tile + swizzled_chunk(r, c, rows),
                           live ? src + (long long)(row0 + r) * width + 8 * c : src, live);
    }
}

}  // namespace attn
}  // namespace chingu

template <int CT, int STAGES>
__device__ __forceinline__ void attention_forward_wgmma(CHINGU_ATTN_FORWARD_PARAMS) {
#ifdef CHINGU_WGMMA
    using namespace chingu::attn;
    constexpr int BC = 64, NT = BC / 8, N = 16 * CT;
    constexpr int KV_BYTES = BC * 32 * CT;  // one K or V tile
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3, group = warp >> 2;
    const int rows = 16 * warps;
    if ((warps != 4 && warps != 8) || head_dim > N || (head_dim & 15)) __trap();
    if ((reinterpret_cast<unsigned long long>(q) | reinterpret_cast<unsigned long long>(k) |
         reinterpret_cast<unsigned long long>(v)) & 15ull)
        __trap();  // 16-byte copies (ops.rs checks)
    CHINGU_DYNAMIC_SMEM(unsigned char, raw);
    unsigned char* const qs = raw + (1024u - chingu::shared_offset(raw) % 1024u) % 1024u;
    unsigned char* const kv = qs + rows * 32 * CT;  // stage st: K at kv + 2·st·KV_BYTES, then V

    const int q0 = blockIdx.x * rows, h = blockIdx.y, b = blockIdx.z;
    if (b >= batch) return;
    const Head hd = head_of(key_len, b, h, heads, head_dim, q_len, k_len);
    const int wq0 = q0 + 16 * warp, gq0 = q0 + 64 * group;
    const KeyLimits lim = key_limits(hd.kl, causal, q_offset, q_len, q0, rows, wq0);
    // Keys some row of this warpgroup sees: its products are issued by all four warps alike,
    // so it skips a tile only as a whole.
    int group_keys = causal ? min(hd.kl, q_offset + min(gq0 + 64, q_len)) : hd.kl;
    if (gq0 >= q_len) group_keys = 0;
    const int i0 = wq0 + g, i1 = wq0 + g + 8;

    // Q (one group), then the first K/V tile (the next group; two stages only).
    load_rows_swizzled<CT>(qs, q + hd.q_base, q0, rows, q_len, hd.width, head_dim);
    chingu::cp_async_commit();
    if (STAGES == 2) {
        if (lim.block > 0) {
            load_rows_swizzled<CT>(kv, k + hd.k_base, 0, BC, hd.kl, hd.width, head_dim);
            load_rows_swizzled<CT>(kv + KV_BYTES, v + hd.k_base, 0, BC, hd.kl, hd.width,
                                   head_dim);
        }
        chingu::cp_async_commit();
    }

    float o[2 * CT][4], s[NT][4];
    for (int n = 0; n < 2 * CT; ++n)
        for (int e = 0; e < 4; ++e) o[n][e] = 0.0f;
    for (int j = 0; j < NT; ++j)
        for (int e = 0; e < 4; ++e) s[j][e] = 0.0f;
    // The products' views of the accumulators, and P's A fragments.
    float (&s_flat)[4 * NT] = reinterpret_cast<float (&)[4 * NT]>(s);
    float (&o_flat)[8 * CT] = reinterpret_cast<float (&)[8 * CT]>(o);
    unsigned pa[NT / 2][4];
    unsigned (&pa_flat)[2 * NT] = reinterpret_cast<unsigned (&)[2 * NT]>(pa);
    float m0 = chingu::neg_inf(), m1 = chingu::neg_inf(), l0 = 0.0f, l1 = 0.0f;
    // This warpgroup's Q rows: 64·group rows into every panel (8 KiB).
    const unsigned char* const my_q = qs + group * 8192;

    for (int k0 = 0, it = 0; k0 < lim.block; k0 += BC, ++it) {
        // Every warpgroup's products on the stage about to be refilled have completed (each
        // waits for its own before this barrier).
        __syncthreads();
        unsigned char* ks;
        if (STAGES == 2) {
            ks = kv + (it & 1) * 2 * KV_BYTES;
            unsigned char* const next = kv + ((it + 1) & 1) * 2 * KV_BYTES;
            if (k0 + BC < lim.block) {
                load_rows_swizzled<CT>(next, k + hd.k_base, k0 + BC, BC, hd.kl, hd.width, head_dim);
                load_rows_swizzled<CT>(next + KV_BYTES, v + hd.k_base, k0 + BC, BC, hd.kl,
                                       hd.width, head_dim);
            }
            chingu::cp_async_commit();
            chingu::cp_async_wait<1>();
        } else {
            ks = kv;
            load_rows_swizzled<CT>(ks, k + hd.k_base, k0, BC, hd.kl, hd.width, head_dim);
            load_rows_swizzled<CT>(ks + KV_BYTES, v + hd.k_base, k0, BC, hd.kl, hd.width,
                                   head_dim);
            chingu::cp_async_commit();
            chingu::cp_async_wait<0>();
        }
        chingu::fence_proxy_async_shared();  // the copies, visible to the tensor cores
        __syncthreads();
        if (k0 >= group_keys) continue;  // warpgroup-uniform
        const unsigned char* const vs = ks + KV_BYTES;

        // S = Q·Kᵀ, 16 dims a product (a panel of 64 dims holds four steps, 32 bytes apart);
        // the first overwrites S.
        chingu::wgmma_fence_operands(s_flat);
        chingu::wgmma_fence();
        for (int d = 0; d < CT; ++d) {
            const int panel = d >> 2, step = (d & 3) * 32;
            const unsigned long long qd = chingu::wgmma_desc(
                my_q + panel * rows * 128 + step, 16, 1024, chingu::WGMMA_SWIZZLE_128B);
            const unsigned long long kd = chingu::wgmma_desc(
                ks + panel * BC * 128 + step, 16, 1024, chingu::WGMMA_SWIZZLE_128B);
            chingu::wgmma_ss<BC, 0>(s_flat, qd, kd, d > 0);
        }
        chingu::wgmma_commit();
        chingu::wgmma_wait<0>();
        chingu::wgmma_fence_operands(s_flat);

        const bool masked = k0 + BC > hd.kl || (causal && k0 + BC - 1 > q_offset + wq0);
        softmax_step(s, o, m0, m1, l0, l1, masked, k0, t, i0, i1, hd, causal, q_offset);

        // O += P·V, 16 keys a product (two 8-row groups of V, 2 KiB); V's 64-dim panels are
        // BC·128 bytes apart (LBO).
        for (int kk = 0; kk < NT / 2; ++kk) a_from_accumulators(pa[kk], s[2 * kk], s[2 * kk + 1]);
        chingu::wgmma_fence_operands(o_flat);
        chingu::wgmma_fence_operands(pa_flat);
        chingu::wgmma_fence();
        for (int kk = 0; kk < NT / 2; ++kk) {
            const unsigned long long vd = chingu::wgmma_desc(vs + kk * 2048, BC * 128, 1024,
                                                             chingu::WGMMA_SWIZZLE_128B);
            chingu::wgmma_rs<N, 1>(o_flat, pa[kk], vd, true);
        }
        chingu::wgmma_commit();
        chingu::wgmma_wait<0>();
        chingu::wgmma_fence_operands(o_flat);
        chingu::wgmma_fence_operands(pa_flat);  // P's registers were the products' until now
    }

    chingu::cp_async_wait<0>();  // Q's copies too, where no tile was walked
    finish_forward(o, m0, m1, l0, l1, out, lse, hd, q_len, i0, i1, t, head_dim);
#else
    (void)out, (void)lse, (void)q, (void)k, (void)v, (void)key_len, (void)batch, (void)q_len,
        (void)k_len, (void)heads, (void)head_dim, (void)causal, (void)q_offset, (void)tile;
    __trap();
#endif
}

extern "C" __global__ void attention_forward_wgmma_c4_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward_wgmma<4, 1>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_wgmma_c4s2_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward_wgmma<4, 2>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_wgmma_c8_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward_wgmma<8, 1>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_wgmma_c8s2_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward_wgmma<8, 2>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_wgmma_c12_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward_wgmma<12, 1>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_wgmma_c12s2_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward_wgmma<12, 2>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_wgmma_c16_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward_wgmma<16, 1>(CHINGU_ATTN_FORWARD_ARGS);
}
extern "C" __global__ void attention_forward_wgmma_c16s2_f16(CHINGU_ATTN_FORWARD_PARAMS) {
    attention_forward_wgmma<16, 2>(CHINGU_ATTN_FORWARD_ARGS);
}

// ---------------------------------------------------------------------------------------------
// dQ with the scores in registers (with the forward above).
//
// The function of attention_backward_dq through mma_16816. Warp w owns 16 query rows; the
// block's Q and dO rows stay in shared memory (their A fragments are read per product, so a
// head of 192 leaves registers for dQ). Per walked tile of BC keys:
//   S = Q·Kᵀ and dP = dO·Vᵀ: BC/8 accumulators each, B fragments straight from the K and V
//     rows (as the forward's Q·Kᵀ);
//   P = exp2(s·S − lse) (0 where masked), dS = P∘(dP − D), element for element in registers;
//   dQ += dS·K: dS's accumulators are the A fragments (rounded to fp16), B = K (ldmatrix
//     .trans, as the forward's V).
// dQ = s·dQ is written by the lanes that hold it. Block: W = 4 or 8 warps (ops.rs picks);
// shared memory (2·16·W + 2·STAGES·BC)·LD halves. CT = Dh/16 rounded up (2, 4, 8, 12, 16),
// BC = 64 keys (32 for CT > 8).
// ---------------------------------------------------------------------------------------------
template <int CT, int BC, int STAGES>
__device__ __forceinline__ void attention_backward_dq_mma(CHINGU_ATTN_DQ_PARAMS) {
    using namespace chingu::attn;
    CHINGU_DYNAMIC_SMEM(float4, smem);
    constexpr int NT = BC / 8;
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int rows = 16 * warps;
    constexpr int ld = Tile<CT>::LD;
    __half* qs = reinterpret_cast<__half*>(smem);
    __half* dos = qs + rows * ld;
    // Stage st's K tile at stage(st), its V tile BC rows further (see "Two stages" above).
    const auto stage = [&](int st) { return dos + rows * ld + st * 2 * BC * ld; };
    __half* ks = stage(0);
    __half* vs = ks + BC * ld;

    const int q0 = blockIdx.x * rows, h = blockIdx.y, b = blockIdx.z;
    if (b >= batch) return;
    if (head_dim > 16 * CT || (head_dim & 15)) __trap();  // the instance's tiles hold the head
    const Head hd = head_of(key_len, b, h, heads, head_dim, q_len, k_len);
    const int wq0 = q0 + 16 * warp;
    const int col_tiles = head_dim >> 4;
    const KeyLimits lim = key_limits(hd.kl, causal, q_offset, q_len, q0, rows, wq0);
    const int i0 = wq0 + g, i1 = wq0 + g + 8;
    float lse0, lse1, delta0, delta1;
    query_stats(lse, delta, hd.stat_base, i0, q_len, lse0, delta0);
    query_stats(lse, delta, hd.stat_base, i1, q_len, lse1, delta1);

    // Q's and dO's copies (one group), then the first K/V tile's (two stages: the next group,
    // in flight on into the loop); the loop's first barrier shows Q and dO to every warp.
    zero_padding<CT>(qs, 2 * rows + STAGES * 2 * BC, head_dim);
    load_head_rows<CT>(qs, q + hd.q_base, q0, rows, q_len, hd.width, head_dim);
    load_head_rows<CT>(dos, d_out + hd.q_base, q0, rows, q_len, hd.width, head_dim);
    chingu::cp_async_commit();
    if (STAGES == 2)
        queue_stage<CT>(ks, lim.block > 0, k + hd.k_base, v + hd.k_base, 0, BC, hd.kl,
                        hd.width, head_dim);
    chingu::cp_async_wait<STAGES - 1>();
    // This lane's ldmatrix rows of the warp's Q and dO A fragments.
    const __half* qw = block16_lane(qs + 16 * warp * ld, ld, lane);
    const __half* dow = block16_lane(dos + 16 * warp * ld, ld, lane);

    float dq_acc[2 * CT][4];
    for (int n = 0; n < 2 * CT; ++n)
        for (int e = 0; e < 4; ++e) dq_acc[n][e] = 0.0f;

    for (int k0 = 0, it = 0; k0 < lim.block; k0 += BC, ++it) {
        __syncthreads();  // every warp is done with the previous K/V tile (Q, dO loaded)
        ks = walked_tiles<CT, STAGES>(stage(0), stage(1), it, k0 + BC < lim.block,
                                      k + hd.k_base, v + hd.k_base, k0, BC, hd.kl, hd.width,
                                      head_dim);
        vs = ks + BC * ld;
        __syncthreads();
        if (k0 >= lim.warp) continue;  // warp-uniform: nothing visible to this warp

        float s[NT][4], dp[NT][4];
        for (int j = 0; j < NT; ++j)
            for (int e = 0; e < 4; ++e) {
                s[j][e] = 0.0f;
                dp[j][e] = 0.0f;
            }
        for (int d = 0; d < CT; ++d) {
            unsigned qa[4], da[4];
            chingu::ldmatrix_x4(qa, qw + 16 * d);
            chingu::ldmatrix_x4(da, dow + 16 * d);
            for (int j = 0; j < NT; j += 2) {
                unsigned bk[4], bv[4];
                chingu::ldmatrix_x4(bk, transposed_pair_lane(ks + 8 * j * ld + 16 * d, ld, lane));
                chingu::ldmatrix_x4(bv, transposed_pair_lane(vs + 8 * j * ld + 16 * d, ld, lane));
                const unsigned bk0[2] = {bk[0], bk[1]}, bk1[2] = {bk[2], bk[3]};
                const unsigned bv0[2] = {bv[0], bv[1]}, bv1[2] = {bv[2], bv[3]};
                chingu::mma_16816(s[j], qa, bk0, s[j]);
                chingu::mma_16816(s[j + 1], qa, bk1, s[j + 1]);
                chingu::mma_16816(dp[j], da, bv0, dp[j]);
                chingu::mma_16816(dp[j + 1], da, bv1, dp[j + 1]);
            }
        }

        // dS = P∘(dP − D) with P = exp2(s·S − lse), 0 where masked (masked scores −inf
        // first); into s.
        const bool masked = k0 + BC > hd.kl || (causal && k0 + BC - 1 > q_offset + wq0);
        mask_scores(s, masked, k0, t, i0, i1, hd.kl, causal, q_offset);
        for (int j = 0; j < NT; ++j)
            for (int e = 0; e < 4; ++e) {
                const bool upper = e >= 2;
                const float p =
                    chingu::exp2_approx(fmaf(s[j][e], hd.sc, -(upper ? lse1 : lse0)));
                s[j][e] = p * (dp[j][e] - (upper ? delta1 : delta0));
            }

        // dQ += dS·K, 16 keys per product; K's B fragments two n-tiles a load.
        for (int kk = 0; kk < NT / 2; ++kk) {
            unsigned dsa[4];
            a_from_accumulators(dsa, s[2 * kk], s[2 * kk + 1]);
            const __half* kr = block16_lane(ks + 16 * kk * ld, ld, lane);
            for (int n = 0; n < 2 * CT; n += 2) {
                unsigned bk[4];
                chingu::ldmatrix_x4_trans(bk, kr + 8 * n);
                const unsigned b0[2] = {bk[0], bk[1]}, b1[2] = {bk[2], bk[3]};
                chingu::mma_16816(dq_acc[n], dsa, b0, dq_acc[n]);
                chingu::mma_16816(dq_acc[n + 1], dsa, b1, dq_acc[n + 1]);
            }
        }
    }

    if (STAGES == 2) chingu::cp_async_wait<0>();  // (the last group is empty: nothing in flight)
    for (int n = 0; n < 2 * CT; ++n) {
        if (n >= 2 * col_tiles) break;
        const int col = 8 * n + 2 * t;
        store_accumulator(dq + hd.q_base, hd.width, q_len, i0, i1, col, dq_acc[n], hd.scale,
                          hd.scale);
    }
}

extern "C" __global__ void attention_backward_dq_mma_c2_f16(CHINGU_ATTN_DQ_PARAMS) {
    attention_backward_dq_mma<2, 64, 1>(CHINGU_ATTN_DQ_ARGS);
}
extern "C" __global__ void attention_backward_dq_mma_c2s2_f16(CHINGU_ATTN_DQ_PARAMS) {
    attention_backward_dq_mma<2, 64, 2>(CHINGU_ATTN_DQ_ARGS);
}
extern "C" __global__ void attention_backward_dq_mma_c4_f16(CHINGU_ATTN_DQ_PARAMS) {
    attention_backward_dq_mma<4, 64, 1>(CHINGU_ATTN_DQ_ARGS);
}
extern "C" __global__ void attention_backward_dq_mma_c4s2_f16(CHINGU_ATTN_DQ_PARAMS) {
    attention_backward_dq_mma<4, 64, 2>(CHINGU_ATTN_DQ_ARGS);
}
extern "C" __global__ void attention_backward_dq_mma_c8_f16(CHINGU_ATTN_DQ_PARAMS) {
    attention_backward_dq_mma<8, 64, 1>(CHINGU_ATTN_DQ_ARGS);
}
extern "C" __global__ void attention_backward_dq_mma_c8s2_f16(CHINGU_ATTN_DQ_PARAMS) {
    attention_backward_dq_mma<8, 64, 2>(CHINGU_ATTN_DQ_ARGS);
}
extern "C" __global__ void attention_backward_dq_mma_c12_f16(CHINGU_ATTN_DQ_PARAMS) {
    attention_backward_dq_mma<12, 32, 1>(CHINGU_ATTN_DQ_ARGS);
}
extern "C" __global__ void attention_backward_dq_mma_c12s2_f16(CHINGU_ATTN_DQ_PARAMS) {
    attention_backward_dq_mma<12, 32, 2>(CHINGU_ATTN_DQ_ARGS);
}
extern "C" __global__ void attention_backward_dq_mma_c16_f16(CHINGU_ATTN_DQ_PARAMS) {
    attention_backward_dq_mma<16, 32, 1>(CHINGU_ATTN_DQ_ARGS);
}

// ---------------------------------------------------------------------------------------------
// dK and dV with the scores in registers (with the two above).
//
// The function of attention_backward_dkdv through mma_16816, transposed: warp w owns 16 keys
// (rows g and g + 8 of every fragment are this lane's keys); the block's K and V rows stay in
// shared memory (their A fragments are read per product). Per walked tile of BQ queries:
//   Sᵀ = K·Qᵀ (and, for dK, dPᵀ = V·dOᵀ): BQ/8 accumulators each, B fragments straight from
//     the Q (dO) rows;
//   Pᵀ = exp2(s·Sᵀ − lse[query]) (0 where masked; lse and D of the tile's queries staged in
//     shared memory), dSᵀ = Pᵀ∘(dPᵀ − D[query]), in registers;
//   dV += Pᵀ·dO and dK += dSᵀ·Q: the accumulators are the A fragments (rounded to fp16),
//     B = dO or Q (ldmatrix .trans).
// GRADS as the WMMA kernel: both gradients for Dh ≤ 64, else a dV body then a dK body.
// dK = s·dK; keys past key_len get zeros. Block: W = 4 or 8 warps (16·W keys; ops.rs
// picks); shared memory (2·16·W + 2·STAGES·BQ)·LD halves + 2·BQ floats. BQ = 64 queries
// for CT 2 and 4, 16 for CT 16 (so Dh 256 fits 99 KiB), else 32.
// ---------------------------------------------------------------------------------------------
template <int CT, int BQ, int GRADS, int STAGES>
__device__ __forceinline__ void attention_backward_dkdv_mma(CHINGU_ATTN_DKDV_PARAMS) {
    using namespace chingu::attn;
    CHINGU_DYNAMIC_SMEM(float4, smem);
    constexpr int NT = BQ / 8;
    constexpr bool want_dv = (GRADS & GRAD_DV) != 0, want_dk = (GRADS & GRAD_DK) != 0;
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int rows = 16 * warps;
    constexpr int ld = Tile<CT>::LD;
    __half* ks = reinterpret_cast<__half*>(smem);
    __half* vs = ks + rows * ld;
    // Stage st's Q tile at stage(st), its dO tile BQ rows further (see "Two stages" above);
    // the tile's statistics after the last stage.
    const auto stage = [&](int st) { return vs + rows * ld + st * 2 * BQ * ld; };
    __half* qs = stage(0);
    __half* dos = qs + BQ * ld;
    float* lse_s = reinterpret_cast<float*>(stage(STAGES));
    float* delta_s = lse_s + BQ;

    const int k0 = blockIdx.x * rows, h = blockIdx.y, b = blockIdx.z;
    if (b >= batch) return;
    if (head_dim > 16 * CT || (head_dim & 15)) __trap();  // the instance's tiles hold the head
    const Head hd = head_of(key_len, b, h, heads, head_dim, q_len, k_len);
    const int wk0 = k0 + 16 * warp;
    const int j0 = wk0 + g, j1 = wk0 + g + 8;  // this lane's two keys
    const int col_tiles = head_dim >> 4;

    const QueryStart start = query_start(hd.kl, causal, q_offset, q_len, k0, wk0, BQ);

    // K's and V's copies (one group), then the first Q/dO tile's (two stages: the next group, in
    // flight on into the loop); the loop's first barrier shows K and V to every warp.
    zero_padding<CT>(ks, 2 * rows + STAGES * 2 * BQ, head_dim);
    load_head_rows<CT>(ks, k + hd.k_base, k0, rows, hd.kl, hd.width, head_dim);
    load_head_rows<CT>(vs, v + hd.k_base, k0, rows, hd.kl, hd.width, head_dim);
    chingu::cp_async_commit();
    if (STAGES == 2)
        queue_stage<CT>(qs, start.block < q_len, q + hd.q_base, d_out + hd.q_base, start.block,
                        BQ, q_len, hd.width, head_dim);
    chingu::cp_async_wait<STAGES - 1>();
    // This lane's ldmatrix rows of the warp's K and V A fragments.
    const __half* kw = block16_lane(ks + 16 * warp * ld, ld, lane);
    const __half* vw = block16_lane(vs + 16 * warp * ld, ld, lane);

    constexpr int ACCS = want_dv && want_dk ? 2 : 1;  // accumulator 0: dV when wanted
    float acc[ACCS][2 * CT][4];
    for (int a = 0; a < ACCS; ++a)
        for (int n = 0; n < 2 * CT; ++n)
            for (int e = 0; e < 4; ++e) acc[a][n][e] = 0.0f;

    for (int q0 = start.block, it = 0; q0 < q_len; q0 += BQ, ++it) {
        __syncthreads();  // every warp is done with the previous Q/dO tile (K, V loaded)
        qs = walked_tiles<CT, STAGES>(stage(0), stage(1), it, q0 + BQ < q_len, q + hd.q_base,
                                      d_out + hd.q_base, q0, BQ, q_len, hd.width, head_dim);
        dos = qs + BQ * ld;
        stage_query_stats(lse_s, delta_s, lse, delta, hd.stat_base, q0, BQ, q_len);
        __syncthreads();
        if (q0 + BQ <= start.warp) continue;  // warp-uniform: no query sees its keys

        float s[NT][4], dp[NT][4];
        for (int j = 0; j < NT; ++j)
            for (int e = 0; e < 4; ++e) {
                s[j][e] = 0.0f;
                dp[j][e] = 0.0f;
            }
        for (int d = 0; d < CT; ++d) {
            unsigned ka[4];
            chingu::ldmatrix_x4(ka, kw + 16 * d);
            for (int j = 0; j < NT; j += 2) {
                unsigned bq[4];
                chingu::ldmatrix_x4(bq, transposed_pair_lane(qs + 8 * j * ld + 16 * d, ld, lane));
                const unsigned b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
                chingu::mma_16816(s[j], ka, b0, s[j]);
                chingu::mma_16816(s[j + 1], ka, b1, s[j + 1]);
            }
            if (want_dk) {
                unsigned va[4];
                chingu::ldmatrix_x4(va, vw + 16 * d);
                for (int j = 0; j < NT; j += 2) {
                    unsigned bd[4];
                    chingu::ldmatrix_x4(bd,
                                        transposed_pair_lane(dos + 8 * j * ld + 16 * d, ld, lane));
                    const unsigned b0[2] = {bd[0], bd[1]}, b1[2] = {bd[2], bd[3]};
                    chingu::mma_16816(dp[j], va, b0, dp[j]);
                    chingu::mma_16816(dp[j + 1], va, b1, dp[j + 1]);
                }
            }
        }

        // Pᵀ into s; dSᵀ = Pᵀ∘(dPᵀ − D) into dp (for dK).
        // (Masked scores set to −inf first, in a branch taken only where the warp's keys reach
        // past key_len or the diagonal.)
        const bool masked = wk0 + 16 > hd.kl || (causal && wk0 + 15 > q_offset + q0);
        if (masked) {
            for (int j = 0; j < NT; ++j)
                for (int e = 0; e < 4; ++e) {
                    const int c = 8 * j + 2 * t + (e & 1);  // query q0 + c
                    if (!sees(q0 + c, e < 2 ? j0 : j1, hd.kl, causal, q_offset))
                        s[j][e] = chingu::neg_inf();
                }
        }
        for (int j = 0; j < NT; ++j)
            for (int e = 0; e < 4; ++e) {
                const int c = 8 * j + 2 * t + (e & 1);  // query q0 + c
                const float p = chingu::exp2_approx(fmaf(s[j][e], hd.sc, -lse_s[c]));
                s[j][e] = p;
                if (want_dk) dp[j][e] = p * (dp[j][e] - delta_s[c]);
            }

        // dV += Pᵀ·dO, dK += dSᵀ·Q, 16 queries per product.
        for (int kk = 0; kk < NT / 2; ++kk) {
            // B fragments of dO and Q two n-tiles a load.
            const __half* dor = block16_lane(dos + 16 * kk * ld, ld, lane);
            const __half* qr = block16_lane(qs + 16 * kk * ld, ld, lane);
            unsigned pa[4] = {0u, 0u, 0u, 0u}, dsa[4] = {0u, 0u, 0u, 0u};
            if (want_dv) a_from_accumulators(pa, s[2 * kk], s[2 * kk + 1]);
            if (want_dk) a_from_accumulators(dsa, dp[2 * kk], dp[2 * kk + 1]);
            for (int n = 0; n < 2 * CT; n += 2) {
                if (want_dv) {
                    unsigned bd[4];
                    chingu::ldmatrix_x4_trans(bd, dor + 8 * n);
                    const unsigned b0[2] = {bd[0], bd[1]}, b1[2] = {bd[2], bd[3]};
                    chingu::mma_16816(acc[0][n], pa, b0, acc[0][n]);
                    chingu::mma_16816(acc[0][n + 1], pa, b1, acc[0][n + 1]);
                }
                if (want_dk) {
                    unsigned bq[4];
                    chingu::ldmatrix_x4_trans(bq, qr + 8 * n);
                    const unsigned b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
                    chingu::mma_16816(acc[ACCS - 1][n], dsa, b0, acc[ACCS - 1][n]);
                    chingu::mma_16816(acc[ACCS - 1][n + 1], dsa, b1, acc[ACCS - 1][n + 1]);
                }
            }
        }
    }

    if (STAGES == 2) chingu::cp_async_wait<0>();  // (the last group is empty: nothing in flight)
    // Keys j < k_len are written; those ≥ key_len get zeros (factor 0: the sums are finite).
    const float live0 = j0 < hd.kl ? 1.0f : 0.0f, live1 = j1 < hd.kl ? 1.0f : 0.0f;
    for (int n = 0; n < 2 * CT; ++n) {
        if (n >= 2 * col_tiles) break;
        const int col = 8 * n + 2 * t;
        if (want_dv)
            store_accumulator(dv + hd.k_base, hd.width, k_len, j0, j1, col, acc[0][n], live0,
                              live1);
        if (want_dk)
            store_accumulator(dk + hd.k_base, hd.width, k_len, j0, j1, col, acc[ACCS - 1][n],
                              live0 * hd.scale, live1 * hd.scale);
    }
}

/// dV then dK (a barrier between: both bodies stage the block's K and V rows; with two
/// stages, the first body has waited for all its copies, and the second queues its first tile
/// only after the barrier, when no warp reads the first body's tiles any more).
template <int CT, int BQ, int STAGES>
__device__ __forceinline__ void attention_backward_dkdv_mma_split(CHINGU_ATTN_DKDV_PARAMS) {
    attention_backward_dkdv_mma<CT, BQ, GRAD_DV, STAGES>(CHINGU_ATTN_DKDV_ARGS);
    __syncthreads();
    attention_backward_dkdv_mma<CT, BQ, GRAD_DK, STAGES>(CHINGU_ATTN_DKDV_ARGS);
}

extern "C" __global__ void attention_backward_dkdv_mma_c2_f16(CHINGU_ATTN_DKDV_PARAMS) {
    attention_backward_dkdv_mma<2, 64, GRAD_DV | GRAD_DK, 1>(CHINGU_ATTN_DKDV_ARGS);
}
extern "C" __global__ void attention_backward_dkdv_mma_c2s2_f16(CHINGU_ATTN_DKDV_PARAMS) {
    attention_backward_dkdv_mma<2, 64, GRAD_DV | GRAD_DK, 2>(CHINGU_ATTN_DKDV_ARGS);
}
extern "C" __global__ void attention_backward_dkdv_mma_c4_f16(CHINGU_ATTN_DKDV_PARAMS) {
    attention_backward_dkdv_mma<4, 64, GRAD_DV | GRAD_DK, 1>(CHINGU_ATTN_DKDV_ARGS);
}
extern "C" __global__ void attention_backward_dkdv_mma_c4s2_f16(CHINGU_ATTN_DKDV_PARAMS) {
    attention_backward_dkdv_mma<4, 64, GRAD_DV | GRAD_DK, 2>(CHINGU_ATTN_DKDV_ARGS);
}
extern "C" __global__ void attention_backward_dkdv_mma_split_c8_f16(CHINGU_ATTN_DKDV_PARAMS) {
    attention_backward_dkdv_mma_split<8, 32, 1>(CHINGU_ATTN_DKDV_ARGS);
}
extern "C" __global__ void attention_backward_dkdv_mma_split_c8s2_f16(CHINGU_ATTN_DKDV_PARAMS) {
    attention_backward_dkdv_mma_split<8, 32, 2>(CHINGU_ATTN_DKDV_ARGS);
}
extern "C" __global__ void attention_backward_dkdv_mma_split_c12_f16(CHINGU_ATTN_DKDV_PARAMS) {
    attention_backward_dkdv_mma_split<12, 32, 1>(CHINGU_ATTN_DKDV_ARGS);
}
extern "C" __global__ void attention_backward_dkdv_mma_split_c12s2_f16(CHINGU_ATTN_DKDV_PARAMS) {
    attention_backward_dkdv_mma_split<12, 32, 2>(CHINGU_ATTN_DKDV_ARGS);
}
extern "C" __global__ void attention_backward_dkdv_mma_split_c16_f16(CHINGU_ATTN_DKDV_PARAMS) {
    attention_backward_dkdv_mma_split<16, 16, 1>(CHINGU_ATTN_DKDV_ARGS);
}
extern "C" __global__ void attention_backward_dkdv_mma_split_c16s2_f16(CHINGU_ATTN_DKDV_PARAMS) {
    attention_backward_dkdv_mma_split<16, 16, 2>(CHINGU_ATTN_DKDV_ARGS);
}

// elementwise.cu — memory-bound one-pass ops over flat buffers of `n` elements.
//
// casts fp16↔fp32; GELU (tanh approximation, written as x·σ(2u) like the CPU backend) and
// ReLU forward/backward; `acc += x` (residual, and fp32 gradient accumulation);
// `buf *= factor`; bias add over rows and the bias gradient (fp32, accumulated: fixed row
// chunks per column, then the chunks in order — in one launch where tiled, the tile's last
// block, found by an atomic counter, adding the chunks; else in two); host values put in
// device memory by a launch's own parameters (`fill_u64_list`).
// Every kernel is grid-stride, so any grid size is correct; fp16 values are read, computed
// in fp32 and rounded once (round-to-nearest-even) on store.
#include "common.cuh"

#define GRID_STRIDE(i, n) \
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += gridDim.x * blockDim.x)

extern "C" __global__ void cast_f32_to_f16(__half* out, const float* in, int n) {
    GRID_STRIDE(i, n) out[i] = __float2half_rn(in[i]);
}

extern "C" __global__ void cast_f16_to_f32(float* out, const __half* in, int n) {
    GRID_STRIDE(i, n) out[i] = __half2float(in[i]);
}

// 2·sqrt(2/π) and GELU's cubic coefficient.
#define GELU_S2 1.5957691216057308f
#define GELU_C 0.044715f

extern "C" __global__ void gelu_forward_f16(__half* y, const __half* x, int n) {
    GRID_STRIDE(i, n) {
        const float v = __half2float(x[i]);
        const float two_u = GELU_S2 * (v + GELU_C * v * v * v);
        y[i] = __float2half_rn(v / (1.0f + expf(-two_u)));
    }
}

extern "C" __global__ void gelu_backward_f16(__half* dx, const __half* dy, const __half* x, int n) {
    GRID_STRIDE(i, n) {
        const float v = __half2float(x[i]);
        const float sig = 1.0f / (1.0f + expf(-(GELU_S2 * (v + GELU_C * v * v * v))));
        const float d = sig + v * sig * (1.0f - sig) * GELU_S2 * (1.0f + 3.0f * GELU_C * v * v);
        dx[i] = __float2half_rn(__half2float(dy[i]) * d);
    }
}

extern "C" __global__ void relu_forward_f16(__half* y, const __half* x, int n) {
    GRID_STRIDE(i, n) {
        const float v = __half2float(x[i]);
        y[i] = __float2half_rn(v > 0.0f ? v : 0.0f);
    }
}

extern "C" __global__ void relu_backward_f16(__half* dx, const __half* dy, const __half* x, int n) {
    GRID_STRIDE(i, n) dx[i] = __half2float(x[i]) > 0.0f ? dy[i] : __float2half_rn(0.0f);
}

extern "C" __global__ void add_assign_f16(__half* acc, const __half* x, int n) {
    GRID_STRIDE(i, n) acc[i] = __float2half_rn(__half2float(acc[i]) + __half2float(x[i]));
}

/// `acc += x` in fp32 (gradient accumulation across micro-batches).
extern "C" __global__ void add_assign_f32(float* acc, const float* x, int n) {
    GRID_STRIDE(i, n) acc[i] += x[i];
}

extern "C" __global__ void scale_f16(__half* buf, float factor, int n) {
    GRID_STRIDE(i, n) buf[i] = __float2half_rn(__half2float(buf[i]) * factor);
}

extern "C" __global__ void scale_f32(float* buf, float factor, int n) {
    GRID_STRIDE(i, n) buf[i] *= factor;
}

// Values a `fill_u64_list` launch carries in its parameters (1,920 bytes: kernel parameters
// may take 4 KiB on every architecture we build for). `ops::U64_LIST` must equal it.
#define CHINGU_U64_LIST 240
struct U64List {
    unsigned long long v[CHINGU_U64_LIST];
};

// `out[i] = list.v[i]` for `i < n` (n ≤ CHINGU_U64_LIST): host values put in device memory in
// stream order by the launch itself, so the host waits for nothing (a plain copy from host
// memory would wait for the stream): the matrix addresses of a pointer-array batch of
// products.
extern "C" __global__ void fill_u64_list(unsigned long long* out, U64List list, int n) {
    GRID_STRIDE(i, n) out[i] = list.v[i];
}

/// y[r, c] += b[c] over `rows × cols`.
extern "C" __global__ void bias_add_f16(__half* y, const __half* b, int rows, int cols) {
    GRID_STRIDE(i, rows * cols) {
        const int c = i % cols;
        y[i] = __float2half_rn(__half2float(y[i]) + __half2float(b[c]));
    }
}

/// Bias gradient, pass 1 of 2: block (x, y) sums rows y·chunk .. min((y+1)·chunk, rows) of
/// its columns in row order into partials[y, c] (adjacent threads read adjacent columns, so
/// every row read is coalesced). The launcher fixes `chunk` from `rows` alone, so the
/// summation order depends on the shape only; grid.y spreads the rows over the whole GPU.
/// Pass 2 is `column_sum_f32` (reduce.cu).
extern "C" __global__ void bias_backward_partial_f16(float* partials, const __half* dy, int rows,
                                                     int cols, int chunk) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const int first = blockIdx.y * chunk;
    const int last = min(first + chunk, rows);
    float sum = 0.0f;
    for (int r = first; r < last; ++r) sum += __half2float(dy[(long long)r * cols + c]);
    partials[(long long)blockIdx.y * cols + c] = sum;
}

/// The bias gradient in one launch over tiles (cols a multiple of 8, dy 16-byte aligned; block
/// (8, 32)): block (x, y) sums rows y·chunk .. min((y+1)·chunk, rows) of columns 64·x ..
/// 64·x + 63. Thread (g, l) holds 8 adjacent columns (one 128-bit load a row) and sums rows
/// l, l + 32, … of the chunk in order; the 32 row lanes' sums are then added in lane order
/// through shared memory into the chunk's partial row. Chunks are long enough (the launcher's
/// choice, from `rows` alone) that there are at most 64 partial rows. A warp reads 4 rows of
/// 128 contiguous bytes.
///
/// The last block of a column tile to finish (counted by `counters[x]`, zero at the launch)
/// puts the counter back to zero for the next call (the counters are the device's, zeroed
/// once: `Device::zeroed_counters`), then adds the tile's partial rows into `out` in `column_sum_f32`'s order —
/// row lane l sums partial rows l, l + 32, … in order, the 32 lanes' sums added in lane order —
/// so the result has the bits the two-launch form (this pass, then `column_sum_f32`) had,
/// without the second launch (GPU run 22: 96 of them a seed-768 step, ~6 µs each).
__device__ __forceinline__ void bias_backward_tile(float* out, float* partials,
                                                   unsigned int* counters, const __half* dy,
                                                   int rows, int cols, int chunk) {
    __shared__ float lanes[32][65];
    __shared__ bool last_block;
    const int group = threadIdx.x, lane = threadIdx.y;
    const int c = 64 * blockIdx.x + 8 * group;
    const int first = blockIdx.y * chunk;
    const int last = min(first + chunk, rows);
    float sum[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (c < cols) {
        // Eight rows' loads in flight before their adds, raw (4 registers a row), so a
        // chunk of 288 rows (seed-768's 18,432 rows in 64 chunks: 9 a thread) takes two trips
        // to memory, not three (one at a time, a thread waited out each load's latency: GPU
        // run 22 timed 14 µs a call for 18,432 × 768, ~2 TB/s; four at a time, run 24 timed
        // 1.71 ms a seed-768 step for 96 calls; eight, run 25 1.68: per-call costs, not load
        // latency, set the pace now). The adds stay in row order, so the sums' bits do not
        // change.
        int r = first + lane;
        for (; r + 224 < last; r += 256) {
            chingu::Half8 raw[8];
#pragma unroll
            for (int u = 0; u < 8; ++u)
                raw[u] = chingu::load_half8_packed(dy + (long long)(r + 32 * u) * cols + c);
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                float v[8];
                chingu::unpack_half8(v, raw[u]);
#pragma unroll
                for (int e = 0; e < 8; ++e) sum[e] += v[e];
            }
        }
        for (; r < last; r += 32) {
            float v[8];
            chingu::load_half8(v, dy + (long long)r * cols + c);
#pragma unroll
            for (int e = 0; e < 8; ++e) sum[e] += v[e];
        }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) lanes[lane][8 * group + e] = sum[e];
    __syncthreads();
    const int t = lane * 8 + group;
    const int column = 64 * blockIdx.x + t;
    if (t < 64 && column < cols) {
        float total = 0.0f;
        for (int l = 0; l < 32; ++l) total += lanes[l][t];
        partials[(long long)blockIdx.y * cols + column] = total;
    }
    // This block's partial row is written: made visible before it is counted.
    __threadfence();
    __syncthreads();
    if (t == 0) last_block = atomicAdd(&counters[blockIdx.x], 1u) == gridDim.y - 1;
    __syncthreads();
    if (!last_block) return;
    // The tile's last block: every other block has counted, so none reads the counter again.
    if (t == 0) counters[blockIdx.x] = 0u;
    // Every partial row is in (read past L1, which may hold none of them but is not kept
    // coherent).
    __threadfence();
    float col_sum[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (c < cols)
        for (int k = lane; k < (int)gridDim.y; k += 32)
#pragma unroll
            for (int e = 0; e < 8; ++e) col_sum[e] += __ldcg(partials + (long long)k * cols + c + e);
    __syncthreads();  // every thread is done with `lanes` above
#pragma unroll
    for (int e = 0; e < 8; ++e) lanes[lane][8 * group + e] = col_sum[e];
    __syncthreads();
    if (t < 64 && column < cols) {
        float total = 0.0f;
        for (int l = 0; l < 32; ++l) total += lanes[l][t];
        out[column] += total;
    }
}

/// One tensor's bias gradient (`bias_backward_tile` above: grid (column tiles, chunks)).
extern "C" __global__ void bias_backward_tile_f16(float* out, float* partials,
                                                  unsigned int* counters, const __half* dy,
                                                  int rows, int cols, int chunk) {
    bias_backward_tile(out, partials, counters, dy, rows, cols, chunk);
}

/// `bias_backward_tile_f16` for up to four tensors of one shape in one launch (attention's
/// projections, whose bias gradients are ready together): block z of grid.z is tensor z's
/// (out_z, dy_z; the unused slots null), its partial rows and tile counters the z-th
/// `gridDim.y × cols` and `gridDim.x` of `partials` and `counters`. Each tensor's blocks do
/// what the one-tensor launch's do, so its bits are the same; one launch over three tensors
/// instead of three keeps the GPU full between them (a 768-wide one reads 28 MB: at seed-768's
/// pace ~14 µs a call, ramp and tail included).
extern "C" __global__ void bias_backward_tiles_f16(float* out0, float* out1, float* out2,
                                                   float* out3, const __half* dy0,
                                                   const __half* dy1, const __half* dy2,
                                                   const __half* dy3, float* partials,
                                                   unsigned int* counters, int rows, int cols,
                                                   int chunk) {
    const int z = blockIdx.z;
    float* const out = z == 0 ? out0 : z == 1 ? out1 : z == 2 ? out2 : out3;
    const __half* const dy = z == 0 ? dy0 : z == 1 ? dy1 : z == 2 ? dy2 : dy3;
    bias_backward_tile(out, partials + (long long)z * gridDim.y * cols,
                       counters + (long long)z * gridDim.x, dy, rows, cols, chunk);
}

// embedding.cu — token embedding lookup and its deterministic backward.
//
// forward:  out[n, :] = table[ids[n], :]·scale + positions[pos[n], :]
//           out [N, D] fp16; table [V, D] fp16; positions [max_len, D] fp16; ids, pos [N] int.
// backward: d_table[id, :] += scale·Σ_{n: ids[n] = id} d_out[n, :]   (d_table fp32)
//           No atomics: the host groups the rows by id (a counting sort, stable, so rows keep
//           their order within a group) into `order` [N] and `group_start` [G + 1] with the
//           group's id in `group_id` [G]; one block per group sums its rows in that order.
//           The same kernel with scale 1 and `pos` as ids gives learned positions' gradient.
#include "common.cuh"

extern "C" __global__ void embedding_forward_f16(__half* out, const __half* table,
                                                 const __half* positions, const int* ids,
                                                 const int* pos, int rows, int width,
                                                 float scale) {
    const int n = blockIdx.x;
    if (n >= rows) return;
    const __half* t = table + (long long)ids[n] * width;
    const __half* p = positions + (long long)pos[n] * width;
    __half* o = out + (long long)n * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        o[i] = __float2half_rn(__half2float(t[i]) * scale + __half2float(p[i]));
}

extern "C" __global__ void embedding_backward_f16(float* d_table, const __half* d_out,
                                                  const int* order, const int* group_start,
                                                  const int* group_id, int groups, int width,
                                                  float scale) {
    // Groups on x (up to 2^31 − 1 blocks), column blocks on y (width / blockDim of them).
    const int g = blockIdx.x;
    const int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (g >= groups || i >= width) return;
    float sum = 0.0f;
    for (int k = group_start[g]; k < group_start[g + 1]; ++k)
        sum += __half2float(d_out[(long long)order[k] * width + i]);
    d_table[(long long)group_id[g] * width + i] += sum * scale;
}

// launch_all.cpp — every kernel of kernels/cuda/ compiled by g++ against our emulation layer,
// behind one C entry point with cuLaunchKernel's calling convention.
//
// `chingu_emu_launch(name, grid, block, shared_bytes, args, …)` takes `args` as the driver
// API does: an array of pointers to each argument's value (a device pointer argument is a
// u64 address, which on the emulated device is a host address). So the Rust launchers build
// one argument list and hand it to either device. Built by kernels/build.rs (feature "emu").
#define CHINGU_EMU 1
#include "../common.cuh"

#include "../adamw.cu"
#include "../attention.cu"
#include "../attention_gemm.cu"
#include "../cross_entropy.cu"
#include "../dropout.cu"
#include "../elementwise.cu"
#include "../embedding.cu"
#include "../hopper.cu"
#include "../layernorm.cu"
#include "../reduce.cu"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <type_traits>
#include <utility>

namespace {

template <typename... A, std::size_t... I>
void unpack(const char* name, void (*kernel)(A...), dim3 grid, dim3 block, size_t shared_bytes,
            void** args, std::index_sequence<I...>) {
    chingu_emu::launch(name, kernel, grid, block, shared_bytes,
                       *static_cast<std::decay_t<A>*>(args[I])...);
}

template <typename... A>
void dispatch(const char* name, void (*kernel)(A...), dim3 grid, dim3 block, size_t shared_bytes,
              void** args) {
    unpack(name, kernel, grid, block, shared_bytes, args, std::index_sequence_for<A...>{});
}

// The values of the pointer-typed parameters in `args`, in parameter order (at most `cap`
// written; the count is returned): which device memory a launch can touch.
template <typename... A, std::size_t... I>
size_t pointer_values(void (*)(A...), void** args, unsigned long long* out, size_t cap,
                      std::index_sequence<I...>) {
    size_t n = 0;
    auto take = [&](auto* value) {
        using T = std::remove_pointer_t<decltype(value)>;
        if constexpr (std::is_pointer_v<T>) {
            if (n < cap) out[n] = reinterpret_cast<std::uintptr_t>(*value);
            ++n;
        }
    };
    (take(static_cast<std::decay_t<A>*>(args[I])), ...);
    return n;
}

template <typename... A>
constexpr std::size_t arity(void (*)(A...)) {
    return sizeof...(A);
}

using Thunk = void (*)(const char*, dim3, dim3, size_t, void**);
using Pointers = size_t (*)(void**, unsigned long long*, size_t);
struct Entry {
    const char* name;
    Thunk thunk;
    Pointers pointers;
};

#define KERNEL(k)                                                                      \
    Entry {                                                                            \
        #k, [](const char* n, dim3 g, dim3 b, size_t s, void** a) {                    \
            dispatch(n, &k, g, b, s, a);                                               \
        },                                                                             \
            [](void** a, unsigned long long* out, size_t cap) {                        \
                return pointer_values(&k, a, out, cap, std::make_index_sequence<arity(&k)>{}); \
            }                                                                          \
    }

const Entry KERNELS[] = {
    KERNEL(adamw_f32),
    KERNEL(adamw_multi_f32),
    KERNEL(attention_forward_c4_f16),
    KERNEL(attention_forward_c8_f16),
    KERNEL(attention_forward_c12_f16),
    KERNEL(attention_forward_c16_f16),
    KERNEL(attention_forward_mma_c2_f16),
    KERNEL(attention_forward_mma_c2s2_f16),
    KERNEL(attention_forward_mma_c4_f16),
    KERNEL(attention_forward_mma_c4s2_f16),
    KERNEL(attention_forward_mma_c8_f16),
    KERNEL(attention_forward_mma_c8s2_f16),
    KERNEL(attention_forward_mma_c12_f16),
    KERNEL(attention_forward_mma_c12s2_f16),
    KERNEL(attention_forward_mma_c16_f16),
    KERNEL(attention_forward_wgmma_c4_f16),
    KERNEL(attention_forward_wgmma_c4s2_f16),
    KERNEL(attention_forward_wgmma_c8_f16),
    KERNEL(attention_forward_wgmma_c8s2_f16),
    KERNEL(attention_forward_wgmma_c12_f16),
    KERNEL(attention_forward_wgmma_c12s2_f16),
    KERNEL(attention_forward_wgmma_c16_f16),
    KERNEL(attention_forward_wgmma_c16s2_f16),
    KERNEL(attention_backward_delta_f16),
    KERNEL(attention_softmax_f16),
    KERNEL(attention_scores_backward_saved_f16),
    KERNEL(attention_scores_backward_f16),
    KERNEL(attention_softmax_half_scores_f16),
    KERNEL(attention_scores_backward_saved_half_scores_f16),
    KERNEL(attention_scores_backward_half_scores_f16),
    KERNEL(attention_backward_dkdv_mma_c2_f16),
    KERNEL(attention_backward_dkdv_mma_c2s2_f16),
    KERNEL(attention_backward_dkdv_mma_c4_f16),
    KERNEL(attention_backward_dkdv_mma_c4s2_f16),
    KERNEL(attention_backward_dkdv_mma_split_c8_f16),
    KERNEL(attention_backward_dkdv_mma_split_c8s2_f16),
    KERNEL(attention_backward_dkdv_mma_split_c12_f16),
    KERNEL(attention_backward_dkdv_mma_split_c12s2_f16),
    KERNEL(attention_backward_dkdv_mma_split_c16_f16),
    KERNEL(attention_backward_dkdv_mma_split_c16s2_f16),
    KERNEL(attention_backward_dq_mma_c2_f16),
    KERNEL(attention_backward_dq_mma_c2s2_f16),
    KERNEL(attention_backward_dq_mma_c4_f16),
    KERNEL(attention_backward_dq_mma_c4s2_f16),
    KERNEL(attention_backward_dq_mma_c8_f16),
    KERNEL(attention_backward_dq_mma_c8s2_f16),
    KERNEL(attention_backward_dq_mma_c12_f16),
    KERNEL(attention_backward_dq_mma_c12s2_f16),
    KERNEL(attention_backward_dq_mma_c16_f16),
    KERNEL(attention_backward_dkdv_c4_f16),
    KERNEL(attention_backward_dkdv_split_c8_f16),
    KERNEL(attention_backward_dkdv_split_c12_f16),
    KERNEL(attention_backward_dq_c4_f16),
    KERNEL(attention_backward_dq_c8_f16),
    KERNEL(attention_backward_dq_c12_f16),
    KERNEL(attention_backward_dq_c16_f16),
    KERNEL(column_sum_f32),
    KERNEL(cross_entropy_f16),
    KERNEL(cross_entropy_vec_f16),
    KERNEL(dropout_f16),
    KERNEL(add_dropped_f16),
    KERNEL(dropped_copy_f16),
    KERNEL(cast_f32_to_f16),
    KERNEL(cast_f16_to_f32),
    KERNEL(gelu_forward_f16),
    KERNEL(gelu_backward_f16),
    KERNEL(relu_forward_f16),
    KERNEL(relu_backward_f16),
    KERNEL(add_assign_f16),
    KERNEL(add_assign_f32),
    KERNEL(scale_f16),
    KERNEL(scale_f32),
    KERNEL(fill_u64_list),
    KERNEL(bias_add_f16),
    KERNEL(bias_backward_partial_f16),
    KERNEL(bias_backward_tile_f16),
    KERNEL(bias_backward_tiles_f16),
    KERNEL(embedding_forward_f16),
    KERNEL(embedding_backward_f16),
    KERNEL(layernorm_forward_f16),
    KERNEL(layernorm_backward_f16),
    KERNEL(layernorm_backward_w256_f16),
    KERNEL(layernorm_backward_w512_f16),
    KERNEL(layernorm_backward_w1024_f16),
    KERNEL(layernorm_forward_vec1_f16),
    KERNEL(layernorm_forward_vec2_f16),
    KERNEL(layernorm_forward_vec3_f16),
    KERNEL(layernorm_forward_vec4_f16),
    KERNEL(layernorm_backward_vec1_f16),
    KERNEL(layernorm_backward_vec2_f16),
    KERNEL(layernorm_backward_vec3_f16),
    KERNEL(layernorm_backward_vec4_f16),
    KERNEL(layernorm_forward_add_dropped_vec1_f16),
    KERNEL(layernorm_forward_add_dropped_vec2_f16),
    KERNEL(layernorm_forward_add_dropped_vec3_f16),
    KERNEL(layernorm_forward_add_dropped_vec4_f16),
    KERNEL(layernorm_backward_dropped_vec1_f16),
    KERNEL(layernorm_backward_dropped_vec2_f16),
    KERNEL(layernorm_backward_dropped_vec3_f16),
    KERNEL(layernorm_backward_dropped_vec4_f16),
    KERNEL(sum_squares_multi_f32),
    KERNEL(sum_final_f64),
    KERNEL(unscale_f32),
    KERNEL(check_finite_f16),
    KERNEL(wgmma_tile_n64_k192_f16),
    KERNEL(wgmma_tile_n192_k64_f16),
};

void write_error(char* err, size_t err_len, const char* message) {
    if (err && err_len) {
        std::strncpy(err, message, err_len - 1);
        err[err_len - 1] = '\0';
    }
}

}  // namespace

/// Runs kernel `name` to completion, in order (`schedule_seed` 0) or under the shuffled
/// schedule that seed picks (cuda_emu.h, SCHEDULES). Returns 0 on success; 1 for an unknown
/// kernel, 2 for a launch the emulator refused or a kernel that threw (message in `err`).
extern "C" int chingu_emu_launch(const char* name, const unsigned* grid, const unsigned* block,
                                 unsigned shared_bytes, void** args, unsigned long long schedule_seed,
                                 char* err, size_t err_len) {
    for (const Entry& e : KERNELS) {
        if (std::strcmp(e.name, name) != 0) continue;
        chingu_emu::schedule_seed() = schedule_seed;
        try {
            e.thunk(e.name, dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]),
                    shared_bytes, args);
            return 0;
        } catch (const std::exception& ex) {
            write_error(err, err_len, ex.what());
            return 2;
        }
    }
    char message[256];
    std::snprintf(message, sizeof message, "no kernel named %s in the emulated build", name);
    write_error(err, err_len, message);
    return 1;
}

/// Writes the values of kernel `name`'s pointer parameters in `args` (cuLaunchKernel's
/// convention) to `out` (at most `cap`) and returns how many it has, or -1 for an unknown
/// kernel. The emulated device uses it to find the memory a launch may write.
extern "C" long long chingu_emu_pointer_args(const char* name, void** args, unsigned long long* out,
                                             size_t cap) {
    for (const Entry& e : KERNELS)
        if (std::strcmp(e.name, name) == 0) return static_cast<long long>(e.pointers(args, out, cap));
    return -1;
}

/// The kernel names, for the test that every .cu kernel is reachable.
extern "C" const char* chingu_emu_kernel_name(size_t index) {
    return index < sizeof KERNELS / sizeof KERNELS[0] ? KERNELS[index].name : nullptr;
}

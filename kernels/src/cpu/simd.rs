//! Elementwise loops compiled for the widest vector unit the CPU has, chosen at run time.
//!
//! The crate is built for the baseline x86-64 target (SSE2), so a loop over a slice vectorises
//! four f32 wide at most. [`vectorized`] runs a closure inside a function compiled with AVX-512
//! (or AVX2) enabled; the closure is inlined there and its loops get the wide instructions.
//! Results are the same bits on every path: Rust never fuses a multiply and an add on its own,
//! elementwise arithmetic is IEEE-exact per element whatever the width, and the reductions that
//! run through here sum over a fixed number of lanes (`LANES` in `cpu`), not over the vector
//! width. The 64-bit multiplies of dropout's hash gain the most (AVX-512DQ has them).

/// Runs `work` compiled for AVX-512 or AVX2 when the CPU has them, else as built.
///
/// Pass the closure as `#[inline(always)] || rows::kernel(...)`: a closure is otherwise
/// inlined only while it is small, and one that is not runs as baseline code.
#[inline(always)]
pub(crate) fn vectorized<R>(work: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            // SAFETY: the features were detected just above.
            return unsafe { with_avx512(work) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { with_avx2(work) };
        }
    }
    work()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,avx2")]
unsafe fn with_avx512<R>(work: impl FnOnce() -> R) -> R {
    work()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn with_avx2<R>(work: impl FnOnce() -> R) -> R {
    work()
}

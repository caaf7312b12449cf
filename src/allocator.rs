//! Allocator tuning for training's allocation pattern.
//!
//! A training step allocates and frees the same few hundred megabytes of activation buffers
//! every step. The system allocator hands large blocks back to the kernel and gets freshly
//! zeroed pages on the next step (page faults were ~10% of a step); mimalloc reuses them, but
//! by default still purges (decommits) memory that stayed free for a second — about one step of
//! a `seed-256` batch, so buffers were decommitted just before their reuse and about 2,000
//! huge-page faults per step remained (`perf stat -e page-faults`, seed-256 benchmark). We turn purging off:
//! a process's footprint stays at its peak, which for training is the steady state anyway.

/// `mi_option_purge_delay`'s position in mimalloc's `mi_option_t` enum. The C enum is not
/// exported as a Rust constant, so the number is read from `mimalloc.h` of the pinned
/// libmimalloc-sys (v3 sources); `known_mimalloc_version` fails when that pin moves.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// The mimalloc release whose header the number above was read from.
const KNOWN_MIMALLOC_VERSION: i32 = 30302;

/// Never return freed memory to the OS (mimalloc `purge_delay = -1`).
pub fn keep_freed_memory() {
    // SAFETY: plain option setters of the linked allocator; valid at any time.
    unsafe {
        if libmimalloc_sys::mi_version() == KNOWN_MIMALLOC_VERSION {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_mimalloc_version() {
        // SAFETY: option getters/setters of the linked allocator.
        let (version, default_delay) = unsafe {
            (libmimalloc_sys::mi_version(), libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY))
        };
        assert_eq!(
            version, KNOWN_MIMALLOC_VERSION,
            "mimalloc changed: re-read mi_option_purge_delay's number from its mimalloc.h"
        );
        // purge_delay's default in this release is 1000 ms (src/options.c), a value no
        // neighbouring option has: the number names the right option.
        assert_eq!(default_delay, 1000);
        keep_freed_memory();
        // SAFETY: as above.
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }, -1);
    }
}

//! The CUDA device's cache of freed allocations, kept apart from cudarc so that its policy is
//! tested without a GPU.
//!
//! cuMemAlloc and cuMemFree synchronise the device, so freed buffers are parked and handed out
//! again. Parking them by exact size is not enough: batches are packed to a token budget, so
//! every batch brings slightly different lengths and therefore new sizes, and a cache keyed by
//! exact size grows with every new length (GPU run 16: 1.4 → 16.5 GiB over 200 steps of a
//! model that needs 1.5). Sizes are therefore rounded up to classes, four per doubling: a
//! buffer wastes at most a quarter of its size, and the lengths of a training run fall into a
//! handful of classes that are reused step after step. (Below 2 KiB the waste is up to 512
//! bytes instead.)

use std::collections::HashMap;

use super::DevicePtr;

/// Sizes up to this many bytes are rounded to it (cuMemAlloc's alignment is 256; small
/// buffers are cheap, so one class for all of them).
const SMALLEST: usize = 512;
/// Classes per doubling of size above [`SMALLEST`]: a buffer is at most 1/CLASSES_PER_DOUBLING
/// (or [`SMALLEST`] bytes) larger than asked for.
const CLASSES_PER_DOUBLING: usize = 4;

/// The number of bytes a request for `bytes` allocates: the smallest class at least as large.
pub fn size_class(bytes: usize) -> usize {
    if bytes <= SMALLEST {
        return SMALLEST;
    }
    // The power of two at or below `bytes` splits into CLASSES_PER_DOUBLING steps.
    let floor = 1usize << (usize::BITS - 1 - bytes.leading_zeros());
    let step = (floor / CLASSES_PER_DOUBLING).max(SMALLEST);
    // Past usize's range (no device has that much) the request stands as asked, to fail
    // as out of memory.
    bytes.div_ceil(step).checked_mul(step).unwrap_or(bytes)
}

/// Freed allocations parked by size class.
#[derive(Default)]
pub struct BufferCache {
    parked: HashMap<usize, Vec<DevicePtr>>,
    parked_bytes: usize,
}

impl BufferCache {
    /// A parked allocation of `class` bytes (a [`size_class`]), if any.
    pub fn take(&mut self, class: usize) -> Option<DevicePtr> {
        let ptr = self.parked.get_mut(&class)?.pop()?;
        self.parked_bytes -= class;
        Some(ptr)
    }

    /// Parks an allocation of `class` bytes for reuse.
    pub fn park(&mut self, class: usize, ptr: DevicePtr) {
        self.parked.entry(class).or_default().push(ptr);
        self.parked_bytes += class;
    }

    /// Every parked allocation, leaving the cache empty (to free them).
    pub fn drain(&mut self) -> Vec<DevicePtr> {
        self.parked_bytes = 0;
        self.parked.drain().flat_map(|(_, ptrs)| ptrs).collect()
    }

    /// Bytes parked.
    pub fn parked_bytes(&self) -> usize {
        self.parked_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_the_request_and_waste_at_most_a_quarter() {
        let mut previous = 0;
        for bytes in (1..100_000).chain((1..4000).map(|i| i * 1_234_567)) {
            let class = size_class(bytes);
            assert!(class >= bytes, "{bytes} → {class}");
            assert!(class >= previous, "classes grow with the request ({bytes} → {class})");
            previous = class;
            assert!(
                class <= bytes + (bytes / 4).max(SMALLEST),
                "{bytes} → {class}: too much waste"
            );
            assert_eq!(class % 256, 0, "cuMemAlloc's alignment");
            assert_eq!(size_class(class), class, "a class is its own class");
        }
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(4097), 5120);
        assert_eq!(size_class(100 << 20), 112 << 20);
        assert_eq!(size_class(usize::MAX - 5), usize::MAX - 5, "no overflow: fails as asked");
    }

    /// A training run's pattern: each step allocates activations whose sizes follow the
    /// batch's shape, then frees them all. Batches are packed to a token budget, so B·T moves
    /// a little from batch to batch. The memory held (live at the peak plus parked) must stay
    /// near one step's peak, not grow with the number of distinct lengths seen.
    #[test]
    fn packed_batches_of_new_lengths_reuse_their_classes() {
        let mut cache = BufferCache::default();
        let mut next_ptr: DevicePtr = 0;
        let mut allocated_bytes = 0usize;
        let mut first_step_bytes = 0;
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for step in 0..300 {
            // xorshift: a length between 48 and 64, and as many rows as fit 8,192 tokens.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let len = 48 + (rng % 17) as usize;
            let rows = 8192 / len;
            // Row-proportional activations of 6 widths (fp16), and per-head scores (T²).
            let mut sizes: Vec<usize> =
                [256, 256, 1024, 1024, 768, 16_000].iter().map(|w| rows * len * w * 2).collect();
            sizes.extend((0..4).map(|_| rows * 4 * len * len * 4));
            let mut live = Vec::new();
            for bytes in sizes {
                let class = size_class(bytes);
                let ptr = cache.take(class).unwrap_or_else(|| {
                    allocated_bytes += class;
                    next_ptr += 1;
                    next_ptr
                });
                live.push((class, ptr));
            }
            if step == 0 {
                first_step_bytes = allocated_bytes;
            }
            for (class, ptr) in live {
                cache.park(class, ptr);
            }
        }
        assert_eq!(cache.parked_bytes(), allocated_bytes, "everything freed is parked");
        // Exact sizes (rounded to 512 bytes) would have allocated one step's worth for nearly
        // every distinct length: 17 lengths, ~17× the first step.
        assert!(
            allocated_bytes <= 3 * first_step_bytes,
            "{allocated_bytes} bytes allocated over 300 steps, {first_step_bytes} in the first"
        );
        let drained = cache.drain();
        assert_eq!(cache.parked_bytes(), 0);
        assert_eq!(drained.len() as u64, next_ptr, "drain hands back every parked allocation");
    }
}

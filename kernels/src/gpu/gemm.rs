//! The checked launcher of [`Device::gemm`](super::Device::gemm): every buffer's length is
//! checked against the shape before the device sees a pointer.

use std::sync::{Arc, Mutex};

use half::f16;

use super::{
    address_alignment, DeviceBuffer, Element, Gemm, GemmBatch, GemmEpilogue, Gpu, GpuError,
};

/// `CHINGU_GEMM_ARRAYS` (unset or `1`): [`run_group`] runs the products of a group that share
/// a shape as one pointer-array batch ([`GemmBatch::pointer_arrays`]) where the device has a
/// kernel for it, instead of one launch each; `0` runs them one at a time. On by default since
/// GPU run 24 (H200, seed-768 at 18 × (1024+1024); run 25 interleaved: 39.7–40.4 ms a step
/// against 41.6–42.0 without; see [`run_group_as`]).
pub const ARRAYS_VAR: &str = "CHINGU_GEMM_ARRAYS";

/// Whether [`ARRAYS_VAR`] is unset or on.
pub fn pointer_arrays() -> bool {
    static ARRAYS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ARRAYS.get_or_init(|| crate::settings::switch(ARRAYS_VAR).unwrap_or(true))
}

/// The output of a product, and so its type.
pub enum GemmOut<'a> {
    /// fp16 `C`.
    F16(&'a mut DeviceBuffer<f16>),
    /// fp32 `C`.
    F32(&'a mut DeviceBuffer<f32>),
}

fn check<T: Element>(
    name: &str,
    buf: &DeviceBuffer<T>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    match rows.checked_mul(cols) {
        Some(len) if len == buf.len() => Ok(()),
        _ => Err(GpuError::Shape {
            op: "gemm",
            message: format!(
                "{name} holds {} {} elements, its shape is {rows}×{cols}",
                buf.len(),
                T::NAME
            ),
        }),
    }
}

/// Row-major `C[m×n] = op(A)·op(B) (+ C when accumulate) (+ bias)`: `A` is `[m×k]` (stored
/// `[k×m]` when `trans_a`), `B` is `[k×n]` (stored `[n×k]` when `trans_b`), `bias` is `[n]`,
/// added to every row, and only without `accumulate`. fp32 compute; see [`Gemm`].
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    dev: &Gpu,
    c: GemmOut<'_>,
    a: &DeviceBuffer<f16>,
    trans_a: bool,
    b: &DeviceBuffer<f16>,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    bias: Option<&DeviceBuffer<f16>>,
) -> Result<(), GpuError> {
    checked(dev, c, a, trans_a, b, trans_b, (m, n, k), accumulate, bias, GemmEpilogue::None)
}

/// The feed-forward block's first product with its GELU fused into the store:
/// `pre = op(A)·op(B) + bias` and `act = gelu(pre)` (GELU of the fp32 value, then both
/// rounded to fp16), both `[m×n]`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_gelu(
    dev: &Gpu,
    act: &mut DeviceBuffer<f16>,
    pre: &mut DeviceBuffer<f16>,
    a: &DeviceBuffer<f16>,
    trans_a: bool,
    b: &DeviceBuffer<f16>,
    trans_b: bool,
    (m, n, k): (usize, usize, usize),
    bias: Option<&DeviceBuffer<f16>>,
) -> Result<(), GpuError> {
    check("pre-activation", pre, m, n)?;
    let epilogue = GemmEpilogue::Gelu { pre: pre.ptr() };
    checked(dev, GemmOut::F16(act), a, trans_a, b, trans_b, (m, n, k), false, bias, epilogue)
}

/// The gradient through a GELU fused into the product that makes the activation's
/// gradient: `d_pre = (op(A)·op(B)) · gelu'(pre)`, all `[m×n]`, overwritten.
#[allow(clippy::too_many_arguments)]
pub fn gemm_gelu_grad(
    dev: &Gpu,
    d_pre: &mut DeviceBuffer<f16>,
    pre: &DeviceBuffer<f16>,
    a: &DeviceBuffer<f16>,
    trans_a: bool,
    b: &DeviceBuffer<f16>,
    trans_b: bool,
    (m, n, k): (usize, usize, usize),
) -> Result<(), GpuError> {
    check("pre-activation", pre, m, n)?;
    let epilogue = GemmEpilogue::GeluGrad { pre: pre.ptr() };
    checked(dev, GemmOut::F16(d_pre), a, trans_a, b, trans_b, (m, n, k), false, None, epilogue)
}

/// The weight gradient of a linear layer with its bias gradient summed in the same product:
/// `dw (+)= op(A)·op(B)` (fp32) and `db_fresh[i] = Σ_k op(A)[i][k]` (fp32 `[m]`, overwritten),
/// where `op(A) = dyᵀ`. [`GpuError::Unsupported`] where cuBLASLt has no kernel for it (nothing
/// queued then).
#[allow(clippy::too_many_arguments)]
pub fn gemm_bias_grad(
    dev: &Gpu,
    dw: &mut DeviceBuffer<f32>,
    db_fresh: &mut DeviceBuffer<f32>,
    a: &DeviceBuffer<f16>,
    trans_a: bool,
    b: &DeviceBuffer<f16>,
    trans_b: bool,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) -> Result<(), GpuError> {
    check("bias gradient", db_fresh, 1, m)?;
    let epilogue = GemmEpilogue::BiasGrad { grad: db_fresh.ptr() };
    checked(dev, GemmOut::F32(dw), a, trans_a, b, trans_b, (m, n, k), accumulate, None, epilogue)
}

/// Whether cuBLASLt takes a fused GELU for `C` with `n` columns: its pre-activation's
/// leading dimension must be a multiple of 8 elements.
pub fn gelu_fusable(n: usize) -> bool {
    n % 8 == 0
}

#[allow(clippy::too_many_arguments)]
fn checked(
    dev: &Gpu,
    c: GemmOut<'_>,
    a: &DeviceBuffer<f16>,
    trans_a: bool,
    b: &DeviceBuffer<f16>,
    trans_b: bool,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    bias: Option<&DeviceBuffer<f16>>,
    epilogue: GemmEpilogue,
) -> Result<(), GpuError> {
    let shape = |message: String| GpuError::Shape { op: "gemm", message };
    if epilogue.has_aux_matrix() && !gelu_fusable(n) {
        return Err(shape(format!("a fused GELU needs n a multiple of 8, not {n}")));
    }
    if k == 0 {
        return Err(shape(format!("{m}×{n}×0: the summed dimension k must be at least 1")));
    }
    if trans_a { check("A (stored transposed)", a, k, m) } else { check("A", a, m, k) }?;
    if trans_b { check("B (stored transposed)", b, n, k) } else { check("B", b, k, n) }?;
    let (c, c_f32) = match c {
        GemmOut::F16(c) => check("C", c, m, n).map(|()| (c.ptr(), false)),
        GemmOut::F32(c) => check("C", c, m, n).map(|()| (c.ptr(), true)),
    }?;
    if let Some(bias) = bias {
        check("bias", bias, 1, n)?;
        if accumulate {
            return Err(shape("a bias only with accumulate = false (beta 0)".into()));
        }
    }
    let g = Gemm {
        m,
        n,
        k,
        a: a.ptr(),
        trans_a,
        b: b.ptr(),
        trans_b,
        c,
        c_f32,
        beta: if accumulate { 1.0 } else { 0.0 },
        bias: bias.map(DeviceBuffer::ptr),
        epilogue,
        batch: GemmBatch::ONE,
        ld: Gemm::DENSE,
    };
    // SAFETY: every buffer's length matches the shape, and `c` is borrowed mutably, so it
    // overlaps no input.
    unsafe { run(dev, "", &g) }
}

/// How profiles name `g` under `op`: the op and the shape.
fn describe(op: &str, g: &Gemm) -> String {
    if op.is_empty() {
        format!("gemm {g}")
    } else {
        format!("gemm ({op}) {g}")
    }
}

/// Runs `g` on `dev`, timed under a name showing the op and shape when profiling (see
/// [`super::profile`]): the one place every product goes through.
///
/// # Safety
/// Every pointer in `g` must cover the matrix the shape says it holds.
pub unsafe fn run(dev: &Gpu, op: &str, g: &Gemm) -> Result<(), GpuError> {
    // SAFETY: the caller's contract.
    super::profile::time(dev, || describe(op, g), || unsafe { dev.gemm(g) })
}

/// [`run_group_as`] with pointer arrays as [`ARRAYS_VAR`] says.
///
/// # Safety
/// As [`run_group_as`].
pub unsafe fn run_group(dev: &Gpu, op: &str, gs: &[Gemm]) -> Result<(), GpuError> {
    // SAFETY: the caller's contract.
    unsafe { run_group_as(dev, op, gs, pointer_arrays()) }
}

/// Runs `gs`, products independent of each other. With `pointer_arrays`, the products that
/// share a shape ([`same_shape`]) go as one pointer-array batch where the device has a kernel
/// for it ([`Device::has_pointer_array_gemm`](super::Device::has_pointer_array_gemm)): one
/// launch for the GEMM attention path's per-head products of a phase, which alone leave most
/// of an H200 idle in their last wave (run 22: one head's 18 blocks of 1024×192×1024 at ~230
/// TFLOP/s, all 72 blocks head-major in one product at ~500). Their matrix addresses reach
/// the device through [`super::ops::upload_in_order`]. The rest go one by one through
/// [`run`], each timed under its own name when profiling. (Spreading them over several
/// streams instead bought nothing in GPU run 23: the products' own time fell by 2.2 ms a
/// seed-768 step, the other kernels' grew by as much, the GPU held at its power cap.) A pointer-array batch
/// may sum in another order than its products alone (another kernel), so its last bits may
/// differ from theirs; it is the same every run.
///
/// # Safety
/// Every pointer in each product must cover the matrix its shape says it holds, and no
/// product writes what another reads or writes.
pub unsafe fn run_group_as(
    dev: &Gpu,
    op: &str,
    gs: &[Gemm],
    pointer_arrays: bool,
) -> Result<(), GpuError> {
    let mut rest: Vec<Gemm> = Vec::new();
    let gs = if pointer_arrays && gs.len() > 1 {
        for class in shape_classes(gs) {
            // SAFETY: the caller's contract.
            if class.len() < 2 || !unsafe { run_as_pointer_arrays(dev, op, &class) }? {
                rest.extend(class);
            }
        }
        &rest[..]
    } else {
        gs
    };
    // SAFETY: the caller's contract.
    gs.iter().try_for_each(|g| unsafe { run(dev, op, g) })
}

/// Whether `a` and `b` are products a pointer-array batch can hold together: the same shape,
/// operations, output type, row strides and beta, neither with a bias or an epilogue, neither
/// already such a batch (their strides and addresses may differ).
pub fn same_shape(a: &Gemm, b: &Gemm) -> bool {
    let plain = |g: &Gemm| {
        g.is_plain() && g.batch.pointer_arrays.is_none() && g.m > 0 && g.n > 0 && g.k > 0
    };
    plain(a)
        && plain(b)
        && (a.m, a.n, a.k, a.trans_a, a.trans_b, a.c_f32)
            == (b.m, b.n, b.k, b.trans_a, b.trans_b, b.c_f32)
        && a.row_strides() == b.row_strides()
        && a.beta.to_bits() == b.beta.to_bits()
}

/// `gs` split into classes of [`same_shape`] products, each in the order given, classes in
/// the order of their first products (a product that fits no other is a class of one).
fn shape_classes(gs: &[Gemm]) -> Vec<Vec<Gemm>> {
    let mut classes: Vec<Vec<Gemm>> = Vec::new();
    for g in gs {
        match classes.iter_mut().find(|c| same_shape(&c[0], g)) {
            Some(class) => class.push(*g),
            None => classes.push(vec![*g]),
        }
    }
    classes
}

/// Address arrays already on a device, by (device, contents): most of a step's batches name
/// the same buffers step after step (the allocator hands out the same blocks), so their
/// arrays are written once and reused, not written by a launch before every batch. The
/// contents never change once written, so reuse is safe whatever ran since. Bounded: cleared
/// when full. Entries are shared (`Arc`), so a batch holds its arrays until it is queued even
/// if another thread clears the cache meanwhile; a freed array goes back to the allocator,
/// which hands it only to work queued later.
type AddressCache = std::collections::HashMap<(usize, Vec<u64>), Arc<DeviceBuffer<u64>>>;

/// Entries [`address_arrays`] keeps at most (each a few KiB).
const ADDRESS_CACHE_ENTRIES: usize = 4096;

/// Address arrays [`address_arrays`] has written so far (not found in its cache).
static ADDRESS_UPLOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many address arrays pointer-array batches have had to write to a device so far (the
/// rest were found already there): how tests see the cache work.
pub fn address_uploads() -> usize {
    ADDRESS_UPLOADS.load(std::sync::atomic::Ordering::SeqCst)
}

/// A copy of `addresses` on `dev`: cached, or written now by
/// [`super::ops::upload_in_order`] (outside the cache's lock, so no device waits on another's
/// allocation or launch).
fn address_arrays(dev: &Gpu, addresses: Vec<u64>) -> Result<Arc<DeviceBuffer<u64>>, GpuError> {
    static CACHE: Mutex<Option<AddressCache>> = Mutex::new(None);
    let lock = || CACHE.lock().unwrap_or_else(|e| e.into_inner());
    // The device by its address: a cached buffer holds the device alive, so no other device
    // can take that address while an entry names it.
    let key = (Arc::as_ptr(dev).cast::<u8>() as usize, addresses);
    if let Some(buf) = lock().as_ref().and_then(|cache| cache.get(&key)) {
        return Ok(buf.clone());
    }
    let buf = Arc::new(super::ops::upload_in_order(dev, &key.1)?);
    ADDRESS_UPLOADS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut cache = lock();
    let cache = cache.get_or_insert_with(AddressCache::new);
    if cache.len() >= ADDRESS_CACHE_ENTRIES {
        cache.clear();
    }
    cache.insert(key, buf.clone());
    Ok(buf)
}

/// Runs `class` ([`same_shape`] products) as one pointer-array batch of all their matrices;
/// `Ok(false)` with nothing queued where the device has no kernel for that.
///
/// # Safety
/// As [`run_group_as`].
unsafe fn run_as_pointer_arrays(dev: &Gpu, op: &str, class: &[Gemm]) -> Result<bool, GpuError> {
    let c_bytes = if class[0].c_f32 { 4 } else { 2 };
    let count: usize = class.iter().map(|g| g.batch.count.max(1)).sum();
    // Every matrix address, product by product: A's, then B's, then C's, each array from a
    // 256-byte boundary (`padded` addresses apart), as cuBLASLt may want its pointers aligned.
    let padded = count.next_multiple_of(32);
    let mut addresses = vec![0u64; 3 * padded];
    let mut i = 0;
    for g in class {
        for j in 0..g.batch.count.max(1) {
            let at = |ptr: u64, stride: usize, bytes: usize| ptr + (j * stride * bytes) as u64;
            addresses[i] = at(g.a, g.batch.stride_a, 2);
            addresses[padded + i] = at(g.b, g.batch.stride_b, 2);
            addresses[2 * padded + i] = at(g.c, g.batch.stride_c, c_bytes);
            i += 1;
        }
    }
    let used = |k: usize| &addresses[k * padded..k * padded + count];
    let align = (0..3).flat_map(used).map(|&p| address_alignment(p)).min().unwrap_or(256);
    let batch = GemmBatch::scattered(count, align);
    let like = Gemm { a: 0, b: 0, c: 0, batch, ..class[0] };
    if !dev.has_pointer_array_gemm(&like)? {
        return Ok(false);
    }
    // Held until the batch is queued. No room for the addresses (a device at the edge of its
    // memory, where the attention path halves its chunks until they fit): the products go as
    // they came, which need none.
    let arrays = match address_arrays(dev, addresses) {
        Ok(arrays) => arrays,
        Err(GpuError::OutOfMemory { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    let at = |k: usize| arrays.ptr() + (k * padded * 8) as u64;
    let g = Gemm { a: at(0), b: at(1), c: at(2), ..like };
    // SAFETY: the caller's contract for every product the arrays name; the arrays hold
    // `count` addresses each and stay allocated (kept by the cache, or, once dropped from
    // it, handed out again by the allocator only to later work).
    match unsafe { run(dev, op, &g) } {
        Ok(()) => Ok(true),
        // Refused when queued (nothing queued; remembered by the device): the products go
        // as they came. Only the address arrays were written, which nothing else reads.
        Err(GpuError::Unsupported(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(m: usize, trans_b: bool, c_f32: bool, a: u64) -> Gemm {
        Gemm {
            m,
            n: 8,
            k: 16,
            a,
            trans_a: false,
            b: 0x1000,
            trans_b,
            c: 0x2000 + a,
            c_f32,
            beta: 0.0,
            bias: None,
            epilogue: GemmEpilogue::None,
            batch: GemmBatch::strided(3, 128, 0, 64),
            ld: [32, 16, 8],
        }
    }

    /// Products join a class only with every other one's shape, operations, output type, row
    /// strides and beta, never with a bias, an epilogue or no work; classes keep the order
    /// of their first products, and products within a class theirs.
    #[test]
    fn classes_hold_only_products_of_one_shape() {
        let plain = product(4, false, false, 0);
        let mut with_bias = product(4, false, false, 5);
        with_bias.bias = Some(0x3000);
        let mut accumulating = product(4, false, false, 6);
        accumulating.beta = 1.0;
        let mut other_ld = product(4, false, false, 7);
        other_ld.ld = [64, 16, 8];
        let gs = [
            plain,
            product(4, true, false, 1),
            product(4, false, false, 2),
            product(4, false, true, 3),
            product(0, false, false, 4),
            with_bias,
            accumulating,
            other_ld,
            product(4, false, false, 8),
        ];
        let classes = shape_classes(&gs);
        let firsts: Vec<Vec<u64>> =
            classes.iter().map(|c| c.iter().map(|g| g.a).collect()).collect();
        assert_eq!(firsts, [vec![0, 2, 8], vec![1], vec![3], vec![4], vec![5], vec![6], vec![7]]);
        assert!(same_shape(&gs[0], &gs[2]));
        assert!(!same_shape(&gs[4], &gs[4]), "a product with no rows batches with nothing");
        assert!(!same_shape(&with_bias, &with_bias));
    }
}

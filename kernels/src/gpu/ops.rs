//! One checked launcher per kernel: shapes are validated against the buffers, sizes must
//! fit the kernels' `int`s, and the launch configuration is chosen here. Launch
//! configurations never change results: elementwise kernels are grid-stride, and every
//! reduction has a grid fixed by the shapes alone.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use half::f16;

use super::{DeviceBuffer, Element, Gpu, GpuError};
use crate::backend::{AdamW, AttentionShape, DropoutKey};
use crate::cpu::{dropout_base, dropout_scale, dropout_threshold};

/// Threads per block for elementwise kernels.
const THREADS: u32 = 256;

/// (Row, head) items a lane group of `attention_backward_delta_f16` takes: attention.cu's
/// `CHINGU_DELTA_ITEMS` (a unit test reads it there).
const DELTA_ITEMS: usize = 4;
/// Values one `fill_u64_list` launch carries in its parameters: elementwise.cu's
/// `CHINGU_U64_LIST` (a unit test reads it there).
const U64_LIST: usize = 240;
/// Most blocks an elementwise launch uses (grid-stride beyond).
const MAX_BLOCKS: u32 = 65_535;
/// Blocks of the first pass of a sum of squares: fixed, so the norm never depends on the GPU.
const REDUCE_BLOCKS: usize = 256;
/// Rows each partial sum of the bias gradient covers (its first pass).
const BIAS_GRAD_ROWS: usize = 64;
/// …and of the tiled kernel's, at least (8 rows for each of its 32 row lanes)…
const BIAS_GRAD_TILE_ROWS: usize = 256;
/// …whose chunks grow with the rows so that pass 2 adds at most this many partial rows (run
/// 17: pass 2 over 576 rows of 256 columns took 12 µs, latency-bound on 8 blocks).
const BIAS_GRAD_TILE_PARTIALS: usize = 64;
/// Rows each block of the LayerNorm backward walks (its dγ/dβ partial covers these).
const LN_ROWS_PER_BLOCK: usize = 32;
/// Rows per warp of the warp-per-row LayerNorm backward, at least…
const LN_MIN_ROWS_PER_WARP: usize = 4;
/// …and more when needed to keep the partial sums to add up at most this many.
const LN_MAX_PARTIALS: usize = 4096;
/// Rows per warp of the vector LayerNorm backward, at least (its blocks leave one partial
/// each, so a warp can take few rows: at seed-768's 18,432 rows, 576 blocks, two to an SM).
const LN_VEC_MIN_ROWS_PER_WARP: usize = 4;
/// `CHINGU_LN_BACKWARD_BLOCKS=N`: the vector LayerNorm backward in at most N blocks (more rows
/// a warp), instead of [`LN_VEC_MIN_ROWS_PER_WARP`]'s. Unset by default, not yet timed: at
/// seed-768's 18,432 rows the default's 576 blocks are 2.2 waves of an H100's or H200's 264
/// resident ones (two a multiprocessor), so the last wave holds a fifth of them; 256 (9 rows a
/// warp) is one wave there and on an RTX 4090 (128 multiprocessors). A function of `rows` and
/// the setting alone, so is the summation order. gpu-check's profile with
/// CHINGU_GEMM_WEIGHT_GRAD_BATCH=1 sets it to 256, and its table gives the kernel's time.
pub const LN_BACKWARD_BLOCKS_VAR: &str = "CHINGU_LN_BACKWARD_BLOCKS";

/// [`LN_BACKWARD_BLOCKS_VAR`]'s cap, `None` where it is unset (read once; a value that is not a
/// positive whole number is warned about and ignored).
fn ln_backward_blocks() -> Option<usize> {
    static BLOCKS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *BLOCKS.get_or_init(|| {
        let parse = |t: &str| t.parse().ok().filter(|&n: &usize| n > 0);
        crate::settings::read(LN_BACKWARD_BLOCKS_VAR, "a positive whole number", parse)
    })
}

/// The vector LayerNorm kernels by size class (rows up to 256, 512, 768, 1,024 wide).
const LN_VEC_FORWARD: [&str; 4] = [
    "layernorm_forward_vec1_f16",
    "layernorm_forward_vec2_f16",
    "layernorm_forward_vec3_f16",
    "layernorm_forward_vec4_f16",
];
const LN_VEC_BACKWARD: [&str; 4] = [
    "layernorm_backward_vec1_f16",
    "layernorm_backward_vec2_f16",
    "layernorm_backward_vec3_f16",
    "layernorm_backward_vec4_f16",
];
/// The vector LayerNorm kernels with the residual stream's dropout fused in (forward: the
/// residual add before; backward: the dropout of dx after).
const LN_VEC_FORWARD_ADD_DROPPED: [&str; 4] = [
    "layernorm_forward_add_dropped_vec1_f16",
    "layernorm_forward_add_dropped_vec2_f16",
    "layernorm_forward_add_dropped_vec3_f16",
    "layernorm_forward_add_dropped_vec4_f16",
];
const LN_VEC_BACKWARD_DROPPED: [&str; 4] = [
    "layernorm_backward_dropped_vec1_f16",
    "layernorm_backward_dropped_vec2_f16",
    "layernorm_backward_dropped_vec3_f16",
    "layernorm_backward_dropped_vec4_f16",
];
/// Threads per block of the attention delta kernel (one warp per row and head).
const ATTN_THREADS: u32 = 128;
/// Largest head width the attention kernels take (their shared tiles fit 48 KiB up to it).
const ATTN_MAX_HEAD_DIM: usize = 256;
/// Dynamic shared memory a block may use without opting in.
const ATTN_MAX_SHARED: usize = 48 * 1024;

fn shape(op: &'static str, message: String) -> GpuError {
    GpuError::Shape { op, message }
}

fn int(op: &'static str, what: &str, value: usize) -> Result<i32, GpuError> {
    i32::try_from(value)
        .map_err(|_| shape(op, format!("{what} = {value} exceeds the kernels' int")))
}

fn expect_len<T: Element>(
    op: &'static str,
    name: &str,
    buf: &DeviceBuffer<T>,
    len: usize,
) -> Result<(), GpuError> {
    if buf.len() == len {
        Ok(())
    } else {
        Err(shape(op, format!("{name} holds {} {} elements, expected {len}", buf.len(), T::NAME)))
    }
}

fn blocks_for(n: usize) -> u32 {
    (n.div_ceil(THREADS as usize)).clamp(1, MAX_BLOCKS as usize) as u32
}

/// Pointers to each argument value, as cuLaunchKernel wants them.
macro_rules! args {
    ($($arg:expr),* $(,)?) => {
        &mut [$((&$arg) as *const _ as *mut c_void),*]
    };
}

mod attention_gemm;
pub mod hopper;

/// Launches and, on the emulator, has already finished; on a GPU the launch is queued.
fn launch(
    dev: &Gpu,
    kernel: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_bytes: u32,
    args: &mut [*mut c_void],
) -> Result<(), GpuError> {
    // SAFETY: every caller below passes exactly the kernel's parameter list, with device
    // buffers whose lengths it has checked against the shapes.
    super::profile::time(
        dev,
        || kernel.to_string(),
        || unsafe { dev.launch(kernel, grid, block, shared_bytes, args) },
    )
}

fn elementwise(
    dev: &Gpu,
    kernel: &str,
    n: usize,
    args: &mut [*mut c_void],
) -> Result<(), GpuError> {
    launch(dev, kernel, (blocks_for(n), 1, 1), (THREADS, 1, 1), 0, args)
}

/// `out = f16(in)`, round to nearest even.
pub fn cast_f32_to_f16(
    dev: &Gpu,
    out: &mut DeviceBuffer<f16>,
    input: &DeviceBuffer<f32>,
) -> Result<(), GpuError> {
    const OP: &str = "cast_f32_to_f16";
    expect_len(OP, "out", out, input.len())?;
    let n = int(OP, "n", input.len())?;
    elementwise(dev, OP, input.len(), args![out.ptr(), input.ptr(), n])
}

/// `out = f32(in)`, exact.
pub fn cast_f16_to_f32(
    dev: &Gpu,
    out: &mut DeviceBuffer<f32>,
    input: &DeviceBuffer<f16>,
) -> Result<(), GpuError> {
    const OP: &str = "cast_f16_to_f32";
    expect_len(OP, "out", out, input.len())?;
    let n = int(OP, "n", input.len())?;
    elementwise(dev, OP, input.len(), args![out.ptr(), input.ptr(), n])
}

fn unary(
    op: &'static str,
    dev: &Gpu,
    y: &mut DeviceBuffer<f16>,
    x: &DeviceBuffer<f16>,
) -> Result<(), GpuError> {
    expect_len(op, "y", y, x.len())?;
    let n = int(op, "n", x.len())?;
    elementwise(dev, op, x.len(), args![y.ptr(), x.ptr(), n])
}

fn unary_backward(
    op: &'static str,
    dev: &Gpu,
    dx: &mut DeviceBuffer<f16>,
    dy: &DeviceBuffer<f16>,
    x: &DeviceBuffer<f16>,
) -> Result<(), GpuError> {
    expect_len(op, "dx", dx, x.len())?;
    expect_len(op, "dy", dy, x.len())?;
    let n = int(op, "n", x.len())?;
    elementwise(dev, op, x.len(), args![dx.ptr(), dy.ptr(), x.ptr(), n])
}

/// `y = gelu(x)` (tanh approximation).
pub fn gelu_forward(
    dev: &Gpu,
    y: &mut DeviceBuffer<f16>,
    x: &DeviceBuffer<f16>,
) -> Result<(), GpuError> {
    unary("gelu_forward_f16", dev, y, x)
}

/// `dx = dy · gelu'(x)`.
pub fn gelu_backward(
    dev: &Gpu,
    dx: &mut DeviceBuffer<f16>,
    dy: &DeviceBuffer<f16>,
    x: &DeviceBuffer<f16>,
) -> Result<(), GpuError> {
    unary_backward("gelu_backward_f16", dev, dx, dy, x)
}

/// `y = max(x, 0)`.
pub fn relu_forward(
    dev: &Gpu,
    y: &mut DeviceBuffer<f16>,
    x: &DeviceBuffer<f16>,
) -> Result<(), GpuError> {
    unary("relu_forward_f16", dev, y, x)
}

/// `dx = dy · [x > 0]`.
pub fn relu_backward(
    dev: &Gpu,
    dx: &mut DeviceBuffer<f16>,
    dy: &DeviceBuffer<f16>,
    x: &DeviceBuffer<f16>,
) -> Result<(), GpuError> {
    unary_backward("relu_backward_f16", dev, dx, dy, x)
}

/// `acc += x` (residual connections).
pub fn add_assign(
    dev: &Gpu,
    acc: &mut DeviceBuffer<f16>,
    x: &DeviceBuffer<f16>,
) -> Result<(), GpuError> {
    const OP: &str = "add_assign_f16";
    expect_len(OP, "x", x, acc.len())?;
    let n = int(OP, "n", acc.len())?;
    elementwise(dev, OP, acc.len(), args![acc.ptr(), x.ptr(), n])
}

/// `acc += x` in fp32 (gradient accumulation).
pub fn add_assign_f32(
    dev: &Gpu,
    acc: &mut DeviceBuffer<f32>,
    x: &DeviceBuffer<f32>,
) -> Result<(), GpuError> {
    const OP: &str = "add_assign_f32";
    expect_len(OP, "x", x, acc.len())?;
    let n = int(OP, "n", acc.len())?;
    elementwise(dev, OP, acc.len(), args![acc.ptr(), x.ptr(), n])
}

/// `buf *= factor`.
pub fn scale_f16(dev: &Gpu, buf: &mut DeviceBuffer<f16>, factor: f32) -> Result<(), GpuError> {
    let n = int("scale_f16", "n", buf.len())?;
    elementwise(dev, "scale_f16", buf.len(), args![buf.ptr(), factor, n])
}

/// `buf *= factor`.
pub fn scale_f32(dev: &Gpu, buf: &mut DeviceBuffer<f32>, factor: f32) -> Result<(), GpuError> {
    let n = int("scale_f32", "n", buf.len())?;
    elementwise(dev, "scale_f32", buf.len(), args![buf.ptr(), factor, n])
}

/// `fill_u64_list`'s parameter: the values, as the kernel's `U64List` lays them out.
#[repr(C)]
struct U64List([u64; U64_LIST]);

/// A device copy of `values`, written by launches whose parameters carry them (as many as
/// [`U64_LIST`] a launch), so it is ordered with the rest of the stream's work and the host
/// waits for nothing: the matrix addresses of a pointer-array batch of products
/// ([`GemmBatch::pointer_arrays`](super::GemmBatch::pointer_arrays)) the first time a batch
/// names its buffers (`gemm.rs` keeps them for the next time).
pub fn upload_in_order(dev: &Gpu, values: &[u64]) -> Result<DeviceBuffer<u64>, GpuError> {
    const OP: &str = "fill_u64_list";
    let out = DeviceBuffer::<u64>::uninit(dev, values.len())?;
    for (i, chunk) in values.chunks(U64_LIST).enumerate() {
        let mut list = U64List([0; U64_LIST]);
        list.0[..chunk.len()].copy_from_slice(chunk);
        let dst = out.ptr() + (i * U64_LIST * 8) as super::DevicePtr;
        let n = int(OP, "n", chunk.len())?;
        elementwise(dev, OP, chunk.len(), args![dst, list, n])?;
    }
    Ok(out)
}

/// `y[r, c] += b[c]` over `rows × cols`.
pub fn bias_add(
    dev: &Gpu,
    y: &mut DeviceBuffer<f16>,
    b: &DeviceBuffer<f16>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    const OP: &str = "bias_add_f16";
    expect_len(OP, "y", y, rows * cols)?;
    expect_len(OP, "b", b, cols)?;
    let (r, c) = (int(OP, "rows", rows)?, int(OP, "cols", cols)?);
    int(OP, "rows × cols", rows * cols)?;
    elementwise(dev, OP, rows * cols, args![y.ptr(), b.ptr(), r, c])
}

/// `db[c] += Σ_r dy[r, c]` (fp32; rows in fixed chunks, then the chunks in order): where the
/// shape and alignment allow, one launch whose last block per column tile adds the chunks
/// (`bias_backward_tile_f16`), else two (`bias_backward_partial_f16`, `column_sum_f32`).
pub fn bias_backward(
    dev: &Gpu,
    db: &mut DeviceBuffer<f32>,
    dy: &DeviceBuffer<f16>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    const OP: &str = "bias_backward";
    expect_len(OP, "dy", dy, rows * cols)?;
    expect_len(OP, "db", db, cols)?;
    let (r, c) = (int(OP, "rows", rows)?, int(OP, "cols", cols)?);
    int(OP, "rows × cols", rows * cols)?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    // Tiles of 64 columns, 8 a thread, where the shape and alignment allow.
    let tiled = cols % 8 == 0 && aligned_for_vectors(&[dy.ptr()]);
    let chunk = bias_grad_chunk(rows, tiled);
    let chunks = rows.div_ceil(chunk);
    if tiled {
        return bias_backward_tiled(dev, &[(db.ptr(), dy.ptr())], rows, cols);
    }
    let partials = DeviceBuffer::<f32>::uninit(dev, chunks * cols)?;
    let chunk_arg = int(OP, "chunk", chunk)?;
    let threads = THREADS.min(cols.next_multiple_of(32) as u32);
    let grid = (cols.div_ceil(threads as usize) as u32, chunks as u32, 1);
    let args = args![partials.ptr(), dy.ptr(), r, c, chunk_arg];
    launch(dev, "bias_backward_partial_f16", grid, (threads, 1, 1), 0, args)?;
    column_sums(dev, db, None, &partials, chunks, cols)
}

/// Tensors [`bias_backward_many`] takes in one launch (`bias_backward_tiles_f16`'s slots).
pub const BIAS_GRAD_TENSORS: usize = 4;

/// [`bias_backward`] for tensors of one shape, `dbs[i] += Σ_r dys[i][r, ·]`: where every one
/// takes the tiled kernel and there are 2 to [`BIAS_GRAD_TENSORS`], one launch for all
/// (`bias_backward_tiles_f16`, each tensor's bits as its own launch gives), else one
/// [`bias_backward`] each.
pub fn bias_backward_many(
    dev: &Gpu,
    dbs: &mut [&mut DeviceBuffer<f32>],
    dys: &[&DeviceBuffer<f16>],
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    const OP: &str = "bias_backward_many";
    if dbs.len() != dys.len() {
        let message = format!("{} bias gradients for {} output gradients", dbs.len(), dys.len());
        return Err(shape(OP, message));
    }
    for (db, dy) in dbs.iter().zip(dys) {
        expect_len(OP, "dy", dy, rows * cols)?;
        expect_len(OP, "db", db, cols)?;
    }
    int(OP, "rows × cols", rows * cols)?;
    let count = dbs.len();
    let pointers: Vec<u64> = dys.iter().map(|dy| dy.ptr()).collect();
    let tiled = cols % 8 == 0 && aligned_for_vectors(&pointers);
    if !(2..=BIAS_GRAD_TENSORS).contains(&count) || !tiled {
        for (db, dy) in dbs.iter_mut().zip(dys) {
            bias_backward(dev, db, dy, rows, cols)?;
        }
        return Ok(());
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let tensors: Vec<(super::DevicePtr, super::DevicePtr)> =
        dbs.iter().zip(dys).map(|(db, dy)| (db.ptr(), dy.ptr())).collect();
    bias_backward_tiled(dev, &tensors, rows, cols)
}

/// The tiled bias gradient of 1 to [`BIAS_GRAD_TENSORS`] tensors of one shape, given as (db,
/// dy) addresses (shapes checked, `rows` and `cols` not zero, `cols` a multiple of 8, every dy
/// aligned for vectors): one launch, `bias_backward_tile_f16` for one tensor,
/// `bias_backward_tiles_f16` (tensor z's partial rows and counters the z-th of each) for more.
fn bias_backward_tiled(
    dev: &Gpu,
    tensors: &[(super::DevicePtr, super::DevicePtr)],
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    const OP: &str = "bias_backward";
    let count = tensors.len();
    let (r, c) = (int(OP, "rows", rows)?, int(OP, "cols", cols)?);
    let chunk = bias_grad_chunk(rows, true);
    let (chunks, tiles) = (rows.div_ceil(chunk), cols.div_ceil(64));
    let chunk_arg = int(OP, "chunk", chunk)?;
    let partials = DeviceBuffer::<f32>::uninit(dev, count * chunks * cols)?;
    // One counter a column tile, the device's, at zero: the kernel puts each back (a memset a
    // call was one more queued operation between kernels, 96 a seed-768 step).
    let counters = dev.zeroed_counters(count * tiles)?;
    let grid = (tiles as u32, chunks as u32, count as u32);
    if let [(db, dy)] = tensors {
        let args = args![*db, partials.ptr(), counters, *dy, r, c, chunk_arg];
        return launch(dev, "bias_backward_tile_f16", grid, (8, 32, 1), 0, args);
    }
    // Unused slots null (grid.z stops before them).
    let (mut outs, mut dys) = ([0u64; BIAS_GRAD_TENSORS], [0u64; BIAS_GRAD_TENSORS]);
    for (z, &(db, dy)) in tensors.iter().enumerate() {
        (outs[z], dys[z]) = (db, dy);
    }
    let ([out0, out1, out2, out3], [dy0, dy1, dy2, dy3]) = (outs, dys);
    let args = args![
        out0,
        out1,
        out2,
        out3,
        dy0,
        dy1,
        dy2,
        dy3,
        partials.ptr(),
        counters,
        r,
        c,
        chunk_arg
    ];
    launch(dev, "bias_backward_tiles_f16", grid, (8, 32, 1), 0, args)
}

/// Rows per partial sum of the bias gradient, from `rows` alone (so the summation order
/// depends on the shape only): tiled, at most [`BIAS_GRAD_TILE_PARTIALS`] partial rows (at
/// least 256 rows, 8 a row lane); else enough chunks to fill the GPU, at most 65,535 (grid.y's
/// limit).
pub fn bias_grad_chunk(rows: usize, tiled: bool) -> usize {
    if tiled {
        BIAS_GRAD_TILE_ROWS.max(rows.div_ceil(BIAS_GRAD_TILE_PARTIALS).next_multiple_of(32))
    } else {
        BIAS_GRAD_ROWS.max(rows.div_ceil(65_535))
    }
}

/// `out[c] += Σ_k partials[k·total + c]` for `k < count`, `c < total`, in a fixed order
/// (`column_sum_f32`), where `out` is `lo` followed by `hi` when given (each `width` long,
/// `total` their joint width): the second pass of the bias (`lo` alone) and LayerNorm (dγ
/// then dβ, one launch) parameter gradients.
fn column_sums(
    dev: &Gpu,
    lo: &mut DeviceBuffer<f32>,
    hi: Option<&mut DeviceBuffer<f32>>,
    partials: &DeviceBuffer<f32>,
    count: usize,
    width: usize,
) -> Result<(), GpuError> {
    const OP: &str = "column_sum_f32";
    expect_len(OP, "out", lo, width)?;
    if let Some(hi) = hi.as_deref() {
        expect_len(OP, "second out", hi, width)?;
    }
    let total = if hi.is_some() { 2 * width } else { width };
    if width == 0 {
        return Ok(());
    }
    if count * total > partials.len() {
        return Err(shape(
            OP,
            format!("{count} rows of {total} overflow {} partials", partials.len()),
        ));
    }
    let (n, t, w) = (int(OP, "count", count)?, int(OP, "width", total)?, int(OP, "split", width)?);
    let lo_ptr = lo.ptr();
    // Without a second output every column is below the split, so `hi` is never written.
    let hi_ptr = hi.map_or(lo_ptr, |hi| hi.ptr());
    launch(
        dev,
        OP,
        (total.div_ceil(32) as u32, 1, 1),
        (32, 32, 1),
        0,
        args![lo_ptr, hi_ptr, partials.ptr(), n, t, w, t],
    )
}

/// Inverted dropout in place, dropping exactly the elements the CPU backend drops.
pub fn dropout(
    dev: &Gpu,
    buf: &mut DeviceBuffer<f16>,
    p: f32,
    key: DropoutKey,
) -> Result<(), GpuError> {
    const OP: &str = "dropout_f16";
    let (base, threshold, keep_scale) = dropout_args(OP, p, key)?;
    if threshold == 0 {
        // Nothing dropped, nothing scaled (p below 2^-17).
        return Ok(());
    }
    let n = int(OP, "n", buf.len())?;
    require_vector_aligned(OP, &[buf.ptr()])?;
    let threads = buf.len().div_ceil(8);
    elementwise(dev, OP, threads, args![buf.ptr(), base, threshold, keep_scale, n])
}

/// An error unless every buffer starts 16-byte aligned (a device allocation always does), for
/// kernels that take eight halves at a time with 128-bit accesses and have no scalar form.
fn require_vector_aligned(op: &'static str, buffers: &[super::DevicePtr]) -> Result<(), GpuError> {
    if aligned_for_vectors(buffers) {
        Ok(())
    } else {
        Err(shape(op, "a buffer does not start 16-byte aligned".into()))
    }
}

/// The dropout kernels' key arguments for `p` in [0, 1): the mask's base, the drop threshold,
/// the survivors' scale (the CPU backend's, so both drop the same elements by the same
/// factor).
fn dropout_args(op: &'static str, p: f32, key: DropoutKey) -> Result<(u64, u64, f32), GpuError> {
    if !(0.0..1.0).contains(&p) {
        return Err(shape(op, format!("p = {p} must be in [0, 1)")));
    }
    let threshold = dropout_threshold(p);
    // The CPU's scale (a p that drops nothing, below 2^-17, scales nothing).
    Ok((dropout_base(key), threshold, dropout_scale(threshold) as f32))
}

/// `x = residual + dropout(x)` in one pass (bit for bit [`dropout`] on `x`, then
/// [`add_assign`] of `residual`).
pub fn add_dropped(
    dev: &Gpu,
    x: &mut DeviceBuffer<f16>,
    residual: &DeviceBuffer<f16>,
    p: f32,
    key: DropoutKey,
) -> Result<(), GpuError> {
    dropout_into("add_dropped_f16", dev, x, residual, p, key)
}

/// `out = dropout(x)` in one pass (bit for bit a copy, then [`dropout`]).
pub fn dropped_copy(
    dev: &Gpu,
    out: &mut DeviceBuffer<f16>,
    x: &DeviceBuffer<f16>,
    p: f32,
    key: DropoutKey,
) -> Result<(), GpuError> {
    dropout_into("dropped_copy_f16", dev, out, x, p, key)
}

/// A fused dropout kernel `op(out, other, key…)` over equal-length buffers.
fn dropout_into(
    op: &'static str,
    dev: &Gpu,
    out: &mut DeviceBuffer<f16>,
    x: &DeviceBuffer<f16>,
    p: f32,
    key: DropoutKey,
) -> Result<(), GpuError> {
    let (base, threshold, keep_scale) = dropout_args(op, p, key)?;
    expect_len(op, "x", x, out.len())?;
    let n = int(op, "n", out.len())?;
    require_vector_aligned(op, &[out.ptr(), x.ptr()])?;
    let threads = out.len().div_ceil(8);
    elementwise(dev, op, threads, args![out.ptr(), x.ptr(), base, threshold, keep_scale, n])
}

/// Threads per row for row-wise kernels: a multiple of 32, at most 1024, about one per
/// 4 elements.
fn row_threads(width: usize) -> u32 {
    (width.div_ceil(4).div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// LayerNorm forward over `rows × width`; writes `mean`, `rstd` `[rows]` (fp32).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    dev: &Gpu,
    y: &mut DeviceBuffer<f16>,
    mean: &mut DeviceBuffer<f32>,
    rstd: &mut DeviceBuffer<f32>,
    x: &DeviceBuffer<f16>,
    gamma: &DeviceBuffer<f16>,
    beta: &DeviceBuffer<f16>,
    rows: usize,
    width: usize,
) -> Result<(), GpuError> {
    const OP: &str = "layernorm_forward_f16";
    expect_len(OP, "x", x, rows * width)?;
    expect_len(OP, "y", y, rows * width)?;
    expect_len(OP, "mean", mean, rows)?;
    expect_len(OP, "rstd", rstd, rows)?;
    expect_len(OP, "gamma", gamma, width)?;
    expect_len(OP, "beta", beta, width)?;
    let (r, w) = (int(OP, "rows", rows)?, int(OP, "width", width)?);
    if rows == 0 {
        return Ok(());
    }
    let args = args![y.ptr(), mean.ptr(), rstd.ptr(), x.ptr(), gamma.ptr(), beta.ptr(), r, w];
    match layernorm_vectors(width, &[y.ptr(), x.ptr(), gamma.ptr(), beta.ptr()]) {
        // One warp per row.
        Some(vecs) => launch(
            dev,
            LN_VEC_FORWARD[vecs - 1],
            (rows.div_ceil((THREADS / 32) as usize) as u32, 1, 1),
            (THREADS, 1, 1),
            0,
            args,
        ),
        None => launch(dev, OP, (rows as u32, 1, 1), (row_threads(width), 1, 1), 0, args),
    }
}

/// `x = residual + dropout(x)` (`p` 0: `x += residual`), then the LayerNorm of that sum into
/// `y`, `mean`, `rstd`: one pass over the rows where the vector kernels apply (a width that is
/// a multiple of 8, up to 1,024), bit for bit [`add_dropped`] (or [`add_assign`]) then
/// [`layernorm_forward`], which it runs otherwise.
#[allow(clippy::too_many_arguments)]
pub fn add_dropped_layernorm_forward(
    dev: &Gpu,
    x: &mut DeviceBuffer<f16>,
    residual: &DeviceBuffer<f16>,
    p: f32,
    key: DropoutKey,
    y: &mut DeviceBuffer<f16>,
    mean: &mut DeviceBuffer<f32>,
    rstd: &mut DeviceBuffer<f32>,
    gamma: &DeviceBuffer<f16>,
    beta: &DeviceBuffer<f16>,
    rows: usize,
    width: usize,
) -> Result<(), GpuError> {
    const OP: &str = "layernorm_forward_add_dropped";
    let (base, threshold, keep_scale) = dropout_args(OP, p, key)?;
    expect_len(OP, "x", x, rows * width)?;
    expect_len(OP, "residual", residual, rows * width)?;
    expect_len(OP, "y", y, rows * width)?;
    expect_len(OP, "mean", mean, rows)?;
    expect_len(OP, "rstd", rstd, rows)?;
    expect_len(OP, "gamma", gamma, width)?;
    expect_len(OP, "beta", beta, width)?;
    let (r, w) = (int(OP, "rows", rows)?, int(OP, "width", width)?);
    let buffers = [y.ptr(), x.ptr(), residual.ptr(), gamma.ptr(), beta.ptr()];
    let Some(vecs) = layernorm_vectors(width, &buffers) else {
        if p > 0.0 {
            add_dropped(dev, x, residual, p, key)?;
        } else {
            add_assign(dev, x, residual)?;
        }
        return layernorm_forward(dev, y, mean, rstd, x, gamma, beta, rows, width);
    };
    if rows == 0 {
        return Ok(());
    }
    launch(
        dev,
        LN_VEC_FORWARD_ADD_DROPPED[vecs - 1],
        (rows.div_ceil((THREADS / 32) as usize) as u32, 1, 1),
        (THREADS, 1, 1),
        0,
        args![
            y.ptr(),
            mean.ptr(),
            rstd.ptr(),
            x.ptr(),
            residual.ptr(),
            gamma.ptr(),
            beta.ptr(),
            r,
            w,
            base,
            threshold,
            keep_scale
        ],
    )
}

/// Whether every buffer is 16-byte aligned, as the 8-half (128-bit) loads and stores of the
/// vector kernels need (`chingu::load_half8`).
fn aligned_for_vectors(buffers: &[super::DevicePtr]) -> bool {
    buffers.iter().all(|&p| p % 16 == 0)
}

/// The vector LayerNorm kernels' size class (`_vec{1,2,3,4}`: rows up to 256 × it wide) when
/// they apply: a width that is a multiple of 8 and at most 1,024, and every buffer 16-byte
/// aligned (then so is every row, 8 halves being 16 bytes).
fn layernorm_vectors(width: usize, buffers: &[super::DevicePtr]) -> Option<usize> {
    (aligned_for_vectors(buffers) && width % 8 == 0 && (1..=1024).contains(&width))
        .then(|| width.div_ceil(256))
}

/// LayerNorm backward: `dx += …` (fp16), `dgamma += …`, `dbeta += …` (fp32).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dev: &Gpu,
    dx: &mut DeviceBuffer<f16>,
    dgamma: &mut DeviceBuffer<f32>,
    dbeta: &mut DeviceBuffer<f32>,
    dy: &DeviceBuffer<f16>,
    x: &DeviceBuffer<f16>,
    mean: &DeviceBuffer<f32>,
    rstd: &DeviceBuffer<f32>,
    gamma: &DeviceBuffer<f16>,
    rows: usize,
    width: usize,
) -> Result<(), GpuError> {
    layernorm_backward_then(dev, dx, dgamma, dbeta, dy, x, mean, rstd, gamma, rows, width, None)
}

/// [`layernorm_backward`], then `dropped` = dropout(dx) (`p` 0: a copy of dx): one pass over
/// the rows where the vector kernels apply, bit for bit [`layernorm_backward`] then
/// [`dropped_copy`], which it runs otherwise.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_dropped(
    dev: &Gpu,
    dx: &mut DeviceBuffer<f16>,
    dgamma: &mut DeviceBuffer<f32>,
    dbeta: &mut DeviceBuffer<f32>,
    dy: &DeviceBuffer<f16>,
    x: &DeviceBuffer<f16>,
    mean: &DeviceBuffer<f32>,
    rstd: &DeviceBuffer<f32>,
    gamma: &DeviceBuffer<f16>,
    rows: usize,
    width: usize,
    dropped: &mut DeviceBuffer<f16>,
    p: f32,
    key: DropoutKey,
) -> Result<(), GpuError> {
    let then = Some((dropped, p, key));
    layernorm_backward_then(dev, dx, dgamma, dbeta, dy, x, mean, rstd, gamma, rows, width, then)
}

/// [`layernorm_backward`], and where `then` is given, its dropout of dx.
#[allow(clippy::too_many_arguments)]
fn layernorm_backward_then(
    dev: &Gpu,
    dx: &mut DeviceBuffer<f16>,
    dgamma: &mut DeviceBuffer<f32>,
    dbeta: &mut DeviceBuffer<f32>,
    dy: &DeviceBuffer<f16>,
    x: &DeviceBuffer<f16>,
    mean: &DeviceBuffer<f32>,
    rstd: &DeviceBuffer<f32>,
    gamma: &DeviceBuffer<f16>,
    rows: usize,
    width: usize,
    then: Option<(&mut DeviceBuffer<f16>, f32, DropoutKey)>,
) -> Result<(), GpuError> {
    const OP: &str = "layernorm_backward_f16";
    let dropout = match &then {
        Some((dropped, p, key)) => {
            expect_len(OP, "dropped", dropped, rows * width)?;
            Some((dropped.ptr(), dropout_args(OP, *p, *key)?))
        }
        None => None,
    };
    for (name, len) in [("dx", dx.len()), ("dy", dy.len()), ("x", x.len())] {
        if len != rows * width {
            return Err(shape(
                OP,
                format!("{name} holds {len} elements, expected {}", rows * width),
            ));
        }
    }
    expect_len(OP, "mean", mean, rows)?;
    expect_len(OP, "rstd", rstd, rows)?;
    expect_len(OP, "gamma", gamma, width)?;
    expect_len(OP, "dgamma", dgamma, width)?;
    expect_len(OP, "dbeta", dbeta, width)?;
    let (r, w) = (int(OP, "rows", rows)?, int(OP, "width", width)?);
    if rows == 0 {
        return Ok(());
    }
    // The dropout fused into the vector kernels where they apply (its buffer aligned too).
    let fused = dropout.filter(|&(ptr, _)| {
        layernorm_vectors(width, &[dx.ptr(), dy.ptr(), x.ptr(), gamma.ptr(), ptr]).is_some()
    });
    // (kernel, blocks, threads, dynamic shared bytes, rows per worker, workers): one warp per
    // row up to 1,024 wide (its parameter-gradient partials in registers, see layernorm.cu),
    // else one block per row chunk.
    let vectors = layernorm_vectors(width, &[dx.ptr(), dy.ptr(), x.ptr(), gamma.ptr()]);
    let (kernel, blocks, threads, shared, per_worker, workers) = if let Some(vecs) = vectors {
        // One warp per row, its row sweeps in registers, one partial per block (its warps'
        // sums added in shared memory): a function of `rows` alone, so is the summation order.
        let warps_per_block = (THREADS / 32) as usize;
        let capped = ln_backward_blocks().map_or(0, |cap| rows.div_ceil(cap * warps_per_block));
        let per_warp = LN_VEC_MIN_ROWS_PER_WARP
            .max(rows.div_ceil(LN_MAX_PARTIALS * warps_per_block))
            .max(capped);
        let blocks = rows.div_ceil(per_warp * warps_per_block);
        let kernels = if fused.is_some() { LN_VEC_BACKWARD_DROPPED } else { LN_VEC_BACKWARD };
        (kernels[vecs - 1], blocks, THREADS, 0, per_warp, blocks)
    } else if width <= 1024 {
        let kernel = match width {
            0..=256 => "layernorm_backward_w256_f16",
            257..=512 => "layernorm_backward_w512_f16",
            _ => "layernorm_backward_w1024_f16",
        };
        // Rows per warp: a function of `rows` alone (so is the summation order), at most
        // LN_MAX_PARTIALS warps' partials to add up.
        let per_warp = LN_MIN_ROWS_PER_WARP.max(rows.div_ceil(LN_MAX_PARTIALS));
        let warps = rows.div_ceil(per_warp);
        let blocks = warps.div_ceil((THREADS / 32) as usize);
        (kernel, blocks, THREADS, 0, per_warp, warps)
    } else {
        let shared = u32::try_from(2 * width * size_of::<f32>())
            .ok()
            .filter(|&b| b <= 48 * 1024)
            .ok_or_else(|| {
            shape(OP, format!("width {width} needs more than 48 KiB of shared memory"))
        })?;
        let blocks = rows.div_ceil(LN_ROWS_PER_BLOCK);
        (OP, blocks, row_threads(width), shared, LN_ROWS_PER_BLOCK, blocks)
    };
    let partials = DeviceBuffer::<f32>::uninit(dev, workers * 2 * width)?;
    let per_worker_arg = int(OP, "rows per worker", per_worker)?;
    let grid = (blocks as u32, 1, 1);
    let (dx_ptr, partials_ptr, dy_ptr, x_ptr) = (dx.ptr(), partials.ptr(), dy.ptr(), x.ptr());
    let (mean_ptr, rstd_ptr, gamma_ptr) = (mean.ptr(), rstd.ptr(), gamma.ptr());
    match fused {
        Some((dropped, (base, threshold, keep_scale))) => launch(
            dev,
            kernel,
            grid,
            (threads, 1, 1),
            shared,
            args![
                dx_ptr,
                partials_ptr,
                dy_ptr,
                x_ptr,
                mean_ptr,
                rstd_ptr,
                gamma_ptr,
                r,
                w,
                per_worker_arg,
                dropped,
                base,
                threshold,
                keep_scale
            ],
        )?,
        None => launch(
            dev,
            kernel,
            grid,
            (threads, 1, 1),
            shared,
            args![
                dx_ptr,
                partials_ptr,
                dy_ptr,
                x_ptr,
                mean_ptr,
                rstd_ptr,
                gamma_ptr,
                r,
                w,
                per_worker_arg
            ],
        )?,
    }
    column_sums(dev, dgamma, Some(dbeta), &partials, workers, width)?;
    if let (None, Some((dropped, p, key))) = (fused, then) {
        dropped_copy(dev, dropped, dx, p, key)?;
    }
    // The scratch buffer goes back to the device's allocator, which only hands it to later
    // work on the same stream: no need to wait for the kernels here.
    Ok(())
}

/// The attention launchers' common checks; returns the kernels' int arguments
/// `[batch, q_len, k_len, heads, head_dim, causal, q_offset]` and the key lengths, clamped to
/// `k_len` as the CPU backend clamps them, uploaded as ints.
fn attention_args(
    dev: &Gpu,
    op: &'static str,
    key_len: &[usize],
    s: AttentionShape,
) -> Result<([i32; 7], Arc<DeviceBuffer<i32>>), GpuError> {
    if s.head_dim == 0 || s.head_dim % 16 != 0 || s.head_dim > ATTN_MAX_HEAD_DIM {
        return Err(shape(
            op,
            format!(
                "head_dim {} must be a positive multiple of 16, at most {ATTN_MAX_HEAD_DIM}",
                s.head_dim
            ),
        ));
    }
    if key_len.len() != s.batch {
        return Err(shape(op, format!("{} key lengths for {} batch rows", key_len.len(), s.batch)));
    }
    if s.batch > 65_535 || s.heads > 65_535 {
        return Err(shape(op, format!("batch {} or heads {} over 65535", s.batch, s.heads)));
    }
    let d = s.width();
    int(op, "batch × q_len × D", s.batch * s.q_len * d)?;
    int(op, "batch × k_len × D", s.batch * s.k_len * d)?;
    int(op, "batch × heads × q_len", s.batch * s.heads * s.q_len)?;
    int(op, "q_offset + q_len", s.q_offset + s.q_len)?;
    let ints = [
        int(op, "batch", s.batch)?,
        int(op, "q_len", s.q_len)?,
        int(op, "k_len", s.k_len)?,
        int(op, "heads", s.heads)?,
        int(op, "head_dim", s.head_dim)?,
        i32::from(s.causal),
        int(op, "q_offset", s.q_offset)?,
    ];
    let lens = key_lengths(dev, op, key_len.iter().map(|&l| l.min(s.k_len)))?;
    Ok((ints, lens))
}

/// Key-length vectors kept on their devices, the most recent last.
type LengthCache = Vec<(Gpu, Vec<i32>, Arc<DeviceBuffer<i32>>)>;

/// How many key-length vectors [`key_lengths`] keeps a device: a training step has two or
/// three (the source's, the target's) that every one of its attention calls reads…
const KEY_LENGTHS_KEPT: usize = 8;
/// …and for all devices together (a process with many, such as the tests).
const KEY_LENGTHS_KEPT_IN_ALL: usize = 64;

/// `values` on `dev`, uploaded once while they are among the last [`KEY_LENGTHS_KEPT`] asked
/// for on that device: an upload from pageable memory waits for the device to finish its queue, and a step
/// makes ~36 attention calls with the same two or three vectors (a host-bound step paid for
/// each wait). The buffers are never written after their upload, so sharing them is safe.
fn key_lengths(
    dev: &Gpu,
    op: &'static str,
    values: impl Iterator<Item = usize>,
) -> Result<Arc<DeviceBuffer<i32>>, GpuError> {
    static KEPT: Mutex<LengthCache> = Mutex::new(Vec::new());
    let host = values.map(|v| int(op, "index", v)).collect::<Result<Vec<i32>, _>>()?;
    let lock = || KEPT.lock().unwrap_or_else(|e| e.into_inner());
    // The device is known by its address (a kept buffer holds it, so no other takes it).
    let same = |d: &Gpu| Arc::ptr_eq(d, dev);
    let found = {
        let mut kept = lock();
        let i = kept.iter().position(|(d, v, _)| same(d) && *v == host);
        i.map(|i| kept.remove(i))
    };
    // A new vector is uploaded outside the lock: the upload waits for this device's queue,
    // which must not hold up another device's attention calls.
    let entry = match found {
        Some(entry) => entry,
        None => {
            let buf = Arc::new(DeviceBuffer::from_host(dev, &host)?);
            (dev.clone(), host, buf)
        }
    };
    let buf = entry.2.clone();
    let mut evicted = Vec::new();
    let mut kept = lock();
    kept.push(entry);
    if kept.iter().filter(|(d, _, _)| same(d)).count() > KEY_LENGTHS_KEPT {
        let oldest = kept.iter().position(|(d, _, _)| same(d));
        evicted.push(kept.remove(oldest.unwrap_or(0)));
    }
    if kept.len() > KEY_LENGTHS_KEPT_IN_ALL {
        evicted.push(kept.remove(0));
    }
    drop(kept);
    // Freed (and a device perhaps closed) with the lock released.
    drop(evicted);
    Ok(buf)
}

/// The three attention kernels, each in WMMA and register-resident instances, one per
/// accumulator width.
#[derive(Clone, Copy)]
enum AttnKernel {
    Forward,
    KeysValues,
    Queries,
}

/// Which attention kernels the launchers run. Chosen by shape by default
/// ([`AttentionKernels::fastest_for`]); `CHINGU_ATTN=wmma|mma|gemm|wgmma` picks one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernels {
    /// The WMMA kernels (scores through shared memory): the fastest for wide heads at short
    /// lengths (GPU run 17), and where the register-resident ones get no shared memory.
    Wmma,
    /// Every attention kernel with the scores in registers through mma.sync's documented
    /// fragments (`attention_forward_mma_c*`, `attention_backward_dq_mma_c*`,
    /// `attention_backward_dkdv_mma_*`): the fastest at heads up to 64 wide (GPU run 16).
    Mma,
    /// The forward through Hopper's warpgroup MMA (`attention_forward_wgmma_c*`: wgmma from
    /// shared memory, an H100 or H200 only), its backward the family chosen by shape
    /// (`fastest_for`, from the lse it keeps). Only where asked for (`CHINGU_ATTN=wgmma`)
    /// until a GPU run has timed it.
    Wgmma,
    /// The scores materialised, the products through cuBLASLt's batched GEMMs and only the
    /// softmax and its gradient in our kernels (`attention_gemm.rs`): more memory traffic,
    /// tensor-core products at cuBLASLt's speed; the fastest for wider heads at long lengths
    /// (runs 16 and 17).
    Gemm {
        /// Scores (Tq·Tk per batch row and head) each chunk of the scratch holds, at least
        /// one block's: the scratch's bound (12 bytes a score, 6 with P kept; 8 and 4 with fp16 scores), and P's: kept
        /// where all of it fits this bound.
        scores_per_chunk: usize,
        /// Query rows a band of causal self-attention's scores (0: no bands): each band's
        /// products cover only the keys it can see, so the scores above the bands' diagonal
        /// are never computed (`attention_gemm::band_rows`).
        causal_band: usize,
        /// S = Q·Kᵀ and dP = dO·Vᵀ stored in fp16 instead of fp32 ([`SCORES_VAR`]).
        half_scores: bool,
    },
}

/// The variable that picks one attention family for every shape.
pub const ATTENTION_VAR: &str = "CHINGU_ATTN";

/// The variable that, set to `0`, has the GEMM attention path recompute P in its backward
/// instead of keeping it from its forward (less memory: 2 bytes a score, ~150 MB an attention
/// call at seed-768's 18 × 1024 tokens; slower; dS from P at fp32 rather than fp16, so the
/// gradients' last bits differ).
pub const SAVE_PROBS_VAR: &str = "CHINGU_ATTN_SAVE_PROBS";

/// The variable that picks how the register-resident attention kernels load their walked
/// tiles: in two stages (the next tile's cp.async copies in flight while one is used) or one
/// (load, barrier, use). Unset: per kernel, two where they cost no occupancy
/// ([`choose_mma_launch`]: a multiprocessor runs as many warps of two-stage blocks as of
/// one-stage ones — on an H100 at every head width, on an RTX 4090 with its 100 KiB an SM
/// one stage for dQ at head width 64), else one; `1`: two wherever one block fits; `0`: one.
pub const PIPELINE_VAR: &str = "CHINGU_ATTN_PIPELINE";

/// Where the device cannot count resident blocks (the emulator): two-stage blocks the shared
/// memory must hold for the two-stage kernels to be chosen — as many as the one-stage dQ
/// kernel's registers let run at head width 64 (165 a thread: three blocks of 4 warps in 64
/// Ki registers).
const PIPELINED_BLOCKS: usize = 3;

/// [`PIPELINE_VAR`]: `None` unset (by occupancy), else forced on or off (read once).
fn pipeline_from_env() -> Option<bool> {
    static PIPELINE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    *PIPELINE.get_or_init(|| crate::settings::switch(PIPELINE_VAR))
}

/// The variable that sets the warps a block of the register-resident attention kernels: `4`
/// (64 rows of the block's own dimension) or `8` (128: each walked tile loaded once for twice
/// the rows, half the traffic; the forward only where its walked tile holds the block's
/// queries, heads up to 192 wide). Unset: heads up to 64 wide take 4 (measured, GPU runs
/// 16–21); wider heads take whichever keeps more warps resident ([`choose_mma_launch`]).
pub const WARPS_VAR: &str = "CHINGU_ATTN_WARPS";

/// [`WARPS_VAR`]: `None` unset, else the warps asked for (read once; a value other than 4 or
/// 8 is warned about and ignored).
fn warps_from_env() -> Option<usize> {
    static WARPS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *WARPS.get_or_init(|| {
        crate::settings::read(WARPS_VAR, "4 or 8", |t| match t {
            "4" => Some(4),
            "8" => Some(8),
            _ => None,
        })
    })
}

/// One way to launch a register-resident attention kernel: warps a block, stages of walked
/// tiles, the instance, its dynamic shared memory in bytes, and the blocks a multiprocessor
/// runs at once at that size where the device can count them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MmaOption {
    warps: usize,
    stages: usize,
    kernel: &'static str,
    shared: usize,
    resident: Option<usize>,
}

/// The launch to take of `options` (those that fit, in order of preference: more warps, then
/// two stages). A forced warp count or stage count ([`WARPS_VAR`], [`PIPELINE_VAR`]) keeps the
/// options that have it, where any does. Then, where the device counts resident blocks: the
/// option with the most resident warps, the first of equals (so a second stage or a wider block
/// is taken where it costs no occupancy: the copies hide behind the products, and a tile loaded
/// once serves more rows; GPU run 20: two stages took 20% off seed-256's attention at head width
/// 64). Where it cannot (the emulator): 4 warps, two stages where `shared_limit` holds
/// [`PIPELINED_BLOCKS`] of them.
fn choose_mma_launch(
    options: &[MmaOption],
    forced_warps: Option<usize>,
    forced_pipeline: Option<bool>,
    shared_limit: usize,
) -> Option<MmaOption> {
    // An option the device counts no block of cannot launch at all.
    let mut kept: Vec<MmaOption> =
        options.iter().filter(|o| o.resident != Some(0)).copied().collect();
    let keep = |kept: &mut Vec<MmaOption>, want: &dyn Fn(&MmaOption) -> bool| {
        if kept.iter().any(want) {
            kept.retain(want);
        }
    };
    if let Some(warps) = forced_warps {
        keep(&mut kept, &|o| o.warps == warps);
    }
    if let Some(two) = forced_pipeline {
        let stages = if two { 2 } else { 1 };
        keep(&mut kept, &|o| o.stages == stages);
    }
    if kept.iter().all(|o| o.resident.is_some()) {
        let warps = |o: &MmaOption| o.resident.unwrap_or(0) * o.warps;
        let most = kept.iter().map(warps).max()?;
        return kept.into_iter().find(|o| warps(o) == most);
    }
    keep(&mut kept, &|o| o.warps == 4);
    if forced_pipeline.is_none() {
        let held = |o: &MmaOption| o.stages == 2 && PIPELINED_BLOCKS * o.shared <= shared_limit;
        if !kept.iter().any(held) {
            keep(&mut kept, &|o| o.stages == 1);
        }
    }
    kept.first().copied()
}

/// The variable that sets how the GEMM attention path stores the scores S = Q·Kᵀ and their
/// gradient dP = dO·Vᵀ: `f16` (the default: half the bytes written by those products and read
/// by the softmax and the scores backward, ~18 of the ~50 bytes a score of a training step; the
/// precision of the reference, PyTorch's eager attention under autocast, whose
/// `q @ kᵀ` and its gradient are fp16 too, and of Megatron's fused softmax: a score rounded to
/// fp16 moves P by up to 2⁻¹¹·|scale·s| relative, ~0.5% at a logit of 10) or `f32`
/// (FlashAttention's precision: the softmax and dS from fp32 products, as before).
/// Not yet timed on a GPU: `scripts/gpu-check` times seed-768 both ways.
pub const SCORES_VAR: &str = "CHINGU_ATTN_SCORES";

/// [`SCORES_VAR`]: `Some(true)` for `f16`, `Some(false)` for `f32`, `None` unset (read once; any
/// other value is warned about and ignored).
fn half_scores_from_env() -> Option<bool> {
    static HALF: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    *HALF.get_or_init(|| {
        crate::settings::read(SCORES_VAR, "f32 or f16", |t| match t.to_ascii_lowercase().as_str() {
            "f16" | "fp16" | "half" => Some(true),
            "f32" | "fp32" | "float" => Some(false),
            _ => None,
        })
    })
}

/// The variable that sets the GEMM attention path's causal band in query rows (`0`: no bands;
/// rounded up to 8; default 512, [`AttentionKernels::GEMM`]).
pub const CAUSAL_BAND_VAR: &str = "CHINGU_ATTN_CAUSAL_BAND";

/// [`CAUSAL_BAND_VAR`]'s rows, `None` where it is unset (read once; a value that is not a
/// whole number is warned about and ignored).
fn causal_band_from_env() -> Option<usize> {
    static BAND: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *BAND.get_or_init(|| {
        crate::settings::read(CAUSAL_BAND_VAR, "a whole number of rows", |t| t.parse().ok())
    })
}

/// False where [`SAVE_PROBS_VAR`] is off (read once; unset keeps P).
fn save_probs_from_env() -> bool {
    static SAVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SAVE.get_or_init(|| crate::settings::switch(SAVE_PROBS_VAR).unwrap_or(true))
}

/// f32 elements of the statistics buffer attention of shape `s` takes on `dev`: those of the
/// family [`attention_kernels`] picks ([`AttentionKernels::stats_len`]), lse alone where
/// [`SAVE_PROBS_VAR`] is `0`.
pub fn attention_stats_len(dev: &Gpu, s: AttentionShape) -> usize {
    if save_probs_from_env() {
        attention_kernels(dev, s).stats_len(s)
    } else {
        s.batch * s.heads * s.q_len
    }
}

impl AttentionKernels {
    /// The GEMM path with 2^27 scores a chunk (at most 1.5 GiB of scratch; seed-768's 72
    /// blocks of 1024 × 1024 at 18 × 1024 tokens in one chunk, 864 MiB): `kernel_bench` in
    /// run 17 timed seed-768's backward at 1,024 µs in one chunk against 1,220 µs in three.
    ///
    /// Causal self-attention goes in bands of 512 query rows: at seed-768's 1024 tokens, two
    /// bands, a quarter of the decoder's self-attention scores skipped (GPU run 20: seed-768
    /// 3.4% faster than without bands; run 21: bands of 256 or 128 rows no faster than 512;
    /// [`CAUSAL_BAND_VAR`] changes the band, `0` turns bands off).
    ///
    /// S and dP stored in fp16 ([`SCORES_VAR`]`=f32` keeps them in fp32).
    pub const GEMM: Self =
        Self::Gemm { scores_per_chunk: 1 << 27, causal_band: 512, half_scores: true };

    /// The family `value` names (`wmma`, `mma`, `gemm`), `None` for `auto`; an error names
    /// the accepted values.
    pub fn parse(value: &str) -> Result<Option<Self>, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(None),
            "wmma" => Ok(Some(Self::Wmma)),
            "mma" => Ok(Some(Self::Mma)),
            "gemm" => Ok(Some(Self::GEMM)),
            "wgmma" => Ok(Some(Self::Wgmma)),
            other => {
                Err(format!("{ATTENTION_VAR}={other:?}: expected auto, wmma, mma, gemm or wgmma"))
            }
        }
    }

    /// The family `CHINGU_ATTN` asks for, `None` where it is unset or `auto`; read once (a
    /// value it does not know is warned about and read as `auto`).
    pub fn from_env() -> Option<Self> {
        static KERNELS: std::sync::OnceLock<Option<AttentionKernels>> = std::sync::OnceLock::new();
        *KERNELS.get_or_init(|| {
            for old in ["CHINGU_ATTN_MMA", "CHINGU_ATTN_GEMM"] {
                if std::env::var_os(old).is_some() {
                    tracing::warn!(
                        "{old} is no longer read: {ATTENTION_VAR}=mma or gemm forces a family"
                    );
                }
            }
            let value = std::env::var(ATTENTION_VAR).unwrap_or_default();
            Self::parse(&value).unwrap_or_else(|e| {
                tracing::warn!("{e}; choosing by head width");
                None
            })
        })
    }

    /// The fastest family for attention of shape `s`, as measured on an H100 (GPU runs 16 and
    /// 17, `bench/RESULTS.md`). Heads up to 64 wide: the register-resident kernels (seed-256
    /// at 18 × (1024+1024): 32.6 ms a step against WMMA's 38.1 and the GEMM path's 47.2).
    /// Wider heads with large score blocks: the cuBLASLt products, whose arithmetic per score
    /// grows with the head width while the traffic of the materialised scores does not
    /// (seed-768 at 1024+1024: 68.4 ms against WMMA's 109.1 and MMA's 123.4; `kernel_bench`
    /// at head width 128 too). Wider heads with small blocks: WMMA (seed-768 at 128+128: 13.9
    /// ms against the GEMM path's 15.7 — its ~40 launches a call cost more than they save
    /// there); the crossover between those two measurements is put at 256 × 256 scores a
    /// block, where the fused kernels' work grows past the GEMM path's launch costs (an
    /// estimate, not measured). WMMA wherever the device cannot give the register-resident
    /// kernels their shared memory (`mma_fits`). Run 19 (an H200) agreed, but for one shape:
    /// with P kept from the forward, the GEMM path beat MMA for seed-256 at 1024+1024 (25.5
    /// against 30.9 ms) in 7.8 GiB against 4.5 — over the 6 GB this batch is held to (issue
    /// 6's target: the original needed 23 GB of a 4090's 24), so heads up to 64 wide keep the
    /// register-resident kernels.
    pub fn fastest_for(s: AttentionShape, mma_fits: bool) -> Self {
        const GEMM_FROM_SCORES: usize = 256 * 256;
        if s.head_dim > 64 && s.q_len * s.k_len > GEMM_FROM_SCORES {
            Self::GEMM
        } else if s.head_dim <= 64 && mma_fits {
            Self::Mma
        } else {
            Self::Wmma
        }
    }

    /// f32 elements of the statistics attention of shape `s` keeps from its forward for its
    /// backward (the backend's `probs` buffer): one log-sum-exp per (batch row, head, query);
    /// the GEMM path adds P itself (fp16, two a slot) where all of it fits one chunk's bound,
    /// so its backward skips the product S = Q·Kᵀ and the softmax again. A buffer of lse
    /// alone is accepted by every family (the GEMM path then recomputes P).
    pub fn stats_len(self, s: AttentionShape) -> usize {
        let lse = s.batch * s.heads * s.q_len;
        match self {
            Self::Gemm { scores_per_chunk, .. } => {
                attention_gemm::saved_probs_len(s, scores_per_chunk)
                    .map_or(lse, |probs| attention_gemm::stats_len_with_probs(s, probs))
            }
            Self::Wmma | Self::Mma | Self::Wgmma => lse,
        }
    }

    /// The GEMM path with S and dP stored in fp16 (`half`) or fp32 ([`SCORES_VAR`]); the
    /// other families, which keep their scores in registers, unchanged.
    pub fn with_half_scores(self, half: bool) -> Self {
        match self {
            Self::Gemm { scores_per_chunk, causal_band, .. } => {
                Self::Gemm { scores_per_chunk, causal_band, half_scores: half }
            }
            other => other,
        }
    }

    /// A name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Wmma => "wmma",
            Self::Mma => "mma",
            Self::Wgmma => "wgmma",
            Self::Gemm { .. } => "gemm",
        }
    }
}

/// One attention launch: the kernel instance, warps W (each owns 16 rows of the block's own
/// dimension), the walked tile T (the kernels' `tile` argument) and the dynamic shared memory
/// in bytes, as `kernels/cuda/attention.cu` gives them.
#[derive(Clone, Copy)]
struct AttnLaunch {
    kernel: &'static str,
    warps: usize,
    tile: i32,
    shared: u32,
}

impl AttnLaunch {
    /// The launch of `kind` in the family `kernels` asks for; an error where the device cannot
    /// give a register-resident kernel its shared memory.
    fn new(
        dev: &Gpu,
        kernels: AttentionKernels,
        kind: AttnKernel,
        head_dim: usize,
        op: &'static str,
    ) -> Result<Self, GpuError> {
        match kernels {
            AttentionKernels::Wmma => Ok(Self::wmma(dev, kind, head_dim)),
            AttentionKernels::Gemm { .. } => {
                Err(shape(op, "the GEMM path launches no fused attention kernel".into()))
            }
            AttentionKernels::Wgmma => match kind {
                AttnKernel::Forward => Self::wgmma(dev, head_dim).ok_or_else(|| {
                    shape(
                        op,
                        format!(
                            "the wgmma forward for head_dim {head_dim} needs an H100 or H200 \
                             (compute capability 9.0) and its shared memory"
                        ),
                    )
                }),
                _ => Err(shape(op, "the wgmma family has a forward kernel only".into())),
            },
            AttentionKernels::Mma => Self::mma(dev, kind, head_dim).ok_or_else(|| {
                shape(
                    op,
                    format!(
                        "the register-resident kernel for head_dim {head_dim} needs more shared \
                         memory than the device gives it"
                    ),
                )
            }),
        }
    }

    /// The WMMA instance for heads `head_dim` wide (forward and dQ hold the whole head row;
    /// dK/dV both gradients up to 64 columns, one at a time — a dV pass, then a dK pass — for
    /// wider heads) and the first (W, T) whose memory fits what the device lets it use (48
    /// KiB, or more where it opted the kernel in).
    fn wmma(dev: &Gpu, kind: AttnKernel, head_dim: usize) -> Self {
        let kernel = match (kind, head_dim.div_ceil(16)) {
            (AttnKernel::Forward, 0..=4) => "attention_forward_c4_f16",
            (AttnKernel::Forward, 5..=8) => "attention_forward_c8_f16",
            (AttnKernel::Forward, 9..=12) => "attention_forward_c12_f16",
            (AttnKernel::Forward, _) => "attention_forward_c16_f16",
            (AttnKernel::KeysValues, 0..=4) => "attention_backward_dkdv_c4_f16",
            (AttnKernel::KeysValues, 9..=12) => "attention_backward_dkdv_split_c12_f16",
            // CT 16 spills: Dh 80–128 in one pass per gradient, 208–256 in two.
            (AttnKernel::KeysValues, _) => "attention_backward_dkdv_split_c8_f16",
            (AttnKernel::Queries, 0..=4) => "attention_backward_dq_c4_f16",
            (AttnKernel::Queries, 5..=8) => "attention_backward_dq_c8_f16",
            (AttnKernel::Queries, 9..=12) => "attention_backward_dq_c12_f16",
            (AttnKernel::Queries, _) => "attention_backward_dq_c16_f16",
        };
        let limit = dev.max_dynamic_shared(kernel).max(ATTN_MAX_SHARED);
        let ld = head_dim + 8;
        // Measured on an H200 (bench/RESULTS.md, run 12): 8 warps (128 keys a block, each Q and
        // dO tile read once for all of them) make dK/dV 6–18% faster; dQ gains with 8 at Dh 192
        // and loses at Dh 64; the forward is best with 4.
        let eight = match kind {
            AttnKernel::Forward => false,
            AttnKernel::Queries => head_dim > 64,
            AttnKernel::KeysValues => true,
        };
        let shapes = [(8, 32), (4, 32), (4, 16), (2, 32), (2, 16), (1, 32), (1, 16)];
        for (warps, tile) in shapes.into_iter().skip(usize::from(!eight)) {
            let bytes = if matches!(kind, AttnKernel::Forward) {
                2 * ld * (16 * warps + 2 * tile)
                    + warps * 16 * (tile + 4) * 4
                    + warps * 16 * (tile + 8) * 2
            } else {
                2 * ld * (32 * warps + 2 * tile) + warps * 32 * (tile + 4) * 4 + 2 * tile * 4
            };
            if bytes <= limit {
                return AttnLaunch { kernel, warps, tile: tile as i32, shared: bytes as u32 };
            }
        }
        unreachable!("W 1, T 16 fits 48 KiB for every head_dim up to {ATTN_MAX_HEAD_DIM}")
    }

    /// The register-resident instance: 4 or 8 warps ([`WARPS_VAR`]), a walked tile fixed per
    /// instance, shared memory for the walked tiles (K and V for the forward, which stages Q
    /// through them; Q and dO, with their lse and D, for dK/dV) and the block's own rows (Q
    /// and dO for dQ, K and V for dK/dV), in one stage or two ([`PIPELINE_VAR`]), as
    /// [`choose_mma_launch`] picks; `None` where the device cannot give that memory.
    fn mma(dev: &Gpu, kind: AttnKernel, head_dim: usize) -> Option<Self> {
        // Each instance in one stage (`<name>_f16`) and in two (`<name>s2_f16`).
        macro_rules! stages {
            ($name:literal) => {
                (concat!($name, "_f16"), concat!($name, "s2_f16"))
            };
        }
        // The narrowest instance whose CT column tiles hold the head: its shared tiles are
        // 16·CT columns wide whatever Dh is (attention.cu, "Tile").
        let ct = column_tiles(head_dim);
        let ((kernel, two_stage), tile) = match (kind, ct) {
            (AttnKernel::Forward, 2) => (stages!("attention_forward_mma_c2"), 64),
            (AttnKernel::Forward, 4) => (stages!("attention_forward_mma_c4"), 64),
            (AttnKernel::Forward, 8) => (stages!("attention_forward_mma_c8"), 64),
            (AttnKernel::Forward, 12) => (stages!("attention_forward_mma_c12"), 64),
            // No two stages: with the tile loop's addresses constant, sm_90 spills at 255
            // registers.
            (AttnKernel::Forward, _) => (("attention_forward_mma_c16_f16", ""), 32),
            (AttnKernel::Queries, 2) => (stages!("attention_backward_dq_mma_c2"), 64),
            (AttnKernel::Queries, 4) => (stages!("attention_backward_dq_mma_c4"), 64),
            (AttnKernel::Queries, 8) => (stages!("attention_backward_dq_mma_c8"), 64),
            (AttnKernel::Queries, 12) => (stages!("attention_backward_dq_mma_c12"), 32),
            // No two stages: 132 KiB a block, which no GPU runs two of (nor the emulator one).
            (AttnKernel::Queries, _) => (("attention_backward_dq_mma_c16_f16", ""), 32),
            (AttnKernel::KeysValues, 2) => (stages!("attention_backward_dkdv_mma_c2"), 64),
            (AttnKernel::KeysValues, 4) => (stages!("attention_backward_dkdv_mma_c4"), 64),
            (AttnKernel::KeysValues, 8) => (stages!("attention_backward_dkdv_mma_split_c8"), 32),
            (AttnKernel::KeysValues, 12) => (stages!("attention_backward_dkdv_mma_split_c12"), 32),
            (AttnKernel::KeysValues, _) => (stages!("attention_backward_dkdv_mma_split_c16"), 16),
        };
        // Shared memory as `kernels/cuda/attention.cu` lays it out: each stage holds two walked
        // tiles (K and V, or Q and dO); dQ and dK/dV add the block's own two (Q and dO, or K
        // and V), dK/dV the walked tile's lse and D (fp32, two halves each). Rows are
        // 16·CT + 8 halves apart.
        let ld = 16 * ct + 8;
        let bytes = |warps: usize, stages: usize| {
            let (walked, own) = (stages * 2 * tile, 2 * 16 * warps);
            let halves = match kind {
                AttnKernel::Forward => walked * ld,
                AttnKernel::Queries => (own + walked) * ld,
                AttnKernel::KeysValues => (own + walked) * ld + 2 * tile * 2,
            };
            halves * size_of::<f16>()
        };
        // 8 warps for wide heads (or where asked); the forward stages its block's queries in
        // one stage's two walked tiles, so takes 8 only where they hold 128 rows.
        let eight = warps_from_env() == Some(8) || head_dim > 64;
        let eight = eight && (!matches!(kind, AttnKernel::Forward) || 2 * tile >= 16 * 8);
        let widths: &[usize] = if eight { &[8, 4] } else { &[4] };
        let mut options = Vec::new();
        for &warps in widths {
            for (stages, kernel) in [(2, two_stage), (1, kernel)] {
                let shared = bytes(warps, stages);
                if kernel.is_empty() || shared > dev.max_dynamic_shared(kernel) {
                    continue;
                }
                let resident = dev.resident_blocks(kernel, 32 * warps as u32, shared);
                options.push(MmaOption { warps, stages, kernel, shared, resident });
            }
        }
        let limit = dev.max_dynamic_shared(kernel);
        let chosen = choose_mma_launch(&options, warps_from_env(), pipeline_from_env(), limit)?;
        Some(AttnLaunch {
            kernel: chosen.kernel,
            warps: chosen.warps,
            tile: tile as i32,
            shared: chosen.shared as u32,
        })
    }

    /// The wgmma forward: the instance whose P·V product is 16·CT ≥ Dh wide (the
    /// register-resident kernels' CT, at least 4: wgmma's N is 64 or more), 2 warpgroups or 1
    /// (8 or 4 warps; [`WARPS_VAR`] puts its choice first) and two stages or one
    /// ([`PIPELINE_VAR`] likewise), the first of those whose shared memory the device gives
    /// (attention.cu: 1024 + 32·CT·(rows + 128·stages) bytes); `None` where none fits or the
    /// device has no wgmma kernels (not a Hopper GPU).
    fn wgmma(dev: &Gpu, head_dim: usize) -> Option<Self> {
        let ct = column_tiles(head_dim).max(4);
        let (one, two) = match ct {
            4 => ("attention_forward_wgmma_c4_f16", "attention_forward_wgmma_c4s2_f16"),
            8 => ("attention_forward_wgmma_c8_f16", "attention_forward_wgmma_c8s2_f16"),
            12 => ("attention_forward_wgmma_c12_f16", "attention_forward_wgmma_c12s2_f16"),
            _ => ("attention_forward_wgmma_c16_f16", "attention_forward_wgmma_c16s2_f16"),
        };
        // What the variables ask for first, then the rest (a forced launch the device cannot
        // give its shared memory falls back, as the register-resident kernels' does).
        let warps: &[usize] = if warps_from_env() == Some(4) { &[4, 8] } else { &[8, 4] };
        let stages: &[usize] = if pipeline_from_env() == Some(false) { &[1, 2] } else { &[2, 1] };
        for &w in warps {
            for &st in stages {
                let kernel = if st == 2 { two } else { one };
                let shared = 1024 + 32 * ct * (16 * w + 128 * st);
                if dev.has_kernel(kernel) && shared <= dev.max_dynamic_shared(kernel) {
                    return Some(AttnLaunch { kernel, warps: w, tile: 64, shared: shared as u32 });
                }
            }
        }
        None
    }

    /// Rows of the block's own dimension.
    fn rows(self) -> usize {
        16 * self.warps
    }

    fn threads(self) -> (u32, u32, u32) {
        (32 * self.warps as u32, 1, 1)
    }
}

/// The kernels to run: `CHINGU_ATTN`'s family, else the fastest for this shape
/// ([`AttentionKernels::fastest_for`]); WMMA where the register-resident kernels are asked for
/// but the device cannot give all three their shared memory. The choice depends on the shape
/// alone, so a forward and its backward take the same family, and a rerun the same bits.
pub fn attention_kernels(dev: &Gpu, s: AttentionShape) -> AttentionKernels {
    let mma_fits = mma_fits(dev, s);
    let asked = AttentionKernels::from_env();
    let kernels = match asked {
        Some(AttentionKernels::Mma) if !mma_fits => AttentionKernels::Wmma,
        Some(AttentionKernels::Wgmma) if AttnLaunch::wgmma(dev, s.head_dim).is_none() => {
            fastest_here(dev, s)
        }
        Some(kernels) => with_gemm_settings(kernels),
        None => fastest_here(dev, s),
    };
    // Said the first time each family runs in this process: which kernels attention takes.
    static SAID: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    let bit = match kernels {
        AttentionKernels::Wmma => 1,
        AttentionKernels::Mma => 2,
        AttentionKernels::Gemm { .. } => 4,
        AttentionKernels::Wgmma => 8,
    };
    if SAID.fetch_or(bit, std::sync::atomic::Ordering::Relaxed) & bit == 0 {
        let how = match asked {
            Some(AttentionKernels::Mma) if !mma_fits => {
                "CHINGU_ATTN asks for mma, but the device cannot give it its shared memory"
            }
            Some(AttentionKernels::Wgmma) if kernels != AttentionKernels::Wgmma => {
                "CHINGU_ATTN asks for wgmma, which needs an H100 or H200; the fastest measured \
                 instead"
            }
            Some(_) => "as CHINGU_ATTN asks",
            None => "the fastest measured",
        };
        let scores = match kernels {
            AttentionKernels::Gemm { half_scores: true, .. } => ", S and dP in fp16",
            _ => "",
        };
        tracing::info!(
            "attention kernels: {}{scores} for heads {} wide, {} × {} scores a block ({how}; \
             CHINGU_ATTN=wmma, mma, gemm or wgmma to choose)",
            kernels.name(),
            s.head_dim,
            s.q_len,
            s.k_len
        );
    }
    kernels
}

/// The column tiles (16 columns each) of the narrowest register-resident instance that holds
/// a head `head_dim` wide: 2, 4, 8, 12 or 16 (attention.cu, "Tile").
fn column_tiles(head_dim: usize) -> usize {
    match head_dim.div_ceil(16) {
        0..=2 => 2,
        3..=4 => 4,
        5..=8 => 8,
        9..=12 => 12,
        _ => 16,
    }
}

/// Whether `dev` runs the wgmma kernels (a Hopper GPU, or the emulator).
pub fn has_wgmma(dev: &Gpu) -> bool {
    dev.has_kernel("attention_forward_wgmma_c4_f16")
}

/// Whether the device gives all three register-resident kernels their shared memory.
fn mma_fits(dev: &Gpu, s: AttentionShape) -> bool {
    let kinds = [AttnKernel::Forward, AttnKernel::Queries, AttnKernel::KeysValues];
    kinds.iter().all(|&kind| AttnLaunch::mma(dev, kind, s.head_dim).is_some())
}

/// The GEMM path with [`CAUSAL_BAND_VAR`]'s and [`SCORES_VAR`]'s settings; other families as
/// they are.
fn with_gemm_settings(kernels: AttentionKernels) -> AttentionKernels {
    match kernels {
        AttentionKernels::Gemm { scores_per_chunk, causal_band, half_scores } => {
            AttentionKernels::Gemm {
                scores_per_chunk,
                causal_band: causal_band_from_env().unwrap_or(causal_band),
                half_scores: half_scores_from_env().unwrap_or(half_scores),
            }
        }
        kernels => kernels,
    }
}

/// The family chosen by shape on this device ([`AttentionKernels::fastest_for`], with the
/// GEMM path's settings): what runs without `CHINGU_ATTN`, and the backward after the wgmma
/// forward (which keeps lse alone, as every family's backward accepts).
fn fastest_here(dev: &Gpu, s: AttentionShape) -> AttentionKernels {
    with_gemm_settings(AttentionKernels::fastest_for(s, mma_fits(dev, s)))
}

/// The attention statistics buffer holds lse alone (`[B, H, Tq]`) or, for the GEMM path,
/// [`AttentionKernels::stats_len`] elements (lse, then the saved P).
fn expect_stats(
    op: &'static str,
    kernels: AttentionKernels,
    lse: &DeviceBuffer<f32>,
    s: AttentionShape,
) -> Result<(), GpuError> {
    let (lse_only, with_probs) = (s.batch * s.heads * s.q_len, kernels.stats_len(s));
    if lse.len() == lse_only || lse.len() == with_probs {
        Ok(())
    } else {
        Err(shape(
            op,
            format!("lse holds {} f32 elements, expected {lse_only} or {with_probs}", lse.len()),
        ))
    }
}

/// Fused attention forward (see `kernels/cuda/attention.cu`): `out` `[B·Tq, D]` (fp16) and
/// the log-sum-exp of each query row's scaled scores, `lse` `[B, H, Tq]` (fp32, −inf for a
/// row with no visible key), which the backward needs (the GEMM path's P after it, where
/// `lse` is [`AttentionKernels::stats_len`] long). The kernels [`attention_kernels`] picks.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    dev: &Gpu,
    out: &mut DeviceBuffer<f16>,
    lse: &mut DeviceBuffer<f32>,
    q: &DeviceBuffer<f16>,
    k: &DeviceBuffer<f16>,
    v: &DeviceBuffer<f16>,
    key_len: &[usize],
    s: AttentionShape,
) -> Result<(), GpuError> {
    let kernels = attention_kernels(dev, s);
    attention_forward_using(kernels, dev, out, lse, q, k, v, key_len, s)
}

/// [`attention_forward`] through the given kernels.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_using(
    kernels: AttentionKernels,
    dev: &Gpu,
    out: &mut DeviceBuffer<f16>,
    lse: &mut DeviceBuffer<f32>,
    q: &DeviceBuffer<f16>,
    k: &DeviceBuffer<f16>,
    v: &DeviceBuffer<f16>,
    key_len: &[usize],
    s: AttentionShape,
) -> Result<(), GpuError> {
    const OP: &str = "attention_forward";
    let d = s.width();
    expect_len(OP, "q", q, s.batch * s.q_len * d)?;
    expect_len(OP, "k", k, s.batch * s.k_len * d)?;
    expect_len(OP, "v", v, s.batch * s.k_len * d)?;
    expect_len(OP, "out", out, s.batch * s.q_len * d)?;
    expect_stats(OP, kernels, lse, s)?;
    let (a, lens) = attention_args(dev, OP, key_len, s)?;
    if out.is_empty() {
        return Ok(());
    }
    if let AttentionKernels::Gemm { scores_per_chunk, causal_band, half_scores } = kernels {
        let bounds = (scores_per_chunk, causal_band);
        return if half_scores {
            attention_gemm::forward::<f16>(dev, out, lse, q, k, v, &lens, s, bounds)
        } else {
            attention_gemm::forward::<f32>(dev, out, lse, q, k, v, &lens, s, bounds)
        };
    }
    let l = AttnLaunch::new(dev, kernels, AttnKernel::Forward, s.head_dim, OP)?;
    if kernels == AttentionKernels::Wgmma {
        // Its tiles are filled by 16-byte copies only.
        require_vector_aligned(OP, &[q.ptr(), k.ptr(), v.ptr()])?;
    }
    let grid = (s.q_len.div_ceil(l.rows()) as u32, s.heads as u32, s.batch as u32);
    launch(
        dev,
        l.kernel,
        grid,
        l.threads(),
        l.shared,
        args![
            out.ptr(),
            lse.ptr(),
            q.ptr(),
            k.ptr(),
            v.ptr(),
            lens.ptr(),
            a[0],
            a[1],
            a[2],
            a[3],
            a[4],
            a[5],
            a[6],
            l.tile
        ],
    )?;
    // `lens` stays kept for later calls with the same lengths (`key_lengths`): never written
    // again, so no call waits for another.
    Ok(())
}

/// Fused attention backward from the forward's `out` and `lse`: writes (overwrites) `dq`,
/// `dk`, `dv`; keys past `key_len` get zero gradients. Deterministic (no atomics). The
/// kernels [`attention_kernels`] picks.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dev: &Gpu,
    dq: &mut DeviceBuffer<f16>,
    dk: &mut DeviceBuffer<f16>,
    dv: &mut DeviceBuffer<f16>,
    d_out: &DeviceBuffer<f16>,
    q: &DeviceBuffer<f16>,
    k: &DeviceBuffer<f16>,
    v: &DeviceBuffer<f16>,
    out: &DeviceBuffer<f16>,
    lse: &DeviceBuffer<f32>,
    key_len: &[usize],
    s: AttentionShape,
) -> Result<(), GpuError> {
    let kernels = attention_kernels(dev, s);
    attention_backward_using(kernels, dev, dq, dk, dv, d_out, q, k, v, out, lse, key_len, s)
}

/// [`attention_backward`] through the given kernels: the forward's, to the chunk bound and
/// causal band, where the GEMM path's forward saved P (its backward reads P only where that
/// forward wrote it; another band reads memory the forward left unwritten).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_using(
    kernels: AttentionKernels,
    dev: &Gpu,
    dq: &mut DeviceBuffer<f16>,
    dk: &mut DeviceBuffer<f16>,
    dv: &mut DeviceBuffer<f16>,
    d_out: &DeviceBuffer<f16>,
    q: &DeviceBuffer<f16>,
    k: &DeviceBuffer<f16>,
    v: &DeviceBuffer<f16>,
    out: &DeviceBuffer<f16>,
    lse: &DeviceBuffer<f32>,
    key_len: &[usize],
    s: AttentionShape,
) -> Result<(), GpuError> {
    const OP: &str = "attention_backward";
    if kernels == AttentionKernels::Wgmma {
        let kernels = fastest_here(dev, s);
        return attention_backward_using(
            kernels, dev, dq, dk, dv, d_out, q, k, v, out, lse, key_len, s,
        );
    }
    let d = s.width();
    for (name, buf) in [("dq", &*dq), ("d_out", d_out), ("q", q), ("out", out)] {
        expect_len(OP, name, buf, s.batch * s.q_len * d)?;
    }
    for (name, buf) in [("dk", &*dk), ("dv", &*dv), ("k", k), ("v", v)] {
        expect_len(OP, name, buf, s.batch * s.k_len * d)?;
    }
    expect_stats(OP, kernels, lse, s)?;
    let (a, lens) = attention_args(dev, OP, key_len, s)?;
    let rows_heads = s.batch * s.heads * s.q_len;
    let delta = DeviceBuffer::<f32>::uninit(dev, rows_heads.max(1))?;
    if rows_heads > 0 {
        let (b, tq, h, dh) = (a[0], a[1], a[3], a[4]);
        require_vector_aligned(OP, &[d_out.ptr(), out.ptr()])?;
        // `delta_group` lanes an item (attention.cu): 8 columns a lane, a power of two; a
        // warp takes DELTA_ITEMS passes of 32 / group items.
        let group = (s.head_dim / 8).next_power_of_two();
        let warps = rows_heads.div_ceil(DELTA_ITEMS * (32 / group));
        launch(
            dev,
            "attention_backward_delta_f16",
            (warps.div_ceil(ATTN_THREADS as usize / 32) as u32, 1, 1),
            (ATTN_THREADS, 1, 1),
            0,
            args![delta.ptr(), d_out.ptr(), out.ptr(), b, tq, h, dh],
        )?;
    }
    if let AttentionKernels::Gemm { scores_per_chunk, causal_band, half_scores } = kernels {
        let bounds = (scores_per_chunk, causal_band);
        return if half_scores {
            attention_gemm::backward::<f16>(
                dev, dq, dk, dv, d_out, q, k, v, lse, &delta, &lens, s, bounds,
            )
        } else {
            attention_gemm::backward::<f32>(
                dev, dq, dk, dv, d_out, q, k, v, lse, &delta, &lens, s, bounds,
            )
        };
    }
    let kv = AttnLaunch::new(dev, kernels, AttnKernel::KeysValues, s.head_dim, OP)?;
    let ql = AttnLaunch::new(dev, kernels, AttnKernel::Queries, s.head_dim, OP)?;
    if !dk.is_empty() {
        launch(
            dev,
            kv.kernel,
            (s.k_len.div_ceil(kv.rows()) as u32, s.heads as u32, s.batch as u32),
            kv.threads(),
            kv.shared,
            args![
                dk.ptr(),
                dv.ptr(),
                d_out.ptr(),
                q.ptr(),
                k.ptr(),
                v.ptr(),
                lse.ptr(),
                delta.ptr(),
                lens.ptr(),
                a[0],
                a[1],
                a[2],
                a[3],
                a[4],
                a[5],
                a[6],
                kv.tile
            ],
        )?;
    }
    if !dq.is_empty() {
        launch(
            dev,
            ql.kernel,
            (s.q_len.div_ceil(ql.rows()) as u32, s.heads as u32, s.batch as u32),
            ql.threads(),
            ql.shared,
            args![
                dq.ptr(),
                d_out.ptr(),
                q.ptr(),
                k.ptr(),
                v.ptr(),
                lse.ptr(),
                delta.ptr(),
                lens.ptr(),
                a[0],
                a[1],
                a[2],
                a[3],
                a[4],
                a[5],
                a[6],
                ql.tile
            ],
        )?;
    }
    // Scratch buffers are reused only by later work on the same stream.
    Ok(())
}

/// `out[n] = table[ids[n]] · scale + positions[pos[n]]`.
#[allow(clippy::too_many_arguments)]
pub fn embedding_forward(
    dev: &Gpu,
    out: &mut DeviceBuffer<f16>,
    table: &DeviceBuffer<f16>,
    positions: &DeviceBuffer<f16>,
    ids: &[u32],
    pos: &[usize],
    width: usize,
    scale: f32,
) -> Result<(), GpuError> {
    const OP: &str = "embedding_forward_f16";
    if ids.len() != pos.len() {
        return Err(shape(OP, format!("{} ids but {} positions", ids.len(), pos.len())));
    }
    expect_len(OP, "out", out, ids.len() * width)?;
    let vocab = table.len() / width.max(1);
    let max_len = positions.len() / width.max(1);
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(shape(OP, format!("token id {bad} outside the table's {vocab} rows")));
    }
    if let Some(&bad) = pos.iter().find(|&&p| p >= max_len) {
        return Err(shape(OP, format!("position {bad} outside the {max_len} position rows")));
    }
    if ids.is_empty() {
        return Ok(());
    }
    let ids_dev = upload_i32(dev, OP, ids.iter().map(|&i| i as usize))?;
    let pos_dev = upload_i32(dev, OP, pos.iter().copied())?;
    let (rows, w) = (int(OP, "rows", ids.len())?, int(OP, "width", width)?);
    launch(
        dev,
        OP,
        (ids.len() as u32, 1, 1),
        (row_threads(width).min(256), 1, 1),
        0,
        args![
            out.ptr(),
            table.ptr(),
            positions.ptr(),
            ids_dev.ptr(),
            pos_dev.ptr(),
            rows,
            w,
            scale
        ],
    )?;
    // The index buffers are reused only by later work on the same stream.
    Ok(())
}

/// `d_table[ids[n]] += d_out[n] · scale` (fp32), rows of one id summed in order, no atomics.
pub fn embedding_backward(
    dev: &Gpu,
    d_table: &mut DeviceBuffer<f32>,
    d_out: &DeviceBuffer<f16>,
    ids: &[u32],
    width: usize,
    scale: f32,
) -> Result<(), GpuError> {
    const OP: &str = "embedding_backward_f16";
    expect_len(OP, "d_out", d_out, ids.len() * width)?;
    let vocab = d_table.len() / width.max(1);
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(shape(OP, format!("token id {bad} outside the table's {vocab} rows")));
    }
    if ids.is_empty() {
        return Ok(());
    }
    // Counting sort by id, stable: rows of one id stay in their order.
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&n| ids[n]);
    let (mut group_start, mut group_id) = (Vec::new(), Vec::new());
    for (k, &n) in order.iter().enumerate() {
        if group_id.last() != Some(&(ids[n] as usize)) {
            group_start.push(k);
            group_id.push(ids[n] as usize);
        }
    }
    group_start.push(order.len());
    let groups = group_id.len();
    let order_dev = upload_i32(dev, OP, order.into_iter())?;
    let start_dev = upload_i32(dev, OP, group_start.into_iter())?;
    let id_dev = upload_i32(dev, OP, group_id.into_iter())?;
    let (g, w) = (int(OP, "groups", groups)?, int(OP, "width", width)?);
    let grid = (groups as u32, width.div_ceil(THREADS as usize) as u32, 1);
    launch(
        dev,
        OP,
        grid,
        (THREADS, 1, 1),
        0,
        args![
            d_table.ptr(),
            d_out.ptr(),
            order_dev.ptr(),
            start_dev.ptr(),
            id_dev.ptr(),
            g,
            w,
            scale
        ],
    )?;
    // The index buffers are reused only by later work on the same stream.
    Ok(())
}

/// `cross_entropy_vec_f16`'s limits (`kernels/cuda/cross_entropy.cu`): vectors of 8 halves a
/// thread holds, and threads a block.
const CE_MAX_VECTORS: usize = 8;
const CE_VEC_THREADS: usize = 512;

/// Softmax cross-entropy with label smoothing over logits `[N, V]`, rows with target
/// `ignore` skipped. Writes `d_logits` scaled by `loss_scale / counted` and returns the mean
/// loss over counted rows (unscaled) and the count.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(
    dev: &Gpu,
    d_logits: &mut DeviceBuffer<f16>,
    logits: &DeviceBuffer<f16>,
    targets: &[u32],
    vocab: usize,
    ignore: u32,
    smoothing: f32,
    loss_scale: f32,
) -> Result<(f64, usize), GpuError> {
    const OP: &str = "cross_entropy_f16";
    expect_len(OP, "logits", logits, targets.len() * vocab)?;
    expect_len(OP, "d_logits", d_logits, targets.len() * vocab)?;
    if let Some(&bad) = targets.iter().find(|&&t| t != ignore && t as usize >= vocab) {
        return Err(shape(OP, format!("target {bad} outside the vocabulary of {vocab}")));
    }
    let counted = targets.iter().filter(|&&t| t != ignore).count();
    if targets.is_empty() {
        return Ok((0.0, 0));
    }
    let grad_scale = if counted == 0 { 0.0 } else { loss_scale / counted as f32 };
    let targets_dev = upload_i32(dev, OP, targets.iter().map(|&t| t as usize))?;
    let row_loss = DeviceBuffer::<f32>::uninit(dev, targets.len())?;
    let (rows, v) = (int(OP, "rows", targets.len())?, int(OP, "vocab", vocab)?);
    let ignore = ignore as i32;
    // Rows that fit in registers (vocab a multiple of 8 up to 8 vectors of 8 per thread of
    // 512) take the one-read vector kernel, ~8 vectors a thread (fewer threads a row, so more
    // rows' blocks share an SM: 256 threads for a 16,000-word vocabulary).
    let vectors = vocab / 8;
    let (kernel, threads) = if vocab % 8 == 0
        && vectors <= CE_MAX_VECTORS * CE_VEC_THREADS
        && aligned_for_vectors(&[logits.ptr(), d_logits.ptr()])
    {
        // At most 512 threads, so at most CE_MAX_VECTORS vectors a thread.
        let threads =
            (vectors.div_ceil(CE_MAX_VECTORS).div_ceil(32) * 32).clamp(32, CE_VEC_THREADS);
        ("cross_entropy_vec_f16", threads as u32)
    } else {
        (OP, row_threads(vocab).min(512))
    };
    launch(
        dev,
        kernel,
        (targets.len() as u32, 1, 1),
        (threads, 1, 1),
        0,
        args![
            d_logits.ptr(),
            row_loss.ptr(),
            logits.ptr(),
            targets_dev.ptr(),
            rows,
            v,
            ignore,
            smoothing,
            grad_scale
        ],
    )?;
    let losses = row_loss.to_host()?;
    let total: f64 = losses.iter().map(|&l| f64::from(l)).sum();
    let mean = if counted == 0 { 0.0 } else { total / counted as f64 };
    Ok((mean, counted))
}

/// Blocks of the first pass of [`sum_squares`] for `n` elements: a function of `n` alone
/// (so the summation order is too), at least 8 elements per thread, at most [`REDUCE_BLOCKS`].
fn sum_squares_blocks(n: usize) -> usize {
    n.div_ceil(THREADS as usize * 8).clamp(1, REDUCE_BLOCKS)
}

/// Σ x² over every buffer, deterministic (a grid fixed by each tensor's length, partials
/// summed in order).
pub fn sum_squares(dev: &Gpu, tensors: &[&DeviceBuffer<f32>]) -> Result<f64, GpuError> {
    const OP: &str = "sum_squares_multi_f32";
    if tensors.is_empty() {
        return Ok(0.0);
    }
    // One launch for every tensor: block `first_t + j` does what block j of a launch over
    // tensor t alone would (see `sum_squares_multi_f32`).
    let mut table = Vec::with_capacity(4 * tensors.len());
    let mut slots = 0usize;
    for x in tensors {
        int(OP, "n", x.len())?;
        let blocks = sum_squares_blocks(x.len());
        table.extend([x.ptr(), x.len() as u64, slots as u64, blocks as u64]);
        slots += blocks;
    }
    let partials = DeviceBuffer::<f64>::uninit(dev, slots)?;
    let table = DeviceBuffer::from_host(dev, &table)?;
    let count_tensors = int(OP, "tensors", tensors.len())?;
    launch(
        dev,
        OP,
        (int(OP, "blocks", slots)? as u32, 1, 1),
        (THREADS, 1, 1),
        0,
        args![partials.ptr(), table.ptr(), count_tensors],
    )?;
    let total = DeviceBuffer::<f64>::uninit(dev, 1)?;
    let count = int(OP, "partials", partials.len())?;
    launch(
        dev,
        "sum_final_f64",
        (1, 1, 1),
        (1024, 1, 1),
        0,
        args![total.ptr(), partials.ptr(), count],
    )?;
    Ok(total.to_host()?[0])
}

/// `grad *= inv_scale` for every buffer; true when any result is inf or NaN (overflow).
pub fn unscale(
    dev: &Gpu,
    grads: &mut [&mut DeviceBuffer<f32>],
    inv_scale: f32,
) -> Result<bool, GpuError> {
    const OP: &str = "unscale_f32";
    let flag = DeviceBuffer::<i32>::from_host(dev, &[0])?;
    for g in grads.iter_mut() {
        let n = int(OP, "n", g.len())?;
        elementwise(dev, OP, g.len(), args![g.ptr(), flag.ptr(), inv_scale, n])?;
    }
    Ok(flag.to_host()?[0] != 0)
}

/// True when every element is finite.
pub fn all_finite_f16(dev: &Gpu, x: &DeviceBuffer<f16>) -> Result<bool, GpuError> {
    const OP: &str = "check_finite_f16";
    let flag = DeviceBuffer::<i32>::from_host(dev, &[0])?;
    let n = int(OP, "n", x.len())?;
    elementwise(dev, OP, x.len(), args![flag.ptr(), x.ptr(), n])?;
    Ok(flag.to_host()?[0] == 0)
}

/// One AdamW step on fp32 master weights; refreshes the fp16 copy when given.
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    dev: &Gpu,
    param: &mut DeviceBuffer<f32>,
    param_half: Option<&mut DeviceBuffer<f16>>,
    grad: &DeviceBuffer<f32>,
    m: &mut DeviceBuffer<f32>,
    v: &mut DeviceBuffer<f32>,
    s: AdamW,
) -> Result<(), GpuError> {
    const OP: &str = "adamw_f32";
    let len = param.len();
    expect_len(OP, "grad", grad, len)?;
    expect_len(OP, "m", m, len)?;
    expect_len(OP, "v", v, len)?;
    let half_ptr = match param_half {
        Some(h) => {
            expect_len(OP, "param_half", h, len)?;
            h.ptr()
        }
        None => 0,
    };
    let n = int(OP, "n", len)?;
    // Bias corrections in f64 then rounded, as the CPU backend does.
    let c1 = (1.0 - f64::from(s.beta1).powi(s.step as i32)) as f32;
    let c2 = (1.0 - f64::from(s.beta2).powi(s.step as i32)) as f32;
    elementwise(
        dev,
        OP,
        len,
        args![
            param.ptr(),
            half_ptr,
            grad.ptr(),
            m.ptr(),
            v.ptr(),
            s.lr,
            s.beta1,
            s.beta2,
            s.eps,
            s.weight_decay,
            c1,
            c2,
            s.grad_scale,
            n
        ],
    )
}

/// Elements a block of `adamw_multi_f32` updates: 4 vectors of 4 floats a thread
/// (`kernels/cuda/adamw.cu`).
const ADAMW_BLOCK_ELEMENTS: usize = 16 * THREADS as usize;

/// One tensor of a multi-tensor AdamW update (see [`AdamwTable`]).
#[derive(Clone, Copy)]
pub struct AdamwTensor<'a> {
    /// fp32 master weights.
    pub param: &'a DeviceBuffer<f32>,
    /// Their fp16 copy, refreshed by the update.
    pub half: Option<&'a DeviceBuffer<f16>>,
    /// The gradient.
    pub grad: &'a DeviceBuffer<f32>,
    /// First moment.
    pub m: &'a DeviceBuffer<f32>,
    /// Second moment.
    pub v: &'a DeviceBuffer<f32>,
    /// This tensor's weight decay.
    pub weight_decay: f32,
}

/// The descriptor table of `adamw_multi_f32` (9 u64 per tensor: five addresses, n, first
/// block, blocks, weight decay bits), built on the host; equal tables mean the same update,
/// so a caller may keep the uploaded copy while the table does not change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdamwTable {
    /// The descriptors.
    pub words: Vec<u64>,
    /// Tensors described.
    pub tensors: usize,
    /// Blocks of the launch.
    pub blocks: usize,
}

impl AdamwTable {
    /// Checks every tensor's buffers have one length and lays out the blocks.
    pub fn new(tensors: &[AdamwTensor<'_>]) -> Result<Self, GpuError> {
        const OP: &str = "adamw_multi_f32";
        let mut words = Vec::with_capacity(9 * tensors.len());
        let mut blocks = 0usize;
        for t in tensors {
            let n = t.param.len();
            int(OP, "n", n)?;
            expect_len(OP, "grad", t.grad, n)?;
            expect_len(OP, "m", t.m, n)?;
            expect_len(OP, "v", t.v, n)?;
            if let Some(h) = t.half {
                expect_len(OP, "param_half", h, n)?;
            }
            let own = n.div_ceil(ADAMW_BLOCK_ELEMENTS).max(1);
            words.extend([
                t.param.ptr(),
                t.half.map_or(0, DeviceBuffer::ptr),
                t.grad.ptr(),
                t.m.ptr(),
                t.v.ptr(),
                n as u64,
                blocks as u64,
                own as u64,
                u64::from(t.weight_decay.to_bits()),
            ]);
            blocks += own;
        }
        int(OP, "blocks", blocks)?;
        Ok(Self { words, tensors: tensors.len(), blocks })
    }
}

/// AdamW on every tensor of `table` (uploaded as `uploaded`) in one launch; `s` gives the
/// shared settings (its weight decay is ignored: each tensor has its own). Bit for bit what
/// [`adamw`] does tensor by tensor.
pub fn adamw_multi(
    dev: &Gpu,
    table: &AdamwTable,
    uploaded: &DeviceBuffer<u64>,
    s: AdamW,
) -> Result<(), GpuError> {
    const OP: &str = "adamw_multi_f32";
    expect_len(OP, "uploaded table", uploaded, table.words.len())?;
    if table.tensors == 0 {
        return Ok(());
    }
    let c1 = (1.0 - f64::from(s.beta1).powi(s.step as i32)) as f32;
    let c2 = (1.0 - f64::from(s.beta2).powi(s.step as i32)) as f32;
    let tensors = int(OP, "tensors", table.tensors)?;
    launch(
        dev,
        OP,
        (table.blocks as u32, 1, 1),
        (THREADS, 1, 1),
        0,
        args![uploaded.ptr(), tensors, s.lr, s.beta1, s.beta2, s.eps, c1, c2, s.grad_scale],
    )
}

fn upload_i32(
    dev: &Gpu,
    op: &'static str,
    values: impl Iterator<Item = usize>,
) -> Result<DeviceBuffer<i32>, GpuError> {
    let host = values.map(|v| int(op, "index", v)).collect::<Result<Vec<i32>, _>>()?;
    DeviceBuffer::from_host(dev, &host)
}

#[cfg(test)]
mod tests {
    use super::AttentionKernels;
    use super::AttentionShape;

    /// Fails unless kernel file `file` has the line `#define NAME value`.
    fn assert_defined(file: &str, name: &str, value: usize) {
        let (_, source) = crate::gpu::sources::FILES
            .iter()
            .find(|(embedded, _)| *embedded == file)
            .unwrap_or_else(|| panic!("{file} is not embedded"));
        let line = format!("#define {name} {value}");
        assert!(source.lines().any(|l| l.trim() == line), "{file} lacks `{line}`");
    }

    /// The launcher sizes the delta kernel's grid by the items its lane groups take.
    #[test]
    fn delta_items_are_the_kernels() {
        assert_defined("attention.cu", "CHINGU_DELTA_ITEMS", super::DELTA_ITEMS);
    }

    /// The launcher fills the kernel's parameter struct exactly: as many values as it holds.
    #[test]
    fn u64_list_is_the_kernels() {
        assert_defined("elementwise.cu", "CHINGU_U64_LIST", super::U64_LIST);
        assert_eq!(std::mem::size_of::<super::U64List>(), super::U64_LIST * 8);
    }

    #[test]
    fn attention_families_are_named_by_chingu_attn() {
        assert_eq!(AttentionKernels::parse("auto"), Ok(None));
        assert_eq!(AttentionKernels::parse(""), Ok(None));
        assert_eq!(AttentionKernels::parse("wmma"), Ok(Some(AttentionKernels::Wmma)));
        assert_eq!(AttentionKernels::parse(" MMA "), Ok(Some(AttentionKernels::Mma)));
        assert_eq!(AttentionKernels::parse("gemm"), Ok(Some(AttentionKernels::GEMM)));
        let err = AttentionKernels::parse("1").unwrap_err();
        assert!(err.contains("CHINGU_ATTN") && err.contains("wmma, mma, gemm or wgmma"), "{err}");
        assert_eq!(AttentionKernels::parse("wgmma"), Ok(Some(AttentionKernels::Wgmma)));
        let families = [
            AttentionKernels::Wmma,
            AttentionKernels::Mma,
            AttentionKernels::GEMM,
            AttentionKernels::Wgmma,
        ];
        for kernels in families {
            assert_eq!(AttentionKernels::parse(kernels.name()), Ok(Some(kernels)));
        }
    }

    /// The measured choice (GPU runs 16 and 17): register-resident kernels up to head width
    /// 64, the cuBLASLt products beyond at large score blocks, WMMA at small ones and where
    /// the register-resident kernels get no shared memory.
    #[test]
    fn the_fastest_family_follows_the_head_width_and_the_lengths() {
        let shape = |head_dim, q_len, k_len| AttentionShape {
            batch: 18,
            q_len,
            k_len,
            heads: 4,
            head_dim,
            causal: false,
            q_offset: 0,
        };
        let fastest = AttentionKernels::fastest_for;
        assert_eq!(fastest(shape(32, 1024, 1024), true), AttentionKernels::Mma);
        assert_eq!(fastest(shape(64, 1024, 1024), true), AttentionKernels::Mma);
        assert_eq!(fastest(shape(64, 64, 64), true), AttentionKernels::Mma);
        assert_eq!(fastest(shape(64, 1024, 1024), false), AttentionKernels::Wmma);
        assert_eq!(fastest(shape(80, 1024, 1024), true), AttentionKernels::GEMM);
        assert_eq!(fastest(shape(192, 1024, 1024), false), AttentionKernels::GEMM);
        assert_eq!(fastest(shape(192, 257, 256), true), AttentionKernels::GEMM);
        assert_eq!(fastest(shape(192, 256, 256), true), AttentionKernels::Wmma);
        assert_eq!(fastest(shape(192, 128, 128), true), AttentionKernels::Wmma);
        // Decoding one token at a time against a long cache: the fused kernels.
        assert_eq!(fastest(shape(192, 1, 4096), true), AttentionKernels::Wmma);
    }

    /// The most resident warps, the first of equals (more warps a block, then two stages);
    /// forced counts keep the options that have them; uncounted (the emulator): 4 warps, two
    /// stages where shared memory holds PIPELINED_BLOCKS of them.
    #[test]
    fn register_resident_launches_keep_the_most_warps_resident() {
        use super::{choose_mma_launch, MmaOption, PIPELINED_BLOCKS};
        let option = |warps, stages, shared, resident| MmaOption {
            warps,
            stages,
            kernel: if stages == 2 { "two" } else { "one" },
            shared,
            resident,
        };
        let pick = |options: &[MmaOption], warps, pipeline| {
            choose_mma_launch(options, warps, pipeline, 227 * 1024).map(|o| (o.warps, o.stages))
        };
        // An H100 at head width 192 (forward): one 8-warp block or two 4-warp ones either way.
        let h100 = [
            option(8, 2, 100 << 10, Some(1)),
            option(8, 1, 50 << 10, Some(1)),
            option(4, 2, 100 << 10, Some(2)),
            option(4, 1, 50 << 10, Some(2)),
        ];
        assert_eq!(pick(&h100, None, None), Some((8, 2)));
        assert_eq!(pick(&h100, Some(4), None), Some((4, 2)));
        assert_eq!(pick(&h100, None, Some(false)), Some((8, 1)));
        assert_eq!(pick(&h100, Some(4), Some(false)), Some((4, 1)));
        // An RTX 4090's dQ at head width 64: three one-stage blocks, one two-stage block.
        let rtx = [option(4, 2, 55 << 10, Some(1)), option(4, 1, 37 << 10, Some(3))];
        assert_eq!(pick(&rtx, None, None), Some((4, 1)));
        assert_eq!(pick(&rtx, None, Some(true)), Some((4, 2)));
        // 8 warps asked for where none fits: the options there are.
        assert_eq!(pick(&rtx, Some(8), None), Some((4, 1)));
        // Registers that hold three 4-warp blocks but one 8-warp block: 4 warps.
        let regs = [option(8, 2, 40 << 10, Some(1)), option(4, 2, 40 << 10, Some(3))];
        assert_eq!(pick(&regs, None, None), Some((4, 2)));
        // Uncounted: 4 warps, two stages where the limit holds PIPELINED_BLOCKS of them.
        let held = 227 * 1024 / PIPELINED_BLOCKS;
        let emu =
            [option(8, 2, held, None), option(4, 2, held, None), option(4, 1, held / 2, None)];
        assert_eq!(pick(&emu, None, None), Some((4, 2)));
        let emu_big = [option(4, 2, held + 1, None), option(4, 1, held / 2, None)];
        assert_eq!(pick(&emu_big, None, None), Some((4, 1)));
        assert_eq!(pick(&emu_big, None, Some(true)), Some((4, 2)));
        assert_eq!(pick(&emu, Some(8), None), Some((8, 2)));
        assert_eq!(pick(&[], None, None), None);
        // Options the device counts no block of are never taken; none left, none chosen.
        let starved = [option(8, 2, 200 << 10, Some(0)), option(4, 1, 50 << 10, Some(1))];
        assert_eq!(pick(&starved, None, None), Some((4, 1)));
        assert_eq!(pick(&starved, Some(8), Some(true)), Some((4, 1)));
        assert_eq!(pick(&starved[..1], None, None), None);
    }

    /// A step's attention calls share one upload of each key-length vector; another device
    /// or other values get their own, and the oldest of too many is uploaded again.
    #[cfg(feature = "emu")]
    #[test]
    fn key_lengths_are_uploaded_once_while_kept() {
        use super::{key_lengths, KEY_LENGTHS_KEPT};
        use crate::gpu::{emu::EmuDevice, Gpu};
        use std::sync::Arc;
        let (a, b): (Gpu, Gpu) = (Arc::new(EmuDevice::new()), Arc::new(EmuDevice::new()));
        let lens =
            |dev: &Gpu, values: &[usize]| key_lengths(dev, "test", values.iter().copied()).unwrap();
        let first = lens(&a, &[5, 3, 7]);
        assert_eq!(first.to_host().unwrap(), [5, 3, 7]);
        assert!(Arc::ptr_eq(&first, &lens(&a, &[5, 3, 7])), "the same vector is kept");
        assert!(!Arc::ptr_eq(&first, &lens(&b, &[5, 3, 7])), "each device has its own");
        assert!(!Arc::ptr_eq(&first, &lens(&a, &[5, 3, 8])), "other values, another buffer");
        // Enough other vectors on `a` push [5, 3, 7] out.
        for n in 0..KEY_LENGTHS_KEPT {
            lens(&a, &[n, 100]);
        }
        let again = lens(&a, &[5, 3, 7]);
        assert!(!Arc::ptr_eq(&first, &again), "pushed out after {KEY_LENGTHS_KEPT} others");
        assert_eq!(again.to_host().unwrap(), [5, 3, 7]);
    }
}

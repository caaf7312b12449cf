//! The checked launcher of [`Device::gemm`](super::Device::gemm): every buffer's length is
//! checked against the shape before the device sees a pointer.

use half::f16;

use super::{DeviceBuffer, Element, Gemm, Gpu, GpuError};

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
    let shape = |message: String| GpuError::Shape { op: "gemm", message };
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
    };
    // SAFETY: every buffer's length matches the shape, and `c` is borrowed mutably, so it
    // overlaps no input.
    unsafe { run(dev, "", &g) }
}

/// Runs `g` on `dev`, timed under a name showing the op and shape when profiling (see
/// [`super::profile`]): the one place every product goes through.
///
/// # Safety
/// Every pointer in `g` must cover the matrix the shape says it holds.
pub unsafe fn run(dev: &Gpu, op: &str, g: &Gemm) -> Result<(), GpuError> {
    let name = || {
        let t = |transposed| if transposed { "ᵀ" } else { "" };
        let out = if g.c_f32 { "f32" } else { "f16" };
        let op = if op.is_empty() { String::new() } else { format!(" ({op})") };
        format!("gemm{op} {}×{}×{} A{} B{} → {out}", g.m, g.n, g.k, t(g.trans_a), t(g.trans_b))
    };
    // SAFETY: the caller's contract.
    super::profile::time(dev, name, || unsafe { dev.gemm(g) })
}

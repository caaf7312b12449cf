//! The matrix product (`chingu_kernels::gpu::gemm::gemm`, i.e. `Device::gemm`) against an f64
//! reference computed here: always on the emulated device (matrixmultiply on the CPU), and on
//! a real GPU (cuBLASLt) when `CHINGU_GPU_TESTS=1` (then a GPU that cannot be opened is a
//! failure, not a skip).
//!
//! Every case draws a logical `op(A)[m×k]` and `op(B)[k×n]` rounded to fp16 and stores them
//! as the transpose flags say, so all four transpose combinations share one reference product
//! per shape. Outputs are fp16 and fp32, overwritten (C poisoned with NaN, so an element left
//! unwritten or read with beta 0 fails), accumulated onto random C, or overwritten with a bias.
//!
//! Tolerance, per element: the inputs are fp16, so every product a·b is exact in fp32 (11-bit
//! significands multiply into 22 bits) and in f64; C and the bias are exact too. What remains
//! is the rounding of the k + 1 fp32 additions, in whatever order and blocking the device
//! sums (split-K, tensor-core blocks): whatever the order, the error is at most
//! (k + 1)·δ·S with S = Σ|a·b| + |c| + |bias| and δ the relative error of one addition — 2⁻²⁴
//! rounding to nearest, 2⁻²³ for the truncating adders of tensor cores. We allow
//! 4·(k + 2)·2⁻²⁴·S (twice the truncating bound). S itself is bounded above by
//! ‖a_row‖₂·‖b_col‖₂ + |c| + |bias| (Cauchy–Schwarz), which is cheap and keeps the bound
//! rigorous. An fp16 output adds the rounding of the result, and cuBLASLt may also round the
//! product to fp16 before adding βC (seen on an H200, 2026-11-26: 2 ulps off in accumulate
//! mode, 64×64×64): 2⁻¹⁰·(|A·B| + |C| + |ref|) (twice a half ulp of each rounded value) plus
//! 2⁻²⁴ for values in the subnormal range. A transposition,
//! a swapped operand, a bias broadcast along the wrong axis or a lost beta are off by O(S).

use chingu_kernels::gpu::gemm::{
    address_uploads, gemm, gemm_bias_grad, gemm_gelu, gemm_gelu_grad, run, run_group_as, GemmOut,
};
use chingu_kernels::gpu::{DeviceBuffer, DevicePtr, Gemm, GemmBatch, GemmEpilogue, Gpu, GpuError};
use chingu_kernels::rng::SplitMix64;
use half::f16;

/// The devices every test body runs on.
fn devices() -> Vec<Gpu> {
    chingu_kernels::gpu::test_devices()
}

/// Uniform values in [lo, hi) rounded to fp16, with their exact f64 values.
fn random_half(rng: &mut SplitMix64, n: usize, lo: f64, hi: f64) -> (Vec<f16>, Vec<f64>) {
    let h: Vec<f16> = (0..n).map(|_| f16::from_f64(lo + (hi - lo) * rng.next_f64())).collect();
    let f = h.iter().map(|x| x.to_f64()).collect();
    (h, f)
}

/// Row-major `[rows×cols]` stored transposed, `[cols×rows]`.
fn transpose(x: &[f16], rows: usize, cols: usize) -> Vec<f16> {
    let mut t = vec![f16::ZERO; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

/// One shape's logical operands and what the reference needs of them.
struct Problem {
    m: usize,
    n: usize,
    k: usize,
    /// op(A) `[m×k]` and op(B) `[k×n]`, row-major.
    a: Vec<f16>,
    b: Vec<f16>,
    /// op(A)·op(B) in f64, `[m×n]`.
    product: Vec<f64>,
    /// ‖row i of op(A)‖₂ and ‖column j of op(B)‖₂.
    a_norms: Vec<f64>,
    b_norms: Vec<f64>,
}

impl Problem {
    fn new(rng: &mut SplitMix64, m: usize, n: usize, k: usize) -> Self {
        let (a, af) = random_half(rng, m * k, -1.0, 1.0);
        let (b, bf) = random_half(rng, k * n, -1.0, 1.0);
        let mut product = vec![0f64; m * n];
        for i in 0..m {
            let row = &mut product[i * n..(i + 1) * n];
            for l in 0..k {
                let x = af[i * k + l];
                for (p, y) in row.iter_mut().zip(&bf[l * n..(l + 1) * n]) {
                    *p += x * y;
                }
            }
        }
        let a_norms = (0..m)
            .map(|i| af[i * k..(i + 1) * k].iter().map(|x| x * x).sum::<f64>().sqrt())
            .collect();
        let b_norms = (0..n)
            .map(|j| (0..k).map(|l| bf[l * n + j] * bf[l * n + j]).sum::<f64>().sqrt())
            .collect();
        Self { m, n, k, a, b, product, a_norms, b_norms }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Overwrite,
    Accumulate,
    Bias,
}

/// Runs one case and checks every element; returns the worst |error| / tolerance.
fn run_case(
    dev: &Gpu,
    rng: &mut SplitMix64,
    p: &Problem,
    trans_a: bool,
    trans_b: bool,
    c_f32: bool,
    mode: Mode,
) -> f64 {
    let (m, n, k) = (p.m, p.n, p.k);
    let case = format!(
        "{} {m}×{n}×{k} trans_a {trans_a} trans_b {trans_b} C {} {mode:?}",
        dev.name(),
        if c_f32 { "f32" } else { "f16" }
    );
    let a_host = if trans_a { transpose(&p.a, m, k) } else { p.a.clone() };
    let b_host = if trans_b { transpose(&p.b, k, n) } else { p.b.clone() };
    let a = DeviceBuffer::from_host(dev, &a_host).unwrap();
    let b = DeviceBuffer::from_host(dev, &b_host).unwrap();
    // The prior C (exact in the output type) and the bias, as f64.
    let (c0_half, c0) = match mode {
        Mode::Accumulate => random_half(rng, m * n, -4.0, 4.0),
        _ => (vec![f16::NAN; m * n], vec![0.0; m * n]),
    };
    let (bias_half, bias) = match mode {
        Mode::Bias => random_half(rng, n, -2.0, 2.0),
        _ => (Vec::new(), vec![0.0; n]),
    };
    let bias_buf = (mode == Mode::Bias).then(|| DeviceBuffer::from_host(dev, &bias_half).unwrap());
    let accumulate = mode == Mode::Accumulate;
    let run = |c: GemmOut<'_>| {
        gemm(dev, c, &a, trans_a, &b, trans_b, m, n, k, accumulate, bias_buf.as_ref())
            .unwrap_or_else(|e| panic!("{case}: {e}"))
    };
    let got: Vec<f64> = if c_f32 {
        let init: Vec<f32> = c0_half.iter().map(|x| x.to_f32()).collect();
        let mut c = DeviceBuffer::from_host(dev, &init).unwrap();
        run(GemmOut::F32(&mut c));
        c.to_host().unwrap().iter().map(|&x| f64::from(x)).collect()
    } else {
        let mut c = DeviceBuffer::from_host(dev, &c0_half).unwrap();
        run(GemmOut::F16(&mut c));
        c.to_host().unwrap().iter().map(|x| x.to_f64()).collect()
    };
    check(&case, &got, p, &c0, &bias, c_f32)
}

/// Checks `got` = op(A)·op(B) + c0 + bias (per column) element by element at the tolerance of
/// the file comment; returns the worst |error| / tolerance.
#[allow(clippy::needless_range_loop)] // (i, j) index five arrays at once
fn check(case: &str, got: &[f64], p: &Problem, c0: &[f64], bias: &[f64], c_f32: bool) -> f64 {
    let (m, n, k) = (p.m, p.n, p.k);
    let accumulation = 4.0 * (k + 2) as f64 * 2f64.powi(-24);
    let mut worst: f64 = 0.0;
    for i in 0..m {
        for j in 0..n {
            let at = i * n + j;
            let want = p.product[at] + c0[at] + bias[j];
            let scale = p.a_norms[i] * p.b_norms[j] + c0[at].abs() + bias[j].abs();
            let mut tol = accumulation * scale;
            if !c_f32 {
                let terms = p.product[at].abs() + c0[at].abs() + bias[j].abs();
                tol += 2f64.powi(-10) * (terms + want.abs()) + 2f64.powi(-24);
            }
            let err = (got[at] - want).abs();
            assert!(
                err <= tol,
                "{case}: C[{i}, {j}] = {} but the reference is {want} (|error| {err:e} > tolerance {tol:e})",
                got[at]
            );
            worst = worst.max(err / tol);
        }
    }
    worst
}

/// `x` `[rows×cols]` with its rows `ld` apart, NaN in the gaps (a product that reads them
/// gives NaN).
fn with_row_stride(x: &[f16], rows: usize, cols: usize, ld: usize) -> Vec<f16> {
    let mut out = vec![f16::NAN; rows * ld];
    for (r, row) in x.chunks(cols).enumerate() {
        out[r * ld..r * ld + cols].copy_from_slice(row);
    }
    out
}

/// Several products of one shape in one call (the strided batch of the GEMM attention path),
/// each block against its own reference, for every transpose pair and both output types, with
/// dense rows and with padded ones (the GEMM attention's score rows and head columns); C
/// poisoned, so a block left unwritten fails, and its row gaps must stay poisoned.
#[test]
fn batched_products_match_their_references() {
    let (m, n, k, count) = (33, 20, 24, 5);
    let mut rng = SplitMix64(0xba7c);
    let problems: Vec<Problem> = (0..count).map(|_| Problem::new(&mut rng, m, n, k)).collect();
    let (zeros, no_bias) = (vec![0.0; m * n], vec![0.0; n]);
    // Dense, then with rows padded (A by 5, B by 3, C by 4 elements: gaps the product must
    // neither read nor write).
    for pad in [[0, 0, 0], [5, 3, 4]] {
        for dev in devices() {
            for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
                let (a_rows, a_cols) = if trans_a { (k, m) } else { (m, k) };
                let (b_rows, b_cols) = if trans_b { (n, k) } else { (k, n) };
                let ld = [a_cols + pad[0], b_cols + pad[1], n + pad[2]];
                // One operand of every problem as stored: `[rows×cols]`, or its transpose.
                let stored = |x: &[f16], rows, cols, transposed, ld| {
                    let x = if transposed { transpose(x, rows, cols) } else { x.to_vec() };
                    let (rows, cols) = if transposed { (cols, rows) } else { (rows, cols) };
                    with_row_stride(&x, rows, cols, ld)
                };
                let a_host: Vec<f16> =
                    problems.iter().flat_map(|p| stored(&p.a, m, k, trans_a, ld[0])).collect();
                let b_host: Vec<f16> =
                    problems.iter().flat_map(|p| stored(&p.b, k, n, trans_b, ld[1])).collect();
                let a = DeviceBuffer::from_host(&dev, &a_host).unwrap();
                let b = DeviceBuffer::from_host(&dev, &b_host).unwrap();
                let c_block = m * ld[2];
                for c_f32 in [false, true] {
                    let case = format!(
                        "{} batch of {count} {m}×{n}×{k} trans_a {trans_a} trans_b {trans_b} C f32 {c_f32} row padding {pad:?}",
                        dev.name()
                    );
                    let (c16, c32) = if c_f32 {
                        (
                            None,
                            Some(
                                DeviceBuffer::from_host(&dev, &vec![f32::NAN; count * c_block])
                                    .unwrap(),
                            ),
                        )
                    } else {
                        (
                            Some(
                                DeviceBuffer::from_host(&dev, &vec![f16::NAN; count * c_block])
                                    .unwrap(),
                            ),
                            None,
                        )
                    };
                    let c = c16.as_ref().map_or_else(|| c32.as_ref().unwrap().ptr(), |c| c.ptr());
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
                        beta: 0.0,
                        bias: None,
                        epilogue: GemmEpilogue::None,
                        batch: GemmBatch::strided(count, a_rows * ld[0], b_rows * ld[1], c_block),
                        ld: if pad == [0, 0, 0] { Gemm::DENSE } else { ld },
                    };
                    // SAFETY: A, B and C hold `count` blocks of their shapes, at those strides.
                    unsafe { run(&dev, "", &g) }.unwrap_or_else(|e| panic!("{case}: {e}"));
                    let got: Vec<f64> = match (&c16, &c32) {
                        (Some(c), _) => c.to_host().unwrap().iter().map(|x| x.to_f64()).collect(),
                        (_, Some(c)) => {
                            c.to_host().unwrap().iter().map(|&x| f64::from(x)).collect()
                        }
                        _ => unreachable!(),
                    };
                    for (i, p) in problems.iter().enumerate() {
                        let rows = got[i * c_block..(i + 1) * c_block].chunks(ld[2]);
                        let block: Vec<f64> = rows.clone().flat_map(|r| r[..n].to_vec()).collect();
                        check(&format!("{case}, block {i}"), &block, p, &zeros, &no_bias, c_f32);
                        assert!(
                            rows.flat_map(|r| &r[n..]).all(|x| x.is_nan()),
                            "{case}, block {i}: the product wrote into C's row gaps"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn row_strides_shorter_than_their_rows_are_refused() {
    for dev in devices() {
        let a = DeviceBuffer::from_host(&dev, &[f16::ONE; 64]).unwrap();
        let c = DeviceBuffer::from_host(&dev, &[0f32; 64]).unwrap();
        let g = Gemm {
            m: 4,
            n: 4,
            k: 4,
            a: a.ptr(),
            trans_a: false,
            b: a.ptr(),
            trans_b: false,
            c: c.ptr(),
            c_f32: true,
            beta: 0.0,
            bias: None,
            epilogue: GemmEpilogue::None,
            batch: GemmBatch::ONE,
            ld: [3, 0, 0],
        };
        // SAFETY: refused before anything is read (and every buffer covers 4 rows of 16).
        match unsafe { run(&dev, "", &g) } {
            Err(GpuError::Shape { message, .. }) => {
                assert!(
                    message.contains("A's row stride 3 is shorter than its 4 columns"),
                    "{message}"
                )
            }
            other => panic!("{}: expected a refusal, got {other:?}", dev.name()),
        }
    }
}

#[test]
fn gemm_matches_an_f64_reference() {
    let shapes = [(1, 1, 1), (7, 13, 5), (64, 64, 64), (1152, 256, 768), (33, 1000, 17)];
    let mut rng = SplitMix64(0x6e6d);
    let problems: Vec<Problem> =
        shapes.iter().map(|&(m, n, k)| Problem::new(&mut rng, m, n, k)).collect();
    for dev in devices() {
        let mut worst: f64 = 0.0;
        for p in &problems {
            for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
                for c_f32 in [false, true] {
                    for mode in [Mode::Overwrite, Mode::Accumulate, Mode::Bias] {
                        worst =
                            worst.max(run_case(&dev, &mut rng, p, trans_a, trans_b, c_f32, mode));
                    }
                }
            }
        }
        eprintln!("{}: worst |error| / tolerance {worst:.3}", dev.name());
    }
}

#[test]
fn repeated_shapes_reuse_nothing_stale() {
    // The same shape again with fresh data (a GPU serves it from its cached algorithm).
    let mut rng = SplitMix64(7);
    for dev in devices() {
        for _ in 0..3 {
            let p = Problem::new(&mut rng, 48, 40, 24);
            run_case(&dev, &mut rng, &p, false, true, false, Mode::Bias);
            run_case(&dev, &mut rng, &p, false, true, true, Mode::Bias);
        }
    }
}

#[test]
fn gemm_rejects_mismatched_buffers() {
    for dev in devices() {
        let h = |n: usize| DeviceBuffer::<f16>::from_host(&dev, &vec![f16::ONE; n]).unwrap();
        let (m, n, k) = (3, 4, 5);
        let (a, at, b, bt, bias) = (h(m * k), h(k * m), h(k * n), h(n * k), h(n));
        let mut c16 = h(m * n);
        let mut c32 = DeviceBuffer::<f32>::from_host(&dev, &vec![0.0; m * n]).unwrap();
        let expect_shape = |r: Result<(), GpuError>, what: &str| match r {
            Err(GpuError::Shape { op: "gemm", message }) => {
                assert!(!message.is_empty(), "{what}: empty message");
            }
            other => panic!("{}: {what}: expected a gemm shape error, got {other:?}", dev.name()),
        };
        // The well-formed calls pass.
        gemm(&dev, GemmOut::F16(&mut c16), &a, false, &b, false, m, n, k, false, Some(&bias))
            .unwrap();
        gemm(&dev, GemmOut::F32(&mut c32), &at, true, &bt, true, m, n, k, true, None).unwrap();
        let short_a = h(m * k - 1);
        expect_shape(
            gemm(&dev, GemmOut::F16(&mut c16), &short_a, false, &b, false, m, n, k, false, None),
            "A too short",
        );
        let long_b = h(k * n + 1);
        expect_shape(
            gemm(&dev, GemmOut::F16(&mut c16), &a, false, &long_b, true, m, n, k, false, None),
            "B too long",
        );
        let mut c_wrong = DeviceBuffer::<f32>::from_host(&dev, &vec![0.0; m * n + n]).unwrap();
        expect_shape(
            gemm(&dev, GemmOut::F32(&mut c_wrong), &a, false, &b, false, m, n, k, false, None),
            "C of the wrong size",
        );
        let bias_m = h(m);
        expect_shape(
            gemm(&dev, GemmOut::F16(&mut c16), &a, false, &b, false, m, n, k, false, Some(&bias_m)),
            "bias of m elements",
        );
        expect_shape(
            gemm(&dev, GemmOut::F32(&mut c32), &a, false, &b, false, m, n, k, true, Some(&bias)),
            "bias with accumulate",
        );
        let empty = h(0);
        let mut c_k0 = h(m * n);
        expect_shape(
            gemm(&dev, GemmOut::F16(&mut c_k0), &empty, false, &empty, false, m, n, 0, false, None),
            "k = 0",
        );
    }
}

/// GELU (tanh approximation) and its derivative in f64: the reference of the fused epilogues.
fn gelu(x: f64) -> f64 {
    let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
    0.5 * x * (1.0 + u.tanh())
}

fn gelu_grad(x: f64) -> f64 {
    let s = (2.0 / std::f64::consts::PI).sqrt();
    let t = (s * (x + 0.044715 * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * s * (1.0 + 3.0 * 0.044715 * x * x)
}

/// The fused GELU epilogues (`gemm_gelu`: pre-activation and activation from one product;
/// `gemm_gelu_grad`: the product times gelu' of a given pre-activation) against f64.
/// Tolerances, wider than `run_case`'s because cuBLASLt's GELU epilogues are less exact
/// than its plain products (H200, 2026-11-26): the pre-activation was seen 4 fp16 ulps off
/// (−0.10132 for −0.10107, k = 17), as if partial sums were rounded to fp16, so the sum may
/// be off by (4·(k + 2)·2⁻²⁴ + 2⁻¹⁰)·S (S = ‖a_row‖₂·‖b_col‖₂ + |bias| bounds the summands,
/// as in `run_case`), plus half an ulp of the result; the activation 2 ulps off the
/// correctly rounded value (gelu(0.07235) stored as 0.038208, not 0.038269), as if taken in
/// half precision, so it may be off by the sum's error carried through GELU's slope (< 1.13,
/// so 1.2×) plus 2⁻⁹ of the input's and the result's magnitudes; the gradient likewise,
/// plus 2⁻¹⁴ (fp16's smallest normal) everywhere. That still fails a missing or doubled
/// bias, the pre-activation stored as the activation, another activation (ReLU,
/// x·σ(1.702x)) or a slope off by 5%. (Erf GELU differs from tanh GELU by less than an fp16 ulp, so the
/// approximation itself is not what this checks.)
#[test]
#[allow(clippy::needless_range_loop)] // (i, j) index several arrays at once
fn fused_gelu_epilogues_match_an_f64_reference() {
    let shapes = [(7, 16, 5), (64, 64, 64), (33, 1000, 17), (300, 128, 96)];
    let mut rng = SplitMix64(0x6e1);
    for dev in devices() {
        let mut worst: f64 = 0.0;
        for &(m, n, k) in &shapes {
            let p = Problem::new(&mut rng, m, n, k);
            let accumulation = 4.0 * (k + 2) as f64 * 2f64.powi(-24);
            for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
                let case =
                    format!("{} {m}×{n}×{k} trans_a {trans_a} trans_b {trans_b}", dev.name());
                let a_host = if trans_a { transpose(&p.a, m, k) } else { p.a.clone() };
                let b_host = if trans_b { transpose(&p.b, k, n) } else { p.b.clone() };
                let a = DeviceBuffer::from_host(&dev, &a_host).unwrap();
                let b = DeviceBuffer::from_host(&dev, &b_host).unwrap();
                for with_bias in [false, true] {
                    let (bias_half, bias) = if with_bias {
                        random_half(&mut rng, n, -2.0, 2.0)
                    } else {
                        (Vec::new(), vec![0.0; n])
                    };
                    let bias_buf =
                        with_bias.then(|| DeviceBuffer::from_host(&dev, &bias_half).unwrap());
                    let mut act = DeviceBuffer::from_host(&dev, &vec![f16::NAN; m * n]).unwrap();
                    let mut pre = DeviceBuffer::from_host(&dev, &vec![f16::NAN; m * n]).unwrap();
                    gemm_gelu(
                        &dev,
                        &mut act,
                        &mut pre,
                        &a,
                        trans_a,
                        &b,
                        trans_b,
                        (m, n, k),
                        bias_buf.as_ref(),
                    )
                    .unwrap_or_else(|e| panic!("{case}: {e}"));
                    let (act, pre) = (act.to_host().unwrap(), pre.to_host().unwrap());
                    for i in 0..m {
                        for j in 0..n {
                            let at = i * n + j;
                            let want_pre = p.product[at] + bias[j];
                            let scale = p.a_norms[i] * p.b_norms[j] + bias[j].abs();
                            let sum_err = (accumulation + 2f64.powi(-10)) * scale;
                            let tol_pre =
                                sum_err + 2f64.powi(-10) * want_pre.abs() + 2f64.powi(-24);
                            let got_pre = pre[at].to_f64();
                            assert!(
                                (got_pre - want_pre).abs() <= tol_pre,
                                "{case} bias {with_bias}: pre[{i}, {j}] = {got_pre}, want {want_pre}"
                            );
                            let want_act = gelu(want_pre);
                            let tol_act = 1.2 * sum_err
                                + 2f64.powi(-9) * (want_pre.abs() + want_act.abs())
                                + 2f64.powi(-14);
                            worst = worst.max((act[at].to_f64() - want_act).abs() / tol_act);
                            let got_act = act[at].to_f64();
                            assert!(
                                (got_act - want_act).abs() <= tol_act,
                                "{case} bias {with_bias}: act[{i}, {j}] = {got_act}, want gelu({want_pre}) = {want_act}"
                            );
                        }
                    }
                }

                let (pre_half, pre) = random_half(&mut rng, m * n, -4.0, 4.0);
                let pre_buf = DeviceBuffer::from_host(&dev, &pre_half).unwrap();
                let mut d_pre = DeviceBuffer::from_host(&dev, &vec![f16::NAN; m * n]).unwrap();
                gemm_gelu_grad(&dev, &mut d_pre, &pre_buf, &a, trans_a, &b, trans_b, (m, n, k))
                    .unwrap_or_else(|e| panic!("{case}: {e}"));
                let d_pre = d_pre.to_host().unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let at = i * n + j;
                        let slope = gelu_grad(pre[at]);
                        let want = p.product[at] * slope;
                        let scale = p.a_norms[i] * p.b_norms[j];
                        let tol = slope.abs() * (accumulation + 2f64.powi(-10)) * scale
                            + 2f64.powi(-9) * (p.product[at].abs() + want.abs())
                            + 2f64.powi(-14);
                        let got = d_pre[at].to_f64();
                        worst = worst.max((got - want).abs() / tol);
                        assert!(
                            (got - want).abs() <= tol,
                            "{case}: d_pre[{i}, {j}] = {got}, want {} · gelu'({}) = {want}",
                            p.product[at],
                            pre[at]
                        );
                    }
                }
            }
        }
        eprintln!("{}: fused GELU, worst |error| / tolerance {worst:.3}", dev.name());
    }
}

/// The bias gradient summed in the weight gradient's product (`gemm_bias_grad`, cuBLASLt's
/// BGRADB), as linear layers call it: `op(A) = dyᵀ` stored `[k×m]`, B = x not transposed, C
/// fp32. The product is checked as `run_case` checks a plain one, overwritten (C poisoned) and
/// accumulated; the gradient, poisoned first, against Σ_k op(A)[i][k] in f64 with the same
/// kind of bound: 4·(k + 2)·2⁻²⁴·Σ_k |op(A)[i][k]| (any order of fp32 additions). A sum over
/// the wrong axis (B's, or C's columns), a gradient accumulated instead of overwritten, or one
/// left unwritten fails. Shapes include k = 517, past a product's usual split-K blocks, and a
/// sequence of several calls with one gradient buffer each.
#[test]
fn fused_bias_gradient_matches_an_f64_reference() {
    let shapes = [(7, 16, 5), (64, 64, 64), (24, 40, 517), (96, 32, 300)];
    let mut rng = SplitMix64(0xb9ad);
    for dev in devices() {
        let mut worst: f64 = 0.0;
        for &(m, n, k) in &shapes {
            let p = Problem::new(&mut rng, m, n, k);
            let a = DeviceBuffer::from_host(&dev, &transpose(&p.a, m, k)).unwrap();
            let b = DeviceBuffer::from_host(&dev, &p.b).unwrap();
            let a_f64: Vec<f64> = p.a.iter().map(|x| x.to_f64()).collect();
            for accumulate in [false, true] {
                let case = format!("{} {m}×{n}×{k} accumulate {accumulate}", dev.name());
                let (c0_half, c0) = if accumulate {
                    random_half(&mut rng, m * n, -4.0, 4.0)
                } else {
                    (vec![f16::NAN; m * n], vec![0.0; m * n])
                };
                let init: Vec<f32> = c0_half.iter().map(|x| x.to_f32()).collect();
                let mut c = DeviceBuffer::from_host(&dev, &init).unwrap();
                let mut grad = DeviceBuffer::from_host(&dev, &vec![f32::NAN; m]).unwrap();
                gemm_bias_grad(&dev, &mut c, &mut grad, &a, true, &b, false, (m, n, k), accumulate)
                    .unwrap_or_else(|e| panic!("{case}: {e}"));
                let got: Vec<f64> = c.to_host().unwrap().iter().map(|&x| f64::from(x)).collect();
                worst = worst.max(check(&case, &got, &p, &c0, &vec![0.0; n], true));
                let grad = grad.to_host().unwrap();
                for i in 0..m {
                    let row = &a_f64[i * k..(i + 1) * k];
                    let want: f64 = row.iter().sum();
                    let tol = 4.0
                        * (k + 2) as f64
                        * 2f64.powi(-24)
                        * row.iter().map(|x| x.abs()).sum::<f64>();
                    let err = (f64::from(grad[i]) - want).abs();
                    assert!(
                        err <= tol,
                        "{case}: bias gradient [{i}] = {} but Σ_k op(A)[{i}][k] = {want} (|error| {err:e} > {tol:e})",
                        grad[i]
                    );
                    worst = worst.max(err / tol);
                }
            }
        }
        eprintln!("{}: fused bias gradient, worst |error| / tolerance {worst:.3}", dev.name());
    }
}

/// A fused bias gradient needs an fp32 C (the device refuses it beside an fp16 one) and a
/// gradient vector of op(A)'s m rows.
#[test]
fn fused_bias_gradient_refuses_what_it_cannot_hold() {
    for dev in devices() {
        let h = |n: usize| DeviceBuffer::<f16>::from_host(&dev, &vec![f16::ONE; n]).unwrap();
        let f = |n: usize| DeviceBuffer::<f32>::from_host(&dev, &vec![0.0; n]).unwrap();
        let (m, n, k) = (8, 16, 32);
        let (a, b) = (h(k * m), h(k * n));
        let (mut c, mut short) = (f(m * n), f(m - 1));
        match gemm_bias_grad(&dev, &mut c, &mut short, &a, true, &b, false, (m, n, k), false) {
            Err(GpuError::Shape { op: "gemm", message }) => {
                assert!(message.contains("bias gradient"), "{message}")
            }
            other => panic!("{}: expected a shape error, got {other:?}", dev.name()),
        }
        let (c16, grad) = (h(m * n), f(m));
        let g = Gemm {
            m,
            n,
            k,
            a: a.ptr(),
            trans_a: true,
            b: b.ptr(),
            trans_b: false,
            c: c16.ptr(),
            c_f32: false,
            beta: 0.0,
            bias: None,
            epilogue: GemmEpilogue::BiasGrad { grad: grad.ptr() },
            batch: GemmBatch::ONE,
            ld: Gemm::DENSE,
        };
        // SAFETY: every buffer covers its matrix.
        match unsafe { run(&dev, "", &g) } {
            Err(GpuError::Shape { op: "gemm", message }) => {
                assert!(message.contains("fp32 C"), "{message}")
            }
            other => panic!("{}: expected a shape error, got {other:?}", dev.name()),
        }
    }
}

#[test]
fn fused_gelu_needs_a_multiple_of_8_columns() {
    for dev in devices() {
        let h = |n: usize| DeviceBuffer::<f16>::from_host(&dev, &vec![f16::ONE; n]).unwrap();
        let (m, n, k) = (3, 12, 5);
        let (a, b) = (h(m * k), h(k * n));
        let (mut act, mut pre) = (h(m * n), h(m * n));
        match gemm_gelu(&dev, &mut act, &mut pre, &a, false, &b, false, (m, n, k), None) {
            Err(GpuError::Shape { op: "gemm", message }) => {
                assert!(message.contains("multiple of 8"), "{message}")
            }
            other => panic!("{}: expected a shape error, got {other:?}", dev.name()),
        }
        // With 16 columns, only the pre-activation's size is wrong.
        let (n, short_pre) = (16, h(m * 16 - 1));
        let (b, mut d_pre) = (h(k * n), h(m * n));
        match gemm_gelu_grad(&dev, &mut d_pre, &short_pre, &a, false, &b, false, (m, n, k)) {
            Err(GpuError::Shape { op: "gemm", message }) => {
                assert!(message.contains("pre-activation"), "{message}")
            }
            other => panic!("{}: expected a shape error, got {other:?}", dev.name()),
        }
    }
}

/// A device may keep what it prepares for a product's shape (cuBLASLt's descriptors, made
/// once a shape): a second product of the same shape must still take its own buffers — its
/// bias, its GELU pre-activation, its bias gradient's output — not the first one's. Each
/// product here is followed by the next of the same shape on other buffers with other values;
/// every output is checked against its own inputs, and the first product's outputs must be
/// left as they were.
#[test]
fn products_of_one_shape_take_their_own_buffers() {
    let (m, n, k) = (16, 24, 32);
    let mut rng = SplitMix64(0x5a4e);
    for dev in devices() {
        let half = |v: &[f16]| DeviceBuffer::from_host(&dev, v).unwrap();
        let runs: Vec<(Vec<f16>, Vec<f16>, Vec<f16>)> = (0..2)
            .map(|_| {
                let (a, _) = random_half(&mut rng, m * k, -1.0, 1.0);
                let (b, _) = random_half(&mut rng, k * n, -1.0, 1.0);
                let (bias, _) = random_half(&mut rng, n, -2.0, 2.0);
                (a, b, bias)
            })
            .collect();
        // The plain product with a bias (fp16 C, and fp32 C, whose bias the device widens to
        // fp32 first), then the fused GELU, then the fused bias gradient.
        let mut plain = Vec::new();
        let mut plain_f32 = Vec::new();
        let mut gelu = Vec::new();
        let mut grads = Vec::new();
        for (a, b, bias) in &runs {
            let (a_buf, b_buf, bias_buf) = (half(a), half(b), half(bias));
            let mut c = half(&vec![f16::NAN; m * n]);
            gemm(
                &dev,
                GemmOut::F16(&mut c),
                &a_buf,
                false,
                &b_buf,
                false,
                m,
                n,
                k,
                false,
                Some(&bias_buf),
            )
            .unwrap();
            let mut c32 = DeviceBuffer::from_host(&dev, &vec![f32::NAN; m * n]).unwrap();
            let out = GemmOut::F32(&mut c32);
            gemm(&dev, out, &a_buf, false, &b_buf, false, m, n, k, false, Some(&bias_buf)).unwrap();
            plain_f32.push(c32);
            let (mut act, mut pre) = (half(&vec![f16::NAN; m * n]), half(&vec![f16::NAN; m * n]));
            gemm_gelu(
                &dev,
                &mut act,
                &mut pre,
                &a_buf,
                false,
                &b_buf,
                false,
                (m, n, k),
                Some(&bias_buf),
            )
            .unwrap();
            // The fused bias gradient with A stored transposed, [k×m]: `a`'s values read as k
            // rows of m (as linear layers pass dy).
            let mut dw = DeviceBuffer::from_host(&dev, &vec![0f32; m * n]).unwrap();
            let mut grad = DeviceBuffer::from_host(&dev, &vec![f32::NAN; m]).unwrap();
            gemm_bias_grad(&dev, &mut dw, &mut grad, &a_buf, true, &b_buf, false, (m, n, k), false)
                .unwrap();
            plain.push(c);
            gelu.push((act, pre));
            grads.push(grad);
        }
        for (r, (a, b, bias)) in runs.iter().enumerate() {
            let f = |x: &f16| f64::from(x.to_f32());
            // The reference product of run r (+ its bias).
            let want = |i: usize, j: usize| {
                (0..k).map(|l| f(&a[i * k + l]) * f(&b[l * n + j])).sum::<f64>() + f(&bias[j])
            };
            let c = plain[r].to_host().unwrap();
            let c32 = plain_f32[r].to_host().unwrap();
            let pre = gelu[r].1.to_host().unwrap();
            for i in 0..m {
                for j in 0..n {
                    let w = want(i, j);
                    let got = f64::from(c32[i * n + j]);
                    assert!(
                        (got - w).abs() <= 1e-3,
                        "{} run {r}: C f32 [{i},{j}] = {got}, want {w}",
                        dev.name()
                    );
                    let tol = 0.02 + 2e-3 * w.abs();
                    assert!(
                        (f(&c[i * n + j]) - w).abs() <= tol,
                        "{} run {r}: C[{i},{j}]",
                        dev.name()
                    );
                    let got = f(&pre[i * n + j]);
                    assert!(
                        (got - w).abs() <= tol,
                        "{} run {r}: pre[{i},{j}] = {got}, want {w}",
                        dev.name()
                    );
                }
            }
            // op(A) = (A stored [k×m])ᵀ: row i of op(A) is column i of that storage.
            let grad = grads[r].to_host().unwrap();
            for i in 0..m {
                let w: f64 = (0..k).map(|l| f(&a[l * m + i])).sum();
                let got = f64::from(grad[i]);
                assert!(
                    (got - w).abs() <= 1e-3,
                    "{} run {r}: grad[{i}] = {got}, want {w}",
                    dev.name()
                );
            }
        }
    }
}

/// Head-column operands like the attention path's: x and y `[batch·len, heads·dh]` (random
/// fp16), and head h's product per batch row: its Dh columns of the output (`len` rows, or
/// none) = its columns of x (len × Dh) times the first Dh rows of its columns of y (Dh × Dh,
/// read transposed when asked), batched over the batch rows.
struct HeadColumns {
    x: DeviceBuffer<f16>,
    y: DeviceBuffer<f16>,
    heads: usize,
    dh: usize,
    len: usize,
    batch: usize,
}

impl HeadColumns {
    const HEADS: usize = 7;
    const DH: usize = 40;
    const LEN: usize = 96;
    const BATCH: usize = 3;

    fn new(dev: &Gpu, rng: &mut SplitMix64) -> Self {
        let (heads, dh, len, batch) = (Self::HEADS, Self::DH, Self::LEN, Self::BATCH);
        let n = batch * len * heads * dh;
        let (x, _) = random_half(rng, n, -1.0, 1.0);
        let (y, _) = random_half(rng, n, -1.0, 1.0);
        let (x, y) =
            (DeviceBuffer::from_host(dev, &x).unwrap(), DeviceBuffer::from_host(dev, &y).unwrap());
        Self { x, y, heads, dh, len, batch }
    }

    fn width(&self) -> usize {
        self.heads * self.dh
    }

    /// An fp32 output of the operands' size, all NaN.
    fn poisoned32(&self, dev: &Gpu) -> DeviceBuffer<f32> {
        DeviceBuffer::from_host(dev, &vec![f32::NAN; self.batch * self.len * self.width()]).unwrap()
    }

    /// The same in fp16.
    fn poisoned16(&self, dev: &Gpu) -> DeviceBuffer<f16> {
        DeviceBuffer::from_host(dev, &vec![f16::NAN; self.batch * self.len * self.width()]).unwrap()
    }

    /// Head h's product into `c` (fp32 when `f32_out`), B transposed when `trans_b`, with no
    /// rows when `empty`.
    fn product(&self, h: usize, c: DevicePtr, f32_out: bool, trans_b: bool, empty: bool) -> Gemm {
        let (dh, len, width) = (self.dh, self.len, self.width());
        let elem = if f32_out { 4 } else { 2 };
        Gemm {
            m: if empty { 0 } else { len },
            n: dh,
            k: dh,
            a: self.x.ptr() + (h * dh * 2) as u64,
            trans_a: false,
            b: self.y.ptr() + (h * dh * 2) as u64,
            trans_b,
            c: c + (h * dh * elem) as u64,
            c_f32: f32_out,
            beta: 0.0,
            bias: None,
            epilogue: GemmEpilogue::None,
            batch: GemmBatch::strided(self.batch, len * width, len * width, len * width),
            ld: [width, width, width],
        }
    }
}

/// A group's products of one shape run as a pointer-array batch (`run_group_as` with pointer
/// arrays; training's default unless `CHINGU_GEMM_ARRAYS=0`) give what they give one at a time: the same
/// bits on the emulator, and within the rounding of another summation order on a GPU (fp32:
/// 10⁻⁵ relative for sums of 40 products of values below 1, far above two orderings' 2⁻²⁴-scale
/// differences; fp16: one rounding of each result apart at most, 2⁻¹⁰ relative). Seven
/// products like the attention path's per-head ones, each a batch over 3 batch rows of head
/// columns of `[rows, H·Dh]` tensors: heads 0, 2, 4 (fp16 out) and 3, 5 (fp32 out) make two
/// batches; head 1 (B transposed) fits no other and head 6 (no rows) has nothing to do, so
/// both go as before. Outputs start as NaN, so a column left unwritten fails. On the emulator
/// the test also counts the batches the device ran (two, and two more when the group runs
/// again, which must write no address array again: they are cached), and a device without
/// pointer arrays must give the same bits through the fallback having run none.
#[test]
fn a_pointer_array_batch_equals_its_products_one_at_a_time() {
    use std::sync::Arc;
    let _counting = counting_uploads();
    let mut rng = SplitMix64(0xa77a);
    // Under the tests' schedule (every launch also run shuffled and compared, as `devices()`'s
    // emulated device runs them), which that device, filtered out below, would have given.
    let with_arrays = Arc::new(tests_schedule_device());
    let without_arrays = Arc::new(tests_schedule_device().without_pointer_arrays());
    let mut all: Vec<Gpu> = vec![with_arrays.clone(), without_arrays.clone()];
    all.extend(devices().into_iter().filter(|d| !d.name().starts_with("emu")));
    for dev in all {
        let ops = HeadColumns::new(&dev, &mut rng);
        let (heads, dh, width) = (ops.heads, ops.dh, ops.width());
        let poisoned = || ops.poisoned32(&dev);
        let poisoned_half = || ops.poisoned16(&dev);
        let f32_head = |h: usize| h == 3 || h == 5;
        let products = |c32: DevicePtr, c16: DevicePtr| -> Vec<Gemm> {
            (0..heads)
                .map(|h| {
                    let c = if f32_head(h) { c32 } else { c16 };
                    ops.product(h, c, f32_head(h), h == 1, h == heads - 1)
                })
                .collect()
        };
        let (alone32, alone16) = (poisoned(), poisoned_half());
        for g in &products(alone32.ptr(), alone16.ptr()) {
            // SAFETY: every block of A, B and C lies inside its buffer (row stride H·Dh, Dh
            // columns from head h's first, `len` rows a batch row).
            unsafe { run(&dev, "", g) }.unwrap();
        }
        let batches_before = dev.pointer_array_batches();
        let (group32, group16) = (poisoned(), poisoned_half());
        let grouped = products(group32.ptr(), group16.ptr());
        // SAFETY: as above; each product writes only head h's columns of its output.
        unsafe { run_group_as(&dev, "", &grouped, true) }.unwrap();
        // The same group again (the same results over them): its address arrays are found
        // already on the device, none written again.
        let uploads = address_uploads();
        // SAFETY: as above.
        unsafe { run_group_as(&dev, "", &grouped, true) }.unwrap();
        assert_eq!(address_uploads(), uploads, "address arrays written again on {}", dev.name());
        let name = dev.name();
        let emulated = name.starts_with("emu");
        let ran = dev.pointer_array_batches().unwrap() - batches_before.unwrap();
        if Arc::ptr_eq(&dev, &(with_arrays.clone() as Gpu)) {
            assert_eq!(ran, 4, "pointer-array batches run (two, twice)");
        } else if Arc::ptr_eq(&dev, &(without_arrays.clone() as Gpu)) {
            assert_eq!(ran, 0, "a device without pointer-array batches ran one");
        } else {
            // A library or a shape without such batches falls back, rightly: said, not failed
            // (`scripts/gpu-check` shows this line).
            println!("{name}: pointer-array batches taken: {ran} of 4");
        }
        let (a32, g32) = (alone32.to_host().unwrap(), group32.to_host().unwrap());
        let (a16, g16) = (alone16.to_host().unwrap(), group16.to_host().unwrap());
        for (i, (a, g)) in a32.iter().zip(&g32).enumerate() {
            let h = i % width / dh;
            assert_eq!(a.is_nan(), !f32_head(h), "fp32 element {i} (head {h}) on {name}");
            assert_eq!(g.is_nan(), a.is_nan(), "fp32 element {i} (head {h}) on {name}");
            let (a, g) = (f64::from(*a), f64::from(*g));
            let ok = if emulated {
                a.to_bits() == g.to_bits()
            } else {
                (a - g).abs() <= 1e-5 * (1.0 + a.abs())
            };
            assert!(a.is_nan() || ok, "fp32 element {i} (head {h}) on {name}: {g} against {a}");
        }
        for (i, (a, g)) in a16.iter().zip(&g16).enumerate() {
            let h = i % width / dh;
            assert_eq!(a.is_nan(), f32_head(h) || h == heads - 1, "fp16 element {i} (head {h})");
            assert_eq!(g.is_nan(), a.is_nan(), "fp16 element {i} (head {h}) on {name}");
            let (a, g) = (a.to_f64(), g.to_f64());
            let tol = 2f64.powi(-10) * a.abs().max(g.abs()) + 2f64.powi(-24);
            let ok = if emulated { a.to_bits() == g.to_bits() } else { (a - g).abs() <= tol };
            assert!(a.is_nan() || ok, "fp16 element {i} (head {h}) on {name}: {g} against {a}");
        }
    }
}

/// An emulated device of its own (so its counts are this test's) under the schedule the GPU
/// tests run (`Schedule::TESTS` unless `CHINGU_EMU_SCHEDULE` says otherwise).
fn tests_schedule_device() -> chingu_kernels::gpu::emu::EmuDevice {
    use chingu_kernels::gpu::emu::{EmuDevice, Schedule};
    EmuDevice::with_schedule(Schedule::from_env(Schedule::TESTS).unwrap())
}

/// Held by the tests that upload address arrays while one of them counts the process's
/// uploads (`address_uploads`), so another's do not land between its two readings.
fn counting_uploads() -> std::sync::MutexGuard<'static, ()> {
    static COUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    COUNTING.lock().unwrap_or_else(|e| e.into_inner())
}

/// A group whose pointer-array batch finds no room on the device for its address arrays (768
/// bytes: A's, B's and C's addresses, 32 each) runs its products one launch each, with the
/// same results, rather than failing; with room for them, the same group runs as the batch.
#[test]
fn a_batch_with_no_room_for_its_addresses_runs_its_products_one_launch_each() {
    use chingu_kernels::gpu::emu::EmuDevice;
    use chingu_kernels::gpu::Device;
    use std::sync::Arc;
    let _counting = counting_uploads();
    // Seven heads' products of one shape into fp16: one batch of 21 blocks.
    let run_on = |dev: &Gpu| -> Vec<u16> {
        let ops = HeadColumns::new(dev, &mut SplitMix64(0x0f0f));
        let out = ops.poisoned16(dev);
        let group: Vec<Gemm> =
            (0..ops.heads).map(|h| ops.product(h, out.ptr(), false, false, false)).collect();
        // SAFETY: every block of A, B and C lies inside its buffer; each product writes only
        // head h's columns.
        unsafe { run_group_as(dev, "", &group, true) }.expect("the group runs");
        out.to_host().unwrap().iter().map(|v| v.to_bits()).collect()
    };
    // What the operands and the output take: a device without such batches allocates nothing
    // else for the group.
    let sizing = Arc::new(EmuDevice::new().without_pointer_arrays());
    let want = run_on(&(sizing.clone() as Gpu));
    let need = sizing.peak_allocated();
    assert!(want.iter().all(|&b| !f16::from_bits(b).is_nan()), "every head written");
    for (room, batches) in [(100, 0), (4096, 1)] {
        let dev = Arc::new(EmuDevice::new().with_memory_limit(need + room));
        let got = run_on(&(dev.clone() as Gpu));
        assert_eq!(dev.pointer_array_batches(), Some(batches), "{room} bytes to spare");
        assert_eq!(got, want, "{room} bytes to spare");
    }
}

/// Values put in device memory by launches that carry them (`ops::upload_in_order`, the
/// pointer-array batches' addresses) arrive whole and in order, across several launches' worth
/// (240 a launch) and a short last one.
#[test]
fn values_uploaded_in_order_arrive_whole() {
    let mut rng = SplitMix64(0x5eed);
    for dev in devices() {
        for n in [1, 240, 241, 700] {
            let values: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
            let buf = chingu_kernels::gpu::ops::upload_in_order(&dev, &values).unwrap();
            assert_eq!(buf.to_host().unwrap(), values, "{n} values on {}", dev.name());
        }
    }
}

/// The backward of linear layers that read one input (attention's query, key and value
/// projections), `GpuBackend::linear_backward_shared_input` with its weight-gradient products
/// queued as one pointer-array batch (`with_batched_weight_grads(true)`) against one layer at
/// a time: dx overwritten (self-attention's) or added to (cross-attention's keys and values),
/// no dx, and a layer without a bias. The inputs are multiples of 1/16 below 1 and every sum
/// stays far below 2^11, so each fp32 sum is exact in any order and dW and db must equal
/// prior + the f64 reference bit for bit on every device, batched or not; dx (fp16, rounded
/// after each layer's product adds to it) is the same chain of products either way, so bit
/// for bit the same, and where it is overwritten its prior (poisoned with NaN) must not show.
/// The emulated device counts exactly one batch for the three weight gradients batched and
/// none one layer at a time (none either way with `CHINGU_GEMM_ARRAYS=0`).
#[test]
fn projections_weight_gradients_as_one_pointer_array_batch_equal_one_product_a_layer() {
    use chingu_kernels::gpu::backend::GpuBackend;
    use chingu_kernels::{Backend, BufRole, LinearGrads};
    use std::sync::Arc;
    let _uploads = counting_uploads();
    let (rows, in_dim, out_dim, layers) = (96usize, 32usize, 48usize, 3usize);
    let values = |n: usize, seed: usize| -> Vec<f32> {
        (0..n).map(|i| (((i * 29 + seed * 13) % 31) as f32 - 15.0) / 16.0).collect()
    };
    let counted = Arc::new(tests_schedule_device());
    let mut all: Vec<Gpu> = vec![counted.clone()];
    all.extend(devices().into_iter().filter(|d| !d.name().starts_with("emu")));
    // (dx: none, overwritten or added to; which layers have a bias)
    let cases = [(Some(false), [true; 3]), (Some(true), [true; 3]), (None, [true, false, true])];
    for dev in all {
        let name = dev.name();
        for (dx_mode, biased) in cases {
            let what = format!("{name}, dx {dx_mode:?}, biases {biased:?}");
            let tiles_launched = || counted.launches_of("bias_backward_tiles_f16");
            let run = |batched: bool| -> (Vec<Vec<f32>>, Option<usize>, usize) {
                let backend = GpuBackend::new(dev.clone())
                    .with_fused_bias_grad(false)
                    .with_batched_weight_grads(batched);
                let act = |n, seed| backend.upload_f32_as(&values(n, seed), BufRole::Activation);
                let grad = |n, seed| backend.upload_f32_as(&values(n, seed), BufRole::Gradient);
                let x = act(rows * in_dim, 1);
                let dys: Vec<_> = (0..layers).map(|l| act(rows * out_dim, 10 + l)).collect();
                let ws: Vec<_> = (0..layers)
                    .map(|l| {
                        let w = values(out_dim * in_dim, 20 + l);
                        backend.upload_f32_as(&w, BufRole::Parameter)
                    })
                    .collect();
                let mut dws: Vec<_> = (0..layers).map(|l| grad(out_dim * in_dim, 30 + l)).collect();
                let mut dbs: Vec<_> = (0..layers).map(|l| grad(out_dim, 40 + l)).collect();
                let mut dx = match dx_mode {
                    Some(true) => act(rows * in_dim, 50),
                    _ => backend.upload_f32_as(&vec![f32::NAN; rows * in_dim], BufRole::Activation),
                };
                let mut parts: Vec<LinearGrads<'_, _>> = dws
                    .iter_mut()
                    .zip(dbs.iter_mut())
                    .enumerate()
                    .map(|(l, (dw, db))| LinearGrads {
                        dw,
                        db: biased[l].then_some(db),
                        dy: &dys[l],
                        w: &ws[l],
                    })
                    .collect();
                let before = dev.pointer_array_batches();
                let tiles_before = tiles_launched();
                backend.linear_backward_shared_input(
                    dx_mode.is_some().then_some(&mut dx),
                    dx_mode == Some(true),
                    &mut parts,
                    &x,
                    rows,
                    in_dim,
                    out_dim,
                );
                let ran = dev.pointer_array_batches().zip(before).map(|(a, b)| a - b);
                let tiles = tiles_launched() - tiles_before;
                let mut out = vec![backend.to_f32(&dx)];
                out.extend(dws.iter().map(|g| backend.to_f32(g)));
                out.extend(dbs.iter().map(|g| backend.to_f32(g)));
                (out, ran, tiles)
            };
            let (batched, ran_batched, tiles_batched) = run(true);
            let (each, ran_each, tiles_each) = run(false);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let x = values(rows * in_dim, 1);
            for l in 0..layers {
                let dy = values(rows * out_dim, 10 + l);
                let prior_w = values(out_dim * in_dim, 30 + l);
                let want_w: Vec<f32> = (0..out_dim * in_dim)
                    .map(|e| {
                        let (o, i) = (e / in_dim, e % in_dim);
                        let sum: f64 = (0..rows)
                            .map(|r| f64::from(dy[r * out_dim + o]) * f64::from(x[r * in_dim + i]))
                            .sum();
                        (f64::from(prior_w[e]) + sum) as f32
                    })
                    .collect();
                let prior_b = values(out_dim, 40 + l);
                let want_b: Vec<f32> = (0..out_dim)
                    .map(|o| {
                        let sum = (0..rows).map(|r| dy[r * out_dim + o]).sum::<f32>();
                        if biased[l] {
                            prior_b[o] + sum
                        } else {
                            prior_b[o]
                        }
                    })
                    .collect();
                for (how, got) in [("one batch", &batched), ("one layer at a time", &each)] {
                    assert_eq!(bits(&got[1 + l]), bits(&want_w), "{what}, {how}: dW of layer {l}");
                    let db = &got[1 + layers + l];
                    assert_eq!(bits(db), bits(&want_b), "{what}, {how}: db of layer {l}");
                }
            }
            assert_eq!(bits(&batched[0]), bits(&each[0]), "{what}: dx");
            match dx_mode {
                Some(added) => {
                    let prior = values(rows * in_dim, 50);
                    let fresh = batched[0].iter().all(|v| v.is_finite());
                    assert!(fresh, "{what}: a NaN of dx's prior shows through");
                    let moved = batched[0].iter().zip(&prior).any(|(a, b)| a != b);
                    assert!(!added || moved, "{what}: dx was added to");
                }
                None => assert!(batched[0].iter().all(|v| v.is_nan()), "{what}: dx untouched"),
            }
            if Arc::ptr_eq(&dev, &(counted.clone() as Gpu)) {
                let want = usize::from(chingu_kernels::gpu::gemm::pointer_arrays());
                assert_eq!((ran_batched, ran_each), (Some(want), Some(0)), "{what}: batches run");
                // The biases (two or three, 48 columns: the tiled kernels) in one launch.
                assert_eq!((tiles_batched, tiles_each), (1, 0), "{what}: bias launches");
            } else if dx_mode == Some(false) {
                // `scripts/gpu-check` shows this line (cuBLASLt without such batches falls
                // back, rightly).
                let ran = ran_batched.unwrap_or(0);
                println!(
                    "{name}: projections' weight gradients: pointer-array batches taken: {ran} of 1"
                );
            }
        }
    }
}

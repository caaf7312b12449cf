//! The CPU backend's matrix products: single-threaded matrixmultiply calls, split across
//! rayon's pool in ways that never change a result with the thread count.
//!
//! matrixmultiply's k loop is sequential and outermost, so every element of C is accumulated
//! in the same order however C's rows are partitioned; a split along k (two partial products
//! then added) changes the order, so its split point depends only on the shape.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::Scalar;

/// `C[m×n] = A·B (+ C if accumulate)` with dense row-major C, split by rows over the pool
/// (see [`split_rows`]).
///
/// `a` is addressed as `a[i·rsa + p·csa]`, `b` as `b[p·rsb + j·csb]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm<T: Scalar>(
    c: &mut [T],
    a: &[T],
    rsa: usize,
    csa: usize,
    b: &[T],
    rsb: usize,
    csb: usize,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    split_rows(&mut c[..m * n], m, k, n, |first, c_rows| {
        let rows = c_rows.len() / n;
        gemm_strided(c_rows, n, &a[first * rsa..], rsa, csa, b, rsb, csb, rows, k, n, accumulate);
    });
}

/// Runs `block(first row, rows of C)` over blocks of C's `m` rows (`n` wide) in parallel.
///
/// One pool for products and elementwise ops alike, so no pool spins while the other
/// computes. Every element's accumulation order is matrixmultiply's k loop whatever the split
/// (which depends on the thread count), so no bit can change. (Each block packs its own copy
/// of B; splitting columns instead when n > m, to share the smaller operand, measured no
/// faster on seed-256.)
fn split_rows<E: Send>(
    c: &mut [E],
    m: usize,
    k: usize,
    n: usize,
    block: impl Fn(usize, &mut [E]) + Sync,
) {
    if n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    if threads <= 1 || m * k * n < GEMM_MIN_SPLIT_FLOPS {
        return block(0, c);
    }
    let rows_per_task = m.div_ceil(threads).max(GEMM_MIN_ROWS);
    c.par_chunks_mut(rows_per_task * n)
        .enumerate()
        .for_each(|(task, c_rows)| block(task * rows_per_task, c_rows));
}

/// Rows per parallel block of the pass that adds a k split's halves (and runs the epilogue).
const EPILOGUE_ROWS: usize = 64;

/// `C = A·B` into uninitialised memory (`c` holds at least `m·n` elements), split by rows as
/// [`gemm`] splits them.
///
/// Sound because matrixmultiply never reads C when β = 0 ("If β is zero, then C does not
/// need to be initialized", its `sgemm`/`dgemm` contract): every element is written once.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_into_uninit<T: Scalar>(
    c: &mut [MaybeUninit<T>],
    a: &[T],
    rsa: usize,
    csa: usize,
    b: &[T],
    rsb: usize,
    csb: usize,
    m: usize,
    k: usize,
    n: usize,
) {
    assert!(c.len() >= m * n, "gemm: C out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].iter_mut().for_each(|x| *x = MaybeUninit::new(T::zero()));
        return;
    }
    split_rows(&mut c[..m * n], m, k, n, |first, c_rows| {
        let rows = c_rows.len() / n;
        // SAFETY: `c_rows` is a distinct block of `rows × n` elements, written (never read)
        // by the product with β = 0.
        unsafe {
            product(
                c_rows.as_mut_ptr().cast(),
                n,
                &a[first * rsa..],
                rsa,
                csa,
                b,
                rsb,
                csb,
                rows,
                k,
                n,
                false,
            )
        }
    });
}

/// One single-threaded matrixmultiply call, `m, k, n ≥ 1`, A's and B's bounds checked here.
///
/// # Safety
/// `c` must address `m` rows of `n` elements, `rsc` apart, that nothing else uses meanwhile;
/// without `accumulate` they may be uninitialised (β = 0: matrixmultiply never reads C).
#[allow(clippy::too_many_arguments)]
unsafe fn product<T: Scalar>(
    c: *mut T,
    rsc: usize,
    a: &[T],
    rsa: usize,
    csa: usize,
    b: &[T],
    rsb: usize,
    csb: usize,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    assert!((m - 1) * rsa + (k - 1) * csa < a.len(), "gemm: A out of bounds");
    assert!((k - 1) * rsb + (n - 1) * csb < b.len(), "gemm: B out of bounds");
    let beta = if accumulate { T::one() } else { T::zero() };
    // SAFETY: A and B in bounds (above), C by the caller's contract.
    unsafe {
        T::gemm(
            m,
            k,
            n,
            T::one(),
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c,
            rsc as isize,
            1,
        )
    }
}

/// Smallest row block a GEMM is split into.
const GEMM_MIN_ROWS: usize = 64;
/// Smallest `m·k·n` worth splitting a GEMM for.
const GEMM_MIN_SPLIT_FLOPS: usize = 1 << 20;

/// `C[m×n] = A·B (+ C if accumulate)` with C addressed as `c[i·rsc + j]` (strided rows let
/// attention write one head's columns in place).
///
/// One single-threaded matrixmultiply call; its k loop is sequential and outermost, so every
/// element is accumulated in the same order however C's rows are partitioned.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_strided<T: Scalar>(
    c: &mut [T],
    rsc: usize,
    a: &[T],
    rsa: usize,
    csa: usize,
    b: &[T],
    rsb: usize,
    csb: usize,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 || k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * rsc..i * rsc + n].iter_mut().for_each(|x| *x = T::zero());
            }
        }
        return;
    }
    assert!((m - 1) * rsc + n <= c.len(), "gemm: C out of bounds");
    // SAFETY: C's bounds asserted above; `c` is a distinct mutable slice.
    unsafe { product(c.as_mut_ptr(), rsc, a, rsa, csa, b, rsb, csb, m, k, n, accumulate) }
}

/// What runs on rows of C once they hold the product's result: `(first row, those rows)`.
pub(super) type Epilogue<'a, T> = &'a (dyn Fn(usize, &mut [T]) + Sync);

/// One product `C (+)= A·B` to compute: C dense row-major `m×n`, A and B strided as in
/// [`gemm`], and what to do to C's rows after.
pub(super) struct Product<'a, T> {
    pub c: &'a mut [T],
    pub a: &'a [T],
    pub rsa: usize,
    pub csa: usize,
    pub b: &'a [T],
    pub rsb: usize,
    pub csb: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub accumulate: bool,
    /// Applied to every row of C exactly once, after its final value is there.
    pub then: Option<Epilogue<'a, T>>,
}

impl<T: Scalar> Product<'_, T> {
    /// Computes the product; `first_row` is C's first row within the whole product, for
    /// the epilogue.
    fn run(self, first_row: usize) {
        let Product { c, a, rsa, csa, b, rsb, csb, m, k, n, accumulate, then } = self;
        gemm_strided(c, n, a, rsa, csa, b, rsb, csb, m, k, n, accumulate);
        if let Some(then) = then {
            then(first_row, &mut c[..m * n]);
        }
    }

    /// Whether to halve along k rather than C's rows. Halving the rows makes each half pack
    /// all of B (`k·n` elements); halving k packs nothing twice but costs a temporary `m×n`
    /// result that is zeroed, written and added (about three passes over `m·n`).
    fn halve_depth(&self) -> bool {
        3 * self.m < self.k
    }

    /// The two halves; a k split leaves its second half's result in `second`, for
    /// [`Product::add_second`].
    fn halves<'h>(&'h mut self, second: &'h mut Vec<T>) -> [Product<'h, T>; 2] {
        let (rsa, csa, rsb, csb, n) = (self.rsa, self.csa, self.rsb, self.csb, self.n);
        if self.halve_depth() {
            let split = self.k / 2;
            *second = vec![T::zero(); self.m * n];
            [
                Product {
                    c: &mut self.c[..self.m * n],
                    a: self.a,
                    b: self.b,
                    k: split,
                    rsa,
                    csa,
                    rsb,
                    csb,
                    m: self.m,
                    n,
                    accumulate: self.accumulate,
                    then: None,
                },
                Product {
                    c: second,
                    a: &self.a[split * csa..],
                    b: &self.b[split * rsb..],
                    k: self.k - split,
                    rsa,
                    csa,
                    rsb,
                    csb,
                    m: self.m,
                    n,
                    accumulate: false,
                    then: None,
                },
            ]
        } else {
            let top = self.m / 2;
            let (c_top, c_bottom) = self.c[..self.m * n].split_at_mut(top * n);
            let half = |c, a, m| Product {
                c,
                a,
                b: self.b,
                rsa,
                csa,
                rsb,
                csb,
                m,
                k: self.k,
                n,
                accumulate: self.accumulate,
                then: self.then,
            };
            [half(c_top, self.a, top), half(c_bottom, &self.a[top * rsa..], self.m - top)]
        }
    }

    /// After a k split: C += the second half's result, then the epilogue (row halves ran it
    /// themselves).
    fn add_second(&mut self, second: &[T]) {
        if second.is_empty() {
            return;
        }
        let n = self.n;
        let then = self.then;
        let c = &mut self.c[..second.len()];
        let block = EPILOGUE_ROWS * n;
        c.par_chunks_mut(block).zip(second.par_chunks(block)).enumerate().for_each(
            |(i, (c, s))| {
                c.iter_mut().zip(s).for_each(|(c, &s)| *c = *c + s);
                if let Some(then) = then {
                    then(i * EPILOGUE_ROWS, c);
                }
            },
        );
    }
}

/// Two independent products (a layer's input and weight gradients) side by side, each
/// halved (see [`Product::halves`]), one half of each per task: the two tasks are equally
/// large even when the products are not, and no operand is packed twice where a k split
/// avoids it. The halving depends only on the shapes, never on the thread count.
pub(super) fn side_by_side<T: Scalar>(mut p: Product<'_, T>, mut q: Product<'_, T>) {
    if p.m * p.k * p.n + q.m * q.k * q.n < 2 * GEMM_MIN_SPLIT_FLOPS {
        p.run(0);
        q.run(0);
        return;
    }
    let (mut p_second, mut q_second) = (Vec::new(), Vec::new());
    {
        let [p1, p2] = p.halves(&mut p_second);
        let [q1, q2] = q.halves(&mut q_second);
        let (p_top, q_top) = (p1.m, q1.m);
        rayon::join(
            || rayon::join(|| p1.run(0), || q1.run(0)),
            || rayon::join(|| p2.run(p_top), || q2.run(q_top)),
        );
    }
    p.add_second(&p_second);
    q.add_second(&q_second);
}

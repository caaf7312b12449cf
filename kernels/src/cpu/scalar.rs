//! The element types the CPU backend runs in: f32 for training, f64 for gradient checks.

use num_traits::Float;

/// A float the CPU backend can compute in, with its GEMM.
pub trait Scalar:
    Float + Send + Sync + Default + std::fmt::Debug + std::iter::Sum + 'static
{
    /// Short type name for messages.
    const NAME: &'static str;
    /// From f64 (rounding for f32).
    fn of(x: f64) -> Self;
    /// To f64 (exact).
    fn f64(self) -> f64;
    /// `C = alpha·A·B + beta·C` on strided matrices (matrixmultiply's contract).
    ///
    /// # Safety
    /// The pointers with their strides must describe valid `m×k`, `k×n` and `m×n` matrices,
    /// and `c` must not alias `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

/// The two impls differ only in names: the type, its matrixmultiply routine and conversions.
macro_rules! impl_scalar {
    ($t:ty, $name:literal, $gemm:path) => {
        impl Scalar for $t {
            const NAME: &'static str = $name;
            fn of(x: f64) -> Self {
                x as $t
            }
            fn f64(self) -> f64 {
                f64::from(self)
            }
            unsafe fn gemm(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: *const Self,
                rsa: isize,
                csa: isize,
                b: *const Self,
                rsb: isize,
                csb: isize,
                beta: Self,
                c: *mut Self,
                rsc: isize,
                csc: isize,
            ) {
                // SAFETY: forwarded from the caller's contract.
                unsafe { $gemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc) }
            }
        }
    };
}

impl_scalar!(f32, "f32", matrixmultiply::sgemm);
impl_scalar!(f64, "f64", matrixmultiply::dgemm);

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
    /// `e^self` by a formula the compiler can vectorise: [`exp_f32`] for f32 (within 2 ulp of
    /// the exact value), the standard library's for f64 (gradient checks want full precision).
    fn exp_vectorizable(self) -> Self;
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
    ($t:ty, $name:literal, $gemm:path, $exp:expr) => {
        impl Scalar for $t {
            const NAME: &'static str = $name;
            fn of(x: f64) -> Self {
                x as $t
            }
            fn f64(self) -> f64 {
                f64::from(self)
            }
            #[inline(always)]
            fn exp_vectorizable(self) -> Self {
                $exp(self)
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

impl_scalar!(f32, "f32", matrixmultiply::sgemm, exp_f32);
impl_scalar!(f64, "f64", matrixmultiply::dgemm, f64::exp);

/// `e^x` in f32 without branches or calls, so loops over slices vectorise (libm's `expf` is a
/// call per element, and GELU and the cross-entropy spend most of their time in it).
///
/// Cody–Waite reduction `x = n·ln 2 + r`, |r| ≤ ln 2 / 2, then `e^r ≈ 1 + r + r²·P(r)` with
/// Cephes' degree-5 minimax coefficients for `expf`, scaled by 2ⁿ built in the exponent bits.
/// Within 2 ulp of the exact value (tested against f64). Inputs are clamped to
/// [−87.3, 88.0], where 2ⁿ stays a normal float: far below, results are ~1e-38 instead of
/// 0; far above, ~2.4e38 instead of +inf (both only where a softmax or GELU saturates
/// anyway). NaN stays NaN. Plain multiplies and adds, no fused multiply-add, so the scalar and
/// every vector width give the same bits.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³ rounds to an integer when added; +127 puts the exponent bias in the low bits.
    const ROUND: f32 = 12_582_912.0 + 127.0;
    // `clamp` keeps NaN.
    let x = x.clamp(-87.3, 88.0);
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e_r = r * r * p + r + 1.0;
    // The low bits of `shifted` hold n + 127 ∈ [1, 254]: shifted into the exponent field, 2ⁿ.
    e_r * f32::from_bits(shifted.to_bits() << 23)
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_f32_is_within_two_ulp_of_the_exact_value_over_its_range() {
        let mut worst = (0, 0.0f32);
        let mut x = -87.0f32;
        while x < 87.9 {
            let exact = (f64::from(x)).exp() as f32;
            let e = ulps(exp_f32(x), exact);
            if e > worst.0 {
                worst = (e, x);
            }
            // Steps that are not a multiple of ln 2, so every reduced r gets visited.
            x += 0.000_731;
        }
        assert!(worst.0 <= 2, "exp_f32 is {} ulp off at x = {}", worst.0, worst.1);
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(1.0), std::f32::consts::E);
    }

    #[test]
    fn exp_f32_saturates_far_out_and_keeps_nan() {
        assert!(exp_f32(-1000.0) < 1e-37 && exp_f32(-1000.0) >= 0.0);
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_f32(1000.0) > 1e38 && exp_f32(1000.0).is_finite());
        assert!(exp_f32(f32::NAN).is_nan());
    }
}

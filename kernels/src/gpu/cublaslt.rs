//! cuBLASLt for [`CudaDevice`](super::cuda::CudaDevice)'s matrix products ([`Device::gemm`](super::Device::gemm)):
//! one plan per product shape — layouts, descriptor and algorithm, made at the shape's first
//! product and kept, so a later product sets its own pointers and is queued — with the
//! feed-forward GELU and the linear layers' bias gradients as epilogues, strided batches
//! (one at a time where cuBLASLt has no batched kernel) and pointer-array batches, the timing
//! of the heuristic's first answers (`CHINGU_GEMM_TUNE`; choices kept on disk by
//! [`TuneStore`]). Every product is queued on the null stream, where every other launch goes,
//! with the one workspace.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::{result as lt, sys as lt_sys};
use cudarc::driver::{result, sys};

use super::cuda::driver;
use super::tune_store::{fingerprint, TuneStore};
use super::{address_alignment, DevicePtr, Gemm, GemmBatch, GemmEpilogue, GpuError};

/// `CHINGU_GEMM_UNBATCHED=1`: every strided batch takes the path for batches cuBLASLt has no
/// kernel for (its products one at a time), so `scripts/gpu-check` can test that path.
fn unbatched() -> bool {
    static UNBATCHED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *UNBATCHED.get_or_init(|| crate::settings::switch("CHINGU_GEMM_UNBATCHED") == Some(true))
}

/// How cuBLASLt's algorithm for each product shape is chosen ([`Tuning`]): unset or `1`, the
/// fastest of the heuristic's first [`TUNE_CANDIDATES`] answers ([`TUNE_CANDIDATES_VAR`]),
/// timed at the shape's first use (PyTorch's TunableOp does the same for its products) and
/// kept on disk for later runs (`super::tune_store`); `again`, timed anew and kept; `0`, the
/// heuristic's first answer.
pub const TUNE_VAR: &str = "CHINGU_GEMM_TUNE";

/// [`TUNE_VAR`]'s choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuning {
    /// `0`: the heuristic's first answer, never timed.
    Off,
    /// Unset or `1` (the default): a choice kept from an earlier run where there is one, else
    /// timed and kept. GPU runs 22–23 (H200, seed-768 at 18 × 1024): 41.5–42.4 ms a step
    /// against 43.5–44.1 with the first answers.
    Kept,
    /// `again`: timed again whatever was kept, and kept.
    Again,
}

impl Tuning {
    /// The setting's value, given trimmed and not empty (`crate::settings::read`; unset is
    /// [`Tuning::Kept`]): `None` for a value it does not name.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "1" => Some(Tuning::Kept),
            "0" => Some(Tuning::Off),
            v if v.eq_ignore_ascii_case("again") => Some(Tuning::Again),
            _ => None,
        }
    }
}

/// [`TUNE_VAR`]'s value (a value it does not name is the default, said once).
pub fn tuning_mode() -> Tuning {
    static TUNING: std::sync::OnceLock<Tuning> = std::sync::OnceLock::new();
    *TUNING.get_or_init(|| {
        crate::settings::read(TUNE_VAR, "1, 0 or again", Tuning::parse).unwrap_or(Tuning::Kept)
    })
}

/// Whether product shapes are timed (or a kept choice taken) at their first use.
pub(super) fn tuning() -> bool {
    tuning_mode() != Tuning::Off
}

/// `CHINGU_GEMM_TUNE_ARRAYS=1`: pointer-array batches are tuned too (timed at their shape's
/// first batch, whose arrays name real operands, its outputs sent to scratch; kept on disk as
/// other shapes' choices). Off by default until a GPU has timed it: GPU run 24 measured the
/// batches with the heuristic's first answer at 71 µs where one strided batch of the same
/// heads, head-major, took 63 (seed-768's Q·Kᵀ), and whether another answer closes that gap
/// is not known.
pub const TUNE_ARRAYS_VAR: &str = "CHINGU_GEMM_TUNE_ARRAYS";

/// Whether [`TUNE_ARRAYS_VAR`] is on (read once).
fn tuning_arrays() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::settings::switch(TUNE_ARRAYS_VAR) == Some(true))
}

/// Heuristic answers timed per shape when tuning, unless [`TUNE_CANDIDATES_VAR`] says.
const TUNE_CANDIDATES: usize = 8;

/// `CHINGU_GEMM_TUNE_CANDIDATES=N` (1 to [`MAX_TUNE_CANDIDATES`]): time the heuristic's first N
/// answers instead of [`TUNE_CANDIDATES`]. GPU run 24's tuning took another answer than the
/// first for 17 of seed-768's 30 shapes and 4.5% off their time; whether answers past the
/// eighth hold faster ones is for `scripts/gpu-check`'s `tune-32` row to say. A choice kept on
/// disk is taken while it is among the answers asked for, so a larger N times the shapes
/// already kept only with `CHINGU_GEMM_TUNE=again`; a kept choice past a later run's N is
/// timed again there.
pub const TUNE_CANDIDATES_VAR: &str = "CHINGU_GEMM_TUNE_CANDIDATES";

/// The most answers [`TUNE_CANDIDATES_VAR`] may ask for.
pub const MAX_TUNE_CANDIDATES: usize = 64;

/// [`TUNE_CANDIDATES_VAR`]'s value, or [`TUNE_CANDIDATES`] (read once; a value out of range is
/// warned about and ignored).
fn tune_candidates() -> usize {
    static COUNT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COUNT.get_or_init(|| {
        let expected = format!("a count from 1 to {MAX_TUNE_CANDIDATES}");
        crate::settings::read(TUNE_CANDIDATES_VAR, &expected, parse_candidates)
            .unwrap_or(TUNE_CANDIDATES)
    })
}

/// A count of answers to time: 1 to [`MAX_TUNE_CANDIDATES`].
fn parse_candidates(text: &str) -> Option<usize> {
    text.parse().ok().filter(|n| (1..=MAX_TUNE_CANDIDATES).contains(n))
}

/// Timed runs of each candidate, after one untimed: enough that a small product's time is
/// more than the events' own resolution (~0.5 µs) and launch jitter.
const TUNE_REPS: usize = 10;
/// How much faster than the heuristic's first answer another must be to be taken (timing
/// noise should not change the choice).
const TUNE_MARGIN: f32 = 0.97;

/// Whether cuBLASLt refused a product as unsupported (nothing queued), not failed running it.
fn refused(e: lt::CublasError) -> bool {
    use lt_sys::cublasStatus_t as S;
    matches!(e.0, S::CUBLAS_STATUS_NOT_SUPPORTED | S::CUBLAS_STATUS_INVALID_VALUE)
}

/// The candidate with the least time (the first of equals), the heuristic's first answer
/// (index 0) unless another beats it by [`TUNE_MARGIN`]; failed ones (`None`) never win.
fn fastest(times: &[Option<f32>]) -> Option<usize> {
    let timed = times.iter().enumerate().filter_map(|(i, t)| t.map(|t| (i, t)));
    let (best, time) = timed.min_by(|a, b| a.1.total_cmp(&b.1))?;
    match times.first() {
        Some(Some(first)) if time > first * TUNE_MARGIN => Some(0),
        _ => Some(best),
    }
}

/// Workspace cuBLASLt may use per product (allocated once per device).
const LT_WORKSPACE_BYTES: usize = 32 << 20;
/// `cublasOperation_t` (cuBLAS's enum, not in cudarc's cublaslt bindings): N = 0, T = 1.
const CUBLAS_OP_N: i32 = 0;
const CUBLAS_OP_T: i32 = 1;

/// A shape's descriptors and algorithm, made at its first product (see [`Blas::matmul`]).
struct Plan {
    desc: MatmulDesc,
    /// cuBLASLt's A (our B), B (our A) and C = D.
    a: Layout,
    b: Layout,
    c: Layout,
    algo: lt_sys::cublasLtMatmulAlgo_t,
    /// A pointer-array batch's candidates still to be timed (with [`TUNE_ARRAYS_VAR`]): its
    /// plan is made before any batch names real matrices, so its first product times them.
    untimed: Option<Vec<lt_sys::cublasLtMatmulAlgo_t>>,
}

/// `g` for messages: `18 × 1024×1024×192 A Bᵀ → f32 (beta 0)`.
fn describe(g: &Gemm, bias: bool) -> String {
    format!("{g} (beta {}{})", g.beta, if bias { ", bias" } else { "" })
}

/// A pointer-array batch's C addresses moved into one scratch block (for tuning): the bytes
/// the block needs and each address's offset in it, each matrix `matrix_bytes` long. In
/// address order, an address within a matrix's length of the one before keeps its distance
/// from it (a tensor's interleaved heads); a farther one (another buffer: dV's and dK's
/// products share a batch) starts after the one before ends. Every offset keeps its address's
/// value mod 256, so each matrix is as aligned as it was where the block starts 256-byte
/// aligned, and matrices that did not overlap do not. At most `count · (matrix_bytes + 256)`
/// bytes, whatever lies between the buffers.
fn scratch_offsets(cs: &[u64], matrix_bytes: usize) -> (usize, Vec<u64>) {
    let mut order: Vec<usize> = (0..cs.len()).collect();
    order.sort_by_key(|&i| cs[i]);
    let mut offsets = vec![0u64; cs.len()];
    let mut previous: Option<(u64, u64)> = None; // (address, offset)
    let length = matrix_bytes as u64;
    for &i in &order {
        let c = cs[i];
        offsets[i] = match previous {
            None => c % 256,
            Some((address, offset)) if c - address <= length => offset + (c - address),
            // The first offset past the one before's end with c's value mod 256.
            Some((_, offset)) => {
                let end = offset + length;
                end + (c % 256 + 256 - end % 256) % 256
            }
        };
        previous = Some((c, offsets[i]));
    }
    let bytes = previous.map_or(0, |(_, offset)| offset + length);
    (bytes as usize, offsets)
}

/// Everything `g`'s plan depends on: its shape, types, epilogue, strides and alignments.
fn plan_key(g: &Gemm, bias: bool) -> PlanKey {
    // Every matrix of a batch must have the alignment the algorithm is chosen for: the first
    // one's address and the stride between them (in bytes) both count.
    let c_bytes = if g.c_f32 { 4 } else { 2 };
    let batched = |ptr: DevicePtr, stride: usize, bytes: usize| {
        let step = if g.batch.count > 1 { (stride * bytes) as DevicePtr } else { 0 };
        address_alignment(ptr | step)
    };
    PlanKey {
        m: g.m,
        n: g.n,
        k: g.k,
        trans_a: g.trans_a,
        trans_b: g.trans_b,
        c_f32: g.c_f32,
        bias,
        epilogue: match g.epilogue {
            GemmEpilogue::None => 0,
            GemmEpilogue::Gelu { .. } => 1,
            GemmEpilogue::GeluGrad { .. } => 2,
            GemmEpilogue::BiasGrad { .. } => 3,
        },
        // A pointer-array batch's matrices have the alignment it claims (its own addresses
        // are those of the arrays).
        align: match g.batch.pointer_arrays {
            Some(align) => [align; 3],
            None => [
                batched(g.b, g.batch.stride_b, 2),
                batched(g.a, g.batch.stride_a, 2),
                batched(g.c, g.batch.stride_c, c_bytes),
            ],
        },
        batch: g.batch,
        ld: g.row_strides(),
    }
}

/// Sets this product's pointers on its plan's descriptor: the bias, a GELU's pre-activation,
/// a fused bias gradient's output (the matrices' own go to `cublasLtMatmul`).
///
/// # Safety
/// A live descriptor made for `g`'s epilogue and bias.
unsafe fn point_at(
    desc: &MatmulDesc,
    g: &Gemm,
    bias: Option<DevicePtr>,
) -> Result<(), lt::CublasError> {
    use lt_sys::cublasLtMatmulDescAttributes_t as Attr;
    let pointer = |p: DevicePtr| p as usize as *const c_void;
    // SAFETY: device pointers, as the attributes take.
    unsafe {
        if let Some(bias) = bias {
            set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &pointer(bias))?;
        }
        match g.epilogue {
            GemmEpilogue::Gelu { pre } | GemmEpilogue::GeluGrad { pre } => {
                set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &pointer(pre))
            }
            GemmEpilogue::BiasGrad { grad } => {
                set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &pointer(grad))
            }
            GemmEpilogue::None => Ok(()),
        }
    }
}

/// One cached heuristic choice: every descriptor attribute the algorithm was chosen for. Its
/// `Debug` text names a kept tuning choice on disk (`tune_store`), so a field added or renamed
/// here makes every kept choice unknown: timed again once, nothing worse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    c_f32: bool,
    bias: bool,
    /// 0 none, 1 GELU, 2 GELU gradient, 3 bias gradient.
    epilogue: u8,
    /// Alignments (bytes, ≤ 256) of cuBLASLt's A (our B), B (our A) and C = D.
    align: [u32; 3],
    batch: GemmBatch,
    ld: [usize; 3],
}

/// cuBLASLt state of one device.
pub(super) struct Blas {
    context: sys::CUcontext,
    /// The device and library a kept tuning choice is for: `NVIDIA H200 sm_90; cuBLASLt 130000`.
    tuned_for: String,
    /// Tuning choices kept on disk.
    store: TuneStore,
    handle: lt_sys::cublasLtHandle_t,
    workspace: DevicePtr,
    /// Each shape seen, planned once: its descriptors and algorithm, so a product after the
    /// first costs only its pointers and the call (no descriptor made, set and destroyed a
    /// call). `None` for a strided batch cuBLASLt has no kernel for, whose products then run
    /// one at a time, and for a fused bias gradient it has none for.
    plans: Mutex<HashMap<PlanKey, Option<Plan>>>,
    /// fp32 copy of the current fp32 product's bias: (address, capacity in elements).
    pub(super) bias_f32: Mutex<(DevicePtr, usize)>,
}

impl Blas {
    /// cuBLASLt for `device` (its name and architecture, as tuning choices are kept for).
    pub(super) fn new(context: sys::CUcontext, device: &str) -> Result<Self, GpuError> {
        let handle = lt::create_handle().map_err(|e| GpuError::Driver {
            call: "cublasLtCreate".into(),
            message: format!("{e:?}"),
        })?;
        // SAFETY: plain allocation in the current context.
        let workspace = match unsafe { result::malloc_sync(LT_WORKSPACE_BYTES) } {
            Ok(ptr) => ptr,
            Err(e) => {
                // SAFETY: created above, used by nothing.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(driver("cuMemAlloc (cuBLASLt workspace)")(e));
            }
        };
        // SAFETY: a plain query of the loaded library.
        let version = unsafe { lt_sys::cublasLtGetVersion() };
        Ok(Self {
            context,
            tuned_for: format!("{device}; cuBLASLt {version}"),
            store: TuneStore::at(super::nvrtc::cache_dir().map(|d| d.join("cublaslt-tune"))),
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
            bias_f32: Mutex::new((0, 0)),
        })
    }

    /// Queues `g` on the null stream (context current; `bias` already of D's type).
    ///
    /// Row-major `C[m×n]` is, read column-major, `Cᵀ[n×m]` with leading dimension n, and
    /// `Cᵀ = op(B)ᵀ·op(A)ᵀ`. A row-major matrix stored `[r×c]` is, read column-major, its
    /// transpose `[c×r]` with leading dimension c. So cuBLASLt's first operand is our B as
    /// stored, read `[cols×rows]`: that is op(B)ᵀ itself when B is not transposed (op N), and
    /// op(B) when it is (op T); its second operand is our A likewise; its (m, n, k) are our
    /// (n, m, k). cuBLASLt's bias epilogue adds bias[i] to row i of the column-major D
    /// (n rows here), i.e. to column i of our row-major C: the `[n]` bias of the contract.
    ///
    /// The shape's plan ([`Plan`]) is made at its first product and kept; each product sets
    /// its own pointers on the plan's descriptor and is queued under the plans' lock, so no
    /// other caller changes them in between (cuBLASLt reads the descriptor while queueing).
    ///
    /// # Safety
    /// As [`Device::gemm`](super::Device::gemm).
    pub(super) unsafe fn matmul(&self, g: &Gemm, bias: Option<DevicePtr>) -> Result<(), GpuError> {
        g.check_strides()?;
        let what = || describe(g, bias.is_some());
        if g.batch.count > 1 && (bias.is_some() || !g.is_plain()) {
            return Err(GpuError::Shape {
                op: "gemm",
                message: format!("{}: a batch of products takes no bias and no epilogue", what()),
            });
        }
        let key = plan_key(g, bias.is_some());
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if let std::collections::hash_map::Entry::Vacant(vacant) = plans.entry(key) {
            // SAFETY: the caller's contract (tuning writes scratch only).
            vacant.insert(unsafe { self.plan(g, bias, &key) }?);
        }
        let Some(plan) = plans.get_mut(&key).and_then(Option::as_mut) else {
            drop(plans);
            // Those the caller has a fallback for: a pointer-array batch, a fused bias gradient.
            if g.batch.pointer_arrays.is_some()
                || matches!(g.epilogue, GemmEpilogue::BiasGrad { .. })
            {
                return Err(GpuError::Unsupported(format!(
                    "cuBLASLt has no kernel for {}",
                    what()
                )));
            }
            // SAFETY: as this call's; each product is one block of the batch.
            return unsafe { self.one_at_a_time(g) };
        };
        let fail = |step: &str, e: lt::CublasError| GpuError::Driver {
            call: format!("cublasLtMatmul {}: {step}", what()),
            message: format!("{e:?}"),
        };
        // SAFETY: the plan's live descriptor; device pointers, as the attributes take.
        unsafe { point_at(&plan.desc, g, bias) }.map_err(|e| fail("this product's pointers", e))?;
        if let Some(candidates) = plan.untimed.take() {
            // SAFETY: as this call's: `g` names real matrices; the candidates write scratch.
            plan.algo = unsafe {
                let layouts = [&plan.a, &plan.b, &plan.c];
                self.time_and_keep(g, &plan.desc, layouts, &key, &what(), &candidates)
            }?;
        }
        let layouts = [&plan.a, &plan.b, &plan.c];
        // SAFETY: the caller's contract; the plan's descriptors are made for this shape.
        match unsafe { self.queue(g, &plan.desc, layouts, &plan.algo, g.c) } {
            Ok(()) => Ok(()),
            // A fused bias gradient the heuristic offered but the product refuses (nothing
            // queued): remembered, and the caller takes the unfused ops, as for no kernel.
            Err(e) if matches!(g.epilogue, GemmEpilogue::BiasGrad { .. }) && refused(e) => {
                // Not supported at all: the shape goes unfused from now on. (An invalid value
                // may be this product's own pointer: only it goes unfused.)
                if e.0 == lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED {
                    plans.insert(key, None);
                }
                tracing::info!(
                    "cuBLASLt refused {} ({e:?}): bias gradients take their own kernels",
                    what()
                );
                Err(GpuError::Unsupported(format!("cuBLASLt refused {} ({e:?})", what())))
            }
            // A pointer-array batch the heuristic offered but the product refuses (nothing
            // queued): the shape has no kernel from now on, and its products go as they came.
            Err(e) if g.batch.pointer_arrays.is_some() && refused(e) => {
                plans.insert(key, None);
                tracing::info!("cuBLASLt refused {} ({e:?}): products one launch each", what());
                Err(GpuError::Unsupported(format!("cuBLASLt refused {} ({e:?})", what())))
            }
            Err(e) => Err(fail("cublasLtMatmul", e)),
        }
    }

    /// Whether the pointer-array batch `g` ([`GemmBatch::pointer_arrays`](super::GemmBatch::pointer_arrays);
    /// its addresses unused) has a kernel: its plan made now if not yet (context current).
    pub(super) fn has_pointer_array_plan(&self, g: &Gemm) -> Result<bool, GpuError> {
        if g.batch.pointer_arrays.is_none() || !g.is_plain() {
            return Ok(false);
        }
        g.check_strides()?;
        let key = plan_key(g, false);
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if let std::collections::hash_map::Entry::Vacant(vacant) = plans.entry(key) {
            // SAFETY: no bias, no epilogue and no tuning for such a batch, so planning reads
            // and writes no device memory.
            vacant.insert(unsafe { self.plan(g, None, &key) }?);
        }
        Ok(plans.get(&key).is_some_and(Option::is_some))
    }

    /// The plan of `g`'s shape: its layouts and descriptor, and the heuristic's first
    /// algorithm (or, tuning, the fastest of its first [`TUNE_CANDIDATES`]); `None` where
    /// cuBLASLt has none for a batch (its products then go one at a time) or for a fused bias
    /// gradient (the caller then takes the unfused ops); an error for any other failure.
    ///
    /// # Safety
    /// As [`Device::gemm`](super::Device::gemm) (tuning runs `g`'s product on its inputs).
    unsafe fn plan(
        &self,
        g: &Gemm,
        bias: Option<DevicePtr>,
        key: &PlanKey,
    ) -> Result<Option<Plan>, GpuError> {
        let Gemm { m, n, .. } = *g;
        let what = || describe(g, bias.is_some());
        let fail = |step: &str| {
            let call = format!("cublasLtMatmul {}: {step}", what());
            move |e: lt::CublasError| GpuError::Driver { call, message: format!("{e:?}") }
        };
        let f16 = lt_sys::cudaDataType::CUDA_R_16F;
        let c_type = if g.c_f32 {
            lt_sys::cudaDataType::CUDA_R_32F
        } else {
            lt_sys::cudaDataType::CUDA_R_16F
        };
        // Stored (rows, cols) and row strides of our row-major A, B and C.
        let [(a_rows, a_cols), (b_rows, b_cols), _] = g.stored();
        let [lda, ldb, ldc] = g.row_strides();
        let layout = |ty, rows: usize, cols: usize, ld: usize, step| {
            lt::create_matrix_layout(ty, cols as u64, rows as u64, ld as i64)
                .map(Layout)
                .map_err(fail(step))
        };
        // cuBLASLt's A = our B (n×k after its op), its B = our A (k×m), C = D = Cᵀ (n×m).
        let lt_a = layout(f16, b_rows, b_cols, ldb, "layout of B")?;
        let lt_b = layout(f16, a_rows, a_cols, lda, "layout of A")?;
        let lt_c = layout(c_type, m, n, ldc, "layout of C")?;
        if let Some(align) = g.batch.pointer_arrays {
            // A library without pointer-array batches (before CUDA 12.9) refuses the layout
            // attribute; either way the batch has no kernel here and its products go as before.
            // SAFETY: live layouts.
            if let Err(e) = unsafe { pointer_array_layouts(&[&lt_a, &lt_b, &lt_c], g.batch.count) }
            {
                tracing::info!(
                    "cuBLASLt takes no pointer-array batch of {} ({e}): products one launch each",
                    what()
                );
                return Ok(None);
            }
            debug_assert!(key.align == [align; 3]);
        } else if g.batch.count > 1 {
            let count = i32::try_from(g.batch.count).map_err(|_| GpuError::Shape {
                op: "gemm",
                message: format!("{}: batch over i32", what()),
            })?;
            use lt_sys::cublasLtMatrixLayoutAttribute_t as L;
            for (layout, stride, step) in [
                (&lt_a, g.batch.stride_b, "batch of B"),
                (&lt_b, g.batch.stride_a, "batch of A"),
                (&lt_c, g.batch.stride_c, "batch of C"),
            ] {
                let stride = stride as i64;
                // SAFETY: live layouts; int32 count and int64 stride, as the attributes take.
                unsafe {
                    lt::set_matrix_layout_attribute(
                        layout.0,
                        L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        (&count as *const i32).cast(),
                        4,
                    )
                    .map_err(fail(step))?;
                    lt::set_matrix_layout_attribute(
                        layout.0,
                        L::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        (&stride as *const i64).cast(),
                        8,
                    )
                    .map_err(fail(step))?;
                }
            }
        }

        let desc = lt::create_matmul_desc(
            lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt_sys::cudaDataType::CUDA_R_32F,
        )
        .map(MatmulDesc)
        .map_err(fail("cublasLtMatmulDescCreate"))?;
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        use lt_sys::cublasLtMatmulDescAttributes_t as Attr;
        // SAFETY: each value has the attribute's type (int32 ops, uint32 epilogue, int64
        // leading dimension) and lives across the call.
        unsafe {
            set_desc(&desc, Attr::CUBLASLT_MATMUL_DESC_TRANSA, &op(g.trans_b))
                .map_err(fail("TRANSA"))?;
            set_desc(&desc, Attr::CUBLASLT_MATMUL_DESC_TRANSB, &op(g.trans_a))
                .map_err(fail("TRANSB"))?;
            use lt_sys::cublasLtEpilogue_t as E;
            let epilogue = match (g.epilogue, bias.is_some()) {
                (GemmEpilogue::None, false) => E::CUBLASLT_EPILOGUE_DEFAULT,
                (GemmEpilogue::None, true) => E::CUBLASLT_EPILOGUE_BIAS,
                (GemmEpilogue::Gelu { .. }, false) => E::CUBLASLT_EPILOGUE_GELU_AUX,
                (GemmEpilogue::Gelu { .. }, true) => E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
                (GemmEpilogue::GeluGrad { .. }, _) => E::CUBLASLT_EPILOGUE_DGELU,
                // Our A is cuBLASLt's B, and op(A)'s rows are D's columns: BGRADB sums B
                // over k into one value per column of D (`check_strides` refused a bias).
                // The gradient has D's type (fp32: C is fp32 for this epilogue), cuBLASLt's
                // default, left unset so an older library without the type attribute works.
                (GemmEpilogue::BiasGrad { .. }, _) => E::CUBLASLT_EPILOGUE_BGRADB,
            };
            set_desc(&desc, Attr::CUBLASLT_MATMUL_DESC_EPILOGUE, &(epilogue as u32))
                .map_err(fail("EPILOGUE"))?;
            if g.epilogue.has_aux_matrix() {
                // The pre-activation has D's type and shape: cuBLASLt's n (our m) columns of
                // our n rows each.
                set_desc(&desc, Attr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &(n as i64))
                    .map_err(fail("EPILOGUE_AUX_LD"))?;
            }
            // This product's pointers (the heuristic and tuning see a complete descriptor).
            point_at(&desc, g, bias).map_err(fail("pointers"))?;
        }

        // A pointer-array batch is tuned only with TUNE_ARRAYS_VAR, at its first product.
        let arrays = g.batch.pointer_arrays.is_some();
        let wanted = if tuning() && (!arrays || tuning_arrays()) { tune_candidates() } else { 1 };
        let found = if g.batch.count > 1 && !arrays && unbatched() {
            Err(lt::CublasError(lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED))
        } else {
            // SAFETY: live descriptors.
            unsafe { self.heuristic(&desc, &lt_a, &lt_b, &lt_c, key.align, wanted) }
        };
        let algo = match found {
            Ok(candidates) if candidates.len() > 1 => {
                let store_key = format!("{}; {key:?}", self.tuned_for);
                let prints: Vec<u64> = candidates.iter().map(|a| fingerprint(&a.data)).collect();
                let kept = match tuning_mode() {
                    Tuning::Again => None,
                    _ => self.store.load(&store_key, &prints),
                };
                if let Some(index) = kept {
                    // Said once a process (every run would otherwise open with a line a
                    // shape); each shape's choice at debug level.
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        tracing::info!(
                            "cuBLASLt: taking the algorithms kept from earlier runs \
                             ({TUNE_VAR}=again to time them anew)"
                        )
                    });
                    tracing::debug!(
                        "cuBLASLt tuning {}: answer {} of {} (kept from an earlier run)",
                        what(),
                        index + 1,
                        candidates.len()
                    );
                    return Ok(Some(Plan {
                        desc,
                        a: lt_a,
                        b: lt_b,
                        c: lt_c,
                        algo: candidates[index],
                        untimed: None,
                    }));
                }
                if arrays {
                    // No real matrices yet: the first answer until the first batch times them.
                    let algo = candidates[0];
                    let untimed = Some(candidates);
                    return Ok(Some(Plan { desc, a: lt_a, b: lt_b, c: lt_c, algo, untimed }));
                }
                let layouts = [&lt_a, &lt_b, &lt_c];
                // SAFETY: as this call's; the candidates write scratch only.
                unsafe { self.time_and_keep(g, &desc, layouts, key, &what(), &candidates) }?
            }
            Ok(candidates) => candidates[0],
            // No kernel for a pointer-array batch: its products go as they came.
            Err(e) if arrays => {
                tracing::info!(
                    "cuBLASLt has no kernel for {} ({e:?}): products one launch each",
                    what()
                );
                return Ok(None);
            }
            // A batch must suit one kernel for every matrix in it (the stride counts in the
            // alignment: odd sequence lengths make it 2 or 4 bytes); where none does, its
            // products go one at a time.
            Err(e) if g.batch.count > 1 => {
                tracing::warn!(
                    "cuBLASLt has no batched kernel for {} ({e:?}): its {} products run one at a time",
                    what(),
                    g.batch.count
                );
                return Ok(None);
            }
            // No kernel for the fused bias gradient: remembered, and the caller takes the
            // unfused ops.
            Err(e) if matches!(g.epilogue, GemmEpilogue::BiasGrad { .. }) => {
                tracing::info!(
                    "cuBLASLt has no kernel for {} ({e:?}): bias gradients take their own kernels",
                    what()
                );
                return Ok(None);
            }
            Err(e) => return Err(fail("cublasLtMatmulAlgoGetHeuristic")(e)),
        };
        Ok(Some(Plan { desc, a: lt_a, b: lt_b, c: lt_c, algo, untimed: None }))
    }

    /// Queues `g` with `algo` on the null stream, D (and C, in place) at `d`.
    ///
    /// # Safety
    /// Live descriptors made for `g`; `d` covers C's extent; the rest as [`Device::gemm`](super::Device::gemm).
    unsafe fn queue(
        &self,
        g: &Gemm,
        desc: &MatmulDesc,
        [lt_a, lt_b, lt_c]: [&Layout; 3],
        algo: &lt_sys::cublasLtMatmulAlgo_t,
        d: DevicePtr,
    ) -> Result<(), lt::CublasError> {
        let (alpha, beta) = (1.0f32, g.beta);
        // SAFETY: the caller's contract; C and D are the same buffer with the same layout (in
        // place); the workspace is as large as the heuristic was told, and used by one product
        // at a time (all on one stream).
        unsafe {
            lt::matmul(
                self.handle,
                desc.0,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                g.b as usize as *const c_void,
                lt_a.0,
                g.a as usize as *const c_void,
                lt_b.0,
                d as usize as *const c_void,
                lt_c.0,
                d as usize as *mut c_void,
                lt_c.0,
                algo,
                self.workspace as usize as *mut c_void,
                LT_WORKSPACE_BYTES,
                std::ptr::null_mut::<c_void>() as lt_sys::cudaStream_t,
            )
        }
    }

    /// The fastest of `candidates` for `g` ([`Blas::time_candidates`]), said in the log (as
    /// `what`) and kept on disk for `key` where it was timed (a failed timing takes the first answer this
    /// once, and times again next run).
    ///
    /// # Safety
    /// As [`Blas::time_candidates`].
    unsafe fn time_and_keep(
        &self,
        g: &Gemm,
        desc: &MatmulDesc,
        layouts: [&Layout; 3],
        key: &PlanKey,
        what: &str,
        candidates: &[lt_sys::cublasLtMatmulAlgo_t],
    ) -> Result<lt_sys::cublasLtMatmulAlgo_t, GpuError> {
        // SAFETY: the caller's contract; the candidates write scratch only.
        let (best, times) = unsafe { self.time_candidates(g, desc, layouts, candidates) }?;
        let us = |t: Option<f32>| t.map_or("failed".into(), |ms| format!("{:.1}", ms * 1e3));
        let all: Vec<String> = times.iter().map(|&t| us(t)).collect();
        tracing::info!(
            "cuBLASLt tuning {what}: answer {} of {} (µs a product: {})",
            best + 1,
            candidates.len(),
            all.join(", ")
        );
        if times[best].is_some() {
            let store_key = format!("{}; {key:?}", self.tuned_for);
            if let Err(e) = self.store.save(&store_key, best, fingerprint(&candidates[best].data)) {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED
                    .call_once(|| tracing::warn!("cuBLASLt tuning choices not kept on disk ({e})"));
            }
        }
        Ok(candidates[best])
    }

    /// Times each candidate algorithm for `g` (one untimed run, then [`TUNE_REPS`] between
    /// two events) with everything the product writes — D, a GELU's pre-activation, a bias
    /// gradient — sent to scratch memory, so `g`'s own buffers are untouched (C is read from
    /// the scratch too: its values do not change the time). Returns the fastest candidate and
    /// each one's milliseconds a product (`None` where it failed or could not be timed: then
    /// the first candidate). A pointer-array batch's C addresses are read back and moved into
    /// scratch as one block as wide as they span, each at its own offset (so each keeps its
    /// alignment), in a scratch array of its own. An error only where `desc` could not be given
    /// back its own epilogue pointer (the product must then not run).
    ///
    /// # Safety
    /// As [`Blas::matmul`], with `desc` and the layouts made for `g`.
    unsafe fn time_candidates(
        &self,
        g: &Gemm,
        desc: &MatmulDesc,
        layouts: [&Layout; 3],
        candidates: &[lt_sys::cublasLtMatmulAlgo_t],
    ) -> Result<(usize, Vec<Option<f32>>), GpuError> {
        use lt_sys::cublasLtMatmulDescAttributes_t as Attr;
        let c_bytes = if g.c_f32 { 4 } else { 2 };
        let extent = (g.batch.count.max(1) - 1) * g.batch.stride_c + g.spans()[2];
        // The epilogue's own output, redirected: (attribute, bytes, the real pointer).
        let side_output = match g.epilogue {
            GemmEpilogue::Gelu { pre } => {
                Some((Attr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, g.m * g.n * 2, pre))
            }
            GemmEpilogue::BiasGrad { grad } => {
                Some((Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.m * 4, grad))
            }
            GemmEpilogue::None | GemmEpilogue::GeluGrad { .. } => None,
        };
        let point_side_at = |to: DevicePtr| -> Result<(), GpuError> {
            let Some((attr, _, _)) = side_output else { return Ok(()) };
            let pointer = to as usize as *const c_void;
            // SAFETY: a device pointer, as the attribute takes.
            unsafe { set_desc(desc, attr, &pointer) }.map_err(|e| GpuError::Driver {
                call: "cuBLASLt tuning: the epilogue's pointer".into(),
                message: format!("{e:?}"),
            })
        };
        let mut times = vec![None; candidates.len()];
        let timed = (|| -> Result<(), GpuError> {
            // D's stand-in, and for a pointer-array batch the array naming its matrices.
            let (scratch, moved) = match g.batch.pointer_arrays {
                None => (Scratch::new(extent * c_bytes + 256)?, None),
                Some(_) => {
                    let mut cs = vec![0u64; g.batch.count];
                    // SAFETY: `g.c` holds `count` addresses (the caller's contract); a
                    // synchronous copy waits for the launches that wrote them.
                    unsafe { result::memcpy_dtoh_sync(&mut cs, g.c) }
                        .map_err(driver("cuMemcpyDtoH (tuning: a batch's C addresses)"))?;
                    let (span, offsets) = scratch_offsets(&cs, g.spans()[2] * c_bytes);
                    let scratch = Scratch::new(span + 256)?;
                    let table: Vec<u64> = offsets.iter().map(|&o| scratch.0 + o).collect();
                    let array = Scratch::new(table.len() * 8)?;
                    // SAFETY: `array` holds `count` addresses.
                    unsafe { result::memcpy_htod_sync(array.0, &table) }
                        .map_err(driver("cuMemcpyHtoD (tuning: scratch addresses)"))?;
                    (scratch, Some(array))
                }
            };
            let d = moved.as_ref().map_or(scratch.0, |array| array.0);
            let side = side_output.map(|(_, bytes, _)| Scratch::new(bytes.max(1))).transpose()?;
            if let Some(side) = &side {
                point_side_at(side.0)?;
            }
            let events = Events::new()?;
            for (algo, time) in candidates.iter().zip(times.iter_mut()) {
                // SAFETY: every output goes to scratch of the right extent; inputs are g's.
                let run = || unsafe { self.queue(g, desc, layouts, algo, d) };
                // A candidate that fails to run is skipped (its time stays None).
                if run().is_err() {
                    continue;
                }
                events.record_start()?;
                if (0..TUNE_REPS).all(|_| run().is_ok()) {
                    *time = Some(events.record_end_and_wait()? / TUNE_REPS as f32);
                }
            }
            Ok(())
        })();
        if let Err(e) = timed {
            tracing::warn!("cuBLASLt tuning could not time every candidate ({e})");
        }
        if let Some((_, _, real)) = side_output {
            point_side_at(real)?;
        }
        Ok((fastest(&times).unwrap_or(0), times))
    }

    /// The products of the batch `g`, one `matmul` each.
    ///
    /// # Safety
    /// As [`Device::gemm`](super::Device::gemm) for the whole batch.
    unsafe fn one_at_a_time(&self, g: &Gemm) -> Result<(), GpuError> {
        for i in 0..g.batch.count {
            // SAFETY: block i of each operand lies inside it (the caller's contract); a batch
            // takes no bias.
            unsafe { self.matmul(&g.nth(i), None) }?;
        }
        Ok(())
    }

    /// cuBLASLt's best `wanted` algorithms for these descriptors within our workspace and
    /// alignments, best first (at least one, else the error).
    ///
    /// # Safety
    /// Live descriptors.
    unsafe fn heuristic(
        &self,
        desc: &MatmulDesc,
        a: &Layout,
        b: &Layout,
        c: &Layout,
        align: [u32; 3],
        wanted: usize,
    ) -> Result<Vec<lt_sys::cublasLtMatmulAlgo_t>, lt::CublasError> {
        use lt_sys::cublasLtMatmulPreferenceAttributes_t as Pref;
        let pref = Preference(lt::create_matmul_pref()?);
        let set = |attr, value: *const c_void, size| {
            // SAFETY: `value` points at `size` bytes of the attribute's type.
            unsafe { lt::set_matmul_pref_attribute(pref.0, attr, value, size) }
        };
        let workspace = LT_WORKSPACE_BYTES as u64;
        set(Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, (&workspace as *const u64).cast(), 8)?;
        let [a_align, b_align, c_align] = align;
        for (attr, value) in [
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &a_align),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &b_align),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &c_align),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &c_align),
        ] {
            set(attr, (value as *const u32).cast(), 4)?;
        }
        // SAFETY: a zeroed result is a valid value of this plain C struct (filled below).
        let mut results: Vec<lt_sys::cublasLtMatmulHeuristicResult_t> =
            vec![unsafe { std::mem::zeroed() }; wanted.max(1)];
        let mut returned: std::ffi::c_int = 0;
        // SAFETY: live descriptors (C and D share one layout); `results` holds `wanted`.
        unsafe {
            lt_sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                desc.0,
                a.0,
                b.0,
                c.0,
                c.0,
                pref.0,
                results.len() as std::ffi::c_int,
                results.as_mut_ptr(),
                &mut returned,
            )
        }
        .result()?;
        let ok = lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS;
        let found: Vec<_> = results
            .iter()
            .take(returned.max(0) as usize)
            .filter(|r| r.state == ok)
            .map(|r| r.algo)
            .collect();
        if found.is_empty() {
            return Err(lt::CublasError(lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED));
        }
        Ok(found)
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the primary context outlives the device; everything below is ours. Failures
        // (after a sticky error) leave nothing to do.
        unsafe {
            if result::ctx::set_current(self.context).is_ok() {
                let _ = result::ctx::synchronize();
                let _ = lt::destroy_handle(self.handle);
                let _ = result::free_sync(self.workspace);
                let (scratch, capacity) =
                    *self.bias_f32.get_mut().unwrap_or_else(|e| e.into_inner());
                if capacity > 0 {
                    let _ = result::free_sync(scratch);
                }
            }
        }
    }
}

/// # Safety
/// `value` must have the attribute's type.
unsafe fn set_desc<T>(
    desc: &MatmulDesc,
    attr: lt_sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<(), lt::CublasError> {
    // SAFETY: the caller guarantees the type; the size is the value's.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc.0,
            attr,
            (value as *const T).cast(),
            std::mem::size_of::<T>(),
        )
    }
}

/// Device memory for tuning's outputs, freed on drop once the device is idle (whichever way
/// the timing loop ended, nothing queued may still use it).
struct Scratch(DevicePtr);

impl Scratch {
    fn new(bytes: usize) -> Result<Self, GpuError> {
        // SAFETY: plain allocation in the current context.
        match unsafe { result::malloc_sync(bytes) } {
            Ok(ptr) => Ok(Self(ptr)),
            Err(_) => Err(GpuError::OutOfMemory { bytes, in_use: None }),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = result::ctx::synchronize();
        // SAFETY: allocated by `new`; the device has finished every use of it.
        let _ = unsafe { result::free_sync(self.0) };
    }
}

/// Two timing events on the null stream, destroyed on drop.
struct Events(sys::CUevent, sys::CUevent);

impl Events {
    fn new() -> Result<Self, GpuError> {
        let event = || {
            result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
                .map_err(driver("cuEventCreate"))
        };
        let start = event()?;
        match event() {
            Ok(end) => Ok(Self(start, end)),
            Err(e) => {
                // SAFETY: created above, used by nothing.
                let _ = unsafe { result::event::destroy(start) };
                Err(e)
            }
        }
    }

    fn record_start(&self) -> Result<(), GpuError> {
        // SAFETY: a live event; the null stream.
        unsafe { result::event::record(self.0, std::ptr::null_mut()) }
            .map_err(driver("cuEventRecord"))
    }

    /// Records the end, waits for it, and returns the milliseconds since the start.
    fn record_end_and_wait(&self) -> Result<f32, GpuError> {
        // SAFETY: live events, both recorded on the null stream.
        unsafe {
            result::event::record(self.1, std::ptr::null_mut()).map_err(driver("cuEventRecord"))?;
            result::event::synchronize(self.1).map_err(driver("cuEventSynchronize"))?;
            result::event::elapsed(self.0, self.1).map_err(driver("cuEventElapsedTime"))
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        // SAFETY: created by `new`; nothing waits on them once dropped.
        unsafe {
            let _ = result::event::destroy(self.0);
            let _ = result::event::destroy(self.1);
        }
    }
}

/// Descriptors destroyed on drop (destroying cannot fail for a live descriptor).
struct MatmulDesc(lt_sys::cublasLtMatmulDesc_t);
struct Layout(lt_sys::cublasLtMatrixLayout_t);
struct Preference(lt_sys::cublasLtMatmulPreference_t);

impl Drop for MatmulDesc {
    fn drop(&mut self) {
        // SAFETY: created by us, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: as above.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
impl Drop for Preference {
    fn drop(&mut self) {
        // SAFETY: as above.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// Sets `layouts` (cuBLASLt's A, B and C) to pointer-array batches of `count` matrices: their
/// addresses given at each product as device arrays of `count` addresses.
///
/// # Safety
/// Live layouts.
unsafe fn pointer_array_layouts(layouts: &[&Layout], count: usize) -> Result<(), String> {
    use lt_sys::cublasLtMatrixLayoutAttribute_t as L;
    let count = i32::try_from(count).map_err(|_| format!("{count} products: over i32"))?;
    let mode = lt_sys::cublasLtBatchMode_t::CUBLASLT_BATCH_MODE_POINTER_ARRAY as i32;
    for layout in layouts {
        // SAFETY: a live layout; int32 values, as both attributes take.
        unsafe {
            lt::set_matrix_layout_attribute(
                layout.0,
                L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                (&count as *const i32).cast(),
                4,
            )
            .map_err(|e| format!("batch count: {e:?}"))?;
            lt::set_matrix_layout_attribute(
                layout.0,
                L::CUBLASLT_MATRIX_LAYOUT_BATCH_MODE,
                (&mode as *const i32).cast(),
                4,
            )
            .map_err(|e| format!("batch mode: {e:?}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{
        address_alignment, fastest, parse_candidates, scratch_offsets, Tuning, MAX_TUNE_CANDIDATES,
        TUNE_CANDIDATES_VAR, TUNE_VAR,
    };

    /// Heads' blocks of two `[rows, H·Dh]` fp16 tensors (row stride 1,536 bytes; one head's
    /// matrix 1,023 rows and 384 bytes), named out of order, the tensors 3 GiB apart and the
    /// lowest address only 16-byte aligned: within a tensor the distances are kept, the second
    /// tensor starts just past the first's last matrix, the block is no longer than the
    /// matrices need, every offset keeps its address mod 256 (so its alignment), and no two
    /// matrices that did not overlap do.
    #[test]
    fn a_batch_moved_into_scratch_keeps_distances_within_a_buffer_and_drops_gaps() {
        let first = 0x7f00_0000_0010u64;
        let second = first + (3u64 << 30) + 0x30;
        let matrix = 1_023 * 1_536 + 384;
        let heads = |base: u64| (0..4).map(move |h| base + 384 * h);
        let cs: Vec<u64> = heads(second).chain(heads(first)).rev().collect();
        let (bytes, offsets) = scratch_offsets(&cs, matrix);
        let at = |c: u64| offsets[cs.iter().position(|&x| x == c).unwrap()];
        for h in 0..4 {
            assert_eq!(at(first + 384 * h), 0x10 + 384 * h, "head {h} of the first tensor");
        }
        let second_start = at(second);
        assert!(second_start >= at(first + 3 * 384) + matrix as u64);
        assert!(second_start < at(first + 3 * 384) + matrix as u64 + 256);
        for h in 0..4 {
            assert_eq!(at(second + 384 * h), second_start + 384 * h, "head {h} of the second");
        }
        assert_eq!(bytes as u64, at(second + 3 * 384) + matrix as u64);
        assert!(bytes <= cs.len() * (matrix + 256));
        let m = matrix as u64;
        let disjoint = |a: u64, b: u64| a + m <= b || b + m <= a;
        for (i, (&c, &o)) in cs.iter().zip(&offsets).enumerate() {
            assert_eq!(o % 256, c % 256, "address {i} mod 256");
            assert_eq!(address_alignment(o), address_alignment(c), "address {i}'s alignment");
            for (&d, &p) in cs.iter().zip(&offsets) {
                if disjoint(c, d) {
                    assert!(disjoint(o, p), "{c:#x} and {d:#x} overlap once moved");
                }
            }
        }
        assert_eq!(scratch_offsets(&[first], 64), (0x10 + 64, vec![0x10]));
    }

    #[test]
    fn tuning_is_on_and_kept_unless_told_otherwise() {
        // Unset or blank is no value (then `Kept`, `tuning_mode`'s default).
        let value =
            |raw| crate::settings::parse_value(TUNE_VAR, raw, "1, 0 or again", Tuning::parse);
        assert_eq!(value(" "), Ok(None));
        assert_eq!(value(" 1 "), Ok(Some(Tuning::Kept)));
        assert_eq!(value("0"), Ok(Some(Tuning::Off)));
        assert_eq!(value("AGAIN"), Ok(Some(Tuning::Again)));
        assert!(value("yes").is_err());
    }

    #[test]
    fn tuning_times_a_count_of_answers_within_range() {
        let value = |raw| {
            crate::settings::parse_value(TUNE_CANDIDATES_VAR, raw, "a count", parse_candidates)
        };
        assert_eq!(value(" 32 "), Ok(Some(32)));
        assert_eq!(value("1"), Ok(Some(1)));
        let most = MAX_TUNE_CANDIDATES.to_string();
        assert_eq!(value(&most), Ok(Some(MAX_TUNE_CANDIDATES)));
        for refused in ["0", "65", "-3", "many", "8.5"] {
            assert!(value(refused).is_err(), "{refused} taken");
        }
        assert_eq!(value(""), Ok(None));
    }

    #[test]
    fn tuning_keeps_the_fastest_candidate_that_ran() {
        assert_eq!(fastest(&[Some(3.0), Some(1.5), None, Some(2.0)]), Some(1));
        // A failed candidate never wins, even first.
        assert_eq!(fastest(&[None, Some(9.0), Some(4.0)]), Some(2));
        // Of equal times, the heuristic's earlier answer.
        assert_eq!(fastest(&[Some(2.0), Some(1.0), Some(1.0)]), Some(1));
        // The first answer stays unless another is at least 3% faster.
        assert_eq!(fastest(&[Some(1.0), Some(0.98)]), Some(0));
        assert_eq!(fastest(&[Some(1.0), Some(0.98), Some(0.96)]), Some(2));
        assert_eq!(fastest(&[None, None]), None);
        assert_eq!(fastest(&[]), None);
    }
}

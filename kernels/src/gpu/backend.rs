//! The [`Backend`] trait on a CUDA device (or its CPU emulation): the model, unchanged, runs
//! mixed precision — activations and their gradients in fp16, parameter gradients, statistics
//! and optimizer moments in fp32, parameters as fp32 masters with an fp16 copy that AdamW
//! refreshes — through the hand-written kernels ([`super::ops`]) and [`Device::gemm`]
//! (cuBLASLt on a GPU).
//!
//! Buffers carry their storage ([`GpuBuf`]); each op checks it gets the kinds it computes on.
//! The `Backend` trait is infallible (the CPU cannot fail), so a device error here unwinds
//! with a [`DeviceFailure`] naming the op, which the trainer catches and reports. The loss scale ([`GpuBackend::set_loss_scale`]) multiplies
//! the cross-entropy gradient, hence every gradient; the trainer unscales before the update.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use half::f16;

use super::{gemm, ops, DeviceBuffer, Gemm, GemmBatch, GemmEpilogue, Gpu, GpuError};
use crate::backend::{
    linear_backward_each, linear_backward_then_gelu, linear_then_gelu, AdamW, AttentionShape,
    Backend, BufRole, DropoutKey, LinearGrads,
};
use crate::device_failure::DeviceFailure;

/// A buffer on the GPU backend.
pub enum GpuBuf {
    /// fp16: activations and their gradients.
    Half(DeviceBuffer<f16>),
    /// fp32: parameter gradients, statistics, optimizer moments.
    Float(DeviceBuffer<f32>),
    /// A parameter: fp32 master weights and the fp16 copy the forward pass reads.
    Param {
        /// The master weights AdamW updates.
        master: DeviceBuffer<f32>,
        /// Their fp16 rounding.
        half: DeviceBuffer<f16>,
    },
}

impl GpuBuf {
    fn kind(&self) -> &'static str {
        match self {
            GpuBuf::Half(_) => "fp16",
            GpuBuf::Float(_) => "fp32",
            GpuBuf::Param { .. } => "parameter",
        }
    }
}

/// The model's backend on a CUDA device. Clones share the device, the loss scale and the
/// uploaded AdamW descriptor table.
#[derive(Clone)]
pub struct GpuBackend {
    dev: Gpu,
    loss_scale: Arc<AtomicU32>,
    /// The last two multi-tensor AdamW tables and their device copies, newest first: the same
    /// buffers are updated every step (or two sets in turn, when gradient accumulation swaps
    /// them), so a table is uploaded once, not once per step.
    adamw_tables: Arc<Mutex<Vec<UploadedTable>>>,
    /// GELU fused into the feed-forward products (cuBLASLt epilogues) where the shapes allow;
    /// else the GELU kernels. `CHINGU_GELU_EPILOGUE=0` turns it off (to compare).
    fuse_gelu: bool,
    /// Linear layers' bias gradients summed in their weight gradient's product (cuBLASLt's
    /// `BGRADB` epilogue) where cuBLASLt has a kernel for it; else the column-sum kernels.
    /// Off unless [`BIAS_GRAD_EPILOGUE_VAR`]`=1`: the epilogue's products were slower than
    /// the plain ones by more than the kernels they replace take (GPU run 20, H100: seed-768
    /// 56.0 ms a step against 54.9, seed-256 even; run 21, H200: 49.5 against 48.3–48.9, and
    /// seed-256 23.7 against 22.1).
    fuse_bias_grad: bool,
    /// With [`WEIGHT_GRAD_BATCH_VAR`]`=1`, the weight-gradient products of linear layers that
    /// read one input (attention's projections, [`Backend::linear_backward_shared_input`])
    /// queued as one group, so a pointer-array batch ([`gemm::run_group`]: three 768 × 768
    /// outputs are 108 tiles of 128 × 128 on an H200's 132 SMs, where one is 36), and their
    /// bias gradients in one launch ([`ops::bias_backward_many`]). Off by default until a GPU
    /// has timed it: such a batch takes cuBLASLt's first answer (unless
    /// `CHINGU_GEMM_TUNE_ARRAYS=1`), the products it replaces their tuned best of 8
    /// (kernel_bench's `proj_wgrad_*` and `bias_bwd_*` rows, gpu-check's
    /// `weight-grads-batched` row).
    batch_weight_grads: bool,
}

/// `1` queues the weight-gradient products of linear layers that read one input as one
/// pointer-array batch and their bias gradients as one launch (see the field
/// `batch_weight_grads` of [`GpuBackend`]); unset or `0`: one layer at a time.
pub const WEIGHT_GRAD_BATCH_VAR: &str = "CHINGU_GEMM_WEIGHT_GRAD_BATCH";

/// `1` sums linear layers' bias gradients in cuBLASLt's weight-gradient products (see
/// [`GpuBackend::with_fused_bias_grad`]); unset or anything else: kernels of their own.
pub const BIAS_GRAD_EPILOGUE_VAR: &str = "CHINGU_BIAS_GRAD_EPILOGUE";

/// A multi-tensor AdamW table and its copy on the device.
type UploadedTable = (ops::AdamwTable, DeviceBuffer<u64>);

/// A device error ends the op with a [`DeviceFailure`] (the trait is infallible; see
/// [`crate::device_failure`]); the trainer turns it into an error that says what to do.
#[track_caller]
fn check<T>(op: &str, r: Result<T, GpuError>) -> T {
    match r {
        Ok(value) => value,
        Err(e) => DeviceFailure {
            op: format!("GPU backend, {op}"),
            out_of_memory: matches!(e, GpuError::OutOfMemory { .. }),
            transient: matches!(e, GpuError::Driver { .. } | GpuError::Collective(_)),
            message: e.to_string(),
        }
        .raise(),
    }
}

/// The fp16 view an op reads: activations, or a parameter's fp16 copy.
fn half<'a>(op: &str, b: &'a GpuBuf) -> &'a DeviceBuffer<f16> {
    match b {
        GpuBuf::Half(h) | GpuBuf::Param { half: h, .. } => h,
        GpuBuf::Float(_) => panic!("GPU backend, {op}: expected an fp16 buffer, got fp32"),
    }
}

fn half_mut<'a>(op: &str, b: &'a mut GpuBuf) -> &'a mut DeviceBuffer<f16> {
    match b {
        GpuBuf::Half(h) => h,
        other => {
            panic!("GPU backend, {op}: expected an fp16 activation buffer, got {}", other.kind())
        }
    }
}

fn float<'a>(op: &str, b: &'a GpuBuf) -> &'a DeviceBuffer<f32> {
    match b {
        GpuBuf::Float(f) => f,
        other => panic!("GPU backend, {op}: expected an fp32 buffer, got {}", other.kind()),
    }
}

fn float_mut<'a>(op: &str, b: &'a mut GpuBuf) -> &'a mut DeviceBuffer<f32> {
    match b {
        GpuBuf::Float(f) => f,
        other => panic!("GPU backend, {op}: expected an fp32 buffer, got {}", other.kind()),
    }
}

impl GpuBackend {
    /// The backend on `dev`, loss scale 1.
    pub fn new(dev: Gpu) -> Self {
        crate::device_failure::install_hook();
        Self {
            dev,
            loss_scale: Arc::new(AtomicU32::new(1f32.to_bits())),
            adamw_tables: Arc::new(Mutex::new(Vec::new())),
            fuse_gelu: crate::settings::switch("CHINGU_GELU_EPILOGUE").unwrap_or(true),
            fuse_bias_grad: crate::settings::switch(BIAS_GRAD_EPILOGUE_VAR).unwrap_or(false),
            batch_weight_grads: crate::settings::switch(WEIGHT_GRAD_BATCH_VAR).unwrap_or(false),
        }
    }

    /// The same backend with the weight and bias gradients of linear layers that read one
    /// input queued as one batch and one launch, or one layer at a time (see
    /// [`WEIGHT_GRAD_BATCH_VAR`]).
    pub fn with_batched_weight_grads(mut self, batch: bool) -> Self {
        self.batch_weight_grads = batch;
        self
    }

    /// The same backend with linear layers' bias gradients in their weight gradient's
    /// product or in kernels of their own (see [`GpuBackend::new`]).
    pub fn with_fused_bias_grad(mut self, fuse: bool) -> Self {
        self.fuse_bias_grad = fuse;
        self
    }

    /// The same backend with the GELU epilogues on or off (see [`GpuBackend::new`]).
    pub fn with_fused_gelu(mut self, fuse: bool) -> Self {
        self.fuse_gelu = fuse;
        self
    }

    /// The device.
    pub fn device(&self) -> &Gpu {
        &self.dev
    }

    /// The current loss scale.
    pub fn loss_scale(&self) -> f32 {
        f32::from_bits(self.loss_scale.load(Ordering::Relaxed))
    }

    fn zeroed<T: super::Element>(&self, len: usize) -> DeviceBuffer<T> {
        let buf = check("zeros", DeviceBuffer::uninit(&self.dev, len));
        // SAFETY: the buffer holds `len` elements of `T`.
        check("zeros", unsafe { self.dev.memset_zero(buf.ptr(), len * size_of::<T>()) });
        buf
    }

    fn upload_half(&self, data: impl Iterator<Item = f32>) -> DeviceBuffer<f16> {
        let host: Vec<f16> = data.map(f16::from_f32).collect();
        check("upload", DeviceBuffer::from_host(&self.dev, &host))
    }

    /// The product `C (= or +=) op(A)·op(B) (+ bias)` over these buffers (see
    /// [`super::gemm::gemm`]), its extents checked against the shape.
    #[allow(clippy::too_many_arguments)]
    fn product(
        op: &str,
        c: (u64, usize, bool),
        a: &DeviceBuffer<f16>,
        trans_a: bool,
        b: &DeviceBuffer<f16>,
        trans_b: bool,
        (m, n, k): (usize, usize, usize),
        beta: f32,
        bias: Option<&DeviceBuffer<f16>>,
    ) -> Gemm {
        let (c_ptr, c_len, c_f32) = c;
        assert!(
            a.len() >= m * k && b.len() >= k * n && c_len >= m * n,
            "GPU backend, {op}: {m}×{k}·{k}×{n} does not fit buffers of {}, {} and {}",
            a.len(),
            b.len(),
            c_len
        );
        Gemm {
            m,
            n,
            k,
            a: a.ptr(),
            trans_a,
            b: b.ptr(),
            trans_b,
            c: c_ptr,
            c_f32,
            beta,
            bias: bias.map(|b| b.ptr()),
            epilogue: GemmEpilogue::None,
            batch: GemmBatch::ONE,
            ld: Gemm::DENSE,
        }
    }

    /// Runs [`GpuBackend::product`].
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        op: &str,
        c: (u64, usize, bool),
        a: &DeviceBuffer<f16>,
        trans_a: bool,
        b: &DeviceBuffer<f16>,
        trans_b: bool,
        shape: (usize, usize, usize),
        beta: f32,
        bias: Option<&DeviceBuffer<f16>>,
    ) {
        let g = Self::product(op, c, a, trans_a, b, trans_b, shape, beta, bias);
        // SAFETY: extents checked by `product`.
        check(op, unsafe { super::gemm::run(&self.dev, op, &g) });
    }
}

impl Backend for GpuBackend {
    type Buf = GpuBuf;

    fn name(&self) -> String {
        format!("{} (fp16 mixed precision)", self.dev.name())
    }

    fn zeros(&self, len: usize) -> GpuBuf {
        GpuBuf::Half(self.zeroed(len))
    }

    /// No memset: the op it is for writes every element (on the emulated device, fresh
    /// memory is NaN, so the whole-model tests catch an op that does not).
    fn for_overwrite(&self, len: usize) -> GpuBuf {
        GpuBuf::Half(check("for_overwrite", DeviceBuffer::uninit(&self.dev, len)))
    }

    fn uses_loss_scaling(&self) -> bool {
        true
    }

    fn device_memory(&self) -> Option<(usize, usize)> {
        self.dev.memory()
    }

    /// Multiplies the cross-entropy gradient (hence every gradient) by `scale`.
    fn set_loss_scale(&self, scale: f32) {
        self.loss_scale.store(scale.to_bits(), Ordering::Relaxed);
    }

    fn zeros_as(&self, len: usize, role: BufRole) -> GpuBuf {
        match role {
            BufRole::Activation => GpuBuf::Half(self.zeroed(len)),
            BufRole::Gradient | BufRole::OptimizerState | BufRole::Statistics => {
                GpuBuf::Float(self.zeroed(len))
            }
            BufRole::Parameter => {
                GpuBuf::Param { master: self.zeroed(len), half: self.zeroed(len) }
            }
        }
    }

    fn upload_f32_as(&self, data: &[f32], role: BufRole) -> GpuBuf {
        let float = || check("upload", DeviceBuffer::from_host(&self.dev, data));
        match role {
            BufRole::Activation => GpuBuf::Half(self.upload_half(data.iter().copied())),
            BufRole::Gradient | BufRole::OptimizerState | BufRole::Statistics => {
                GpuBuf::Float(float())
            }
            BufRole::Parameter => {
                GpuBuf::Param { half: self.upload_half(data.iter().copied()), master: float() }
            }
        }
    }

    fn upload_f64_as(&self, data: &[f64], role: BufRole) -> GpuBuf {
        let values: Vec<f32> = data.iter().map(|&x| x as f32).collect();
        self.upload_f32_as(&values, role)
    }

    fn upload_f32(&self, data: &[f32]) -> GpuBuf {
        GpuBuf::Half(self.upload_half(data.iter().copied()))
    }

    fn upload_f64(&self, data: &[f64]) -> GpuBuf {
        GpuBuf::Half(self.upload_half(data.iter().map(|&x| x as f32)))
    }

    fn to_f32(&self, buf: &GpuBuf) -> Vec<f32> {
        match buf {
            GpuBuf::Half(h) => check("download", h.to_host()).iter().map(|x| x.to_f32()).collect(),
            GpuBuf::Float(f) | GpuBuf::Param { master: f, .. } => check("download", f.to_host()),
        }
    }

    fn to_f64(&self, buf: &GpuBuf) -> Vec<f64> {
        self.to_f32(buf).into_iter().map(f64::from).collect()
    }

    fn len(&self, buf: &GpuBuf) -> usize {
        match buf {
            GpuBuf::Half(h) => h.len(),
            GpuBuf::Float(f) | GpuBuf::Param { master: f, .. } => f.len(),
        }
    }

    fn device_f32(&self, buf: &GpuBuf) -> Option<(u64, usize)> {
        match buf {
            GpuBuf::Float(f) => Some((f.ptr(), f.len())),
            _ => None,
        }
    }

    fn fill_zero(&self, buf: &mut GpuBuf) {
        let (ptr, bytes) = match buf {
            GpuBuf::Half(h) => (h.ptr(), h.len() * 2),
            GpuBuf::Float(f) => (f.ptr(), f.len() * 4),
            GpuBuf::Param { .. } => panic!("GPU backend, fill_zero: parameters are never zeroed"),
        };
        // SAFETY: `bytes` is the buffer's size.
        check("fill_zero", unsafe { self.dev.memset_zero(ptr, bytes) });
    }

    fn copy(&self, dst: &mut GpuBuf, src: &GpuBuf) {
        let (d, s) = (half_mut("copy", dst), half("copy", src));
        assert_eq!(d.len(), s.len(), "GPU backend, copy: lengths differ");
        // SAFETY: both hold `s.len()` fp16 values (checked above).
        check("copy", unsafe { self.dev.copy_on_device(d.ptr(), s.ptr(), s.len() * 2) });
    }

    fn copy_rows(
        &self,
        dst: &mut GpuBuf,
        dst_row: usize,
        src: &GpuBuf,
        src_row: usize,
        rows: usize,
        width: usize,
    ) {
        let (d, s) = (half_mut("copy_rows", dst), half("copy_rows", src));
        assert!(
            (dst_row + rows) * width <= d.len() && (src_row + rows) * width <= s.len(),
            "GPU backend, copy_rows: rows out of range"
        );
        let bytes = rows * width * 2;
        let (dp, sp) =
            (d.ptr() + (dst_row * width * 2) as u64, s.ptr() + (src_row * width * 2) as u64);
        // SAFETY: both row ranges were checked against the buffers above.
        check("copy_rows", unsafe { self.dev.copy_on_device(dp, sp, bytes) });
    }

    fn add_assign(&self, acc: &mut GpuBuf, x: &GpuBuf) {
        const OP: &str = "add_assign";
        match acc {
            // Gradients summed over micro-batches.
            GpuBuf::Float(a) => check(OP, ops::add_assign_f32(&self.dev, a, float(OP, x))),
            _ => check(OP, ops::add_assign(&self.dev, half_mut(OP, acc), half(OP, x))),
        }
    }

    fn scale(&self, buf: &mut GpuBuf, factor: f32) {
        match buf {
            GpuBuf::Half(h) => check("scale", ops::scale_f16(&self.dev, h, factor)),
            GpuBuf::Float(f) => check("scale", ops::scale_f32(&self.dev, f, factor)),
            GpuBuf::Param { .. } => {
                panic!("GPU backend, scale: parameters are changed by AdamW only")
            }
        }
    }

    fn sum_squares(&self, buf: &GpuBuf) -> f64 {
        match buf {
            GpuBuf::Float(f) | GpuBuf::Param { master: f, .. } => {
                check("sum_squares", ops::sum_squares(&self.dev, &[f]))
            }
            GpuBuf::Half(h) => {
                let mut wide = check("sum_squares", DeviceBuffer::uninit(&self.dev, h.len()));
                check("sum_squares", ops::cast_f16_to_f32(&self.dev, &mut wide, h));
                check("sum_squares", ops::sum_squares(&self.dev, &[&wide]))
            }
        }
    }

    fn sum_squares_all(&self, bufs: &[&GpuBuf]) -> f64 {
        let floats: Vec<&DeviceBuffer<f32>> =
            bufs.iter().map(|b| float("sum_squares_all", b)).collect();
        check("sum_squares_all", ops::sum_squares(&self.dev, &floats))
    }

    fn all_finite(&self, buf: &GpuBuf) -> bool {
        match buf {
            GpuBuf::Half(h) => check("all_finite", ops::all_finite_f16(&self.dev, h)),
            _ => self.sum_squares(buf).is_finite(),
        }
    }

    fn embedding_forward(
        &self,
        out: &mut GpuBuf,
        table: &GpuBuf,
        positions: &GpuBuf,
        ids: &[u32],
        pos: &[usize],
        width: usize,
        scale: f32,
    ) {
        const OP: &str = "embedding_forward";
        let (t, p) = (half(OP, table), half(OP, positions));
        check(
            OP,
            ops::embedding_forward(&self.dev, half_mut(OP, out), t, p, ids, pos, width, scale),
        );
    }

    fn embedding_backward(
        &self,
        d_table: &mut GpuBuf,
        d_out: &GpuBuf,
        ids: &[u32],
        width: usize,
        scale: f32,
    ) {
        const OP: &str = "embedding_backward";
        let d = half(OP, d_out);
        check(OP, ops::embedding_backward(&self.dev, float_mut(OP, d_table), d, ids, width, scale));
    }

    fn linear_forward(
        &self,
        y: &mut GpuBuf,
        x: &GpuBuf,
        w: &GpuBuf,
        b: Option<&GpuBuf>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) {
        const OP: &str = "linear_forward";
        let y = half_mut(OP, y);
        let bias = b.map(|b| half(OP, b));
        // y[rows×out] = x[rows×in] · wᵀ, w stored [out×in].
        let c = (y.ptr(), y.len(), false);
        self.gemm(OP, c, half(OP, x), false, half(OP, w), true, (rows, out_dim, in_dim), 0.0, bias);
    }

    fn linear_backward(
        &self,
        dx: Option<&mut GpuBuf>,
        accumulate_dx: bool,
        dw: &mut GpuBuf,
        mut db: Option<&mut GpuBuf>,
        dy: &GpuBuf,
        x: &GpuBuf,
        w: &GpuBuf,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) {
        const OP: &str = "linear_backward";
        let (dy_h, x_h, w_h) = (half(OP, dy), half(OP, x), half(OP, w));
        if let Some(dx) = dx {
            // dx[rows×in] (=|+=) dy[rows×out] · w[out×in].
            let dx = half_mut(OP, dx);
            let beta = if accumulate_dx { 1.0 } else { 0.0 };
            self.gemm(
                OP,
                (dx.ptr(), dx.len(), false),
                dy_h,
                false,
                w_h,
                false,
                (rows, in_dim, out_dim),
                beta,
                None,
            );
        }
        // dw[out×in] += dyᵀ · x, dy stored [rows×out].
        let dw = float_mut(OP, dw);
        if let (Some(db), true) = (db.as_deref_mut(), self.fuse_bias_grad) {
            // db += Σ_rows dy, summed by the product while it reads dy: into a fresh vector
            // (the epilogue overwrites), then added.
            let db = float_mut(OP, db);
            let mut fresh = check(OP, DeviceBuffer::<f32>::uninit(&self.dev, out_dim));
            let shape = (out_dim, in_dim, rows);
            match gemm::gemm_bias_grad(
                &self.dev, dw, &mut fresh, dy_h, true, x_h, false, shape, true,
            ) {
                Ok(()) => return check(OP, ops::add_assign_f32(&self.dev, db, &fresh)),
                // No such kernel here (nothing was queued): the plain product and the kernels.
                Err(GpuError::Unsupported(_)) => {}
                Err(e) => check(OP, Err(e)),
            }
        }
        self.gemm(
            OP,
            (dw.ptr(), dw.len(), true),
            dy_h,
            true,
            x_h,
            false,
            (out_dim, in_dim, rows),
            1.0,
            None,
        );
        if let Some(db) = db {
            check(OP, ops::bias_backward(&self.dev, float_mut(OP, db), dy_h, rows, out_dim));
        }
    }

    fn linear_backward_shared_input(
        &self,
        mut dx: Option<&mut GpuBuf>,
        accumulate_dx: bool,
        layers: &mut [LinearGrads<'_, GpuBuf>],
        x: &GpuBuf,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) {
        const OP: &str = "linear_backward";
        // The bias epilogue is a product of its own per layer.
        if !self.batch_weight_grads || self.fuse_bias_grad || layers.len() < 2 {
            return linear_backward_each(self, dx, accumulate_dx, layers, x, rows, in_dim, out_dim);
        }
        let x_h = half(OP, x);
        for (i, layer) in layers.iter().enumerate() {
            if let Some(dx) = dx.as_deref_mut() {
                // dx[rows×in] (=|+=) dy[rows×out] · w[out×in], layer after layer.
                let dx = half_mut(OP, dx);
                let beta = if accumulate_dx || i > 0 { 1.0 } else { 0.0 };
                let (dy, w) = (half(OP, layer.dy), half(OP, layer.w));
                let shape = (rows, in_dim, out_dim);
                self.gemm(OP, (dx.ptr(), dx.len(), false), dy, false, w, false, shape, beta, None);
            }
        }
        // dw[out×in] += dyᵀ · x for every layer: independent products of one shape.
        let products: Vec<Gemm> = layers
            .iter_mut()
            .map(|layer| {
                let (dy, dw) = (half(OP, layer.dy), float_mut(OP, layer.dw));
                let c = (dw.ptr(), dw.len(), true);
                Self::product(OP, c, dy, true, x_h, false, (out_dim, in_dim, rows), 1.0, None)
            })
            .collect();
        // SAFETY: extents checked by `product`; each product writes its own layer's gradient,
        // which no product reads.
        check(OP, unsafe { gemm::run_group(&self.dev, OP, &products) });
        // db += Σ_rows dy for every layer with a bias: one launch for them all.
        let (mut dbs, mut dys) = (Vec::new(), Vec::new());
        for layer in layers.iter_mut() {
            if let Some(db) = layer.db.as_deref_mut() {
                dbs.push(float_mut(OP, db));
                dys.push(half(OP, layer.dy));
            }
        }
        check(OP, ops::bias_backward_many(&self.dev, &mut dbs, &dys, rows, out_dim));
    }

    fn layernorm_forward(
        &self,
        y: &mut GpuBuf,
        mean: &mut GpuBuf,
        rstd: &mut GpuBuf,
        x: &GpuBuf,
        gamma: &GpuBuf,
        beta: &GpuBuf,
        rows: usize,
        width: usize,
    ) {
        const OP: &str = "layernorm_forward";
        let (x, g, b) = (half(OP, x), half(OP, gamma), half(OP, beta));
        let (mean, rstd) = (float_mut(OP, mean), float_mut(OP, rstd));
        check(
            OP,
            ops::layernorm_forward(&self.dev, half_mut(OP, y), mean, rstd, x, g, b, rows, width),
        );
    }

    fn layernorm_backward(
        &self,
        dx: &mut GpuBuf,
        dgamma: &mut GpuBuf,
        dbeta: &mut GpuBuf,
        dy: &GpuBuf,
        x: &GpuBuf,
        mean: &GpuBuf,
        rstd: &GpuBuf,
        gamma: &GpuBuf,
        rows: usize,
        width: usize,
    ) {
        const OP: &str = "layernorm_backward";
        let (dy, x, g) = (half(OP, dy), half(OP, x), half(OP, gamma));
        let (mean, rstd) = (float(OP, mean), float(OP, rstd));
        let (dg, db) = (float_mut(OP, dgamma), float_mut(OP, dbeta));
        check(
            OP,
            ops::layernorm_backward(
                &self.dev,
                half_mut(OP, dx),
                dg,
                db,
                dy,
                x,
                mean,
                rstd,
                g,
                rows,
                width,
            ),
        );
    }

    fn linear_gelu_forward(
        &self,
        act: &mut GpuBuf,
        pre: &mut GpuBuf,
        x: &GpuBuf,
        w: &GpuBuf,
        b: Option<&GpuBuf>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) {
        const OP: &str = "linear_gelu_forward";
        if !(self.fuse_gelu && gemm::gelu_fusable(out_dim)) {
            return linear_then_gelu(self, act, pre, x, w, b, rows, in_dim, out_dim);
        }
        let (act, pre) = (half_mut(OP, act), half_mut(OP, pre));
        let (x, w, bias) = (half(OP, x), half(OP, w), b.map(|b| half(OP, b)));
        // act, pre [rows×out] from x[rows×in] · wᵀ, w stored [out×in].
        let shape = (rows, out_dim, in_dim);
        check(OP, gemm::gemm_gelu(&self.dev, act, pre, x, false, w, true, shape, bias));
    }

    fn linear_backward_through_gelu(
        &self,
        d_pre: &mut GpuBuf,
        dw: &mut GpuBuf,
        db: Option<&mut GpuBuf>,
        dy: &GpuBuf,
        act: &GpuBuf,
        pre: &GpuBuf,
        w: &GpuBuf,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) {
        const OP: &str = "linear_backward_through_gelu";
        if !(self.fuse_gelu && gemm::gelu_fusable(in_dim)) {
            return linear_backward_then_gelu(
                self, d_pre, dw, db, dy, act, pre, w, rows, in_dim, out_dim,
            );
        }
        {
            let (d_pre, pre) = (half_mut(OP, d_pre), half(OP, pre));
            let (dy_h, w_h) = (half(OP, dy), half(OP, w));
            // d_pre[rows×in] = (dy[rows×out] · w[out×in]) · gelu'(pre).
            let shape = (rows, in_dim, out_dim);
            check(OP, gemm::gemm_gelu_grad(&self.dev, d_pre, pre, dy_h, false, w_h, false, shape));
        }
        // The weight and bias gradients as any linear's.
        self.linear_backward(None, false, dw, db, dy, act, w, rows, in_dim, out_dim);
    }

    fn gelu_forward(&self, y: &mut GpuBuf, x: &GpuBuf) {
        const OP: &str = "gelu_forward";
        check(OP, ops::gelu_forward(&self.dev, half_mut(OP, y), half(OP, x)));
    }

    fn gelu_backward(&self, dx: &mut GpuBuf, dy: &GpuBuf, x: &GpuBuf) {
        const OP: &str = "gelu_backward";
        check(OP, ops::gelu_backward(&self.dev, half_mut(OP, dx), half(OP, dy), half(OP, x)));
    }

    fn relu_forward(&self, y: &mut GpuBuf, x: &GpuBuf) {
        const OP: &str = "relu_forward";
        check(OP, ops::relu_forward(&self.dev, half_mut(OP, y), half(OP, x)));
    }

    fn relu_backward(&self, dx: &mut GpuBuf, dy: &GpuBuf, x: &GpuBuf) {
        const OP: &str = "relu_backward";
        check(OP, ops::relu_backward(&self.dev, half_mut(OP, dx), half(OP, dy), half(OP, x)));
    }

    fn dropout(&self, buf: &mut GpuBuf, p: f32, key: DropoutKey) {
        check("dropout", ops::dropout(&self.dev, half_mut("dropout", buf), p, key));
    }

    fn add_dropped(&self, x: &mut GpuBuf, residual: &GpuBuf, p: f32, key: DropoutKey) {
        const OP: &str = "add_dropped";
        check(OP, ops::add_dropped(&self.dev, half_mut(OP, x), half(OP, residual), p, key));
    }

    fn dropped_copy(&self, x: &GpuBuf, p: f32, key: DropoutKey) -> GpuBuf {
        const OP: &str = "dropped_copy";
        let x = half(OP, x);
        let mut out = self.for_overwrite(x.len());
        check(OP, ops::dropped_copy(&self.dev, half_mut(OP, &mut out), x, p, key));
        out
    }

    fn add_dropped_layernorm_forward(
        &self,
        x: &mut GpuBuf,
        residual: &GpuBuf,
        p: f32,
        key: DropoutKey,
        y: &mut GpuBuf,
        mean: &mut GpuBuf,
        rstd: &mut GpuBuf,
        gamma: &GpuBuf,
        beta: &GpuBuf,
        rows: usize,
        width: usize,
    ) {
        const OP: &str = "add_dropped_layernorm_forward";
        let (residual, g, b) = (half(OP, residual), half(OP, gamma), half(OP, beta));
        let (mean, rstd) = (float_mut(OP, mean), float_mut(OP, rstd));
        check(
            OP,
            ops::add_dropped_layernorm_forward(
                &self.dev,
                half_mut(OP, x),
                residual,
                p,
                key,
                half_mut(OP, y),
                mean,
                rstd,
                g,
                b,
                rows,
                width,
            ),
        );
    }

    fn layernorm_backward_dropped(
        &self,
        dx: &mut GpuBuf,
        dgamma: &mut GpuBuf,
        dbeta: &mut GpuBuf,
        dy: &GpuBuf,
        x: &GpuBuf,
        mean: &GpuBuf,
        rstd: &GpuBuf,
        gamma: &GpuBuf,
        rows: usize,
        width: usize,
        p: f32,
        key: DropoutKey,
    ) -> GpuBuf {
        const OP: &str = "layernorm_backward_dropped";
        let (dy, x, g) = (half(OP, dy), half(OP, x), half(OP, gamma));
        let (mean, rstd) = (float(OP, mean), float(OP, rstd));
        let (dg, db) = (float_mut(OP, dgamma), float_mut(OP, dbeta));
        let dx = half_mut(OP, dx);
        let mut out = self.for_overwrite(dx.len());
        check(
            OP,
            ops::layernorm_backward_dropped(
                &self.dev,
                dx,
                dg,
                db,
                dy,
                x,
                mean,
                rstd,
                g,
                rows,
                width,
                half_mut(OP, &mut out),
                p,
                key,
            ),
        );
        out
    }

    /// No memset (the GEMM attention path's statistics hold P: ~150 MB an attention call at
    /// seed-768's batch).
    fn attention_stats(&self, shape: AttentionShape) -> GpuBuf {
        let len = ops::attention_stats_len(&self.dev, shape);
        GpuBuf::Float(check("attention_stats", DeviceBuffer::uninit(&self.dev, len)))
    }

    fn attention_forward(
        &self,
        out: &mut GpuBuf,
        probs: &mut GpuBuf,
        q: &GpuBuf,
        k: &GpuBuf,
        v: &GpuBuf,
        key_len: &[usize],
        shape: AttentionShape,
    ) {
        const OP: &str = "attention_forward";
        let (q, k, v) = (half(OP, q), half(OP, k), half(OP, v));
        let lse = float_mut(OP, probs);
        check(
            OP,
            ops::attention_forward(&self.dev, half_mut(OP, out), lse, q, k, v, key_len, shape),
        );
    }

    fn attention_backward(
        &self,
        dq: &mut GpuBuf,
        dk: &mut GpuBuf,
        dv: &mut GpuBuf,
        d_out: &GpuBuf,
        q: &GpuBuf,
        k: &GpuBuf,
        v: &GpuBuf,
        out: &GpuBuf,
        probs: &GpuBuf,
        key_len: &[usize],
        shape: AttentionShape,
    ) {
        const OP: &str = "attention_backward";
        let (d_out, q, k, v, out) =
            (half(OP, d_out), half(OP, q), half(OP, k), half(OP, v), half(OP, out));
        let lse = float(OP, probs);
        let (dq, dk, dv) = (half_mut(OP, dq), half_mut(OP, dk), half_mut(OP, dv));
        check(
            OP,
            ops::attention_backward(
                &self.dev, dq, dk, dv, d_out, q, k, v, out, lse, key_len, shape,
            ),
        );
    }

    fn cross_entropy(
        &self,
        d_logits: &mut GpuBuf,
        logits: &GpuBuf,
        targets: &[u32],
        vocab: usize,
        ignore: u32,
        smoothing: f64,
    ) -> (f64, usize) {
        const OP: &str = "cross_entropy";
        let (d, l) = (half_mut(OP, d_logits), half(OP, logits));
        let scale = self.loss_scale();
        check(
            OP,
            ops::cross_entropy(&self.dev, d, l, targets, vocab, ignore, smoothing as f32, scale),
        )
    }

    fn adamw(
        &self,
        param: &mut GpuBuf,
        grad: &GpuBuf,
        m: &mut GpuBuf,
        v: &mut GpuBuf,
        settings: AdamW,
    ) {
        const OP: &str = "adamw";
        let GpuBuf::Param { master, half } = param else {
            panic!("GPU backend, adamw: expected a parameter, got {}", param.kind());
        };
        let (g, m, v) = (float(OP, grad), float_mut(OP, m), float_mut(OP, v));
        check(OP, ops::adamw(&self.dev, master, Some(half), g, m, v, settings));
    }

    fn adamw_all(
        &self,
        params: &mut [GpuBuf],
        grads: &[GpuBuf],
        m: &mut [GpuBuf],
        v: &mut [GpuBuf],
        settings: &[AdamW],
    ) {
        const OP: &str = "adamw_all";
        let Some(&shared) = settings.first() else { return };
        assert!(
            settings.iter().all(|s| AdamW { weight_decay: shared.weight_decay, ..*s } == shared),
            "GPU backend, {OP}: only the weight decay may differ between tensors"
        );
        let tensors: Vec<ops::AdamwTensor<'_>> = (0..params.len())
            .map(|i| {
                let GpuBuf::Param { master, half } = &params[i] else {
                    panic!("GPU backend, {OP}: expected a parameter, got {}", params[i].kind());
                };
                ops::AdamwTensor {
                    param: master,
                    half: Some(half),
                    grad: float(OP, &grads[i]),
                    m: float(OP, &m[i]),
                    v: float(OP, &v[i]),
                    weight_decay: settings[i].weight_decay,
                }
            })
            .collect();
        let table = check(OP, ops::AdamwTable::new(&tensors));
        let mut cached = self.adamw_tables.lock().unwrap_or_else(|e| e.into_inner());
        match cached.iter().position(|(t, _)| *t == table) {
            Some(i) => cached.swap(0, i),
            None => {
                let uploaded = check(OP, DeviceBuffer::from_host(&self.dev, &table.words));
                cached.insert(0, (table, uploaded));
                cached.truncate(2);
            }
        }
        let (table, uploaded) = &cached[0];
        // The table names the buffers borrowed mutably above; the kernel writes through it.
        check(OP, ops::adamw_multi(&self.dev, table, uploaded, shared));
    }
}

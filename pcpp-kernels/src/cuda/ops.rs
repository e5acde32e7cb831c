//! CUDA twins of the tensor ops. Shapes were checked by the caller ([`crate::Tensor`]'s methods);
//! every function here takes operands on one GPU and returns a tensor on that GPU. Numerics: inputs
//! in the storage dtype, f32 arithmetic and accumulation, one rounding on store (the CPU twin's
//! contract).

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::sys as blas_sys;
use cudarc::cublaslt::{result as lt_result, sys as lt_sys};
use cudarc::cudnn::sys as dnn_sys;
use cudarc::driver::{sys as drv_sys, CudaGraph, DeviceRepr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

use super::{CudaStorage, Gpu};
use crate::{Activation, Conv2dParams, DType, GroupStats, KernelError, Result, Tensor};

/// Launches kernel `$name` on `$gpu`'s stream with the given arguments (each bound to a local so
/// that it outlives the launch).
macro_rules! launch {
    ($gpu:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let gpu: &Gpu = &$gpu;
        let name: &str = &$name;
        let f = gpu.func(name)?;
        let mut b = gpu.stream.launch_builder(f);
        launch!(@push b, gpu, name, $cfg; $($arg),*)
    }};
    (@push $b:ident, $gpu:ident, $name:ident, $cfg:expr; $head:expr $(, $tail:expr)*) => {{
        let a = $head;
        $b.arg(&a);
        launch!(@push $b, $gpu, $name, $cfg; $($tail),*)
    }};
    (@push $b:ident, $gpu:ident, $name:ident, $cfg:expr;) => {{
        // SAFETY: argument lists match the kernel signatures in kernels.cu; every pointer is a
        // live device allocation of at least the extent the kernel touches (sizes derive from the
        // checked tensor shapes).
        unsafe { $b.launch($cfg) }.map_err(|e| $gpu.err($name, e))?;
    }};
}

pub(crate) mod attn;
pub(crate) mod vector;

pub(crate) use attn::{attention, FLASH_SHARED_Q_BYTES};
pub use attn::{flash128, set_flash128, Flash128};

fn tname(d: DType) -> &'static str {
    d.name()
}

fn word(d: DType) -> &'static str {
    if d.size() == 4 {
        "u32"
    } else {
        "u16"
    }
}

fn storage(t: &Tensor) -> Result<&CudaStorage> {
    t.cuda_storage().ok_or_else(|| KernelError::Device {
        device: t.device().to_string(),
        msg: "expected a CUDA tensor".into(),
    })
}

fn gpu_of(t: &Tensor) -> Result<Arc<Gpu>> {
    Ok(storage(t)?.gpu.clone())
}

fn ptr(t: &Tensor) -> Result<u64> {
    Ok(storage(t)?.ptr())
}

fn out(gpu: &Arc<Gpu>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    Ok(Tensor::from_cuda(shape, dtype, gpu.alloc(dtype, n)?))
}

/// Grid of `planes` rows of blocks, each row covering a plane of `s` elements.
fn cfg_planes(planes: usize, s: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (s.div_ceil(1024).clamp(1, 64) as u32, planes as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Largest grid y-extent.
const MAX_GRID_Y: usize = 65535;

fn cfg_rows(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Host tensor → device `ordinal`, keeping the dtype (copied straight from the host storage).
pub(crate) fn upload(t: &Tensor, ordinal: usize) -> Result<Tensor> {
    use crate::tensor::CpuStorage;
    let bytes: &[u8] = match t.cpu_storage()? {
        CpuStorage::F32(v) => bytemuck::cast_slice(v),
        CpuStorage::F16(v) => bytemuck::cast_slice(v),
        CpuStorage::BF16(v) => bytemuck::cast_slice(v),
    };
    upload_bytes(t.shape(), t.dtype(), bytes, ordinal)
}

/// Little-endian element bytes of `dtype` (e.g. a slice of a memory-mapped file) → a device
/// tensor on `ordinal`, with no host copy in between.
pub(crate) fn upload_bytes(
    shape: &[usize],
    dtype: DType,
    bytes: &[u8],
    ordinal: usize,
) -> Result<Tensor> {
    let gpu = super::gpu(ordinal)?;
    Ok(Tensor::from_cuda(
        shape,
        dtype,
        CudaStorage::from_bytes(&gpu, bytes)?,
    ))
}

/// Device tensor → host.
pub(crate) fn download(t: &Tensor) -> Result<Tensor> {
    let bytes = storage(t)?.to_bytes(t.size_in_bytes())?;
    Tensor::from_bytes(t.shape(), t.dtype(), &bytes)
}

/// Raw little-endian bytes of a device tensor.
pub(crate) fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    storage(t)?.to_bytes(t.size_in_bytes())
}

/// Same elements in another dtype.
pub(crate) fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let gpu = gpu_of(t)?;
    let y = out(&gpu, t.shape(), dtype)?;
    let n = t.numel();
    launch!(gpu, format!("cast_{}_{}", tname(t.dtype()), tname(dtype)), Gpu::cfg_elems(n);
        ptr(t)?, ptr(&y)?, n as i64);
    Ok(y)
}

/// Copies `src` into the storage of `dst` (same shape, dtype and device), e.g. to refresh the
/// static inputs of a captured CUDA graph.
pub fn copy_into(src: &Tensor, dst: &Tensor) -> Result<()> {
    if src.shape() != dst.shape() || src.dtype() != dst.dtype() || src.device() != dst.device() {
        return Err(KernelError::Shape {
            op: "copy_into",
            lhs: src.shape().to_vec(),
            rhs: dst.shape().to_vec(),
            detail: format!(
                " ({} on {} into {} on {})",
                src.dtype(),
                src.device(),
                dst.dtype(),
                dst.device()
            ),
        });
    }
    let gpu = gpu_of(src)?;
    let w = src.size_in_bytes() / 2;
    launch!(gpu, "copy2d_u16", Gpu::cfg_elems(w); ptr(src)?, ptr(dst)?, 1i64, w as i64, 0i64, 0i64);
    Ok(())
}

pub(crate) enum Unary {
    Affine(f32, f32),
    Clamp(f32, f32),
    Act(Activation),
}

pub(crate) fn unary(t: &Tensor, op: Unary) -> Result<Tensor> {
    let (code, a, b) = match op {
        Unary::Affine(m, c) => (0, m, c),
        Unary::Clamp(lo, hi) => (1, lo, hi),
        Unary::Act(Activation::Silu) => (2, 0.0, 0.0),
        Unary::Act(Activation::Gelu) => (3, 0.0, 0.0),
        Unary::Act(Activation::GeluTanh) => (4, 0.0, 0.0),
        Unary::Act(Activation::QuickGelu) => (5, 0.0, 0.0),
        Unary::Act(Activation::Relu) => (6, 0.0, 0.0),
    };
    let gpu = gpu_of(t)?;
    let y = out(&gpu, t.shape(), t.dtype())?;
    let n = t.numel();
    if vector::try_unary(&gpu, t.dtype(), (ptr(t)?, ptr(&y)?), n, (code, a, b))? {
        return Ok(y);
    }
    launch!(gpu, format!("unary_{}", tname(t.dtype())), Gpu::cfg_elems(n);
        ptr(t)?, ptr(&y)?, n as i64, code, a, b);
    Ok(y)
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Bcast {
    rank: i32,
    shape: [i64; 6],
    sa: [i64; 6],
    sb: [i64; 6],
}
// SAFETY: plain-old-data with the layout of `struct Bcast` in kernels.cu.
unsafe impl DeviceRepr for Bcast {}

#[repr(C)]
#[derive(Clone, Copy)]
struct Perm {
    rank: i32,
    shape: [i64; 6],
    stride: [i64; 6],
}
// SAFETY: plain-old-data with the layout of `struct Perm` in kernels.cu.
unsafe impl DeviceRepr for Perm {}

/// `a op b` (op code of kernels.cu: 0 add, 1 sub, 2 mul, 3 div) with `out_shape` and broadcast
/// strides (0 on broadcast axes) precomputed by the caller.
pub(crate) fn binary(
    a: &Tensor,
    b: &Tensor,
    op: i32,
    out_shape: &[usize],
    sa: &[usize],
    sb: &[usize],
) -> Result<Tensor> {
    let gpu = gpu_of(a)?;
    let b = if b.dtype() != a.dtype() {
        cast(b, a.dtype())?
    } else {
        b.clone()
    };
    let y = out(&gpu, out_shape, a.dtype())?;
    let n = y.numel();
    let t = tname(a.dtype());
    if a.shape() == b.shape() {
        if vector::try_binary_same(&gpu, a.dtype(), (ptr(a)?, ptr(&b)?, ptr(&y)?), n, op)? {
            return Ok(y);
        }
        launch!(gpu, format!("binary_same_{t}"), Gpu::cfg_elems(n);
            ptr(a)?, ptr(&b)?, ptr(&y)?, n as i64, op);
        return Ok(y);
    }
    let rank = out_shape.len();
    // `b` constant over trailing axes and full over the leading ones (a [b, c, 1, 1] operand):
    // one value per plane of `a`.
    if a.shape() == out_shape && sa.iter().zip(out_shape).all(|(s, d)| *s != 0 || *d == 1) {
        let k = (0..=rank)
            .rev()
            .find(|&k| k == 0 || sb[k - 1] != 0)
            .unwrap_or(0);
        let planes: usize = out_shape[..k].iter().product();
        let s: usize = out_shape[k..].iter().product();
        if b.numel() == planes && (1..=MAX_GRID_Y).contains(&planes) && s > 1 {
            launch!(gpu, format!("plane_binary_{t}"), cfg_planes(planes, s);
                ptr(a)?, ptr(&b)?, ptr(&y)?, s as i64, op, planes as i64);
            return Ok(y);
        }
    }
    // AdaLN-style row broadcasts ([P, R, C] against [P, 1, C]), either operand broadcast
    let rows = [(a, &b, sa, sb, false), (&b, a, sb, sa, true)]
        .into_iter()
        .find_map(|(f, g, sf, sg, left)| {
            vector::row_pattern(out_shape, sf, sg).map(|p| (f, g, p, left))
        });
    if let Some((f, g, p, left)) = rows {
        if vector::try_row_broadcast(&gpu, a.dtype(), (ptr(f)?, ptr(g)?, ptr(&y)?), p, op, left)? {
            return Ok(y);
        }
    }
    if rank > 6 {
        return Err(KernelError::invalid(
            "broadcast (cuda)",
            format!("rank {rank} > 6 is not supported"),
        ));
    }
    let mut bc = Bcast {
        rank: rank as i32,
        shape: [1; 6],
        sa: [0; 6],
        sb: [0; 6],
    };
    for i in 0..rank {
        bc.shape[i] = out_shape[i] as i64;
        bc.sa[i] = sa[i] as i64;
        bc.sb[i] = sb[i] as i64;
    }
    launch!(gpu, format!("binary_{t}"), Gpu::cfg_elems(n);
        ptr(a)?, ptr(&b)?, ptr(&y)?, n as i64, op, bc);
    Ok(y)
}

pub(crate) fn geglu(x: &Tensor, out_shape: &[usize]) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let h = *out_shape.last().unwrap_or(&0);
    let rows = x.numel() / (2 * h).max(1);
    let y = out(&gpu, out_shape, x.dtype())?;
    if vector::try_geglu(&gpu, x.dtype(), (ptr(x)?, ptr(&y)?), rows, h)? {
        return Ok(y);
    }
    launch!(gpu, format!("geglu_{}", tname(x.dtype())), Gpu::cfg_elems(rows * h);
        ptr(x)?, ptr(&y)?, rows as i64, h as i64);
    Ok(y)
}

fn dt_cuda(d: DType) -> blas_sys::cudaDataType {
    match d {
        DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
    }
}

fn dt_lt(d: DType) -> lt_sys::cudaDataType {
    match d {
        DType::F32 => lt_sys::cudaDataType::CUDA_R_32F,
        DType::F16 => lt_sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => lt_sys::cudaDataType::CUDA_R_16BF,
    }
}

/// Column-major strided-batched GEMM through cuBLAS with f32 compute:
/// `C = alpha·op(A)·op(B)`, `A`/`B` of dtype `ab`, `C` of dtype `c`.
#[allow(clippy::too_many_arguments)]
fn gemm_batched(
    gpu: &Gpu,
    (ta, tb): (bool, bool),
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    (a, lda, sa): (u64, usize, usize),
    (b, ldb, sb): (u64, usize, usize),
    (c, ldc, sc): (u64, usize, usize),
    batch: usize,
    ab: DType,
    cdt: DType,
) -> Result<()> {
    let op = |t: bool| {
        if t {
            blas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            blas_sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let beta = 0.0f32;
    let _g = gpu
        .lock
        .lock()
        .map_err(|_| gpu.err("cublas", "lock poisoned"))?;
    gpu.ctx.bind_to_thread().map_err(|e| gpu.err("bind", e))?;
    // SAFETY: pointers are live device allocations sized by the caller for (m, n, k, ld, stride,
    // batch); the handle is bound to this device's stream.
    unsafe {
        cudarc::cublas::result::gemm_strided_batched_ex(
            *gpu.blas.handle(),
            op(ta),
            op(tb),
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const c_void,
            a as *const c_void,
            dt_cuda(ab),
            lda as i32,
            sa as i64,
            b as *const c_void,
            dt_cuda(ab),
            ldb as i32,
            sb as i64,
            &beta as *const f32 as *const c_void,
            c as *mut c_void,
            dt_cuda(cdt),
            ldc as i32,
            sc as i64,
            batch as i32,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| gpu.err("cublasGemmStridedBatchedEx", e))
}

/// Key of a cached cuBLASLt algorithm choice.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct LtKey {
    dtype: DType,
    m: usize,
    n: usize,
    k: usize,
    bias: bool,
}

/// RAII wrappers of cuBLASLt descriptors.
struct LtDesc(lt_sys::cublasLtMatmulDesc_t);
impl Drop for LtDesc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc and destroyed once.
        let _ = unsafe { lt_result::destroy_matmul_desc(self.0) };
    }
}
struct LtLayout(lt_sys::cublasLtMatrixLayout_t);
impl Drop for LtLayout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout and destroyed once.
        let _ = unsafe { lt_result::destroy_matrix_layout(self.0) };
    }
}
struct LtPref(lt_sys::cublasLtMatmulPreference_t);
impl Drop for LtPref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref and destroyed once.
        let _ = unsafe { lt_result::destroy_matmul_pref(self.0) };
    }
}

/// `y[rows, n] = x[rows, k] · w[n, k]ᵀ (+ bias[n])` through cuBLASLt with the bias fused in the
/// epilogue.
fn lt_linear(
    gpu: &Gpu,
    dtype: DType,
    (x, w, bias, y): (u64, u64, Option<u64>, u64),
    (rows, k, n): (usize, usize, usize),
) -> Result<()> {
    let e = |what: &str, err: lt_result::CublasError| gpu.err(what, err);
    let ty = dt_lt(dtype);
    let _g = gpu
        .lock
        .lock()
        .map_err(|_| gpu.err("cublasLt", "lock poisoned"))?;
    gpu.ctx.bind_to_thread().map_err(|x| gpu.err("bind", x))?;
    let desc = LtDesc(
        lt_result::create_matmul_desc(
            lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt_sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|x| e("cublasLtMatmulDescCreate", x))?,
    );
    let set = |attr: lt_sys::cublasLtMatmulDescAttributes_t, p: *const c_void, sz: usize| {
        // SAFETY: `desc` is live; `p` points to a value of `sz` bytes of the attribute's type.
        unsafe { lt_result::set_matmul_desc_attribute(desc.0, attr, p, sz) }
            .map_err(|x| e("cublasLtMatmulDescSetAttribute", x))
    };
    let ta: i32 = 1;
    let tb: i32 = 0;
    set(
        lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
        &ta as *const i32 as *const c_void,
        4,
    )?;
    set(
        lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
        &tb as *const i32 as *const c_void,
        4,
    )?;
    if let Some(bp) = bias.as_ref() {
        let epi = lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
        set(
            lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epi as *const lt_sys::cublasLtEpilogue_t as *const c_void,
            std::mem::size_of::<lt_sys::cublasLtEpilogue_t>(),
        )?;
        set(
            lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
            bp as *const u64 as *const c_void,
            8,
        )?;
    }
    let lay = |r: usize, c: usize, ld: usize| {
        lt_result::create_matrix_layout(ty, r as u64, c as u64, ld as i64)
            .map(LtLayout)
            .map_err(|x| e("cublasLtMatrixLayoutCreate", x))
    };
    let a_l = lay(k, n, k)?;
    let b_l = lay(k, rows, k)?;
    let c_l = lay(n, rows, n)?;
    let key = LtKey {
        dtype,
        m: n,
        n: rows,
        k,
        bias: bias.is_some(),
    };
    let cached = gpu.lt_algos.lock().ok().and_then(|m| m.get(&key).copied());
    let ws_size = gpu.lt.workspace.len();
    let algo = match cached {
        Some(a) => a,
        None => {
            let pref = LtPref(lt_result::create_matmul_pref().map_err(|x| e("pref", x))?);
            // SAFETY: `pref` is live; the value is a usize as the attribute requires.
            unsafe {
                lt_result::set_matmul_pref_attribute(
                    pref.0,
                    lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws_size as *const usize as *const c_void,
                    std::mem::size_of::<usize>(),
                )
            }
            .map_err(|x| e("pref", x))?;
            // SAFETY: all descriptors are live.
            let h = unsafe {
                lt_result::get_matmul_algo_heuristic(
                    gpu.lt.handle,
                    desc.0,
                    a_l.0,
                    b_l.0,
                    c_l.0,
                    c_l.0,
                    pref.0,
                )
            }
            .map_err(|x| e("cublasLtMatmulAlgoGetHeuristic", x))?;
            if let Ok(mut m) = gpu.lt_algos.lock() {
                m.insert(key, h.algo);
            }
            h.algo
        }
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    let (wsp, _s) = cudarc::driver::DevicePtr::device_ptr(&gpu.lt.workspace, &gpu.stream);
    // SAFETY: x, w, bias, y are live device buffers sized by the caller for (rows, k, n); the
    // layouts describe them; the workspace is ours and `ws_size` bytes long.
    unsafe {
        lt_result::matmul(
            gpu.lt.handle,
            desc.0,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            w as *const c_void,
            a_l.0,
            x as *const c_void,
            b_l.0,
            y as *const c_void,
            c_l.0,
            y as *mut c_void,
            c_l.0,
            &algo,
            wsp as *mut c_void,
            ws_size,
            gpu.stream.cu_stream() as lt_sys::cudaStream_t,
        )
    }
    .map_err(|x| e("cublasLtMatmul", x))
}

/// `x · wᵀ + bias` (PyTorch `Linear`); computes in `w`'s dtype, returns `x`'s dtype.
pub(crate) fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out_shape: &[usize],
) -> Result<Tensor> {
    let gpu = gpu_of(w)?;
    let dt = w.dtype();
    let xc = if x.dtype() != dt {
        cast(x, dt)?
    } else {
        x.clone()
    };
    let bc = match bias {
        Some(b) if b.dtype() != dt => Some(cast(b, dt)?),
        Some(b) => Some(b.clone()),
        None => None,
    };
    let (n, k) = (w.shape()[0], w.shape()[1]);
    let rows = x.numel() / k.max(1);
    let y = out(&gpu, out_shape, dt)?;
    if rows > 0 && n > 0 {
        let bp = match &bc {
            Some(b) => Some(ptr(b)?),
            None => None,
        };
        lt_linear(&gpu, dt, (ptr(&xc)?, ptr(w)?, bp, ptr(&y)?), (rows, k, n))?;
    }
    if x.dtype() != dt {
        cast(&y, x.dtype())
    } else {
        Ok(y)
    }
}

/// Batched `[.., m, k] · [.., k, n]`.
pub(crate) fn matmul(a: &Tensor, b: &Tensor, (m, k, n): (usize, usize, usize)) -> Result<Tensor> {
    let gpu = gpu_of(a)?;
    let b = if b.dtype() != a.dtype() {
        cast(b, a.dtype())?
    } else {
        b.clone()
    };
    let batch: usize = a.shape()[..a.rank() - 2].iter().product();
    let mut shape = a.shape().to_vec();
    let r = shape.len();
    shape[r - 1] = n;
    let y = out(&gpu, &shape, a.dtype())?;
    if batch * m * n == 0 {
        return Ok(y);
    }
    // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ.
    gemm_batched(
        &gpu,
        (false, false),
        (n, m, k),
        1.0,
        (ptr(&b)?, n, k * n),
        (ptr(a)?, k, m * k),
        (ptr(&y)?, n, m * n),
        batch,
        a.dtype(),
        a.dtype(),
    )?;
    Ok(y)
}

/// Key of a cached cuDNN algorithm choice.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConvKey {
    dtype: DType,
    /// f32 convolutions may use TF32 ([`super::Gpu::set_conv_tf32`]).
    tf32: bool,
    x: [i32; 4],
    w: [i32; 4],
    pad: [i32; 2],
    stride: i32,
}

macro_rules! with_type {
    ($d:expr, $T:ident => $body:expr) => {
        match $d {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F16 => {
                type $T = f16;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
        }
    };
}

fn conv_cudnn<T>(
    gpu: &Arc<Gpu>,
    (x, w, y): (&CudaStorage, &CudaStorage, &mut CudaStorage),
    key: ConvKey,
    ys: [i32; 4],
) -> Result<()>
where
    T: cudarc::cudnn::CudnnDataType + DeviceRepr + num_traits_one::One,
{
    let e = |what: &str, err: dnn_sys::cudnnStatus_t| gpu.err(what, err);
    let de = |what: &str, err: cudarc::cudnn::CudnnError| gpu.err(what, err);
    let _g = gpu
        .lock
        .lock()
        .map_err(|_| gpu.err("cudnn", "lock poisoned"))?;
    gpu.ctx.bind_to_thread().map_err(|x| gpu.err("bind", x))?;
    let fmt = dnn_sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let xd = gpu
        .cudnn
        .create_4d_tensor::<T>(fmt, key.x)
        .map_err(|x| de("x descriptor", x))?;
    let wd = gpu
        .cudnn
        .create_4d_filter::<T>(fmt, key.w)
        .map_err(|x| de("filter descriptor", x))?;
    let yd = gpu
        .cudnn
        .create_4d_tensor::<T>(fmt, ys)
        .map_err(|x| de("y descriptor", x))?;
    let mut cd = gpu
        .cudnn
        .create_conv2d::<f32>(
            key.pad,
            [key.stride, key.stride],
            [1, 1],
            dnn_sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )
        .map_err(|x| de("conv descriptor", x))?;
    let math = match (key.dtype, key.tf32) {
        (DType::F32, false) => dnn_sys::cudnnMathType_t::CUDNN_FMA_MATH,
        // Lets cuDNN use TF32 tensor cores for f32 data (PyTorch's default for convolutions).
        (DType::F32, true) => dnn_sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        _ => dnn_sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    };
    cd.set_math_type(math).map_err(|x| de("math type", x))?;
    let fwd = cudarc::cudnn::ConvForward {
        conv: &cd,
        x: &xd,
        w: &wd,
        y: &yd,
    };
    let nx = key.x.iter().product::<i32>() as usize;
    let nw = key.w.iter().product::<i32>() as usize;
    let ny = ys.iter().product::<i32>() as usize;
    let cached = gpu
        .conv_algos
        .lock()
        .ok()
        .and_then(|m| m.get(&key).copied());
    let (algo, ws) = match cached {
        Some(v) => v,
        None => {
            let algo = fwd.pick_algorithm().map_err(|x| de("pick algorithm", x))?;
            let ws = fwd
                .get_workspace_size(algo)
                .map_err(|x| de("workspace size", x))?;
            if let Ok(mut m) = gpu.conv_algos.lock() {
                m.insert(key, (algo, ws));
            }
            (algo, ws)
        }
    };
    let _ = e;
    let mut wsb = if ws > 0 {
        // SAFETY: scratch memory for cuDNN.
        Some(unsafe { gpu.stream.alloc::<u8>(ws) }.map_err(|x| gpu.err("conv workspace", x))?)
    } else {
        None
    };
    // SAFETY: the byte buffers hold at least nx/nw/ny elements of T (allocated from the same
    // shapes); the views live until the launch returns.
    unsafe {
        let xv = x
            .buf
            .transmute::<T>(nx)
            .ok_or_else(|| gpu.err("conv", "x too small"))?;
        let wv = w
            .buf
            .transmute::<T>(nw)
            .ok_or_else(|| gpu.err("conv", "w too small"))?;
        let mut yv = y
            .buf
            .transmute_mut::<T>(ny)
            .ok_or_else(|| gpu.err("conv", "y too small"))?;
        fwd.launch(algo, wsb.as_mut(), (T::one(), T::zero()), &xv, &wv, &mut yv)
            .map_err(|x| de("cudnnConvolutionForward", x))?;
    }
    Ok(())
}

/// Minimal `one`/`zero` for the cuDNN scaling parameters.
mod num_traits_one {
    pub trait One {
        fn one() -> Self;
        fn zero() -> Self;
    }
    impl One for f32 {
        fn one() -> Self {
            1.0
        }
        fn zero() -> Self {
            0.0
        }
    }
    impl One for half::f16 {
        fn one() -> Self {
            half::f16::ONE
        }
        fn zero() -> Self {
            half::f16::ZERO
        }
    }
    impl One for half::bf16 {
        fn one() -> Self {
            half::bf16::ONE
        }
        fn zero() -> Self {
            half::bf16::ZERO
        }
    }
}

/// 2-D convolution, NCHW, through cuDNN (asymmetric padding by an explicit zero-padded copy).
/// Largest tensor, in bytes, that cuDNN's convolution descriptors accept.
const CUDNN_MAX_BYTES: usize = (1 << 31) - 1;

/// A convolution; where the input or the output is larger than cuDNN takes
/// ([`CUDNN_MAX_BYTES`]), it runs in bands of output rows, each from the input rows it reads
/// (the band's edge rows padded only where the image is), and the bands are concatenated.
pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
) -> Result<Tensor> {
    conv2d_in_bands(x, w, bias, p, CUDNN_MAX_BYTES)
}

/// [`crate::Tensor::conv2d`] of device tensors, in bands of output rows wherever the input or the
/// output is larger than `max_bytes` (each band's input and output stay under half of it, at most
/// 1 GiB). Public so that the banding can be tested at small sizes.
pub fn conv2d_in_bands(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
    max_bytes: usize,
) -> Result<Tensor> {
    let es = x.dtype().size();
    let (b, ci, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (co, kh, kw) = (w.shape()[0], w.shape()[2], w.shape()[3]);
    let ho = (h + p.pad_top + p.pad_bottom - kh) / p.stride + 1;
    let wo = (wd + p.pad_left + p.pad_right - kw) / p.stride + 1;
    let (in_row, out_row) = (b * ci * wd * es, b * co * wo * es);
    if (in_row * h).max(out_row * ho) <= max_bytes {
        return conv2d_whole(x, w, bias, p);
    }
    let per_out_row = (in_row * p.stride).max(out_row).max(1);
    let rows = ((max_bytes / 2).min(1 << 30) / per_out_row).max(1);
    let mut bands = Vec::with_capacity(ho.div_ceil(rows));
    for o0 in (0..ho).step_by(rows) {
        let o1 = (o0 + rows).min(ho);
        let top = (o0 * p.stride) as isize - p.pad_top as isize;
        let bottom = ((o1 - 1) * p.stride + kh) as isize - p.pad_top as isize;
        let (i0, i1) = (top.max(0) as usize, bottom.min(h as isize) as usize);
        let band = Conv2dParams {
            pad_top: (i0 as isize - top) as usize,
            pad_bottom: (bottom - i1 as isize) as usize,
            ..p
        };
        bands.push(conv2d_whole(&x.narrow(2, i0, i1 - i0)?, w, bias, band)?);
    }
    Tensor::cat(&bands.iter().collect::<Vec<_>>(), 2)
}

fn conv2d_whole(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: Conv2dParams) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let dt = x.dtype();
    let w = if w.dtype() != dt {
        cast(w, dt)?
    } else {
        w.clone()
    };
    let (b, ci, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (co, kh, kw) = (w.shape()[0], w.shape()[2], w.shape()[3]);
    let sym = p.pad_top == p.pad_bottom && p.pad_left == p.pad_right;
    let (xin, ph, pw) = if sym {
        (x.clone(), p.pad_top, p.pad_left)
    } else {
        let (ho, wo) = (h + p.pad_top + p.pad_bottom, wd + p.pad_left + p.pad_right);
        let xp = out(&gpu, &[b, ci, ho, wo], dt)?;
        launch!(gpu, format!("pad2d_{}", word(dt)), Gpu::cfg_elems(b * ci * ho * wo);
            ptr(x)?, ptr(&xp)?, (b * ci) as i64, h as i64, wd as i64,
            p.pad_top as i64, p.pad_left as i64, ho as i64, wo as i64);
        (xp, 0, 0)
    };
    let (hi, wi) = (xin.shape()[2], xin.shape()[3]);
    let ho = (hi + 2 * ph - kh) / p.stride + 1;
    let wo = (wi + 2 * pw - kw) / p.stride + 1;
    let mut ys = gpu.alloc(dt, b * co * ho * wo)?;
    let key = ConvKey {
        dtype: dt,
        tf32: dt == DType::F32 && gpu.conv_tf32(),
        x: [b as i32, ci as i32, hi as i32, wi as i32],
        w: [co as i32, ci as i32, kh as i32, kw as i32],
        pad: [ph as i32, pw as i32],
        stride: p.stride as i32,
    };
    let ydims = [b as i32, co as i32, ho as i32, wo as i32];
    with_type!(dt, T => conv_cudnn::<T>(&gpu, (storage(&xin)?, storage(&w)?, &mut ys), key, ydims))?;
    let y = Tensor::from_cuda(&[b, co, ho, wo], dt, ys);
    if let Some(bs) = bias {
        let bs = if bs.dtype() != dt {
            cast(bs, dt)?
        } else {
            bs.clone()
        };
        let n = y.numel();
        if (1..=MAX_GRID_Y).contains(&(b * co)) {
            launch!(gpu, format!("plane_binary_{}", tname(dt)), cfg_planes(b * co, ho * wo);
                ptr(&y)?, ptr(&bs)?, ptr(&y)?, (ho * wo) as i64, 0i32, co as i64);
        } else {
            launch!(gpu, format!("bias_nchw_{}", tname(dt)), Gpu::cfg_elems(n);
                ptr(&y)?, ptr(&bs)?, co as i64, (ho * wo) as i64, n as i64);
        }
    }
    Ok(y)
}

/// Σx and Σx² per (batch, group) on the device (f64 sums of f32 partial sums).
fn gn_sums(
    x: &Tensor,
    (b, c, s): (usize, usize, usize),
    groups: usize,
) -> Result<cudarc::driver::CudaSlice<f64>> {
    let gpu = gpu_of(x)?;
    let bg = b * groups;
    let group_len = (c / groups) * s;
    let chunk = 8192usize;
    let sums = gpu
        .stream
        .alloc_zeros::<f64>(2 * bg.max(1))
        .map_err(|e| gpu.err("group-norm sums", e))?;
    let sp = {
        let (p, _s) = cudarc::driver::DevicePtr::device_ptr(&sums, &gpu.stream);
        p
    };
    let cfg = LaunchConfig {
        grid_dim: (group_len.div_ceil(chunk).max(1) as u32, bg as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(gpu, format!("gn_sums_{}", tname(x.dtype())), cfg;
        ptr(x)?, sp, group_len as i64, chunk as i64);
    Ok(sums)
}

/// Host statistics for patch-parallel group norm.
pub(crate) fn group_sums(
    x: &Tensor,
    dims: (usize, usize, usize),
    groups: usize,
) -> Result<Vec<[f64; 3]>> {
    let gpu = gpu_of(x)?;
    let sums = gn_sums(x, dims, groups)?;
    let host = gpu
        .stream
        .clone_dtoh(&sums)
        .map_err(|e| gpu.err("group-norm sums download", e))?;
    let n = ((dims.1 / groups) * dims.2) as f64;
    Ok(host
        .chunks(2)
        .take(dims.0 * groups)
        .map(|p| [p[0], p[1], n])
        .collect())
}

fn gn_apply(
    x: &Tensor,
    mean_rstd: u64,
    (c, s, groups): (usize, usize, usize),
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    silu: bool,
) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let dt = x.dtype();
    let conv = |t: Option<&Tensor>| -> Result<Option<Tensor>> {
        Ok(match t {
            Some(t) if t.dtype() != dt => Some(cast(t, dt)?),
            Some(t) => Some(t.clone()),
            None => None,
        })
    };
    let (g, bt) = (conv(gamma)?, conv(beta)?);
    let gp = match &g {
        Some(t) => ptr(t)?,
        None => 0,
    };
    let bp = match &bt {
        Some(t) => ptr(t)?,
        None => 0,
    };
    let y = out(&gpu, x.shape(), dt)?;
    let n = x.numel();
    let planes = n / s.max(1);
    if (1..=MAX_GRID_Y).contains(&planes) {
        launch!(gpu, format!("gn_apply_planes_{}", tname(dt)), cfg_planes(planes, s);
            ptr(x)?, mean_rstd, gp, bp, ptr(&y)?, c as i32, s as i64, groups as i32, silu as i32);
        return Ok(y);
    }
    launch!(gpu, format!("gn_apply_{}", tname(dt)), Gpu::cfg_elems(n);
        ptr(x)?, mean_rstd, gp, bp, ptr(&y)?, c as i64, s as i64, groups as i64, silu as i32, n as i64);
    Ok(y)
}

/// Group norm with statistics computed on the device.
pub(crate) fn group_norm(
    x: &Tensor,
    dims: (usize, usize, usize),
    groups: usize,
    (gamma, beta): (Option<&Tensor>, Option<&Tensor>),
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let (b, c, s) = dims;
    let bg = b * groups;
    let sums = gn_sums(x, dims, groups)?;
    // SAFETY: every element is written by gn_finalize before gn_apply reads it.
    let mr = unsafe { gpu.stream.alloc::<f32>(2 * bg.max(1)) }.map_err(|e| gpu.err("alloc", e))?;
    let (sp, mp) = {
        let (a, _s1) = cudarc::driver::DevicePtr::device_ptr(&sums, &gpu.stream);
        let (m, _s2) = cudarc::driver::DevicePtr::device_ptr(&mr, &gpu.stream);
        (a, m)
    };
    let n = ((c / groups) * s) as f64;
    launch!(gpu, "gn_finalize", Gpu::cfg_elems(bg); sp, mp, bg as i32, n, eps);
    gn_apply(x, mp, (c, s, groups), gamma, beta, silu)
}

/// Per-(batch, group) `(mean, m2)` as F32 `[b·groups, 2]`: [`gn_sums`] and the `gn_moments`
/// finalize kernel, all on the device.
pub(crate) fn group_moments(
    x: &Tensor,
    dims: (usize, usize, usize),
    groups: usize,
) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let (b, c, s) = dims;
    let bg = b * groups;
    let y = out(&gpu, &[bg, 2], DType::F32)?;
    if bg == 0 {
        return Ok(y);
    }
    let sums = gn_sums(x, dims, groups)?;
    let (sp, _s) = cudarc::driver::DevicePtr::device_ptr(&sums, &gpu.stream);
    let n = ((c / groups) * s) as f64;
    launch!(gpu, "gn_moments", Gpu::cfg_elems(bg); sp, ptr(&y)?, bg as i32, n);
    Ok(y)
}

/// Element counts of the bands of [`group_norm_merged`], passed to the kernel by value (not
/// uploaded, so that the launch can be captured into a CUDA graph).
#[repr(C)]
#[derive(Clone, Copy)]
struct GnCounts {
    n: [f64; crate::ops::MAX_GN_BANDS],
}
// SAFETY: plain-old-data with the layout of `struct GnCounts` in kernels.cu.
unsafe impl DeviceRepr for GnCounts {}

/// Group norm with statistics merged on the device from per-band moments (the CPU twin is
/// [`crate::cpu::merge_group_moments`]); the caller checked shapes, dtypes, devices and `own`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_norm_merged(
    x: &Tensor,
    (b, c, s): (usize, usize, usize),
    groups: usize,
    (bands, counts): (&Tensor, &[f64]),
    corrected: Option<(usize, &Tensor)>,
    (gamma, beta): (Option<&Tensor>, Option<&Tensor>),
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let bg = b * groups;
    let mut cn = GnCounts {
        n: [0.0; crate::ops::MAX_GN_BANDS],
    };
    cn.n[..counts.len()].copy_from_slice(counts);
    let (own, fp) = match corrected {
        Some((own, fresh)) => (own as i32, ptr(fresh)?),
        None => (-1, 0),
    };
    // SAFETY: every element is written by gn_merge before gn_apply reads it.
    let mr = unsafe { gpu.stream.alloc::<f32>(2 * bg.max(1)) }.map_err(|e| gpu.err("alloc", e))?;
    let (mp, _s) = cudarc::driver::DevicePtr::device_ptr(&mr, &gpu.stream);
    if bg > 0 {
        launch!(gpu, "gn_merge", Gpu::cfg_elems(bg);
            ptr(bands)?, fp, mp, counts.len() as i32, bg as i32, cn, own, eps);
    }
    gn_apply(x, mp, (c, s, groups), gamma, beta, silu)
}

/// A zero-filled tensor on device `ordinal` (cleared on the device's stream).
pub(crate) fn zeros(ordinal: usize, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let gpu = super::gpu(ordinal)?;
    let n: usize = shape.iter().product();
    Ok(Tensor::from_cuda(shape, dtype, gpu.alloc_zeroed(dtype, n)?))
}

/// Group norm with statistics given by the caller (e.g. gathered over all bands).
pub(crate) fn group_norm_with_stats(
    x: &Tensor,
    dims: (usize, usize, usize),
    stats: &GroupStats,
    (gamma, beta): (Option<&Tensor>, Option<&Tensor>),
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let mr: Vec<f32> = stats
        .mean_var()
        .iter()
        .flat_map(|&(m, v)| [m as f32, (1.0 / (v.max(0.0) + eps).sqrt()) as f32])
        .collect();
    let buf = gpu
        .stream
        .clone_htod(&mr)
        .map_err(|e| gpu.err("group-norm statistics upload", e))?;
    let (mp, _s) = cudarc::driver::DevicePtr::device_ptr(&buf, &gpu.stream);
    gn_apply(x, mp, (dims.1, dims.2, stats.groups), gamma, beta, silu)
}

pub(crate) fn layer_norm(
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let dt = x.dtype();
    let d = *x.shape().last().unwrap_or(&1);
    let rows = x.numel() / d.max(1);
    let cv = |t: Option<&Tensor>| -> Result<Option<Tensor>> {
        Ok(match t {
            Some(t) if t.dtype() != dt => Some(cast(t, dt)?),
            Some(t) => Some(t.clone()),
            None => None,
        })
    };
    let (g, b) = (cv(gamma)?, cv(beta)?);
    let gp = match &g {
        Some(t) => ptr(t)?,
        None => 0,
    };
    let bp = match &b {
        Some(t) => ptr(t)?,
        None => 0,
    };
    let y = out(&gpu, x.shape(), dt)?;
    if rows > 0
        && !vector::try_row_norm(
            &gpu,
            dt,
            (ptr(x)?, gp, bp, ptr(&y)?),
            rows,
            d,
            eps as f32,
            true,
        )?
    {
        launch!(gpu, format!("layer_norm_{}", tname(dt)), cfg_rows(rows, 256);
            ptr(x)?, gp, bp, ptr(&y)?, d as i64, eps as f32);
    }
    Ok(y)
}

pub(crate) fn rms_norm(x: &Tensor, gamma: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let dt = x.dtype();
    let d = *x.shape().last().unwrap_or(&1);
    let rows = x.numel() / d.max(1);
    let g = match gamma {
        Some(t) if t.dtype() != dt => Some(cast(t, dt)?),
        Some(t) => Some(t.clone()),
        None => None,
    };
    let gp = match &g {
        Some(t) => ptr(t)?,
        None => 0,
    };
    let y = out(&gpu, x.shape(), dt)?;
    if rows > 0
        && !vector::try_row_norm(
            &gpu,
            dt,
            (ptr(x)?, gp, 0, ptr(&y)?),
            rows,
            d,
            eps as f32,
            false,
        )?
    {
        launch!(gpu, format!("rms_norm_{}", tname(dt)), cfg_rows(rows, 256);
            ptr(x)?, gp, ptr(&y)?, d as i64, eps as f32);
    }
    Ok(y)
}

/// Softmax over the last axis: the rows are read as f32 (cast first when stored narrower) and
/// written in the tensor's dtype by the attention softmax kernel.
pub(crate) fn softmax_rows(x: &Tensor) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let dt = x.dtype();
    let d = *x.shape().last().unwrap_or(&1);
    let rows = x.numel() / d.max(1);
    let s = if dt == DType::F32 {
        x.clone()
    } else {
        cast(x, DType::F32)?
    };
    let y = out(&gpu, x.shape(), dt)?;
    if rows > 0 {
        launch!(gpu, format!("softmax_{}", tname(dt)), cfg_rows(rows, 256);
            ptr(&s)?, ptr(&y)?, d as i64, 0i32, 0i64, 1i64);
    }
    Ok(y)
}

pub(crate) fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let s = x.shape();
    let y = out(&gpu, &[s[0], s[1], 2 * s[2], 2 * s[3]], x.dtype())?;
    let n = y.numel();
    launch!(gpu, format!("upsample2x_{}", tname(x.dtype())), Gpu::cfg_elems(n);
        ptr(x)?, ptr(&y)?, (s[0] * s[1]) as i64, s[2] as i64, s[3] as i64);
    Ok(y)
}

/// Copies `rows` rows of `cols` elements between strided layouts (element offsets).
#[allow(clippy::too_many_arguments)]
fn copy2d(
    gpu: &Gpu,
    dt: DType,
    (src, soff, spitch): (u64, usize, usize),
    (dst, doff, dpitch): (u64, usize, usize),
    rows: usize,
    cols: usize,
) -> Result<()> {
    if rows * cols == 0 {
        return Ok(());
    }
    let es = dt.size() as u64;
    let (s0, d0) = (src + soff as u64 * es, dst + doff as u64 * es);
    let aligned = [
        s0,
        d0,
        (cols * dt.size()) as u64,
        (spitch * dt.size()) as u64,
        (dpitch * dt.size()) as u64,
    ]
    .iter()
    .all(|v| v % 16 == 0);
    if aligned {
        // Whole rows of 16-byte words.
        let f = 16 / dt.size();
        launch!(gpu, "copy2d_u128", Gpu::cfg_elems(rows * cols / f);
            s0, d0, rows as i64, (cols / f) as i64, (spitch / f) as i64, (dpitch / f) as i64);
        return Ok(());
    }
    // Move 16-bit words: an f32 element is two of them.
    let f = dt.size() / 2;
    launch!(gpu, "copy2d_u16", Gpu::cfg_elems(rows * cols * f);
        src + soff as u64 * es, dst + doff as u64 * es, rows as i64, (cols * f) as i64,
        (spitch * f) as i64, (dpitch * f) as i64);
    Ok(())
}

pub(crate) fn cat(ts: &[&Tensor], dim: usize, out_shape: &[usize]) -> Result<Tensor> {
    let first = ts[0];
    let gpu = gpu_of(first)?;
    let dt = first.dtype();
    let y = out(&gpu, out_shape, dt)?;
    let outer: usize = out_shape[..dim].iter().product();
    let inner: usize = out_shape[dim + 1..].iter().product();
    let total = out_shape[dim];
    let yp = ptr(&y)?;
    let mut off = 0;
    for t in ts {
        let t = if t.dtype() != dt {
            cast(t, dt)?
        } else {
            (*t).clone()
        };
        let len = t.shape()[dim] * inner;
        copy2d(
            &gpu,
            dt,
            (ptr(&t)?, 0, len),
            (yp, off, total * inner),
            outer,
            len,
        )?;
        off += len;
    }
    Ok(y)
}

pub(crate) fn narrow(x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let size = x.shape()[dim];
    let outer: usize = x.shape()[..dim].iter().product();
    let inner: usize = x.shape()[dim + 1..].iter().product();
    let mut shape = x.shape().to_vec();
    shape[dim] = len;
    let y = out(&gpu, &shape, x.dtype())?;
    copy2d(
        &gpu,
        x.dtype(),
        (ptr(x)?, start * inner, size * inner),
        (ptr(&y)?, 0, len * inner),
        outer,
        len * inner,
    )?;
    Ok(y)
}

/// Gather with the output shape and the source stride of each output axis.
pub(crate) fn permute(x: &Tensor, out_shape: &[usize], src_strides: &[usize]) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let rank = out_shape.len();
    if rank > 6 {
        return Err(KernelError::invalid(
            "permute (cuda)",
            format!("rank {rank} > 6 is not supported"),
        ));
    }
    let mut p = Perm {
        rank: rank as i32,
        shape: [1; 6],
        stride: [0; 6],
    };
    for i in 0..rank {
        p.shape[i] = out_shape[i] as i64;
        p.stride[i] = src_strides[i] as i64;
    }
    let y = out(&gpu, out_shape, x.dtype())?;
    let n = y.numel();
    if rank == 3 && n > 0 {
        // [n, r, c] -> [n, c, r] (image <-> tokens): a tiled transpose.
        let (c, r) = (out_shape[1], out_shape[2]);
        if src_strides == [r * c, 1, c] {
            let cfg = LaunchConfig {
                grid_dim: (
                    c.div_ceil(32) as u32,
                    r.div_ceil(32) as u32,
                    out_shape[0] as u32,
                ),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            };
            launch!(gpu, format!("transpose_{}", word(x.dtype())), cfg;
                ptr(x)?, ptr(&y)?, r as i64, c as i64);
            return Ok(y);
        }
    }
    if n > 0 {
        launch!(gpu, format!("permute_{}", word(x.dtype())), Gpu::cfg_elems(n);
            ptr(x)?, ptr(&y)?, n as i64, p);
    }
    Ok(y)
}

/// Rows of `table` picked by host-checked ids.
pub(crate) fn embedding(ids: &[u32], ids_shape: &[usize], table: &Tensor) -> Result<Tensor> {
    let gpu = gpu_of(table)?;
    let d = table.shape()[1];
    let mut shape = ids_shape.to_vec();
    shape.push(d);
    let y = out(&gpu, &shape, table.dtype())?;
    if ids.is_empty() {
        return Ok(y);
    }
    let idb = gpu
        .stream
        .clone_htod(ids)
        .map_err(|e| gpu.err("embedding ids upload", e))?;
    let (ip, _s) = cudarc::driver::DevicePtr::device_ptr(&idb, &gpu.stream);
    launch!(gpu, format!("gather_rows_{}", word(table.dtype())), Gpu::cfg_elems(ids.len() * d);
        ip, ptr(table)?, ptr(&y)?, ids.len() as i64, d as i64);
    Ok(y)
}

pub(crate) fn timestep_embedding(t: &Tensor, dim: usize, flip: bool, shift: f32) -> Result<Tensor> {
    let gpu = gpu_of(t)?;
    let b = t.numel();
    let y = out(&gpu, &[b, dim], t.dtype())?;
    if b * dim > 0 {
        launch!(gpu, format!("timestep_emb_{}", tname(t.dtype())), Gpu::cfg_elems(b * dim);
            ptr(t)?, ptr(&y)?, b as i64, dim as i64, flip as i32, shift);
    }
    Ok(y)
}

/// A tensor of uniform values in `[lo, hi)` from a counter-based generator seeded by `seed`.
pub(crate) fn fill_uniform(
    ordinal: usize,
    shape: &[usize],
    dtype: DType,
    (lo, hi): (f32, f32),
    seed: u64,
) -> Result<Tensor> {
    let gpu = super::gpu(ordinal)?;
    let y = out(&gpu, shape, dtype)?;
    let n = y.numel();
    if n > 0 {
        launch!(gpu, format!("fill_uniform_{}", tname(dtype)), Gpu::cfg_elems(n);
            ptr(&y)?, n as i64, seed, lo, hi);
    }
    Ok(y)
}

/// A captured CUDA graph of work on one device, replayed with [`CudaGraphStep::replay`]. Inputs and
/// outputs are tensors allocated before the capture and refreshed with [`copy_into`].
pub struct CudaGraphStep {
    graph: CudaGraph,
    gpu: Arc<Gpu>,
}

impl CudaGraphStep {
    /// Launches the captured work (asynchronously on the device's stream).
    pub fn replay(&self) -> Result<()> {
        self.graph
            .launch()
            .map_err(|e| self.gpu.err("cuGraphLaunch", e))
    }
}

/// Captures everything `f` enqueues on device `ordinal` into a CUDA graph. `f` must not read
/// device data back to the host nor upload host data; temporaries it creates must be dropped
/// inside it (their memory is then owned by the graph).
///
/// Work on the comm stream is captured too when `f` orders it with the compute stream: after
/// [`Gpu::fork_to_comm`] the comm stream takes part in the capture, what `f` then enqueues on it
/// (e.g. NCCL calls on [`Gpu::comm_stream_raw`]) becomes graph nodes that depend on the compute
/// work before the fork, and [`Gpu::join_comm`] makes the compute work after it depend on them.
/// A replay runs both branches with the same ordering. Comm work still unjoined when `f` returns
/// is joined back here (the capture could not end otherwise), so the graph always ends after it.
pub fn capture_graph(ordinal: usize, f: impl FnOnce() -> Result<()>) -> Result<CudaGraphStep> {
    let gpu = super::gpu(ordinal)?;
    gpu.synchronize()?;
    gpu.stream
        .begin_capture(drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(|e| gpu.err("cuStreamBeginCapture", e))?;
    let r = f();
    // The comm stream is part of the capture once `f` forked to it; a join (again, if `f` joined
    // already: a redundant edge) lets the capture end.
    let comm_in_capture = matches!(
        gpu.comm.capture_status(),
        Ok(drv_sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE)
    );
    let joined = if comm_in_capture {
        gpu.join_comm()
    } else {
        Ok(())
    };
    let g = gpu.stream.end_capture(
        drv_sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
    );
    r?;
    joined?;
    let graph = g
        .map_err(|e| gpu.err("cuStreamEndCapture", e))?
        .ok_or_else(|| gpu.err("cuStreamEndCapture", "empty graph"))?;
    Ok(CudaGraphStep { graph, gpu })
}

/// `min(prev, code)` when `x` holds a NaN or ±inf, else `prev` (a one-element f32 flag; see
/// [`crate::Tensor::nonfinite_flag`]). Two launches, no host wait.
pub(crate) fn nonfinite_flag(x: &Tensor, prev: &Tensor, code: f32) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let y = out(&gpu, &[1], DType::F32)?;
    copy_into(prev, &y)?;
    let n = x.numel();
    if n > 0 {
        let blocks = n.div_ceil(256).clamp(1, 1024) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(gpu, format!("nonfinite_mark_{}", tname(x.dtype())), cfg;
            ptr(x)?, n as i64, ptr(&y)?, code);
    }
    Ok(y)
}

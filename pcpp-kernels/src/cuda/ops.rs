//! CUDA twins of the tensor ops. Shapes were checked by the caller ([`crate::Tensor`]'s methods);
//! every function here takes operands on one GPU and returns a tensor on that GPU. Numerics: inputs
//! in the storage dtype, f32 arithmetic and accumulation, one rounding on store (the CPU twin's
//! contract).

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::cublas::sys as blas_sys;
use cudarc::cublaslt::{result as lt_result, sys as lt_sys};
use cudarc::cudnn::sys as dnn_sys;
use cudarc::driver::{sys as drv_sys, CudaGraph, DeviceRepr, LaunchConfig};
use half::{bf16, f16};

use super::{CudaStorage, Gpu};
use crate::{Activation, Conv2dParams, DType, KernelError, Result, Tensor};

/// Launches kernel `$name` on `$gpu`'s stream with the given arguments (each bound to a local so
/// that it outlives the launch), through [`launch_ex`].
macro_rules! launch {
    ($gpu:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let gpu: &Gpu = &$gpu;
        let name: &str = &$name;
        let f = gpu.func(name)?;
        let mut params: Vec<*mut std::ffi::c_void> = Vec::new();
        launch!(@push params, gpu, f, name, $cfg; $($arg),*)
    }};
    (@push $p:ident, $gpu:ident, $f:ident, $name:ident, $cfg:expr; $head:expr $(, $tail:expr)*) => {{
        let a = $head;
        $p.push($crate::cuda::ops::kernel_param(&a));
        launch!(@push $p, $gpu, $f, $name, $cfg; $($tail),*)
    }};
    (@push $p:ident, $gpu:ident, $f:ident, $name:ident, $cfg:expr;) => {{
        // SAFETY: argument lists match the kernel signatures in kernels.cu; every pointer is a
        // live device allocation of at least the extent the kernel touches (sizes derive from the
        // checked tensor shapes); the parameters outlive the call.
        unsafe { $crate::cuda::ops::launch_ex($gpu, $f, $cfg, &mut $p) }.map_err(|e| $gpu.err($name, e))?;
    }};
}

/// A kernel argument as the driver takes it: the address of the value.
pub(crate) fn kernel_param<T: DeviceRepr>(a: &T) -> *mut c_void {
    a as *const T as *mut c_void
}

static PROGRAMMATIC: AtomicBool = AtomicBool::new(true);

/// Whether this source's kernels are launched with programmatic dependent launch where the
/// device has it (on unless [`set_programmatic_launch`] turned it off).
pub fn programmatic_launch() -> bool {
    PROGRAMMATIC.load(Ordering::Relaxed)
}

/// Launches this source's kernels with programmatic dependent launch on sm_90 and later devices
/// (each kernel's blocks start while the one before it finishes, and wait in `pdl_begin` for
/// it), or plainly, for this process. Same results either way.
pub fn set_programmatic_launch(on: bool) {
    PROGRAMMATIC.store(on, Ordering::Relaxed);
}

/// Launches `f` on `gpu`'s stream with `cuLaunchKernelEx`: with programmatic stream
/// serialisation where the device has it and [`programmatic_launch`] is on (every kernel of
/// this source starts with `pdl_begin`, which waits for the kernel before it; CUDA graphs
/// captured from the stream keep the programmatic edges).
///
/// # Safety
/// `params` must match `f`'s signature and stay alive for the call; device pointers among them
/// must cover what the kernel touches.
pub(crate) unsafe fn launch_ex(
    gpu: &Gpu,
    f: &cudarc::driver::CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut c_void],
) -> std::result::Result<(), cudarc::driver::DriverError> {
    launch_ex_cluster(gpu, f, cfg, 1, params)
}

/// [`launch_ex`] with thread-block clusters of `cluster_z` blocks along z (1: no clusters).
///
/// # Safety
/// As [`launch_ex`]; `cluster_z` must divide the grid's z extent.
pub(crate) unsafe fn launch_ex_cluster(
    gpu: &Gpu,
    f: &cudarc::driver::CudaFunction,
    cfg: LaunchConfig,
    cluster_z: u32,
    params: &mut [*mut c_void],
) -> std::result::Result<(), cudarc::driver::DriverError> {
    gpu.ctx.bind_to_thread()?;
    let mut attrs: [drv_sys::CUlaunchAttribute; 2] = std::mem::zeroed();
    let mut count = 0;
    if gpu.programmatic && programmatic_launch() {
        attrs[count].id =
            drv_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attrs[count].value.programmaticStreamSerializationAllowed = 1;
        count += 1;
    }
    if cluster_z > 1 {
        attrs[count].id = drv_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        attrs[count].value.clusterDim.x = 1;
        attrs[count].value.clusterDim.y = 1;
        attrs[count].value.clusterDim.z = cluster_z;
        count += 1;
    }
    let conf = drv_sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: gpu.stream.cu_stream(),
        attrs: attrs.as_mut_ptr(),
        numAttrs: count as u32,
    };
    drv_sys::cuLaunchKernelEx(
        &conf,
        f.cu_function(),
        params.as_mut_ptr(),
        std::ptr::null_mut(),
    )
    .result()
}

pub(crate) mod attn;
mod conv;
mod gemm;
mod gemm_wg;
mod layout;
mod norm;
mod rows;
mod tma;
mod tune;
pub(crate) mod vector;

pub(crate) use layout::{cat, narrow, permute, tokens_to_image_add};
use layout::{copy2d, pairs_fit, transpose_pairs, PairsEpilogue};

pub(crate) use norm::{
    add_layer_norm, group_moments, group_norm, group_norm_merged, group_norm_nhwc,
    group_norm_with_stats, group_sums, layer_norm, rms_norm, zeros,
};

pub(crate) use conv::{conv2d, conv2d_nhwc_input, ConvAdds, ConvKey};
pub use conv::{conv2d_in_bands, conv_nhwc, set_conv_nhwc};
use gemm::gemm_batched;
pub use gemm::{fused_epilogues, lt_reduction, set_fused_epilogues, set_lt_reduction, LtReduction};
pub(crate) use gemm::{linear, linear_add, linear_gelu_tanh, matmul, LtKey};
pub(crate) use gemm::{linear_add_stats, linear_geglu, norm_linear, norm_linears_apply};
pub(crate) use gemm_wg::{gemm_wg_bytes, gemm_wg_name, MAX_WARPGROUPS as GEMM_WG_MAX_WARPGROUPS};
pub use gemm_wg::{
    set_small_gemm, set_small_gemm_rows, set_small_gemm_splits, small_gemm, small_gemm_rows,
    small_gemm_splits, SmallGemm, SMALL_GEMM_ROWS,
};
pub use norm::{
    group_norm_merged_into, group_norm_merged_into_nhwc, group_norm_merged_nhwc, StatsWindow,
};
pub use rows::{copy_rows_into, linear_rows_into, nchw_rows_into_nhwc, norm_linear_rows_into};
pub use tune::{autotune, set_autotune, set_autotune_report};

pub(crate) use attn::{
    attention, attention_in_place, flash_hopper_bytes, flash_hopper_name, flash_ws_bytes,
    flash_ws_name, small_split_bytes, FLASH_SHARED_Q64_BYTES, FLASH_SHARED_Q_BYTES,
};
pub use attn::{
    flash128, flash_persistent, set_flash128, set_flash_persistent, set_small_split, small_grid,
    small_split, Flash128, SMALL_GRID_KEYS, SMALL_SPLIT_DEFAULT,
};

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

/// The most axes the strided kernels' descriptors (`Bcast`, `Perm`) hold.
const MAX_RANK: usize = 6;

/// An error naming `op` where `rank` exceeds [`MAX_RANK`].
fn rank_fits(op: &'static str, rank: usize) -> Result<()> {
    if rank > MAX_RANK {
        return Err(KernelError::invalid(
            op,
            format!("rank {rank} > {MAX_RANK} is not supported"),
        ));
    }
    Ok(())
}

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
            let ptrs = (ptr(a)?, ptr(&b)?, ptr(&y)?);
            if vector::try_plane_binary(&gpu, a.dtype(), ptrs, (planes, s), op, planes)? {
                return Ok(y);
            }
            launch!(gpu, format!("plane_binary_{t}"), cfg_planes(planes, s);
                ptr(a)?, ptr(&b)?, ptr(&y)?, s as i64, op, planes as i64);
            return Ok(y);
        }
    }
    // AdaLN-style row broadcasts ([P, R, C] against [P, 1, C]), either operand broadcast
    let rows = [(a, &b, sa, sb, false), (&b, a, sb, sa, true)]
        .into_iter()
        .filter(|_| vector::vector_kernels())
        .find_map(|(f, g, sf, sg, left)| {
            vector::row_pattern(out_shape, sf, sg).map(|p| (f, g, p, left))
        });
    if let Some((f, g, p, left)) = rows {
        if vector::try_row_broadcast(&gpu, a.dtype(), (ptr(f)?, ptr(g)?, ptr(&y)?), p, op, left)? {
            return Ok(y);
        }
    }
    rank_fits("broadcast (cuda)", rank)?;
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
    pub(crate) graph: CudaGraph,
    pub(crate) gpu: Arc<Gpu>,
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

//! GEMMs on the GPU: cuBLAS strided-batched GEMM (attention's unfused path, `matmul`) and
//! cuBLASLt for `linear` (bias, and optionally a tanh GELU or an accumulator, fused in the
//! epilogue; algorithm timed and cached per shape, `tune.rs`), f32 accumulation; f32 operands on TF32 tensor
//! cores when [`super::Gpu::set_tf32`] allows it.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use super::*;

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
pub(super) fn gemm_batched(
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
            if ab == DType::F32 && cdt == DType::F32 && gpu.tf32() {
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
            } else {
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
            },
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| gpu.err("cublasGemmStridedBatchedEx", e))
}

/// How many of cuBLASLt's candidates a new shape times ([`tune::fastest`]).
const LT_CANDIDATES: usize = 16;

/// A cuBLASLt algorithm's configuration as the autotune report prints it: algorithm id, tile,
/// stages, split-K count, reduction scheme, CTA swizzle, custom option, cluster shape (the ids of
/// cuBLASLt's enums).
fn algo_label(algo: &lt_sys::cublasLtMatmulAlgo_t) -> String {
    use lt_sys::cublasLtMatmulAlgoConfigAttributes_t as A;
    // cuBLASLt checks the buffer's size against the attribute's (4 bytes for most, 2 for the
    // cluster shape), so each size is tried in turn.
    let get = |attr: A| {
        for size in [4usize, 2, 8] {
            let mut v = 0u64;
            let mut written = 0usize;
            // SAFETY: `algo` is a live algorithm value; `v` has room for the `size` bytes asked.
            let status = unsafe {
                lt_sys::cublasLtMatmulAlgoConfigGetAttribute(
                    algo,
                    attr,
                    &mut v as *mut u64 as *mut c_void,
                    size,
                    &mut written,
                )
            };
            if status == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return v.to_string();
            }
        }
        "?".to_string()
    };
    format!(
        "algo {} tile {} stages {} split-k {} reduction {} swizzle {} custom {} cluster {}",
        get(A::CUBLASLT_ALGO_CONFIG_ID),
        get(A::CUBLASLT_ALGO_CONFIG_TILE_ID),
        get(A::CUBLASLT_ALGO_CONFIG_STAGES_ID),
        get(A::CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
        get(A::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
        get(A::CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
        get(A::CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION),
        get(A::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID),
    )
}

/// Key of a cached cuBLASLt algorithm choice.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct LtKey {
    dtype: DType,
    m: usize,
    n: usize,
    k: usize,
    bias: bool,
    gelu: bool,
    tf32: bool,
}

/// Whether GEMM epilogues take the work after a linear layer (`pcpp-cli`: `PCPP_FUSED_EPILOGUES`).
static FUSED_EPILOGUES: AtomicBool = AtomicBool::new(true);

/// Whether `Tensor::linear_act` (tanh GELU) and `Tensor::linear_add` (an accumulator added) run as
/// one cuBLASLt GEMM with the work in its epilogue (on unless [`set_fused_epilogues`] turned it
/// off; measured on an H200 together with [`super::Flash128::SharedQ64`]: the FLUX.1-dev 1024²
/// step 166.2 -> 160.3 ms, docs/benchmarks.md).
pub fn fused_epilogues() -> bool {
    FUSED_EPILOGUES.load(Ordering::Relaxed)
}

/// Turns the epilogues of [`fused_epilogues`] on or off for this process.
pub fn set_fused_epilogues(on: bool) {
    FUSED_EPILOGUES.store(on, Ordering::Relaxed);
}

/// Which split-K reductions cuBLASLt's heuristic may choose for `linear` (`pcpp-cli`:
/// `PCPP_LT_REDUCTION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LtReduction {
    /// Any (the default): split-K GEMMs may reduce their parts in a kernel of their own.
    Any,
    /// Only in place: the parts are added in the output by the GEMM's own blocks (no separate
    /// reduction kernel), or K is not split.
    InPlace,
    /// No split-K GEMMs.
    Off,
}

static LT_REDUCTION: AtomicU8 = AtomicU8::new(0);

/// The split-K reductions in force ([`LtReduction::Any`] unless [`set_lt_reduction`] chose).
pub fn lt_reduction() -> LtReduction {
    match LT_REDUCTION.load(Ordering::Relaxed) {
        1 => LtReduction::InPlace,
        2 => LtReduction::Off,
        _ => LtReduction::Any,
    }
}

/// Chooses the split-K reductions cuBLASLt may use for GEMM shapes not yet seen in this
/// process.
pub fn set_lt_reduction(r: LtReduction) {
    let code = match r {
        LtReduction::Any => 0,
        LtReduction::InPlace => 1,
        LtReduction::Off => 2,
    };
    LT_REDUCTION.store(code, Ordering::Relaxed);
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
impl LtPref {
    /// Sets the preference attribute `attr` to `value` (of the type the attribute takes: a
    /// `usize` for byte sizes, a `u32` for masks).
    fn set<T: Copy>(
        &self,
        attr: lt_sys::cublasLtMatmulPreferenceAttributes_t,
        value: &T,
    ) -> std::result::Result<(), cudarc::cublaslt::result::CublasError> {
        // SAFETY: the preference is live; `value` is `size_of::<T>()` readable bytes.
        unsafe {
            lt_result::set_matmul_pref_attribute(
                self.0,
                attr,
                value as *const T as *const c_void,
                std::mem::size_of::<T>(),
            )
        }
    }
}
impl Drop for LtPref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref and destroyed once.
        let _ = unsafe { lt_result::destroy_matmul_pref(self.0) };
    }
}

/// `y[rows, n] = x[rows, k] · w[n, k]ᵀ (+ bias[n]) (+ acc[rows, n])` through cuBLASLt with the
/// bias (and, with `gelu`, cuBLASLt's tanh-approximated GELU after it) fused in the epilogue and
/// `acc` read as its C operand (β = 1).
pub(super) fn lt_linear(
    gpu: &Gpu,
    dtype: DType,
    (x, w, bias, acc, y): (u64, u64, Option<u64>, Option<u64>, u64),
    (rows, k, n): (usize, usize, usize),
    gelu: bool,
) -> Result<()> {
    let e = |what: &str, err: lt_result::CublasError| gpu.err(what, err);
    let ty = dt_lt(dtype);
    let tf32 = dtype == DType::F32 && gpu.tf32();
    let _g = gpu
        .lock
        .lock()
        .map_err(|_| gpu.err("cublasLt", "lock poisoned"))?;
    gpu.ctx.bind_to_thread().map_err(|x| gpu.err("bind", x))?;
    let desc = LtDesc(
        lt_result::create_matmul_desc(
            if tf32 {
                lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
            } else {
                lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
            },
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
    let epi = match (bias.is_some(), gelu) {
        (true, true) => Some(lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS),
        (true, false) => Some(lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS),
        (false, true) => Some(lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU),
        (false, false) => None,
    };
    if let Some(epi) = epi {
        set(
            lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epi as *const lt_sys::cublasLtEpilogue_t as *const c_void,
            std::mem::size_of::<lt_sys::cublasLtEpilogue_t>(),
        )?;
    }
    if let Some(bp) = bias.as_ref() {
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
        gelu,
        tf32,
    };
    let ws_size = gpu.lt.workspace.len();
    let (alpha, beta) = (1.0f32, if acc.is_some() { 1.0f32 } else { 0.0 });
    let c = acc.unwrap_or(y);
    let (wsp, _s) = cudarc::driver::DevicePtr::device_ptr(&gpu.lt.workspace, &gpu.stream);
    let run = |algo: &lt_sys::cublasLtMatmulAlgo_t| {
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
                c as *const c_void,
                c_l.0,
                y as *mut c_void,
                c_l.0,
                algo,
                wsp as *mut c_void,
                ws_size,
                gpu.stream.cu_stream() as lt_sys::cudaStream_t,
            )
        }
        .map_err(|x| e("cublasLtMatmul", x))
    };
    let cached = gpu.lt_algos.lock().ok().and_then(|m| m.get(&key).copied());
    let algo = match cached {
        Some(a) => a,
        None => {
            let pref = LtPref(lt_result::create_matmul_pref().map_err(|x| e("pref", x))?);
            use lt_sys::cublasLtMatmulPreferenceAttributes_t as P;
            pref.set(P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_size)
                .map_err(|x| e("pref", x))?;
            let mask = match lt_reduction() {
                LtReduction::Any => None,
                LtReduction::InPlace => Some(
                    lt_sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_INPLACE as u32,
                ),
                LtReduction::Off => Some(0u32),
            };
            if let Some(mask) = mask {
                pref.set(P::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask)
                    .map_err(|x| e("pref", x))?;
            }
            let wanted = if tune::may_tune(gpu) {
                LT_CANDIDATES
            } else {
                1
            };
            // SAFETY: zeroed results are plain data that cuBLASLt overwrites.
            let mut found: Vec<lt_sys::cublasLtMatmulHeuristicResult_t> =
                vec![unsafe { std::mem::zeroed() }; wanted];
            let mut count = 0i32;
            // SAFETY: all descriptors are live; `found` holds `wanted` results.
            unsafe {
                lt_sys::cublasLtMatmulAlgoGetHeuristic(
                    gpu.lt.handle,
                    desc.0,
                    a_l.0,
                    b_l.0,
                    c_l.0,
                    c_l.0,
                    pref.0,
                    wanted as i32,
                    found.as_mut_ptr(),
                    &mut count,
                )
            }
            .result()
            .map_err(|x| e("cublasLtMatmulAlgoGetHeuristic", x))?;
            found.truncate(count.max(0) as usize);
            found.retain(|h| h.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS);
            if found.is_empty() {
                return Err(gpu.err(
                    "cublasLtMatmulAlgoGetHeuristic",
                    format!("no algorithm for {rows}x{k} · {n}x{k}"),
                ));
            }
            let pick = if found.len() > 1 {
                let shape = format!("GEMM {dtype:?} {rows}x{k} · {n}x{k}");
                let label = |i: usize| algo_label(&found[i].algo);
                tune::fastest(gpu, found.len(), (&shape, &label), |i| run(&found[i].algo))?
                    .unwrap_or(0)
            } else {
                0
            };
            let algo = found[pick].algo;
            // A choice made inside a capture is not kept: the next eager call times the shape.
            if wanted == LT_CANDIDATES || !tune::autotune() {
                if let Ok(mut m) = gpu.lt_algos.lock() {
                    m.insert(key, algo);
                }
            }
            algo
        }
    };
    run(&algo)
}

/// `x · wᵀ + bias` (PyTorch `Linear`); computes in `w`'s dtype, returns `x`'s dtype.
pub(crate) fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out_shape: &[usize],
) -> Result<Tensor> {
    linear_epilogue(x, w, bias, None, out_shape, false)
}

/// `acc + x · wᵀ + bias` as one GEMM (`acc` as its C operand, added to the f32 accumulator
/// before rounding); `acc` of the weight's dtype.
pub(crate) fn linear_add(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    acc: &Tensor,
) -> Result<Tensor> {
    linear_epilogue(x, w, bias, Some(acc), acc.shape(), false)
}

/// `gelu_tanh(x · wᵀ + bias)` as one GEMM (the activation in cuBLASLt's epilogue, on the f32
/// accumulator before rounding); computes in `w`'s dtype, returns `x`'s dtype.
pub(crate) fn linear_gelu_tanh(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out_shape: &[usize],
) -> Result<Tensor> {
    linear_epilogue(x, w, bias, None, out_shape, true)
}

fn linear_epilogue(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    acc: Option<&Tensor>,
    out_shape: &[usize],
    gelu: bool,
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
        let ap = match acc {
            Some(a) if a.dtype() == dt => Some(ptr(a)?),
            Some(_) => {
                return Err(KernelError::invalid(
                    "linear_add",
                    "the accumulator must have the weight's dtype",
                ))
            }
            None => None,
        };
        let o = super::gemm_wg::WgOperands {
            acc: ap,
            ..super::gemm_wg::WgOperands::new(&xc, w, bc.as_ref(), ptr(&y)?)?
        };
        if gelu || !super::gemm_wg::try_gemm_wg(&gpu, dt, &o, (rows, k, n), false)? {
            lt_linear(&gpu, dt, (o.x, o.w, o.bias, ap, o.y), (rows, k, n), gelu)?;
        }
    }
    if x.dtype() != dt {
        cast(&y, x.dtype())
    } else {
        Ok(y)
    }
}

/// `GEGLU(x · wᵀ + bias)`: the value half of the output columns times the exact GELU of the gate
/// half, `w: [2h, k]` → `[.., h]`. One small-row kernel where it applies
/// ([`super::gemm_wg::try_gemm_wg`]: GELU on the f32 accumulator, one rounding), else the
/// linear layer and then the GEGLU pass; computes in `w`'s dtype, returns `x`'s dtype.
pub(crate) fn linear_geglu(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out_shape: &[usize],
) -> Result<Tensor> {
    let gpu = gpu_of(w)?;
    let dt = w.dtype();
    let (n2, k) = (w.shape()[0], w.shape()[1]);
    let rows = x.numel() / k.max(1);
    if dt != DType::F32 && x.dtype() == dt && bias.map_or(true, |b| b.dtype() == dt) {
        let y = out(&gpu, out_shape, dt)?;
        let o = super::gemm_wg::WgOperands::new(x, w, bias, ptr(&y)?)?;
        if super::gemm_wg::try_gemm_wg(&gpu, dt, &o, (rows, k, n2 / 2), true)? {
            return Ok(y);
        }
    }
    let mut hidden = out_shape.to_vec();
    *hidden.last_mut().unwrap_or(&mut 0) = n2;
    let h = linear(x, w, bias, &hidden)?;
    super::geglu(&h, out_shape)
}

/// Whether [`linear_add_stats`] of `x` (rows of its last axis) through `n` outputs runs on the
/// small-row kernels and so leaves the statistics [`norm_linear`] reads.
pub(crate) fn norm_linears_apply(x: &Tensor, n: usize) -> bool {
    let Ok(gpu) = gpu_of(x) else {
        return false;
    };
    let k = *x.shape().last().unwrap_or(&0);
    let rows = x.numel() / k.max(1);
    super::gemm_wg::gemm_wg_applies(&gpu, x.dtype(), (rows, k, n), (false, true))
}

/// `acc + x · wᵀ + bias` (without `acc`: `x · wᵀ + bias`) on the small-row kernels, with the
/// partial row statistics of the result from their epilogue (`[rows, ceil(n/64), 2]` f32: per
/// 64-column tile the mean and the sum of squared deviations of the rounded outputs); `None`
/// where they do not apply.
pub(crate) fn linear_add_stats(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    acc: Option<&Tensor>,
    out_shape: &[usize],
) -> Result<Option<(Tensor, Tensor)>> {
    let gpu = gpu_of(w)?;
    let dt = w.dtype();
    let (n, k) = (w.shape()[0], w.shape()[1]);
    let rows = x.numel() / k.max(1);
    let halves = [Some(x), bias, acc];
    if halves.iter().flatten().any(|t| t.dtype() != dt)
        || !super::gemm_wg::gemm_wg_applies(&gpu, dt, (rows, k, n), (false, true))
    {
        return Ok(None);
    }
    let y = out(&gpu, out_shape, dt)?;
    let stats = out(&gpu, &[rows, n.div_ceil(64), 2], DType::F32)?;
    let o = super::gemm_wg::WgOperands {
        acc: acc.map(ptr).transpose()?,
        stats_out: Some(ptr(&stats)?),
        ..super::gemm_wg::WgOperands::new(x, w, bias, ptr(&y)?)?
    };
    Ok(super::gemm_wg::try_gemm_wg(&gpu, dt, &o, (rows, k, n), false)?.then_some((y, stats)))
}

/// The operand of a layer norm applied inside a small-row GEMM: the partial statistics of `x`
/// (`[rows, ceil(k/64), 2]` f32, on `w`'s device) and the affine parameters; `None` where they
/// do not fit (the caller normalises separately).
pub(super) fn wg_norm(
    x: &Tensor,
    stats: &Tensor,
    (gamma, beta, eps): (Option<&Tensor>, Option<&Tensor>, f64),
    w: &Tensor,
) -> Result<Option<super::gemm_wg::WgNorm>> {
    let dt = w.dtype();
    let k = w.shape()[1];
    let rows = x.numel() / k.max(1);
    if [Some(x), gamma, beta]
        .iter()
        .flatten()
        .any(|t| t.dtype() != dt)
        || stats.dtype() != DType::F32
        || stats.shape() != [rows, k.div_ceil(64), 2]
        || stats.device() != w.device()
    {
        return Ok(None);
    }
    Ok(Some(super::gemm_wg::WgNorm {
        stats: ptr(stats)?,
        gamma: gamma.map(ptr).transpose()?,
        beta: beta.map(ptr).transpose()?,
        eps: eps as f32,
    }))
}

/// `layer_norm(x) · wᵀ + bias` (with `geglu`, GEGLU of it over the two halves of `w`) on the
/// small-row kernels, the norm applied to each tile of `x` as it is loaded, its statistics merged
/// from `stats` (what [`linear_add_stats`] left for `x`); `None` where the kernels do not apply.
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_linear(
    x: &Tensor,
    stats: &Tensor,
    affine: (Option<&Tensor>, Option<&Tensor>, f64),
    w: &Tensor,
    bias: Option<&Tensor>,
    geglu: bool,
    out_shape: &[usize],
) -> Result<Option<Tensor>> {
    let gpu = gpu_of(w)?;
    let dt = w.dtype();
    let (n, k) = (w.shape()[0] / if geglu { 2 } else { 1 }, w.shape()[1]);
    let rows = x.numel() / k.max(1);
    let Some(norm) = wg_norm(x, stats, affine, w)? else {
        return Ok(None);
    };
    if bias.is_some_and(|b| b.dtype() != dt) {
        return Ok(None);
    }
    let y = out(&gpu, out_shape, dt)?;
    let o = super::gemm_wg::WgOperands {
        norm: Some(norm),
        ..super::gemm_wg::WgOperands::new(x, w, bias, ptr(&y)?)?
    };
    Ok(super::gemm_wg::try_gemm_wg(&gpu, dt, &o, (rows, k, n), geglu)?.then_some(y))
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

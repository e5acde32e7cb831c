//! Convolutions on the GPU through cuDNN (tensor-op math, algorithm timed and cached per shape,
//! `tune.rs`),
//! with convolutions too large for cuDNN's 2³¹-byte limit run in row bands.
//!
//! Activations are NCHW. cuDNN's fast Hopper kernels are NHWC: given NCHW operands it transposes
//! the input, the filter and the output around every call, and the bias is one more pass. f16 and
//! bf16 convolutions therefore run in NHWC here: the filter is transposed once and kept (per
//! weight tensor, for as long as that tensor lives), the input is transposed in, and the output
//! is transposed back with the bias added in the same pass ([`set_conv_nhwc`]).

use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::CudaSlice;

use super::*;

static CONV_NHWC: AtomicBool = AtomicBool::new(true);

/// Whether f16 and bf16 convolutions run in NHWC (on unless [`set_conv_nhwc`] turned it off).
pub fn conv_nhwc() -> bool {
    CONV_NHWC.load(Ordering::Relaxed)
}

/// Runs f16 and bf16 convolutions in NHWC with kept filters and a fused bias (on by default), or
/// as cuDNN's NCHW calls with a separate bias add, for this process.
pub fn set_conv_nhwc(on: bool) {
    CONV_NHWC.store(on, Ordering::Relaxed);
}

/// The algorithms a new shape times besides cuDNN's heuristic choice ([`tune::fastest`]): those
/// that accumulate each output as one dot product (no FFT or Winograd transforms, whose rounding
/// in f16 differs from the CPU twin's).
const CONV_CANDIDATES: [dnn_sys::cudnnConvolutionFwdAlgo_t; 4] = [
    dnn_sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
    dnn_sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
    dnn_sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
    dnn_sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
];

/// Largest workspace a timed candidate may ask for.
const CONV_MAX_WORKSPACE: usize = 1 << 30;

/// Key of a cached cuDNN algorithm choice.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct ConvKey {
    dtype: DType,
    /// f32 convolutions may use TF32 ([`super::Gpu::set_tf32`]).
    tf32: bool,
    x: [i32; 4],
    w: [i32; 4],
    pad: [i32; 2],
    stride: i32,
    /// Operands in NHWC (the filter as `[co, kh, kw, ci]`); dims stay `[n, c, h, w]`.
    nhwc: bool,
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
    let fmt = if key.nhwc {
        dnn_sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
    } else {
        dnn_sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
    };
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
    // SAFETY (both closures): the byte buffers hold at least nx/nw/ny elements of T (allocated
    // from the same shapes); the views live until the launch returns.
    let launch = |algo, wsb: Option<&mut CudaSlice<u8>>, y: &mut CudaStorage| unsafe {
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
        fwd.launch(algo, wsb, (T::one(), T::zero()), &xv, &wv, &mut yv)
            .map_err(|x| de("cudnnConvolutionForward", x))
    };
    let scratch = |ws: usize| -> Result<Option<CudaSlice<u8>>> {
        if ws == 0 {
            return Ok(None);
        }
        // SAFETY: scratch memory for cuDNN.
        let b = unsafe { gpu.stream.alloc::<u8>(ws) }.map_err(|x| gpu.err("conv workspace", x))?;
        Ok(Some(b))
    };
    let cached = gpu
        .conv_algos
        .lock()
        .ok()
        .and_then(|m| m.get(&key).copied());
    let (algo, ws) = match cached {
        Some(v) => v,
        None => {
            let first = fwd.pick_algorithm().map_err(|x| de("pick algorithm", x))?;
            let size = |a| {
                fwd.get_workspace_size(a)
                    .map_err(|x| de("workspace size", x))
            };
            let mut found = vec![(first, size(first)?)];
            let tuned = tune::may_tune(gpu);
            if tuned {
                for a in CONV_CANDIDATES {
                    if a != first {
                        if let Ok(ws) = fwd.get_workspace_size(a) {
                            if ws <= CONV_MAX_WORKSPACE {
                                found.push((a, ws));
                            }
                        }
                    }
                }
            }
            let pick = if found.len() > 1 {
                let mut wsb = scratch(found.iter().map(|f| f.1).max().unwrap_or(0))?;
                let shape = format!("conv {key:?}");
                let label = |i: usize| format!("{:?}", found[i].0);
                tune::fastest(gpu, found.len(), (&shape, &label), |i| {
                    launch(found[i].0, wsb.as_mut(), &mut *y)
                })?
                .unwrap_or(0)
            } else {
                0
            };
            // A choice made inside a capture is not kept: the next eager call times the shape.
            if tuned || !tune::autotune() {
                if let Ok(mut m) = gpu.conv_algos.lock() {
                    m.insert(key, found[pick]);
                }
            }
            found[pick]
        }
    };
    let _ = e;
    let mut wsb = scratch(ws)?;
    launch(algo, wsb.as_mut(), y)?;
    Ok(())
}

/// `t` in dtype `dt` (a cast only where it differs).
fn in_dtype(t: &Tensor, dt: DType) -> Result<Tensor> {
    if t.dtype() != dt {
        cast(t, dt)
    } else {
        Ok(t.clone())
    }
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

/// What a convolution adds after its bias, in this order: a `[b, co]` term per image and channel
/// (a `[b, co, 1, 1]` broadcast) and a residual shaped like the output (`residual + y`). Shapes
/// and dtypes were checked by [`crate::Tensor::conv2d_add`].
#[derive(Clone, Copy, Default)]
pub(crate) struct ConvAdds<'a> {
    pub(crate) plane: Option<&'a Tensor>,
    pub(crate) residual: Option<&'a Tensor>,
}

impl ConvAdds<'_> {
    /// The adds as separate ops (the CPU twin's order).
    fn compose(&self, y: Tensor) -> Result<Tensor> {
        let y = match self.plane {
            Some(t) => y.add(&t.reshape(&[t.shape()[0], t.shape()[1], 1, 1])?)?,
            None => y,
        };
        match self.residual {
            Some(r) => r.add(&y),
            None => Ok(y),
        }
    }
}

/// A convolution and its adds; where the input or the output is larger than cuDNN takes
/// ([`CUDNN_MAX_BYTES`]), it runs in bands of output rows, each from the input rows it reads
/// (the band's edge rows padded only where the image is), and the bands are concatenated.
pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
    adds: ConvAdds,
) -> Result<Tensor> {
    conv2d_banded(x, w, bias, p, adds, CUDNN_MAX_BYTES)
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
    conv2d_banded(x, w, bias, p, ConvAdds::default(), max_bytes)
}

fn conv2d_banded(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
    adds: ConvAdds,
    max_bytes: usize,
) -> Result<Tensor> {
    let es = x.dtype().size();
    let (b, ci, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (co, kh, kw) = (w.shape()[0], w.shape()[2], w.shape()[3]);
    let unpadded = p.pad_top + p.pad_bottom + p.pad_left + p.pad_right == 0;
    if kh == 1 && kw == 1 && p.stride == 1 && unpadded && h * wd <= i32::MAX as usize {
        return conv1x1(x, w, bias, adds);
    }
    let ho = (h + p.pad_top + p.pad_bottom - kh) / p.stride + 1;
    let wo = (wd + p.pad_left + p.pad_right - kw) / p.stride + 1;
    let (in_row, out_row) = (b * ci * wd * es, b * co * wo * es);
    if (in_row * h).max(out_row * ho) <= max_bytes {
        return conv2d_whole(x, w, bias, p, adds);
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
        let xb = x.narrow(2, i0, i1 - i0)?;
        bands.push(conv2d_whole(&xb, w, bias, band, ConvAdds::default())?);
    }
    adds.compose(Tensor::cat(&bands.iter().collect::<Vec<_>>(), 2)?)
}

fn conv2d_whole(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
    adds: ConvAdds,
) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let dt = x.dtype();
    let w = in_dtype(w, dt)?;
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
    let mut key = ConvKey {
        dtype: dt,
        tf32: dt == DType::F32 && gpu.tf32(),
        x: [b as i32, ci as i32, hi as i32, wi as i32],
        w: [co as i32, ci as i32, kh as i32, kw as i32],
        pad: [ph as i32, pw as i32],
        stride: p.stride as i32,
        nhwc: false,
    };
    let ydims = [b as i32, co as i32, ho as i32, wo as i32];
    let fits = pairs_fit(b, ci, hi * wi) && pairs_fit(b, ho * wo, co);
    if dt != DType::F32 && conv_nhwc() && fits {
        // NHWC: the input transposed in, the kept filter, the output transposed back + bias.
        let xn = out(&gpu, &[b, hi, wi, ci], dt)?;
        let ep0 = PairsEpilogue::default();
        if transpose_pairs(&gpu, (ptr(&xin)?, ptr(&xn)?), ep0, dt, (b, ci, hi * wi))? {
            key.nhwc = true;
            return conv_nhwc_in(&gpu, &xn, &w, bias, key, [b, co, ho, wo], adds);
        }
    }
    let mut ys = gpu.alloc(dt, b * co * ho * wo)?;
    with_type!(dt, T => conv_cudnn::<T>(&gpu, (storage(&xin)?, storage(&w)?, &mut ys), key, ydims))?;
    let y = Tensor::from_cuda(&[b, co, ho, wo], dt, ys);
    add_bias_nchw(&gpu, &y, bias, (b, co, ho * wo))?;
    adds.compose(y)
}

/// A `1×1` convolution with stride 1 and no padding in NCHW as one strided-batched GEMM per
/// image, `y[b] = W · x[b]` (`[co, ci] · [ci, h·w]`): no layout transposes, which cuDNN's NHWC
/// kernels would need (and f32 on TF32 tensor cores where [`super::Gpu::set_tf32`] allows it,
/// as the convolutions).
fn conv1x1(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, adds: ConvAdds) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let dt = x.dtype();
    let w = in_dtype(w, dt)?;
    let (b, ci, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (co, s) = (w.shape()[0], h * wd);
    let y = out(&gpu, &[b, co, h, wd], dt)?;
    if b * co * s == 0 {
        return adds.compose(y);
    }
    // Row-major y[b] = W · x[b] is column-major y[b]ᵀ = x[b]ᵀ · Wᵀ: m = s, n = co, k = ci.
    gemm_batched(
        &gpu,
        (false, false),
        (s, co, ci),
        1.0,
        (ptr(x)?, s, ci * s),
        (ptr(&w)?, ci, 0),
        (ptr(&y)?, s, co * s),
        b,
        dt,
        dt,
    )?;
    add_bias_nchw(&gpu, &y, bias, (b, co, s))?;
    adds.compose(y)
}

/// `y[b, c, s] += bias[c]` in place (nothing without a bias).
fn add_bias_nchw(
    gpu: &Arc<Gpu>,
    y: &Tensor,
    bias: Option<&Tensor>,
    (b, co, s): (usize, usize, usize),
) -> Result<()> {
    let Some(bs) = bias else {
        return Ok(());
    };
    let dt = y.dtype();
    let bs = in_dtype(bs, dt)?;
    let n = y.numel();
    if n == 0 {
        return Ok(());
    }
    let ptrs = (ptr(y)?, ptr(&bs)?, ptr(y)?);
    if vector::try_plane_binary(gpu, dt, ptrs, (b * co, s), 0, co)? {
        return Ok(());
    }
    if (1..=MAX_GRID_Y).contains(&(b * co)) {
        launch!(gpu, format!("plane_binary_{}", tname(dt)), cfg_planes(b * co, s);
            ptr(y)?, ptr(&bs)?, ptr(y)?, s as i64, 0i32, co as i64);
    } else {
        launch!(gpu, format!("bias_nchw_{}", tname(dt)), Gpu::cfg_elems(n);
            ptr(y)?, ptr(&bs)?, co as i64, s as i64, n as i64);
    }
    Ok(())
}

/// The convolution of the NHWC input `xn: [b, hi, wi, ci]` (`key` describes it, symmetric
/// padding) with the kept NHWC filter, its output transposed back to `[b, co, ho, wo]` with the
/// bias and the adds in the same pass (a residual not aligned to two elements added after).
fn conv_nhwc_in(
    gpu: &Arc<Gpu>,
    xn: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    key: ConvKey,
    [b, co, ho, wo]: [usize; 4],
    adds: ConvAdds,
) -> Result<Tensor> {
    let dt = xn.dtype();
    let wn = nhwc_filter(gpu, w)?;
    let mut ys = gpu.alloc(dt, b * co * ho * wo)?;
    let ydims = [b as i32, co as i32, ho as i32, wo as i32];
    with_type!(dt, T => conv_cudnn::<T>(gpu, (storage(xn)?, storage(&wn)?, &mut ys), key, ydims))?;
    let yn = Tensor::from_cuda(&[b, ho * wo, co], dt, ys);
    let bias = bias.map(|b| in_dtype(b, dt)).transpose()?;
    let pair = 2 * dt.size() as u64;
    let res = adds
        .residual
        .map(ptr)
        .transpose()?
        .filter(|r| r % pair == 0);
    let ep = PairsEpilogue {
        bias: bias.as_ref().map(ptr).transpose()?,
        plane: adds.plane.map(ptr).transpose()?,
        res,
    };
    let y = out(gpu, &[b, co, ho, wo], dt)?;
    if !transpose_pairs(gpu, (ptr(&yn)?, ptr(&y)?), ep, dt, (b, ho * wo, co))? {
        return Err(gpu.err("conv2d", "NHWC output transpose not launched"));
    }
    match (res, adds.residual) {
        (None, Some(r)) => r.add(&y),
        _ => Ok(y),
    }
}

/// [`crate::Tensor::conv2d_add_nhwc`] on the device: the convolution of `xn: [b, h, w, ci]`
/// without the input transpose, or `None` where the NHWC path does not take it (f32, NHWC
/// convolutions off, asymmetric padding, odd extents, larger than cuDNN takes); the caller then
/// transposes and convolves.
pub(crate) fn conv2d_nhwc_input(
    xn: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
    adds: ConvAdds,
) -> Result<Option<Tensor>> {
    let dt = xn.dtype();
    let (b, hi, wi, ci) = (xn.shape()[0], xn.shape()[1], xn.shape()[2], xn.shape()[3]);
    let (co, kh, kw) = (w.shape()[0], w.shape()[2], w.shape()[3]);
    let (ph, pw) = (p.pad_top, p.pad_left);
    let sym = p.pad_top == p.pad_bottom && p.pad_left == p.pad_right;
    let ho = (hi + 2 * ph - kh) / p.stride + 1;
    let wo = (wi + 2 * pw - kw) / p.stride + 1;
    let es = dt.size();
    let small = (b * ci * hi * wi * es).max(b * co * ho * wo * es) <= CUDNN_MAX_BYTES;
    if dt == DType::F32
        || !conv_nhwc()
        || !sym
        || !small
        || !pairs_fit(b, ci, hi * wi)
        || !pairs_fit(b, ho * wo, co)
        || ptr(xn)? % (2 * es as u64) != 0
    {
        return Ok(None);
    }
    let gpu = gpu_of(xn)?;
    let w = in_dtype(w, dt)?;
    let key = ConvKey {
        dtype: dt,
        tf32: false,
        x: [b as i32, ci as i32, hi as i32, wi as i32],
        w: [co as i32, ci as i32, kh as i32, kw as i32],
        pad: [ph as i32, pw as i32],
        stride: p.stride as i32,
        nhwc: true,
    };
    conv_nhwc_in(&gpu, xn, &w, bias, key, [b, co, ho, wo], adds).map(Some)
}

/// The filter `w: [co, ci, kh, kw]` as `[co, kh, kw, ci]` (cuDNN's NHWC filter), transposed once
/// per weight tensor and kept while that tensor lives (keyed by its storage; entries of dropped
/// weights are removed at the next insertion).
fn nhwc_filter(gpu: &Arc<Gpu>, w: &Tensor) -> Result<Tensor> {
    let (id, weak) = w.storage_id();
    let kept = gpu.conv_filters.lock().ok().and_then(|m| {
        m.get(&id)
            .filter(|(wk, shape, _)| wk.strong_count() > 0 && shape == w.shape())
            .map(|(_, _, t)| t.clone())
    });
    if let Some(t) = kept {
        return Ok(t);
    }
    let s = w.shape();
    let t = w.reshape(&[s[0], s[1], s[2] * s[3]])?.permute(&[0, 2, 1])?;
    if let Ok(mut m) = gpu.conv_filters.lock() {
        m.retain(|_, (wk, _, _)| wk.strong_count() > 0);
        m.insert(id, (weak, s.to_vec(), t.clone()));
    }
    Ok(t)
}

//! Tensor ops: shape checking and device dispatch. Each op checks its operands, then calls the
//! kernel of the tensor's device (today the CPU twin in [`crate::cpu`]).

use crate::cpu;
#[cfg(feature = "cuda")]
use crate::cpu::profile;
#[cfg(feature = "cuda")]
use crate::{cuda, Device};
use crate::{KernelError, Result, Tensor};

/// Most bands [`Tensor::group_norm_merged`] merges (the CUDA kernel takes the counts by value).
pub(crate) const MAX_GN_BANDS: usize = 64;

/// Whether the operands of `op` live on a GPU; an error naming `op` and both devices when two
/// operands live on different devices (an op never copies an operand to another device behind the
/// caller's back).
#[cfg(feature = "cuda")]
pub(crate) fn on_gpu(op: &'static str, ts: &[Option<&Tensor>]) -> Result<bool> {
    let mut devices = ts.iter().flatten().map(|t| t.device());
    let Some(first) = devices.next() else {
        return Ok(false);
    };
    if let Some(other) = devices.find(|d| *d != first) {
        return Err(KernelError::Device {
            device: format!("{first} and {other}"),
            msg: format!(
                "{op}: operands live on different devices ({first} and {other}); move them to one device first"
            ),
        });
    }
    Ok(first != Device::Cpu)
}

/// Point-wise activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x·σ(x)`.
    Silu,
    /// Exact GELU (erf).
    Gelu,
    /// GELU, tanh approximation.
    GeluTanh,
    /// `x·σ(1.702x)` (OpenAI CLIP).
    QuickGelu,
    /// `max(x, 0)`.
    Relu,
}

impl Activation {
    /// Parses the `hidden_act` / `act_fn` names used by transformers and diffusers configs.
    pub fn from_config_name(name: &str) -> Option<Activation> {
        Some(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            "relu" => Activation::Relu,
            _ => return None,
        })
    }

    /// Applies the activation to one value (the scalar specification).
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Silu => cpu::silu(x),
            Activation::Gelu => cpu::gelu(x),
            Activation::GeluTanh => cpu::gelu_tanh(x),
            Activation::QuickGelu => cpu::quick_gelu(x),
            Activation::Relu => x.max(0.0),
        }
    }
}

/// Convolution geometry: stride and zero padding per side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: usize,
    pub pad_top: usize,
    pub pad_bottom: usize,
    pub pad_left: usize,
    pub pad_right: usize,
}

impl Conv2dParams {
    /// Same padding `pad` on every side.
    pub fn new(stride: usize, pad: usize) -> Self {
        Conv2dParams {
            stride,
            pad_top: pad,
            pad_bottom: pad,
            pad_left: pad,
            pad_right: pad,
        }
    }
}

fn broadcast_shape(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(KernelError::shape(op, a, b));
        };
    }
    Ok(out)
}

/// Strides of `shape` broadcast to `out` (0 on broadcast axes).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let off = out.len() - shape.len();
    let mut strides = vec![0; out.len()];
    let mut s = 1;
    for i in (0..shape.len()).rev() {
        strides[i + off] = if shape[i] == 1 { 0 } else { s };
        s *= shape[i];
    }
    strides
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

impl Tensor {
    fn binary(
        &self,
        other: &Tensor,
        op: &'static str,
        code: i32,
        f: impl Fn(f32, f32) -> f32 + Sync,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if on_gpu(op, &[Some(self), Some(other)])? {
            let (a, b) = (self, other);
            let out_shape = broadcast_shape(op, a.shape(), b.shape())?;
            let sa = broadcast_strides(a.shape(), &out_shape);
            let sb = broadcast_strides(b.shape(), &out_shape);
            let _timed = cuda::profile::scope(profile::Kernel::Elementwise, a.device());
            return cuda::binary(a, b, code, &out_shape, &sa, &sb);
        }
        let _ = code;
        let (a, b) = (self.as_f32()?, other.as_f32()?);
        if self.shape() == other.shape() {
            return self.like(self.shape(), cpu::zip_map(&a, &b, f));
        }
        let out_shape = broadcast_shape(op, self.shape(), other.shape())?;
        let (sa, sb) = (
            broadcast_strides(self.shape(), &out_shape),
            broadcast_strides(other.shape(), &out_shape),
        );
        let n: usize = out_shape.iter().product();
        let mut out = Vec::with_capacity(n);
        let rank = out_shape.len();
        if rank == 0 {
            out.push(f(a[0], b[0]));
        } else {
            let inner = out_shape[rank - 1];
            let (ia, ib) = (sa[rank - 1], sb[rank - 1]);
            let mut idx = vec![0usize; rank - 1];
            for _ in 0..n / inner.max(1) {
                let oa: usize = idx.iter().zip(&sa).map(|(i, s)| i * s).sum();
                let ob: usize = idx.iter().zip(&sb).map(|(i, s)| i * s).sum();
                for j in 0..inner {
                    out.push(f(a[oa + j * ia], b[ob + j * ib]));
                }
                for d in (0..rank - 1).rev() {
                    idx[d] += 1;
                    if idx[d] < out_shape[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
        }
        self.like(&out_shape, out)
    }

    /// Element-wise sum with NumPy broadcasting.
    pub fn add(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, "add", 0, |a, b| a + b)
    }

    /// Element-wise difference with broadcasting.
    pub fn sub(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, "sub", 1, |a, b| a - b)
    }

    /// Element-wise product with broadcasting.
    pub fn mul(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, "mul", 2, |a, b| a * b)
    }

    /// Element-wise quotient with broadcasting.
    pub fn div(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, "div", 3, |a, b| a / b)
    }

    /// `self·mul + add` for scalars.
    pub fn affine(&self, mul: f32, add: f32) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            let _timed = cuda::profile::scope(profile::Kernel::Elementwise, self.device());
            return cuda::unary(self, cuda::Unary::Affine(mul, add));
        }
        let v = cpu::map(&self.as_f32()?, |x| x * mul + add);
        self.like(self.shape(), v)
    }

    /// Clamps every element into `[lo, hi]`.
    pub fn clamp(&self, lo: f32, hi: f32) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            let _timed = cuda::profile::scope(profile::Kernel::Elementwise, self.device());
            return cuda::unary(self, cuda::Unary::Clamp(lo, hi));
        }
        let v = cpu::map(&self.as_f32()?, |x| x.clamp(lo, hi));
        self.like(self.shape(), v)
    }

    /// Applies a point-wise activation.
    pub fn act(&self, act: Activation) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            let _timed = cuda::profile::scope(profile::Kernel::Elementwise, self.device());
            return cuda::unary(self, cuda::Unary::Act(act));
        }
        let v = cpu::map(&self.as_f32()?, |x| act.apply(x));
        self.like(self.shape(), v)
    }

    /// GEGLU: splits the last axis in halves `[h | gate]` and returns `h·gelu(gate)`.
    pub fn geglu(&self) -> Result<Tensor> {
        let d = *self.shape().last().unwrap_or(&0);
        if d % 2 != 0 {
            return Err(KernelError::invalid(
                "geglu",
                format!("last axis {d} is odd"),
            ));
        }
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            let mut shape = self.shape().to_vec();
            if let Some(last) = shape.last_mut() {
                *last = d / 2;
            }
            let _timed = cuda::profile::scope(profile::Kernel::Elementwise, self.device());
            return cuda::geglu(self, &shape);
        }
        let x = self.as_f32()?;
        let h = d / 2;
        let mut out = Vec::with_capacity(x.len() / 2);
        for row in x.chunks(d.max(1)) {
            for j in 0..h {
                out.push(row[j] * cpu::gelu(row[h + j]));
            }
        }
        let mut shape = self.shape().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = h;
        }
        self.like(&shape, out)
    }

    /// `self · wᵀ + bias`, PyTorch `Linear`.
    ///
    /// # Shapes
    /// `self: [..., k]`, `w: [n, k]`, `bias: [n]` → `[..., n]`.
    pub fn linear(&self, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let k = *self.shape().last().unwrap_or(&0);
        if w.rank() != 2 || w.shape()[1] != k {
            return Err(KernelError::shape("linear", self.shape(), w.shape()));
        }
        let n = w.shape()[0];
        if let Some(b) = bias {
            if b.shape() != [n] {
                return Err(KernelError::shape("linear (bias)", w.shape(), b.shape()));
            }
        }
        #[cfg(feature = "cuda")]
        if on_gpu("linear", &[Some(self), Some(w), bias])? {
            let mut shape = self.shape().to_vec();
            *shape.last_mut().unwrap_or(&mut 0) = n;
            let _timed = cuda::profile::scope(profile::Kernel::Linear, self.device());
            return cuda::linear(self, w, bias, &shape);
        }
        let rows = self.numel() / k.max(1);
        let b = match bias {
            Some(b) => Some(b.as_f32()?),
            None => None,
        };
        let y = cpu::linear(&self.as_f32()?, &w.as_f32()?, b.as_deref(), rows, k, n);
        let mut shape = self.shape().to_vec();
        *shape.last_mut().unwrap_or(&mut 0) = n;
        self.like(&shape, y)
    }

    /// Batched matrix product over the leading axes.
    ///
    /// # Shapes
    /// `self: [..., m, k]`, `other: [..., k, n]` (same leading axes) → `[..., m, n]`.
    pub fn matmul(&self, other: &Tensor) -> Result<Tensor> {
        let (ra, rb) = (self.rank(), other.rank());
        if ra < 2
            || ra != rb
            || self.shape()[..ra - 2] != other.shape()[..rb - 2]
            || self.shape()[ra - 1] != other.shape()[rb - 2]
        {
            return Err(KernelError::shape("matmul", self.shape(), other.shape()));
        }
        let (m, k, n) = (
            self.shape()[ra - 2],
            self.shape()[ra - 1],
            other.shape()[rb - 1],
        );
        #[cfg(feature = "cuda")]
        if on_gpu("matmul", &[Some(self), Some(other)])? {
            let _timed = cuda::profile::scope(profile::Kernel::Gemm, self.device());
            return cuda::matmul(self, other, (m, k, n));
        }
        let batch: usize = self.shape()[..ra - 2].iter().product();
        let (a, b) = (self.as_f32()?, other.as_f32()?);
        let mut out = vec![0.0f32; batch * m * n];
        for i in 0..batch {
            cpu::gemm(
                m,
                n,
                k,
                &a[i * m * k..],
                k,
                1,
                &b[i * k * n..],
                n,
                1,
                &mut out[i * m * n..],
                n,
                1,
                false,
            );
        }
        let mut shape = self.shape().to_vec();
        shape[ra - 1] = n;
        self.like(&shape, out)
    }

    /// 2-D convolution.
    ///
    /// # Shapes
    /// `self: [b, ci, h, w]`, `w: [co, ci, kh, kw]`, `bias: [co]` → `[b, co, ho, wo]`.
    pub fn conv2d(&self, w: &Tensor, bias: Option<&Tensor>, p: Conv2dParams) -> Result<Tensor> {
        self.conv2d_out_shape(w, bias, p)?;
        let (b, ci, h, wd) = (
            self.shape()[0],
            self.shape()[1],
            self.shape()[2],
            self.shape()[3],
        );
        let (co, kh, kw) = (w.shape()[0], w.shape()[2], w.shape()[3]);
        #[cfg(feature = "cuda")]
        if on_gpu("conv2d", &[Some(self), Some(w), bias])? {
            let _timed = cuda::profile::scope(profile::Kernel::Conv2d, self.device());
            return cuda::conv2d(self, w, bias, p, cuda::ConvAdds::default());
        }
        let bv = match bias {
            Some(b) => Some(b.as_f32()?),
            None => None,
        };
        let (y, ho, wo) = cpu::conv2d(
            &self.as_f32()?,
            (b, ci, h, wd),
            &w.as_f32()?,
            (co, kh, kw),
            bv.as_deref(),
            p.stride,
            (p.pad_top, p.pad_bottom, p.pad_left, p.pad_right),
        );
        self.like(&[b, co, ho, wo], y)
    }

    /// The output shape `[b, co, ho, wo]` of [`Tensor::conv2d`] with these operands (its checks).
    pub(crate) fn conv2d_out_shape(
        &self,
        w: &Tensor,
        bias: Option<&Tensor>,
        p: Conv2dParams,
    ) -> Result<[usize; 4]> {
        conv2d_out_dims(self.shape(), w, bias, p)
    }

    /// Layer normalisation over the last axis.
    pub fn layer_norm(
        &self,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        let d = *self.shape().last().unwrap_or(&0);
        for t in [gamma, beta].into_iter().flatten() {
            if t.shape() != [d] {
                return Err(KernelError::shape("layer_norm", self.shape(), t.shape()));
            }
        }
        #[cfg(feature = "cuda")]
        if on_gpu("layer_norm", &[Some(self), gamma, beta])? {
            let _timed = cuda::profile::scope(profile::Kernel::LayerNorm, self.device());
            return cuda::layer_norm(self, gamma, beta, eps);
        }
        let g = match gamma {
            Some(t) => Some(t.as_f32()?),
            None => None,
        };
        let b = match beta {
            Some(t) => Some(t.as_f32()?),
            None => None,
        };
        let y = cpu::layer_norm(&self.as_f32()?, d, g.as_deref(), b.as_deref(), eps);
        self.like(self.shape(), y)
    }

    /// RMS normalisation over the last axis: `x / √(mean(x²) + eps) · gamma` (PyTorch `RMSNorm`,
    /// T5's layer norm), statistics in f32 or better.
    pub fn rms_norm(&self, gamma: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        let d = *self.shape().last().unwrap_or(&0);
        if let Some(g) = gamma {
            if g.shape() != [d] {
                return Err(KernelError::shape("rms_norm", self.shape(), g.shape()));
            }
        }
        #[cfg(feature = "cuda")]
        if on_gpu("rms_norm", &[Some(self), gamma])? {
            return cuda::rms_norm(self, gamma, eps);
        }
        let g = match gamma {
            Some(t) => Some(t.as_f32()?),
            None => None,
        };
        let y = cpu::rms_norm(&self.as_f32()?, d, g.as_deref(), eps);
        self.like(self.shape(), y)
    }

    /// Softmax over the last axis (computed in f32, stored in the tensor's dtype).
    pub fn softmax(&self) -> Result<Tensor> {
        let d = *self.shape().last().unwrap_or(&0);
        if d == 0 {
            return Err(KernelError::invalid("softmax", "empty last axis"));
        }
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            return cuda::softmax_rows(self);
        }
        let y = cpu::softmax_rows(&self.as_f32()?, d);
        self.like(self.shape(), y)
    }

    /// Multi-head softmax attention with scale `1/√dh`, for any number of keys.
    ///
    /// # Shapes
    /// `q: [b, lq, heads·dh]`, `k, v: [b, lk, heads·dh]` → `[b, lq, heads·dh]`.
    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        causal: bool,
    ) -> Result<Tensor> {
        if q.rank() != 3
            || k.rank() != 3
            || k.shape() != v.shape()
            || q.shape()[0] != k.shape()[0]
            || q.shape()[2] != k.shape()[2]
        {
            return Err(KernelError::shape("attention", q.shape(), k.shape()));
        }
        let (b, lq, dm) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        let lk = k.shape()[1];
        if heads == 0 || dm % heads != 0 {
            return Err(KernelError::invalid(
                "attention",
                format!("width {dm} does not split into {heads} heads"),
            ));
        }
        if lk == 0 {
            return Err(KernelError::invalid("attention", "no keys"));
        }
        #[cfg(feature = "cuda")]
        if on_gpu("attention", &[Some(q), Some(k), Some(v)])? {
            let _timed = cuda::profile::scope(profile::Kernel::Attention, q.device());
            return cuda::attention(q, k, v, heads, causal);
        }
        let y = cpu::attention(
            &q.as_f32()?,
            &k.as_f32()?,
            &v.as_f32()?,
            b,
            lq,
            lk,
            heads,
            dm / heads,
            causal,
        );
        q.like(q.shape(), y)
    }

    /// Nearest-neighbour ×2 up-sampling of `[b, c, h, w]`.
    pub fn upsample_nearest2x(&self) -> Result<Tensor> {
        if self.rank() != 4 {
            return Err(KernelError::invalid(
                "upsample_nearest2x",
                format!("needs [b, c, h, w], got {:?}", self.shape()),
            ));
        }
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            let _timed = cuda::profile::scope(profile::Kernel::Upsample, self.device());
            return cuda::upsample_nearest2x(self);
        }
        let s = self.shape();
        let y = cpu::upsample_nearest2x(&self.as_f32()?, s[0] * s[1], s[2], s[3]);
        self.like(&[s[0], s[1], 2 * s[2], 2 * s[3]], y)
    }

    /// Concatenation along `dim`.
    pub fn cat(ts: &[&Tensor], dim: usize) -> Result<Tensor> {
        let first = ts
            .first()
            .ok_or_else(|| KernelError::invalid("cat", "no tensors"))?;
        let rank = first.rank();
        if dim >= rank {
            return Err(KernelError::invalid(
                "cat",
                format!("axis {dim} out of range for {:?}", first.shape()),
            ));
        }
        for t in ts {
            if t.rank() != rank
                || t.shape()[..dim] != first.shape()[..dim]
                || t.shape()[dim + 1..] != first.shape()[dim + 1..]
            {
                return Err(KernelError::shape("cat", first.shape(), t.shape()));
            }
        }
        let outer: usize = first.shape()[..dim].iter().product();
        let inner: usize = first.shape()[dim + 1..].iter().product();
        let total: usize = ts.iter().map(|t| t.shape()[dim]).sum();
        #[cfg(feature = "cuda")]
        if on_gpu("cat", &ts.iter().map(|t| Some(*t)).collect::<Vec<_>>())? {
            let mut shape = first.shape().to_vec();
            shape[dim] = total;
            let _timed = cuda::profile::scope(profile::Kernel::Copy, ts[0].device());
            return cuda::cat(ts, dim, &shape);
        }
        let datas: Vec<_> = ts.iter().map(|t| t.as_f32()).collect::<Result<_>>()?;
        let mut out = Vec::with_capacity(outer * total * inner);
        for o in 0..outer {
            for (t, d) in ts.iter().zip(&datas) {
                let len = t.shape()[dim] * inner;
                out.extend_from_slice(&d[o * len..(o + 1) * len]);
            }
        }
        let mut shape = first.shape().to_vec();
        shape[dim] = total;
        first.like(&shape, out)
    }

    /// Elements `start..start+len` along `dim` (a copy; e.g. a row band of `[b, c, h, w]` on dim 2).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        let size = self.dim(dim)?;
        if start + len > size {
            return Err(KernelError::invalid(
                "narrow",
                format!(
                    "range {start}..{} out of bounds for axis {dim} of {:?}",
                    start + len,
                    self.shape()
                ),
            ));
        }
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            let _timed = cuda::profile::scope(profile::Kernel::Copy, self.device());
            return cuda::narrow(self, dim, start, len);
        }
        let outer: usize = self.shape()[..dim].iter().product();
        let inner: usize = self.shape()[dim + 1..].iter().product();
        let x = self.as_f32()?;
        let mut out = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            let base = o * size * inner + start * inner;
            out.extend_from_slice(&x[base..base + len * inner]);
        }
        let mut shape = self.shape().to_vec();
        shape[dim] = len;
        self.like(&shape, out)
    }

    /// Splits `dim` into `n` equal chunks.
    pub fn chunk(&self, n: usize, dim: usize) -> Result<Vec<Tensor>> {
        let size = self.dim(dim)?;
        if n == 0 || size % n != 0 {
            return Err(KernelError::invalid(
                "chunk",
                format!("axis {dim} of size {size} does not split into {n}"),
            ));
        }
        (0..n)
            .map(|i| self.narrow(dim, i * size / n, size / n))
            .collect()
    }

    /// Reorders the axes (a copy): output axis `i` is input axis `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let rank = self.rank();
        let mut seen = vec![false; rank];
        if perm.len() != rank
            || perm
                .iter()
                .any(|&p| p >= rank || std::mem::replace(&mut seen[p], true))
        {
            return Err(KernelError::invalid(
                "permute",
                format!("{perm:?} is not a permutation of {rank} axes"),
            ));
        }
        let in_strides = contiguous_strides(self.shape());
        let out_shape: Vec<usize> = perm.iter().map(|&p| self.shape()[p]).collect();
        let src_strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            let _timed = cuda::profile::scope(profile::Kernel::Copy, self.device());
            return cuda::permute(self, &out_shape, &src_strides);
        }
        let x = self.as_f32()?;
        let n = self.numel();
        let mut out = Vec::with_capacity(n);
        if rank == 0 || n == 0 {
            return self.like(&out_shape, x.to_vec());
        }
        let inner = out_shape[rank - 1];
        let is = src_strides[rank - 1];
        let mut idx = vec![0usize; rank - 1];
        for _ in 0..n / inner {
            let base: usize = idx.iter().zip(&src_strides).map(|(i, s)| i * s).sum();
            for j in 0..inner {
                out.push(x[base + j * is]);
            }
            for d in (0..rank - 1).rev() {
                idx[d] += 1;
                if idx[d] < out_shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        self.like(&out_shape, out)
    }

    /// `[b, c, h, w]` → `[b, h·w, c]` (image to token sequence).
    pub fn to_tokens(&self) -> Result<Tensor> {
        if self.rank() != 4 {
            return Err(KernelError::invalid(
                "to_tokens",
                format!("needs [b, c, h, w], got {:?}", self.shape()),
            ));
        }
        let s = self.shape();
        self.reshape(&[s[0], s[1], s[2] * s[3]])?
            .permute(&[0, 2, 1])
    }

    /// `[b, h·w, c]` → `[b, c, h, w]` (token sequence back to image).
    pub fn from_tokens(&self, h: usize, w: usize) -> Result<Tensor> {
        if self.rank() != 3 || self.shape()[1] != h * w {
            return Err(KernelError::invalid(
                "from_tokens",
                format!("{:?} is not [b, {h}·{w}, c]", self.shape()),
            ));
        }
        let (b, c) = (self.shape()[0], self.shape()[2]);
        self.permute(&[0, 2, 1])?.reshape(&[b, c, h, w])
    }

    /// Rows of `table: [n, d]` picked by `ids` (any shape, integral values) → `[ids.., d]`.
    pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
        if table.rank() != 2 {
            return Err(KernelError::invalid(
                "embedding",
                format!("table must be [n, d], got {:?}", table.shape()),
            ));
        }
        let (n, d) = (table.shape()[0], table.shape()[1]);
        #[cfg(feature = "cuda")]
        if table.is_cuda() {
            let mut ids_u = Vec::with_capacity(ids.numel());
            for &id in ids.as_f32()?.iter() {
                if id < 0.0 || id as usize >= n {
                    return Err(KernelError::invalid(
                        "embedding",
                        format!("id {id} outside the table of {n} rows"),
                    ));
                }
                ids_u.push(id as u32);
            }
            let _timed = cuda::profile::scope(profile::Kernel::Elementwise, table.device());
            return cuda::embedding(&ids_u, ids.shape(), table);
        }
        let t = table.as_f32()?;
        let mut out = Vec::with_capacity(ids.numel() * d);
        for &id in ids.as_f32()?.iter() {
            let i = id as usize;
            if id < 0.0 || i >= n {
                return Err(KernelError::invalid(
                    "embedding",
                    format!("id {id} outside the table of {n} rows"),
                ));
            }
            out.extend_from_slice(&t[i * d..(i + 1) * d]);
        }
        let mut shape = ids.shape().to_vec();
        shape.push(d);
        table.like(&shape, out)
    }

    /// Sinusoidal embedding of `[b]` timesteps as diffusers' `get_timestep_embedding` (f32 math).
    ///
    /// # Shapes
    /// `self: [b]` (or 0-d) → `[b, dim]`.
    pub fn timestep_embedding(
        &self,
        dim: usize,
        flip_sin_to_cos: bool,
        downscale_freq_shift: f32,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            let _timed = cuda::profile::scope(profile::Kernel::Elementwise, self.device());
            return cuda::timestep_embedding(self, dim, flip_sin_to_cos, downscale_freq_shift);
        }
        let t = self.as_f32()?;
        let half = dim / 2;
        let max_period = 10000f32;
        let freqs: Vec<f32> = (0..half)
            .map(|i| {
                let e = -max_period.ln() * i as f32;
                (e / (half as f32 - downscale_freq_shift)).exp()
            })
            .collect();
        let mut out = Vec::with_capacity(t.len() * dim);
        for &ts in t.iter() {
            let args: Vec<f32> = freqs.iter().map(|&f| ts * f).collect();
            let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
            if flip_sin_to_cos {
                out.extend(cos);
                out.extend(sin);
            } else {
                out.extend(sin);
                out.extend(cos);
            }
            if dim % 2 == 1 {
                out.push(0.0);
            }
        }
        Tensor::from_f32(&[t.len(), dim], out, self.dtype())
    }
}

/// The output shape `[b, co, ho, wo]` of a convolution of an NCHW input of shape `x` (the checks
/// of [`Tensor::conv2d`]).
pub(crate) fn conv2d_out_dims(
    x: &[usize],
    w: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
) -> Result<[usize; 4]> {
    if x.len() != 4 || w.rank() != 4 || x[1] != w.shape()[1] {
        return Err(KernelError::shape("conv2d", x, w.shape()));
    }
    let (b, h, wd) = (x[0], x[2], x[3]);
    let (co, kh, kw) = (w.shape()[0], w.shape()[2], w.shape()[3]);
    let (hp, wp) = (h + p.pad_top + p.pad_bottom, wd + p.pad_left + p.pad_right);
    if p.stride == 0 || hp < kh || wp < kw {
        return Err(KernelError::Shape {
            op: "conv2d",
            lhs: x.to_vec(),
            rhs: w.shape().to_vec(),
            detail: format!(" (input smaller than kernel with padding {p:?})"),
        });
    }
    if let Some(bs) = bias {
        if bs.shape() != [co] {
            return Err(KernelError::shape("conv2d (bias)", w.shape(), bs.shape()));
        }
    }
    Ok([b, co, (hp - kh) / p.stride + 1, (wp - kw) / p.stride + 1])
}

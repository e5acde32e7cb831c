//! The layer factory and the layer traits that model code builds through (PCPP §2: the layers
//! whose computation couples rows: convolution halos §2.2, self-attention §2.3–2.4, group norm
//! §2.6, and the output gather §1.4; and, for the tensor-parallel baseline of §5 `parallelism`,
//! the feed-forward whose hidden units it splits and the channel split of a block's middle
//! channels), plus the serial step driver; the serial layers live in `serial.rs`.

use std::ops::Range;
use std::sync::Arc;

use pcpp_kernels::{KernelError, LayerNormArgs, RowStats, Tensor};

pub use crate::serial::SerialFactory;
pub(crate) use crate::serial::{joint_attend, whole_projected_attention};

/// Errors of the parallel core. Variants name the layer and, where relevant, the rank.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A tensor op failed inside a layer.
    #[error("layer `{layer}`: {source}")]
    Kernel {
        layer: String,
        #[source]
        source: KernelError,
    },
    /// Communication with another rank failed.
    #[error("rank {rank}, layer `{layer}`: {msg}")]
    Comm {
        rank: usize,
        layer: String,
        msg: String,
    },
    /// A configuration that cannot work (empty band, bad portion, ...).
    #[error("{0}")]
    Config(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, CoreError>;

/// Attaches the layer id to a kernel error.
pub trait LayerContext<T> {
    /// Names the layer in the error.
    fn at(self, layer: &str) -> Result<T>;
}

impl<T> LayerContext<T> for std::result::Result<T, KernelError> {
    fn at(self, layer: &str) -> Result<T> {
        self.map_err(|source| CoreError::Kernel {
            layer: layer.to_string(),
            source,
        })
    }
}

/// What a layer needs to know about the current denoising step. Passed down explicitly; layers
/// hold no per-step state of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepCtx {
    /// Denoising step index, from 0.
    pub step: usize,
    /// Whether this step exchanges fresh context synchronously (warm-up, or `--sync-mode full`).
    pub sync: bool,
}

impl StepCtx {
    /// The context of a plain single-rank forward.
    pub fn serial() -> StepCtx {
        StepCtx {
            step: 0,
            sync: true,
        }
    }
}

/// A 2-D convolution on a band (or the whole image).
pub trait Conv2dLayer: Send + Sync {
    /// # Shapes
    /// `[b, ci, rows, w]` → `[b, co, rows/stride, w/stride]`.
    fn forward(&self, ctx: &StepCtx, x: &Tensor) -> Result<Tensor>;

    /// `residual + (forward(x) + plane[:, :, None, None])`, each term optional (a ResNet block's
    /// time-embedding add and skip sum, [`Tensor::conv2d_add`]): layers that run the convolution
    /// here hand the adds to it, so that the GPU adds them in the convolution's output pass.
    ///
    /// # Shapes
    /// `plane: [b, co]`, `residual`: the output's shape.
    fn forward_add(
        &self,
        ctx: &StepCtx,
        x: &Tensor,
        plane: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let y = self.forward(ctx, x)?;
        let y = match plane {
            Some(t) => t
                .reshape(&[t.shape()[0], t.shape()[1], 1, 1])
                .and_then(|t| y.add(&t))
                .at("conv2d (added plane)")?,
            None => y,
        };
        match residual {
            Some(r) => r.add(&y).at("conv2d (added residual)"),
            None => Ok(y),
        }
    }

    /// Whether [`Conv2dLayer::forward_add_nhwc`] reads a channels-last input without first
    /// transposing it (then the group norm before it should write NHWC,
    /// [`GroupNormLayer::forward_nhwc`]). The default is no: callers stay in NCHW.
    fn takes_nhwc(&self) -> bool {
        false
    }

    /// [`Conv2dLayer::forward_add`] of a channels-last input `[b, rows, w, ci]`; the output is
    /// NCHW. The default transposes the input and calls `forward_add`.
    fn forward_add_nhwc(
        &self,
        ctx: &StepCtx,
        x: &Tensor,
        plane: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = x.permute(&[0, 3, 1, 2]).at("conv2d (NHWC input)")?;
        self.forward_add(ctx, &x, plane, residual)
    }

    /// [`Conv2dLayer::forward_add`] of `norm(x)` (with SiLU after it when `silu_after`), the
    /// norm's output handed over in the layout this convolution reads best: channels-last where
    /// it [takes NHWC](Conv2dLayer::takes_nhwc) (the default), or written by the norm straight
    /// into the convolution's own input window (the patch-parallel convolution's stale steps on
    /// the device path).
    fn forward_normed(
        &self,
        ctx: &StepCtx,
        norm: &dyn GroupNormLayer,
        (x, silu_after): (&Tensor, bool),
        plane: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.takes_nhwc() {
            let h = norm.forward_nhwc(ctx, x, silu_after)?;
            self.forward_add_nhwc(ctx, &h, plane, residual)
        } else {
            let h = norm.forward(ctx, x, silu_after)?;
            self.forward_add(ctx, &h, plane, residual)
        }
    }
}

/// Group normalisation, optionally followed by SiLU.
pub trait GroupNormLayer: Send + Sync {
    /// # Shapes
    /// `[b, c, rows, w]` → same.
    fn forward(&self, ctx: &StepCtx, x: &Tensor, silu_after: bool) -> Result<Tensor>;

    /// [`GroupNormLayer::forward`] written channels-last, `[b, rows, w, c]`: the input of a
    /// convolution that [takes NHWC](Conv2dLayer::takes_nhwc). The default transposes the output.
    fn forward_nhwc(&self, ctx: &StepCtx, x: &Tensor, silu_after: bool) -> Result<Tensor> {
        self.forward(ctx, x, silu_after)?
            .permute(&[0, 2, 3, 1])
            .at("group_norm (NHWC output)")
    }

    /// [`GroupNormLayer::forward`] written channels-last into rows `row0 .. row0 + rows` of every
    /// image of `dst: [b, H, w, c]`, a device tensor: a patch-parallel convolution's input window
    /// ([`Conv2dLayer::forward_normed`]). The default normalises, then transposes the rows in.
    fn forward_nhwc_into(
        &self,
        ctx: &StepCtx,
        (x, silu_after): (&Tensor, bool),
        dst: &Tensor,
        row0: usize,
    ) -> Result<()> {
        let y = self.forward(ctx, x, silu_after)?;
        crate::patch::nhwc_rows("group_norm (into a window)", &y, dst, row0)
    }
}

/// Self-attention including its q/k/v and output projections.
pub trait SelfAttentionLayer: Send + Sync {
    /// # Shapes
    /// `x: [b, rows·w, c]` (row-major tokens of the band), `spatial = (rows, w)` → `[b, rows·w, c]`.
    fn forward(&self, ctx: &StepCtx, x: &Tensor, spatial: (usize, usize)) -> Result<Tensor>;

    /// `x + forward(layer_norm(x))` (a transformer block's first half) and the row statistics of
    /// the sum for the layer norm after it. Layers that project here apply the norm as their
    /// projections load `x` (its statistics from `stats` where they describe `x`,
    /// [`Tensor::norm_linear`]) and hand the residual to the output projection as its
    /// accumulator ([`Tensor::linear_add_stats`]). The default normalises, calls `forward`, adds
    /// and leaves no statistics.
    fn forward_norm_add(
        &self,
        ctx: &StepCtx,
        x: &Tensor,
        norm: LayerNormArgs<'_>,
        stats: &RowStats,
        spatial: (usize, usize),
    ) -> Result<(Tensor, RowStats)> {
        let _ = stats;
        let h = x
            .layer_norm(norm.gamma, norm.beta, norm.eps)
            .at("self-attention (norm)")?;
        let y = self.forward(ctx, &h, spatial)?;
        let sum = y.add(x).at("self-attention (residual)")?;
        Ok((sum, RowStats::none()))
    }
}

/// Attention over tokens the model projected itself (a DiT's joint attention, whose q/k/v the
/// model normalises and rotates before attending): the band's image tokens plus optional extra
/// tokens that every rank holds whole and computes fresh (text). Patch parallelism exchanges the
/// image tokens' K/V exactly like [`SelfAttentionLayer`] (PCPP §2.3–2.4: all of it in synchronous
/// steps, the stale window within `portion` in stale ones, none for naive patch); the extra
/// tokens' K/V never travel.
pub trait ProjectedAttentionLayer: Send + Sync {
    /// Scaled dot-product attention of `[extra; image]` queries over `[extra; image window]` keys
    /// and values, heads merged, without an output projection.
    ///
    /// # Shapes
    /// `q, k, v: [b, rows·w, c]` (the band's image tokens, row-major), each of `extra`:
    /// `[b, l_e, c]`, `spatial = (rows, w)` → `[b, l_e + rows·w, c]` (extra tokens first).
    fn forward(
        &self,
        ctx: &StepCtx,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        extra: Option<(&Tensor, &Tensor, &Tensor)>,
        spatial: (usize, usize),
    ) -> Result<Tensor>;
}

/// Where a band sits in its level's grid, for position encodings that need absolute positions
/// (a DiT's RoPE): the band covers rows `top..top + rows` and columns `left..left + cols` of a
/// `height × width` grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BandRect {
    /// First row and column of the band.
    pub top: usize,
    pub left: usize,
    /// The band's size.
    pub rows: usize,
    pub cols: usize,
    /// The whole grid's size at the band's level.
    pub height: usize,
    pub width: usize,
}

/// Finds where this rank's band sits (see [`BandRect`]).
pub trait BandLocator: Send + Sync {
    /// The place of this rank's `rows × cols` band in step `ctx` (naive patch parallelism may cut
    /// columns on some steps). Errors if no band of that size is on this rank's plan.
    fn locate(&self, ctx: &StepCtx, spatial: (usize, usize)) -> Result<BandRect>;
}

/// The locator of a rank that holds the whole image.
struct WholeImage;

impl BandLocator for WholeImage {
    fn locate(&self, _ctx: &StepCtx, (rows, cols): (usize, usize)) -> Result<BandRect> {
        Ok(BandRect {
            top: 0,
            left: 0,
            rows,
            cols,
            height: rows,
            width: cols,
        })
    }
}

/// Turns band outputs back into the whole image (identity when serial).
pub trait GatherLayer: Send + Sync {
    /// # Shapes
    /// `[b, c, rows, w]` → `[b, c, h, w]`.
    fn forward(&self, ctx: &StepCtx, x: &Tensor) -> Result<Tensor>;
}

/// Projection weights of a self-attention layer (PyTorch `Linear` layout `[out, in]`).
#[derive(Debug, Clone)]
pub struct AttentionWeights {
    pub to_q: Tensor,
    pub to_k: Tensor,
    pub to_v: Tensor,
    pub q_bias: Option<Tensor>,
    pub k_bias: Option<Tensor>,
    pub v_bias: Option<Tensor>,
    pub to_out: Tensor,
    pub out_bias: Option<Tensor>,
    /// Number of heads; the head size is the width divided by it.
    pub heads: usize,
}

impl AttentionWeights {
    /// q, k and v of `x` (tokens `[b, l, c]`).
    pub fn qkv(&self, x: &Tensor) -> std::result::Result<(Tensor, Tensor, Tensor), KernelError> {
        Ok((
            x.linear(&self.to_q, self.q_bias.as_ref())?,
            x.linear(&self.to_k, self.k_bias.as_ref())?,
            x.linear(&self.to_v, self.v_bias.as_ref())?,
        ))
    }

    /// The q, k and v projections stacked for one GEMM: `x · [Wq; Wk; Wv]ᵀ + [bq | bk | bv] =
    /// [q | k | v]` (see [`StackedProjection`]).
    pub fn stacked_qkv(&self) -> std::result::Result<StackedProjection, KernelError> {
        StackedProjection::new(&[
            (&self.to_q, self.q_bias.as_ref()),
            (&self.to_k, self.k_bias.as_ref()),
            (&self.to_v, self.v_bias.as_ref()),
        ])
    }

    /// The k and v projections stacked for one GEMM: `[k | v]`.
    pub fn stacked_kv(&self) -> std::result::Result<StackedProjection, KernelError> {
        StackedProjection::new(&[
            (&self.to_k, self.k_bias.as_ref()),
            (&self.to_v, self.v_bias.as_ref()),
        ])
    }

    /// Attention of `q` over `k, v`, then the output projection.
    pub fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> std::result::Result<Tensor, KernelError> {
        Tensor::attention(q, k, v, self.heads, false)?.linear(&self.to_out, self.out_bias.as_ref())
    }
}

/// Linear projections of the same input stacked into one GEMM: `[W₁; W₂; …]` (PyTorch layout,
/// rows stacked) and the biases side by side (zeros for a projection without one, when another
/// has one). Its output is the projections' outputs side by side, `[y₁ | y₂ | …]`; attention
/// reads q, k and v from it in place ([`Tensor::attention_packed`]).
#[derive(Debug, Clone)]
pub struct StackedProjection {
    pub w: Tensor,
    pub bias: Option<Tensor>,
}

impl StackedProjection {
    fn new(parts: &[(&Tensor, Option<&Tensor>)]) -> std::result::Result<Self, KernelError> {
        let ws: Vec<&Tensor> = parts.iter().map(|p| p.0).collect();
        let w = Tensor::cat(&ws, 0)?;
        let bias = if let Some(dt) = parts.iter().find_map(|p| p.1.map(|b| b.dtype())) {
            let bs: Vec<Tensor> = parts
                .iter()
                .map(|(w, b)| match b {
                    Some(b) => Ok((*b).clone()),
                    None => Tensor::zeros_on(&[w.shape()[0]], dt, w.device()),
                })
                .collect::<std::result::Result<_, KernelError>>()?;
            Some(Tensor::cat(&bs.iter().collect::<Vec<_>>(), 0)?)
        } else {
            None
        };
        Ok(StackedProjection { w, bias })
    }

    /// `x · Wᵀ + b`.
    pub fn forward(&self, x: &Tensor) -> std::result::Result<Tensor, KernelError> {
        x.linear(&self.w, self.bias.as_ref())
    }
}

/// A GEGLU feed-forward: `out(h ⊙ gelu(g))` with `[h | g] = proj(x)`.
pub trait FeedForwardLayer: Send + Sync {
    /// # Shapes
    /// `[b, l, dim]` → `[b, l, dim]`.
    fn forward(&self, ctx: &StepCtx, x: &Tensor) -> Result<Tensor>;

    /// `residual + forward(x)` (the transformer block's last residual sum): layers that run the
    /// output projection here hand the residual to its GEMM as the accumulator
    /// ([`Tensor::linear_add`]). The default adds after `forward`.
    fn forward_add(&self, ctx: &StepCtx, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let y = self.forward(ctx, x)?;
        y.add(residual).at("feed-forward (residual)")
    }

    /// `x + forward(layer_norm(x))` and the row statistics of the sum (for the next block's
    /// first norm): the norm's statistics from `stats` where they describe `x` (layers that run
    /// the input projection here apply the norm as it loads `x`,
    /// [`Tensor::norm_linear_geglu`], and the residual is the output projection's accumulator,
    /// [`Tensor::linear_add_stats`]). The default normalises, calls
    /// [`FeedForwardLayer::forward_add`] and leaves no statistics.
    fn forward_norm_add(
        &self,
        ctx: &StepCtx,
        x: &Tensor,
        norm: LayerNormArgs<'_>,
        stats: &RowStats,
    ) -> Result<(Tensor, RowStats)> {
        let _ = stats;
        let h = x
            .layer_norm(norm.gamma, norm.beta, norm.eps)
            .at("feed-forward (norm)")?;
        Ok((self.forward_add(ctx, &h, x)?, RowStats::none()))
    }
}

/// Weights of a GEGLU feed-forward (PyTorch `Linear` layout).
#[derive(Debug, Clone)]
pub struct FeedForwardWeights {
    /// `[2·hidden, dim]`: the first `hidden` rows give the value, the last `hidden` the gate.
    pub proj: Tensor,
    /// `[2·hidden]`.
    pub proj_bias: Option<Tensor>,
    /// `[dim, hidden]`.
    pub out: Tensor,
    /// `[dim]`.
    pub out_bias: Option<Tensor>,
}

/// A block whose middle channels tensor parallelism splits over the ranks of a CFG group
/// (Megatron-style: the first layer's output channels and the last layer's input channels; the
/// baseline of PCPP §5): this rank's share of the channels, a group norm of the share whose
/// statistics span every rank's channels, and the sum of the ranks' partial outputs. The model
/// slices its weights to [`ChannelSplit::share`] and builds the block's other layers through the
/// factory as usual.
pub trait ChannelSplit: Send + Sync {
    /// This rank's middle channels.
    fn share(&self) -> Range<usize>;

    /// Whether this rank adds the last layer's bias (exactly one rank of the group does).
    fn adds_bias(&self) -> bool;

    /// A group norm of this rank's share of the channels (the block's `groups` groups), affine
    /// parameters already sliced to the share.
    fn group_norm(
        &self,
        id: &str,
        eps: f64,
        gamma: Option<Tensor>,
        beta: Option<Tensor>,
    ) -> Result<Arc<dyn GroupNormLayer>>;

    /// The block's output: the sum over the group's ranks of `partial`.
    fn reduce(&self, ctx: &StepCtx, partial: &Tensor) -> Result<Tensor>;
}

struct ComposedFeedForward {
    id: String,
    w: FeedForwardWeights,
}

impl FeedForwardLayer for ComposedFeedForward {
    fn forward(&self, _ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        let id = &self.id;
        x.linear_geglu(&self.w.proj, self.w.proj_bias.as_ref())
            .and_then(|h| h.linear(&self.w.out, self.w.out_bias.as_ref()))
            .at(id)
    }

    fn forward_add(&self, _ctx: &StepCtx, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        x.linear_geglu(&self.w.proj, self.w.proj_bias.as_ref())
            .and_then(|h| h.linear_add(&self.w.out, self.w.out_bias.as_ref(), residual))
            .at(&self.id)
    }

    fn forward_norm_add(
        &self,
        _ctx: &StepCtx,
        x: &Tensor,
        norm: LayerNormArgs<'_>,
        stats: &RowStats,
    ) -> Result<(Tensor, RowStats)> {
        x.norm_linear_geglu(norm, stats, &self.w.proj, self.w.proj_bias.as_ref())
            .and_then(|h| h.linear_add_stats(&self.w.out, self.w.out_bias.as_ref(), x))
            .at(&self.id)
    }
}

/// Builds the spatially coupled layers of a model. Model code calls only this; which parallel
/// scheme runs is the factory's business.
pub trait LayerFactory: Send + Sync {
    /// A convolution with square kernel, `stride` and symmetric zero `padding`. `id` is the layer's
    /// stable path (its weight prefix), used as the stale-cache key.
    fn conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Arc<dyn Conv2dLayer>>;

    /// The input layer, a convolution with square kernel, `stride` and `padding`: its input is the
    /// whole image on every rank; it returns this rank's band of its output grid, which is the
    /// model's level-0 grid that bands are planned in (a DiT's patch embedding is the input layer
    /// with `kernel = stride = p` and no padding).
    fn input_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Arc<dyn Conv2dLayer>>;

    /// [`LayerFactory::conv2d`] for an input `2^up` times finer than the model's level-0 grid in
    /// both directions, e.g. a ControlNet's conditioning image and the first maps of its
    /// conditioning embedding (pixel resolution, `up = 3` for an SDXL latent): a rank's band of
    /// such an input is its level-0 band's rows times `2^up`, and halos are exchanged as at
    /// level 0. `up = 0` is `conv2d`; the default refuses finer inputs.
    fn fine_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        up: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        if up == 0 {
            return self.conv2d(id, weight, bias, stride, padding);
        }
        Err(CoreError::Config(format!(
            "layer `{id}`: this layer factory has no layers for inputs finer than the model's grid"
        )))
    }

    /// [`LayerFactory::input_conv2d`] (whole input on every rank, this rank's band out) whose
    /// output grid is `2^up` times finer than the level-0 grid; see
    /// [`LayerFactory::fine_conv2d`]. `up = 0` is `input_conv2d`; the default refuses finer
    /// outputs.
    fn fine_input_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        up: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        if up == 0 {
            return self.input_conv2d(id, weight, bias, stride, padding);
        }
        Err(CoreError::Config(format!(
            "layer `{id}`: this layer factory has no layers for inputs finer than the model's grid"
        )))
    }

    /// A group norm over `groups` groups with per-channel affine.
    fn group_norm(
        &self,
        id: &str,
        groups: usize,
        eps: f64,
        gamma: Option<Tensor>,
        beta: Option<Tensor>,
    ) -> Result<Arc<dyn GroupNormLayer>>;

    /// Self-attention over the image's tokens.
    fn self_attention(
        &self,
        id: &str,
        weights: AttentionWeights,
    ) -> Result<Arc<dyn SelfAttentionLayer>>;

    /// Attention over q/k/v the model projected (see [`ProjectedAttentionLayer`]).
    fn projected_attention(
        &self,
        id: &str,
        heads: usize,
    ) -> Result<Arc<dyn ProjectedAttentionLayer>>;

    /// Where this rank's band sits, for absolute position encodings. `id` names the asking layer
    /// in errors. The default holds the whole image.
    fn band_locator(&self, id: &str) -> Result<Arc<dyn BandLocator>> {
        let _ = id;
        Ok(Arc::new(WholeImage))
    }

    /// The gather of the model's output bands.
    fn gather(&self, id: &str) -> Result<Arc<dyn GatherLayer>>;

    /// A GEGLU feed-forward. The default runs it whole (it is per token, so a band is fine).
    fn feed_forward(
        &self,
        id: &str,
        weights: FeedForwardWeights,
    ) -> Result<Arc<dyn FeedForwardLayer>> {
        Ok(whole_feed_forward(id, weights))
    }

    /// The channel split of a block with `channels` middle channels in `groups` group-norm
    /// groups (see [`ChannelSplit`]), or `None` when this factory does not split channels (every
    /// mode but tensor parallelism): the model then builds the block whole.
    fn channel_split(
        &self,
        id: &str,
        channels: usize,
        groups: usize,
    ) -> Result<Option<Arc<dyn ChannelSplit>>> {
        let _ = (id, channels, groups);
        Ok(None)
    }
}

/// The feed-forward run whole on this rank (the default of [`LayerFactory::feed_forward`]).
pub fn whole_feed_forward(id: &str, weights: FeedForwardWeights) -> Arc<dyn FeedForwardLayer> {
    Arc::new(ComposedFeedForward {
        id: id.to_string(),
        w: weights,
    })
}

/// How a denoising loop drives the parallel layers: which CFG branch this rank computes, the
/// context of each step, and the start and end of a generation. The pipeline calls only this, so
/// it runs unchanged serially or patch-parallel.
pub trait StepDriver: Send + Sync {
    /// `Some(g)` when the world is split into CFG groups and this rank computes only branch `g`
    /// (0 = unconditional) of the CFG batch; the gather layer then returns both branches stacked
    /// `[uncond; cond]`. `None` when this rank feeds the whole CFG batch to the model.
    fn cfg_branch(&self) -> Option<usize>;

    /// The context of denoising step `step` (from 0).
    fn step_ctx(&self, step: usize) -> StepCtx;

    /// Called before the first step of a generation (clears stale state).
    fn begin_generation(&self) -> Result<()>;

    /// Called after the last step (completes what is in flight).
    fn end_generation(&self) -> Result<()>;

    /// Called after the model's forward of step `step`, inside a CUDA graph that captures the
    /// step: completes (orders before what follows) the communication the step started.
    fn end_step(&self, step: usize) -> Result<()> {
        let _ = step;
        Ok(())
    }

    /// Called after each step's model work was issued (eager or replayed), outside any graph
    /// capture: waits until the step's device work is done, turning communication that never
    /// completes (a lost peer) into an error after the transport's timeout instead of a hang.
    fn step_done(&self, step: usize) -> Result<()> {
        let _ = step;
        Ok(())
    }

    /// Whether step `ctx` does the same work as every other such step of the same parity, with
    /// no host round trip, so that a CUDA graph captured at one of them replays the others (steady
    /// steps of a device-resident run; every step of a serial run). Conservative default: no.
    fn repeats(&self, ctx: &StepCtx) -> bool {
        let _ = ctx;
        false
    }

    /// Called for a step (opened with [`StepDriver::step_ctx`]) that replays a CUDA graph captured
    /// at step `captured` instead of running the model: the driver accounts for what the replay
    /// does without running host code (e.g. the bytes it moves).
    fn replayed(&self, captured: usize) -> Result<()> {
        let _ = captured;
        Ok(())
    }
}

/// The driver of a plain single-rank run: every step synchronous, the whole CFG batch here.
#[derive(Debug, Default, Clone, Copy)]
pub struct SerialDriver;

impl StepDriver for SerialDriver {
    fn cfg_branch(&self) -> Option<usize> {
        None
    }

    fn repeats(&self, _ctx: &StepCtx) -> bool {
        true
    }

    fn step_ctx(&self, step: usize) -> StepCtx {
        StepCtx { step, sync: true }
    }

    fn begin_generation(&self) -> Result<()> {
        Ok(())
    }

    fn end_generation(&self) -> Result<()> {
        Ok(())
    }
}

//! The layer factory and the layer traits that model code builds through (PCPP §2: the layers
//! whose computation couples rows: convolution halos §2.2, self-attention §2.3–2.4, group norm
//! §2.6, and the output gather §1.4; and, for the tensor-parallel baseline of §5 `parallelism`,
//! the feed-forward and the ResNet core whose hidden units and channels it splits), plus their
//! serial implementations.

use std::sync::Arc;

use pcpp_kernels::{Conv2dParams, KernelError, Tensor};

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
}

/// Group normalisation, optionally followed by SiLU.
pub trait GroupNormLayer: Send + Sync {
    /// # Shapes
    /// `[b, c, rows, w]` → same.
    fn forward(&self, ctx: &StepCtx, x: &Tensor, silu_after: bool) -> Result<Tensor>;
}

/// Self-attention including its q/k/v and output projections.
pub trait SelfAttentionLayer: Send + Sync {
    /// # Shapes
    /// `x: [b, rows·w, c]` (row-major tokens of the band), `spatial = (rows, w)` → `[b, rows·w, c]`.
    fn forward(&self, ctx: &StepCtx, x: &Tensor, spatial: (usize, usize)) -> Result<Tensor>;
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

/// A GEGLU feed-forward: `out(h ⊙ gelu(g))` with `[h | g] = proj(x)`.
pub trait FeedForwardLayer: Send + Sync {
    /// # Shapes
    /// `[b, l, dim]` → `[b, l, dim]`.
    fn forward(&self, ctx: &StepCtx, x: &Tensor) -> Result<Tensor>;
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

/// The inner part of a ResNet block: `conv2(silu(norm2(conv1(h) + temb_proj(t))))`.
pub trait ResnetCoreLayer: Send + Sync {
    /// `h` is the block input after `norm1` and SiLU; `temb` the time embedding after SiLU.
    /// Returns the residual branch (before the skip connection is added).
    ///
    /// # Shapes
    /// `h: [b, ci, rows, w]`, `temb: [b, t]` → `[b, co, rows, w]`.
    fn forward(&self, ctx: &StepCtx, h: &Tensor, temb: &Tensor) -> Result<Tensor>;
}

/// A convolution's id and weights (3×3, stride 1, padding 1 in a ResNet core).
#[derive(Debug, Clone)]
pub struct ConvWeights {
    /// Stable path of the layer.
    pub id: String,
    /// `[co, ci, k, k]`.
    pub weight: Tensor,
    /// `[co]`.
    pub bias: Option<Tensor>,
}

/// Weights of a ResNet core (see [`ResnetCoreLayer`]).
#[derive(Debug, Clone)]
pub struct ResnetCoreWeights {
    /// First convolution, `ci → co`.
    pub conv1: ConvWeights,
    /// Time-embedding projection `[co, t]` and its bias `[co]`.
    pub temb: Tensor,
    pub temb_bias: Option<Tensor>,
    /// Second group norm: id, groups, eps, affine `[co]`.
    pub norm2_id: String,
    pub groups: usize,
    pub eps: f64,
    pub norm2_gamma: Option<Tensor>,
    pub norm2_beta: Option<Tensor>,
    /// Second convolution, `co → co`.
    pub conv2: ConvWeights,
}

struct ComposedFeedForward {
    id: String,
    w: FeedForwardWeights,
}

impl FeedForwardLayer for ComposedFeedForward {
    fn forward(&self, _ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        let id = &self.id;
        x.linear(&self.w.proj, self.w.proj_bias.as_ref())
            .and_then(|h| h.geglu())
            .and_then(|h| h.linear(&self.w.out, self.w.out_bias.as_ref()))
            .at(id)
    }
}

struct ComposedResnetCore {
    id: String,
    conv1: Arc<dyn Conv2dLayer>,
    temb: Tensor,
    temb_bias: Option<Tensor>,
    norm2: Arc<dyn GroupNormLayer>,
    conv2: Arc<dyn Conv2dLayer>,
}

impl ResnetCoreLayer for ComposedResnetCore {
    fn forward(&self, ctx: &StepCtx, h: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let id = &self.id;
        let h = self.conv1.forward(ctx, h)?;
        let t = temb.linear(&self.temb, self.temb_bias.as_ref()).at(id)?;
        let (b, c) = (t.shape()[0], t.shape()[1]);
        let h = h.add(&t.reshape(&[b, c, 1, 1]).at(id)?).at(id)?;
        let h = self.norm2.forward(ctx, &h, true)?;
        self.conv2.forward(ctx, &h)
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

    /// The first convolution: its input is the whole image on every rank; it returns this rank's band.
    fn input_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        padding: usize,
    ) -> Result<Arc<dyn Conv2dLayer>>;

    /// [`LayerFactory::conv2d`] for an input `2^up` times finer than the model's latent grid in
    /// both directions, e.g. a ControlNet's conditioning image and the first maps of its
    /// conditioning embedding (pixel resolution, `up = 3`): a rank's band of such an input is its
    /// latent band's rows times `2^up`, and halos are exchanged as at the latent. `up = 0` is
    /// `conv2d`; the default refuses finer inputs.
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
            "layer `{id}`: this layer factory has no layers for inputs finer than the latent"
        )))
    }

    /// [`LayerFactory::input_conv2d`] (whole input on every rank, this rank's band out, stride 1)
    /// for an input `2^up` times finer than the latent grid; see [`LayerFactory::fine_conv2d`].
    fn fine_input_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        padding: usize,
        up: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        if up == 0 {
            return self.input_conv2d(id, weight, bias, padding);
        }
        Err(CoreError::Config(format!(
            "layer `{id}`: this layer factory has no layers for inputs finer than the latent"
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

    /// The core of a ResNet block. The default builds its two convolutions and its group norm
    /// through this factory (in the order conv1, norm2, conv2) and runs them in sequence.
    fn resnet_core(&self, id: &str, w: ResnetCoreWeights) -> Result<Arc<dyn ResnetCoreLayer>> {
        composed_resnet_core(self, id, w)
    }
}

/// The feed-forward run whole on this rank (the default of [`LayerFactory::feed_forward`]).
pub fn whole_feed_forward(id: &str, weights: FeedForwardWeights) -> Arc<dyn FeedForwardLayer> {
    Arc::new(ComposedFeedForward {
        id: id.to_string(),
        w: weights,
    })
}

/// A ResNet core whose convolutions and group norm are built through `f` (the default of
/// [`LayerFactory::resnet_core`]).
pub fn composed_resnet_core<F: LayerFactory + ?Sized>(
    f: &F,
    id: &str,
    w: ResnetCoreWeights,
) -> Result<Arc<dyn ResnetCoreLayer>> {
    let conv1 = f.conv2d(&w.conv1.id, w.conv1.weight, w.conv1.bias, 1, 1)?;
    let norm2 = f.group_norm(&w.norm2_id, w.groups, w.eps, w.norm2_gamma, w.norm2_beta)?;
    let conv2 = f.conv2d(&w.conv2.id, w.conv2.weight, w.conv2.bias, 1, 1)?;
    Ok(Arc::new(ComposedResnetCore {
        id: id.to_string(),
        conv1,
        temb: w.temb,
        temb_bias: w.temb_bias,
        norm2,
        conv2,
    }))
}

/// Plain single-rank layers.
#[derive(Debug, Default, Clone, Copy)]
pub struct SerialFactory;

struct SerialConv {
    id: String,
    weight: Tensor,
    bias: Option<Tensor>,
    params: Conv2dParams,
}

impl Conv2dLayer for SerialConv {
    fn forward(&self, _ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        x.conv2d(&self.weight, self.bias.as_ref(), self.params)
            .at(&self.id)
    }
}

struct SerialGroupNorm {
    id: String,
    groups: usize,
    eps: f64,
    gamma: Option<Tensor>,
    beta: Option<Tensor>,
}

impl GroupNormLayer for SerialGroupNorm {
    fn forward(&self, _ctx: &StepCtx, x: &Tensor, silu_after: bool) -> Result<Tensor> {
        x.group_norm(
            self.groups,
            self.gamma.as_ref(),
            self.beta.as_ref(),
            self.eps,
            silu_after,
        )
        .at(&self.id)
    }
}

struct SerialAttention {
    id: String,
    w: AttentionWeights,
}

impl SelfAttentionLayer for SerialAttention {
    fn forward(&self, _ctx: &StepCtx, x: &Tensor, _spatial: (usize, usize)) -> Result<Tensor> {
        let (q, k, v) = self.w.qkv(x).at(&self.id)?;
        self.w.attend(&q, &k, &v).at(&self.id)
    }
}

struct Identity;

impl GatherLayer for Identity {
    fn forward(&self, _ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
}

impl LayerFactory for SerialFactory {
    fn conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        Ok(Arc::new(SerialConv {
            id: id.to_string(),
            weight,
            bias,
            params: Conv2dParams::new(stride, padding),
        }))
    }

    fn input_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        padding: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        self.conv2d(id, weight, bias, 1, padding)
    }

    fn fine_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        _up: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        self.conv2d(id, weight, bias, stride, padding)
    }

    fn fine_input_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        padding: usize,
        _up: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        self.conv2d(id, weight, bias, 1, padding)
    }

    fn group_norm(
        &self,
        id: &str,
        groups: usize,
        eps: f64,
        gamma: Option<Tensor>,
        beta: Option<Tensor>,
    ) -> Result<Arc<dyn GroupNormLayer>> {
        Ok(Arc::new(SerialGroupNorm {
            id: id.to_string(),
            groups,
            eps,
            gamma,
            beta,
        }))
    }

    fn self_attention(
        &self,
        id: &str,
        weights: AttentionWeights,
    ) -> Result<Arc<dyn SelfAttentionLayer>> {
        Ok(Arc::new(SerialAttention {
            id: id.to_string(),
            w: weights,
        }))
    }

    fn gather(&self, _id: &str) -> Result<Arc<dyn GatherLayer>> {
        Ok(Arc::new(Identity))
    }
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

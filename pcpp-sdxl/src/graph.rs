//! CUDA graphs of the denoising step (PCPP §7.1): the steady UNet step (with its ControlNets, if
//! any) captured once per step parity and kind and replayed.
//!
//! The patch-parallel runtime keeps every stale buffer a step reads or writes in persistent
//! per-parity device memory, so a step captured at parity `p` stays valid for every later step of
//! parity `p` (this is the fix of the reference code's graphs, whose receive buffers were allocated
//! during capture and froze the neighbours' context). Inputs are copied into fixed device buffers
//! before each replay and the output is read from a fixed buffer; the step's communication is
//! captured on the communication stream and joined by [`StepDriver::end_step`] inside the capture.

use pcpp_core::{StepCtx, StepDriver};
use pcpp_kernels::Tensor;

use crate::controlnet::{unet_step, ControlStep};
use crate::unet::{UNet, UNetCond};
use crate::{Result, SdxlError};

/// What distinguishes one kind of step from another: the ControlNets that run and their scales
/// (empty: the UNet alone).
type Key = Vec<(usize, u32)>;

/// The graphs of one kind of step, with the count of its eager steady steps.
#[derive(Default)]
struct Variant {
    key: Key,
    steady_eager: usize,
    #[cfg(feature = "cuda")]
    graphs: [Option<(usize, pcpp_kernels::cuda::CudaGraphStep)>; 2],
}

/// The steady step as CUDA graphs, one per step parity (the stale cache's buffer of step `t` is
/// `t mod 2`) and per kind of step (a step with ControlNets captures them with the UNet; each
/// distinct set of nets and effective scales is its own kind, so a control window that opens or
/// closes mid-run switches graphs, and two eager steady steps of the new kind run before its
/// capture), with the input and output buffers they read and write.
#[derive(Default)]
pub struct StepGraphs {
    enabled: bool,
    variants: Vec<Variant>,
    #[cfg(feature = "cuda")]
    io: Option<(Tensor, Tensor, Tensor)>,
}

impl StepGraphs {
    /// Graphs replace eager steps only when `enabled` (a run on a GPU that asked for them).
    pub fn new(enabled: bool) -> StepGraphs {
        StepGraphs {
            enabled,
            ..StepGraphs::default()
        }
    }

    fn variant(&mut self, key: Key) -> usize {
        match self.variants.iter().position(|v| v.key == key) {
            Some(i) => i,
            None => {
                self.variants.push(Variant {
                    key,
                    ..Variant::default()
                });
                self.variants.len() - 1
            }
        }
    }

    /// One denoising step of the loop without ControlNets: [`StepGraphs::run_with`].
    pub fn run(
        &mut self,
        unet: &UNet,
        driver: &dyn StepDriver,
        ctx: &StepCtx,
        x: &Tensor,
        ts: &Tensor,
        cond: &UNetCond,
    ) -> Result<Tensor> {
        self.run_with(unet, None, driver, ctx, x, ts, cond)
    }

    /// One denoising step of the loop, opened with `driver.step_ctx`: the ControlNets of
    /// `control` (if any) and the UNet, eager (then [`StepDriver::end_step`]) until two steps of
    /// this kind that [`StepDriver::repeats`] have run, then replayed from the graph of the
    /// step's kind and parity (so the runtime's persistent buffers of both parities exist before
    /// any capture). Ends with [`StepDriver::step_done`], outside any capture.
    #[allow(clippy::too_many_arguments)]
    pub fn run_with(
        &mut self,
        unet: &UNet,
        control: Option<&ControlStep<'_>>,
        driver: &dyn StepDriver,
        ctx: &StepCtx,
        x: &Tensor,
        ts: &Tensor,
        cond: &UNetCond,
    ) -> Result<Tensor> {
        let v = self.variant(control.map(ControlStep::key).unwrap_or_default());
        let repeats = driver.repeats(ctx);
        let out = if self.enabled && repeats && self.variants[v].steady_eager >= 2 {
            self.replay(v, unet, control, driver, ctx, x, ts, cond)?
        } else {
            let out = unet_step(unet, control, ctx, x, ts, cond)?;
            driver.end_step(ctx.step)?;
            if repeats {
                self.variants[v].steady_eager += 1;
            }
            out
        };
        driver.step_done(ctx.step)?;
        Ok(out)
    }

    /// The UNet output of step `ctx.step` (opened with `driver.step_ctx`), from the graph of its
    /// parity, which is captured on first use. `x` and `ts` (on the UNet's GPU) are copied into
    /// the graph's input buffers; `cond` must already be on that GPU (a capture cannot upload host
    /// data). The returned tensor is the graph's output buffer: read it before the next step.
    ///
    /// Call it only for steps whose schedule repeats (steady steps, after two of them ran eagerly
    /// so that the runtime's persistent buffers of both parities exist); [`StepGraphs::run`]
    /// decides that for a denoising loop.
    pub fn step(
        &mut self,
        unet: &UNet,
        driver: &dyn StepDriver,
        ctx: &StepCtx,
        x: &Tensor,
        ts: &Tensor,
        cond: &UNetCond,
    ) -> Result<Tensor> {
        let v = self.variant(Key::new());
        self.replay(v, unet, None, driver, ctx, x, ts, cond)
    }

    /// [`StepGraphs::step`] for the step kind `v` (with `control`'s nets captured before the UNet).
    #[allow(clippy::too_many_arguments)]
    fn replay(
        &mut self,
        v: usize,
        unet: &UNet,
        control: Option<&ControlStep<'_>>,
        driver: &dyn StepDriver,
        ctx: &StepCtx,
        x: &Tensor,
        ts: &Tensor,
        cond: &UNetCond,
    ) -> Result<Tensor> {
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (v, unet, control, driver, ctx, x, ts, cond);
            Err(SdxlError::Input(
                "CUDA graphs need a build with the `cuda` feature".into(),
            ))
        }
        #[cfg(feature = "cuda")]
        {
            use pcpp_kernels::cuda::{capture_graph, copy_into};
            use pcpp_kernels::{Device, KernelError};
            let Device::Cuda(ordinal) = x.device() else {
                return Err(SdxlError::Input(format!(
                    "CUDA graphs need the step's input on a GPU, it is on {}",
                    x.device()
                )));
            };
            if self.io.is_none() {
                // The gathered noise prediction has the input's shape, with both CFG branches when
                // the ranks are split by branch.
                let mut oshape = x.shape().to_vec();
                if driver.cfg_branch().is_some() {
                    oshape[0] *= 2;
                }
                self.io = Some((
                    Tensor::zeros_on(x.shape(), x.dtype(), x.device())?,
                    Tensor::zeros_on(ts.shape(), ts.dtype(), ts.device())?,
                    Tensor::zeros_on(&oshape, x.dtype(), x.device())?,
                ));
            }
            let Some((xb, tb, ob)) = &self.io else {
                return Err(SdxlError::Input("graph buffers missing".into()));
            };
            copy_into(x, xb)?;
            copy_into(ts, tb)?;
            let p = ctx.step % 2;
            match &self.variants[v].graphs[p] {
                Some((captured, g)) => {
                    driver.replayed(*captured)?;
                    g.replay()?;
                }
                None => {
                    let fail = |op: &'static str, e: String| KernelError::Invalid { op, msg: e };
                    let g = capture_graph(ordinal, || {
                        let o = unet_step(unet, control, ctx, xb, tb, cond)
                            .map_err(|e| fail("UNet step under graph capture", e.to_string()))?;
                        driver
                            .end_step(ctx.step)
                            .map_err(|e| fail("end of step under graph capture", e.to_string()))?;
                        copy_into(&o, ob)
                    })?;
                    g.replay()?;
                    self.variants[v].graphs[p] = Some((ctx.step, g));
                }
            }
            Ok(ob.clone())
        }
    }
}

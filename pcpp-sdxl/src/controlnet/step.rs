//! How ControlNets take part in the denoising loop, as diffusers'
//! `StableDiffusionXLControlNetPipeline.__call__` (0.42.1) does it: the control image in `[0, 1]`
//! (its `VaeImageProcessor` with `do_normalize=False`) repeated for the CFG batch (`guess_mode`
//! off), each net's conditioning scale times its `keep` of the step
//! (`1 − float(i/n < start or (i+1)/n > end)`), the nets' residuals summed
//! (`MultiControlNetModel`) and handed to the UNet.
//!
//! A net runs every step up to its last step with `keep = 1` — with scale 0 before its window
//! opens, as diffusers runs it, which also keeps its stale context (PCPP §7.1) one step old when
//! the window opens — and not after it.

use pcpp_core::{DenoiseModel, StepCtx};
use pcpp_kernels::{DType, Device, Tensor};

use super::ControlNet;
use crate::error::{Result, SdxlError};
use crate::unet::{ControlResiduals, UNet, UNetCond};

/// When and how strongly one ControlNet acts: diffusers' `controlnet_conditioning_scale`,
/// `control_guidance_start` and `control_guidance_end`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlGuidance {
    /// Multiplies the residuals.
    pub scale: f32,
    /// Fraction of the steps before which the net does not act.
    pub start: f64,
    /// Fraction of the steps after which the net does not act.
    pub end: f64,
}

impl Default for ControlGuidance {
    fn default() -> ControlGuidance {
        ControlGuidance {
            scale: 1.0,
            start: 0.0,
            end: 1.0,
        }
    }
}

impl ControlGuidance {
    /// Errors (as diffusers' `check_inputs`) unless the scale is finite and
    /// `0 ≤ start < end ≤ 1`.
    pub fn validate(&self) -> Result<()> {
        if !self.scale.is_finite() {
            return Err(SdxlError::Input(format!(
                "control scale {} is not a finite number",
                self.scale
            )));
        }
        if !(self.start >= 0.0 && self.start < self.end && self.end <= 1.0) {
            return Err(SdxlError::Input(format!(
                "control start {} and end {} must satisfy 0 ≤ start < end ≤ 1",
                self.start, self.end
            )));
        }
        Ok(())
    }

    /// diffusers' `controlnet_keep` of step `i` of `n`: 0 when `i/n < start` or
    /// `(i+1)/n > end`, else 1 (in f64, as Python compares them).
    pub fn keep(&self, i: usize, n: usize) -> f32 {
        let n = n as f64;
        if (i as f64) / n < self.start || (i as f64 + 1.0) / n > self.end {
            0.0
        } else {
            1.0
        }
    }

    /// The last step of `n` with `keep = 1`, if any.
    pub fn last_active(&self, n: usize) -> Option<usize> {
        (0..n).rev().find(|&i| self.keep(i, n) > 0.0)
    }
}

/// One ControlNet of a generation with its control image and guidance.
#[derive(Clone, Copy)]
pub struct ControlUnit<'a> {
    /// The net.
    pub net: &'a ControlNet,
    /// The control image `[1, 3, H, W]` in `[0, 1]` at the output size
    /// ([`control_image_from_rgb8`]).
    pub image: &'a Tensor,
    /// Its scale and window.
    pub guidance: ControlGuidance,
}

/// A control image with its guidance, for one ControlNet of [`crate::Generator`].
#[derive(Debug, Clone)]
pub struct ControlInput {
    /// `[1, 3, H, W]` in `[0, 1]` at the output size ([`control_image_from_rgb8`]).
    pub image: Tensor,
    /// Its scale and window.
    pub guidance: ControlGuidance,
}

/// The ControlNets of a generation (several: diffusers' `MultiControlNetModel`).
#[derive(Clone, Default)]
pub struct Control<'a> {
    /// In the order their residuals are summed.
    pub units: Vec<ControlUnit<'a>>,
}

/// A control image `[1, 3, height, width]` in `[0, 1]` (`byte / 255`, as diffusers' control
/// image processor, which does not normalise to `[-1, 1]`) from packed RGB bytes.
pub fn control_image_from_rgb8(rgb: &[u8], height: usize, width: usize) -> Result<Tensor> {
    if rgb.len() != height * width * 3 {
        return Err(SdxlError::Input(format!(
            "control image has {} bytes, expected {height}×{width}×3",
            rgb.len()
        )));
    }
    let plane = height * width;
    let mut v = vec![0.0f32; 3 * plane];
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for (c, &b) in px.iter().enumerate() {
            v[c * plane + i] = f32::from(b) / 255.0;
        }
    }
    Ok(Tensor::from_vec(&[1, 3, height, width], v)?)
}

struct Prepared<'a> {
    index: usize,
    net: &'a ControlNet,
    image: Tensor,
    cond: UNetCond,
    guidance: ControlGuidance,
    last: Option<usize>,
}

/// A generation's ControlNets with their images on the device, for the denoising loop.
pub(crate) struct PreparedControl<'a> {
    units: Vec<Prepared<'a>>,
    steps: usize,
}

impl<'a> Control<'a> {
    /// Checks every net against `unet` and prepares its image (`batch` rows, `latent` size) and
    /// its own conditioning (own cross-attention K/V cache) from `cond`'s tensors, for a loop of
    /// `steps` steps.
    pub(crate) fn prepare(
        &self,
        unet: &UNet,
        cond: &UNetCond,
        latent: (usize, usize),
        steps: usize,
    ) -> Result<PreparedControl<'a>> {
        let (dtype, device): (DType, Device) = (unet.dtype(), unet.device());
        let batch = cond.encoder_hidden_states.shape()[0];
        let units = self
            .units
            .iter()
            .enumerate()
            .map(|(index, u)| {
                u.guidance.validate().map_err(|e| {
                    SdxlError::Input(format!("ControlNet {}: {e}", u.net.dir().display()))
                })?;
                u.net.check_fits(unet)?;
                Ok(Prepared {
                    index,
                    net: u.net,
                    image: u.net.prepare_image(u.image, batch, latent, dtype, device)?,
                    cond: UNetCond::new(
                        cond.encoder_hidden_states.clone(),
                        cond.text_embeds.clone(),
                        cond.time_ids.clone(),
                    ),
                    guidance: u.guidance,
                    last: u.guidance.last_active(steps),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PreparedControl { units, steps })
    }
}

impl PreparedControl<'_> {
    /// The nets that run at step `i` (of the loop's steps), with their scales; `None` when none
    /// does.
    pub(crate) fn step(&self, i: usize) -> Option<ControlStep<'_>> {
        let nets: Vec<_> = self
            .units
            .iter()
            .filter(|u| u.last.is_some_and(|l| i <= l))
            .map(|u| {
                let scale = u.guidance.scale * u.guidance.keep(i, self.steps);
                (u.index, u.net, &u.image, &u.cond, scale)
            })
            .collect();
        (!nets.is_empty()).then_some(ControlStep { nets })
    }
}

/// The ControlNets of one denoising step with their images, conditioning and effective scales.
pub struct ControlStep<'a> {
    nets: Vec<(usize, &'a ControlNet, &'a Tensor, &'a UNetCond, f32)>,
}

impl ControlStep<'_> {
    /// What distinguishes this step's control work from another's (which nets run, at which
    /// scales; one `index << 32 | scale bits` per net): steps with equal keys can replay one
    /// CUDA graph.
    pub fn key(&self) -> Vec<u64> {
        self.nets
            .iter()
            .map(|n| (n.0 as u64) << 32 | u64::from(n.4.to_bits()))
            .collect()
    }

    /// The summed residuals of the nets for the UNet input `x` at timesteps `ts`.
    pub fn residuals(&self, ctx: &StepCtx, x: &Tensor, ts: &Tensor) -> Result<ControlResiduals> {
        let mut sum: Option<ControlResiduals> = None;
        for (_, net, image, cond, scale) in &self.nets {
            let r = net.forward(ctx, x, ts, cond, image, *scale, None)?;
            sum = Some(match sum {
                Some(s) => s.add(&r)?,
                None => r,
            });
        }
        sum.ok_or_else(|| SdxlError::Input("internal: a control step without nets".into()))
    }
}

/// The UNet with a generation's ControlNets, as the core's denoising loop drives it
/// ([`DenoiseModel`]): at loop step `ctx.step` the nets whose window reaches it run first (on the
/// same input, conditioning and step context) and the UNet adds their summed residuals to its
/// skip connections. A step's [`DenoiseModel::graph_key`] is its nets and scales, so each
/// distinct set is captured as its own CUDA graph (with the UNet) and a window that opens or
/// closes mid-run switches graphs.
pub(crate) struct ControlledUNet<'a> {
    pub(crate) unet: &'a UNet,
    pub(crate) control: PreparedControl<'a>,
}

impl DenoiseModel for ControlledUNet<'_> {
    type Cond = UNetCond;
    type Error = SdxlError;

    fn device(&self) -> Device {
        self.unet.device()
    }

    fn dtype(&self) -> DType {
        self.unet.dtype()
    }

    fn forward(&self, ctx: &StepCtx, x: &Tensor, t: &Tensor, cond: &UNetCond) -> Result<Tensor> {
        let res = self
            .control
            .step(ctx.step)
            .map(|c| c.residuals(ctx, x, t))
            .transpose()?;
        self.unet.forward_with(ctx, x, t, cond, res.as_ref(), None)
    }

    fn graph_key(&self, ctx: &StepCtx) -> Vec<u64> {
        self.control
            .step(ctx.step)
            .map(|c| c.key())
            .unwrap_or_default()
    }
}

//! SDXL's side of the denoising loop (diffusers' `StableDiffusionXLPipeline.__call__` between
//! prompt encoding and decoding): `generate` runs it, and so does every benchmark that times a
//! whole image. The loop itself is the core's model-independent [`denoise_loop`]; here the UNet
//! is its [`DenoiseModel`], a [`Scheduler`] its [`Sampler`], and SDXL's inputs (prompt embeddings
//! and micro-conditioning, text-to-image noise or an image-to-image start, the per-step noise of
//! ancestral sampling) are checked and prepared. With ControlNets the model is the UNet with its
//! nets (`StableDiffusionXLControlNetPipeline`), one model to the loop and to its CUDA graphs.
//!
//! The loop is written against [`StepDriver`] (PCPP §1.1, §1.4, §4): it asks the driver for each
//! step's context (synchronous warm-up or stale), and with CFG split it feeds only this rank's
//! branch to the UNet, whose gather layer returns both branches. Serially the driver is
//! [`SerialDriver`](pcpp_core::SerialDriver) and the loop is exactly diffusers'. On a GPU the
//! latents, the scheduler and the guidance stay on the device (PCPP §7.1: steady steps replay as
//! CUDA graphs).

use pcpp_core::{denoise_loop, DenoiseModel, LoopOptions, Sampler, StepCtx, StepDriver};
use pcpp_kernels::{DType, Device, Tensor};

use crate::controlnet::{Control, ControlledUNet};
use crate::error::{Result, SdxlError};
use crate::pipeline::{MicroCond, PromptEmbeds};
use crate::scheduler::{self, Scheduler, SchedulerConfig, SchedulerKind};
use crate::unet::{UNet, UNetCond};

/// What the denoising loop needs besides the model.
#[derive(Debug, Clone)]
pub struct DenoiseParams {
    /// Number of inference steps.
    pub steps: usize,
    /// Classifier-free guidance scale; CFG runs when it is > 1.
    pub guidance: f32,
    /// Which sampler.
    pub scheduler: SchedulerKind,
    /// SDXL micro-conditioning.
    pub micro: MicroCond,
    /// On a GPU, replay steady steps as CUDA graphs (one per step parity, captured after two
    /// eager steady steps; [`pcpp_core::StepGraphs`]). Ignored on the CPU.
    pub cuda_graphs: bool,
}

/// What a denoising run returns.
#[derive(Debug, Clone)]
pub struct Denoised {
    /// The final latents `[1, c, h, w]`, `f32` on the UNet's device.
    pub latents: Tensor,
    /// Seconds each step that ran took on the host (eager launch or graph replay; a GPU step's
    /// time shows here only once the queue is full).
    pub step_seconds: Vec<f64>,
}

impl DenoiseParams {
    /// Whether classifier-free guidance runs (diffusers: `guidance_scale > 1`).
    pub fn cfg(&self) -> bool {
        self.guidance > 1.0
    }
}

/// Per-step progress: `(step just finished, total steps)`.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

/// Where the denoising loop starts.
#[derive(Debug, Clone, Copy)]
pub enum DenoiseStart<'a> {
    /// Text-to-image: unit Gaussian noise `[1, c, h, w]`, scaled by the scheduler's
    /// `init_noise_sigma`; all steps run.
    Noise(&'a Tensor),
    /// Image-to-image (diffusers' `StableDiffusionXLImg2ImgPipeline`): the clean (scaled) latents
    /// of the init image `[1, c, h, w]` are noised with `noise` (same shape) to the level of the
    /// first step kept, and only the last `⌊steps · strength⌋` steps run
    /// ([`img2img_start_step`]).
    Image {
        /// Encoded init image, already multiplied by the VAE's scaling factor.
        latents: &'a Tensor,
        /// Unit Gaussian noise of the same shape.
        noise: &'a Tensor,
        /// Denoising strength in (0, 1]: the fraction of the schedule that runs.
        strength: f32,
    },
}

/// Where a stochastic sampler (Euler ancestral) gets its per-step noise.
#[derive(Debug, Clone)]
pub enum StepNoise {
    /// Derived from the initial noise (reproducible, and identical on every rank since every rank
    /// starts from the same initial noise): see [`derived_step_noise`].
    Derived,
    /// Given per step (index = step index of the full schedule), e.g. a diffusers generator's
    /// stream for parity; each `[1, c, h, w]`.
    Given(Vec<Tensor>),
}

/// The per-step noise of [`StepNoise::Derived`]: ChaCha8 seeded with the 64-bit FNV-1a hash of the
/// initial noise's `f32` bit patterns (little-endian), stream `step + 1`, drawing `len` values from
/// `rand_distr`'s `StandardNormal` as `f32` (the same normal sampler as the CLI's seeded noise).
pub fn derived_step_noise(initial: &[f32], step: usize, len: usize) -> Vec<f32> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for v in initial {
        for b in v.to_bits().to_le_bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(hash);
    rng.set_stream(step as u64 + 1);
    (0..len).map(|_| StandardNormal.sample(&mut rng)).collect()
}

/// The first step an image-to-image run executes for `steps` steps at `strength`
/// (diffusers: `t_start = steps − min(⌊steps · strength⌋, steps)`). An error when no step would
/// run or `strength` is outside (0, 1].
pub fn img2img_start_step(steps: usize, strength: f32) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(SdxlError::Input(format!(
            "strength {strength} must be in (0, 1]"
        )));
    }
    let init = ((steps as f64 * f64::from(strength)) as usize).min(steps);
    if init == 0 {
        return Err(SdxlError::Input(format!(
            "strength {strength} with {steps} steps runs no denoising step (needs steps · strength ≥ 1)"
        )));
    }
    Ok(steps - init)
}

/// [`denoise_with`] for text-to-image from unit Gaussian `noise` `[1, c, h, w]`: the final latents.
pub fn denoise(
    unet: &UNet,
    driver: &dyn StepDriver,
    sched_cfg: &SchedulerConfig,
    params: &DenoiseParams,
    embeds: &PromptEmbeds,
    noise: &Tensor,
    progress: Progress<'_>,
) -> Result<Tensor> {
    let start = DenoiseStart::Noise(noise);
    denoise_with(
        unet,
        None,
        driver,
        sched_cfg,
        params,
        embeds,
        &start,
        &StepNoise::Derived,
        progress,
    )
    .map(|d| d.latents)
}

/// The UNet as the loop's model: one forward of the (CFG) batch.
impl DenoiseModel for UNet {
    type Cond = UNetCond;
    type Error = SdxlError;

    fn device(&self) -> Device {
        UNet::device(self)
    }

    fn dtype(&self) -> DType {
        UNet::dtype(self)
    }

    fn forward(&self, ctx: &StepCtx, x: &Tensor, t: &Tensor, cond: &UNetCond) -> Result<Tensor> {
        UNet::forward(self, ctx, x, t, cond, None)
    }
}

/// A [`Scheduler`] as the loop's [`Sampler`]; its errors name the scheduler.
struct SchedulerSampler<'a>(&'a mut dyn Scheduler);

fn sched_err(e: scheduler::SchedulerError) -> SdxlError {
    SdxlError::Input(format!("scheduler: {e}"))
}

impl Sampler for SchedulerSampler<'_> {
    type Error = SdxlError;

    fn timesteps(&self) -> &[f64] {
        self.0.timesteps()
    }

    fn model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        self.0.model_input(sample, step).map_err(sched_err)
    }

    fn advance(
        &mut self,
        prediction: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.0
            .advance(prediction, step, sample, noise)
            .map_err(sched_err)
    }

    fn needs_noise(&self) -> bool {
        self.0.needs_noise()
    }
}

/// The one denoising loop of the project for SDXL: classifier-free guided UNet steps from
/// `start` to the final latents, for `generate` and for every benchmark that times a whole image.
///
/// Everything stays on the UNet's device: the scheduler updates ([`Scheduler::advance`]), the
/// guidance combine and the latents (`f32`). Per step the host uploads only the timestep (and, for
/// ancestral sampling, the step's noise); nothing is read back until the end. Steady steps replay
/// CUDA graphs when `params.cuda_graphs` and the driver allow it ([`pcpp_core::StepGraphs`]).
/// Non-finite latents are caught by a device-side flag that is read once, after the last step:
/// the error names the first step whose latents held a NaN or an infinity.
///
/// With `driver.cfg_branch() == Some(g)` only branch `g` is fed to the UNet (its gather returns
/// `[uncond; cond]`); otherwise the whole CFG batch is. `embeds` may live anywhere: they are moved
/// to the UNet's device and dtype once. Progress counts the steps that run.
///
/// With `control`, each step first runs the ControlNets whose window reaches it (on the same
/// input, conditioning and step context as the UNet; see [`crate::controlnet`]) and adds their
/// summed residuals to the UNet's skip connections. Steps with ControlNets replay CUDA graphs
/// too: one per distinct set of nets and scales ([`DenoiseModel::graph_key`]).
#[allow(clippy::too_many_arguments)]
pub fn denoise_with(
    unet: &UNet,
    control: Option<&Control<'_>>,
    driver: &dyn StepDriver,
    sched_cfg: &SchedulerConfig,
    params: &DenoiseParams,
    embeds: &PromptEmbeds,
    start: &DenoiseStart<'_>,
    step_noise: &StepNoise,
    progress: Progress<'_>,
) -> Result<Denoised> {
    let mut sched: Box<dyn Scheduler> = scheduler::build(params.scheduler, sched_cfg, params.steps)
        .map_err(|e| SdxlError::Input(format!("scheduler: {e}")))?;
    let noise = match start {
        DenoiseStart::Noise(n) => *n,
        DenoiseStart::Image { noise, latents, .. } => {
            if latents.shape() != noise.shape() {
                return Err(SdxlError::Input(format!(
                    "init-image latents {:?} and noise {:?} differ in shape",
                    latents.shape(),
                    noise.shape()
                )));
            }
            *noise
        }
    };
    let shape = noise.shape().to_vec();
    if shape.len() != 4 || shape[0] != 1 {
        return Err(SdxlError::Input(format!(
            "initial noise must be [1, channels, h, w], got {shape:?}"
        )));
    }
    let cfg = params.cfg();
    let want_b = if cfg { 2 } else { 1 };
    if embeds.prompt_embeds.shape()[0] != want_b {
        return Err(SdxlError::Input(format!(
            "prompt embeddings have batch {}, expected {want_b}",
            embeds.prompt_embeds.shape()[0]
        )));
    }
    let device = unet.device();
    let dtype = unet.dtype();
    let branch = if cfg { driver.cfg_branch() } else { None };
    let (text, pooled) = match branch {
        Some(g) => (
            embeds.prompt_embeds.narrow(0, g, 1)?,
            embeds.pooled.narrow(0, g, 1)?,
        ),
        None => (embeds.prompt_embeds.clone(), embeds.pooled.clone()),
    };
    let fed = text.shape()[0];
    let on_unet = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.to_dtype(dtype)?) };
    let time_ids = Tensor::from_vec(&[fed, 6], params.micro.ids().repeat(fed))?;
    let cond = UNetCond::new(
        on_unet(&text)?,
        Some(on_unet(&pooled)?),
        Some(on_unet(&time_ids)?),
    );
    let f32_on = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.to_dtype(DType::F32)?) };
    let noise_dev = f32_on(noise)?;
    let (first, latents) = match start {
        DenoiseStart::Noise(_) => (0, noise_dev.affine(sched.init_noise_sigma() as f32, 0.0)?),
        DenoiseStart::Image {
            latents, strength, ..
        } => {
            let first = img2img_start_step(params.steps, *strength)?;
            let clean = f32_on(latents)?;
            (
                first,
                sched.noised(&clean, &noise_dev, first).map_err(sched_err)?,
            )
        }
    };
    // Ancestral sampling derives its per-step noise from the initial noise's values (host).
    let noise_host = if sched.needs_noise() && matches!(step_noise, StepNoise::Derived) {
        noise.to_vec_f32()?
    } else {
        Vec::new()
    };
    if let StepNoise::Given(v) = step_noise {
        if sched.needs_noise() {
            if v.len() < sched.num_steps() {
                return Err(SdxlError::Input(format!(
                    "{} per-step noise tensors given for {} steps",
                    v.len(),
                    sched.num_steps()
                )));
            }
            if let Some(bad) = v.iter().find(|t| t.shape() != shape.as_slice()) {
                return Err(SdxlError::Input(format!(
                    "per-step noise has shape {:?}, expected {shape:?}",
                    bad.shape()
                )));
            }
        }
    }
    let mut step_noise_at = |i: usize| -> Result<Tensor> {
        match step_noise {
            StepNoise::Derived => Ok(Tensor::from_vec(
                &shape,
                derived_step_noise(&noise_host, i, noise_host.len()),
            )?
            .to_device(device)?),
            StepNoise::Given(v) => f32_on(&v[i]),
        }
    };
    let opts = LoopOptions {
        first,
        guidance: cfg.then_some(params.guidance),
        cuda_graphs: params.cuda_graphs,
    };
    let mut sampler = SchedulerSampler(sched.as_mut());
    let control = control
        .filter(|c| !c.units.is_empty())
        .map(|c| {
            let steps = sampler.timesteps().len().saturating_sub(first);
            c.prepare(unet, &cond, (shape[2], shape[3]), steps)
        })
        .transpose()?;
    let out = match control {
        Some(control) => denoise_loop(
            &ControlledUNet { unet, control },
            &cond,
            driver,
            &mut sampler,
            latents,
            &opts,
            &mut step_noise_at,
            progress,
        )?,
        None => denoise_loop(
            unet,
            &cond,
            driver,
            &mut sampler,
            latents,
            &opts,
            &mut step_noise_at,
            progress,
        )?,
    };
    if let Some(step) = out.nonfinite_at {
        return Err(SdxlError::NonFinite {
            stage: "the latents".into(),
            at: format!(" after denoising step {} of {}", step + 1, params.steps),
            hint: overflow_hint(dtype),
        });
    }
    Ok(Denoised {
        latents: out.latents,
        step_seconds: out.step_seconds,
    })
}

/// What to suggest when a run in `dtype` produced non-finite values.
pub fn overflow_hint(dtype: pcpp_kernels::DType) -> String {
    match dtype {
        pcpp_kernels::DType::F16 => {
            "; f16 overflow is the likely cause: try --dtype bf16 or --dtype f32".into()
        }
        pcpp_kernels::DType::BF16 => {
            "; try --dtype f32, or check the weights for NaN or infinite values".into()
        }
        pcpp_kernels::DType::F32 => "; check the weights for NaN or infinite values".into(),
    }
}

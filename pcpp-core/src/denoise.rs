//! The denoising loop, the only one in the project, for every model (diffusers' pipelines'
//! `__call__` between prompt encoding and decoding): per step the scheduler's model input, the
//! model's forward (eager, or replayed from a CUDA graph, [`StepGraphs`]), classifier-free
//! guidance when asked for, and the scheduler's update; nothing is read back until the end.
//!
//! It lives in the core, not in a model crate, because it is the other half of the
//! [`StepDriver`] protocol (PCPP §1.4, §4, §7.1): which CFG branch a rank feeds, each step's
//! context, the end of a step's issue and of its device work, and which steps repeat so that a
//! graph can replay them. Both model crates run it (SDXL's UNet, Flux's transformer), each
//! through [`DenoiseModel`]. The core stays free of schedulers: the loop sees one through
//! [`Sampler`], the tensor interface of a diffusers scheduler, and the model crates build theirs
//! (SDXL's Euler / DDIM / DPM++ from its scheduler configs, Flux's flow-matching Euler).

use pcpp_kernels::{DType, Device, KernelError, Tensor};

use crate::graph::StepGraphs;
use crate::layers::{CoreError, StepCtx, StepDriver};

/// A denoising network as the loop drives it: one forward of the model input batch at the
/// step's timesteps. The forward must be capturable as a CUDA graph on a GPU (device work only,
/// its conditioning already on the device).
pub trait DenoiseModel {
    /// What the forward reads besides the latents (prompt embeddings and the like), on the
    /// model's device.
    type Cond;
    /// The model crate's error.
    type Error: From<CoreError> + From<KernelError> + std::fmt::Display;

    /// Where the model's activations live.
    fn device(&self) -> Device;

    /// The dtype of the model's activations (its input is cast to it).
    fn dtype(&self) -> DType;

    /// The prediction for `x` at timesteps `t`. With CFG split
    /// ([`StepDriver::cfg_branch`]) the model's gather returns both branches `[uncond; cond]`.
    ///
    /// # Shapes
    /// `x: [b, c, h, w]` (the whole latent on every rank), `t: [b]` → `[b or 2b, c, h, w]`.
    fn forward(
        &self,
        ctx: &StepCtx,
        x: &Tensor,
        t: &Tensor,
        cond: &Self::Cond,
    ) -> Result<Tensor, Self::Error>;

    /// Which kind of step `ctx` is, for CUDA graphs ([`StepGraphs`]): steps with equal keys run
    /// the same device work (the same layers with the same constants) and replay one graph per
    /// step parity; a step whose work changes mid-run (a model part that joins or leaves, a
    /// scale that changes) has a key of its own. The default: every step is of one kind.
    fn graph_key(&self, ctx: &StepCtx) -> Vec<u64> {
        let _ = ctx;
        Vec::new()
    }
}

/// A scheduler as the loop uses it: tensor updates on the latents' device, in `f32`.
pub trait Sampler {
    /// The scheduler's error.
    type Error;

    /// The timestep passed to the model at each step.
    fn timesteps(&self) -> &[f64];

    /// The model input for step `step` (the sample, scaled where the schedule asks for it).
    fn model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor, Self::Error>;

    /// The sample after step `step` given the (guided) prediction; `noise` is a unit Gaussian
    /// sample of the latents' shape when [`Sampler::needs_noise`].
    fn advance(
        &mut self,
        prediction: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor, Self::Error>;

    /// Whether [`Sampler::advance`] needs fresh noise (ancestral samplers).
    fn needs_noise(&self) -> bool {
        false
    }
}

/// How the loop runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoopOptions {
    /// The first step of the schedule that runs (0, or later for image-to-image).
    pub first: usize,
    /// Classifier-free guidance scale, when CFG runs: the model sees the CFG batch (or, with CFG
    /// split, this rank's branch) and the loop combines `u + g·(c − u)` in `f32`.
    pub guidance: Option<f32>,
    /// On a GPU, replay steady steps as CUDA graphs ([`StepGraphs`]). Ignored on the CPU.
    pub cuda_graphs: bool,
}

/// What the loop returns.
#[derive(Debug, Clone)]
pub struct LoopOutput {
    /// The final latents, `f32` on the model's device.
    pub latents: Tensor,
    /// Host seconds of each step that ran.
    pub step_seconds: Vec<f64>,
    /// The first step whose latents held a NaN or an infinity (a device-side flag read once).
    pub nonfinite_at: Option<usize>,
}

/// Runs the loop from `latents` (`[1, c, h, w]`, `f32` on the model's device, already noised to
/// step `opts.first`): per step the model input, the model's forward (through `graphs`, which
/// replays steady steps when the driver allows it), guidance, and the scheduler's update with
/// `noise(step)` when the scheduler needs noise. `progress` gets `(steps done, steps to run)`.
#[allow(clippy::too_many_arguments)]
pub fn denoise_loop<M, S>(
    model: &M,
    cond: &M::Cond,
    driver: &dyn StepDriver,
    sched: &mut S,
    mut latents: Tensor,
    opts: &LoopOptions,
    noise: &mut dyn FnMut(usize) -> Result<Tensor, M::Error>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LoopOutput, M::Error>
where
    M: DenoiseModel,
    S: Sampler + ?Sized,
    M::Error: From<S::Error>,
{
    let (device, dtype) = (model.device(), model.dtype());
    let branch = opts.guidance.and_then(|_| driver.cfg_branch());
    let mut graphs = StepGraphs::new(opts.cuda_graphs && device != Device::Cpu);
    let timesteps = sched.timesteps().to_vec();
    if opts.first >= timesteps.len() {
        return Err(CoreError::Config(format!(
            "the denoising loop starts at step {} of a {}-step schedule",
            opts.first,
            timesteps.len()
        ))
        .into());
    }
    let total = timesteps.len() - opts.first;
    let mut flag = Tensor::finite_flag(device)?;
    let mut step_seconds = Vec::with_capacity(total);
    driver.begin_generation()?;
    for (i, &t) in timesteps.iter().enumerate().skip(opts.first) {
        let t0 = std::time::Instant::now();
        let x = sched.model_input(&latents, i)?.to_dtype(dtype)?;
        let x_in = if opts.guidance.is_some() && branch.is_none() {
            Tensor::cat(&[&x, &x], 0)?
        } else {
            x
        };
        let b = x_in.shape()[0];
        let ts = Tensor::from_vec(&[b], vec![t as f32; b])?.to_device(device)?;
        let ctx = driver.step_ctx(i - opts.first);
        let out = graphs.run(model, driver, &ctx, &x_in, &ts, cond)?;
        let guided = match opts.guidance {
            Some(g) => guide(&out, g)?,
            None => out,
        };
        let fresh = if sched.needs_noise() {
            Some(noise(i)?)
        } else {
            None
        };
        latents = sched.advance(&guided, i, &latents, fresh.as_ref())?;
        flag = latents.nonfinite_flag(&flag, i as f32)?;
        step_seconds.push(t0.elapsed().as_secs_f64());
        progress(i + 1 - opts.first, total);
    }
    driver.end_generation()?;
    let nonfinite_at = flag.flag_code()?.map(|s| s as usize);
    Ok(LoopOutput {
        latents,
        step_seconds,
        nonfinite_at,
    })
}

/// Classifier-free guidance of `[uncond; cond]` predictions: `u + g·(c − u)`, in `f32` (one cast
/// of both branches), the same sums as the schedulers' linear combinations.
fn guide(out: &Tensor, g: f32) -> Result<Tensor, KernelError> {
    let out = out.to_dtype(DType::F32)?;
    let u = out.narrow(0, 0, 1)?;
    let c = out.narrow(0, 1, 1)?;
    let diff = c.add(&u.affine(-1.0, 0.0)?)?;
    let scaled = if g == 1.0 { diff } else { diff.affine(g, 0.0)? };
    u.add(&scaled)
}

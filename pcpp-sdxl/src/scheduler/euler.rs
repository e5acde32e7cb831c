//! Euler discrete sampler, diffusers' `EulerDiscreteScheduler` with `s_churn = 0`.
//!
//! σ(t) = √((1 − ᾱₜ)/ᾱₜ) is computed in `float32` from ᾱ, interpolated linearly (numpy, `float64`)
//! at the inference timesteps and stored as `float32`, with a final σ = 0 (or σ_min) appended.
//! `scale_model_input` and `step` repeat diffusers' `float32` operations in the same order.

use super::config::{FinalSigmas, PredictionType, TimestepSpacing};
use pcpp_kernels::Tensor;

use super::{check_shapes, lin, Scheduler, SchedulerConfig, SchedulerError};

/// Euler discrete scheduler (deterministic; `s_churn = 0`).
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
}

/// `np.interp(x, arange(len(fp)), fp)` in `float64`.
pub(super) fn interp_unit_grid(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= last as f64 {
        return f64::from(fp[last]);
    }
    let j = x.floor() as usize;
    let (y0, y1) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    (y1 - y0) * (x - j as f64) + y0
}

/// The σ schedule shared by the Euler samplers: the inference timesteps (as `float32`, like
/// diffusers), σ at each of them interpolated on the training grid (without the final σ), and the
/// training σs themselves.
pub(super) struct SigmaSchedule {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
    pub train_sigmas: Vec<f32>,
}

/// Builds the [`SigmaSchedule`] of `config` for `num_steps` steps with `spacing`.
pub(super) fn sigma_schedule(
    config: &SchedulerConfig,
    spacing: TimestepSpacing,
    num_steps: usize,
) -> Result<SigmaSchedule, SchedulerError> {
    let train_sigmas: Vec<f32> = config
        .alphas_cumprod()?
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect();
    let timesteps: Vec<f32> = super::config::inference_timesteps(config, spacing, num_steps, true)?
        .into_iter()
        .map(|t| t as f32)
        .collect();
    let sigmas = timesteps
        .iter()
        .map(|&t| interp_unit_grid(f64::from(t), &train_sigmas) as f32)
        .collect();
    Ok(SigmaSchedule {
        timesteps,
        sigmas,
        train_sigmas,
    })
}

/// diffusers' `init_noise_sigma` of the Euler samplers: the largest σ, or `√(σ² + 1)` of it with
/// `leading` spacing.
pub(super) fn init_noise_sigma(spacing: TimestepSpacing, sigmas: &[f32]) -> f32 {
    let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
        TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
    }
}

/// `scale_model_input` of the Euler samplers: the sample divided by `√(σ² + 1)`.
pub(super) fn scale_by_sigma(sample: &Tensor, sigma: f32) -> Result<Tensor, SchedulerError> {
    let denom = (sigma * sigma + 1.0).sqrt();
    lin(&[(sample, 1.0 / denom)])
}

/// The Euler samplers' data prediction x₀ at σ from the sample `x` and the model output `m`.
pub(super) fn euler_x0(
    prediction: PredictionType,
    sigma: f32,
    x: &Tensor,
    m: &Tensor,
) -> Result<Tensor, SchedulerError> {
    match prediction {
        PredictionType::Epsilon => lin(&[(x, 1.0), (m, -sigma)]),
        PredictionType::VPrediction => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            lin(&[(m, c_out), (x, 1.0 / (sigma * sigma + 1.0))])
        }
        PredictionType::Sample => lin(&[(m, 1.0)]),
    }
}

/// The Euler derivative `(x − x₀)/σ`.
pub(super) fn derivative(x: &Tensor, x0: &Tensor, sigma: f32) -> Result<Tensor, SchedulerError> {
    Ok(lin(&[(x, 1.0), (x0, -1.0)])?.affine(1.0 / sigma, 0.0)?)
}

impl EulerDiscreteScheduler {
    /// Sets the scheduler up for `num_steps` inference steps.
    pub fn new(config: &SchedulerConfig, num_steps: usize) -> Result<Self, SchedulerError> {
        config.validate()?;
        for (key, on) in [
            ("use_karras_sigmas", config.use_karras_sigmas),
            ("use_exponential_sigmas", config.use_exponential_sigmas),
            ("use_beta_sigmas", config.use_beta_sigmas),
        ] {
            if on {
                return Err(config.unsupported(key, "true"));
            }
        }
        if config.interpolation_type != "linear" {
            return Err(config.unsupported("interpolation_type", &config.interpolation_type));
        }
        let spacing = config.spacing_or(TimestepSpacing::Linspace)?;
        let prediction = config.prediction()?;
        let final_sigmas = config.final_sigmas()?;
        let SigmaSchedule {
            timesteps: timesteps_f32,
            mut sigmas,
            train_sigmas,
        } = sigma_schedule(config, spacing, num_steps)?;
        sigmas.push(match final_sigmas {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => train_sigmas[0],
        });
        let timesteps =
            if config.timestep_type == "continuous" && prediction == PredictionType::VPrediction {
                sigmas[..num_steps]
                    .iter()
                    .map(|&s| f64::from(0.25 * s.ln()))
                    .collect()
            } else {
                timesteps_f32.iter().map(|&t| f64::from(t)).collect()
            };
        let init_noise_sigma = init_noise_sigma(spacing, &sigmas);
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction,
        })
    }

    /// The σ of every step plus the final one (`num_steps + 1` values), as diffusers' `sigmas`.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        f64::from(self.init_noise_sigma)
    }

    fn model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor, SchedulerError> {
        check_shapes(step, self.num_steps(), sample, sample, "sample")?;
        scale_by_sigma(sample, self.sigmas[step])
    }

    fn advance(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor, SchedulerError> {
        check_shapes(step, self.num_steps(), sample, model_output, "model_output")?;
        let sigma = self.sigmas[step];
        let dt = self.sigmas[step + 1] - sigma;
        let x0 = euler_x0(self.prediction, sigma, sample, model_output)?;
        let d = derivative(sample, &x0, sigma)?;
        lin(&[(sample, 1.0), (&d, dt)])
    }

    fn noised(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step: usize,
    ) -> Result<Tensor, SchedulerError> {
        check_shapes(step, self.num_steps(), original, noise, "noise")?;
        lin(&[(original, 1.0), (noise, self.sigmas[step])])
    }
}

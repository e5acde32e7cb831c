//! Euler discrete sampler, diffusers' `EulerDiscreteScheduler` with `s_churn = 0`.
//!
//! σ(t) = √((1 − ᾱₜ)/ᾱₜ) is computed in `float32` from ᾱ, interpolated linearly (numpy, `float64`)
//! at the inference timesteps and stored as `float32`, with a final σ = 0 (or σ_min) appended.
//! `scale_model_input` and `step` repeat diffusers' `float32` operations in the same order.

use super::config::{FinalSigmas, PredictionType, TimestepSpacing};
use super::{check_step, Scheduler, SchedulerConfig, SchedulerError};

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
pub(super) fn scale_by_sigma(sample: &[f32], sigma: f32) -> Vec<f32> {
    let denom = (sigma * sigma + 1.0).sqrt();
    sample.iter().map(|&x| x / denom).collect()
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

    fn scale_model_input(&self, sample: &[f32], step: usize) -> Result<Vec<f32>, SchedulerError> {
        check_step(step, self.num_steps(), sample, sample, "sample")?;
        Ok(scale_by_sigma(sample, self.sigmas[step]))
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &[f32],
        _noise: Option<&[f32]>,
    ) -> Result<Vec<f32>, SchedulerError> {
        check_step(step, self.num_steps(), sample, model_output, "model_output")?;
        let sigma = self.sigmas[step];
        let dt = self.sigmas[step + 1] - sigma;
        let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
        let c_skip_div = sigma * sigma + 1.0;
        let prediction = self.prediction;
        Ok(sample
            .iter()
            .zip(model_output)
            .map(|(&x, &m)| {
                let x0 = match prediction {
                    PredictionType::Epsilon => x - sigma * m,
                    PredictionType::VPrediction => m * c_out + x / c_skip_div,
                    PredictionType::Sample => m,
                };
                let derivative = (x - x0) / sigma;
                x + derivative * dt
            })
            .collect())
    }

    fn add_noise(
        &self,
        original: &[f32],
        noise: &[f32],
        step: usize,
    ) -> Result<Vec<f32>, SchedulerError> {
        check_step(step, self.num_steps(), original, noise, "noise")?;
        let sigma = self.sigmas[step];
        Ok(original
            .iter()
            .zip(noise)
            .map(|(&x, &n)| x + n * sigma)
            .collect())
    }
}

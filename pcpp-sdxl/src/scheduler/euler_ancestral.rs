//! Euler ancestral sampler, diffusers' `EulerAncestralDiscreteScheduler`.
//!
//! Timesteps and σ are Euler discrete's (a `float32` grid, σ interpolated in `float64` from the
//! training σ, final σ = 0). Each step goes down to σ_down = √(σ_to² − σ_up²) along the Euler
//! direction and adds fresh unit Gaussian noise scaled by σ_up = √(σ_to²(σ_from² − σ_to²)/σ_from²),
//! so the sampler needs one noise sample per step ([`Scheduler::needs_noise`]); where that noise
//! comes from is the caller's choice (the pipeline derives it from the initial noise, see
//! `StepNoise` in the pipeline module). Operations follow diffusers' `float32` order.

use super::config::{PredictionType, TimestepSpacing};
use pcpp_kernels::Tensor;

use super::euler::{derivative, euler_x0, init_noise_sigma, scale_by_sigma, sigma_schedule};
use super::{check_shapes, lin, Scheduler, SchedulerConfig, SchedulerError};

/// Euler ancestral scheduler (stochastic: `step` needs a noise sample).
#[derive(Debug, Clone)]
pub struct EulerAncestralScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
}

impl EulerAncestralScheduler {
    /// Sets the scheduler up for `num_steps` inference steps.
    pub fn new(config: &SchedulerConfig, num_steps: usize) -> Result<Self, SchedulerError> {
        config.validate()?;
        let spacing = config.spacing_or(TimestepSpacing::Linspace)?;
        let prediction = config.prediction()?;
        if prediction == PredictionType::Sample {
            // diffusers raises NotImplementedError for this combination
            return Err(config.unsupported("prediction_type", &config.prediction_type));
        }
        let schedule = sigma_schedule(config, spacing, num_steps)?;
        let timesteps: Vec<f64> = schedule.timesteps.iter().map(|&t| f64::from(t)).collect();
        let mut sigmas = schedule.sigmas;
        sigmas.push(0.0);
        let init_noise_sigma = init_noise_sigma(spacing, &sigmas);
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction,
        })
    }

    /// The σ of every step plus the final 0 (`num_steps + 1` values), as diffusers' `sigmas`.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for EulerAncestralScheduler {
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
        noise: Option<&Tensor>,
    ) -> Result<Tensor, SchedulerError> {
        check_shapes(step, self.num_steps(), sample, model_output, "model_output")?;
        let noise = noise.ok_or(SchedulerError::MissingNoise)?;
        check_shapes(step, self.num_steps(), sample, noise, "noise")?;
        let sigma = self.sigmas[step];
        let sigma_to = self.sigmas[step + 1];
        let (from2, to2) = (sigma * sigma, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        // diffusers has no sample prediction here (refused at construction).
        let x0 = euler_x0(self.prediction, sigma, sample, model_output)?;
        let d = derivative(sample, &x0, sigma)?;
        lin(&[(sample, 1.0), (&d, dt), (noise, sigma_up)])
    }

    fn needs_noise(&self) -> bool {
        true
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

//! DDIM sampler with η = 0, diffusers' `DDIMScheduler`.
//!
//! Timesteps are integers; the previous timestep is `t − T // n` whatever the spacing (as in
//! diffusers), with ᾱ_prev = 1 or ᾱ₀ past the start (`set_alpha_to_one`). The update repeats
//! diffusers' `float32` operations in the same order.

use super::config::{PredictionType, TimestepSpacing};
use super::{check_step, Scheduler, SchedulerConfig, SchedulerError};

/// DDIM scheduler (deterministic, η = 0).
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    timesteps: Vec<f64>,
    /// (ᾱₜ, ᾱ_prev) per step.
    alphas: Vec<(f32, f32)>,
    prediction: PredictionType,
    clip_range: Option<f32>,
}

impl DdimScheduler {
    /// Sets the scheduler up for `num_steps` inference steps.
    pub fn new(config: &SchedulerConfig, num_steps: usize) -> Result<Self, SchedulerError> {
        config.validate()?;
        if config.thresholding {
            return Err(config.unsupported("thresholding", "true"));
        }
        let spacing = config.spacing_or(TimestepSpacing::Leading)?;
        let prediction = config.prediction()?;
        let alphas_cumprod = config.alphas_cumprod()?;
        let final_alpha = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let timesteps = super::config::inference_timesteps(config, spacing, num_steps, false)?;
        let stride = config.num_train_timesteps / num_steps;
        let alphas = timesteps
            .iter()
            .map(|&t| {
                let t = t as usize;
                let prev = t
                    .checked_sub(stride)
                    .map_or(final_alpha, |p| alphas_cumprod[p]);
                (alphas_cumprod[t], prev)
            })
            .collect();
        let clip_range = config
            .clip_sample
            .unwrap_or(true)
            .then_some(config.clip_sample_range as f32);
        if clip_range.is_some_and(|r| r.is_nan() || r < 0.0) {
            return Err(config.invalid("clip_sample_range", &config.clip_sample_range.to_string()));
        }
        Ok(Self {
            timesteps,
            alphas,
            prediction,
            clip_range,
        })
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &[f32],
        _noise: Option<&[f32]>,
    ) -> Result<Vec<f32>, SchedulerError> {
        check_step(step, self.num_steps(), sample, model_output, "model_output")?;
        let (alpha_t, alpha_prev) = self.alphas[step];
        let beta_t = 1.0 - alpha_t;
        let (sqrt_a, sqrt_b) = (alpha_t.sqrt(), beta_t.sqrt());
        let sqrt_a_prev = alpha_prev.sqrt();
        let dir_coef = (1.0 - alpha_prev - 0.0f32).sqrt();
        let prediction = self.prediction;
        let clip = self.clip_range;
        Ok(sample
            .iter()
            .zip(model_output)
            .map(|(&x, &m)| {
                let (x0, eps) = match prediction {
                    PredictionType::Epsilon => ((x - sqrt_b * m) / sqrt_a, m),
                    PredictionType::Sample => (m, (x - sqrt_a * m) / sqrt_b),
                    PredictionType::VPrediction => {
                        (sqrt_a * x - sqrt_b * m, sqrt_a * m + sqrt_b * x)
                    }
                };
                let x0 = clip.map_or(x0, |r| x0.clamp(-r, r));
                sqrt_a_prev * x0 + dir_coef * eps
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
        let alpha = self.alphas[step].0;
        let (sqrt_a, sqrt_b) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        Ok(original
            .iter()
            .zip(noise)
            .map(|(&x, &n)| sqrt_a * x + sqrt_b * n)
            .collect())
    }
}

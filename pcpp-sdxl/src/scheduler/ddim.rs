//! DDIM sampler with η = 0, diffusers' `DDIMScheduler`.
//!
//! Timesteps are integers; the previous timestep is `t − T // n` whatever the spacing (as in
//! diffusers), with ᾱ_prev = 1 or ᾱ₀ past the start (`set_alpha_to_one`). The update repeats
//! diffusers' `float32` operations in the same order.

use super::config::{PredictionType, TimestepSpacing};
use pcpp_kernels::Tensor;

use super::{check_shapes, lin, Scheduler, SchedulerConfig, SchedulerError};

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

    fn advance(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor, SchedulerError> {
        check_shapes(step, self.num_steps(), sample, model_output, "model_output")?;
        let (alpha_t, alpha_prev) = self.alphas[step];
        let beta_t = 1.0 - alpha_t;
        let (sqrt_a, sqrt_b) = (alpha_t.sqrt(), beta_t.sqrt());
        let sqrt_a_prev = alpha_prev.sqrt();
        let dir_coef = (1.0 - alpha_prev - 0.0f32).sqrt();
        let (x, m) = (sample, model_output);
        let (x0, eps) = match self.prediction {
            PredictionType::Epsilon => (
                lin(&[(x, 1.0), (m, -sqrt_b)])?.affine(1.0 / sqrt_a, 0.0)?,
                lin(&[(m, 1.0)])?,
            ),
            PredictionType::Sample => (
                lin(&[(m, 1.0)])?,
                lin(&[(x, 1.0), (m, -sqrt_a)])?.affine(1.0 / sqrt_b, 0.0)?,
            ),
            PredictionType::VPrediction => (
                lin(&[(x, sqrt_a), (m, -sqrt_b)])?,
                lin(&[(m, sqrt_a), (x, sqrt_b)])?,
            ),
        };
        let x0 = match self.clip_range {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        lin(&[(&x0, sqrt_a_prev), (&eps, dir_coef)])
    }

    fn noised(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step: usize,
    ) -> Result<Tensor, SchedulerError> {
        check_shapes(step, self.num_steps(), original, noise, "noise")?;
        let alpha = self.alphas[step].0;
        let (sqrt_a, sqrt_b) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        lin(&[(original, sqrt_a), (noise, sqrt_b)])
    }
}

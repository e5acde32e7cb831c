//! diffusers' `FlowMatchEulerDiscreteScheduler` as FluxPipeline drives it: sigmas
//! `linspace(1, 1/steps, steps)`, shifted by `mu` (dynamic shifting, `mu` from the packed image
//! token count through `calculate_shift`) or by the fixed `shift`, timesteps `sigma · 1000`, a
//! final sigma of 0, and Euler steps `x += (σ_next − σ) · v`. The arithmetic follows the
//! original's dtypes (NumPy f64 linspace, f32 shift) so that the tables agree to the last bit or so.

use pcpp_kernels::Tensor;

use crate::config::FlowMatchConfig;
use crate::error::{FluxError, Result};

/// FluxPipeline's `calculate_shift`: `mu` linear in the image token count between
/// (`base_image_seq_len`, `base_shift`) and (`max_image_seq_len`, `max_shift`).
pub fn calculate_shift(image_seq_len: usize, c: &FlowMatchConfig) -> f64 {
    let m =
        (c.max_shift - c.base_shift) / (c.max_image_seq_len as f64 - c.base_image_seq_len as f64);
    let b = c.base_shift - m * c.base_image_seq_len as f64;
    image_seq_len as f64 * m + b
}

/// NumPy's `linspace(start, stop, n)` in f64 (`start + i·step`, the last value exactly `stop`).
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    (0..n)
        .map(|i| {
            if i + 1 == n {
                stop
            } else {
                i as f64 * step + start
            }
        })
        .collect()
}

/// The schedule of one generation.
#[derive(Debug, Clone)]
pub struct FlowMatchSchedule {
    /// `steps + 1` sigmas, the last 0.
    pub sigmas: Vec<f32>,
    /// `steps` timesteps (`sigma · 1000`).
    pub timesteps: Vec<f32>,
    /// The shift used (`None` without dynamic shifting).
    pub mu: Option<f64>,
}

impl FlowMatchSchedule {
    /// The schedule of `steps` steps for an image of `image_seq_len` packed tokens.
    pub fn new(c: &FlowMatchConfig, steps: usize, image_seq_len: usize) -> Result<Self> {
        if steps == 0 || steps > 10_000 {
            return Err(FluxError::Input(format!(
                "steps = {steps} must be in 1..=10000"
            )));
        }
        let base: Vec<f32> = linspace(1.0, 1.0 / steps as f64, steps)
            .into_iter()
            .map(|s| s as f32)
            .collect();
        let (mut sigmas, mu): (Vec<f32>, _) = if c.use_dynamic_shifting {
            let mu = calculate_shift(image_seq_len, c);
            let shifted = match c.time_shift_type.as_str() {
                "linear" => {
                    let m = mu as f32;
                    base.iter().map(|&t| m / (m + (1.0 / t - 1.0))).collect()
                }
                _ => {
                    let e = mu.exp() as f32;
                    base.iter().map(|&t| e / (e + (1.0 / t - 1.0))).collect()
                }
            };
            (shifted, Some(mu))
        } else {
            let s = c.shift as f32;
            (
                base.iter()
                    .map(|&t| s * t / (1.0 + (s - 1.0) * t))
                    .collect(),
                None,
            )
        };
        let n = c.num_train_timesteps as f32;
        let timesteps = sigmas.iter().map(|&s| s * n).collect();
        sigmas.push(0.0);
        Ok(FlowMatchSchedule {
            sigmas,
            timesteps,
            mu,
        })
    }

    /// Number of steps.
    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// Euler step `i`: `sample + (σ_{i+1} − σ_i) · velocity`, in f32.
    pub fn step(&self, i: usize, velocity: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        let v = velocity.to_dtype(pcpp_kernels::DType::F32)?;
        Ok(sample.add(&v.affine(dt, 0.0)?)?)
    }
}

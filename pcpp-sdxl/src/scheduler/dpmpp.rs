//! DPM-Solver++ 2M, diffusers' `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"`
//! and `solver_order = 2`, optionally on the Karras et al. (2022) σ schedule (`use_karras_sigmas`).
//!
//! Timesteps are integers. Without Karras sigmas they are picked by `timestep_spacing` over
//! `num_steps + 1` points (diffusers' DPM grid, which differs from Euler's) and σ is interpolated
//! (numpy, `float64`) from the training σ; with Karras sigmas σ follows ρ = 7 between the training
//! σ_max and σ_min and each timestep is σ mapped back through log σ(t) and rounded. The final σ is
//! 0 or σ_min (`final_sigmas_type`). Each step converts the model output to a data prediction x₀
//! and takes a first-order (DDIM-like) step on the first call and at the end, a second-order
//! multistep (midpoint or Heun) step otherwise, in diffusers' `float32` operation order.

use super::config::{self, FinalSigmas, PredictionType, TimestepSpacing};
use super::euler::interp_unit_grid;
use pcpp_kernels::Tensor;

use super::{check_shapes, lin, Scheduler, SchedulerConfig, SchedulerError};

/// The second-order update's form (`solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

/// DPM-Solver++ 2M scheduler (deterministic, multistep: keeps the previous x₀ prediction).
#[derive(Debug, Clone)]
pub struct DpmSolverPp2MScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: PredictionType,
    solver: SolverType,
    /// Whether the last step is first-order (`lower_order_final` / `euler_at_final` / σ_last = 0).
    first_order_last: bool,
    /// x₀ prediction of the previous step, if any.
    previous: Option<Tensor>,
}

/// σ → (αₜ, σₜ) = (1/√(σ² + 1), σ·αₜ), in `float32` as diffusers' `_sigma_to_alpha_sigma_t`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = log αₜ − log σₜ in `float32`.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// Karras et al. σ schedule with ρ = 7 from `sigma_max` down to `sigma_min`, `n` values (`float64`).
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    let ramp = if n == 1 {
        vec![0.0]
    } else {
        config::np_linspace(1.0, n)
    };
    ramp.into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log σ matches `sigma`, by
/// linear interpolation in `log_sigmas` (ascending, `float32`).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let count = log_sigmas
        .iter()
        .take_while(|&&l| log_sigma - f64::from(l) >= 0.0)
        .count();
    // index of the last log σ ≤ log_sigma (0 when there is none), at most len − 2
    let low_idx = count.saturating_sub(1).min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((f64::from(low) - log_sigma) / f64::from(low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

impl DpmSolverPp2MScheduler {
    /// Sets the scheduler up for `num_steps` inference steps; `karras` selects the Karras σ
    /// schedule (whatever the config's `use_karras_sigmas` says).
    ///
    /// The config's `algorithm_type` and `solver_order` are not read: this is always
    /// DPM-Solver++ of order 2, as the sampler's name says.
    pub fn new(
        config: &SchedulerConfig,
        num_steps: usize,
        karras: bool,
    ) -> Result<Self, SchedulerError> {
        config.validate()?;
        for (key, on) in [
            ("thresholding", config.thresholding),
            ("use_exponential_sigmas", config.use_exponential_sigmas),
            ("use_beta_sigmas", config.use_beta_sigmas),
            ("use_lu_lambdas", config.use_lu_lambdas),
            ("use_flow_sigmas", config.use_flow_sigmas),
        ] {
            if on {
                return Err(config.unsupported(key, "true"));
            }
        }
        if let Some(v) = &config.variance_type {
            return Err(config.unsupported("variance_type", v));
        }
        if let Some(l) = config.lambda_min_clipped.filter(|l| l.is_finite()) {
            return Err(config.unsupported("lambda_min_clipped", &l.to_string()));
        }
        let t_train = config.num_train_timesteps;
        if num_steps == 0 {
            return Err(SchedulerError::ZeroSteps);
        }
        if num_steps > t_train {
            return Err(SchedulerError::TooManySteps {
                num_steps,
                num_train_timesteps: t_train,
            });
        }
        let spacing = config.spacing_or(TimestepSpacing::Linspace)?;
        let prediction = config.prediction()?;
        let solver = match config.solver_type.as_str() {
            "heun" => SolverType::Heun,
            _ => SolverType::Midpoint,
        };
        let alphas_cumprod = config.alphas_cumprod()?;
        let train_sigmas: Vec<f32> = alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect();
        // λ is unclipped, so the largest timestep is T − 1.
        let last = t_train;
        let mut timesteps: Vec<f64> = match spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> = config::np_linspace((last - 1) as f64, num_steps + 1)
                    .into_iter()
                    .map(f64::round_ties_even)
                    .collect();
                v.reverse();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = last / (num_steps + 1);
                (1..=num_steps)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => config::np_arange_trailing(t_train, num_steps)
                .ok_or_else(|| {
                    config.unsupported(
                        "timestep_spacing",
                        &format!(
                            "trailing with {num_steps} steps (diffusers yields a different count)"
                        ),
                    )
                })?
                .into_iter()
                .map(|x| x.round_ties_even() - 1.0)
                .collect(),
        };
        let mut sigmas: Vec<f32> = if karras {
            let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
            let ks = karras_sigmas(
                config
                    .sigma_min
                    .unwrap_or_else(|| f64::from(train_sigmas[0])),
                config
                    .sigma_max
                    .unwrap_or_else(|| f64::from(train_sigmas[t_train - 1])),
                num_steps,
            );
            let round = config.beta_schedule()? != config::BetaSchedule::SquaredCosCapV2;
            timesteps = ks
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    let t = if round { t.round_ties_even() } else { t };
                    // diffusers casts to int64 (truncation)
                    t.trunc()
                })
                .collect();
            ks.iter().map(|&s| s as f32).collect()
        } else {
            timesteps
                .iter()
                .map(|&t| interp_unit_grid(t, &train_sigmas) as f32)
                .collect()
        };
        if let Some(&bad) = timesteps
            .iter()
            .find(|&&t| t < 0.0 || t > (t_train - 1) as f64)
        {
            return Err(config.invalid(
                "steps_offset",
                &format!(
                    "{} (timestep {bad} is outside 0..{t_train})",
                    config.steps_offset
                ),
            ));
        }
        let final_sigmas = config.final_sigmas()?;
        sigmas.push(match final_sigmas {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => train_sigmas[0],
        });
        let first_order_last = config.euler_at_final
            || (config.lower_order_final && num_steps < 15)
            || final_sigmas == FinalSigmas::Zero;
        Ok(Self {
            timesteps,
            sigmas,
            prediction,
            solver,
            first_order_last,
            previous: None,
        })
    }

    /// The σ of every step plus the final one (`num_steps + 1` values), as diffusers' `sigmas`.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The data prediction x₀ from the model output (diffusers' `convert_model_output`).
    fn data_prediction(
        &self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
    ) -> Result<Tensor, SchedulerError> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step]);
        match self.prediction {
            PredictionType::Epsilon => {
                Ok(lin(&[(sample, 1.0), (model_output, -sigma_t)])?.affine(1.0 / alpha_t, 0.0)?)
            }
            PredictionType::Sample => lin(&[(model_output, 1.0)]),
            PredictionType::VPrediction => lin(&[(sample, alpha_t), (model_output, -sigma_t)]),
        }
    }
}

impl Scheduler for DpmSolverPp2MScheduler {
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
        let x0 = self.data_prediction(model_output, step, sample)?;
        let last = step + 1 == self.num_steps();
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[step]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let ratio = sigma_t / sigma_s0;
        let b = alpha_t * ((-h).exp() - 1.0);
        let out = match self.previous.as_ref().filter(|p| {
            // a second-order step needs the previous prediction of the same shape
            !(last && self.first_order_last) && p.shape() == x0.shape() && step > 0
        }) {
            None => lin(&[(sample, ratio), (&x0, -b)])?,
            Some(m1) => {
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[step - 1]);
                let lambda_s1 = lambda(alpha_s1, sigma_s1);
                let h_0 = lambda_s0 - lambda_s1;
                let r0 = h_0 / h;
                let inv_r0 = 1.0 / r0;
                let d1 = lin(&[(&x0, 1.0), (m1, -1.0)])?.affine(inv_r0, 0.0)?;
                match self.solver {
                    SolverType::Midpoint => lin(&[(sample, ratio), (&x0, -b), (&d1, -(0.5 * b))])?,
                    SolverType::Heun => {
                        let c = alpha_t * (((-h).exp() - 1.0) / h + 1.0);
                        lin(&[(sample, ratio), (&x0, -b), (&d1, c)])?
                    }
                }
            }
        };
        self.previous = Some(x0);
        Ok(out)
    }

    fn noised(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step: usize,
    ) -> Result<Tensor, SchedulerError> {
        check_shapes(step, self.num_steps(), original, noise, "noise")?;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step]);
        lin(&[(original, alpha_t), (noise, sigma_t)])
    }
}
